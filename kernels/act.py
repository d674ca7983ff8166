"""ACT calibrated attention and attention-sink statistics, fused, plus exact PyTorch references.

`act_attention(q, k, v, scale=, sink_mask=, head_mask=, beta=)` is attention in which, for the heads
in `head_mask`, the probability of every key in the row's sink set S (`sink_mask`: calibrated sinks,
NOT the kept initial sink) is scaled by beta and the freed mass goes to the other keys in proportion
to their probability (ALGORITHMS.md section 2):
    p'_s = beta p_s (s in S),  p'_j = c p_j otherwise,  c = (1 - beta P_S) / (1 - P_S),
so rows still sum to 1, and the output is o' = beta o_S + c (o - o_S). The Triton path is a flash
kernel with two accumulators (sink keys, other keys) in one pass over the keys: no N x N map, and
the sink accumulator is only updated in key blocks that hold a sink. Rows with P_S == 1 (all mass on
sinks, nothing to redistribute to) are left unchanged; fully masked rows give zeros, never NaN.
`touched` = number of (batch, head, query) rows in calibrated heads whose sink mass was rescaled.

Shapes: q [B, H, Tq, D], k [B, Hkv, Tk, D], v [B, Hkv, Tk, Dv] (GQA: head h reads kv head
h // (H / Hkv)); softmax in fp32. `mask` Bool[B or 1, 1, Tq, Tk], True = may attend; None = causal with
the queries at the last Tq positions (prefill: Tq == Tk; decode: Tq == 1). `sliding_window` w keeps
keys with query_position - key_position < w (positions = column indices, queries at the last Tq).

`sink_stats(q, k, scale=)` gives col_sum [B, H, Tk] (fp32, sum over queries of the probability each
query puts on key k) and n_obs [B, 1, Tk] (int64, number of queries that can see key k); the sink score
is s_k = col_sum / n_obs. Triton: two flash-style passes (row log-sum-exp over key blocks, then column
sums over query blocks); nothing of size Tq x Tk is materialised. The reference processes
`QUERY_BLOCK` query rows at a time: peak extra memory ~ 3 * B * H * QUERY_BLOCK * Tk * 4 bytes.
"""

from __future__ import annotations

import torch

from steer.kernels._triton import backend_for, load

QUERY_BLOCK = 256  # reference: query rows per block in sink_stats_reference


def _check(q, k, v=None, sink_mask=None, head_mask=None, mask=None, sliding_window=None) -> None:
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be [B, H, T, D], got {tuple(q.shape)} and {tuple(k.shape)}")
    B, H, Tq, D = q.shape
    Bk, Hkv, Tk, Dk = k.shape
    if Bk != B or Dk != D:
        raise ValueError(f"k {tuple(k.shape)} does not match q {tuple(q.shape)} in batch or head dim")
    if Hkv < 1 or H % Hkv:
        raise ValueError(f"{H} query heads are not a multiple of {Hkv} kv heads")
    if v is not None and (v.dim() != 4 or v.shape[:3] != k.shape[:3]):
        raise ValueError(f"v must be [B, Hkv, Tk, Dv] matching k {tuple(k.shape)}, got {tuple(v.shape)}")
    if mask is None and Tq > Tk:
        raise ValueError(f"causal attention with {Tq} queries but only {Tk} keys; pass an explicit mask")
    if mask is not None:
        if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2:] != (Tq, Tk) \
                or mask.shape[0] not in (1, B):
            raise ValueError(f"mask must be Bool[B or 1, 1, {Tq}, {Tk}] (True = may attend), got "
                             f"{mask.dtype} {tuple(mask.shape)}")
    if sink_mask is not None:
        if sink_mask.dtype != torch.bool or sink_mask.dim() != 3 or sink_mask.shape[1:] != (H, Tk) \
                or sink_mask.shape[0] not in (1, B):
            raise ValueError(f"sink_mask must be Bool[B or 1, {H}, {Tk}], got {sink_mask.dtype} {tuple(sink_mask.shape)}")
    if head_mask is not None and (head_mask.dtype != torch.bool or head_mask.shape != (H,)):
        raise ValueError(f"head_mask must be Bool[{H}], got {head_mask.dtype} {tuple(head_mask.shape)}")
    for name, t in (("k", k), ("v", v), ("sink_mask", sink_mask), ("head_mask", head_mask), ("mask", mask)):
        if t is not None and t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q on {q.device}; move it once with .to(q.device)")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1 or None, got {sliding_window}")


def visibility(Tq: int, Tk: int, mask=None, sliding_window=None, rows: slice | None = None, device=None):
    """Bool[B or 1, 1, rows, Tk]: which keys each query may attend to (mask & causal/window rules)."""
    r0, r1 = (rows.start, rows.stop) if rows is not None else (0, Tq)
    dev = mask.device if mask is not None else device
    pos = torch.arange(r0, r1, device=dev)[:, None] + (Tk - Tq)
    col = torch.arange(Tk, device=dev)[None, :]
    vis = mask[:, :, r0:r1] if mask is not None else (col <= pos)[None, None]
    if sliding_window is not None:
        vis = vis & ((pos - col) < sliding_window)[None, None]
    return vis


