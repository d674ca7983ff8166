"""MoTE expert switching (arXiv 2502.11096): the intervention that runs at inference.

Its evaluation (behaviour rate, neutral-text perplexity) is steer.mote_eval.

`ExpertSwitch` is an `Intervention` that rewrites the router output of the MoE layers it names: the
hook on `blocks.{L}.mlp.router` receives the router's (logits, weights, indices) and returns new
(weights, indices) from `steer.kernels.router.route`, the one implementation of every family's routing
rule with edits (Torch reference on CPU, fused Triton kernel on CUDA). Modes (ALGORITHMS.md 1):

- off_mask  the expert's logit is -inf before the family's softmax/top-k (SteerMoE; a logit-level mask):
            the next-best expert fills the slot, and with norm_topk_prob=False the remaining weights are
            renormalised over the unmasked experts.
- off_zero  selection kept, the expert's weight set to 0 (optionally renormalise the rest) (MoTE).
- on        the expert is forced into the top-k, replacing the lowest selected; weight = its own gate
            value ("gate") or the largest selected value ("max").

Indices are never out of range (switching off by weight 0 keeps the index). Padding and deselected
tokens keep the model's own routing. `touched[point]` counts real tokens whose selected set or
weights changed, so a switch that changed nothing is an error, not a silent no-op.

    switch = ExpertSwitch.from_profile(profile, k=10, mode="off_mask")
    with switch.apply(model):
        model.generate(...)
    switch.touched        # {"blocks.7.mlp.router": 1203, ...}
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import torch

from steer.adapters import ModelMap, model_map
from steer.ftri import DenseModelError, Profile
from steer.hooks import HookContext, HookFn, unwrap_model
from steer.identity import check_model
from steer.interventions import Intervention, OnNoEffect, Problem
from steer.kernels.router import RouterEdit, RoutingRule, route
from steer.options import FORCE_WEIGHTS, SWITCH_MODES

Mode = Literal["off_mask", "off_zero", "on"]
MODES = SWITCH_MODES
_MODE_ALIASES = {"off": "off_mask", "mask": "off_mask", "off/mask": "off_mask", "zero": "off_zero",
                 "off/zero": "off_zero", "force": "on", "force_on": "on"}


def routing_rule_for(model) -> RoutingRule:
    """The family's rule, with the weight dtype the model's own router emits."""
    return model_map(unwrap_model(model)).routing_rule()


def _router_bias(mm: ModelMap, layer: int) -> torch.Tensor | None:
    """DeepSeek-V3's e_score_correction_bias (a buffer of the router module); None elsewhere."""
    if mm.adapter.routing != "sigmoid_group":
        return None
    router = mm.module(f"{mm.adapter.layers}.{layer}.{mm.adapter.router}")
    return getattr(router, "e_score_correction_bias", None)


def spec_problems(experts: Sequence[tuple[int, int]], mode: str, renormalize: bool, force_weight: str,
                  prefix: str = "") -> list[Problem]:
    """What is wrong with a switch's own settings (no model needed); `prefix` starts each field path.

    The one check of these settings: `ExpertSwitch` raises the first, an intervention config's mote
    section (steer.config) reports them all."""
    out = []
    if mode not in MODES:
        out.append(Problem(f"{prefix}mode", f"must be one of {', '.join(MODES)} (got {mode!r})"))
    if force_weight not in FORCE_WEIGHTS:
        out.append(Problem(f"{prefix}force_weight", f"must be one of {', '.join(FORCE_WEIGHTS)} (got {force_weight!r})"))
    if renormalize and mode != "off_zero":
        out.append(Problem(f"{prefix}renormalize", f"only applies to mode off_zero (mode is {mode})"))
    seen: dict[tuple[int, int], int] = {}
    for i, pair in enumerate(experts):
        if pair in seen:
            out.append(Problem(f"{prefix}experts[{i}]", f"duplicate of {prefix}experts[{seen[pair]}] "
                                                         f"(layer {pair[0]}, expert {pair[1]})"))
        seen.setdefault(pair, i)
    return out


