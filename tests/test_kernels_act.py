"""steer.kernels.act: ACT calibration math on the reference, sink statistics, Triton (interpreter) == reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from steer.kernels._triton import interpreter, interpreter_ready
from steer.kernels.act import (
    act_attention,
    act_attention_reference,
    act_probs_reference,
    sink_stats,
    sink_stats_reference,
    visibility,
)

triton_interpreter = pytest.mark.skipif(
    not interpreter_ready(), reason="needs TRITON_INTERPRET=1 before triton import; run by test_kernels_interpreter.py")


def _inputs(B=2, H=4, Hkv=2, Tq=13, Tk=13, D=16, Dv=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Tq, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, Tk, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, Tk, Dv, generator=g).to(dtype)
    k[:, :, 0] *= 4  # a strong first-token sink, as in real models
    sinks = torch.rand(B, H, Tk, generator=g) < 0.2
    sinks[..., 0] = False  # the kept initial sink is never calibrated
    sinks[..., 1] = True
    heads = torch.tensor([True, False, True, True][:H])
    return q, k, v, sinks, heads


def test_rows_sum_to_one_and_sinks_scaled_by_beta():
    q, k, v, sinks, heads = _inputs()
    p0, _ = act_probs_reference(q, k, scale=0.25, sink_mask=sinks, head_mask=heads, beta=1.0)
    p, touched = act_probs_reference(q, k, scale=0.25, sink_mask=sinks, head_mask=heads, beta=0.4)
    torch.testing.assert_close(p.sum(-1), torch.ones_like(p.sum(-1)), atol=1e-6, rtol=0)
    s = sinks[:, :, None, :].expand_as(p) & heads[None, :, None, None]
    torch.testing.assert_close(p[s], 0.4 * p0[s])
    assert torch.equal(p[:, 1], p0[:, 1])  # uncalibrated head untouched
    ratio = p[~s & (p0 > 0)] / p0[~s & (p0 > 0)]
    assert (ratio >= 1).all()  # freed mass goes to the other keys, proportionally
    assert int(touched) == int(heads.sum() * 2 * 13) - int(((p0 * s).sum(-1) == 0)[:, heads].sum())


def test_output_equals_kernel_friendly_form():
    q, k, v, sinks, heads = _inputs(Tq=5, Tk=11)  # decode-like: queries at the last positions
    out, _ = act_attention(q, k, v, scale=0.3, sink_mask=sinks, head_mask=heads, beta=0.4)
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    vis = visibility(5, 11)
    p = torch.softmax((q @ kk.transpose(-1, -2) * 0.3).masked_fill(~vis, float("-inf")), -1)
    S = sinks[:, :, None, :].float()
    P_S = (p * S).sum(-1, keepdim=True)
    o, o_S = p @ vv, (p * S) @ vv
    c = (1 - 0.4 * P_S) / (1 - P_S)
    want = torch.where(heads[None, :, None, None], 0.4 * o_S + c * (o - o_S), o)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def test_beta_one_is_plain_causal_attention_and_gqa():
    q, k, v, sinks, heads = _inputs()
    out, touched = act_attention(q, k, v, scale=0.25, sink_mask=sinks, head_mask=heads, beta=1.0)
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True,
                                          scale=0.25)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    assert int(touched) > 0  # rows were rescaled, by 1


def test_padded_rows_zero_and_all_sink_rows_unchanged():
    q, k, v, sinks, heads = _inputs(B=1, H=4, Tq=6, Tk=6)
    mask = visibility(6, 6).clone()
    mask[..., :2] = False  # left padding: keys 0,1 invisible; query rows 0,1 see nothing
    mask[..., 0, 0] = False
    out, _ = act_attention(q, k, v, scale=0.25, sink_mask=sinks, head_mask=heads, beta=0.4, mask=mask)
    assert not out.isnan().any() and (out[:, :, :2] == 0).all()
    every = torch.ones(1, 4, 6, dtype=torch.bool)
    p, touched = act_probs_reference(q, k, scale=0.25, sink_mask=every, head_mask=heads, beta=0.4)
    p0, _ = act_probs_reference(q, k, scale=0.25, sink_mask=every, head_mask=heads, beta=1.0)
    assert torch.equal(p, p0) and int(touched) == 0  # P_S == 1: nothing to redistribute to


def test_sink_stats_reference_matches_full_map_and_counts():
    q, k, _, _, _ = _inputs(Tq=9, Tk=9)
    for window in (None, 4):
        col, n_obs = sink_stats(q, k, scale=0.25, sliding_window=window)
        vis = visibility(9, 9, sliding_window=window)
        full = torch.softmax((q @ k.repeat_interleave(2, 1).transpose(-1, -2) * 0.25).masked_fill(~vis, float("-inf")), -1)
        torch.testing.assert_close(col, full.sum(2))
        assert torch.equal(n_obs, vis.sum(2).expand(2, 1, 9))
    assert n_obs.dtype == torch.int64 and (col / n_obs)[..., 0].mean() > (col / n_obs)[..., 1:].mean()


def test_errors_are_clear():
    q, k, v, sinks, heads = _inputs()
    with pytest.raises(ValueError, match="sink_mask must be"):
        act_attention(q, k, v, scale=1.0, sink_mask=sinks[..., :3], head_mask=heads, beta=0.4)
    with pytest.raises(ValueError, match="multiple of"):
        act_attention(q, k[:, :1].expand(2, 3, 13, 16), v[:, :1].expand(2, 3, 13, 16), scale=1.0,
                      sink_mask=sinks, head_mask=heads, beta=0.4)
    with pytest.raises(ValueError, match="mask must be"):
        sink_stats(q, k, scale=1.0, mask=torch.ones(2, 4, 13, 13, dtype=torch.bool))


CASES = {
    "prefill": dict(Tq=70, Tk=70),  # two query blocks, masked tails
    "decode": dict(Tq=1, Tk=83),
    "chunk": dict(Tq=5, Tk=67, D=24, Dv=40),  # padded head dims, Dv != D
    "mha": dict(H=2, Hkv=2, Tq=19, Tk=19),
}


@triton_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", list(CASES))
def test_triton_act_attention_matches_reference(case, dtype):
    q, k, v, sinks, heads = _inputs(dtype=dtype, seed=len(case), **CASES[case])
    H = q.shape[1]
    heads = heads[:H]
    sinks = sinks[:, :H]
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    for kw in (dict(), dict(sliding_window=9)):
        with interpreter():
            out, touched = act_attention(q, k, v, scale=0.2, sink_mask=sinks, head_mask=heads, beta=0.4,
                                         backend="triton", **kw)
        ref, ref_t = act_attention_reference(q, k, v, scale=0.2, sink_mask=sinks, head_mask=heads, beta=0.4, **kw)
        assert out.dtype == dtype and not out.isnan().any()
        torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)
        assert int(touched) == int(ref_t)


@triton_interpreter
def test_triton_act_explicit_mask_padding_and_shared_sinks():
    q, k, v, sinks, heads = _inputs(B=2, Tq=21, Tk=21, dtype=torch.float16, seed=5)
    mask = visibility(21, 21).expand(2, 1, 21, 21).clone()
    mask[1, :, :, :4] = False  # row 1 left-padded: its first 4 queries see nothing
    shared = sinks[:1]  # one sink set for the whole batch
    with interpreter():
        out, touched = act_attention(q, k, v, scale=0.2, sink_mask=shared, head_mask=heads, beta=0.3, mask=mask,
                                     backend="triton")
    ref, ref_t = act_attention_reference(q, k, v, scale=0.2, sink_mask=shared, head_mask=heads, beta=0.3, mask=mask)
    assert (out[1, :, :4] == 0).all() and not out.isnan().any()
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
    assert int(touched) == int(ref_t)


@triton_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["prefill", "decode", "chunk"])
def test_triton_sink_stats_matches_reference(case, dtype):
    q, k, _, _, _ = _inputs(dtype=dtype, seed=7, **CASES[case])
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for kw in (dict(), dict(sliding_window=9)):
        with interpreter():
            col, n_obs = sink_stats(q, k, scale=0.2, backend="triton", **kw)
        rcol, rn = sink_stats_reference(q, k, scale=0.2, **kw)
        assert not col.isnan().any()
        torch.testing.assert_close(col, rcol, atol=tol, rtol=tol)
        assert torch.equal(n_obs, rn)


@triton_interpreter
def test_triton_sink_stats_explicit_mask():
    q, k, _, _, _ = _inputs(B=2, Tq=21, Tk=21, seed=9)
    mask = visibility(21, 21).expand(2, 1, 21, 21).clone()
    mask[0, :, :, :3] = False
    with interpreter():
        col, n_obs = sink_stats(q, k, scale=0.2, mask=mask, backend="triton")
    rcol, rn = sink_stats_reference(q, k, scale=0.2, mask=mask)
    torch.testing.assert_close(col, rcol, atol=1e-4, rtol=1e-4)
    assert torch.equal(n_obs, rn) and (col[0, :, :3] == 0).all()
