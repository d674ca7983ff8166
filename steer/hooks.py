"""One hook mechanism for every capture and intervention.

    with attach(model, {"blocks.3.resid_post": fn}) as session:
        model(**batch)

`fn(value, ctx)` sees the tensor at a canonical point (see steer.adapters) and returns None to
leave it alone or a replacement. Hooks are registered on entry and removed in `finally`, also when
the body raises; the model object is never wrapped or permanently changed (steer's attention
implementation is switched in only while attention points are hooked, and switched back).

`capture` (full tensors) and streaming reducers (steer.reducers) are thin layers over `attach`.
Every hook sees `ctx.token_mask`: which tokens of this forward call are real (left padding and
user-deselected tokens are False), so nothing downstream counts padding.

Each canonical point has a `steer.adapters.PointKind`, which decides how it is reached: a module's
input or output, a router's tuple or one item of it, or steer's attention function (`attn.pattern`
readers, `attn.impl` overrides). `module_hook` is the one place a torch hook is registered: `attach`
uses it, and so do serving engines' modules (vLLM, SGLang), which have no canonical points.

Works on a plain HF model, inside an nnsight `TransformersModel` trace (pass the nnsight model or
the HF model inside it), and on a TransformerLens `TransformerBridge` (pass the bridge): the hooks go
on the underlying HF modules, so all three give the same numbers.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from steer import attention
from steer.adapters import ModelMap, PointKind, PointSpec, model_map

HookFn = Callable[[Any, "HookContext"], Any]


def unwrap_model(model: Any) -> nn.Module:
    """The Hugging Face model inside an nnsight TransformersModel or a TransformerLens bridge."""
    for attr in ("original_model", "_module"):  # TransformerLens 4 bridge, nnsight envoy
        try:
            inner = getattr(model, attr)
        except Exception:  # nnsight envoys raise on unknown attributes outside a trace
            continue
        if isinstance(inner, nn.Module) and hasattr(inner, "config"):
            return unwrap_model(inner)
    if isinstance(model, nn.Module) and hasattr(model, "config"):
        return model
    raise TypeError(
        f"cannot find a Hugging Face causal LM in {type(model).__name__}: pass a transformers model, an "
        f"nnsight TransformersModel, or a TransformerLens TransformerBridge"
    )


@dataclass
class Session:
    """State shared by all hooks of one `attach`: the current batch's real-token mask and labels."""

    model: nn.Module
    map: ModelMap
    calls: int = 0  # forward calls of the decoder stack seen so far
    batch_shape: tuple[int, int] | None = None  # (B, T) of the current call
    attention_mask: torch.Tensor | None = None  # Bool[B, T] of the current call
    selection: torch.Tensor | None = None  # user token selection, Bool[B, T_total] or None
    past_length: int = 0  # tokens already in the KV cache for this call

    def set_token_selection(self, selection: torch.Tensor | None) -> None:
        """Restrict which tokens count (e.g. response tokens only). Bool[B, T_total] over the full
        sequence; for each forward call the columns of that call's positions are used."""
        self.selection = None if selection is None else selection.bool()

    @property
    def token_mask(self) -> torch.Tensor | None:
        """Bool[B, T] of the current forward call: real, selected tokens. None = all tokens."""
        mask = self.attention_mask
        if self.selection is not None and self.batch_shape is not None:
            b, t = self.batch_shape
            sel = self.selection[:, self.past_length : self.past_length + t]
            if sel.shape[1] != t:  # selection shorter than the sequence: positions beyond it are unselected
                pad = torch.zeros(b, t - sel.shape[1], dtype=torch.bool, device=sel.device)
                sel = torch.cat([sel, pad], dim=1)
            mask = sel if mask is None else (mask & sel.to(mask.device))
        return mask


@dataclass
class HookContext:
    """What a hook function knows besides the tensor: where it is and which tokens are real."""

    point: str
    layer: int | None
    session: Session
    kwargs: dict | None = None  # INPUT points: the module call's keyword arguments (read, not replace)

    @property
    def token_mask(self) -> torch.Tensor | None:
        return self.session.token_mask

    @property
    def flat_token_mask(self) -> torch.Tensor | None:
        """token_mask flattened to [B*T], aligned with router tensors (which are per flattened token)."""
        mask = self.session.token_mask
        return None if mask is None else mask.reshape(-1)

    @property
    def batch_shape(self) -> tuple[int, int] | None:
        return self.session.batch_shape

    @property
    def call(self) -> int:
        return self.session.calls

    def n_tokens(self) -> int:
        """Real tokens in this call."""
        mask = self.token_mask
        if mask is not None:
            return int(mask.sum())
        b, t = self.batch_shape or (0, 0)
        return b * t


