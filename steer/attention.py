"""steer's attention implementation: how attention probabilities become hookable in transformers 5.

transformers 5 computes attention through a registered function (`AttentionInterface`); SDPA and
flash kernels never materialise probabilities. While a hook needs attention (`blocks.L.attn.pattern`
readers, `blocks.L.attn.impl` overrides such as ACT), steer registers the implementation "steer" and
switches the model's config to it, restoring the previous implementation afterwards.

"steer" registers its own mask function too: without one, transformers silently builds no causal
mask for an unknown implementation. Every pattern that transformers materialises for SDPA (padding,
sliding window, packed sequences, custom patterns) is materialised as a boolean mask (True = may attend),
so every path below sees the same structure. Where transformers' SDPA integration would pass no mask at
all and rely on is_causal (no padding, no window in reach, queries at the last positions), the mask
function returns a `CausalMask` instead: a Bool[B, 1, Tq, Tk] tensor of one byte (a zero-stride view)
that stands for the plain causal pattern. Why a stand-in and not None or a dense mask: a dense mask costs
O(Tq Tk) bytes and time per forward (64 MiB at 8,192 tokens) that neither SDPA nor the lse kernels need;
None would be ambiguous (transformers' own functions read None as "no mask" or "causal" depending on
the module), and steer's forward must tell the two apart. The stand-in is never wrong where something
does read it: every torch operation on it (indexing, `~`, `.to`, a kernel call; anything but
shape/dtype/device metadata) first materialises the dense causal mask, exactly as transformers would
have built it, once per forward (`dense_mask`). Layers without a handler run SDPA exactly as without
steer (its fused causal kernel, mask None); handlers see `AttentionCall.causal` and use fused causal
kernels; `AttentionCall.mask` materialises the dense mask on first read for handlers that need values.
Masks that are exactly causal + the layer's sliding window (no padding) are marked as well: handlers see
`AttentionCall.window_causal` and may apply the window themselves, per query block, instead of reading an
N x N mask.

Per attention module, three paths:
- no handler on this layer: the model's previous implementation (SDPA, eager, ...), same numbers;
- `attn.impl` override: the handler computes the output itself (e.g. ACT via steer.kernels.act);
- `attn.pattern` readers: the family's own eager function (exact semantics, incl. Gemma soft-capping
  and GPT-OSS learned sinks) is run, and its probabilities are passed to the readers.
"""

from __future__ import annotations

import sys
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils._pytree import tree_map
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

IMPL_NAME = "steer"
_lock = threading.Lock()
_registered = False


@dataclass
class AttentionCall:
    """One attention call, as an `attn.impl` override sees it.

    q: [B, H, Tq, D]; k, v: [B, Hkv, Tk, D]; `mask`: Bool[B, 1, Tq, Tk] (True = may attend) or None
    (no masking at all). `causal`: the mask is the plain causal pattern with the queries at the last
    Tq key positions (no padding, no sliding window in reach; also a decode row that sees every key), so
    fused causal kernels give the same numbers without it; check it before reading `mask`, which then
    materialises the O(Tq Tk) dense mask (once per forward, shared by the layers). `window_causal`: the mask is exactly that
    pattern cut by `sliding_window` (no padding), so kernels given mask=None and the window give the same
    numbers without it. `base()` runs the model's own implementation. An override returns
    `(out [B, Tq, H, Dv], weights or None)` exactly like a transformers attention function.
    """

    module: nn.Module
    layer: int
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    attention_mask: torch.Tensor | None  # as the model passed it: a `CausalMask` stand-in where plain causal
    scaling: float
    kwargs: dict
    _base: Callable = field(repr=False, default=None)
    causal: bool = False
    window_causal: bool = False  # mask == causal + `sliding_window` exactly, queries at the last positions

    def base(self):
        return self._base()

    @property
    def mask(self) -> torch.Tensor | None:
        return dense_mask(self.attention_mask)

    @property
    def sliding_window(self) -> int | None:
        return self.kwargs.get("sliding_window") or getattr(self.module, "sliding_window", None)

    def kernel_mask(self, causal: bool | None = None) -> tuple[torch.Tensor | None, int | None]:
        """(mask, sliding_window) for steer.kernels' lse/ACT functions. Plain causal (`causal`, or the
        caller's own wider `causal` test) or causal + the layer's window: no mask, so no N x N tensor is
        read, and the window (if any) is applied by the kernels per query block. Otherwise the dense mask,
        which already holds any window, and no window."""
        causal = self.causal if causal is None else causal
        mask = None if causal or self.window_causal else self.mask
        return mask, (self.sliding_window if mask is None else None)


