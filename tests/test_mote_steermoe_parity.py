"""Parity of steer's off_mask with SteerMoE's routing edit, on recorded outputs of SteerMoE's own code.

Fixture tests/fixtures/steermoe/steermoe_routing_smollm2_moe.json (see the README there): router logits
of the embedded smollm2-moe (qwen2_moe rule: softmax -> top-12 of 16, norm_topk_prob=False) at layers
2, 15, 29 on one 18-token prompt, and the (weights, indices) that SteerMoE's deactivation edit
(adobe-research/SteerMoE, log_softmax then the switched-off experts' log-probability := per-token
min - 0.01) followed by vLLM's fused top-k produced, with renormalize False and True.

steer's off_mask sets the logit to -inf instead. Where the two agree and where they deliberately differ:
- selection: identical whenever at least top_k experts stay on (min - 0.01 is below every other
  expert, so it is only picked when fewer than top_k remain; steer refuses that case with an error),
  up to ties that SteerMoE's fp32 log_softmax creates between near-equal logits (2 of 108 token-cases
  here, each checked to be such a tie);
- weights with renormalisation: identical (the selected sum cancels the denominator);
- weights without renormalisation: SteerMoE's masked experts keep a residual share r = n_off *
  exp(min - 0.01) / Z in the softmax denominator, so steer's weights = SteerMoE's / (1 - r).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from steer.kernels.router import RouterEdit, RoutingRule, route

FIXTURE = Path(__file__).parent / "fixtures" / "steermoe" / "steermoe_routing_smollm2_moe.json"


@pytest.fixture(scope="module")
def fx():
    return json.loads(FIXTURE.read_text())


def _inputs(fx, case):
    logits = torch.tensor(fx["inputs"]["router_logits"][str(case["layer"])], dtype=torch.float32)
    off = torch.zeros(fx["inputs"]["num_experts"], dtype=torch.bool)
    off[case["off"]] = True
    return logits, off


def _sets(w, i):
    order = i.argsort(dim=-1)
    return i.gather(1, order), w.gather(1, order)


def _cases(fx, *, feasible):
    k, E = fx["top_k"], fx["inputs"]["num_experts"]
    return [c for c in fx["cases"] if (E - len(c["off"]) >= k) == feasible]


def test_fixture_records_the_reference_and_real_inputs(fx):
    ref = fx["reference"]
    assert ref["repository"].endswith("adobe-research/SteerMoE") and len(ref["commit"]) == 40
    assert fx["inputs"]["model"] == "smollm2-moe" and fx["inputs"]["model_type"] == "qwen2_moe"
    assert not fx["inputs"]["norm_topk_prob"] and fx["top_k"] == 12
    assert len(_cases(fx, feasible=True)) == 6 and len(_cases(fx, feasible=False)) == 2
    # SteerMoE's edit really is min - 0.01 of the log-probabilities: check on the recorded edited logits
    for c in fx["cases"]:
        logits, off = _inputs(fx, c)
        lp = torch.log_softmax(logits, dim=-1)
        edited = torch.tensor(c["edited_logits"])
        torch.testing.assert_close(
            edited[:, off], (lp.min(-1, keepdim=True).values - 0.01).expand(-1, int(off.sum()))
        )
        torch.testing.assert_close(edited[:, ~off], lp[:, ~off])


def test_off_mask_matches_steermoe_selection_and_weights(fx):
    k = fx["top_k"]
    for c in _cases(fx, feasible=True):
        logits, off = _inputs(fx, c)
        rule = RoutingRule("softmax_topk", k, norm_topk_prob=c["renormalize"])
        got = route(logits, rule, RouterEdit(off_mask=off), backend="torch")
        gi, gw = _sets(got.weights.float(), got.indices)
        si, sw = _sets(torch.tensor(c["weights"]), torch.tensor(c["indices"]))
        assert not torch.isin(gi, torch.tensor(c["off"])).any()
        # same experts for every token, except where SteerMoE's fp32 log_softmax rounds two experts' log-
        # probabilities to the same value (near-uniform rows, logits ~1e-4) and its top-k breaks the tie
        # the other way: steer ranks the exact logits
        lp = torch.log_softmax(logits, dim=-1)
        differ = (gi != si).any(-1)
        for t in differ.nonzero().flatten().tolist():
            ours, theirs = (
                set(gi[t].tolist()) - set(si[t].tolist()),
                set(si[t].tolist()) - set(gi[t].tolist()),
            )
            assert len(ours) == len(theirs) == 1, (c["case"], t)
            assert lp[t, ours.pop()] == lp[t, theirs.pop()], (c["case"], t)
        assert int(differ.sum()) <= 1, c["case"]
        gw, sw, logits, gi = gw[~differ], sw[~differ], logits[~differ], gi[~differ]
        if c["renormalize"]:
            torch.testing.assert_close(gw, sw, atol=1e-6, rtol=1e-5)
        else:
            # the one deliberate difference: SteerMoE's residual share r of the switched-off experts
            lp = torch.log_softmax(logits, dim=-1)
            res = len(c["off"]) * torch.exp(lp.min(-1, keepdim=True).values - 0.01)
            r = res / (torch.exp(lp[:, ~off]).sum(-1, keepdim=True) + res)
            torch.testing.assert_close(gw * (1 - r), sw, atol=1e-6, rtol=1e-5)
            assert (gw - sw).abs().max() > 1e-4  # the difference is real, not rounding
            # and steer's weights are the softmax over the unmasked experts (logit -inf), exactly
            torch.testing.assert_close(
                gw,
                torch.softmax(logits[:, ~off], -1).gather(
                    1, torch.searchsorted(torch.nonzero(~off).flatten(), gi)
                ),
                atol=1e-6,
                rtol=1e-5,
            )


def test_too_many_experts_off_steermoe_selects_them_steer_refuses(fx):
    """16 - 5 = 11 experts left for top-12: SteerMoE's min - 0.01 experts fill the missing slot (with a
    tiny weight); steer's -inf mask cannot, and says so instead of silently routing to an off expert."""
    k = fx["top_k"]
    for c in _cases(fx, feasible=False):
        assert (
            c["masked_selected_tokens"] == fx["inputs"]["n_tokens"]
        )  # every token got a switched-off expert
        w, i = torch.tensor(c["weights"]), torch.tensor(c["indices"])
        picked = torch.isin(i, torch.tensor(c["off"]))
        assert (picked.sum(-1) == 1).all() and (w[picked] < w[~picked].view(len(w), -1).min(-1).values).all()
        logits, off = _inputs(fx, c)
        with pytest.raises(ValueError, match="fewer than top_k"):
            route(
                logits,
                RoutingRule("softmax_topk", k, norm_topk_prob=c["renormalize"]),
                RouterEdit(off_mask=off),
            )
