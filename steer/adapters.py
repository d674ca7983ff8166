"""Architecture adapters: one table entry per model family, mapping canonical points to modules.

A canonical point is a TransformerLens-like name (`blocks.3.resid_post`, `blocks.3.mlp.router.indices`,
`final_norm.out`) that means the same thing in every family. The table says where that tensor lives
in the Hugging Face module tree; `steer.hooks` turns a point into a hook on that module.

This table is the one place that knows model families: module paths, the routing rule of MoE
families, attention quirks, the Hugging Face architecture class (also vLLM's name for it), the vLLM
module the serving plugin steers, and the tiny config the tests build. Every other module asks it
(`adapter_for`, `model_map`, `routing_rule`, `supported_families`), so adding a family, dense or MoE,
is adding one `Adapter(...)` entry with `register` (or to `ADAPTERS`): copy the closest family and
change the paths, rule and names. Paths are relative to the decoder layer unless they say otherwise.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from functools import cached_property

import torch
from torch import nn


class PointKind(Enum):
    """How a canonical point is reached, which decides what its hook sees and may return."""

    INPUT = "input"  # hidden states entering a module: resid_pre, attn.in, mlp.in
    OUTPUT = "output"  # a module's output tensor (a tuple's first item): resid_post, attn.out, attn.q/k/v,
    #                    mlp.out, embed.out, final_norm.out, lm_head.out
    ROUTER = "router"  # a router's whole (logits, weights, indices) output: mlp.router
    ROUTER_ITEM = "router_item"  # one item of it (PointSpec.item): mlp.router.logits/.weights/.indices
    ATTN_PATTERN = "attn_pattern"  # attention probabilities [B, H, Tq, Tk], read through steer.attention
    ATTN_IMPL = "attn_impl"  # one attention call (steer.attention.AttentionCall), answered by an override

    @property
    def is_attention(self) -> bool:
        """Served by steer's attention function, not by a module hook."""
        return self in (PointKind.ATTN_PATTERN, PointKind.ATTN_IMPL)

    @property
    def is_tensor(self) -> bool:
        """A hook on this kind sees one tensor of the residual width (or q/k/v, logits) it may replace."""
        return self in (PointKind.INPUT, PointKind.OUTPUT)


# Per-layer points: kind, the Adapter field naming the module (None: the decoder layer itself) and
# the item of a tuple output. `mlp.router*` exist only on MoE layers; `attn.impl` is an override,
# not a tensor, so `ModelMap.all_points` leaves it out.
_LAYER_POINT_TABLE: dict[str, tuple[PointKind, str | None, int | None]] = {
    "resid_pre": (PointKind.INPUT, None, None), "resid_post": (PointKind.OUTPUT, None, None),
    "attn.in": (PointKind.INPUT, "attn", None), "attn.out": (PointKind.OUTPUT, "o", None),
    "attn.q": (PointKind.OUTPUT, "q", None), "attn.k": (PointKind.OUTPUT, "k", None),
    "attn.v": (PointKind.OUTPUT, "v", None), "attn.pattern": (PointKind.ATTN_PATTERN, "attn", None),
    "attn.impl": (PointKind.ATTN_IMPL, "attn", None),
    "mlp.in": (PointKind.INPUT, "mlp", None), "mlp.out": (PointKind.OUTPUT, "mlp", None),
    "mlp.router": (PointKind.ROUTER, "router", None), "mlp.router.logits": (PointKind.ROUTER_ITEM, "router", 0),
    "mlp.router.weights": (PointKind.ROUTER_ITEM, "router", 1),
    "mlp.router.indices": (PointKind.ROUTER_ITEM, "router", 2),
}
_GLOBAL_POINT_TABLE: dict[str, str] = {"embed.out": "embed", "final_norm.out": "final_norm", "lm_head.out": "lm_head"}
ROUTER_POINTS = tuple(p for p, (k, _, _) in _LAYER_POINT_TABLE.items() if k in (PointKind.ROUTER, PointKind.ROUTER_ITEM))
LAYER_POINTS = tuple(p for p in _LAYER_POINT_TABLE if p not in ROUTER_POINTS)
GLOBAL_POINTS = tuple(_GLOBAL_POINT_TABLE)

# Routing-rule options per MoE family: (config, the model's dtype) -> RoutingRule keyword arguments
# besides kind and top_k (steer.kernels.router.RoutingRule; ALGORITHMS.md section 1).
RuleOptions = Callable[[object, "torch.dtype | None"], dict]