@dataclass
class _ModuleState:
    layer: int
    base_impl: str
    pattern_readers: list[Callable] = field(default_factory=list)
    overrides: list[Callable] = field(default_factory=list)


# id(attention module) -> state; entries live only inside `activate` contexts.
_ACTIVE: dict[int, _ModuleState] = {}


class CausalMask(torch.Tensor):
    """Bool[B, 1, Tq, Tk] standing for the plain causal mask (queries at the last Tq positions) where
    transformers' SDPA would pass no mask: one byte of storage, expanded with zero strides.

    Only shape, dtype and device are answered without materialising. Any other torch operation on it
    (including through torch.ops, or as a kernel's argument) runs on `dense()`: key j visible to query i iff
    j <= i + Tk - Tq, the pattern SDPA's is_causal (Tq == Tk) or unmasked (Tq == 1) call and steer's causal
    kernels compute, and the mask transformers' `sdpa_mask` builds where it skips (tested equal); built once
    and kept with the stand-in, which lives as long as the forward.
    """

    _dense: torch.Tensor | None

    @staticmethod
    def __new__(cls, shape: tuple[int, int, int, int], device):
        # the stored byte is False: a consumer that bypassed __torch_function__ would see every key masked
        # (loud: NaN or zero rows), never silently all keys
        self = torch.Tensor._make_subclass(cls, torch.zeros((), dtype=torch.bool, device=device).expand(shape))
        self._dense = None
        return self

    def dense(self) -> torch.Tensor:
        if self._dense is None:
            with torch._C.DisableTorchFunctionSubclass():
                b, _, tq, tk = self.shape
                self._dense = _causal_dense(b, tq, tk, self.device)
        return self._dense

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _METADATA:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        args, kwargs = tree_map(lambda a: a.dense() if isinstance(a, CausalMask) else a, (args, kwargs))
        return func(*args, **kwargs)

    def __repr__(self):
        return f"CausalMask(shape={tuple(self.shape)}, device={self.device}, dense={self._dense is not None})"


_METADATA = {
    torch.Tensor.shape.__get__, torch.Tensor.dtype.__get__, torch.Tensor.device.__get__, torch.Tensor.ndim.__get__,
    torch.Tensor.is_cuda.__get__, torch.Tensor.requires_grad.__get__, torch.Tensor.size, torch.Tensor.dim,
    torch.Tensor.__hash__,
}


def _causal_dense(b: int, tq: int, tk: int, device) -> torch.Tensor:
    """Bool[b, 1, tq, tk] (one tq x tk tensor expanded over the batch): queries at the last tq key positions."""
    return torch.ones(tq, tk, dtype=torch.bool, device=device).tril_(tk - tq).expand(b, 1, tq, tk)


def dense_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """`mask` as a plain tensor: the dense Bool[B, 1, Tq, Tk] for a `CausalMask`, else `mask` itself."""
    return mask.dense() if isinstance(mask, CausalMask) else mask


