"""Triton kernels of `steer.kernels.act`: ACT flash attention (two accumulators) and sink statistics.

Fixed launch configs (no autotune): BM = 64 queries, BN = 32 keys; 4 warps for head dims <= 64, else 8;
2 stages (no register spills on sm_90 for bf16 D=128, see tests/test_kernels_compile.py).
Under the interpreter every operand is upcast to fp32 after loading (its bf16 arithmetic is wrong);
on the GPU fp16/bf16 operands go to tensor cores with fp32 accumulation, fp32 operands use 3xTF32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from steer.kernels._triton import empty, interpreting

INTERPRETED = interpreting()
BM, BN, NUM_STAGES = 64, 32, 2


def _num_warps(dp: int) -> int:
    return 4 if dp <= 64 else 8


@triton.jit
def _visible(rows, cols, Tq, Tk, b, mask_ptr, smb, smq, smk, SW, HAS_MASK: tl.constexpr, HAS_SW: tl.constexpr):
    """[BM, BN] bool: query rows x key cols that may attend (causal at the last Tq positions, or mask)."""
    pos = rows + (Tk - Tq)
    ok = (rows[:, None] < Tq) & (cols[None, :] < Tk)
    if HAS_MASK:
        m = tl.load(mask_ptr + b * smb + rows[:, None].to(tl.int64) * smq + cols[None, :] * smk, mask=ok, other=0)
        ok = ok & (m != 0)
    else:
        ok = ok & (cols[None, :] <= pos[:, None])
    if HAS_SW:
        ok = ok & ((pos[:, None] - cols[None, :]) < SW)
    return ok


@triton.jit
def _dot(a, b, acc, FP32_DOT: tl.constexpr):
    """a @ b + acc: 3xTF32 for fp32 operands (and the interpreter), tensor cores in the operand dtype else."""
    if FP32_DOT:
        return tl.dot(a, b, acc, input_precision="tf32x3")
    return tl.dot(a.to(b.dtype), b, acc)


@triton.jit
def _load_q(q_ptr, b, h, sqb, sqh, sqt, rows, d, Tq, D, UPCAST: tl.constexpr):
    q = tl.load(q_ptr + b * sqb + h * sqh + rows[:, None].to(tl.int64) * sqt + d[None, :],
                mask=(rows[:, None] < Tq) & (d[None, :] < D), other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    return q


@triton.jit
def _load_kt(k_ptr, b, hk, skb, skh, skt, cols, d, Tk, D, UPCAST: tl.constexpr):
    """K^T block [DP, BN]."""
    kt = tl.load(k_ptr + b * skb + hk * skh + cols[None, :].to(tl.int64) * skt + d[:, None],
                 mask=(cols[None, :] < Tk) & (d[:, None] < D), other=0.0)
    if UPCAST:
        kt = kt.to(tl.float32)
    return kt


@triton.jit
def _key_blocks(pid_m, Tq, Tk, SW, HAS_MASK: tl.constexpr, HAS_SW: tl.constexpr, BM: tl.constexpr,
                BN: tl.constexpr):
    """[lo, hi) key range a query block can see: causal stops at its last query, a window starts late."""
    lo = 0
    hi = Tk
    if not HAS_MASK:
        hi = tl.minimum(Tk, pid_m * BM + BM + (Tk - Tq))
    if HAS_SW:
        lo = tl.maximum(0, pid_m * BM + (Tk - Tq) - SW + 1)
        lo = (lo // BN) * BN
    return lo, hi


@triton.jit
def _row_scores(q, k_ptr, b, hk, skb, skh, skt, n0, rows, d, Tq, Tk, D, scale, mask_ptr, smb, smq, smk, SW,
                HAS_MASK: tl.constexpr, HAS_SW: tl.constexpr, UPCAST: tl.constexpr, FP32_DOT: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr):
    """(key cols, scaled scores [BM, BN] with -inf where a query may not attend) of key block n0."""
    cols = n0 + tl.arange(0, BN)
    kt = _load_kt(k_ptr, b, hk, skb, skh, skt, cols, d, Tk, D, UPCAST)
    qk = _dot(q, kt, tl.zeros([BM, BN], tl.float32), FP32_DOT)
    ok = _visible(rows, cols, Tq, Tk, b, mask_ptr, smb, smq, smk, SW, HAS_MASK, HAS_SW)
    return cols, tl.where(ok, qk * scale, float("-inf"))


@triton.jit
def _online_softmax(m_i, s):
    """Online-softmax step: (new row max, rescale factor of the old sums, exp(s - new max))."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    return m_new, tl.exp(m_i - m_safe), tl.exp(s - m_safe[:, None])


