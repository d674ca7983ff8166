"""MoE router with expert edits (MoTE / SteerMoE switching), fused, plus its exact PyTorch reference.

`route(logits, rule, edit)` turns the router logits a model computed into (weights, indices) the way
the model's family does, after applying the per-layer `RouterEdit`, and counts the tokens the edit
touched. With `edit=None` the torch path reproduces the family's own router bit for bit (same ops,
same dtypes); the Triton path (CUDA tensors) computes in fp32 registers and agrees to fp32 rounding.

Rules (ALGORITHMS.md section 1):
- "softmax_topk" (Mixtral, Qwen2/3-MoE, OLMoE): p = softmax(logits in fp32); top-k of p; divide by the
  selected sum if `norm_topk_prob` (Mixtral always). Weights: fp32 for Mixtral, the logits' dtype for
  Qwen/OLMoE (`weights_dtype`).
- "topk_softmax" (GPT-OSS, GraniteMoE): top-k of the logits, softmax over the selected logits.
- "sigmoid_group" (DeepSeek-V3): s = sigmoid(logits); choice = s + e_score_correction_bias (`bias`);
  groups scored by the sum of their top-2 choices, the best `topk_group` groups kept, top-k of the
  choices inside them; weights s (divided by their sum + 1e-20 if `norm_topk_prob`) x
  `routed_scaling_factor`.

Edits (semantics shared by both paths):
- off_mask: a logit-level mask, the expert is absent from the router: its logit is -inf before the
  family's scoring, so it is never selected and the next best fills the slot. softmax_topk: the softmax
  runs over the unmasked experts only, so with `norm_topk_prob=False` (Qwen2/3-MoE, OLMoE, the
  steer-built MoE) every remaining weight is p_e / (1 - p_masked) and every token's weights change,
  not only those that chose a masked expert (with normalisation the top-k renormalisation cancels the
  denominator: same weights either way). topk_softmax: the softmax is over the selected logits, so
  the mask only changes the selection. sigmoid_group: a -inf logit gives sigmoid 0 but DeepSeek-V3
  selects on sigmoid + bias, which could still pick the expert; it is instead removed from selection
  and from its group's score, and its gate value (0) is never used. This matches SteerMoE's routing
  edit (which sets the logit to min - 0.01 rather than -inf; see tests/test_mote_steermoe_parity.py
  for where the two differ). The earlier "selection-only" semantics (masked expert kept in the
  softmax denominator) had no use beyond locality and is gone.
- off_zero: selection kept, weight set to 0; with `renormalize` the rest are scaled so the selected
  weights keep their original sum (1 for normalised rules, x routed_scaling_factor for DeepSeek).
- force_on: each forced expert joins the top-k, replacing the lowest-ranked selected non-forced
  expert (also across DeepSeek group limits). Its weight is its own gate value ("gate") or, before the
  family's normalisation, the largest value among the selected non-forced experts ("max": the max
  probability, logit, or sigmoid score).
Indices are never out of range: off/zero sets weight 0 and keeps the index.

Order within the top-k: descending selection score (probability, logit, or score + bias), ties to
the lower expert id. The torch path returns the family's own order for unedited tokens (DeepSeek-V3
uses topk(sorted=False)); compare routings as sets of (index, weight).

`touched` counts tokens within `token_mask` whose selected set or (emitted) weights differ from the
unedited routing; tokens outside `token_mask` get the unedited routing. The count is a 0-dim int64
device tensor: no host sync, so `route` is CUDA-graph safe (edit tables are cached per device).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from steer.kernels._triton import backend_for, load

Kind = Literal["softmax_topk", "topk_softmax", "sigmoid_group"]
KINDS = ("softmax_topk", "topk_softmax", "sigmoid_group")


@dataclass(frozen=True)
class RoutingRule:
    """How a family turns router logits into (weights, indices)."""

    kind: Kind
    top_k: int
    norm_topk_prob: bool = False  # softmax_topk / sigmoid_group: divide by the selected sum
    n_group: int = 1  # sigmoid_group: expert groups (DeepSeek-V3: 8)
    topk_group: int = 1  # sigmoid_group: groups kept per token (DeepSeek-V3: 4)
    routed_scaling_factor: float = 1.0  # sigmoid_group: final weight multiplier (DeepSeek-V3: 2.5)
    weights_dtype: torch.dtype | None = None  # dtype of the emitted weights; None = the logits' dtype

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"routing kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.n_group < 1 or not 1 <= self.topk_group <= self.n_group:
            raise ValueError(f"need 1 <= topk_group ({self.topk_group}) <= n_group ({self.n_group})")


@dataclass(eq=False)
class RouterEdit:
    """One layer's expert switches; masks are Bool[E] (any device). See the module docstring.

    Treat as immutable: counts are read once at construction (the only host sync) and device copies
    of the masks are cached per device, so build a new RouterEdit to change the switches.
    """

    off_mask: torch.Tensor | None = None
    off_zero: torch.Tensor | None = None
    renormalize: bool = False
    force_on: torch.Tensor | None = None
    force_weight: Literal["gate", "max"] = "gate"
    _counts: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    _tables: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        # One host read at construction (never per token): counts used to validate against a rule.
        if self.force_weight not in ("gate", "max"):
            raise ValueError(f"force_weight must be 'gate' or 'max', got {self.force_weight!r}")
        sizes = {name: m.numel() for name, m in self._masks().items() if m is not None}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"edit masks have different lengths {sizes}; each must be Bool[num_experts]")
        for name, m in self._masks().items():
            if m is not None and (m.dim() != 1 or m.dtype != torch.bool):
                raise ValueError(f"{name} must be a 1-D bool tensor over experts, got {m.dtype} {tuple(m.shape)}")
        cpu = {name: (m.detach().cpu() if m is not None else None) for name, m in self._masks().items()}
        self._counts["E"] = next(iter(sizes.values())) if sizes else None
        for name, m in cpu.items():
            self._counts[name] = m if m is not None else None
        if cpu["force_on"] is not None:
            for other in ("off_mask", "off_zero"):
                if cpu[other] is not None and bool((cpu["force_on"] & cpu[other]).any()):
                    both = torch.nonzero(cpu["force_on"] & cpu[other]).flatten().tolist()
                    raise ValueError(f"experts {both} are both forced on and in {other}; pick one switch per expert")

    def _masks(self) -> dict:
        return {"off_mask": self.off_mask, "off_zero": self.off_zero, "force_on": self.force_on}

    @property
    def num_experts(self) -> int | None:
        return self._counts["E"]

    @property
    def n_forced(self) -> int:
        m = self._counts["force_on"]
        return int(m.sum()) if m is not None else 0

    def is_noop(self) -> bool:
        c = self._counts
        return not any(c[n] is not None and bool(c[n].any()) for n in ("off_mask", "off_zero", "force_on"))

    def validate(self, rule: RoutingRule, num_experts: int) -> None:
        """Raise a clear error if this edit cannot be applied under `rule` to `num_experts` experts."""
        E = num_experts
        if self.num_experts is not None and self.num_experts != E:
            raise ValueError(f"edit masks have {self.num_experts} experts but the logits have {E}")
        nf = self.n_forced
        if nf > rule.top_k:
            raise ValueError(f"{nf} experts forced on but top_k is {rule.top_k}; force at most top_k experts")
        masked = self._counts["off_mask"] if self._counts["off_mask"] is not None else torch.zeros(E, dtype=torch.bool)
        forced = self._counts["force_on"] if self._counts["force_on"] is not None else torch.zeros(E, dtype=torch.bool)
        if rule.kind == "sigmoid_group":
            G = rule.n_group
            avail = (~masked).view(G, E // G)
            nonforced = (~masked & ~forced).view(G, E // G).sum(1)
            nonempty = sorted(int(n) for n, a in zip(nonforced, avail.any(1)) if bool(a))
            worst = sum(nonempty[: rule.topk_group])
            if worst < rule.top_k - nf:
                raise ValueError(
                    f"off_mask leaves too few experts: the {rule.topk_group} selected groups may hold only {worst} "
                    f"unmasked experts, fewer than the {rule.top_k - nf} non-forced slots of top_k={rule.top_k}; "
                    "mask fewer experts")
        elif E - int(masked.sum()) < rule.top_k:
            raise ValueError(
                f"off_mask switches off {int(masked.sum())} of {E} experts, leaving fewer than top_k={rule.top_k}; "
                "mask fewer experts or use off_zero")

    def tables(self, device: torch.device) -> dict[str, torch.Tensor | None]:
        """The masks on `device` (cached, so repeated calls copy nothing: CUDA-graph friendly)."""
        key = str(device)
        if key not in self._tables:
            self._tables[key] = {n: (m.to(device) if m is not None else None) for n, m in self._masks().items()}
        return self._tables[key]


@dataclass
class RouteResult:
    weights: torch.Tensor  # [T, k], the family's weight dtype
    indices: torch.Tensor  # [T, k] int64, always in [0, E)
    touched: torch.Tensor  # 0-dim int64: tokens in token_mask whose routing the edit changed


def _check(logits: torch.Tensor, rule: RoutingRule, edit: RouterEdit | None, bias, token_mask) -> None:
    if logits.dim() != 2:
        raise ValueError(f"router logits must be [tokens, experts], got shape {tuple(logits.shape)}; flatten tokens first")
    if not logits.is_floating_point():
        raise ValueError(f"router logits must be floating point, got {logits.dtype}")
    T, E = logits.shape
    if rule.top_k > E:
        raise ValueError(f"top_k={rule.top_k} exceeds the {E} experts in the logits")
    if rule.kind == "sigmoid_group" and E % rule.n_group:
        raise ValueError(f"{E} experts do not split into n_group={rule.n_group} equal groups")
    if bias is not None:
        if rule.kind != "sigmoid_group":
            raise ValueError("bias (e_score_correction_bias) only applies to the sigmoid_group rule")
        if bias.shape != (E,):
            raise ValueError(f"bias must be [{E}], got {tuple(bias.shape)}")
    for name, t in (("bias", bias), ("token_mask", token_mask)):
        if t is not None and t.device != logits.device:
            raise ValueError(f"{name} is on {t.device} but the logits on {logits.device}")
    if token_mask is not None and (token_mask.shape != (T,) or token_mask.dtype != torch.bool):
        raise ValueError(f"token_mask must be Bool[{T}], got {token_mask.dtype} {tuple(token_mask.shape)}")
    if edit is not None:
        edit.validate(rule, E)


def route(
    logits: torch.Tensor,
    rule: RoutingRule,
    edit: RouterEdit | None = None,
    *,
    bias: torch.Tensor | None = None,
    token_mask: torch.Tensor | None = None,
    backend: str | None = None,
) -> RouteResult:
    """(weights, indices, touched) of the family's routing of `logits` [T, E] after `edit`.

    `bias` = DeepSeek-V3's e_score_correction_bias. `backend`: None/"auto" (Triton on CUDA tensors),
    "torch" or "triton" (see `steer.kernels._triton.backend_for`).
    """
    _check(logits, rule, edit, bias, token_mask)
    if backend_for(logits, backend) == "triton":
        return load("_router_triton").route_triton(logits, rule, edit, bias=bias, token_mask=token_mask)
    return route_reference(logits, rule, edit, bias=bias, token_mask=token_mask)


# ----------------------------------------------------------------------------------------------
# PyTorch reference
# ----------------------------------------------------------------------------------------------


def _out_dtype(logits: torch.Tensor, rule: RoutingRule) -> torch.dtype:
    return rule.weights_dtype or logits.dtype


def _route_family(logits: torch.Tensor, rule: RoutingRule, bias: torch.Tensor | None):
    """The family's own router, op for op as in transformers 5 (exact reproduction)."""
    k = rule.top_k
    if rule.kind == "softmax_topk":
        probs = torch.nn.functional.softmax(logits, dtype=torch.float, dim=-1)
        top, idx = torch.topk(probs, k, dim=-1)
        if rule.norm_topk_prob:
            top = top / top.sum(dim=-1, keepdim=True)
        return top.to(_out_dtype(logits, rule)), idx
    if rule.kind == "topk_softmax":
        top, idx = torch.topk(logits, k, dim=-1)
        w = torch.nn.functional.softmax(top, dim=1, dtype=top.dtype)
        return w.to(_out_dtype(logits, rule)), idx
    T, E = logits.shape
    G = rule.n_group
    scores = logits.float().sigmoid()
    choice = scores + (bias.float() if bias is not None else 0.0)
    gscores = choice.view(T, G, E // G).topk(min(2, E // G), dim=-1)[0].sum(dim=-1)
    gidx = torch.topk(gscores, k=rule.topk_group, dim=-1, sorted=False)[1]
    gmask = torch.zeros_like(gscores).scatter_(1, gidx, 1)
    smask = gmask.unsqueeze(-1).expand(-1, G, E // G).reshape(-1, E)
    choice = choice.masked_fill(~smask.bool(), float("-inf"))
    idx = torch.topk(choice, k=k, dim=-1, sorted=False)[1]
    w = scores.gather(1, idx)
    if rule.norm_topk_prob:
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
    w = w * rule.routed_scaling_factor
    return w.to(_out_dtype(logits, rule)), idx


def _stable_top(key: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest entries, descending, ties to the lower index (as the Triton kernel)."""
    return torch.sort(key, dim=-1, descending=True, stable=True)[1][:, :k]


def _route_generic(logits, rule: RoutingRule, bias, masked, zeroed, forced, renormalize: bool, force_max: bool):
    """Edited routing (Triton semantics, stable order). Masks are Bool[E] or None."""
    neg = float("-inf")
    score, choice = _generic_scores(logits.float(), rule, bias, masked)
    sel = _generic_selection(choice, rule, masked, forced)
    finite_min = torch.finfo(torch.float32).min
    idx = _stable_top(torch.where(sel, choice.clamp_min(finite_min), neg), rule.top_k)
    val = score.gather(1, idx)
    is_forced = forced[idx] if forced is not None else torch.zeros_like(idx, dtype=torch.bool)
    if force_max and forced is not None:
        others = val.masked_fill(is_forced, neg).amax(dim=-1, keepdim=True)
        val = torch.where(is_forced & (others > neg), others, val)
    w = _generic_weights(val, rule)
    if zeroed is not None:
        w = _zero_weights(w, zeroed[idx], renormalize)
    return w.to(_out_dtype(logits, rule)), idx


def _generic_scores(x: torch.Tensor, rule: RoutingRule, bias, masked) -> tuple[torch.Tensor, torch.Tensor]:
    """(score, choice) per token and expert: the value the weights come from, and the one selection
    ranks by (probability, logit, or sigmoid + bias); NaN choices rank last."""
    neg = float("-inf")
    if rule.kind == "softmax_topk":
        # off_mask is a logit-level mask: a switched-off expert's logit is -inf before the softmax, so
        # it leaves the denominator too. With norm_topk_prob the top-k renormalisation cancels the
        # denominator exactly, so the full softmax is used there (no rounding-only "touched" tokens).
        drop = masked is not None and not rule.norm_topk_prob
        score = torch.softmax(x.masked_fill(masked, neg) if drop else x, dim=-1)
        choice = score.clone()
    elif rule.kind == "topk_softmax":
        score = x
        choice = x.clone()
    else:
        score = x.sigmoid()
        choice = score + (bias.float() if bias is not None else 0.0)
    return score, torch.nan_to_num(choice, nan=neg)


def _generic_selection(choice: torch.Tensor, rule: RoutingRule, masked, forced) -> torch.Tensor:
    """Bool[T, E] selected experts: the forced ones, plus the best k - #forced eligible ones (not
    masked, not forced, and for sigmoid_group inside the token's best groups)."""
    T, E = choice.shape
    k = rule.top_k
    neg = float("-inf")
    eligible = torch.ones(T, E, dtype=torch.bool, device=choice.device)
    if masked is not None:
        eligible &= ~masked
    if rule.kind == "sigmoid_group":
        G, S = rule.n_group, E // rule.n_group
        cm = choice.masked_fill(~eligible, neg).view(T, G, S)
        top2 = torch.sort(cm, dim=-1, descending=True)[0][..., : min(2, S)]
        gscore = top2[..., 0] if S == 1 else torch.where(top2[..., 1] == neg, top2[..., 0], top2[..., 0] + top2[..., 1])
        gsel = torch.zeros(T, G, dtype=torch.bool, device=choice.device)
        gsel.scatter_(1, _stable_top(gscore, rule.topk_group), True)
        eligible &= gsel.repeat_interleave(S, dim=1)
    nf = 0
    if forced is not None:
        nf = int(forced.sum())  # reference only: host read is fine here
        eligible &= ~forced
    sel = torch.zeros(T, E, dtype=torch.bool, device=choice.device)
    if k - nf > 0:
        pick = _stable_top(choice.masked_fill(~eligible, neg), k - nf)
        # an eligible expert ranked below -inf ties cannot exist: validation guarantees k - nf eligible
        sel.scatter_(1, pick, True)
    if forced is not None:
        sel |= forced
    return sel


def _generic_weights(val: torch.Tensor, rule: RoutingRule) -> torch.Tensor:
    """The family's weights from the selected experts' scores."""
    if rule.kind == "softmax_topk":
        return val / val.sum(dim=-1, keepdim=True) if rule.norm_topk_prob else val
    if rule.kind == "topk_softmax":
        return torch.softmax(val, dim=-1)
    w = val / (val.sum(dim=-1, keepdim=True) + 1e-20) if rule.norm_topk_prob else val
    return w * rule.routed_scaling_factor


def _zero_weights(w: torch.Tensor, z: torch.Tensor, renormalize: bool) -> torch.Tensor:
    """off_zero: weight 0 where z; with `renormalize` the rest keep the selected weights' sum."""
    w0 = w.masked_fill(z, 0.0)
    if renormalize:
        before, after = w.sum(dim=-1, keepdim=True), w0.sum(dim=-1, keepdim=True)
        w0 = torch.where(after > 0, w0 * (before / after), torch.zeros_like(w0))
    return torch.where(z.any(dim=-1, keepdim=True), w0, w)


def _dense(w: torch.Tensor, idx: torch.Tensor, E: int) -> tuple[torch.Tensor, torch.Tensor]:
    T = idx.shape[0]
    sel = torch.zeros(T, E, dtype=torch.bool, device=idx.device).scatter_(1, idx, True)
    dense = torch.zeros(T, E, dtype=torch.float32, device=idx.device).scatter_(1, idx, w.float())
    return sel, dense


def route_reference(logits, rule: RoutingRule, edit: RouterEdit | None = None, *, bias=None, token_mask=None) -> RouteResult:
    """PyTorch reference of `route` (also the CPU path)."""
    _check(logits, rule, edit, bias, token_mask)
    w_fam, i_fam = _route_family(logits, rule, bias)
    touched = torch.zeros((), dtype=torch.int64, device=logits.device)
    if edit is None or edit.is_noop():
        return RouteResult(w_fam, i_fam, touched)
    t = edit.tables(logits.device)
    E = logits.shape[1]
    w0, i0 = _route_generic(logits, rule, bias, None, None, None, False, False)
    w1, i1 = _route_generic(
        logits, rule, bias, t["off_mask"], t["off_zero"], t["force_on"], edit.renormalize, edit.force_weight == "max")
    s0, d0 = _dense(w0, i0, E)
    s1, d1 = _dense(w1, i1, E)
    changed = (s0 != s1).any(dim=-1) | (d0 != d1).any(dim=-1)
    if token_mask is not None:
        changed &= token_mask
    weights = torch.where(changed[:, None], w1, w_fam)
    indices = torch.where(changed[:, None], i1, i_fam)
    return RouteResult(weights, indices, changed.sum())
