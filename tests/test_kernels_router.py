"""steer.kernels.router: exact reproduction of every MoE family's router, edit semantics, Triton == reference.

The `test_triton_*` tests run Triton under the interpreter on CPU tensors, with outputs poisoned
(NaN / -1) before each launch so unwritten elements fail. The interpreter must be switched on before
triton is imported, so in a plain `pytest` run they skip here and run in the subprocess started by
tests/test_kernels_interpreter.py (or run them directly: `TRITON_INTERPRET=1 pytest -k triton ...`).
"""

from __future__ import annotations

import zlib

import pytest
import torch

from steer.adapters import routing_rule
from steer.kernels._triton import interpreter, interpreter_ready
from steer.kernels.router import RouterEdit, RoutingRule, route, route_reference
from steer.tiny import tiny_model

triton_interpreter = pytest.mark.skipif(
    not interpreter_ready(), reason="needs TRITON_INTERPRET=1 before triton import; run by test_kernels_interpreter.py")

MOE = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss", "granitemoe"]


def _router_modules(model):
    out = []
    for layer in model.model.layers:
        for parent in ("mlp", "block_sparse_moe"):
            block = getattr(layer, parent, None)
            for name in ("gate", "router"):
                mod = getattr(block, name, None) if block is not None else None
                if mod is not None and hasattr(mod, "top_k"):
                    out.append(mod)
    return out


def _as_sets(w, i):
    order = i.argsort(dim=-1)
    return i.gather(1, order), w.gather(1, order)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", MOE)
def test_route_reproduces_family_router(family, dtype):
    model = tiny_model(family, dtype=dtype)
    routers = _router_modules(model)
    assert routers, f"no router found in tiny {family}"
    seen = []
    hooks = [r.register_forward_hook(lambda m, a, o: seen.append((m, o))) for r in routers]
    ids = torch.randint(3, 256, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    rule = routing_rule(model.config, hidden_dtype=dtype)
    for mod, (logits, weights, indices) in seen:
        bias = getattr(mod, "e_score_correction_bias", None)
        res = route(logits, rule, bias=bias)
        assert res.weights.dtype == weights.dtype and res.indices.dtype == indices.dtype
        assert int(res.touched) == 0
        if family == "deepseek_v3":  # HF uses topk(sorted=False): same set, same weight per expert
            ri, rw = _as_sets(res.weights, res.indices)
            hi, hw = _as_sets(weights, indices)
            assert torch.equal(ri, hi) and torch.equal(rw, hw)
        else:
            assert torch.equal(res.indices, indices) and torch.equal(res.weights, weights)


def _mask(E, ids):
    m = torch.zeros(E, dtype=torch.bool)
    m[list(ids)] = True
    return m


def test_off_mask_next_best_fills_slot_and_counts():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0], [0.0, 4.0, 3.0, 1.0]])
    rule = RoutingRule("softmax_topk", 2, norm_topk_prob=True)
    res = route_reference(logits, rule, RouterEdit(off_mask=_mask(4, [0])))
    assert res.indices.tolist() == [[1, 2], [3, 2], [1, 2]]
    assert int(res.touched) == 1  # only token 0 had chosen expert 0
    p = torch.softmax(logits[0], -1)
    assert torch.allclose(res.weights[0], p[[1, 2]] / p[[1, 2]].sum())


def test_off_mask_is_a_logit_mask_without_norm():
    """norm_topk_prob=False: the masked expert leaves the softmax denominator (logit -> -inf), so the
    remaining weights are renormalised over the unmasked experts and every token's weights change."""
    torch.manual_seed(0)
    logits = torch.randn(5, 6)
    rule = RoutingRule("softmax_topk", 2, norm_topk_prob=False)
    res = route_reference(logits, rule, RouterEdit(off_mask=_mask(6, [0])))
    p = torch.softmax(logits[:, 1:], -1)  # the router without expert 0
    assert not (res.indices == 0).any()
    assert torch.allclose(res.weights, p.gather(1, res.indices - 1), atol=1e-7, rtol=0)
    full = torch.softmax(logits, -1)
    assert torch.allclose(res.weights, full.gather(1, res.indices) / (1 - full[:, :1]), atol=1e-7, rtol=0)
    assert int(res.touched) == 5  # every token: the denominator changed for all of them
    # with norm_topk_prob=True the top-k renormalisation cancels the denominator: same as selection-only
    norm = route_reference(logits, RoutingRule("softmax_topk", 2, norm_topk_prob=True), RouterEdit(off_mask=_mask(6, [0])))
    sel = full.gather(1, norm.indices)
    assert torch.allclose(norm.weights, sel / sel.sum(-1, keepdim=True), atol=1e-7, rtol=0)


