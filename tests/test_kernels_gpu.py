"""Triton kernels on CUDA: agreement with the references at realistic shapes, and CUDA-graph capture.

Marked `gpu`; skipped without CUDA. Run on the GPU machine by experiments/device_check.sh.
"""

from __future__ import annotations

import pytest
import torch

from steer.adapters import routing_rule
from steer.kernels.act import (
    act_attention,
    act_attention_reference,
    sink_stats,
    sink_stats_reference,
    visibility,
)
from steer.kernels.fingerprint import fingerprint, fingerprint_reference, projection_matrix
from steer.kernels.probe_score import probe_score, probe_score_reference
from steer.kernels.router import RouterEdit, RoutingRule, route, route_reference

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
DEV = "cuda"


def _mask(E, ids):
    m = torch.zeros(E, dtype=torch.bool, device=DEV)
    m[list(ids)] = True
    return m


def _same_routing(a, b, atol, slack):
    ai, ao = a.indices.sort(-1)
    bi, bo = b.indices.sort(-1)
    same = (ai == bi).all(-1)
    assert same.float().mean() >= 0.999  # near-ties in reduced precision may pick the other expert
    torch.testing.assert_close(a.weights.float().gather(1, ao)[same], b.weights.float().gather(1, bo)[same],
                               atol=atol, rtol=atol)
    assert abs(int(a.touched) - int(b.touched)) <= slack
    assert ((a.indices >= 0) & (a.indices < 1 << 20)).all()


