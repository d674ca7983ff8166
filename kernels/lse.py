"""Attention from the fused kernel's row log-sum-exp: ACT and sink statistics at SDPA speed.

SDPA's fused kernels compute each query row's log-sum-exp (lse) and throw it away;
`attention_lse` keeps it (CPU: `aten._scaled_dot_product_flash_attention_for_cpu`; CUDA: the flash
kernel for fp16/bf16 without a mask, the memory-efficient kernel otherwise; a grouped math path for
decode steps, where a few query rows make the fused kernels' setup the larger cost). With lse, the
probability of any key is one dot product away: p_ij = exp(q_i.k_j * scale - lse_i). Hence
(ALGORITHMS.md, "kernel-friendly forms"):

- ACT (`act_from_lse`) on a head with sink set S: o' = beta o_S + c (o - o_S), o_S = sum_S p_s v_s,
  c = (1 - beta P_S) / (1 - P_S). Extra work O(Tq |S| d) on top of one ordinary attention. The fused
  kernel's rounding error in o (~1e-6) reaches o' multiplied by c, which grows as the non-sink mass
  1 - P_S vanishes; rows with c > C_MAX are recomputed exactly from their full score row (rare: only
  rows that put nearly all their attention on hidden sinks).
- Sink statistics: column sums sum_i exp(q_i.k_j * scale - lse_i) for every key
  (`sink_stats_lse`: one pass over the visible key range of each query block, no softmax
  reductions, O(QUERY_BLOCK x Tk) memory), for a known candidate set (`sink_stats_columns`:
  O(Tq |C| d)), or estimated from a uniform sample of query rows (`sink_stats_sampled`, unbiased,
  with its standard error).

Conventions are steer.kernels.act's: q [B, H, Tq, D], k/v [B, Hkv, Tk, D] (GQA: query head h reads kv
head h // (H / Hkv)), `mask` Bool[B or 1, 1, Tq, Tk] (True = may attend) or None = causal with the
queries at the last Tq key positions, `sliding_window` w keeps keys with query_pos - key_pos < w.
Scores are computed in fp32. The exact references stay in steer.kernels.act (act_attention_reference,
sink_stats_reference); tests hold these paths equal to them.
"""

from __future__ import annotations

import weakref

import torch

from steer.kernels.act import _check, n_observers, visibility

QUERY_BLOCK = (
    256  # most query rows per block in the column-sum passes (memory ~ B * H * QUERY_BLOCK * Tk * 4 bytes)
)
# sink_stats_lse sizes its blocks to about this many scores (B * H * rows * Tk, >= MIN_BLOCK_ROWS rows): a
# ~2 MiB block stays in cache between the GEMM that writes it and the exp and sum that read it, measured
# 1.3x faster than 256-row blocks on SmolLM2 and Gemma-3-270m at 2,048 tokens (one CPU thread)
BLOCK_SCORES = 1 << 19
MIN_BLOCK_ROWS = 16
C_MAX = 8.0  # ACT rows whose factor c exceeds this are recomputed exactly (c amplifies o's rounding error)
EXACT_ROW_CHUNK = 32  # rows per chunk in that exact recomputation
# query rows per fused-kernel call on a causal + sliding-window input: the block's keys span its rows plus the
# window, so smaller blocks compute fewer masked scores (256 rows at window 512: 1.5x the visible scores)
WINDOW_BLOCK = 256
HOST_ROWS = 8  # act_decode_from_lse on CPU decides rows on the host up to this many (batch x heads x rows)
MATH_MAX_ROWS = 16  # query rows up to which attention_lse takes the grouped math path (decode steps)
# Scores below this (log-probabilities; exp < 1.7e-38, fp32's denormal range) are raised to it before exp in
# the column-sum passes: x86 computes exp with a denormal result ~100x slower than a normal one, and most
# scores of a sink head underflow there. Each such probability is then 1.6e-38 instead of 0..1.2e-38: a
# column sum moves by < Tq * 1.7e-38, far below fp32 resolution of any sum that matters.
EXP_FLOOR = -87.0

# Additive float masks made from boolean ones, kept while the boolean mask lives: the model builds one
# mask per forward and hands the same tensor to every layer, so the conversion happens once per forward.
_ADDITIVE: dict[tuple[int, torch.dtype], tuple[weakref.ref, torch.Tensor]] = {}


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    key = (id(mask), dtype)
    hit = _ADDITIVE.get(key)
    if hit is not None and hit[0]() is mask:
        return hit[1]
    add = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
    _ADDITIVE[key] = (weakref.ref(mask), add)
    weakref.finalize(mask, _ADDITIVE.pop, key, None)
    return add


# Per boolean mask (the model builds one per forward and every layer shares it): how many keys each query
# row sees and how many queries see each key, counted once per forward, not once per layer.
_COUNTS: dict[int, tuple[weakref.ref, torch.Tensor, torch.Tensor]] = {}


