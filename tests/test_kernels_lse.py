"""steer.kernels.lse: attention with its lse, ACT and sink statistics from lse == the exact references."""

from __future__ import annotations

import math

import pytest
import torch

import steer.kernels.lse as lse_mod
from steer.kernels.act import act_attention_reference, sink_stats_reference, visibility
from steer.kernels.lse import (
    act_decode_from_lse,
    act_from_lse,
    attention_head_lse,
    attention_lse,
    gather_sinks,
    sink_index,
    sink_stats_columns,
    sink_stats_lse,
    sink_stats_sampled,
)

# PyTorch's CPU flash kernel uses a reduced-accuracy vector exp (exp_u20, pytorch#115151) whose error depends on
# the CPU's vector ISA: its lse differed from torch.logsumexp by up to 4.4e-5 (relative 3.8e-5) on a CI machine,
# and within 1e-5 on the dev machines (under 1e-6 on an AVX2 EPYC). Comparisons of the fused kernel against another
# algorithm use this; a wrong mask, window or head mapping is off by orders of magnitude more.
FUSED_TOL = dict(atol=1e-4, rtol=1e-4)


def _inputs(B=2, H=6, Hkv=2, Tq=40, Tk=40, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Tq, D, generator=g)
    k = torch.randn(B, Hkv, Tk, D, generator=g)
    v = torch.randn(B, Hkv, Tk, D, generator=g)
    k[:, :, 0] *= 4  # a strong first-token sink
    k[:, :, 7] *= 3  # and a hidden one
    sinks = torch.rand(B, H, Tk, generator=g) < 0.15
    sinks[..., 0] = False
    sinks[..., 7] = True
    heads = torch.tensor([True, False, True, True, False, True][:H])
    return q, k, v, sinks, heads


def _padded_mask(B, Tq, Tk, pads=(0, 5)):
    """Causal + left padding (row b has pads[b] pad keys), Bool[B, 1, Tq, Tk]."""
    m = visibility(Tq, Tk).expand(B, 1, Tq, Tk).clone()
    for b, n in enumerate(pads[:B]):
        m[b, :, :, :n] = False
    return m


# (Tq, Tk, mask kind, sliding window): prefill, padded prefill, windowed prefill, padded + window, decode
CASES = {
    "prefill": (40, 40, None, None),
    "padded": (40, 40, "pad", None),
    "window": (40, 40, None, 9),
    "padded_window": (40, 40, "pad", 9),
    "decode": (1, 40, None, None),
    "decode_padded": (1, 40, "pad", None),
    "decode_window": (1, 40, None, 9),
    "chunk": (5, 40, None, None),
    "chunk_window": (20, 40, None, 9),
    "long_window": (300, 300, None, 40),  # several WINDOW_BLOCK query blocks, each with its own key range
}


def _case(name, **kw):
    Tq, Tk, kind, window = CASES[name]
    q, k, v, sinks, heads = _inputs(Tq=Tq, Tk=Tk, **kw)
    mask = _padded_mask(q.shape[0], Tq, Tk) if kind == "pad" else None
    if mask is not None and window is not None:  # steer's masks hold the window
        mask = mask & visibility(Tq, Tk, None, window)
        window_arg = None
    else:
        window_arg = window
    return q, k, v, sinks, heads, mask, window_arg


@pytest.mark.parametrize("case", list(CASES))
def test_attention_lse_matches_softmax(case):
    q, k, v, _, _, mask, window = _case(case)
    out, lse = attention_lse(q, k, v, scale=0.3, mask=mask, sliding_window=window)
    vis = visibility(q.shape[2], k.shape[2], mask, window)
    s = (q @ k.repeat_interleave(3, 1).transpose(-1, -2)) * 0.3
    s = s.masked_fill(~vis, float("-inf"))
    ok = vis.any(-1).expand(q.shape[0], q.shape[1], -1)
    ref_lse = torch.logsumexp(s, -1)
    torch.testing.assert_close(lse[ok], ref_lse[ok], **FUSED_TOL)
    ref = torch.nan_to_num(torch.softmax(s, -1)) @ v.repeat_interleave(3, 1)
    torch.testing.assert_close(out, ref, **FUSED_TOL)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("beta", [0.4, 0.0, 1.0])
