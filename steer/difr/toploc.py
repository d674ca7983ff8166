"""TOPLOC baseline (Ong et al. 2025, PrimeIntellect-ai/toploc), reimplemented for the same harness.

Per chunk of `chunk_size` generated tokens the provider takes the `topk` largest-|value| entries of
the flattened bf16 final hidden states and commits to them as a polynomial over GF(65497) through
the points (flat index mod m, bf16 bit pattern), m the largest modulus <= 65497 that keeps the
indices distinct: 2 bytes for m + 2 bytes per coefficient = 258 bytes for topk = 128. The verifier
recomputes the chunk, takes its own top-k indices, evaluates the polynomial there to recover the
provider's values and compares exponents and mantissas (bf16: 8-bit exponent, 7-bit mantissa).
Published acceptance: exponent matches >= 90/128, mantissa error mean <= 10 and median <= 8.

Proofs travel in toploc's own wire format (`to_bytes` / `to_base64`, read back by `from_bytes` /
`from_base64`): per chunk, the modulus then each coefficient as a big-endian uint16 (2 + 2 * topk
bytes), base64 with padding; toploc.ProofPoly.from_bytes / from_base64 read them unchanged
(tests/test_difr_toploc.py; tests/fixtures/toploc/ records toploc 0.1.6's own bytes).

Conventions that differ from the released code (toploc 0.1.6), on purpose:
- Prefill skipped: toploc's build_proofs commits activations[0] (the prompt) as a proof of its own
  unless skip_prefill=True; steer commits only generated tokens (as all three methods here do), so
  steer's proofs equal toploc's build_proofs(per-token states, chunk_size, topk, skip_prefill=True).
- bf16 cast: toploc takes the served tensor as it is (bf16 under vLLM; fp32 is refused) and ranks
  the top-k by |value| in that dtype; steer casts fp32 hidden states to bf16 first, then ranks, so
  ties and order follow the bf16 values exactly as toploc sees a bf16 server's states.
- Short chunks: toploc needs >= topk values per chunk (a shorter chunk raises, and build_proofs then
  returns null proofs for every chunk); steer interpolates the k < topk points there and pads the
  coefficients with zeros to topk (the same polynomial, the same 258 bytes). With D >= topk, as in
  every real model, a chunk always holds enough values and the two agree.
- Median: toploc's Python path (list activations) takes statistics.median (mean of the two middle
  errors for an even count), its C++ path (tensor activations with skip_prefill) the upper middle
  element; steer uses the former by default, `TopLocParams(median="upper")` gives the latter.
- A chunk where every exponent mismatches scores like the worst mantissa error (MANTISSA_LEVELS)
  instead of toploc's 2**64; the accept/reject decision is the same (rejected).
- The interpolation is numpy-vectorised Python (no C extension).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

PRIME = 65497  # the field the published code interpolates in (largest modulus tried for indices)
MANTISSA_LEVELS = 128  # bf16 mantissa values; an exponent mismatch scores as this error in `score`


@dataclass
class TopLocParams:
    topk: int = 128
    chunk_size: int = 32  # "decode batching size": tokens per proof
    min_exp_matches: int = 90
    max_mant_err_mean: float = 10.0
    max_mant_err_median: float = 8.0
    median: str = "average"  # "average" (toploc's Python path) or "upper" (its C++ path): see module doc

    def __post_init__(self):
        if self.median not in ("average", "upper"):
            raise ValueError(f"median must be 'average' or 'upper', got {self.median!r}")

    @property
    def bytes_per_chunk(self) -> int:
        return 2 + 2 * self.topk


def _injective_modulus(x: np.ndarray) -> int:
    for m in range(PRIME, 2**15, -1):
        if np.unique(x % m).size == x.size:
            return m
    raise ValueError("no injective modulus for these indices")


def _inv(a: np.ndarray) -> np.ndarray:
    return np.array([pow(int(v), PRIME - 2, PRIME) for v in np.atleast_1d(a)], dtype=np.int64)


def interpolate(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Coefficients (low degree first) of the polynomial through (x, y) over GF(PRIME)."""
    x, dd = x.astype(np.int64) % PRIME, y.astype(np.int64) % PRIME
    n = x.size
    dd = dd.copy()
    for k in range(1, n):  # Newton divided differences, in place
        num = (dd[k:] - dd[k - 1:-1]) % PRIME
        den = (x[k:] - x[:-k]) % PRIME
        dd[k:] = num * _inv(den) % PRIME
    coeffs = np.zeros(n, dtype=np.int64)
    for i in range(n - 1, -1, -1):  # Horner on the Newton form: c(x) = c(x) * (x - x_i) + dd_i
        shifted = np.concatenate([[0], coeffs[:-1]])
        coeffs = (shifted - x[i] * coeffs) % PRIME
        coeffs[0] = (coeffs[0] + dd[i]) % PRIME
    return coeffs


def evaluate(coeffs: np.ndarray, x: np.ndarray) -> np.ndarray:
    x = x.astype(np.int64) % PRIME
    acc = np.zeros_like(x)
    for c in coeffs[::-1]:
        acc = (acc * x + int(c)) % PRIME
    return acc