def fit_problems(experts: Sequence[tuple[int, int]], mode: str, renormalize: bool, force_weight: str, shape: Any,
                 prefix: str = "") -> list[Problem]:
    """Why switching `experts` does not fit a model; [] if it does.

    `shape` is a ModelMap, or anything with the same fields (`adapter`, `n_layers`, `moe_layers`,
    `num_experts`, `routing_rule()`): steer.config.CheckpointShape describes a checkpoint a server
    loads. Layer and expert ranges first, then each layer's RouterEdit under the family's routing rule
    (e.g. off_mask must leave top_k experts, in the selectable groups for grouped routing)."""
    moe = list(shape.moe_layers)
    if not moe:
        return [Problem(prefix.rstrip("."), f"ExpertSwitch needs an MoE model; this {shape.adapter.family} model is "
                                            f"dense (no routers, so no experts to switch)", DenseModelError)]
    E, span = shape.num_experts, _span(moe)
    out = []
    for i, (layer, expert) in enumerate(experts):
        if not 0 <= layer < shape.n_layers:
            out.append(Problem(f"{prefix}experts[{i}].layer", f"layer {layer} is out of range 0..{shape.n_layers - 1} "
                                                               f"(MoE layers: {span})", IndexError))
        elif layer not in moe:
            out.append(Problem(f"{prefix}experts[{i}].layer", f"{layer} is not an MoE layer (MoE layers: {span})",
                               IndexError))
        if not 0 <= expert < E:
            out.append(Problem(f"{prefix}experts[{i}].expert", f"{expert} out of range 0..{E - 1}", IndexError))
    if out:
        return out
    rule = shape.routing_rule()
    for layer, edit in router_edits(experts, mode, renormalize, force_weight, E).items():
        try:
            edit.validate(rule, E)
        except ValueError as exc:
            out.append(Problem(f"{prefix}experts", f"layer {layer}: {exc}"))
    return out


def router_edits(experts: Sequence[tuple[int, int]], mode: str, renormalize: bool, force_weight: str,
                 num_experts: int) -> dict[int, RouterEdit]:
    """{layer: RouterEdit} for switching `experts`: the one edit steer's HF path and its servers apply."""
    by_layer: dict[int, list[int]] = defaultdict(list)
    for layer, expert in experts:
        by_layer[int(layer)].append(int(expert))
    return {layer: _layer_edit(es, mode, renormalize, force_weight, num_experts) for layer, es in sorted(by_layer.items())}


def _layer_edit(experts: list[int], mode: str, renormalize: bool, force_weight: str, num_experts: int) -> RouterEdit:
    mask = torch.zeros(num_experts, dtype=torch.bool)
    mask[experts] = True
    if mode == "off_mask":
        return RouterEdit(off_mask=mask)
    if mode == "off_zero":
        return RouterEdit(off_zero=mask, renormalize=renormalize)
    return RouterEdit(force_on=mask, force_weight=force_weight)


def _span(layers: list[int]) -> str:
    gaps = "" if layers == list(range(layers[0], layers[-1] + 1)) else ", with gaps"
    return f"{layers[0]}..{layers[-1]}{gaps}"


def _error(problems: list[Problem]) -> Exception:
    """The first problem's exception type, naming every problem."""
    return problems[0].error("; ".join(map(str, problems)))


