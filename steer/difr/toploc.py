"""TOPLOC baseline (Ong et al. 2025, PrimeIntellect-ai/toploc), reimplemented for the same harness.

Per chunk of `chunk_size` generated tokens the provider takes the `topk` largest-|value| entries of
the flattened bf16 final hidden states and commits to them as a polynomial over GF(65497) through
the points (flat index mod m, bf16 bit pattern), m the largest modulus <= 65497 that keeps the
indices distinct: 2 bytes for m + 2 bytes per coefficient = 258 bytes for topk = 128. The verifier
recomputes the chunk, takes its own top-k indices, evaluates the polynomial there to recover the
provider's values and compares exponents and mantissas (bf16: 8-bit exponent, 7-bit mantissa).
Published acceptance: exponent matches >= 90/128, mantissa error mean <= 10 and median <= 8.

Differences from the released code, on purpose: the interpolation is numpy-vectorised Python (no C
extension); a chunk where every exponent mismatches scores like the worst mantissa error instead of
2**64; prefill is not committed (all three methods here cover generated tokens only).
"""

from __future__ import annotations

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
        median = float(np.median(err)) if err.size else float(MANTISSA_LEVELS)
        score = float(np.where(match, np.abs(mant_c - mant_m), MANTISSA_LEVELS).mean())
        out.append(ChunkResult(int((~match).sum()), mean, median, score))
    return out