def _norm_from_config(config, dtype) -> dict:
    return dict(norm_topk_prob=bool(config.norm_topk_prob))


def _mixtral_rule(config, dtype) -> dict:
    return dict(norm_topk_prob=True, weights_dtype=torch.float32)


def _granite_rule(config, dtype) -> dict:  # GraniteMoE returns its weights in the hidden dtype
    return dict(weights_dtype=dtype or getattr(config, "dtype", None) or torch.float32)


def _deepseek_rule(config, dtype) -> dict:
    return dict(
        norm_topk_prob=bool(config.norm_topk_prob), n_group=config.n_group, topk_group=config.topk_group,
        routed_scaling_factor=float(config.routed_scaling_factor), weights_dtype=torch.float32,
    )


def _no_options(config, dtype) -> dict:
    return {}


@dataclass(frozen=True)
class Adapter:
    """Everything steer knows about one model family.

    Module paths say where each canonical point lives in the HF module tree. `routing` is the
    RoutingRule kind of an MoE family (None: dense) and `rule_options` reads the rest of its rule
    from the config. `attention_quirk` says why the family's attention is not plain
    softmax(q k^T * scale) (None: it is), which rules out steer's exact attention path. `architecture`
    is the HF class (vLLM registers the same name), `vllm` the vLLM module whose MoE layers steer's
    plugin steers (None: not servable with steer's plugin), `sglang_gate` the router-logits module in
    SGLang's implementation (None: no SGLang export), `tiny` the config overrides of the tiny test
    model (None: no tiny model).
    """

    family: str
    model_types: tuple[str, ...]
    architecture: str
    routing: str | None = None  # None: dense; else a steer.kernels.router.RoutingRule kind
    rule_options: RuleOptions = _no_options
    base: str = "model"  # the decoder stack (called once per forward with the attention mask)
    layers: str = "model.layers"
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    attn: str = "self_attn"
    q: str | None = "self_attn.q_proj"
    k: str | None = "self_attn.k_proj"
    v: str | None = "self_attn.v_proj"
    o: str = "self_attn.o_proj"
    mlp: str = "mlp"
    router: str | None = None
    experts: str | None = None
    shared_expert: str | None = None
    num_experts_attr: tuple[str, ...] = ("num_experts", "num_local_experts", "n_routed_experts")
    attention_quirk: str | None = None
    vllm: str | None = None
    # The router-logits module in SGLang's implementation of the family (SGLang's names, not HF's), for
    # `steer export --target sglang`; None: no SGLang module where a logits hook switches experts exactly.
    sglang_gate: str | None = None
    tiny: dict | None = field(default_factory=dict)
    notes: str = ""

    @property
    def is_moe(self) -> bool:
        return self.routing is not None

    @property
    def model_type(self) -> str:
        """The primary transformers model_type (the one tiny configs are built with)."""
        return self.model_types[0]

    def expert_count(self, config) -> int:
        """Routed experts per MoE layer, read from `config` (0 when the config names none)."""
        return next((int(v) for a in self.num_experts_attr if (v := getattr(config, a, None))), 0)


_WINDOWED = dict(sliding_window=8, layer_types=["sliding_attention", "full_attention", "sliding_attention"])