def _mask_counts(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys per query row Int64[B or 1, 1, Tq], observers per key Int64[B or 1, 1, Tk]) of Bool mask
    [B or 1, 1, Tq, Tk]; counted over uint8 / fp32 blocks (summing a bool tensor into int64 is ~10x slower)."""
    hit = _COUNTS.get(id(mask))
    if hit is not None and hit[0]() is mask:
        return hit[1], hit[2]
    m = mask.view(torch.uint8) if mask.is_contiguous() else mask.to(torch.uint8)
    rows = m.sum(-1, dtype=torch.int32).to(torch.int64)
    cols = torch.zeros(*mask.shape[:2], mask.shape[-1], dtype=torch.float32, device=mask.device)
    for r0 in range(0, mask.shape[2], QUERY_BLOCK):  # fp32 is exact up to 2^24 observers
        cols += m[:, :, r0 : r0 + QUERY_BLOCK].float().sum(2)
    cols = cols.to(torch.int64)
    _COUNTS[id(mask)] = (weakref.ref(mask), rows, cols)
    weakref.finalize(mask, _COUNTS.pop, id(mask), None)
    return rows, cols


def observers(B: int, Tq: int, Tk: int, mask=None, sliding_window=None, device=None) -> torch.Tensor:
    """steer.kernels.act.n_observers, with a mask's counts computed once per mask (`_mask_counts`)."""
    if mask is None or sliding_window is not None:
        return n_observers(B, Tq, Tk, mask, sliding_window, device=device)
    return _mask_counts(mask)[1].expand(B, 1, Tk)


def _window_cuts(Tk: int, sliding_window: int | None) -> bool:
    """True if the window hides some key from some query (the largest distance is Tk - 1)."""
    return sliding_window is not None and Tk > sliding_window


def _rep(x: torch.Tensor, H: int) -> torch.Tensor:
    return x.repeat_interleave(H // x.shape[1], dim=1) if x.shape[1] != H else x


# ----------------------------------------------------------------------------------------------
# attention with its log-sum-exp
# ----------------------------------------------------------------------------------------------


def attention_lse(q, k, v, *, scale: float, mask=None, sliding_window=None):
    """(out [B, H, Tq, Dv] in q's dtype, lse [B, H, Tq] fp32) of softmax attention.

    Fully masked rows give out = 0 and an lse that is never used (their keys are all masked)."""
    _check(q, k, v, None, None, mask, sliding_window)
    B, H, Tq, _ = q.shape
    Tk = k.shape[2]
    cuts = _window_cuts(Tk, sliding_window)
    if Tq * (H // k.shape[1]) <= MATH_MAX_ROWS * 4 and Tq <= MATH_MAX_ROWS:
        vis = (
            None
            if (mask is None and not cuts and Tq == 1)
            else visibility(Tq, Tk, mask, sliding_window, device=q.device)
        )
        return _attention_lse_math(q, k, v, scale, vis)
    if mask is None and cuts:
        return _window_blocks(q, k, v, scale, sliding_window)
    is_causal, attn = False, None
    if mask is None and Tq == Tk:
        is_causal = True
    else:
        vis = (
            mask
            if (mask is not None and not cuts)
            else visibility(Tq, Tk, mask, sliding_window, device=q.device)
        )
        attn = (
            _additive(vis, q.dtype)
            if vis is mask
            else torch.zeros(vis.shape, dtype=q.dtype, device=q.device).masked_fill_(~vis, float("-inf"))
        )
    return _fused(q, k, v, scale, is_causal, attn, lambda: visibility(Tq, Tk, mask, sliding_window, device=q.device))


def _window_blocks(q, k, v, scale, window: int):
    """attention_lse of causal attention cut by a sliding window, WINDOW_BLOCK query rows at a time: each
    block's keys start at its first row's window start, and its mask is the block's band only, so no
    Tq x Tk mask exists (an additive fp32 one is 256 MiB at 8,192 tokens) and the fused kernel skips the
    keys no row of the block sees."""
    Tq, Tk = q.shape[2], k.shape[2]
    off = Tk - Tq
    outs, lses = [], []
    for r0 in range(0, Tq, WINDOW_BLOCK):
        r1 = min(Tq, r0 + WINDOW_BLOCK)
        lo, hi = max(0, r0 + off - window + 1), r1 + off
        pos = torch.arange(r0 + off, hi, device=q.device).unsqueeze(1)
        col = torch.arange(lo, hi, device=q.device)
        vis = ((col <= pos) & (pos - col < window)).view(1, 1, r1 - r0, hi - lo)
        attn = torch.zeros(vis.shape, dtype=q.dtype, device=q.device).masked_fill_(~vis, float("-inf"))
        o, lse = _fused(q[:, :, r0:r1], k[:, :, lo:hi], v[:, :, lo:hi], scale, False, attn, lambda vis=vis: vis)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs, 2), torch.cat(lses, 2)


def _fused(q, k, v, scale, is_causal, attn, vis):
    """(out, lse fp32) from the device's fused kernel: is_causal, or the additive mask attn [B or 1, 1, Tq, Tk];
    vis() gives the boolean visibility for devices without a fused kernel."""
    B, H, Tq, _ = q.shape
    Tk = k.shape[2]
    if q.device.type == "cpu":
        return _cpu_flash(q, k, v, is_causal, attn, scale)
    kk, vv = _rep(k, H), _rep(v, H)
    if q.device.type == "cuda":
        if attn is None and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256:
            res = torch.ops.aten._scaled_dot_product_flash_attention(
                q, kk, vv, 0.0, is_causal, False, scale=scale
            )
            return res[0], res[1].float()
        if attn is not None:  # the kernel wants the bias's row stride 16-aligned, as F.sdpa pads it
            pad = (-Tk) % 16
            if pad:
                attn = torch.nn.functional.pad(attn, (0, pad))[..., :Tk]
            attn = attn.expand(B, H, Tq, Tk)
        res = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, kk, vv, attn, True, 0.0, is_causal, scale=scale
        )
        return res[0], res[1][..., :Tq].float()
    return _attention_lse_blocked(q, k, v, scale, vis())


