"""Triton kernel of `steer.kernels.router.route` (see that module for the semantics).

One program per block of BT tokens; the [BT, groups, group size] logits tile stays in registers:
scores, group choice, k argmax passes for the unedited and the edited routing, weights, the
touched comparison, one atomic add per program. Memory-bound on reading the logits once.
Fixed launch config (no autotune): BT = 512 // padded experts (clamped to 1..64), 4 warps; chosen from
ptxas register counts (tests/test_kernels_compile.py) and the sweep in experiments/bench_kernels.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from steer.kernels._triton import empty, interpreting

INTERPRETED = interpreting()
_KIND = {"softmax_topk": 0, "topk_softmax": 1, "sigmoid_group": 2}
_TILE = 512  # logits per program (4 per thread): no register spills on sm_90 up to E=256, k=8 with all edits
NUM_WARPS = 4


@triton.jit
def _max3(x):
    return tl.max(tl.max(x, axis=2), axis=1)


@triton.jit
def _min3(x):
    return tl.min(tl.min(x, axis=2), axis=1)


@triton.jit
def _sum3(x):
    return tl.sum(tl.sum(x, axis=2), axis=1)


@triton.jit
def _group_filter(choice, elig, j3, gvalid, TOPK_GROUP: tl.constexpr, BT: tl.constexpr, GP: tl.constexpr):
    """Keep the TOPK_GROUP groups with the best top-2 choice sums (DeepSeek-V3); masked experts absent."""
    NEG: tl.constexpr = float("-inf")
    BIG: tl.constexpr = 1 << 30
    cm = tl.where(elig, choice, NEG)
    m1 = tl.max(cm, axis=2)
    i1 = tl.min(tl.where(elig & (cm == m1[:, :, None]), j3, BIG), axis=2)
    m2 = tl.max(tl.where(j3 == i1[:, :, None], NEG, cm), axis=2)
    gs = tl.where(m2 == NEG, m1, m1 + m2)
    g2 = tl.arange(0, GP)[None, :]
    gsel = tl.zeros([BT, GP], dtype=tl.int1)
    for _s in tl.static_range(TOPK_GROUP):
        free = gvalid & (gsel == 0)
        ck = tl.where(free, gs, NEG)
        m = tl.max(ck, axis=1)
        pick = tl.min(tl.where(free & (ck == m[:, None]), g2, BIG), axis=1)
        gsel = gsel | (g2 == pick[:, None])
    return elig & gsel[:, :, None]


@triton.jit
def _select(key, avail, eid3, score, n_take, K: tl.constexpr, KP: tl.constexpr, BT: tl.constexpr):
    """n_take argmax passes over `key` among `avail` (ties to the lower id): taken mask, ids, scores."""
    NEG: tl.constexpr = float("-inf")
    BIG: tl.constexpr = 1 << 30
    slot = tl.arange(0, KP)[None, :]
    taken = avail & (eid3 < 0)
    idx = tl.zeros([BT, KP], dtype=tl.int32)
    val = tl.zeros([BT, KP], dtype=tl.float32)
    for s in tl.static_range(K):
        free = avail & (taken == 0)
        ck = tl.where(free, key, NEG)
        m = _max3(ck)
        pick = _min3(tl.where(free & (ck == m[:, None, None]), eid3, BIG))
        onehot = free & (eid3 == pick[:, None, None]) & (s < n_take)  # free: padded lanes alias ids
        taken = taken | onehot
        v = _sum3(tl.where(onehot, score, 0.0))
        pick = tl.where(pick == BIG, 0, pick)  # rows past T: never an out-of-range id, even unstored
        idx = tl.where(slot == s, pick[:, None], idx)
        val = tl.where(slot == s, v[:, None], val)
    return taken, idx, val


@triton.jit
def _weights(val, idx, force_ptr, zero_ptr, RSF, KIND: tl.constexpr, K: tl.constexpr, KP: tl.constexpr,
             NORM: tl.constexpr, FORCE_MAX: tl.constexpr, HAS_ZERO: tl.constexpr, RENORM: tl.constexpr):
    """The family's weighting of the selected scores, then off/zero (with optional renormalisation)."""
    NEG: tl.constexpr = float("-inf")
    sv = tl.arange(0, KP)[None, :] < K
    if FORCE_MAX:
        forced = tl.load(force_ptr + idx, mask=sv, other=0) != 0
        others = tl.max(tl.where(sv & (forced == 0), val, NEG), axis=1)
        val = tl.where(forced & (others[:, None] > NEG), others[:, None], val)
    if KIND == 0:
        w = val
        if NORM:
            w = tl.math.div_rn(w, tl.sum(tl.where(sv, w, 0.0), axis=1)[:, None])
    elif KIND == 1:
        vm = tl.where(sv, val, NEG)
        e = tl.exp(vm - tl.max(vm, axis=1)[:, None])
        w = tl.math.div_rn(e, tl.sum(e, axis=1)[:, None])
    else:
        w = val
        if NORM:
            w = tl.math.div_rn(w, tl.sum(tl.where(sv, w, 0.0), axis=1)[:, None] + 1e-20)
        w = w * RSF
    w = tl.where(sv, w, 0.0)
    if HAS_ZERO:
        z = (tl.load(zero_ptr + idx, mask=sv, other=0) != 0) & sv
        anyz = tl.max(z.to(tl.int32), axis=1) > 0
        w0 = tl.where(z, 0.0, w)
        if RENORM:
            before = tl.sum(w, axis=1)
            after = tl.sum(w0, axis=1)
            factor = tl.math.div_rn(before, tl.where(after > 0, after, 1.0))  # no 0/0 in dead lanes
            w0 = tl.where(after[:, None] > 0, w0 * factor[:, None], 0.0)
        w = tl.where(anyz[:, None], w0, w)
    return w


