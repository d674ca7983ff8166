"""Triton kernels of `steer.kernels.probe_score.probe_score` (see that module).

Fixed launch configs (no autotune): kernel 1 BB=16 rows, BJ=64 hidden units, feature chunks of
CH=128 per program (BK=64 per step), 4 warps; kernel 2 BB=16 rows, 8 warps (the [H1, H2] = [256, 64]
W2 tile spills with 4).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from steer.kernels._triton import empty, interpreting

INTERPRETED = interpreting()
BB, BJ, CH, BK, NUM_WARPS, HEAD_WARPS = 16, 64, 128, 64, 4, 8


@triton.jit
def _pick(i: tl.constexpr, x0, x1, x2, x3, x4, x5, x6, x7):
    if i == 0:
        r = x0
    elif i == 1:
        r = x1
    elif i == 2:
        r = x2
    elif i == 3:
        r = x3
    elif i == 4:
        r = x4
    elif i == 5:
        r = x5
    elif i == 6:
        r = x6
    else:
        r = x7
    return r


@triton.jit
def _probe_layer1(
    h0, h1, h2, h3, h4, h5, h6, h7,
    sb0, sb1, sb2, sb3, sb4, sb5, sb6, sb7,
    st0, st1, st2, st3, st4, st5, st6, st7,
    d0, d1, d2, d3, d4, d5, d6, d7,
    f0, f1, f2, f3, f4, f5, f6, f7,
    pos_ptr, mean_ptr, std_ptr, w1_ptr, part_ptr,
    B, T, H1, stride_w1,
    NL: tl.constexpr, BB: tl.constexpr, BJ: tl.constexpr, CH: tl.constexpr, BK: tl.constexpr,
    FP32_DOT: tl.constexpr,
):
    pid_j = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_b = tl.program_id(2)
    bs = pid_b * BB + tl.arange(0, BB)
    bmask = bs < B
    pos = tl.load(pos_ptr + bs, mask=bmask, other=0).to(tl.int64)
    pos_ok = (pos >= 0) & (pos < T)
    load_ok = bmask & pos_ok
    js = pid_j * BJ + tl.arange(0, BJ)
    jmask = js < H1
    acc = tl.zeros([BB, BJ], tl.float32)
    for layer in tl.static_range(NL):
        hp = _pick(layer, h0, h1, h2, h3, h4, h5, h6, h7)
        sb = _pick(layer, sb0, sb1, sb2, sb3, sb4, sb5, sb6, sb7)
        st = _pick(layer, st0, st1, st2, st3, st4, st5, st6, st7)
        dl = _pick(layer, d0, d1, d2, d3, d4, d5, d6, d7)
        fo = _pick(layer, f0, f1, f2, f3, f4, f5, f6, f7)
        k_end = tl.minimum(dl, pid_s * CH + CH)
        for k0 in range(pid_s * CH, k_end, BK):
            ks = k0 + tl.arange(0, BK)
            kmask = ks < k_end
            x = tl.load(hp + bs[:, None].to(tl.int64) * sb + pos[:, None] * st + ks[None, :],
                        mask=load_ok[:, None] & kmask[None, :], other=0.0).to(tl.float32)
            mu = tl.load(mean_ptr + fo + ks, mask=kmask, other=0.0).to(tl.float32)
            sd = tl.load(std_ptr + fo + ks, mask=kmask, other=1.0).to(tl.float32)
            x = tl.where(kmask[None, :], (x - mu[None, :]) / sd[None, :], 0.0)
            x = tl.where(bmask[:, None] & (pos_ok[:, None] == 0), float("nan"), x)  # bad position: NaN row
            w = tl.load(w1_ptr + js[None, :].to(tl.int64) * stride_w1 + (fo + ks)[:, None],
                        mask=jmask[None, :] & kmask[:, None], other=0.0).to(tl.float32)
            if FP32_DOT:
                acc = tl.dot(x, w, acc, input_precision="tf32x3")
            else:
                acc = tl.dot(x, w, acc)
    tl.store(part_ptr + (pid_s * B + bs[:, None]).to(tl.int64) * H1 + js[None, :], acc,
             mask=bmask[:, None] & jmask[None, :])


@triton.jit
def _probe_head(
    part_ptr, b1_ptr, w2_ptr, b2_ptr, w3_ptr, b3_ptr, out_ptr,
    B, H1, H2, NSPLIT, stride_w2,
    BB: tl.constexpr, H1P: tl.constexpr, H2P: tl.constexpr, FP32_DOT: tl.constexpr,
):
    pid = tl.program_id(0)
    bs = pid * BB + tl.arange(0, BB)
    bmask = bs < B
    j1 = tl.arange(0, H1P)
    j1m = j1 < H1
    a1 = tl.zeros([BB, H1P], tl.float32)
    for s in range(0, NSPLIT):
        a1 += tl.load(part_ptr + (s * B + bs[:, None]).to(tl.int64) * H1 + j1[None, :],
                      mask=bmask[:, None] & j1m[None, :], other=0.0)
    a1 = tl.maximum(a1 + tl.load(b1_ptr + j1, mask=j1m, other=0.0).to(tl.float32)[None, :], 0.0)
    j2 = tl.arange(0, H2P)
    j2m = j2 < H2
    w2t = tl.load(w2_ptr + j2[None, :] * stride_w2 + j1[:, None], mask=j2m[None, :] & j1m[:, None], other=0.0).to(tl.float32)
    if FP32_DOT:
        a2 = tl.dot(a1, w2t, input_precision="tf32x3")
    else:
        a2 = tl.dot(a1, w2t)
    a2 = tl.maximum(a2 + tl.load(b2_ptr + j2, mask=j2m, other=0.0).to(tl.float32)[None, :], 0.0)
    w3 = tl.load(w3_ptr + j2, mask=j2m, other=0.0).to(tl.float32)
    logit = tl.sum(a2 * w3[None, :], axis=1) + tl.load(b3_ptr).to(tl.float32)
    tl.store(out_ptr + bs, 1.0 / (1.0 + tl.exp(-logit)), mask=bmask)


def probe_score_triton(hidden, positions, mean, std, layers):
    (w1, b1), (w2, b2), (w3, b3) = layers
    hidden = [h if h.stride(-1) == 1 else h.contiguous() for h in hidden]
    w1, w2 = w1.contiguous(), w2.contiguous()
    dev = hidden[0].device
    B, T = hidden[0].shape[:2]
    NL = len(hidden)
    dims = [h.shape[2] for h in hidden]
    offs = [sum(dims[:i]) for i in range(NL)]
    pad = 8 - NL
    hs = hidden + [hidden[0]] * pad
    sbs = [h.stride(0) for h in hidden] + [0] * pad
    sts = [h.stride(1) for h in hidden] + [0] * pad
    ds = dims + [0] * pad
    fs = offs + [0] * pad
    H1, H2 = w1.shape[0], w2.shape[0]
    nsplit = triton.cdiv(max(dims), CH)
    out = empty(B, dtype=torch.float32, device=dev)
    if B == 0:
        return out
    part = empty(nsplit, B, H1, dtype=torch.float32, device=dev)
    _probe_layer1[(triton.cdiv(H1, BJ), nsplit, triton.cdiv(B, BB))](
        *hs, *sbs, *sts, *ds, *fs, positions, mean, std, w1, part, B, T, H1, w1.stride(0),
        NL=NL, BB=BB, BJ=BJ, CH=CH, BK=BK, FP32_DOT=True, num_warps=NUM_WARPS)
    H1P, H2P = max(16, triton.next_power_of_2(H1)), max(16, triton.next_power_of_2(H2))
    _probe_head[(triton.cdiv(B, BB),)](
        part, b1, w2, b2, w3.reshape(-1), b3.reshape(-1), out, B, H1, H2, nsplit, w2.stride(0),
        BB=BB, H1P=H1P, H2P=H2P, FP32_DOT=True, num_warps=HEAD_WARPS)
    return out