def _bool_mask(batch_size, q_length, kv_length, *args, **kwargs):
    # transformers' own decision whether is_causal may replace the mask: it forbids it for packed sequences,
    # custom (or/and) patterns and compiled decode steps, whose masks are then not causal
    mask = sdpa_mask(batch_size, q_length, kv_length, *args, **kwargs)
    if mask is None:  # transformers' SDPA would pass no mask (is_causal)
        # Causal with queries at the last positions: prefill (Tq == Tk) or one decode row. A longer query
        # chunk with Tq < Tk that transformers skips relies on SDPA's top-left alignment: built densely.
        if q_length in (1, kv_length):
            return CausalMask((batch_size, 1, q_length, kv_length), kwargs.get("device", "cpu"))
        kwargs["allow_is_causal_skip"] = False
        return sdpa_mask(batch_size, q_length, kv_length, *args, **kwargs)
    window = kwargs.get("local_size")
    if window and mask.shape[-2] == mask.shape[-1] > 1 and _is_window_causal(mask, window):
        _WINDOW[id(mask)] = (weakref.ref(mask), int(window))
        weakref.finalize(mask, _WINDOW.pop, id(mask), None)
    elif mask.shape[-2] == 1 and mask.device.type == "cpu" and bool(mask.all()):
        # one decode row that sees every key (a sliding cache as long as its window): causal for handlers,
        # checked once per step here instead of once per hooked layer; SDPA still gets it as without steer
        _SEES_ALL[id(mask)] = weakref.ref(mask)
        weakref.finalize(mask, _SEES_ALL.pop, id(mask), None)
    return mask


# id(mask) -> weak reference, for one-row masks transformers built (it could not skip them) that are all True
_SEES_ALL: dict[int, weakref.ref] = {}
# id(mask) -> (weak reference, window) for prefill masks that are exactly causal + a sliding window
_WINDOW: dict[int, tuple[weakref.ref, int]] = {}


def _is_window_causal(mask: torch.Tensor, window: int, rows: int = 256) -> bool:
    """mask Bool[B, 1, T, T] == causal with keys pos - window < key <= pos, in every batch row; checked per
    row block against the band it must hold (~50 ms of one CPU thread at 8,192 tokens, once per forward)."""
    t = mask.shape[-1]
    for r0 in range(0, t, rows):
        r1 = min(t, r0 + rows)
        lo = max(0, r0 - window + 1)
        block = mask[:, 0, r0:r1]
        if block[..., :lo].any() or block[..., r1:].any():
            return False
        pos = torch.arange(r0, r1, device=mask.device).unsqueeze(1)
        col = torch.arange(lo, r1, device=mask.device)
        band = (col <= pos) & (pos - col < window)
        if not torch.equal(block[..., lo:r1], band.expand(block.shape[0], -1, -1)):
            return False
    return True


def window_causal(mask: torch.Tensor | None) -> int | None:
    """The sliding window if `mask` is a prefill mask steer built and checked to be exactly causal + that
    window (no padding); else None."""
    hit = _WINDOW.get(id(mask)) if mask is not None else None
    return hit[1] if hit is not None and hit[0]() is mask else None


def _sees_all(mask: torch.Tensor | None) -> bool:
    ref = _SEES_ALL.get(id(mask)) if mask is not None else None
    return ref is not None and ref() is mask


def is_causal_mask(mask: torch.Tensor | None) -> bool:
    """True if `mask` is steer's stand-in for the plain causal pattern (see the module docstring)."""
    return isinstance(mask, CausalMask)


def _additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)


def _eager_fn(module: nn.Module) -> Callable:
    fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if fn is None:
        raise RuntimeError(
            f"{type(module).__name__} has no eager_attention_forward in its modeling file; attention "
            f"probabilities cannot be read for this family"
        )
    return fn


def _impl_fn(name: str, module: nn.Module) -> Callable:
    if name in (None, "eager"):
        return _eager_fn(module)
    return ALL_ATTENTION_FUNCTIONS[name]