@triton.jit
def _router_kernel(
    logits_ptr, stride_t, bias_ptr, mask_ptr, zero_ptr, force_ptr, tok_ptr,
    w_ptr, idx_ptr, touched_ptr,
    T, G, S, NF, RSF,
    KIND: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, NORM: tl.constexpr, TOPK_GROUP: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_EDIT: tl.constexpr, HAS_MASK: tl.constexpr, HAS_ZERO: tl.constexpr,
    RENORM: tl.constexpr, HAS_FORCE: tl.constexpr, FORCE_MAX: tl.constexpr, HAS_TOK: tl.constexpr,
    BT: tl.constexpr, GP: tl.constexpr, SP: tl.constexpr,
):
    NEG: tl.constexpr = float("-inf")
    pid = tl.program_id(0)
    rows = pid * BT + tl.arange(0, BT)
    rvalid = rows < T
    g = tl.arange(0, GP)
    j = tl.arange(0, SP)
    gvalid = (g < G)[None, :]
    j3 = j[None, None, :]
    eid3 = g[None, :, None] * S + j3
    ev3 = (g[None, :, None] < G) & (j3 < S)
    m3 = rvalid[:, None, None] & ev3
    x = tl.load(logits_ptr + rows[:, None, None].to(tl.int64) * stride_t + eid3, mask=m3, other=0.0).to(tl.float32)
    if KIND == 0:
        xm = tl.where(ev3, x, NEG)
        mx = _max3(xm)
        mx = tl.where(mx == NEG, 0.0, mx)
        ex = tl.exp(xm - mx[:, None, None])
        score = tl.math.div_rn(ex, _sum3(ex)[:, None, None])
        choice = score
    elif KIND == 1:
        score = x
        choice = x
    else:
        score = tl.sigmoid(x)
        if HAS_BIAS:
            choice = score + tl.load(bias_ptr + eid3, mask=ev3, other=0.0).to(tl.float32)
        else:
            choice = score
    choice = tl.where(choice == choice, choice, NEG)  # NaN never wins a slot
    score1 = score  # the edited routing's scores: off_mask drops a logit from the softmax (logit-level mask)
    choice1 = choice
    if HAS_EDIT:
        if HAS_MASK:
            masked3 = tl.load(mask_ptr + eid3, mask=ev3, other=0) != 0
            if KIND == 0 and not NORM:  # with NORM the top-k renormalisation cancels the denominator
                xm1 = tl.where(ev3 & (masked3 == 0), x, NEG)
                mx1 = _max3(xm1)
                mx1 = tl.where(mx1 == NEG, 0.0, mx1)
                ex1 = tl.exp(xm1 - mx1[:, None, None])
                score1 = tl.math.div_rn(ex1, _sum3(ex1)[:, None, None])
                choice1 = tl.where(score1 == score1, score1, NEG)

    # unedited routing
    elig0 = ev3 & rvalid[:, None, None]
    if KIND == 2:
        elig0 = _group_filter(choice, elig0, j3, gvalid, TOPK_GROUP, BT, GP)
    _t0, idx0, val0 = _select(choice, elig0, eid3, score, K, K, KP, BT)
    w0 = _weights(val0, idx0, force_ptr, zero_ptr, RSF, KIND, K, KP, NORM, False, False, False)
    sv = tl.arange(0, KP)[None, :] < K
    out_mask = rvalid[:, None] & sv
    wty = w_ptr.dtype.element_ty
    if HAS_EDIT:
        elig1 = ev3 & rvalid[:, None, None]
        if HAS_MASK:
            elig1 = elig1 & (masked3 == 0)
        if KIND == 2:
            elig1 = _group_filter(choice1, elig1, j3, gvalid, TOPK_GROUP, BT, GP)
        if HAS_FORCE:
            forced3 = (tl.load(force_ptr + eid3, mask=ev3, other=0) != 0) & m3
            taken, idx1, val1 = _select(choice1, elig1 & (forced3 == 0), eid3, score1, K - NF, K, KP, BT)
            order_key = tl.maximum(choice1, -3.4028234663852886e38)
            _t1, idx1, val1 = _select(order_key, taken | forced3, eid3, score1, K, K, KP, BT)
        else:
            _t1, idx1, val1 = _select(choice1, elig1, eid3, score1, K, K, KP, BT)
        w1 = _weights(val1, idx1, force_ptr, zero_ptr, RSF, KIND, K, KP, NORM, FORCE_MAX, HAS_ZERO, RENORM)
        # touched: the selected set or the emitted (rounded) weights differ
        w0c = w0.to(wty).to(tl.float32)
        w1c = w1.to(wty).to(tl.float32)
        match = (idx1[:, :, None] == idx0[:, None, :]) & sv[:, :, None] & sv[:, None, :]
        w0m = tl.sum(tl.where(match, w0c[:, None, :], 0.0), axis=2)
        found = tl.max(match.to(tl.int32), axis=2) > 0
        diff = sv & ((found == 0) | (w1c != w0m))
        touched = (tl.max(diff.to(tl.int32), axis=1) > 0) & rvalid
        if HAS_TOK:
            touched = touched & (tl.load(tok_ptr + rows, mask=rvalid, other=0) != 0)
        idx_out = tl.where(touched[:, None], idx1, idx0)
        w_out = tl.where(touched[:, None], w1, w0)
        tl.atomic_add(touched_ptr, tl.sum(touched.to(tl.int64), axis=0))
    else:
        idx_out = idx0
        w_out = w0
    offs = rows[:, None].to(tl.int64) * K + tl.arange(0, KP)[None, :]
    tl.store(w_ptr + offs, w_out.to(wty), mask=out_mask)
    tl.store(idx_ptr + offs, idx_out.to(tl.int64), mask=out_mask)