def _as_list(fns: HookFn | Sequence[HookFn]) -> list[HookFn]:
    return list(fns) if isinstance(fns, (list, tuple)) else [fns]


def _replace(value, item: int, new):
    parts = list(value)
    parts[item] = new
    return type(value)(parts) if not hasattr(value, "_fields") else type(value)(*parts)


def _first_tensor_in(output):
    """Layers return a tensor (transformers 5) or a tuple whose first item is the hidden state."""
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return output[0], True
    return output, False


def _make_output_hook(entries: list[tuple[PointSpec, HookFn]], session: Session):
    def hook(module, args, output):
        for spec, fn in entries:
            ctx = HookContext(spec.name, spec.layer, session)
            if spec.kind is PointKind.ROUTER:  # the whole (logits, weights, indices) tuple
                new = fn(output, ctx)
                output = output if new is None else new
            elif spec.kind is PointKind.ROUTER_ITEM:
                new = fn(output[spec.item], ctx)
                output = output if new is None else _replace(output, spec.item, new)
            else:
                value, in_tuple = _first_tensor_in(output)
                new = fn(value, ctx)
                if new is not None:
                    output = (new, *output[1:]) if in_tuple else new
        return output

    return hook


def _make_input_hook(entries: list[tuple[PointSpec, HookFn]], session: Session):
    def hook(module, args, kwargs):
        changed = False
        for spec, fn in entries:
            ctx = HookContext(spec.name, spec.layer, session, kwargs)
            if args:
                new = fn(args[0], ctx)
                if new is not None:
                    args, changed = (new, *args[1:]), True
            else:
                new = fn(kwargs["hidden_states"], ctx)
                if new is not None:
                    kwargs, changed = {**kwargs, "hidden_states": new}, True
        return (args, kwargs) if changed else None

    return hook


def _make_batch_hook(session: Session):
    """Pre-hook on the decoder stack: records which tokens of this call are real."""

    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        ref = ids if ids is not None else embeds
        session.calls += 1
        if ref is None:
            session.batch_shape, session.attention_mask = None, None
            return None
        b, t = ref.shape[0], ref.shape[1]
        session.batch_shape = (b, t)
        mask = kwargs.get("attention_mask")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))  # transformers 5.24 calls it `cache`
        past = 0
        if cache is not None and hasattr(cache, "get_seq_length"):
            past = int(cache.get_seq_length())
        elif isinstance(mask, torch.Tensor) and mask.dim() == 2:
            past = mask.shape[1] - t
        session.past_length = past
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            session.attention_mask = mask[:, -t:].bool()
        else:  # None (all real) or a prebuilt 4-D mask, whose padding we cannot recover cheaply
            session.attention_mask = None
        return None

    return hook


def module_hook(module: nn.Module, hook: Callable, *, pre: bool = False, with_kwargs: bool = False):
    """Register a torch forward hook (`pre=True`: forward pre-hook) on `module`; returns its handle.

    The one place steer registers torch hooks. Use `attach` for a Hugging Face model (canonical
    points, token masks, removal in `finally`); this is for modules that have no canonical points,
    such as a serving engine's (vLLM, SGLang), and for `attach` itself.
    """
    if pre:
        return module.register_forward_pre_hook(hook, with_kwargs=with_kwargs)
    return module.register_forward_hook(hook, with_kwargs=with_kwargs)


@dataclass
class _Plan:
    """`attach`'s hooks sorted by how they are reached: module hooks and attention handlers per layer."""

    by_module: dict[tuple[str, bool], list[tuple[PointSpec, HookFn]]]
    readers: dict[int, list]
    overrides: dict[int, list]


def _plan(mm: ModelMap, hooks: Mapping[str, HookFn | Sequence[HookFn]], session: Session) -> _Plan:
    plan = _Plan(defaultdict(list), defaultdict(list), defaultdict(list))
    for pattern, fns in hooks.items():
        for name in mm.expand(pattern):
            spec = mm.resolve(name)
            for fn in _as_list(fns):
                if spec.kind is PointKind.ATTN_IMPL:
                    plan.overrides[spec.layer].append(_bind_override(fn, HookContext(name, spec.layer, session)))
                elif spec.kind is PointKind.ATTN_PATTERN:
                    plan.readers[spec.layer].append(_bind_reader(fn, HookContext(name, spec.layer, session)))
                else:
                    plan.by_module[(spec.module_path, spec.kind is PointKind.INPUT)].append((spec, fn))
    return plan