ADAPTERS: dict[str, Adapter] = {
    a.family: a
    for a in [
        Adapter("llama", ("llama",), "LlamaForCausalLM", vllm="vllm.model_executor.models.llama"),
        Adapter("qwen2", ("qwen2",), "Qwen2ForCausalLM", vllm="vllm.model_executor.models.qwen2"),
        Adapter("gemma3", ("gemma3_text", "gemma3"), "Gemma3ForCausalLM", vllm="vllm.model_executor.models.gemma3",
                tiny=_WINDOWED,
                notes="sliding-window and global layers alternate"),
        Adapter("mixtral", ("mixtral",), "MixtralForCausalLM", routing="softmax_topk", rule_options=_mixtral_rule,
                router="mlp.gate", experts="mlp.experts", vllm="vllm.model_executor.models.mixtral",
                sglang_gate="block_sparse_moe.gate",
                tiny=dict(num_local_experts=8, num_experts_per_tok=2)),
        Adapter("qwen2_moe", ("qwen2_moe",), "Qwen2MoeForCausalLM", routing="softmax_topk", sglang_gate="mlp.gate",
                rule_options=_norm_from_config, router="mlp.gate", experts="mlp.experts",
                shared_expert="mlp.shared_expert", vllm="vllm.model_executor.models.qwen2_moe",
                tiny=dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                          shared_expert_intermediate_size=64, norm_topk_prob=True, mlp_only_layers=[0]),
                notes="dense MLP on mlp_only_layers"),
        Adapter("qwen3_moe", ("qwen3_moe",), "Qwen3MoeForCausalLM", routing="softmax_topk", sglang_gate="mlp.gate",
                rule_options=_norm_from_config, router="mlp.gate", experts="mlp.experts",
                vllm="vllm.model_executor.models.qwen3_moe",
                tiny=dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=False)),
        Adapter("olmoe", ("olmoe",), "OlmoeForCausalLM", routing="softmax_topk", rule_options=_norm_from_config,
                sglang_gate="mlp.gate", router="mlp.gate", experts="mlp.experts", vllm="vllm.model_executor.models.olmoe",
                tiny=dict(num_experts=8, num_experts_per_tok=2, norm_topk_prob=False)),
        Adapter("deepseek_v3", ("deepseek_v3",), "DeepseekV3ForCausalLM", routing="sigmoid_group",
                rule_options=_deepseek_rule, router="mlp.gate", experts="mlp.experts",
                shared_expert="mlp.shared_experts", q=None, k=None, v=None,
                tiny=dict(n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2, moe_intermediate_size=32,
                          first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8,
                          qk_nope_head_dim=8, v_head_dim=16, num_key_value_heads=4, head_dim=8,
                          routed_scaling_factor=2.5, norm_topk_prob=True),
                notes="MLA attention (no plain q/k/v projections); first_k_dense_replace dense layers"),
        Adapter("gpt_oss", ("gpt_oss",), "GptOssForCausalLM", routing="topk_softmax", router="mlp.router",
                sglang_gate="mlp.router", experts="mlp.experts", attention_quirk="GPT-OSS adds learned sink logits to every softmax",
                tiny=dict(num_local_experts=8, num_experts_per_tok=2, **_WINDOWED),
                notes="learned attention sinks; eager attention by default"),
        Adapter("granitemoe", ("granitemoe",), "GraniteMoeForCausalLM", routing="topk_softmax",
                sglang_gate="block_sparse_moe.gate", rule_options=_granite_rule, mlp="block_sparse_moe", router="block_sparse_moe.router",
                experts="block_sparse_moe.experts", tiny=dict(num_local_experts=8, num_experts_per_tok=2)),
    ]
}


@contextmanager
def register(adapter: Adapter, *, replace: bool = False) -> Iterator[Adapter]:
    """Add `adapter` to the table for the duration of a `with` block (tests, notebooks).

    For a permanent family, add the entry to `ADAPTERS`. Every module reads the table when it is
    called, so a registered family is picked up by attach, the methods, export and the vLLM plugin.
    """
    if adapter.family in ADAPTERS and not replace:
        raise ValueError(f"family {adapter.family!r} already has an adapter; pass replace=True to override it")
    previous = ADAPTERS.get(adapter.family)
    ADAPTERS[adapter.family] = adapter
    try:
        yield adapter
    finally:
        if previous is None:
            del ADAPTERS[adapter.family]
        else:
            ADAPTERS[adapter.family] = previous


class UnsupportedModelError(ValueError):
    """The model's family has no adapter entry."""