def _kv_heads(x: torch.Tensor, H: int) -> torch.Tensor:
    return x.repeat_interleave(H // x.shape[1], dim=1) if x.shape[1] != H else x


# ----------------------------------------------------------------------------------------------
# ACT attention
# ----------------------------------------------------------------------------------------------


def act_attention(q, k, v, *, scale: float, sink_mask, head_mask, beta: float, mask=None, sliding_window=None,
                  backend: str | None = None):
    """(out [B, H, Tq, Dv] in q's dtype, touched int64 0-dim). See the module docstring."""
    _check(q, k, v, sink_mask, head_mask, mask, sliding_window)
    if backend_for(q, backend) == "triton":
        return load("_act_triton").act_attention_triton(
            q, k, v, scale=scale, sink_mask=sink_mask, head_mask=head_mask, beta=beta, mask=mask,
            sliding_window=sliding_window)
    return act_attention_reference(q, k, v, scale=scale, sink_mask=sink_mask, head_mask=head_mask, beta=beta,
                                   mask=mask, sliding_window=sliding_window)


def act_probs_reference(q, k, *, scale, sink_mask, head_mask, beta, mask=None, sliding_window=None):
    """(calibrated probabilities [B, H, Tq, Tk] fp32, touched): materialises the map, for tests and small inputs."""
    _check(q, k, None, sink_mask, head_mask, mask, sliding_window)
    B, H, Tq, _ = q.shape
    Tk = k.shape[2]
    s = torch.matmul(q.float(), _kv_heads(k, H).float().transpose(-1, -2)) * scale
    vis = visibility(Tq, Tk, mask, sliding_window, device=q.device)
    s = s.masked_fill(~vis, float("-inf"))
    row_ok = vis.any(dim=-1, keepdim=True)
    p = torch.where(row_ok, torch.softmax(s, dim=-1), torch.zeros((), device=q.device))
    sinks = (sink_mask & head_mask[None, :, None])[:, :, None, :]  # [B or 1, H, 1, Tk]
    p_s = torch.where(sinks, p, 0.0).sum(-1, keepdim=True)
    p_r = torch.where(sinks, 0.0, p).sum(-1, keepdim=True)
    rescale = head_mask[None, :, None, None] & (p_s > 0) & (p_r > 0) & row_ok
    c = torch.where(rescale, (p_r + (1 - beta) * p_s) / torch.where(rescale, p_r, 1.0), 1.0)
    p2 = torch.where(rescale, torch.where(sinks, beta * p, c * p), p)
    return p2, rescale.sum()


def act_attention_reference(q, k, v, *, scale, sink_mask, head_mask, beta, mask=None, sliding_window=None):
    """PyTorch reference of `act_attention` (also the CPU path); fp32 throughout, cast on return."""
    p, touched = act_probs_reference(q, k, scale=scale, sink_mask=sink_mask, head_mask=head_mask, beta=beta,
                                     mask=mask, sliding_window=sliding_window)
    out = torch.matmul(p, _kv_heads(v, q.shape[1]).float())
    return out.to(q.dtype), touched


# ----------------------------------------------------------------------------------------------
# Sink statistics
# ----------------------------------------------------------------------------------------------


def n_observers(B: int, Tq: int, Tk: int, mask=None, sliding_window=None, device=None) -> torch.Tensor:
    """Int64[B, 1, Tk]: how many queries can see each key (closed form when causal: no Tq x Tk tensor)."""
    if mask is not None:
        return visibility(Tq, Tk, mask, sliding_window).sum(dim=2, dtype=torch.int64).expand(B, 1, Tk)
    j = torch.arange(Tk, device=device)
    lo = (j - (Tk - Tq)).clamp(min=0)
    hi = torch.full_like(j, Tq) if sliding_window is None else (j + sliding_window - (Tk - Tq)).clamp(max=Tq)
    return (hi - lo).clamp(min=0).to(torch.int64).expand(B, 1, Tk)


def sink_stats(q, k, *, scale: float, mask=None, sliding_window=None, backend: str | None = None):
    """(col_sum [B, H, Tk] fp32, n_obs [B, 1, Tk] int64); sink score s_k = col_sum / n_obs."""
    _check(q, k, None, None, None, mask, sliding_window)
    if backend_for(q, backend) == "triton":
        return load("_act_triton").sink_stats_triton(q, k, scale=scale, mask=mask, sliding_window=sliding_window)
    return sink_stats_reference(q, k, scale=scale, mask=mask, sliding_window=sliding_window)


def sink_stats_reference(q, k, *, scale, mask=None, sliding_window=None):
    """PyTorch reference of `sink_stats`, QUERY_BLOCK query rows at a time."""
    _check(q, k, None, None, None, mask, sliding_window)
    B, H, Tq, _ = q.shape
    Tk = k.shape[2]
    kf = _kv_heads(k, H).float()
    col = torch.zeros(B, H, Tk, dtype=torch.float32, device=q.device)
    for r0 in range(0, Tq, QUERY_BLOCK):
        rows = slice(r0, min(Tq, r0 + QUERY_BLOCK))
        s = torch.matmul(q[:, :, rows].float(), kf.transpose(-1, -2)) * scale
        vis = visibility(Tq, Tk, mask, sliding_window, rows=rows, device=q.device)
        s = s.masked_fill(~vis, float("-inf"))
        p = torch.where(vis.any(dim=-1, keepdim=True), torch.softmax(s, dim=-1), torch.zeros((), device=q.device))
        col += p.sum(dim=2)
    return col, n_observers(B, Tq, Tk, mask, sliding_window, device=q.device)