def test_act_from_lse_equals_reference(case, beta):
    q, k, v, sinks, heads, mask, window = _case(case)
    ref, touched_ref = act_attention_reference(
        q, k, v, scale=0.3, sink_mask=sinks, head_mask=heads, beta=beta, mask=mask, sliding_window=window
    )
    out, lse = attention_lse(q, k, v, scale=0.3, mask=mask, sliding_window=window)
    h, cols, valid = sink_index(sinks, heads)
    got, touched = act_from_lse(
        q,
        k,
        v,
        out,
        lse,
        scale=0.3,
        heads=h,
        cols=cols,
        valid=valid,
        beta=beta,
        mask=mask,
        sliding_window=window,
    )
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)
    assert int(touched) == int(touched_ref) > 0
    assert torch.equal(got[:, ~heads], out[:, ~heads])  # other heads untouched, bit for bit


@pytest.mark.parametrize("block", [7, 16, 256])
@pytest.mark.parametrize("case", ["window", "chunk_window", "long_window"])
def test_window_blocks_equal_the_masked_kernel_and_build_no_whole_input_mask(case, block, monkeypatch):
    """Causal + sliding window without a mask: query blocks with their own key ranges == the fused kernel
    given the whole Tq x Tk mask, and neither a whole-input boolean visibility nor an additive mask is built
    (by attention_lse, the column sums, ACT or the observer counts)."""
    import steer.kernels.lse as lse_mod

    q, k, v, sinks, heads, _, window = _case(case, seed=9)
    Tq, Tk = q.shape[2], k.shape[2]
    full = visibility(Tq, Tk, None, window)
    ref_out, ref_lse = attention_lse(q, k, v, scale=0.3, mask=full.clone())
    col_ref, n_ref = sink_stats_lse(q, k, ref_lse, scale=0.3, mask=full.clone())
    h, cols, valid = sink_index(sinks, heads)
    act_ref, touched_ref = act_from_lse(q, k, v, ref_out, ref_lse, scale=0.3, heads=h, cols=cols, valid=valid,
                                        beta=0.4, mask=full.clone())
    seen = []

    def vis_rows_only(Tq_, Tk_, mask=None, sliding_window=None, rows=None, device=None):
        seen.append(rows)
        assert rows is not None, "a whole-input visibility mask was built"
        return visibility(Tq_, Tk_, mask, sliding_window, rows=rows, device=device)

    monkeypatch.setattr(lse_mod, "WINDOW_BLOCK", block)
    monkeypatch.setattr(lse_mod, "visibility", vis_rows_only)
    monkeypatch.setattr(lse_mod, "_additive", lambda *a: pytest.fail("an additive whole-input mask was built"))
    out, lse = attention_lse(q, k, v, scale=0.3, sliding_window=window)
    torch.testing.assert_close(out, ref_out, **FUSED_TOL)
    torch.testing.assert_close(lse, ref_lse, **FUSED_TOL)
    col, n_obs = sink_stats_lse(q, k, lse, scale=0.3, sliding_window=window)
    torch.testing.assert_close(col, col_ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(n_obs, n_ref)
    got, touched = act_from_lse(q, k, v, out, lse, scale=0.3, heads=h, cols=cols, valid=valid, beta=0.4,
                                sliding_window=window)
    torch.testing.assert_close(got, act_ref, atol=2e-5, rtol=1e-4)
    assert int(touched) == int(touched_ref) > 0


def test_act_rows_almost_all_on_sinks_are_recomputed_exactly():
    """P_S -> 1: c amplifies the fused output's rounding error, so those rows are recomputed from their
    scores. Checked against a float64 evaluation of the calibrated map (the fp32 reference itself loses
    digits there)."""
    q, k, v, sinks, heads = _inputs(Tq=24, Tk=24, seed=3)
    q[..., 0] = 3.0
    k[:, :, 7, 0] = 2.0  # column 7 (a calibrated sink) takes nearly all mass in most rows after it
    out, lse = attention_lse(q, k, v, scale=0.5)
    h, cols, valid = sink_index(sinks, heads)
    got, touched = act_from_lse(q, k, v, out, lse, scale=0.5, heads=h, cols=cols, valid=valid, beta=0.4)
    s = (q.double() @ k.double().repeat_interleave(3, 1).transpose(-1, -2)) * 0.5
    p = torch.softmax(s.masked_fill(~visibility(24, 24), float("-inf")), -1)
    sk = (sinks & heads[None, :, None]).unsqueeze(2)
    p_s, p_r = (p * sk).sum(-1, keepdim=True), (p * ~sk).sum(-1, keepdim=True)
    p2 = torch.where(sk, 0.4 * p, p * (p_r + 0.6 * p_s) / p_r)
    truth = p2 @ v.double().repeat_interleave(3, 1)
    assert ((1 - 0.4 * p_s) > 8 * p_r)[:, heads].sum() > 10  # the exact-recompute branch is taken
    torch.testing.assert_close(got.double(), truth, atol=2e-5, rtol=1e-4)
    _, touched_ref = act_attention_reference(q, k, v, scale=0.5, sink_mask=sinks, head_mask=heads, beta=0.4)
    assert int(touched) == int(touched_ref)


def test_sink_index_pads_and_empty_sets():
    sinks = torch.zeros(2, 3, 6, dtype=torch.bool)
    sinks[0, 0, [1, 4]] = True
    sinks[1, 2, 5] = True
    h, cols, valid = sink_index(sinks, torch.tensor([True, False, True]))
    assert h.tolist() == [0, 2] and cols.shape == (2, 2, 2)
    assert cols[0, 0].tolist() == [1, 4] and valid[0, 0].all() and not valid[0, 1].any()
    assert cols[1, 1, 0] == 5 and valid[1, 1].tolist() == [True, False]
    h, cols, valid = sink_index(torch.zeros(1, 3, 6, dtype=torch.bool), torch.tensor([True, True, False]))
    q, k, v, *_ = _inputs(B=1, H=3, Hkv=1, Tq=12, Tk=12)
    q, k, v = q[:, :, :6], k[:, :, :6], v[:, :, :6]
    out, lse = attention_lse(q, k, v, scale=0.3)
    got, touched = act_from_lse(q, k, v, out, lse, scale=0.3, heads=h, cols=cols, valid=valid, beta=0.4)
    assert torch.equal(got, out) and int(touched) == 0
    ks, vs = gather_sinks(k, v, heads=h, cols=cols, scale=0.3, n_heads=3)  # a layer without sinks, decoded
    out, lse = attention_head_lse(q[:, :, -1:], k, v, scale=0.3, heads=h)
    got, touched = act_decode_from_lse(q[:, :, -1:], out, lse, heads=h, ks=ks, vs=vs, valid=valid, beta=0.4,
                                       n_keys=6, cols=cols, k=k, v=v, scale=0.3)
    assert torch.equal(got, out) and int(touched) == 0


@pytest.mark.parametrize("case", ["prefill", "padded", "window", "padded_window", "chunk"])
def test_sink_stats_lse_equals_reference(case):
    q, k, v, _, _, mask, window = _case(case, seed=1)
    col_ref, n_ref = sink_stats_reference(q, k, scale=0.3, mask=mask, sliding_window=window)
    _, lse = attention_lse(q, k, v, scale=0.3, mask=mask, sliding_window=window)
    col, n_obs = sink_stats_lse(q, k, lse, scale=0.3, mask=mask, sliding_window=window)
    torch.testing.assert_close(col, col_ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(n_obs, n_ref)
    heads = torch.tensor([4, 1])
    col_h, _ = sink_stats_lse(q, k, lse, scale=0.3, mask=mask, sliding_window=window, heads=heads)
    torch.testing.assert_close(col_h, col_ref[:, heads], atol=1e-5, rtol=1e-5)
    cols = torch.tensor([[0, 3, 7, 39]])
    col_c, n_c = sink_stats_columns(q, k, lse, scale=0.3, cols=cols, mask=mask, sliding_window=window)
    torch.testing.assert_close(col_c, col_ref[:, :, cols[0]], atol=1e-5, rtol=1e-5)
    assert torch.equal(n_c, n_ref[:, :, cols[0]])


def test_sink_stats_lse_blocks_equal_one_block(monkeypatch):
    """Several query blocks (each against its own visible key range) == the reference."""
    import steer.kernels.lse as lse_mod

    monkeypatch.setattr(lse_mod, "QUERY_BLOCK", 7)
    for case in ("prefill", "padded_window", "window"):
        q, k, v, _, _, mask, window = _case(case, seed=2)
        _, lse = attention_lse(q, k, v, scale=0.3, mask=mask, sliding_window=window)
        col, _ = sink_stats_lse(q, k, lse, scale=0.3, mask=mask, sliding_window=window)
        col_ref, _ = sink_stats_reference(q, k, scale=0.3, mask=mask, sliding_window=window)
        torch.testing.assert_close(col, col_ref, atol=1e-5, rtol=1e-5)


def test_sampled_estimator_is_unbiased_with_calibrated_standard_error():
    """Mean of R independent estimates vs the exact column sum, in units of the exact standard error of
    that mean: sqrt(Var / R), Var = Tq^2 (1 - m/Tq) S^2 / m from the full column (S^2 its population
    variance, n - 1 denominator). Each z is ~N(0, 1) (R = 400 >> 30); the bound is the two-sided
    Bonferroni quantile for a family-wise false-alarm rate of 1e-3 over all tested columns. The reported
    variance is unbiased for Var too: its mean over R draws is checked within 5 of its own standard
    errors (estimated from the R draws)."""
    q, k, v, _, _, mask, window = _case("padded", seed=4)
    Tq, m, R = q.shape[2], 10, 400
    _, lse = attention_lse(q, k, v, scale=0.3, mask=mask)
    exact, _ = sink_stats_lse(q, k, lse, scale=0.3, mask=mask)
    vis = visibility(Tq, Tq, mask)
    s = (q @ k.repeat_interleave(3, 1).transpose(-1, -2)) * 0.3
    A = torch.nan_to_num(torch.softmax(s.masked_fill(~vis, float("-inf")), -1)).double()  # [B, H, Tq, Tk]
    true_var = Tq * Tq * (1 - m / Tq) * A.var(2) / m
    g = torch.Generator().manual_seed(0)
    ests, vars_ = [], []
    for _ in range(R):
        est, se, _ = sink_stats_sampled(q, k, lse, scale=0.3, n_rows=m, mask=mask, generator=g)
        ests.append(est.double())
        vars_.append(se.double().square())
    ests, vars_ = torch.stack(ests), torch.stack(vars_)
    tested = true_var > 1e-8
    z = (ests.mean(0) - exact.double()) / (true_var / R).sqrt()
    n_tests = int(tested.sum())
    bound = math.sqrt(2) * torch.special.erfinv(torch.tensor(1 - 1e-3 / n_tests, dtype=torch.float64)).item()
    assert n_tests > 100
    assert z[tested].abs().max() < bound, (z[tested].abs().max(), bound)
    zv = (vars_.mean(0) - true_var) / (vars_.std(0) / math.sqrt(R))
    assert zv[tested].abs().max() < 5 + bound


def test_lse_errors_are_clear():
    q, k, v, sinks, heads = _inputs()
    _, lse = attention_lse(q, k, v, scale=0.3)
    with pytest.raises(ValueError, match="n_rows"):
        sink_stats_sampled(q, k, lse, scale=0.3, n_rows=1)
    with pytest.raises(ValueError, match="cols"):
        sink_stats_columns(q, k, lse, scale=0.3, cols=torch.tensor([[0, 40]]))
    with pytest.raises(ValueError, match="cols"):
        sink_stats_columns(q, k, lse, scale=0.3, cols=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="kv heads"):
        attention_lse(q, k[:, :1].expand(2, 4, 40, 16)[:, :4], v[:, :1].expand(2, 4, 40, 16), scale=0.3)


@pytest.mark.parametrize("case", ["decode", "decode_padded", "decode_window", "chunk"])
def test_attention_head_lse_equals_attention_lse_on_its_heads(case):
    q, k, v, sinks, heads, mask, window = _case(case)
    out, lse = attention_lse(q, k, v, scale=0.3, mask=mask, sliding_window=window)
    h = heads.nonzero().flatten()
    out2, lse2 = attention_head_lse(q, k, v, scale=0.3, heads=h, mask=mask, sliding_window=window)
    torch.testing.assert_close(out2, out, **FUSED_TOL)
    torch.testing.assert_close(lse2, lse[:, h], **FUSED_TOL)
    _, cols, valid = sink_index(sinks, heads)
    a, ta = act_from_lse(
        q,
        k,
        v,
        out,
        lse,
        scale=0.3,
        heads=h,
        cols=cols,
        valid=valid,
        beta=0.4,
        mask=mask,
        sliding_window=window,
    )
    b, tb = act_from_lse(
        q,
        k,
        v,
        out2,
        lse2,
        scale=0.3,
        heads=h,
        cols=cols,
        valid=valid,
        beta=0.4,
        mask=mask,
        sliding_window=window,
    )
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert int(ta) == int(tb)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "case", ["prefill", "padded", "window", "padded_window", "decode", "decode_padded", "chunk"]
)
def test_cuda_lse_paths_match_the_fp32_reference(case, dtype):
    """CUDA: flash (bf16, no mask) / memory-efficient (fp32 or masked) kernels with lse, then ACT and sink
    statistics from lse, against the CPU fp32 references on the same (rounded) inputs."""
    q, k, v, sinks, heads, mask, window = _case(case)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-4, rtol=1e-4)
    ref, touched_ref = act_attention_reference(
        q, k, v, scale=0.3, sink_mask=sinks, head_mask=heads, beta=0.4, mask=mask, sliding_window=window
    )
    col_ref, _ = (
        sink_stats_reference(q, k, scale=0.3, mask=mask, sliding_window=window)
        if q.shape[2] > 1
        else (None, 0)
    )
    dev = torch.device("cuda")
    qc, kc, vc = q.to(dev), k.to(dev), v.to(dev)
    mc = mask.to(dev) if mask is not None else None
    out, lse = attention_lse(qc, kc, vc, scale=0.3, mask=mc, sliding_window=window)
    h, cols, valid = sink_index(sinks.to(dev), heads.to(dev))
    got, touched = act_from_lse(
        qc,
        kc,
        vc,
        out,
        lse,
        scale=0.3,
        heads=h,
        cols=cols,
        valid=valid,
        beta=0.4,
        mask=mc,
        sliding_window=window,
    )
    torch.testing.assert_close(got.float().cpu(), ref.float(), **tol)
    if dtype == torch.float32:
        assert int(touched) == int(touched_ref)
    if col_ref is not None:
        col, _ = sink_stats_lse(qc, kc, lse, scale=0.3, mask=mc, sliding_window=window)
        torch.testing.assert_close(col.cpu(), col_ref, **tol)