_CPU_GQA = [True]  # the CPU flash kernel takes fewer kv heads than query heads (torch >= 2.5); else copies


def _cpu_flash(q, k, v, is_causal, attn, scale):
    """CPU fused attention with lse; GQA k/v passed as they are (no repeat_interleave copies) where the
    kernel accepts them (tested equal to the repeated form, tests/test_kernels_lse.py)."""
    f = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    if k.shape[1] != q.shape[1] and _CPU_GQA[0]:
        try:
            out, lse = f(q, k, v, 0.0, is_causal, attn_mask=attn, scale=scale)
            return out, lse.float()
        except RuntimeError:
            _CPU_GQA[0] = False
    H = q.shape[1]
    out, lse = f(q, _rep(k, H), _rep(v, H), 0.0, is_causal, attn_mask=attn, scale=scale)
    return out, lse.float()


def attention_head_lse(q, k, v, *, scale: float, heads, mask=None, sliding_window=None):
    """(out [B, H, Tq, Dv], lse [B, Hs, Tq] fp32 of the query heads `heads` only), for decode steps.

    CPU, one query row: the fused kernel as a plain decode step calls it (`_decode_cpu`), lse included.
    Otherwise fp32 with a few query rows: attention_lse's grouped math path (all heads, GQA without
    copying k/v); else PyTorch's SDPA call as transformers makes it, plus the lse of the calibrated heads."""
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    if q.device.type == "cpu" and Tq == 1 and not _window_cuts(Tk, sliding_window):
        out, lse = _decode_cpu(q, k, v, scale, mask)
        return out, lse[:, heads]
    if q.dtype == torch.float32 and Tq * (H // Hkv) <= MATH_MAX_ROWS * 4 and Tq <= MATH_MAX_ROWS:
        out, lse = attention_lse(q, k, v, scale=scale, mask=mask, sliding_window=sliding_window)
        return out, lse[:, heads]
    cuts = _window_cuts(Tk, sliding_window)
    vis = (
        None
        if (mask is None and not cuts and Tq == 1)
        else visibility(Tq, Tk, mask, sliding_window, device=q.device)
    )
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=vis, scale=scale, enable_gqa=H != Hkv
    )
    kh = k[:, heads // (H // Hkv)]
    s = torch.matmul(q[:, heads].float(), kh.float().transpose(-1, -2)).mul_(scale)  # [B, Hs, Tq, Tk]
    if vis is not None:
        s = s.masked_fill(~vis, float("-inf"))
    return out, torch.logsumexp(s, dim=-1)


def _decode_cpu(q, k, v, scale, mask):
    """(out [B, H, 1, Dv], lse [B, H, 1] fp32) of one query row per sequence on CPU: the fused kernel on the
    kv heads with each group's query heads as its rows, as transformers' SDPA integration packs GQA for a
    decode step (no k/v copies), so the step costs what a plain decode step's attention costs and the lse
    comes with it. mask: Bool[B or 1, 1, 1, Tk] or None (the row sees every key)."""
    B, H, _, D = q.shape
    Hkv = k.shape[1]
    attn = None if mask is None else _additive(mask, q.dtype)  # broadcast over the packed rows
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q.reshape(B, Hkv, H // Hkv, D), k, v, 0.0, False, attn_mask=attn, scale=scale
    )
    return out.reshape(B, H, 1, v.shape[-1]), lse.reshape(B, H, 1).float()


def _attention_lse_math(q, k, v, scale, vis):
    """Grouped (GQA without copies) explicit attention for a few query rows; fp32."""
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    rep = H // Hkv
    s = torch.matmul(q.float().reshape(B, Hkv, rep * Tq, D), k.float().transpose(-1, -2)).mul_(scale)
    s = s.view(B, Hkv, rep, Tq, Tk)
    if vis is not None:
        s = s.masked_fill(~vis.unsqueeze(2), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # [B, Hkv, rep, Tq]
    p = torch.exp(s - lse.unsqueeze(-1)).nan_to_num_(0.0)  # fully masked rows: 0
    out = torch.matmul(p.view(B, Hkv, rep * Tq, Tk), v.float()).view(B, H, Tq, v.shape[-1])
    return out.to(q.dtype), lse.reshape(B, H, Tq)


def _attention_lse_blocked(q, k, v, scale, vis):
    """Any device: QUERY_BLOCK query rows at a time, fp32."""
    outs, lses = [], []
    for r0 in range(0, q.shape[2], QUERY_BLOCK):
        r1 = min(q.shape[2], r0 + QUERY_BLOCK)
        o, lse = _attention_lse_math(q[:, :, r0:r1], k, v, scale, vis[:, :, r0:r1])
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs, 2), torch.cat(lses, 2)


# ----------------------------------------------------------------------------------------------
# ACT from lse
# ----------------------------------------------------------------------------------------------


def sink_index(sink_mask: torch.Tensor, head_mask: torch.Tensor):
    """(heads Long[Hs], cols Long[B, Hs, S], valid Bool[B, Hs, S]): sink_mask Bool[B or 1, H, Tk] as
    padded column lists for the heads in head_mask (S = the largest set; padding has valid=False)."""
    heads = head_mask.nonzero().flatten()
    sm = sink_mask[:, heads]
    S = int(sm.sum(-1).max()) if sm.numel() else 0
    order = torch.sort(sm.to(torch.uint8), dim=-1, descending=True, stable=True).indices[..., :S]
    return heads, order, torch.gather(sm, -1, order)


def _column_visibility(cols, Tq: int, Tk: int, mask=None, sliding_window=None):
    """Bool[B or 1, Hs, Tq, S]: may query row i see key column cols[b, j, s]."""
    pos = (torch.arange(Tq, device=cols.device) + (Tk - Tq)).view(1, 1, Tq, 1)
    c = cols.unsqueeze(2)  # [B, Hs, 1, S]
    if mask is None:
        ok = c <= pos
    else:
        B = max(mask.shape[0], cols.shape[0])
        m = mask[:, 0].unsqueeze(1).expand(B, cols.shape[1], Tq, Tk)
        ok = torch.gather(m, 3, c.expand(B, cols.shape[1], Tq, cols.shape[2]))
    if sliding_window is not None:
        ok = ok & ((pos - c) < sliding_window)
    return ok


def _visible_keys(Tq: int, Tk: int, mask=None, sliding_window=None, device=None) -> torch.Tensor:
    """Int64[B or 1, 1, Tq]: keys each query row may see."""
    if mask is None:
        pos = torch.arange(Tq, device=device) + (Tk - Tq)
        n = pos + 1 if sliding_window is None else (pos + 1).clamp(max=sliding_window)
        return n.view(1, 1, Tq)
    if sliding_window is None:
        return _mask_counts(mask)[0]
    return visibility(Tq, Tk, mask, sliding_window).sum(-1, dtype=torch.int64)


def act_from_lse(
    q, k, v, out, lse, *, scale: float, heads, cols, valid, beta: float, mask=None, sliding_window=None
):
    """ACT applied to an attention output computed with its lse (module docstring).

    out [B, H, Tq, Dv] (the ordinary attention output; not modified), lse [B, H, Tq] fp32 (or
    [B, Hs, Tq]: the calibrated heads' rows only, as attention_head_lse gives); heads Long[Hs] the
    calibrated query heads (sorted); cols Long[B, Hs, S] their sink key columns (0..Tk-1), valid
    Bool[B, Hs, S]. Returns (out' [B, H, Tq, Dv] in out's dtype, touched int64 0-dim): the same as
    steer.kernels.act.act_attention with sink_mask/head_mask holding these sets."""
    B, H, Tq, _ = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    touched = torch.zeros((), dtype=torch.int64, device=q.device)
    if heads.numel() == 0 or cols.shape[-1] == 0:
        return out, touched
    kvh = (heads // (H // Hkv)).view(1, -1, 1)
    bi = torch.arange(B, device=q.device).view(-1, 1, 1)
    cols = cols.expand(B, -1, -1)
    valid = valid.expand(B, -1, -1)
    ks = k[bi, kvh, cols].float()  # [B, Hs, S, D]
    vs = v[bi, kvh, cols].float()
    s = torch.matmul(q[:, heads].float(), ks.transpose(-1, -2)).mul_(scale)  # [B, Hs, Tq, S]
    ok = _column_visibility(cols, Tq, Tk, mask, sliding_window) & valid.unsqueeze(2)
    lse_h = lse if lse.shape[1] == heads.numel() else lse[:, heads]
    p = torch.where(ok, torch.exp(s - lse_h.unsqueeze(-1)), 0.0)
    P = p.sum(-1)  # P_S per row [B, Hs, Tq]
    o_s = torch.matmul(p, vs)  # [B, Hs, Tq, Dv]
    rest_exists = _visible_keys(Tq, Tk, mask, sliding_window, q.device) > ok.sum(-1)
    rescale = (P > 0) & rest_exists
    rest = 1.0 - P
    ill = rescale & ((1.0 - beta * P) > C_MAX * rest)
    o = out[:, heads].float()
    c = ((1.0 - beta * P) / torch.where(rescale & ~ill, rest, 1.0)).unsqueeze(-1)
    new = torch.where((rescale & ~ill).unsqueeze(-1), beta * o_s + c * (o - o_s), o)
    if bool(ill.any()):
        b_i, j_i, r_i = ill.nonzero(as_tuple=True)
        rows, moved = _exact_rows(
            q, k, v, scale, heads, cols, valid, beta, mask, sliding_window, b_i, j_i, r_i
        )
        new[b_i, j_i, r_i] = torch.where(moved.unsqueeze(-1), rows, o[b_i, j_i, r_i])
        rescale[b_i, j_i, r_i] = moved  # non-sink mass that underflows to 0: nothing to move it to
    result = out.clone()
    result[:, heads] = new.to(out.dtype)
    return result, rescale.sum()


def gather_sinks(k, v, *, heads, cols, scale: float, n_heads: int):
    """The sink keys and values of the calibrated query heads `heads` (of n_heads; GQA mapped), gathered
    once at prefill for `act_decode_from_lse`, laid out for its batched products: (keys * scale transposed
    [B * Hs, D, S], values with a column of ones appended [B * Hs, S, Dv + 1], so that one product gives
    o_S and P_S together), fp32."""
    B, Hs, S = cols.shape
    bi = torch.arange(B, device=k.device).view(-1, 1, 1)
    kvh = (heads // (n_heads // k.shape[1])).view(1, -1, 1)
    ks = k[bi, kvh, cols].float().mul_(scale).reshape(B * Hs, S, k.shape[-1]).transpose(1, 2).contiguous()
    vs = v[bi, kvh, cols].float().reshape(B * Hs, S, v.shape[-1])
    return ks, torch.cat([vs, vs.new_ones(B * Hs, S, 1)], -1)


def act_decode_from_lse(
    q, out, lse_h, *, heads, ks, vs, valid, beta: float, n_keys: int, cols, k, v, scale: float, mask=None,
    offset: int = 0, head: int | None = None, all_valid: bool = False,
):
    """ACT on a few query rows at the end of the cache (decode) with the sink keys/values `gather_sinks`
    gathered at prefill: the same result as act_from_lse in about 20 tensor operations on 3-D batched
    products, since inside a real CPU decode step each operation costs ~10 us whatever its size.

    lse_h [B, Hs, Tq] (attention_head_lse); cols Long[B, Hs, S] the sink columns, counted from `offset`
    (the cache's key 0 is column `offset`: a sliding cache dropped the keys before it; valid must be False
    for the sinks it dropped), valid Bool[B, Hs, S]; mask: Bool[B or 1, 1, Tq, Tk] (steer's, holding
    padding and window) or None = every row sees all n_keys keys. k, v: for the exact recompute of rows
    with c > C_MAX. head (heads == [head], a Python int) and all_valid (every sink valid) let a batch-1
    CPU row take `_decode_one_row` (6 operations after the views instead of ~20)."""
    B, Hs, S = valid.shape
    Tq, D, Dv = q.shape[2], q.shape[3], out.shape[3]
    if (head is not None and all_valid and B == 1 and Hs == 1 and Tq == 1 and mask is None and S < n_keys
            and q.device.type == "cpu" and q.dtype == out.dtype == torch.float32):
        done = _decode_one_row(q, out, lse_h, head, ks, vs, beta)
        if done is not None:
            return done
    here = (lambda: (cols - offset).clamp_min(0)) if offset else (lambda: cols)  # columns in this cache
    rest_exists = None  # rows that see a key beyond their sinks (None: all of them)
    if mask is None:
        ok = valid.view(B * Hs, 1, S)
        if S >= n_keys:
            rest_exists = (valid.sum(-1) < n_keys).view(B * Hs, 1, 1)
    else:
        m = mask[:, 0].unsqueeze(1).expand(B, Hs, Tq, mask.shape[-1])
        ok = torch.gather(m, 3, here().unsqueeze(2).expand(B, Hs, Tq, S)) & valid.unsqueeze(2)
        rest_exists = (ok.sum(-1) < mask[:, 0].sum(-1).unsqueeze(1)).view(B * Hs, Tq, 1)
        ok = ok.view(B * Hs, Tq, S)
    qh = q.index_select(1, heads).reshape(B * Hs, Tq, D)
    qh = qh if qh.dtype == torch.float32 else qh.float()
    p = torch.baddbmm(lse_h.reshape(B * Hs, Tq, 1), qh, ks, beta=-1).exp_().mul_(ok)  # p_s = exp(q.k_s scale - lse)
    r = torch.bmm(p, vs)  # [B * Hs, Tq, Dv + 1]: o_S and P_S
    if r.device.type == "cpu" and B * Hs * Tq <= HOST_ROWS:
        def exact(b_i, j_i, r_i):
            return _exact_rows(q, k, v, scale, heads, here(), valid, beta, mask, None, b_i, j_i, r_i)

        return _decode_rows_host(out, heads, r, rest_exists, beta, (B, Hs, Tq), exact)
    o_s, P = r[..., :Dv], r[..., Dv:]
    num, den = torch.rsub(P, 1.0, alpha=beta), torch.rsub(P, 1.0)  # 1 - beta P_S, 1 - P_S
    o = out.index_select(1, heads).reshape(B * Hs, Tq, Dv)
    o = o if o.dtype == torch.float32 else o.float()
    # o' = c (o - o_S) + beta o_S; rows without sink mass get c = 1, o_S = 0, i.e. o' = o exactly
    new = o.sub(o_s).mul_(num / den).add_(o_s, alpha=beta)
    rescale = P > 0
    if rest_exists is not None:  # rows that see only sinks keep o
        rescale = rescale & rest_exists
        new = torch.where(rescale, new, o)
    ill = rescale & ((num > C_MAX * den) | (den <= 0))  # c > C_MAX, or P_S >= 1 (lse rounding) where c <= 0
    new, rescale = new.view(B, Hs, Tq, Dv), rescale.view(B, Hs, Tq)
    if bool(ill.any()):
        b_i, j_i, r_i = ill.view(B, Hs, Tq).nonzero(as_tuple=True)
        rows, moved = _exact_rows(q, k, v, scale, heads, here(), valid, beta, mask, None, b_i, j_i, r_i)
        o = o.view(B, Hs, Tq, Dv)
        new[b_i, j_i, r_i] = torch.where(moved.unsqueeze(-1), rows, o[b_i, j_i, r_i])
        rescale[b_i, j_i, r_i] = moved
    return out.index_copy(1, heads, new.to(out.dtype)), rescale.sum()


def _host_factor(p_s: float, beta: float) -> float | None:
    """ACT's c = (1 - beta P_S) / (1 - P_S) for a row decided on the host (P_S > 0 a Python float); None when
    c > C_MAX or P_S >= 1 (lse rounding): the row is recomputed exactly instead."""
    num, den = 1.0 - beta * p_s, 1.0 - p_s
    return None if num > C_MAX * den or den <= 0 else num / den


def _decode_one_row(q, out, lse_h, head: int, ks, vs, beta: float):
    """act_decode_from_lse for one fp32 CPU row of one head (batch 1), where a real decode step runs it
    between the model's large matmuls and each small operation costs ~10 us: the sink probabilities from
    one addmm and exp, P_S as a Python float, then o' = beta o_S + c (o - o_S) = c o + (beta - c) (p @ V_S)
    as one in-place addmm on a copy of out. Every sink is valid and the row sees a key beyond them (the
    caller checks both). None when c > C_MAX or P_S >= 1 (the caller's general path recomputes the row exactly)."""
    Dv = out.shape[3]
    p = torch.addmm(lse_h.view(1, 1), q[0, head], ks[0], beta=-1).exp_()  # [1, S]: exp(q.k_s scale - lse)
    p_s = p.sum().item()
    if not p_s > 0:  # the sink probabilities underflow to 0: o stays
        return out, 0
    c = _host_factor(p_s, beta)
    if c is None:
        return None
    new = out.clone()
    new[0, head].addmm_(p, vs[0, :, :Dv], beta=c, alpha=beta - c)  # in place on the copy (autograd-safe)
    return new, 1


def _decode_rows_host(out, heads, r, rest_exists, beta: float, shape, exact):
    """act_decode_from_lse's last steps for a few rows on CPU, with P_S, c and the row tests as Python
    floats: a batch-1 step with one calibrated head per layer then costs 4 tensor operations after the
    products, not ~15 (each ~10 us inside a real step). Same rules; c in fp64 instead of fp32.
    r [B * Hs, Tq, Dv + 1] (o_S and P_S); exact(b_i, j_i, r_i) recomputes rows (_exact_rows)."""
    B, Hs, Tq = shape
    Dv = r.shape[-1] - 1
    P = r[..., Dv].reshape(-1).tolist()
    rest = [True] * len(P) if rest_exists is None else rest_exists.expand(B * Hs, Tq, 1).reshape(-1).tolist()
    cs, keep, ill = [], [], []
    for i, (p_s, has_rest) in enumerate(zip(P, rest, strict=True)):
        if not (p_s > 0 and has_rest):  # no sink mass, or nothing but sinks to move it to: o stays
            keep.append(i)
        elif (c := _host_factor(p_s, beta)) is None:
            ill.append(i)
        else:
            cs.append((i, c))
    if not cs and not ill:
        return out, 0
    o = out.index_select(1, heads).reshape(B * Hs, Tq, Dv)
    o = o if o.dtype == torch.float32 else o.float()
    o_s = r[..., :Dv]
    if len(cs) == len(P):
        c = cs[0][1] if len(P) == 1 else torch.tensor([c for _, c in cs], dtype=torch.float32).view(B * Hs, Tq, 1)
        new = o.sub(o_s).mul_(c).add_(o_s, alpha=beta)
    else:  # some rows keep o or are recomputed: the formula on the others only
        new = o.clone()
        idx = torch.tensor([i for i, _ in cs], dtype=torch.long)
        c = torch.tensor([c for _, c in cs], dtype=torch.float32).view(-1, 1)
        fo, fs = o.reshape(-1, Dv)[idx], o_s.reshape(-1, Dv)[idx]
        new.view(-1, Dv)[idx] = fo.sub(fs).mul_(c).add_(fs, alpha=beta)
    touched = len(cs)
    if ill:
        i = torch.tensor(ill, dtype=torch.long)
        b_i, j_i, r_i = i // (Hs * Tq), (i // Tq) % Hs, i % Tq
        rows, moved = exact(b_i, j_i, r_i)
        flat = new.view(-1, Dv)
        flat[i] = torch.where(moved.unsqueeze(-1), rows, o.reshape(-1, Dv)[i])
        touched += int(moved.sum())
    return out.index_copy(1, heads, new.view(B, Hs, Tq, Dv).to(out.dtype)), touched


def _exact_rows(q, k, v, scale, heads, cols, valid, beta, mask, sliding_window, b_i, j_i, r_i):
    """(calibrated output [n, Dv], rescaled Bool[n]) of the listed (batch, calibrated head, query row)
    rows, from their full score rows; rows whose non-sink mass underflows to 0 are not rescaled."""
    B, H, Tq, _ = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    sinks = torch.zeros(B, heads.numel(), Tk, dtype=torch.int32, device=q.device)
    sinks.scatter_add_(2, cols, valid.int())
    sinks = sinks > 0
    outs, moved = [], []
    for c0 in range(0, b_i.numel(), EXACT_ROW_CHUNK):
        b, j, r = (
            b_i[c0 : c0 + EXACT_ROW_CHUNK],
            j_i[c0 : c0 + EXACT_ROW_CHUNK],
            r_i[c0 : c0 + EXACT_ROW_CHUNK],
        )
        h = heads[j]
        kv = h // (H // Hkv)
        qr = q[b, h, r].float()  # [n, D]
        s = torch.einsum("nd,ntd->nt", qr, k[b, kv].float()) * scale  # [n, Tk]
        pos = (r + (Tk - Tq)).unsqueeze(1)
        col = torch.arange(Tk, device=q.device).unsqueeze(0)
        vis = mask[b if mask.shape[0] > 1 else torch.zeros_like(b), 0, r] if mask is not None else col <= pos
        if sliding_window is not None:
            vis = vis & ((pos - col) < sliding_window)
        p = torch.softmax(s.masked_fill(~vis, float("-inf")), -1)
        sk = sinks[b, j]
        p_s = torch.where(sk, p, 0.0).sum(-1, keepdim=True)
        p_r = torch.where(sk, 0.0, p).sum(-1, keepdim=True)
        share = p / torch.where(p_r > 0, p_r, 1.0)  # <= 1 for the non-sink keys: no overflow when p_r is tiny
        p2 = torch.where(sk, beta * p, share * (p_r + (1 - beta) * p_s))
        outs.append(torch.einsum("nt,ntd->nd", p2, v[b, kv].float()))
        moved.append((p_r[:, 0] > 0) & (p_s[:, 0] > 0))
    return torch.cat(outs, 0), torch.cat(moved, 0)


# ----------------------------------------------------------------------------------------------
# sink statistics from lse
# ----------------------------------------------------------------------------------------------


def _select_heads(q, k, lse, heads):
    """Restrict to the query heads `heads` (their kv heads copied: O(Tk d) per head)."""
    if heads is None:
        return q, k, lse
    H, Hkv = q.shape[1], k.shape[1]
    return q[:, heads], k[:, heads // (H // Hkv)], lse[:, heads]


def _key_range(r0: int, r1: int, Tq: int, Tk: int, mask, sliding_window) -> tuple[int, int]:
    """Key columns [lo, hi) that query rows r0..r1-1 may see (a superset)."""
    off = Tk - Tq
    if mask is not None:
        any_col = mask[:, 0, r0:r1].any(0).any(0).nonzero()
        if any_col.numel() == 0:
            return 0, 0
        lo, hi = int(any_col[0]), int(any_col[-1]) + 1
    else:
        lo, hi = 0, min(Tk, r1 + off)
    if sliding_window is not None:
        lo = max(lo, r0 + off - sliding_window + 1)
    return lo, hi


def _prob_block(qg, kf, lse_g, rows, lo, hi, Tq, Tk, scale, mask, sliding_window):
    """fp32 [B, Hkv, rep, n, hi - lo]: probabilities of `rows` (a slice or Long index) on keys lo..hi-1."""
    B, Hkv, rep, _, D = qg.shape
    qb = qg[:, :, :, rows]
    n = qb.shape[3]
    # scale * q k^T - lse in one batched GEMM (the bias is broadcast into the output first)
    bias = lse_g[:, :, :, rows].reshape(B * Hkv, rep * n, 1).neg().expand(B * Hkv, rep * n, hi - lo)
    s = torch.baddbmm(
        bias, qb.reshape(B * Hkv, rep * n, D), kf[:, :, lo:hi].reshape(B * Hkv, hi - lo, D).transpose(-1, -2),
        alpha=scale,
    ).view(B, Hkv, rep, n, hi - lo)
    s.clamp_min_(EXP_FLOOR)
    if isinstance(rows, slice) and mask is None and sliding_window is None:
        # plain causal: the block's keys end at its last row's position, and only the square of its
        # last n keys holds hidden (future) keys: zero that square's upper triangle after exp (tril_
        # assigns, so a future score that overflowed to inf leaves no trace)
        if hi - lo >= n and hi == rows.stop + (Tk - Tq):
            s.exp_()
            s[..., hi - lo - n :].tril_()
            return s
    if isinstance(rows, slice) and mask is None:  # causal + window: the block's key range only, O(n (hi - lo))
        pos = torch.arange(rows.start + Tk - Tq, rows.stop + Tk - Tq, device=qg.device).view(-1, 1)
        col = torch.arange(lo, hi, device=qg.device).view(1, -1)
        vis = (col <= pos) if sliding_window is None else (col <= pos) & ((pos - col) < sliding_window)
        s.masked_fill_(~vis.view(1, 1, 1, n, hi - lo), float("-inf"))
        return s.exp_()
    if isinstance(rows, slice):
        vis = visibility(Tq, Tk, mask, sliding_window, rows=rows, device=qg.device)
    else:
        pos = (rows + (Tk - Tq)).view(-1, 1)
        col = torch.arange(Tk, device=qg.device).view(1, -1)
        vis = mask[:, :, rows] if mask is not None else (col <= pos).view(1, 1, -1, Tk)
        if sliding_window is not None:
            vis = vis & ((pos - col) < sliding_window)
    vis = vis[..., lo:hi]
    s.masked_fill_(~vis.unsqueeze(2), float("-inf"))
    return s.exp_()



def _grouped(q, k, lse):
    B, H, Tq, D = q.shape
    Hkv = k.shape[1]
    rep = H // Hkv
    return q.float().view(B, Hkv, rep, Tq, D), k.float(), lse.view(B, Hkv, rep, Tq)


def sink_stats_lse(q, k, lse, *, scale: float, mask=None, sliding_window=None, heads=None):
    """Exact (col_sum [B, Hs, Tk] fp32, n_obs [B, 1, Tk] int64) from the rows' lse: every key column.

    Equal to steer.kernels.act.sink_stats_reference; heads (Long) restricts to those query heads
    (None = all). Each query block multiplies only against the keys it may see (causal: half of Tq x Tk)."""
    _check(q, k, None, None, None, mask, sliding_window)
    B, H, Tq, _ = q.shape
    Tk = k.shape[2]
    q, k, lse = _select_heads(q, k, lse, heads)
    qg, kf, lse_g = _grouped(q, k, lse)
    col = torch.zeros(B, *qg.shape[1:3], Tk, dtype=torch.float32, device=q.device)
    span = Tk if mask is not None or sliding_window is None else min(Tk, sliding_window + QUERY_BLOCK)  # keys a block sees
    step = min(QUERY_BLOCK, max(MIN_BLOCK_ROWS, BLOCK_SCORES // (B * q.shape[1] * span)))
    for r0 in range(0, Tq, step):
        r1 = min(Tq, r0 + step)
        lo, hi = _key_range(r0, r1, Tq, Tk, mask, sliding_window)
        if hi <= lo:
            continue
        col[..., lo:hi] += _prob_block(
            qg, kf, lse_g, slice(r0, r1), lo, hi, Tq, Tk, scale, mask, sliding_window
        ).sum(3)
    return col.view(B, -1, Tk), observers(B, Tq, Tk, mask, sliding_window, device=q.device)


def sink_stats_columns(q, k, lse, *, scale: float, cols, mask=None, sliding_window=None, heads=None):
    """Exact (col_sum [B, Hs, C] fp32, n_obs [B, 1, C] int64) for the key columns cols Long[B or 1, C]:
    O(Tq C d) work. Equal to sink_stats_lse's columns `cols`."""
    _check(q, k, None, None, None, mask, sliding_window)
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    if cols.dim() != 2 or cols.shape[0] not in (1, B) or cols.dtype != torch.int64:
        raise ValueError(f"cols must be Long[B or 1, C] key columns, got {cols.dtype} {tuple(cols.shape)}")
    if cols.numel() and (int(cols.min()) < 0 or int(cols.max()) >= Tk):
        raise ValueError(
            f"cols must lie in 0..{Tk - 1} (the key columns), got {int(cols.min())}..{int(cols.max())}"
        )
    q, k, lse = _select_heads(q, k, lse, heads)
    Hs, Hkv = q.shape[1], k.shape[1]
    rep = Hs // Hkv
    cols = cols.expand(B, -1)
    C = cols.shape[1]
    ks = torch.gather(k.float(), 2, cols.view(B, 1, C, 1).expand(B, Hkv, C, D))  # [B, Hkv, C, D]
    s = torch.matmul(q.float().reshape(B, Hkv, rep * Tq, D), ks.transpose(-1, -2)).view(B, Hs, Tq, C)
    s.mul_(scale).sub_(lse.unsqueeze(-1)).clamp_min_(EXP_FLOOR)
    ok = _column_visibility(cols.unsqueeze(1), Tq, Tk, mask, sliding_window)  # [B, 1, Tq, C]
    col = torch.where(ok, s.exp_(), 0.0).sum(2)
    n_obs = torch.gather(observers(B, Tq, Tk, mask, sliding_window, device=q.device), 2, cols.unsqueeze(1))
    return col, n_obs


def sink_stats_sampled(
    q,
    k,
    lse,
    *,
    scale: float,
    n_rows: int,
    mask=None,
    sliding_window=None,
    heads=None,
    generator: torch.Generator | None = None,
):
    """(col_sum estimate [B, Hs, Tk], its standard error [B, Hs, Tk], n_obs [B, 1, Tk]) from `n_rows`
    query rows drawn uniformly without replacement (the same rows for every batch row and head).

    The column sum T_k = sum_i A[i, k] over all Tq rows is estimated by (Tq / m) sum_{sampled i} A[i, k]
    (unbiased under simple random sampling); its variance Tq^2 (1 - m / Tq) S_k^2 / m is estimated
    with the sample variance S_k^2 of A[:, k] over the drawn rows (unbiased too). Divide both by n_obs
    for the score and its standard error. Work O(m Tk d) instead of O(Tq Tk d)."""
    _check(q, k, None, None, None, mask, sliding_window)
    B, H, Tq, _ = q.shape
    Tk = k.shape[2]
    if not 2 <= n_rows <= Tq:
        raise ValueError(
            f"n_rows must be between 2 and the {Tq} query rows (got {n_rows}); with all rows "
            f"use sink_stats_lse, which is exact"
        )
    q, k, lse = _select_heads(q, k, lse, heads)
    qg, kf, lse_g = _grouped(q, k, lse)
    rows = torch.randperm(Tq, generator=generator)[:n_rows].sort().values.to(q.device)
    acc = torch.zeros(B, *qg.shape[1:3], Tk, dtype=torch.float64, device=q.device)
    acc2 = torch.zeros_like(acc)
    for c0 in range(0, n_rows, QUERY_BLOCK):
        p = _prob_block(
            qg, kf, lse_g, rows[c0 : c0 + QUERY_BLOCK], 0, Tk, Tq, Tk, scale, mask, sliding_window
        )
        acc += p.sum(3).double()  # per block in fp32 (p <= 1, <= QUERY_BLOCK terms), across blocks in fp64
        acc2 += p.square_().sum(3).double()
    m = n_rows
    var_rows = ((acc2 - acc.square() / m) / (m - 1)).clamp_min(0)
    est = acc * (Tq / m)
    se = (var_rows * (Tq * Tq * (1 - m / Tq) / m)).sqrt()
    n_obs = observers(B, Tq, Tk, mask, sliding_window, device=q.device)
    return est.float().view(B, -1, Tk), se.float().view(B, -1, Tk), n_obs