def steer_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    state = _ACTIVE.get(id(module))
    base_name = state.base_impl if state else "sdpa"
    if scaling is None:
        scaling = query.shape[-1] ** -0.5

    causal = is_causal_mask(attention_mask)

    def run_base():
        fn = _impl_fn(base_name, module)
        if base_name in (None, "eager"):
            mask = _additive(dense_mask(attention_mask), query.dtype)
        elif causal and base_name == "sdpa":
            mask = None  # what transformers passes without steer: SDPA's is_causal fused path, same numbers
        else:
            mask = dense_mask(attention_mask)
        return fn(module, query, key, value, mask, scaling=scaling, dropout=dropout, **kwargs)

    if state is None or not (state.overrides or state.pattern_readers):
        return run_base()
    if state.overrides:
        call = AttentionCall(module, state.layer, query, key, value, attention_mask, scaling, kwargs, run_base,
                             causal or _sees_all(attention_mask))
        window = window_causal(attention_mask)
        call.window_causal = window is not None and window == call.sliding_window
        result = None
        for override in state.overrides:
            result = override(call)
            if result is not None:
                break
        out, weights = result if result is not None else run_base()
    else:
        out, weights = _eager_fn(module)(
            module, query, key, value, _additive(dense_mask(attention_mask), query.dtype), scaling=scaling,
            dropout=0.0, **kwargs,
        )
    if state.pattern_readers:
        if weights is None:  # the override computed no probabilities: recompute them exactly
            _, weights = _eager_fn(module)(
                module, query, key, value, _additive(dense_mask(attention_mask), query.dtype), scaling=scaling,
                dropout=0.0, **kwargs,
            )
        for reader in state.pattern_readers:
            reader(weights)
    return out, weights


def ensure_registered() -> None:
    global _registered
    with _lock:
        if _registered:
            return
        AttentionInterface.register(IMPL_NAME, steer_attention_forward)
        AttentionMaskInterface.register(IMPL_NAME, _bool_mask)
        _registered = True


class activate:
    """Context manager: route `model`'s attention through steer with the given per-layer handlers.

    `readers[layer]` get probabilities [B, H, Tq, Tk]; `overrides[layer]` get an `AttentionCall`.
    Nested activations on the same model stack their handlers; the outermost restores the config.
    """

    def __init__(self, model: nn.Module, attn_modules: dict[int, nn.Module], readers: dict[int, list],
                 overrides: dict[int, list]):
        self.model, self.attn_modules, self.readers, self.overrides = model, attn_modules, readers, overrides
        self._prev_impl = None
        self._owner = False

    def __enter__(self):
        ensure_registered()
        config = self.model.config
        current = config._attn_implementation
        self._owner = current != IMPL_NAME
        base = current if self._owner else None
        for layer, mod in self.attn_modules.items():
            state = _ACTIVE.get(id(mod))
            if state is None:
                state = _ACTIVE[id(mod)] = _ModuleState(layer, base)
            state.pattern_readers.extend(self.readers.get(layer, []))
            state.overrides.extend(self.overrides.get(layer, []))
        if self._owner:
            self._prev_impl = current
            config._attn_implementation = IMPL_NAME
        return self

    def __exit__(self, *exc):
        for layer, mod in self.attn_modules.items():
            state = _ACTIVE.get(id(mod))
            if state is None:
                continue
            for fn in self.readers.get(layer, []):
                _remove_identity(state.pattern_readers, fn)
            for fn in self.overrides.get(layer, []):
                _remove_identity(state.overrides, fn)
            if self._owner:
                _ACTIVE.pop(id(mod), None)
        if self._owner:
            self.model.config._attn_implementation = self._prev_impl
        return False


def _remove_identity(items: list, fn) -> None:
    for i, item in enumerate(items):
        if item is fn:
            del items[i]
            return


def attention_probs_reference(q, k, mask, scaling, n_rep: int | None = None) -> torch.Tensor:
    """Plain fp32 softmax(q k^T * scale) with a boolean mask; for tests and references."""
    if n_rep is None:
        n_rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(n_rep, dim=1)
    scores = (q.float() @ k.float().transpose(-1, -2)) * scaling
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.nan_to_num(probs, nan=0.0)