@pytest.mark.parametrize("Tq", [1, 3])
@pytest.mark.parametrize("host_rows", [0, 64])  # the tensor path; rows decided on the host
def test_act_decode_from_lse_equals_act_from_lse(Tq, host_rows, monkeypatch):
    monkeypatch.setattr("steer.kernels.lse.HOST_ROWS", host_rows)
    q, k, v, sinks, heads = _inputs(Tq=Tq, Tk=40, seed=5)
    sinks[..., 30:] = False  # sink sets come from a prefill of 30 tokens
    h, cols, valid = sink_index(sinks, heads)
    out, lse = attention_head_lse(q, k, v, scale=0.3, heads=h)
    ref, t_ref = act_from_lse(q, k, v, out, lse, scale=0.3, heads=h, cols=cols, valid=valid, beta=0.4)
    ks, vs = gather_sinks(k, v, heads=h, cols=cols, scale=0.3, n_heads=q.shape[1])
    got, t = act_decode_from_lse(
        q, out, lse, heads=h, ks=ks, vs=vs, valid=valid, beta=0.4, n_keys=40, cols=cols, k=k, v=v, scale=0.3
    )
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert int(t) == int(t_ref) > 0
    k2 = k.clone()
    k2[:, :, 7] *= 6  # rows with c > C_MAX take the exact recompute
    out, lse = attention_head_lse(q, k2, v, scale=0.3, heads=h)
    ref, t_ref = act_attention_reference(q, k2, v, scale=0.3, sink_mask=sinks, head_mask=heads, beta=0.4)
    ks, vs = gather_sinks(k2, v, heads=h, cols=cols, scale=0.3, n_heads=q.shape[1])
    got, t = act_decode_from_lse(
        q, out, lse, heads=h, ks=ks, vs=vs, valid=valid, beta=0.4, n_keys=40, cols=cols, k=k2, v=v, scale=0.3
    )
    torch.testing.assert_close(got, ref, atol=3e-5, rtol=1e-4)
    assert int(t) == int(t_ref)


