"""Streaming reducers: fold activations into fixed-size statistics as the model runs.

A reducer is a hook function (`reducer(value, ctx)`) with state. Memory depends on the model's
width, never on the number of prompts, so profiling 100 or 100,000 prompts costs the same RAM.
Padding and deselected tokens are skipped via `ctx.token_mask`. One reducer may watch many points
(`"blocks.*.resid_post"`): state is kept per point or per layer.

    sums = Mean()
    with capture(model, reducers={"blocks.*.resid_post": sums}):
        for batch in batches: model(**batch)
    sums.result()["blocks.3.resid_post"]      # Float[d_model]
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import defaultdict

import torch

from steer.hooks import HookContext


def real_tokens(value: torch.Tensor, ctx: HookContext) -> torch.Tensor:
    """Rows of `value` for real tokens: [B, T, ...] or flattened [B*T, ...] -> [N, ...]."""
    mask = ctx.token_mask
    if value.dim() >= 2 and ctx.batch_shape and value.shape[:2] == torch.Size(ctx.batch_shape):
        return value[mask.to(value.device)] if mask is not None else value.reshape(-1, *value.shape[2:])
    if mask is not None and value.shape[0] == mask.numel():
        return value[mask.reshape(-1).to(value.device)]
    return value


class Reducer(ABC):
    """Base class: subclasses implement `update(tokens [N, ...], ctx)` and `result()`."""

    def __call__(self, value, ctx: HookContext):
        if isinstance(value, tuple):  # a router tuple: reduce the indices
            value = value[2]
        self.update(real_tokens(value.detach(), ctx), ctx)
        return None

    @abstractmethod
    def update(self, tokens: torch.Tensor, ctx: HookContext) -> None:
        """Fold the real (non-padding, selected) tokens of one hook call into the running state."""

    @abstractmethod
    def result(self):
        """The reduction so far."""


class Count(Reducer):
    """Real tokens seen per point."""

    def __init__(self):
        self.counts: dict[str, int] = defaultdict(int)

    def update(self, tokens, ctx):
        self.counts[ctx.point] += tokens.shape[0]

    def result(self) -> dict[str, int]:
        return dict(self.counts)


class Sum(Reducer):
    """Sum over real tokens per point (fp64 accumulation), plus the token count."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = defaultdict(int)

    def update(self, tokens, ctx):
        s = tokens.double().sum(0).cpu()
        self.sums[ctx.point] = self.sums[ctx.point] + s if ctx.point in self.sums else s
        self.counts[ctx.point] += tokens.shape[0]

    def result(self) -> dict[str, torch.Tensor]:
        return {k: v.float() for k, v in self.sums.items()}


class Mean(Sum):
    def result(self) -> dict[str, torch.Tensor]:
        return {k: (v / max(self.counts[k], 1)).float() for k, v in self.sums.items()}


class Histogram(Reducer):
    """Histogram of all values of real tokens per point over a fixed range (values outside are clipped)."""

    def __init__(self, bins: int = 100, lo: float = -10.0, hi: float = 10.0):
        if not hi > lo or bins < 1:
            raise ValueError(f"Histogram needs bins >= 1 and hi > lo (got bins={bins}, lo={lo}, hi={hi})")
        self.bins, self.lo, self.hi = bins, lo, hi
        self.hist: dict[str, torch.Tensor] = {}

    def update(self, tokens, ctx):
        h = torch.histc(tokens.float().clamp(self.lo, self.hi).cpu(), bins=self.bins, min=self.lo, max=self.hi)
        self.hist[ctx.point] = self.hist[ctx.point] + h if ctx.point in self.hist else h

    def edges(self) -> torch.Tensor:
        return torch.linspace(self.lo, self.hi, self.bins + 1)

    def result(self) -> dict[str, torch.Tensor]:
        return dict(self.hist)


class TopK(Reducer):
    """The k tokens with the largest score per point, with where they were (call, row, position).

    score: "norm" (L2 over the last dim) or an int feature index.
    """

    def __init__(self, k: int = 10, score: str | int = "norm"):
        if k < 1:
            raise ValueError(f"TopK needs k >= 1 (got {k})")
        self.k, self.score = k, score
        self.best: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, value, ctx):
        """Unlike other reducers, TopK reads the unfiltered value: it records each token's row and
        position, then drops padding itself (so it is its own `__call__`)."""
        if isinstance(value, tuple):
            value = value[0]
        value = value.detach()
        if ctx.batch_shape and value.shape[:2] == torch.Size(ctx.batch_shape):
            b, t = ctx.batch_shape
            rows = torch.arange(b).repeat_interleave(t)
            pos = torch.arange(t).repeat(b) + ctx.session.past_length
            flat = value.reshape(b * t, *value.shape[2:])
        else:
            rows, pos, flat = torch.zeros(value.shape[0], dtype=torch.long), torch.arange(value.shape[0]), value
        mask = ctx.flat_token_mask
        if mask is not None and mask.numel() == flat.shape[0]:
            keep = mask.cpu()
            rows, pos, flat = rows[keep], pos[keep], flat[keep.to(flat.device)]
        s = flat.float().norm(dim=-1) if self.score == "norm" else flat[..., self.score].float()
        where = torch.stack([torch.full_like(rows, ctx.call), rows, pos], dim=1)
        s = s.cpu()
        if ctx.point in self.best:
            prev_s, prev_w = self.best[ctx.point]
            s, where = torch.cat([prev_s, s]), torch.cat([prev_w, where])
        top = torch.topk(s, min(self.k, s.numel()))
        self.best[ctx.point] = (top.values, where[top.indices])

    __call__ = update

    def result(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{point: (scores [k], where [k, 3] = (call, row, position))}."""
        return dict(self.best)


class ExpertCounts(Reducer):
    """Tokens routed to each expert, per MoE layer: {layer: Long[E]} (reads router indices)."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self.counts: dict[int, torch.Tensor] = {}
        self.tokens: dict[int, int] = defaultdict(int)

    def update(self, indices, ctx):
        c = torch.bincount(indices.reshape(-1).cpu(), minlength=self.num_experts)[: self.num_experts]
        self.counts[ctx.layer] = self.counts[ctx.layer] + c if ctx.layer in self.counts else c
        self.tokens[ctx.layer] += indices.shape[0]

    def result(self) -> dict[int, torch.Tensor]:
        return dict(self.counts)

    def matrix(self, layers: list[int]) -> torch.Tensor:
        """Long[len(layers), E] with rows in the given layer order (zeros for unseen layers)."""
        return torch.stack([self.counts.get(i, torch.zeros(self.num_experts, dtype=torch.long)) for i in layers])