def _bf16_bits(values: Tensor) -> np.ndarray:
    return values.to(torch.bfloat16).contiguous().view(torch.int16).numpy().astype(np.int64) & 0xFFFF


def _chunks(hidden: Tensor, chunk_size: int) -> list[Tensor]:
    return [hidden[i:i + chunk_size].reshape(-1) for i in range(0, hidden.shape[0], chunk_size)]


def build_proofs(hidden: Tensor, params: TopLocParams | None = None) -> Tensor:
    """Int32 [n_chunks, 1 + topk]: (modulus, coefficients) per chunk of one sequence's hidden states."""
    params = params or TopLocParams()
    rows = []
    for flat in _chunks(hidden.to(torch.bfloat16), params.chunk_size):
        k = min(params.topk, flat.numel())
        idx = flat.float().abs().topk(k).indices.numpy().astype(np.int64)
        m = _injective_modulus(idx)
        coeffs = interpolate(idx % m, _bf16_bits(flat[torch.from_numpy(idx)]))
        rows.append(np.concatenate([[m], coeffs, np.zeros(params.topk - k, dtype=np.int64)]))
    return torch.from_numpy(np.stack(rows).astype(np.int32)) if rows else torch.zeros(0, params.topk + 1)


@dataclass
class ChunkResult:
    exp_mismatches: int
    mant_err_mean: float
    mant_err_median: float
    score: float  # mean over top-k of |mantissa diff|, exponent mismatches counted as MANTISSA_LEVELS

    def accepted(self, params: TopLocParams) -> bool:
        return (params.topk - self.exp_mismatches >= params.min_exp_matches
                and self.mant_err_mean <= params.max_mant_err_mean
                and self.mant_err_median <= params.max_mant_err_median)


def verify_proofs(hidden: Tensor, proofs: Tensor, params: TopLocParams | None = None) -> list[ChunkResult]:
    """Compare the verifier's hidden states of one sequence with the provider's proofs, per chunk."""
    params = params or TopLocParams()
    chunks = _chunks(hidden.to(torch.bfloat16), params.chunk_size)
    if len(chunks) != proofs.shape[0]:
        raise ValueError(f"{proofs.shape[0]} TOPLOC proofs for {len(chunks)} chunks of hidden states")
    out = []
    for flat, proof in zip(chunks, proofs.numpy().astype(np.int64)):
        k = min(params.topk, flat.numel())
        m, coeffs = int(proof[0]), proof[1:1 + k]
        idx = flat.float().abs().topk(k).indices.numpy().astype(np.int64)
        claimed = evaluate(coeffs, idx % m) if m > 0 else np.zeros(k, dtype=np.int64)
        mine = _bf16_bits(flat[torch.from_numpy(idx)])
        exp_c, exp_m = (claimed >> 7) & 0xFF, (mine >> 7) & 0xFF
        mant_c, mant_m = claimed & 0x7F, mine & 0x7F
        match = exp_c == exp_m
        err = np.abs(mant_c - mant_m)[match]
        mean = float(err.mean()) if err.size else float(MANTISSA_LEVELS)
        if not err.size:
            median = float(MANTISSA_LEVELS)
        elif params.median == "upper":
            median = float(np.sort(err)[err.size // 2])
        else:
            median = float(np.median(err))
        score = float(np.where(match, np.abs(mant_c - mant_m), MANTISSA_LEVELS).mean())
        out.append(ChunkResult(int((~match).sum()), mean, median, score))
    return out


# ---------------------------------------------------------------------------------------------
# toploc's wire format


def to_bytes(proofs: Tensor) -> list[bytes]:
    """One toploc-format proof per chunk: modulus, then coefficients, each a big-endian uint16."""
    rows = proofs.to(torch.int64).numpy()
    if rows.ndim != 2 or rows.size and (rows.min() < 0 or rows.max() > 0xFFFF):
        raise ValueError("proofs must be [n_chunks, 1 + topk] with values in 0..65535 (from build_proofs)")
    return [row.astype(">u2").tobytes() for row in rows]


def to_base64(proofs: Tensor) -> list[str]:
    """`to_bytes`, base64-encoded (standard alphabet, padded), as toploc's build_proofs_base64 writes."""
    return [base64.b64encode(b).decode("ascii") for b in to_bytes(proofs)]


def from_bytes(proofs: list[bytes]) -> Tensor:
    """Int32 [n_chunks, 1 + topk] from toploc-format proofs (all chunks must have the same topk)."""
    proofs = list(proofs)
    sizes = {len(b) for b in proofs}
    if len(sizes) > 1 or any(n < 2 or n % 2 for n in sizes):
        raise ValueError(f"toploc proofs are 2 + 2*topk bytes each, all the same size; got sizes {sorted(sizes)}")
    rows = [np.frombuffer(b, dtype=">u2").astype(np.int64) for b in proofs]
    return torch.from_numpy(np.stack(rows).astype(np.int32)) if rows else torch.zeros(0, 1, dtype=torch.int32)


def from_base64(proofs: list[str]) -> Tensor:
    try:
        return from_bytes([base64.b64decode(p, validate=True) for p in proofs])
    except ValueError as exc:
        raise ValueError(f"not toploc base64 proofs: {exc}") from None