@pytest.mark.parametrize("case", ["plain", "one_sink_dropped", "all_dropped", "c_over_max"])
def test_act_decode_one_row_path_equals_the_reference(case, monkeypatch):
    """The batch-1, one-head, one-row CPU path (`head` given, every sink valid) == the exact reference and
    == the general path (head=None): rescaled, c > C_MAX (exact recompute through the general path); with
    a dropped sink or none left it is not taken (all_valid False) and the result is the same."""
    q, k, v, sinks, _ = _inputs(B=1, Tq=1, Tk=40, seed=9)
    sinks[..., 30:] = False
    sinks[..., 3] = True
    heads = torch.zeros(q.shape[1], dtype=torch.bool)
    heads[4] = True
    if case == "c_over_max":  # head 4's row aligned with the sink key 7 (its kv head 1): P_S 0.96, c 16
        q = q.clone()
        q[0, 4, 0] = 0.3 * k[0, 1, 7]
    h, cols, valid = sink_index(sinks, heads)
    if case == "one_sink_dropped":
        valid = valid & (cols != 3)
        sinks[..., 3] = False
    if case == "all_dropped":
        valid = torch.zeros_like(valid)
        sinks[:] = False
    ref, t_ref = act_attention_reference(q, k, v, scale=0.3, sink_mask=sinks, head_mask=heads, beta=0.4)
    out, lse = attention_head_lse(q, k, v, scale=0.3, heads=h)
    ks, vs = gather_sinks(k, v, heads=h, cols=cols, scale=0.3, n_heads=q.shape[1])
    args = dict(heads=h, ks=ks, vs=vs, valid=valid, beta=0.4, n_keys=40, cols=cols, k=k, v=v, scale=0.3)
    calls = []
    real = lse_mod._decode_one_row
    monkeypatch.setattr(lse_mod, "_decode_one_row", lambda *a: calls.append(1) or real(*a))
    all_valid = case in ("plain", "c_over_max")
    got, t = act_decode_from_lse(q, out.clone(), lse, head=4, all_valid=all_valid, **args)
    assert len(calls) == all_valid, "the one-row path runs exactly when every sink is valid"
    exact = []
    real_exact = lse_mod._exact_rows
    monkeypatch.setattr(lse_mod, "_exact_rows", lambda *a: exact.append(1) or real_exact(*a))
    general, t_general = act_decode_from_lse(q, out.clone(), lse, **args)
    assert bool(exact) == (case == "c_over_max")  # only there does the general path recompute the row
    assert len(calls) == all_valid
    torch.testing.assert_close(got, ref, atol=3e-5, rtol=1e-4)
    torch.testing.assert_close(got, general, atol=1e-6, rtol=1e-5)
    assert int(t) == int(t_general) == int(t_ref) == (0 if case == "all_dropped" else 1)
    assert torch.equal(got[:, :4], out[:, :4]) and torch.equal(got[:, 5:], out[:, 5:])  # other heads untouched