@contextlib.contextmanager
def attach(model: Any, hooks: Mapping[str, HookFn | Sequence[HookFn]], *,
           steer_attention: bool = False) -> Iterator[Session]:
    """Register `hooks` ({point or pattern: fn}) on `model` for the body of the `with` block.

    steer_attention: run attention through steer's function even with no attention point hooked (each
    layer then computes exactly as without steer, but its masks are steer's boolean ones).
    """
    hf = unwrap_model(model)
    mm = model_map(hf)
    session = Session(hf, mm)
    plan = _plan(mm, hooks, session)
    handles = []
    try:
        base = mm.module(mm.adapter.base)
        handles.append(module_hook(base, _make_batch_hook(session), pre=True, with_kwargs=True))
        for (path, is_input), entries in plan.by_module.items():
            if is_input:
                handles.append(module_hook(mm.module(path), _make_input_hook(entries, session), pre=True,
                                           with_kwargs=True))
            else:
                handles.append(module_hook(mm.module(path), _make_output_hook(entries, session)))
        with contextlib.ExitStack() as stack:
            if plan.readers or plan.overrides or steer_attention:  # every layer gets a state, so unhooked
                # layers keep their implementation
                attn_modules = {i: mm.module(f"{mm.adapter.layers}.{i}.{mm.adapter.attn}") for i in range(mm.n_layers)}
                stack.enter_context(attention.activate(hf, attn_modules, plan.readers, plan.overrides))
            yield session
    finally:
        for handle in handles:
            handle.remove()


def _bind_reader(fn: HookFn, ctx: HookContext):
    return lambda weights: fn(weights, ctx)


def _bind_override(fn: HookFn, ctx: HookContext):
    return lambda call: fn(call, ctx)


# ---- capture ---------------------------------------------------------------------------------

class Capture(Mapping):
    """Tensors recorded at each point: `cap[point]` is a list with one tensor per forward call."""

    def __init__(self, to_cpu: bool = False, dtype: torch.dtype | None = None):
        self.values: dict[str, list[torch.Tensor]] = defaultdict(list)
        self.masks: dict[str, list[torch.Tensor | None]] = defaultdict(list)
        self.to_cpu, self.dtype = to_cpu, dtype

    def _record(self, value, ctx: HookContext):
        v = value.detach() if isinstance(value, torch.Tensor) else tuple(x.detach() for x in value)
        if isinstance(v, torch.Tensor):
            if self.dtype is not None and v.is_floating_point():
                v = v.to(self.dtype)
            if self.to_cpu:
                v = v.cpu()
        self.values[ctx.point].append(v)
        mask = ctx.token_mask
        self.masks[ctx.point].append(None if mask is None else mask.detach().cpu())

    def __getitem__(self, point: str) -> list[torch.Tensor]:
        if point not in self.values:
            raise KeyError(f"{point!r} was not captured (captured: {sorted(self.values)})")
        return self.values[point]

    def __iter__(self):
        return iter(self.values)

    def __len__(self):
        return len(self.values)

    def cat(self, point: str, dim: int = 1) -> torch.Tensor:
        """Concatenate the calls of a generation along the sequence dimension."""
        return torch.cat(self[point], dim=dim)


@contextlib.contextmanager
def capture(
    model: Any,
    points: Sequence[str] | str = (),
    *,
    reducers: Mapping[str, Any] | None = None,
    to_cpu: bool = False,
    dtype: torch.dtype | None = None,
) -> Iterator[Capture]:
    """Record full tensors at `points` and/or feed streaming `reducers` ({point or pattern: reducer
    or list of reducers}).

    Full capture keeps one tensor per call per point; reducers keep memory independent of the
    number of prompts (steer.reducers).
    """
    if isinstance(points, str):
        points = [points]
    cap = Capture(to_cpu=to_cpu, dtype=dtype)
    hooks: dict[str, list] = defaultdict(list)
    for p in points:
        hooks[p].append(cap._record)
    for p, reducer in (reducers or {}).items():
        hooks[p].extend(_as_list(reducer))
    with attach(model, hooks) as session:
        cap.session = session
        yield cap