def test_off_mask_equals_minus_inf_logit_for_every_rule():
    """For softmax_topk and topk_softmax, off_mask == the unedited router run on logits with the masked
    expert's logit set to -inf (the spec's definition)."""
    torch.manual_seed(1)
    logits = torch.randn(7, 8)
    m = _mask(8, [2, 5])
    for rule in (RoutingRule("softmax_topk", 3), RoutingRule("softmax_topk", 3, norm_topk_prob=True),
                 RoutingRule("topk_softmax", 3)):
        got = route_reference(logits, rule, RouterEdit(off_mask=m))
        want = route_reference(logits.masked_fill(m, float("-inf")), rule)
        gi, gw = _as_sets(got.weights, got.indices)
        wi, ww = _as_sets(want.weights, want.indices)
        assert torch.equal(gi, wi)
        torch.testing.assert_close(gw, ww, atol=1e-7, rtol=1e-6)


def test_off_zero_keeps_index_zero_weight_and_renormalises():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    rule = RoutingRule("softmax_topk", 3, norm_topk_prob=True)
    res = route_reference(logits, rule, RouterEdit(off_zero=_mask(4, [1])))
    assert res.indices.tolist() == [[0, 1, 2]]
    assert res.weights[0, 1] == 0 and res.weights.sum() < 1
    ren = route_reference(logits, rule, RouterEdit(off_zero=_mask(4, [1]), renormalize=True))
    assert ren.indices.tolist() == [[0, 1, 2]] and ren.weights[0, 1] == 0
    assert torch.allclose(ren.weights.sum(), torch.tensor(1.0))
    all_off = route_reference(logits, rule, RouterEdit(off_zero=_mask(4, [0, 1, 2]), renormalize=True))
    assert torch.equal(all_off.weights, torch.zeros(1, 3)) and int(all_off.touched) == 1


def test_force_on_replaces_lowest_and_weight_modes():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0]])
    rule = RoutingRule("topk_softmax", 2)
    gate = route_reference(logits, rule, RouterEdit(force_on=_mask(4, [3])))
    assert gate.indices.tolist() == [[0, 3], [3, 2]]
    assert torch.allclose(gate.weights[0], torch.softmax(torch.tensor([4.0, 1.0]), -1))
    assert int(gate.touched) == 1  # token 1 already had expert 3
    mx = route_reference(logits, rule, RouterEdit(force_on=_mask(4, [3]), force_weight="max"))
    assert torch.allclose(mx.weights[0], torch.tensor([0.5, 0.5]))


def test_sigmoid_group_force_crosses_groups_and_scales():
    torch.manual_seed(0)
    logits = torch.randn(7, 8)
    rule = RoutingRule("sigmoid_group", 2, norm_topk_prob=True, n_group=4, topk_group=1, routed_scaling_factor=2.5)
    res = route_reference(logits, rule, RouterEdit(force_on=_mask(8, [7])), bias=torch.zeros(8))
    assert (res.indices == 7).any(dim=-1).all()
    assert torch.allclose(res.weights.sum(-1), torch.full((7,), 2.5))


def test_token_mask_limits_edits_and_count():
    torch.manual_seed(0)
    logits = torch.randn(9, 6)
    rule = RoutingRule("softmax_topk", 2, norm_topk_prob=True)
    edit = RouterEdit(force_on=_mask(6, [5]))
    tm = torch.tensor([True, False] * 4 + [True])
    res = route_reference(logits, rule, edit, token_mask=tm)
    plain = route_reference(logits, rule)
    assert torch.equal(res.indices[~tm], plain.indices[~tm])
    assert (res.indices[tm] == 5).any(-1).all()
    assert int(res.touched) == int(((plain.indices[tm] != 5).all(-1)).sum())


