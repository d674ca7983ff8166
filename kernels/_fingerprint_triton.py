"""Triton kernel of `steer.kernels.fingerprint.fingerprint`: h [T, D] @ P [D, k] -> fp16, fp32 accumulate.

Fixed launch config (no autotune): BT=32 tokens per program, BD=64, 4 warps, 3 stages (no register
spills on sm_90; BD=128 spills).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from steer.kernels._triton import empty, interpreting

INTERPRETED = interpreting()
BT, BD, NUM_WARPS, NUM_STAGES = 32, 64, 4, 3
PRECISION = "tf32x3"  # fp32-accurate products on tensor cores; "ieee" = CUDA-core FMA


@triton.jit
def _fingerprint_kernel(h_ptr, p_ptr, out_ptr, T, D, K, stride_h, stride_p,
                        BT: tl.constexpr, BD: tl.constexpr, KP: tl.constexpr, PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BT + tl.arange(0, BT)
    cols = tl.arange(0, KP)
    rmask = rows < T
    cmask = cols < K
    acc = tl.zeros([BT, KP], dtype=tl.float32)
    for d0 in range(0, D, BD):
        d = d0 + tl.arange(0, BD)
        dmask = d < D
        h = tl.load(h_ptr + rows[:, None].to(tl.int64) * stride_h + d[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
        p = tl.load(p_ptr + d[:, None] * stride_p + cols[None, :], mask=dmask[:, None] & cmask[None, :], other=0.0)
        acc = tl.dot(h.to(tl.float32), p, acc, input_precision=PRECISION)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * K + cols[None, :], acc.to(tl.float16), mask=rmask[:, None] & cmask[None, :])


def fingerprint_triton(h: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
    lead, D = h.shape[:-1], h.shape[-1]
    h2 = h.reshape(-1, D)
    if h2.stride(-1) != 1:
        h2 = h2.contiguous()
    P = P.contiguous()
    T, K = h2.shape[0], P.shape[1]
    out = empty(T, K, dtype=torch.float16, device=h.device)
    if T:
        KP = max(16, triton.next_power_of_2(K))
        _fingerprint_kernel[(triton.cdiv(T, BT),)](
            h2, P, out, T, D, K, h2.stride(0), P.stride(0),
            BT=BT, BD=BD, KP=KP, PRECISION=PRECISION, num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    return out.reshape(*lead, K)
