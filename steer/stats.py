"""Small exact statistics for the experiments: proportions and paired binary outcomes.

- `wilson_ci(k, n)`: Wilson score interval of a proportion (good at small n and near 0 or 1).
- `mcnemar_exact(a, b)`: exact McNemar test of two paired binary outcomes (the same items under two
  conditions). Only discordant pairs carry information: under H0 (no change) each of the d = n01 + n10
  discordant pairs goes either way with probability 1/2, so the two-sided p-value is
  min(1, 2 * P[Binomial(d, 1/2) <= min(n01, n10)]). Use it instead of a paired bootstrap, which with
  0-3 discordant pairs gives degenerate intervals such as [+0.00, +0.00].
- `sign_flip_test(d)`: exact paired randomisation test of mean(d) = 0 for per-item differences that
  are not binary (e.g. one condition's label minus the mean label over several control seeds): every
  sign pattern of the non-zero differences is enumerated (Monte Carlo above `exact_max` of them).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


def _z(level: float) -> float:
    if not 0 < level < 1:
        raise ValueError(f"confidence level must be in (0, 1), got {level}")
    return float(torch.distributions.Normal(0, 1).icdf(torch.tensor(0.5 + level / 2, dtype=torch.float64)))


def wilson_ci(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of the proportion k/n; (nan, nan) when n == 0."""
    if n < 0 or not 0 <= k <= max(n, 0):
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return (float("nan"), float("nan"))
    z = _z(level)
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    lo = 0.0 if k == 0 else max(0.0, centre - half)  # exact ends at 0/n and n/n (no rounding residue)
    hi = 1.0 if k == n else min(1.0, centre + half)
    return (lo, hi)


def _binom_cdf_half(x: int, n: int) -> float:
    """P[Binomial(n, 1/2) <= x], exactly (integer arithmetic)."""
    return sum(math.comb(n, i) for i in range(0, x + 1)) / 2**n


@dataclass(frozen=True)
class McNemar:
    """Paired binary comparison of condition b against condition a on the same n items."""

    n: int
    gained: int  # items 0 under a, 1 under b
    lost: int  # items 1 under a, 0 under b
    p_value: float  # exact two-sided

    @property
    def discordant(self) -> int:
        return self.gained + self.lost

    @property
    def change(self) -> float:
        """rate(b) - rate(a) = (gained - lost) / n."""
        return (self.gained - self.lost) / self.n if self.n else float("nan")

    def as_dict(self) -> dict:
        return {
            "n": self.n,
            "gained": self.gained,
            "lost": self.lost,
            "change": self.change,
            "p_value": self.p_value,
        }

    def __str__(self) -> str:
        return f"{self.change:+.2f} (+{self.gained}/-{self.lost}, p={self.p_value:.2g})"


def mcnemar_exact(a: Sequence[bool], b: Sequence[bool]) -> McNemar:
    """Exact McNemar test of paired binary outcomes a[i], b[i] (same items, two conditions)."""
    if len(a) != len(b):
        raise ValueError(f"paired outcomes need the same items: {len(a)} vs {len(b)}")
    for name, xs in (("a", a), ("b", b)):
        if any(x not in (0, 1, True, False) for x in xs):
            raise ValueError(f"{name} must hold binary outcomes (bool or 0/1)")
    gained = sum(1 for x, y in zip(a, b) if not x and y)
    lost = sum(1 for x, y in zip(a, b) if x and not y)
    d = gained + lost
    p = 1.0 if d == 0 else min(1.0, 2 * _binom_cdf_half(min(gained, lost), d))
    return McNemar(len(a), gained, lost, p)


def sign_flip_test(
    d: Sequence[float], *, exact_max: int = 2**16, n_mc: int = 200_000, seed: int = 0
) -> float:
    """Two-sided p-value of mean(d) = 0 by flipping the signs of the paired differences d.

    Exact (all 2^m sign patterns of the m non-zero differences) when 2^m <= exact_max, otherwise
    Monte Carlo with n_mc patterns (the observed pattern counted, so p >= 1 / (n_mc + 1)).
    """
    nz = [float(x) for x in d if x != 0]
    if not nz:
        return 1.0
    obs = abs(sum(nz))
    tol = 1e-9 * max(1.0, obs)
    m = len(nz)
    if 2**m <= exact_max:
        hits = sum(
            1
            for signs in itertools.product((1, -1), repeat=m)
            if abs(sum(s * x for s, x in zip(signs, nz))) >= obs - tol
        )
        return hits / 2**m
    x = torch.tensor(nz, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (n_mc, m), generator=gen, dtype=torch.int8).to(torch.float64) * 2 - 1
    hits = int(((signs * x).sum(1).abs() >= obs - tol).sum())
    return (hits + 1) / (n_mc + 1)