class ExpertSwitch(Intervention):
    """Switch (layer, expert) pairs off or on in the router (see the module docstring).

    experts: [(layer, expert), ...] with absolute layer indices (MoE layers only).
    per_layer_cap: at most this many switched experts per layer (None: no cap); a list over the cap
      is refused, `from_profile` skips lower-ranked experts of a full layer instead.
    """

    def __init__(self, experts: Iterable[tuple[int, int]], mode: Mode = "off_mask", renormalize: bool = False,
                 force_weight: Literal["gate", "max"] = "gate", per_layer_cap: int | None = None,
                 on_no_effect: OnNoEffect = "raise", model_id: dict | None = None, backend: str | None = None):
        super().__init__(on_no_effect)
        mode = _MODE_ALIASES.get(mode, mode)
        pairs = []
        for item in experts:
            try:
                layer, expert = item
                pairs.append((int(layer), int(expert)))
            except (TypeError, ValueError):
                raise ValueError(f"each expert must be a (layer, expert) pair of ints, got {item!r}") from None
        if not pairs:
            raise ValueError("ExpertSwitch needs at least one (layer, expert) pair")
        problems = spec_problems(pairs, mode, renormalize, force_weight)
        if problems:
            raise _error(problems)
        if per_layer_cap is not None:
            if per_layer_cap < 1:
                raise ValueError(f"per_layer_cap must be >= 1, got {per_layer_cap}")
            over = {L: n for L, n in Counter(L for L, _ in pairs).items() if n > per_layer_cap}
            if over:
                raise ValueError(f"layers {over} have more switched experts than per_layer_cap={per_layer_cap}")
        self.experts = sorted(pairs)
        self.mode, self.renormalize, self.force_weight = mode, bool(renormalize), force_weight
        self.per_layer_cap, self.model_id, self.backend = per_layer_cap, model_id, backend
        self.seen: Counter[str] = Counter()  # real tokens routed at each switched point

    def __repr__(self) -> str:
        return f"ExpertSwitch({len(self.experts)} experts, mode={self.mode!r}, layers={sorted(self.by_layer())})"

    def by_layer(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = defaultdict(list)
        for layer, e in self.experts:
            out[layer].append(e)
        return dict(out)

    def to_dict(self) -> dict:
        return {"experts": [list(p) for p in self.experts], "mode": self.mode, "renormalize": self.renormalize,
                "force_weight": self.force_weight, "per_layer_cap": self.per_layer_cap}

    # ---- constructors ------------------------------------------------------------------------
    @classmethod
    def from_profile(cls, profile: Profile, k: int = 10, mode: Mode = "off_mask", *, per_layer: bool = False,
                     per_layer_cap: int | None = None, model: Any = None, **kw) -> ExpertSwitch:
        """The profile's top-k experts (global ranking, or top-k in each layer), capped per layer.

        With `model`, checks first that the profile was computed on that model.
        """
        if model is not None:
            profile.check_model(model)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        ranked = profile.top(profile.scores.numel() if not per_layer else k, per_layer=per_layer)
        chosen, per = [], Counter()
        for t in ranked:
            if per_layer_cap is not None and per[t.layer] >= per_layer_cap:
                continue
            chosen.append((t.layer, t.expert))
            per[t.layer] += 1
            if not per_layer and len(chosen) == k:
                break
        return cls(chosen, mode, per_layer_cap=per_layer_cap, model_id=profile.model, **kw)

    @classmethod
    def random_like(cls, switch: ExpertSwitch, seed: int, model: Any = None, *, num_experts: int | None = None,
                    exclude_original: bool = True) -> ExpertSwitch:
        """Random-k control: in each layer, as many random experts as `switch` has there (same mode).

        Experts of `switch` are excluded (if `exclude_original`), so the control never shares an
        expert with the treatment. `num_experts` comes from `model` if given.
        """
        if num_experts is None:
            if model is None:
                raise ValueError("random_like needs `model` or `num_experts` to know how many experts a layer has")
            num_experts = model_map(unwrap_model(model)).num_experts
        rng = random.Random(seed)
        pairs = []
        for layer, experts in sorted(switch.by_layer().items()):
            pool = [e for e in range(num_experts) if not (exclude_original and e in experts)]
            if len(pool) < len(experts):
                raise ValueError(f"layer {layer}: cannot draw {len(experts)} random experts from {len(pool)} left")
            pairs += [(layer, e) for e in rng.sample(pool, len(experts))]
        return cls(pairs, switch.mode, switch.renormalize, switch.force_weight, switch.per_layer_cap,
                   switch.on_no_effect, switch.model_id, switch.backend)

    # ---- Intervention interface ---------------------------------------------------------------
    def validate(self, mm: ModelMap) -> None:
        if self.model_id is not None and mm.moe_layers:
            check_model(self.model_id, mm.model, what="this expert switch (from a profile)")
        problems = fit_problems(self.experts, self.mode, self.renormalize, self.force_weight, mm)
        if problems:
            raise _error(problems)

    def router_edits(self, num_experts: int) -> dict[int, RouterEdit]:
        """{layer: RouterEdit}: the edit this switch makes in each layer (what the vLLM plugin installs)."""
        return router_edits(self.experts, self.mode, self.renormalize, self.force_weight, num_experts)

    def _edit(self, layer: int, num_experts: int) -> RouterEdit:
        return _layer_edit(self.by_layer()[layer], self.mode, self.renormalize, self.force_weight, num_experts)

    def reset(self) -> None:
        super().reset()
        self.seen = Counter()

    def hooks(self, mm: ModelMap) -> dict[str, HookFn]:
        rule = routing_rule_for(mm.model)
        out = {}
        for layer in self.by_layer():
            edit = self._edit(layer, mm.num_experts)
            bias = _router_bias(mm, layer)
            out[f"blocks.{layer}.mlp.router"] = self._hook(rule, edit, bias)
        return out

    def _hook(self, rule: RoutingRule, edit: RouterEdit, bias: torch.Tensor | None):
        def fn(value, ctx: HookContext):
            logits, weights, indices = value[0], value[1], value[2]
            mask = ctx.flat_token_mask
            if mask is not None:
                mask = mask.to(logits.device)
                if mask.numel() != logits.shape[0]:  # a router called on something else than B*T tokens
                    mask = None
            res = route(logits, rule, edit, bias=bias, token_mask=mask, backend=self.backend)
            self.count(ctx.point, res.touched)
            self.seen[ctx.point] += int(mask.sum()) if mask is not None else logits.shape[0]
            return type(value)((logits, res.weights.to(weights.dtype), res.indices.to(indices.dtype), *value[3:]))

        return fn

    def touched_fraction(self) -> float:
        """Touched / real tokens routed at the switched points (each layer counted separately)."""
        seen = sum(self.seen.values())
        return self.total_touched / seen if seen else 0.0
