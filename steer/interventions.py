"""Interventions: hook functions that change the forward pass and count what they touched.

The worst bug in steering is a run that silently did nothing. So every intervention counts the
tokens it changed, per point, and `apply()` checks the count on exit: zero touched tokens raises
`NoEffectError` (or warns, per `on_no_effect`). A test or a log line can always prove it fired.

    with AddVector("blocks.6.resid_post", v, scale=4.0).apply(model) as iv:
        model.generate(...)
    iv.touched                # {"blocks.6.resid_post": 812}
"""

from __future__ import annotations

import contextlib
import warnings
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch

from steer.adapters import ModelMap, model_map
from steer.hooks import HookContext, HookFn, attach, unwrap_model

OnNoEffect = Literal["raise", "warn", "ignore"]


class NoEffectError(RuntimeError):
    """An intervention was applied but changed no token."""


@dataclass(frozen=True)
class Problem:
    """One reason an intervention's settings do not fit (a model): `field` is its path (e.g.
    "experts[2].expert"), `error` the exception type `validate` raises for it. A method lists its
    problems once; `validate` raises the first, an intervention config reports them all."""

    field: str
    message: str
    error: type[Exception] = ValueError

    def __str__(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message

    def exception(self, where: str = "") -> Exception:
        return self.error(f"{where}{self}")


class Intervention(ABC):
    """Base class. Subclasses implement `hooks(mm) -> {point: fn}` and call `self.count(point, n)`."""

    on_no_effect: OnNoEffect = "raise"

    def __init__(self, on_no_effect: OnNoEffect = "raise"):
        if on_no_effect not in ("raise", "warn", "ignore"):
            raise ValueError(f"on_no_effect must be 'raise', 'warn' or 'ignore' (got {on_no_effect!r})")
        self.on_no_effect = on_no_effect
        self.touched: Counter[str] = Counter()

    # -- to implement ------------------------------------------------------------------------
    @abstractmethod
    def hooks(self, mm: ModelMap) -> dict[str, HookFn]:
        """The hook functions to attach, by canonical point (validated against `mm` first)."""

    def validate(self, mm: ModelMap) -> None:  # noqa: B027 - optional check; the default accepts any model
        """Raise a clear error if this intervention does not fit the model (layer/expert ranges...)."""

    # -- shared machinery --------------------------------------------------------------------
    def count(self, point: str, n: int | torch.Tensor) -> None:
        self.touched[point] += int(n)

    @property
    def total_touched(self) -> int:
        return sum(self.touched.values())

    def reset(self) -> None:
        self.touched = Counter()

    def check(self) -> None:
        if self.total_touched > 0 or self.on_no_effect == "ignore":
            return
        msg = (
            f"{type(self).__name__} touched no token: it was applied but changed nothing. Check that its "
            f"layers/experts/heads are ones the inputs actually reach (or pass on_no_effect='warn')."
        )
        if self.on_no_effect == "raise":
            raise NoEffectError(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)

    @contextlib.contextmanager
    def apply(self, model: Any) -> Iterator[Intervention]:
        """Apply for the body of the `with` block; counts start from zero on entry."""
        with apply(model, self):
            yield self


@contextlib.contextmanager
def apply(model: Any, *interventions: Intervention) -> Iterator[tuple[Intervention, ...]]:
    """Apply several interventions at once; each is validated first and checked on a clean exit."""
    hf = unwrap_model(model)
    mm = model_map(hf)
    hooks: dict[str, list] = {}
    for iv in interventions:
        iv.validate(mm)
        iv.reset()
        for point, fn in iv.hooks(mm).items():
            hooks.setdefault(point, []).append(fn)
    with attach(hf, hooks):
        yield interventions
    for iv in interventions:
        iv.check()


class AddVector(Intervention):
    """Activation addition: x <- x + scale * vector at one point (the classic steering vector).

    positions: "all" real tokens, or "last" (only the newest token of each call, i.e. generation).
    """

    def __init__(self, point: str, vector: torch.Tensor, scale: float = 1.0,
                 positions: Literal["all", "last"] = "all", on_no_effect: OnNoEffect = "raise"):
        super().__init__(on_no_effect)
        if positions not in ("all", "last"):
            raise ValueError(f"positions must be 'all' or 'last' (got {positions!r})")
        self.point, self.vector, self.scale, self.positions = point, vector, float(scale), positions

    def validate(self, mm: ModelMap) -> None:
        spec = mm.resolve(self.point)
        if not spec.kind.is_tensor:
            raise ValueError(f"AddVector needs a residual-like point, not {self.point!r}")
        width = mm.config.vocab_size if self.point == "lm_head.out" else mm.d_model
        if self.vector.dim() != 1 or self.vector.numel() != width:
            raise ValueError(f"vector has shape {tuple(self.vector.shape)}; {self.point} needs [{width}]")

    def hooks(self, mm: ModelMap) -> dict[str, HookFn]:
        def fn(x: torch.Tensor, ctx: HookContext):
            b, t = x.shape[:2]
            mask = ctx.token_mask
            sel = torch.ones(b, t, dtype=torch.bool, device=x.device) if mask is None else mask.to(x.device)
            if self.positions == "last":
                last = torch.zeros_like(sel)
                last[:, -1] = True
                sel = sel & last
            delta = (self.scale * self.vector.to(x.device, x.dtype)) * sel.unsqueeze(-1)
            self.count(ctx.point, sel.sum())
            return x + delta

        return {self.point: fn}