def test_bad_edits_raise_clear_errors():
    logits = torch.randn(3, 4)
    rule = RoutingRule("softmax_topk", 2)
    with pytest.raises(ValueError, match="forced on but top_k"):
        route(logits, rule, RouterEdit(force_on=_mask(4, [0, 1, 2])))
    with pytest.raises(ValueError, match="fewer than top_k"):
        route(logits, rule, RouterEdit(off_mask=_mask(4, [0, 1, 2])))
    with pytest.raises(ValueError, match="both forced on and in off_mask"):
        RouterEdit(off_mask=_mask(4, [0]), force_on=_mask(4, [0]))
    with pytest.raises(ValueError, match="experts but the logits"):
        route(logits, rule, RouterEdit(off_mask=_mask(5, [0])))
    g = RoutingRule("sigmoid_group", 2, n_group=2, topk_group=1)
    with pytest.raises(ValueError, match="too few experts"):
        route(logits, g, RouterEdit(off_mask=_mask(4, [0])))


# --- Triton (interpreter) == reference -----------------------------------------------------------

RULES = [
    RoutingRule("softmax_topk", 2, norm_topk_prob=True, weights_dtype=torch.float32),  # Mixtral
    RoutingRule("softmax_topk", 3, norm_topk_prob=False),  # Qwen3-MoE / OLMoE
    RoutingRule("topk_softmax", 2),  # GPT-OSS
    RoutingRule("sigmoid_group", 3, norm_topk_prob=True, n_group=4, topk_group=2, routed_scaling_factor=2.5),
]


def _edits(E, gen):
    perm = torch.randperm(E, generator=gen).tolist()
    m, z, f = _mask(E, perm[:1]), _mask(E, perm[1:3]), _mask(E, perm[3:4])
    return [
        None,
        RouterEdit(off_mask=m),
        RouterEdit(off_zero=z, renormalize=True),
        RouterEdit(force_on=f, force_weight="max"),
        RouterEdit(off_mask=m, off_zero=z, force_on=f),
    ]


def _same_routing(a, b, atol, touched_slack=0):
    ai, aw = _as_sets(a.weights.float(), a.indices)
    bi, bw = _as_sets(b.weights.float(), b.indices)
    assert torch.equal(ai, bi)
    torch.testing.assert_close(aw, bw, atol=atol, rtol=atol)
    # fp16/bf16: an edit that moves a weight by less than one output ulp counts as touched when the
    # fp32 value sits on a rounding boundary in one path only, so allow a token or two of slack
    assert abs(int(a.touched) - int(b.touched)) <= touched_slack, (a.touched, b.touched)
    assert ((a.indices >= 0) & (a.indices < a.indices.new_tensor(10**6))).all()


@triton_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rule", RULES, ids=lambda r: f"{r.kind}-k{r.top_k}")
def test_triton_matches_reference(rule, dtype):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{rule.kind}{rule.top_k}{dtype}".encode()))
    T, E = 37, 12  # odd sizes: masked token tail, padded expert/group lanes
    # distinct per row and exact in bf16/fp16 (k/8, |k| < 64): no ties, whose order is unspecified
    logits = torch.stack([torch.randperm(127, generator=gen)[:E] - 63 for _ in range(T)]).div(8).to(dtype)
    bias = torch.randn(E, generator=gen) * 0.1 if rule.kind == "sigmoid_group" else None
    token_mask = torch.rand(T, generator=gen) > 0.3
    atol = 1e-6 if dtype == torch.float32 else 1e-2
    with interpreter():
        for edit in _edits(E, gen):
            ref = route_reference(logits, rule, edit, bias=bias, token_mask=token_mask)
            tri = route(logits, rule, edit, bias=bias, token_mask=token_mask, backend="triton")
            assert tri.weights.dtype == ref.weights.dtype and tri.indices.dtype == torch.int64
            assert not tri.weights.isnan().any() and (tri.indices >= 0).all() and (tri.indices < E).all()
            _same_routing(tri, ref, atol, touched_slack=0 if dtype == torch.float32 else 2)
            if edit is not None:
                assert int(tri.touched) > 0


@triton_interpreter
def test_triton_many_experts_one_program_per_few_tokens():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(5, 64, generator=gen)
    rule = RoutingRule("softmax_topk", 8, norm_topk_prob=False)
    edit = RouterEdit(off_mask=_mask(64, range(0, 64, 7)), force_on=_mask(64, [1, 2]))
    with interpreter():
        _same_routing(route(logits, rule, edit, backend="triton"), route_reference(logits, rule, edit), 1e-6)