@pytest.mark.parametrize("case", ["decode_padded", "chunk"])
@pytest.mark.parametrize("host_rows", [0, 64])  # the tensor path; rows decided on the host
def test_act_decode_from_lse_with_a_mask(case, host_rows, monkeypatch):
    monkeypatch.setattr("steer.kernels.lse.HOST_ROWS", host_rows)
    q, k, v, sinks, heads, mask, window = _case(case, seed=6)
    if mask is None:  # a windowed mask, as steer builds for sliding layers
        mask = visibility(q.shape[2], k.shape[2], None, 9).expand(2, 1, -1, -1)
    sinks[..., 36:] = False
    h, cols, valid = sink_index(sinks, heads)
    out, lse = attention_head_lse(q, k, v, scale=0.3, heads=h, mask=mask)
    ref, t_ref = act_attention_reference(
        q, k, v, scale=0.3, sink_mask=sinks, head_mask=heads, beta=0.4, mask=mask
    )
    ks, vs = gather_sinks(k, v, heads=h, cols=cols, scale=0.3, n_heads=q.shape[1])
    got, t = act_decode_from_lse(
        q,
        out,
        lse,
        heads=h,
        ks=ks,
        vs=vs,
        valid=valid,
        beta=0.4,
        n_keys=40,
        cols=cols,
        k=k,
        v=v,
        scale=0.3,
        mask=mask,
    )
    torch.testing.assert_close(got, ref, atol=3e-5, rtol=1e-4)
    assert int(t) == int(t_ref) > 0