@triton.jit
def _act_fwd(
    q_ptr, k_ptr, v_ptr, o_ptr, sink_ptr, head_ptr, mask_ptr, touched_ptr,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot,
    ssb, ssh, smb, smq, smk,
    H, GROUP, Tq, Tk, D, DV, scale, beta, SW,
    HAS_MASK: tl.constexpr, HAS_SW: tl.constexpr, UPCAST: tl.constexpr, FP32_DOT: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, DP: tl.constexpr, DVP: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    rows = pid_m * BM + tl.arange(0, BM)
    d = tl.arange(0, DP)
    dv = tl.arange(0, DVP)
    q = _load_q(q_ptr, b, h, sqb, sqh, sqt, rows, d, Tq, D, UPCAST)
    calibrated = tl.load(head_ptr + h) != 0
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_s = tl.zeros([BM], tl.float32)
    l_r = tl.zeros([BM], tl.float32)
    acc_s = tl.zeros([BM, DVP], tl.float32)
    acc_r = tl.zeros([BM, DVP], tl.float32)
    lo, hi = _key_blocks(pid_m, Tq, Tk, SW, HAS_MASK, HAS_SW, BM, BN)
    for n0 in range(lo, hi, BN):
        cols, s = _row_scores(q, k_ptr, b, hk, skb, skh, skt, n0, rows, d, Tq, Tk, D, scale, mask_ptr, smb, smq,
                              smk, SW, HAS_MASK, HAS_SW, UPCAST, FP32_DOT, BM, BN)
        m_i, alpha, p = _online_softmax(m_i, s)
        sink = (tl.load(sink_ptr + b * ssb + h * ssh + cols, mask=cols < Tk, other=0) != 0) & calibrated
        p_sink = tl.where(sink[None, :], p, 0.0)
        p_rest = p - p_sink
        l_s = l_s * alpha + tl.sum(p_sink, axis=1)
        l_r = l_r * alpha + tl.sum(p_rest, axis=1)
        vb = tl.load(v_ptr + b * svb + hk * svh + cols[:, None].to(tl.int64) * svt + dv[None, :],
                     mask=(cols[:, None] < Tk) & (dv[None, :] < DV), other=0.0)
        if UPCAST:
            vb = vb.to(tl.float32)
        acc_r = _dot(p_rest, vb, acc_r * alpha[:, None], FP32_DOT)
        acc_s = acc_s * alpha[:, None]
        if tl.max(sink.to(tl.int32), axis=0) > 0:  # only blocks holding a sink pay the second product
            acc_s = _dot(p_sink, vb, acc_s, FP32_DOT)
    l_all = l_s + l_r
    rescale = calibrated & (l_s > 0) & (l_r > 0) & (rows < Tq)
    c = tl.where(rescale, (l_r + (1.0 - beta) * l_s) / tl.where(rescale, l_r, 1.0), 1.0)
    w_s = tl.where(rescale, beta, 1.0)
    inv = tl.where(l_all > 0, 1.0 / tl.where(l_all > 0, l_all, 1.0), 0.0)
    out = (w_s[:, None] * acc_s + c[:, None] * acc_r) * inv[:, None]
    tl.store(o_ptr + b * sob + h * soh + rows[:, None].to(tl.int64) * sot + dv[None, :],
             out.to(o_ptr.dtype.element_ty), mask=(rows[:, None] < Tq) & (dv[None, :] < DV))
    tl.atomic_add(touched_ptr, tl.sum(rescale.to(tl.int64), axis=0))


@triton.jit
def _lse_fwd(
    q_ptr, k_ptr, lse_ptr, mask_ptr,
    sqb, sqh, sqt, skb, skh, skt, smb, smq, smk,
    H, GROUP, Tq, Tk, D, scale, SW,
    HAS_MASK: tl.constexpr, HAS_SW: tl.constexpr, UPCAST: tl.constexpr, FP32_DOT: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, DP: tl.constexpr,
):
    """Pass 1 of sink_stats: row log-sum-exp over key blocks (-inf for rows that see nothing)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    rows = pid_m * BM + tl.arange(0, BM)
    d = tl.arange(0, DP)
    q = _load_q(q_ptr, b, h, sqb, sqh, sqt, rows, d, Tq, D, UPCAST)
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    lo, hi = _key_blocks(pid_m, Tq, Tk, SW, HAS_MASK, HAS_SW, BM, BN)
    for n0 in range(lo, hi, BN):
        _cols, s = _row_scores(q, k_ptr, b, hk, skb, skh, skt, n0, rows, d, Tq, Tk, D, scale, mask_ptr, smb, smq,
                               smk, SW, HAS_MASK, HAS_SW, UPCAST, FP32_DOT, BM, BN)
        m_i, alpha, p = _online_softmax(m_i, s)
        l_i = l_i * alpha + tl.sum(p, axis=1)
    lse = tl.where(l_i > 0, m_i + tl.log(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
    tl.store(lse_ptr + bh.to(tl.int64) * Tq + rows, lse, mask=rows < Tq)


@triton.jit
def _colsum_fwd(
    q_ptr, k_ptr, lse_ptr, col_ptr, mask_ptr,
    sqb, sqh, sqt, skb, skh, skt, smb, smq, smk,
    H, GROUP, Tq, Tk, D, scale, SW,
    HAS_MASK: tl.constexpr, HAS_SW: tl.constexpr, UPCAST: tl.constexpr, FP32_DOT: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, DP: tl.constexpr,
):
    """Pass 2 of sink_stats: for one key block, sum exp(q.k * scale - lse) over the query blocks."""
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    cols = pid_n * BN + tl.arange(0, BN)
    d = tl.arange(0, DP)
    kt = _load_kt(k_ptr, b, hk, skb, skh, skt, cols, d, Tk, D, UPCAST)
    col = tl.zeros([BN], tl.float32)
    lo = 0
    hi = Tq
    if not HAS_MASK:
        lo = tl.maximum(0, pid_n * BN - (Tk - Tq))
        lo = (lo // BM) * BM
    if HAS_SW:
        hi = tl.minimum(Tq, pid_n * BN + BN + SW - (Tk - Tq))
    for m0 in range(lo, hi, BM):
        rows = m0 + tl.arange(0, BM)
        q = _load_q(q_ptr, b, h, sqb, sqh, sqt, rows, d, Tq, D, UPCAST)
        qk = _dot(q, kt, tl.zeros([BM, BN], tl.float32), FP32_DOT)
        lse = tl.load(lse_ptr + bh.to(tl.int64) * Tq + rows, mask=rows < Tq, other=float("-inf"))
        ok = _visible(rows, cols, Tq, Tk, b, mask_ptr, smb, smq, smk, SW, HAS_MASK, HAS_SW)
        ok = ok & (lse[:, None] > float("-inf"))
        p = tl.where(ok, tl.exp(qk * scale - tl.where(ok, lse[:, None], 0.0)), 0.0)
        col += tl.sum(p, axis=0)
    tl.store(col_ptr + bh.to(tl.int64) * Tk + cols, col, mask=cols < Tk)


def _mask_args(mask, B, device):
    if mask is None:
        return torch.zeros(1, dtype=torch.int8, device=device), 0, 0, 0
    m = mask.view(torch.int8)
    return m, (m.stride(0) if m.shape[0] == B and B > 1 else 0), m.stride(2), m.stride(3)


def _dot_mode(q) -> tuple[bool, bool]:
    """(UPCAST, FP32_DOT): the interpreter computes everything in fp32."""
    upcast = interpreting() or q.dtype == torch.float32
    return upcast, upcast


def _last_contig(x):
    return x if x.stride(-1) == 1 else x.contiguous()


def act_attention_triton(q, k, v, *, scale, sink_mask, head_mask, beta, mask=None, sliding_window=None):
    q, k, v = _last_contig(q), _last_contig(k), _last_contig(v)
    B, H, Tq, D = q.shape
    Hkv, Tk, DV = k.shape[1], k.shape[2], v.shape[3]
    out = empty(B, H, Tq, DV, dtype=q.dtype, device=q.device)
    touched = torch.zeros((), dtype=torch.int64, device=q.device)
    if B * H * Tq == 0:
        return out, touched
    sinks = _last_contig(sink_mask).view(torch.int8)
    heads = head_mask.view(torch.int8)
    ssb = sinks.stride(0) if sinks.shape[0] == B and B > 1 else 0
    m, smb, smq, smk = _mask_args(mask, B, q.device)
    upcast, fp32_dot = _dot_mode(q)
    DP, DVP = max(16, triton.next_power_of_2(D)), max(16, triton.next_power_of_2(DV))
    grid = (triton.cdiv(Tq, BM), B * H)
    _act_fwd[grid](
        q, k, v, out, sinks, heads, m, touched,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        ssb, sinks.stride(1), smb, smq, smk,
        H, H // Hkv, Tq, Tk, D, DV, float(scale), float(beta), int(sliding_window or 0),
        HAS_MASK=mask is not None, HAS_SW=sliding_window is not None, UPCAST=upcast, FP32_DOT=fp32_dot,
        BM=BM, BN=BN, DP=DP, DVP=DVP, num_warps=_num_warps(max(DP, DVP)), num_stages=NUM_STAGES,
    )
    return out, touched


def sink_stats_triton(q, k, *, scale, mask=None, sliding_window=None):
    from steer.kernels.act import n_observers

    q, k = _last_contig(q), _last_contig(k)
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    col = empty(B, H, Tk, dtype=torch.float32, device=q.device)
    n_obs = n_observers(B, Tq, Tk, mask, sliding_window, device=q.device)
    if B * H * Tk == 0:
        return col, n_obs
    if Tq == 0:
        return col.zero_(), n_obs
    lse = empty(B, H, Tq, dtype=torch.float32, device=q.device)
    m, smb, smq, smk = _mask_args(mask, B, q.device)
    upcast, fp32_dot = _dot_mode(q)
    DP = max(16, triton.next_power_of_2(D))
    common = dict(HAS_MASK=mask is not None, HAS_SW=sliding_window is not None, UPCAST=upcast, FP32_DOT=fp32_dot,
                  BM=BM, BN=BN, DP=DP, num_warps=_num_warps(DP), num_stages=NUM_STAGES)
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), smb, smq, smk)
    sizes = (H, H // Hkv, Tq, Tk, D, float(scale), int(sliding_window or 0))
    _lse_fwd[(triton.cdiv(Tq, BM), B * H)](q, k, lse, m, *strides, *sizes, **common)
    _colsum_fwd[(triton.cdiv(Tk, BN), B * H)](q, k, lse, col, m, *strides, *sizes, **common)
    return col, n_obs
