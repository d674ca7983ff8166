"""Activation-DiFR fingerprint: f = h P, computed in fp32, stored as fp16 (ALGORITHMS.md section 4).

`fingerprint(h, P)`: h [..., D] the final post-norm hidden states (any float dtype), P [D, k] fp32
from `projection_matrix(seed, d, k, kind)`. Accumulates in fp32, casts to fp16 on store. The Triton
path reads h once (memory-bound): one program per 32 tokens, D in chunks of 64, the k columns
padded to 16 for tl.dot with 3xTF32 (fp32-accurate) products. Both paths agree to fp16 rounding.

`projection_matrix` is generated on CPU from `seed` with torch.Generator, so a provider and a
verifier on different machines get the same matrix: "gaussian" = N(0,1)/sqrt(k) (the DiFR code's
choice, but kept in fp32), "orthonormal" = QR of the N(0,1) matrix in fp64 with the sign fix
diag(R) > 0 (orthonormal columns; needs k <= d).
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from steer.kernels._triton import backend_for, load


def projection_matrix(seed: int, d: int, k: int, kind: Literal["gaussian", "orthonormal"] = "gaussian") -> torch.Tensor:
    """The public fp32 [d, k] projection shared by provider and verifier."""
    if d < 1 or k < 1:
        raise ValueError(f"projection needs d >= 1 and k >= 1, got d={d}, k={k}")
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    g = torch.randn(d, k, generator=gen, dtype=torch.float64)
    if kind == "gaussian":
        return (g / math.sqrt(k)).to(torch.float32)
    if kind == "orthonormal":
        if k > d:
            raise ValueError(f"an orthonormal projection needs k <= d, got k={k} > d={d}")
        q, r = torch.linalg.qr(g, mode="reduced")
        sign = torch.where(torch.diagonal(r) < 0, -1.0, 1.0).to(q.dtype)
        return (q * sign).to(torch.float32)
    raise ValueError(f"projection kind {kind!r} is not 'gaussian' or 'orthonormal'")


def _check(h: torch.Tensor, P: torch.Tensor) -> None:
    if not h.is_floating_point():
        raise ValueError(f"hidden states must be floating point, got {h.dtype}")
    if P.dim() != 2 or P.shape[0] != h.shape[-1]:
        raise ValueError(f"projection must be [D={h.shape[-1]}, k], got {tuple(P.shape)}")
    if P.dtype != torch.float32:
        raise ValueError(f"projection must be fp32 (use projection_matrix), got {P.dtype}")
    if P.device != h.device:
        raise ValueError(f"projection is on {P.device} but hidden states on {h.device}; move P once with P.to(device)")


def fingerprint(h: torch.Tensor, P: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Float16[..., k] = (h in fp32) @ P, accumulated in fp32."""
    _check(h, P)
    if backend_for(h, backend) == "triton":
        return load("_fingerprint_triton").fingerprint_triton(h, P)
    return fingerprint_reference(h, P)


def fingerprint_reference(h: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
    """PyTorch reference (also the CPU path)."""
    _check(h, P)
    return torch.matmul(h.float(), P).to(torch.float16)