@pytest.mark.parametrize("kind,E,k,dtype", [
    ("softmax_topk", 64, 8, torch.bfloat16), ("softmax_topk", 128, 8, torch.float32),
    ("topk_softmax", 128, 4, torch.bfloat16), ("sigmoid_group", 256, 8, torch.float32),
])
def test_router_cuda_matches_reference(kind, E, k, dtype):
    g = torch.Generator(device="cpu").manual_seed(E + k)
    T = 4099
    logits = torch.randn(T, E, generator=g).to(DEV, dtype)
    rule = RoutingRule(kind, k, norm_topk_prob=True, n_group=8 if kind == "sigmoid_group" else 1,
                       topk_group=4 if kind == "sigmoid_group" else 1, routed_scaling_factor=2.5)
    bias = (torch.randn(E, generator=g) * 0.1).to(DEV) if kind == "sigmoid_group" else None
    tm = (torch.rand(T, generator=g) > 0.2).to(DEV)
    for edit in (None, RouterEdit(off_mask=_mask(E, range(0, E, 9))),
                 RouterEdit(off_zero=_mask(E, [1, 2]), renormalize=True, force_on=_mask(E, [E - 1]), force_weight="max")):
        tri = route(logits, rule, edit, bias=bias, token_mask=tm)
        ref = route_reference(logits, rule, edit, bias=bias, token_mask=tm)
        _same_routing(tri, ref, 1e-5 if dtype == torch.float32 else 1e-2, slack=0 if dtype == torch.float32 else T // 500)


def test_router_cuda_reproduces_tiny_family_routers():
    steer_tiny = pytest.importorskip("steer.tiny")
    for family in ("mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss"):
        model = steer_tiny.tiny_model(family).to(DEV)
        seen = []
        mods = [m for n, m in model.named_modules() if n.endswith((".gate", ".router")) and hasattr(m, "top_k")]
        hooks = [m.register_forward_hook(lambda m, a, o, seen=seen: seen.append((m, o))) for m in mods]
        with torch.no_grad():
            model(input_ids=torch.randint(3, 256, (2, 17), device=DEV))
        for h in hooks:
            h.remove()
        rule = routing_rule(model.config)
        for mod, (logits, w, i) in seen:
            res = route(logits, rule, bias=getattr(mod, "e_score_correction_bias", None))
            assert res.weights.dtype == w.dtype
            ai, ao = res.indices.sort(-1)
            bi, bo = i.sort(-1)
            assert torch.equal(ai, bi), family
            torch.testing.assert_close(res.weights.gather(1, ao), w.gather(1, bo), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype,D", [(torch.bfloat16, 128), (torch.float16, 64), (torch.float32, 64)])
def test_act_and_sink_stats_cuda(dtype, D):
    g = torch.Generator(device="cpu").manual_seed(D)
    B, H, Hkv, T = 2, 8, 2, 1000
    q, k, v = (torch.randn(B, h, T, D, generator=g).to(DEV, dtype) for h in (H, Hkv, Hkv))
    sinks = torch.rand(B, H, T, generator=g).to(DEV) < 0.02
    sinks[..., 1] = True
    heads = torch.tensor([True, False] * 4, device=DEV)
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    mask = visibility(T, T).expand(B, 1, T, T).clone()
    mask[1, ..., :7] = False
    for kw in (dict(), dict(mask=mask, sliding_window=300)):
        out, t = act_attention(q, k, v, scale=D ** -0.5, sink_mask=sinks, head_mask=heads, beta=0.4, **kw)
        ref, rt = act_attention_reference(q, k, v, scale=D ** -0.5, sink_mask=sinks, head_mask=heads, beta=0.4, **kw)
        torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)
        assert int(t) == int(rt)
        col, n = sink_stats(q, k, scale=D ** -0.5, **kw)
        rcol, rn = sink_stats_reference(q, k, scale=D ** -0.5, **kw)
        torch.testing.assert_close(col, rcol, atol=1e-3 * T, rtol=3e-2 if dtype != torch.float32 else 1e-4)
        assert torch.equal(n, rn)


def test_fingerprint_and_probe_cuda():
    g = torch.Generator(device="cpu").manual_seed(0)
    for dtype in (torch.bfloat16, torch.float32):
        h = torch.randn(8191, 4096, generator=g).to(DEV, dtype)
        P = projection_matrix(0, 4096, 8).to(DEV)
        torch.testing.assert_close(fingerprint(h, P).float(), fingerprint_reference(h, P).float(), atol=2e-3, rtol=2e-3)
    hidden = [torch.randn(33, 64, 2048, generator=g).to(DEV, torch.bfloat16) for _ in range(4)]
    pos = torch.randint(0, 64, (33,), generator=g).to(DEV)
    F = 4 * 2048
    mean, std = torch.zeros(F, device=DEV), torch.ones(F, device=DEV) * 2
    layers = [((torch.randn(o, i, generator=g) * i ** -0.5).to(DEV), torch.zeros(o, device=DEV))
              for i, o in ((F, 256), (256, 64), (64, 1))]
    torch.testing.assert_close(probe_score(hidden, pos, mean, std, layers),
                               probe_score_reference(hidden, pos, mean, std, layers), atol=1e-4, rtol=1e-4)


def test_kernels_capture_in_cuda_graph():
    """No host sync, no per-call host tables: each kernel records into a CUDA graph and replays."""
    g = torch.Generator(device="cpu").manual_seed(1)
    logits = torch.randn(512, 64, generator=g).to(DEV)
    rule = RoutingRule("softmax_topk", 4, norm_topk_prob=True)
    edit = RouterEdit(off_mask=_mask(64, [3, 5]), force_on=_mask(64, [7]))
    q, k, v = (torch.randn(1, 4, 256, 64, generator=g).to(DEV, torch.bfloat16) for _ in range(3))
    sinks = torch.zeros(1, 4, 256, dtype=torch.bool, device=DEV)
    sinks[..., 1:3] = True
    heads = torch.ones(4, dtype=torch.bool, device=DEV)
    h = torch.randn(300, 512, generator=g).to(DEV)
    P = projection_matrix(0, 512, 8).to(DEV)

    def step():
        r = route(logits, rule, edit)
        o, t = act_attention(q, k, v, scale=0.125, sink_mask=sinks, head_mask=heads, beta=0.4)
        c, _ = sink_stats(q, k, scale=0.125)
        return r.weights, r.indices, r.touched, o, t, c, fingerprint(h, P)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # warm-up: compile kernels, cache edit tables on the device
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    for x in (logits, q, k, v, h):
        x.copy_(torch.randn(x.shape, generator=g).to(DEV, x.dtype))
    graph.replay()
    torch.cuda.synchronize()
    for got, want in zip(outs, step()):
        assert torch.equal(got, want)