@pytest.mark.parametrize("contiguous", [True, False])
def test_mask_counts_equal_the_bool_sums_and_are_computed_once_per_mask(monkeypatch, contiguous):
    import steer.kernels.lse as lse_mod
    from steer.kernels.act import n_observers

    monkeypatch.setattr(lse_mod, "QUERY_BLOCK", 7)  # several row blocks in the observer count
    m = _padded_mask(2, 30, 30, pads=(0, 4))
    m[1, :, 20:] &= torch.rand(10, 30, generator=torch.Generator().manual_seed(1)) < 0.7
    if not contiguous:
        m = m.transpose(-1, -2).contiguous().transpose(-1, -2)
    rows, cols = lse_mod._mask_counts(m)
    assert torch.equal(rows, m.sum(-1, dtype=torch.int64))
    assert torch.equal(cols, m.sum(2, dtype=torch.int64))
    assert torch.equal(lse_mod.observers(2, 30, 30, m), n_observers(2, 30, 30, m))
    assert lse_mod._mask_counts(m)[1] is cols  # cached while the mask lives
    key = id(m)
    del m
    assert key not in lse_mod._COUNTS


def test_column_sums_with_underflowing_scores_equal_the_reference():
    """Scores far below exp's normal range (floored at EXP_FLOOR before exp) still give the exact sums."""
    q, k, _, _, _ = _inputs(Tq=48, Tk=48, seed=3)
    q = q * 40  # most probabilities < 1e-38 (the reference's exp gives denormals or 0); scores ~100 leave the
    # fused kernel's lse a relative error ~1e-7 * 100, hence rtol 1e-4
    out, lse = attention_lse(q, k, k, scale=0.25)
    col, n_obs = sink_stats_lse(q, k, lse, scale=0.25)
    col_ref, n_ref = sink_stats_reference(q, k, scale=0.25)
    assert (col_ref == 0).any() or (col_ref < 1e-30).any()
    torch.testing.assert_close(col, col_ref, atol=2e-5, rtol=1e-4)
    assert torch.equal(n_obs, n_ref)
    cols = torch.tensor([[0, 7, 30]])
    got, _ = sink_stats_columns(q, k, lse, scale=0.25, cols=cols)
    torch.testing.assert_close(got, col_ref[:, :, cols[0]], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("host_rows", [0, 64])  # the tensor path; rows decided on the host
def test_act_decode_recomputes_rows_whose_sink_mass_rounds_to_one(host_rows, monkeypatch):
    """An lse a few ulps low makes P_S >= 1 on rows that put nearly all attention on sinks; c is then
    negative, and those rows must take the exact recompute like rows with c > C_MAX."""
    monkeypatch.setattr("steer.kernels.lse.HOST_ROWS", host_rows)
    q, k, v, sinks, heads = _inputs(Tq=1, Tk=40, seed=5)
    sinks[..., 30:] = False
    h, cols, valid = sink_index(sinks, heads)
    k[:, :, 7] *= 6
    out, lse = attention_head_lse(q, k, v, scale=0.3, heads=h)
    ref, t_ref = act_attention_reference(q, k, v, scale=0.3, sink_mask=sinks, head_mask=heads, beta=0.4)
    ks, vs = gather_sinks(k, v, heads=h, cols=cols, scale=0.3, n_heads=q.shape[1])
    low = lse - 1e-5  # P_S = sum_S exp(s - lse) > 1 where the sinks hold > 1 - 1e-5 of the row
    n = q.shape[0] * h.numel()  # gather_sinks' layout: keys [B * Hs, D, S]
    p_s = (torch.bmm(q[:, h].reshape(n, 1, -1), ks) - low.reshape(n, 1, 1)).exp().mul(valid.view(n, 1, -1)).sum(-1)
    assert (p_s >= 1).any()
    got, t = act_decode_from_lse(
        q, out, low, heads=h, ks=ks, vs=vs, valid=valid, beta=0.4, n_keys=40, cols=cols, k=k, v=v, scale=0.3
    )
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-3)
    assert int(t) == int(t_ref)


@pytest.mark.parametrize("case", ["prefill", "padded", "window", "chunk"])
def test_cpu_flash_gqa_without_copies_equals_repeated_kv(case, monkeypatch):
    import steer.kernels.lse as lse_mod

    q, k, v, _, _, mask, window = _case(case, seed=8)
    q = q.repeat(1, 1, 20 // q.shape[2] + 1, 1)[:, :, : max(q.shape[2], 20)]  # past the math path's row limit
    if mask is not None:
        mask = mask[..., -q.shape[2] :, :] if mask.shape[2] >= q.shape[2] else None
    out, lse = attention_lse(q, k, v, scale=0.3, mask=mask, sliding_window=window)
    monkeypatch.setattr(lse_mod, "_CPU_GQA", [False])  # the repeat_interleave fallback
    out2, lse2 = attention_lse(q, k, v, scale=0.3, mask=mask, sliding_window=window)
    assert torch.equal(out, out2) and torch.equal(lse, lse2)
