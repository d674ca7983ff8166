"""Routing robustness of a built MoE: near-tied routers flip under tiny perturbations, wider spreads less.

Uses a tiny random Llama split by steer.moebuild (as tests/test_moebuild.py does); the SmolLM2 numbers
are in experiments/moe_build/router_spread.json.
"""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from steer.moe_routing import routing_robustness
from steer.moebuild import MoEBuildConfig, build_moe, set_router_spread
from steer.tiny import tiny_model, tiny_tokenizer

WORDS = "the cat sat on a mat and a dog ran far away while birds sang in old green trees by the river".split()
TINY = MoEBuildConfig(num_experts=8, top_k=4, shared_neurons=32, calib_passages=48, heldout_passages=16,
                      calib_tokens=2048, heldout_tokens=512, seq_len=64)


def _texts() -> tuple[list[str], list[str]]:
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(50)) for _ in range(64)]
    return texts[:48], texts[48:]


def _build(spread: float):
    torch.manual_seed(0)
    _, moe = build_moe(tiny_model("llama"), dataclasses.replace(TINY, router_spread=spread), None,
                       tokenizer=tiny_tokenizer(), texts=_texts(), evaluate=False, progress=False, num_threads=1)
    # torch's grouped_mm needs 16-byte strides, which the tiny widths miss in bf16 (SmolLM2's do not)
    moe.config._experts_implementation = "eager"
    return moe


@pytest.fixture(scope="module")
def moe():
    return _build(1e-3)


IDS = torch.randint(3, 256, (4, 48), generator=torch.Generator().manual_seed(2))


def test_rescaling_routers_equals_building_with_that_spread(moe):
    other = _build(1e-1)
    set_router_spread(moe, 1e-1, 1e-3)
    try:
        for a, b in zip(moe.model.layers, other.model.layers):
            torch.testing.assert_close(a.mlp.gate.weight, b.mlp.gate.weight, rtol=1e-5, atol=0)
    finally:
        set_router_spread(moe, 1e-3, 1e-1)
    with pytest.raises(ValueError, match="router spreads must be in"):
        set_router_spread(moe, 0.0, 1e-3)


def test_zero_noise_changes_nothing_and_fractions_are_fractions(moe):
    r = routing_robustness(moe, IDS, noise=0.0, bf16=False)
    assert r["noise_local"] == 0.0 and r["noise_end_to_end"] == 0.0
    assert r["tokens"] == IDS.numel() and r["moe_layers"] == len(moe.model.layers) and r["k"] == TINY.top_k
    assert 0.0 <= r["bf16_local"] <= 1.0 and "bf16_end_to_end" not in r
    # the build's promise: logits spread at most ~router_spread on text like the calibration
    assert r["logit_range_median"] <= 2e-3


def test_logit_ranking_hook_edits_the_routing_the_readers_see(moe):
    from steer.moe_routing import _routing

    set_router_spread(moe, 1e-7, 1e-3)
    try:
        sets, _, logits = _routing(moe, IDS, rank_logits=True)
    finally:
        set_router_spread(moe, 1e-3, 1e-7)
    first = min(sets)
    want = logits[first].topk(TINY.top_k, dim=-1).indices.sort(-1).values
    assert torch.equal(sets[first], want)


def test_spread_too_small_ties_probabilities_and_logit_ranking_disagrees(moe):
    """fp32 softmax probabilities near 1/E cannot resolve logit gaps below ~1e-7: HF's top-k then breaks
    ties by expert index, and an engine that ranks the logits picks other experts. A wide spread
    leaves no ties (this tiny model, these tokens)."""
    set_router_spread(moe, 1e-7, 1e-3)
    try:
        tiny = routing_robustness(moe, IDS, noise=1e-6, bf16=False)
    finally:
        set_router_spread(moe, 1e-3, 1e-7)
    set_router_spread(moe, 1e-1, 1e-3)
    try:
        wide = routing_robustness(moe, IDS, noise=1e-6)
    finally:
        set_router_spread(moe, 1e-3, 1e-1)
    assert tiny["fp32_prob_ties"] > 0.2 and tiny["topk_of_logits"] > 0.05
    assert tiny["topk_of_logits_end_to_end"] >= tiny["topk_of_logits"] / 2
    assert wide["fp32_prob_ties"] == 0.0 and wide["topk_of_logits"] == 0.0
    assert wide["topk_of_logits_end_to_end"] == 0.0
    # bf16 rounds logits relative to their own scale: some token-layers flip whatever the spread
    assert wide["bf16_end_to_end"] > 0