class UnknownPointError(KeyError):
    """A canonical point name that does not exist for this model."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it readable
        return str(self.args[0])


def supported_families(*, moe: bool | None = None) -> list[str]:
    """Family names in the table; `moe=True` only MoE families, `moe=False` only dense ones."""
    return sorted(f for f, a in ADAPTERS.items() if moe is None or a.is_moe == moe)


def family_list(*, moe: bool | None = None) -> str:
    """The families as a comma-separated list, for error messages."""
    return ", ".join(supported_families(moe=moe))


def plain_attention_families() -> str:
    """The families whose adapter names no attention quirk, for error messages."""
    return ", ".join(sorted(f for f, a in ADAPTERS.items() if a.attention_quirk is None))


def routing_rule(config, hidden_dtype: torch.dtype | None = None):
    """The steer.kernels.router.RoutingRule of an MoE config (`hidden_dtype`: the model's dtype)."""
    from steer.kernels.router import RoutingRule

    adapter = adapter_for_model_type(getattr(config, "model_type", ""))
    if not adapter.is_moe:
        raise UnsupportedModelError(
            f"{adapter.family} is a dense family: it has no router. MoE families: {family_list(moe=True)}"
        )
    return RoutingRule(adapter.routing, int(config.num_experts_per_tok), **adapter.rule_options(config, hidden_dtype))


def attention_quirk(config) -> str | None:
    """Why this config's attention is not plain softmax(q k^T * scale), or None if it is."""
    config = getattr(config, "text_config", None) or config
    quirk = adapter_for_model_type(getattr(config, "model_type", "")).attention_quirk
    if quirk:
        return quirk
    if getattr(config, "attn_logit_softcapping", None):
        return f"attention logits are soft-capped at {config.attn_logit_softcapping}"
    return None


def vllm_architectures() -> dict[str, str]:
    """vLLM architecture name -> the vLLM module implementing it, for every family steer's plugin wraps
    (MoE families: routing edits, fingerprints, LYNX; dense families: fingerprints and LYNX)."""
    return {a.architecture: a.vllm for a in ADAPTERS.values() if a.vllm}


def _model_type(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    if config is None:
        raise UnsupportedModelError(f"{type(model).__name__} has no .config: pass a Hugging Face causal LM")
    return getattr(config, "model_type", "")


def adapter_for_model_type(model_type: str) -> Adapter:
    for adapter in ADAPTERS.values():
        if model_type in adapter.model_types:
            return adapter
    raise UnsupportedModelError(
        f"model type {model_type!r} is not supported. Supported families: {', '.join(supported_families())}. "
        f"To add one, append an Adapter(...) entry to steer.adapters.ADAPTERS naming its module paths "
        f"(copy the closest family)."
    )


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter for a Hugging Face causal LM (or an error listing the supported families)."""
    return adapter_for_model_type(_model_type(model))


def get_module(root: nn.Module, path: str) -> nn.Module:
    module = root
    for part in path.split("."):
        module = module[int(part)] if part.isdigit() else getattr(module, part)
    return module


def _has_module(root: nn.Module, path: str) -> bool:
    try:
        get_module(root, path)
        return True
    except (AttributeError, IndexError):
        return False


@dataclass(frozen=True)
class PointSpec:
    """How to reach one canonical point: a module plus which of its tensors."""

    name: str
    module_path: str
    kind: PointKind
    layer: int | None = None
    item: int | None = None  # index into a tuple output (router: 0 logits, 1 weights, 2 indices)


@dataclass
class ModelMap:
    """An adapter bound to one model: resolves canonical point names to modules."""

    model: nn.Module
    adapter: Adapter
    _cache: dict[str, PointSpec] = field(default_factory=dict, repr=False)

    @cached_property
    def n_layers(self) -> int:
        return len(get_module(self.model, self.adapter.layers))

    @cached_property
    def moe_layers(self) -> list[int]:
        """Layers with a router (MoE families may keep some layers dense)."""
        if not self.adapter.is_moe:
            return []
        return [i for i in range(self.n_layers) if _has_module(self.layer(i), self.adapter.router)]

    @property
    def config(self):
        return self.model.config

    @cached_property
    def num_experts(self) -> int:
        if not self.adapter.is_moe:
            return 0
        if count := self.adapter.expert_count(self.config):
            return count
        raise UnsupportedModelError(f"cannot read the expert count of {self.adapter.family} from its config")

    @property
    def top_k(self) -> int:
        return int(self.config.num_experts_per_tok) if self.adapter.is_moe else 0

    @property
    def n_heads(self) -> int:
        return int(self.config.num_attention_heads)

    @property
    def n_kv_heads(self) -> int:
        return int(getattr(self.config, "num_key_value_heads", None) or self.n_heads)

    @property
    def d_model(self) -> int:
        return int(self.config.hidden_size)

    def layer(self, index: int) -> nn.Module:
        self.check_layer(index)
        return get_module(self.model, self.adapter.layers)[index]

    def check_layer(self, index: int) -> None:
        if not isinstance(index, int) or not 0 <= index < self.n_layers:
            raise IndexError(
                f"layer {index} is out of range: {self.adapter.family} model has {self.n_layers} layers "
                f"(valid 0..{self.n_layers - 1})"
            )

    def check_expert(self, layer: int, expert: int) -> None:
        if layer not in self.moe_layers:
            raise IndexError(f"layer {layer} has no router; MoE layers are {self.moe_layers}")
        if not 0 <= expert < self.num_experts:
            raise IndexError(f"expert {expert} is out of range: valid 0..{self.num_experts - 1}")

    def module(self, path: str) -> nn.Module:
        return get_module(self.model, path)

    def routing_rule(self):
        """The steer.kernels.router.RoutingRule this family's routers follow (read from the config)."""
        return routing_rule(self.config, hidden_dtype=dtype_of(self.model))

    # ---- canonical points -------------------------------------------------------------------
    def all_points(self, *, overrides: bool = False) -> list[str]:
        """Every point of this model whose hook sees tensors (`overrides=True`: also `attn.impl`)."""
        names = list(GLOBAL_POINTS)
        for i in range(self.n_layers):
            for p in LAYER_POINTS:
                if p in ("attn.q", "attn.k", "attn.v") and getattr(self.adapter, p[-1]) is None:
                    continue
                if p == "attn.impl" and not overrides:
                    continue
                names.append(f"blocks.{i}.{p}")
            if i in self.moe_layers:
                names += [f"blocks.{i}.{p}" for p in ROUTER_POINTS]
        return names

    def expand(self, pattern: str) -> list[str]:
        """Expand `blocks.*.x` over the layers that have x; plain names pass through (validated)."""
        if "*" not in pattern:
            self.resolve(pattern)
            return [pattern]
        regex = re.compile("^" + re.escape(pattern).replace(r"\*", r"\d+") + "$")
        names = [n for n in self.all_points(overrides=True) if regex.match(n)]
        if not names:
            raise UnknownPointError(self._unknown_message(pattern))
        return names

    def resolve(self, name: str) -> PointSpec:
        if name in self._cache:
            return self._cache[name]
        spec = self._resolve(name)
        self._cache[name] = spec
        return spec

    def _unknown_message(self, name: str) -> str:
        kinds = ", ".join(GLOBAL_POINTS + tuple(f"blocks.{{L}}.{p}" for p in LAYER_POINTS))
        extra = f", blocks.{{L}}.{{{'|'.join(ROUTER_POINTS)}}} on MoE layers {self.moe_layers}" if self.moe_layers else ""
        return f"unknown point {name!r} for this {self.adapter.family} model. Points: {kinds}{extra}"

    def _resolve(self, name: str) -> PointSpec:
        a = self.adapter
        if name in _GLOBAL_POINT_TABLE:
            return PointSpec(name, getattr(a, _GLOBAL_POINT_TABLE[name]), PointKind.OUTPUT)
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
        if not m or m.group(2) not in _LAYER_POINT_TABLE:
            raise UnknownPointError(self._unknown_message(name))
        layer, rest = int(m.group(1)), m.group(2)
        self.check_layer(layer)
        kind, field_name, item = _LAYER_POINT_TABLE[rest]
        prefix = f"{a.layers}.{layer}"
        if field_name is None:
            return PointSpec(name, prefix, kind, layer)
        sub = getattr(a, field_name)
        if rest in ROUTER_POINTS and layer not in self.moe_layers:
            why = "this family is dense" if not a.is_moe else f"MoE layers are {self.moe_layers}"
            raise UnknownPointError(f"{name!r}: layer {layer} has no router ({why})")
        if sub is None:
            raise UnknownPointError(f"{name!r}: {a.family} has no plain {rest[-1]} projection ({a.notes})")
        return PointSpec(name, f"{prefix}.{sub}", kind, layer, item)

def model_map(model: nn.Module) -> ModelMap:
    """Bind the family adapter to `model` (the model itself is never modified)."""
    return ModelMap(model, adapter_for(model))


def describe(model: nn.Module) -> dict:
    """A JSON-able summary: family, sizes, MoE layout."""
    mm = model_map(model)
    n_params = sum(p.numel() for p in model.parameters())
    out = dict(
        family=mm.adapter.family, model_type=_model_type(model), n_layers=mm.n_layers, n_heads=mm.n_heads,
        n_kv_heads=mm.n_kv_heads, d_model=mm.d_model, n_params=n_params,
        dtype=str(next(model.parameters()).dtype).replace("torch.", ""),
    )
    if mm.adapter.is_moe:
        out.update(num_experts=mm.num_experts, top_k=mm.top_k, moe_layers=mm.moe_layers, routing=mm.adapter.routing)
    return out


def dtype_of(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype
