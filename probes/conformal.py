"""Step 5-6 of LYNX: class-conditional split conformal calibration of the probe's score.

With p = P(y=1 | x) from the probe, the nonconformity score of label 1 is 1 - p and of label 0 is p.
On calibration cue events of class c (n_c of them) q_c is the ceil((n_c + 1)(1 - delta))-th smallest
score of that class; if that rank exceeds n_c, q_c = +inf. The released code clamps the rank to n_c
instead, which silently voids the guarantee; we return +inf (never exit) and say so. Otherwise the
thresholds, prediction sets and exit decisions are those of the released code (utils.conformal_quantile,
predictive_set_binary), bit for bit on the same scores: tests/test_lynx_parity.py.

Prediction set: {c : score_c(x) <= q_c}. Exit iff the set is exactly {1}. Since exiting needs
0 not in the set, P(exit | y=0) <= P(p > q_0 | y=0) <= delta for an exchangeable test cue event
(marginally, per cue event; a trajectory has many cue events, so its premature-exit rate can be larger).
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass, field
from fractions import Fraction

import torch


def check_delta(delta: float) -> float:
    delta = float(delta)
    if not (0.0 < delta < 1.0) or math.isnan(delta):
        raise ValueError(f"delta must be in (0, 1) (the tolerated premature-exit rate), got {delta}")
    return delta


def conformal_rank(n: int, delta: float) -> int:
    """ceil((n + 1)(1 - delta)), computed exactly (decimal delta as a fraction). In floats
    (numpy, as the released code computes it) the product can round up past an integer: n=149,
    delta=0.18 gives 124 there and 123 here (tests/test_lynx_parity.py)."""
    d = Fraction(str(delta))
    return math.ceil((n + 1) * (1 - d))


def min_calibration_size(delta: float) -> int:
    """Smallest n_c with a finite quantile: ceil((n+1)(1-delta)) <= n  <=>  n >= 1/delta - 1."""
    d = Fraction(str(check_delta(delta)))
    return max(1, math.ceil(1 / d - 1))


def conformal_quantile(scores: torch.Tensor, delta: float) -> float:
    """The ceil((n+1)(1-delta))-th smallest of `scores`, or +inf when that rank exceeds n."""
    check_delta(delta)
    n = int(scores.numel())
    k = conformal_rank(n, delta)
    if n == 0 or k > n:
        return math.inf
    return float(torch.sort(scores.flatten().double()).values[k - 1])


@dataclass
class ConformalCalibration:
    """Thresholds q_0, q_1 for one delta, with the calibration counts they came from."""

    delta: float
    q0: float  # threshold on p for label 0 (exit needs p > q0)
    q1: float  # threshold on 1-p for label 1 (exit needs 1-p <= q1)
    n0: int
    n1: int
    notes: list[str] = field(default_factory=list)

    def prediction_set(self, p: torch.Tensor) -> torch.Tensor:
        """Bool[N, 2]: column c says label c is in the set."""
        p = p.double()
        return torch.stack([p <= self.q0, (1 - p) <= self.q1], dim=-1)

    def should_exit(self, p: torch.Tensor) -> torch.Tensor:
        """Bool[N]: the prediction set is exactly {1}."""
        s = self.prediction_set(p)
        return s[..., 1] & ~s[..., 0]

    @property
    def can_exit(self) -> bool:
        return math.isfinite(self.q0)

    def to_json(self) -> dict:
        d = asdict(self)
        d["q0"], d["q1"] = _enc(self.q0), _enc(self.q1)
        return d

    @classmethod
    def from_json(cls, d: dict) -> ConformalCalibration:
        return cls(float(d["delta"]), _dec(d["q0"]), _dec(d["q1"]), int(d["n0"]), int(d["n1"]),
                   list(d.get("notes", [])))

    def save(self, path) -> None:
        with open(path, "w") as f:
            json.dump(self.to_json(), f, indent=2)

    @classmethod
    def load(cls, path) -> ConformalCalibration:
        with open(path) as f:
            return cls.from_json(json.load(f))


def _enc(x: float):
    return "inf" if math.isinf(x) else x


def _dec(x) -> float:
    return math.inf if x == "inf" else float(x)


def calibrate(p: torch.Tensor, y: torch.Tensor, delta: float, *, warn: bool = True) -> ConformalCalibration:
    """Class-conditional split conformal thresholds from calibration probabilities `p` and labels `y`."""
    delta = check_delta(delta)
    p, y = torch.as_tensor(p).flatten().double(), torch.as_tensor(y).flatten()
    if p.numel() != y.numel():
        raise ValueError(f"{p.numel()} scores but {y.numel()} labels")
    if p.numel() == 0:
        raise ValueError("empty calibration set: label some cue events first (steer probe label) and pass them "
                         "to calibrate; the split must be disjoint from the probe's training data")
    if not bool(((y == 0) | (y == 1)).all()):
        raise ValueError("labels must be 0 or 1")
    neg, pos = p[y == 0], 1 - p[y == 1]
    q0, q1 = conformal_quantile(neg, delta), conformal_quantile(pos, delta)
    notes = []
    need = min_calibration_size(delta)
    for name, n, q in (("negative (y=0)", neg.numel(), q0), ("positive (y=1)", pos.numel(), q1)):
        if math.isinf(q):
            notes.append(
                f"{n} {name} calibration events are too few for delta={delta} (need >= {need}): "
                f"its threshold is +inf" + (", so the probe will never trigger an exit" if name.startswith("neg")
                                            else ", so label 1 is always in the prediction set")
            )
    if warn:
        for note in notes:
            warnings.warn(note, stacklevel=2)
    return ConformalCalibration(delta, q0, q1, int(neg.numel()), int(pos.numel()), notes)