def _i8(m: torch.Tensor | None, dummy: torch.Tensor) -> torch.Tensor:
    return m.view(torch.int8) if m is not None else dummy


def launch_config(E: int, n_group: int) -> tuple[int, int, int]:
    """(BT, GP, SP): tokens per program and the padded [groups, group size] tile."""
    GP = triton.next_power_of_2(n_group)
    SP = triton.next_power_of_2(E // n_group)
    BT = max(1, min(64, _TILE // (GP * SP)))
    return BT, GP, SP


def route_triton(logits, rule, edit=None, *, bias=None, token_mask=None):
    from steer.kernels.router import RouteResult  # circular at import time

    T, E = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    dev = logits.device
    K = rule.top_k
    KP = max(2, triton.next_power_of_2(K))
    G = rule.n_group if rule.kind == "sigmoid_group" else 1
    S = E // G
    BT, GP, SP = launch_config(E, G)
    out_dtype = rule.weights_dtype or logits.dtype
    weights = empty(T, K, dtype=out_dtype, device=dev)
    indices = empty(T, K, dtype=torch.int64, device=dev)
    touched = torch.zeros((), dtype=torch.int64, device=dev)
    dummy = torch.zeros(1, dtype=torch.int8, device=dev)
    has_edit = edit is not None and not edit.is_noop()
    t = edit.tables(dev) if has_edit else {"off_mask": None, "off_zero": None, "force_on": None}
    tok = token_mask.view(torch.int8) if (token_mask is not None and has_edit) else dummy
    if T == 0:
        return RouteResult(weights, indices, touched)
    grid = (triton.cdiv(T, BT),)
    _router_kernel[grid](
        logits, logits.stride(0), bias if bias is not None else logits, _i8(t["off_mask"], dummy),
        _i8(t["off_zero"], dummy), _i8(t["force_on"], dummy), tok,
        weights, indices, touched,
        T, G, S, edit.n_forced if has_edit else 0, float(rule.routed_scaling_factor),
        KIND=_KIND[rule.kind], K=K, KP=KP, NORM=bool(rule.norm_topk_prob), TOPK_GROUP=rule.topk_group if G > 1 else 1,
        HAS_BIAS=bias is not None, HAS_EDIT=has_edit, HAS_MASK=has_edit and t["off_mask"] is not None,
        HAS_ZERO=has_edit and t["off_zero"] is not None, RENORM=has_edit and edit.renormalize,
        HAS_FORCE=has_edit and t["force_on"] is not None and edit.n_forced > 0,
        FORCE_MAX=has_edit and edit.force_weight == "max" and t["force_on"] is not None and edit.n_forced > 0,
        HAS_TOK=token_mask is not None and has_edit,
        BT=BT, GP=GP, SP=SP, num_warps=NUM_WARPS,
    )
    return RouteResult(weights, indices, touched)
