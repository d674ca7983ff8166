"""Parity with adamkarvonen/difr's released code: its outputs on the same SmolLM2 inputs, recorded in
tests/fixtures/difr_reference/ (README there: commit, functions, commands)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from steer.difr import DiFRConfig, Fingerprints, SamplingParams, activation_distances, token_margins
from steer.difr.verify import TOKEN_CLIP, clip_margins, window_means

FIX = Path(__file__).parent / "fixtures" / "difr_reference"
SETTINGS = {"t1_p095": SamplingParams(1.0, 0.95), "t07_p09_k20": SamplingParams(0.7, 0.9, 20),
            "t1_p095_cheatgold": SamplingParams(1.0, 0.95)}


@pytest.fixture(scope="module")
def fixture():
    return load_file(FIX / "inputs.safetensors"), load_file(FIX / "reference_outputs.safetensors")


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_token_difr_margins_and_clip_match_the_reference(smollm2, fixture, setting):
    inp, ref = fixture
    with torch.no_grad():
        logits = smollm2.model.lm_head(inp["hidden_verifier_honest"]).float()
    gold = inp["output_ids_cheat"] if setting.endswith("cheatgold") else inp["gold"]
    lengths = inp["output_lengths_honest"].tolist()
    starts = torch.tensor([0, *lengths]).cumsum(0)[:-1]
    mine = torch.cat([token_margins(lg, g, int(inp["noise_seeds"][s]), SETTINGS[setting])
                      for lg, g, s in zip(logits.split(lengths), gold.split(lengths), starts.tolist())])
    theirs = ref[f"margin_{setting}"]
    assert torch.equal(torch.isinf(mine), torch.isinf(theirs))  # same support (top-k / top-p conventions)
    finite = torch.isfinite(theirs)
    torch.testing.assert_close(mine[finite], theirs[finite], atol=1e-4, rtol=1e-5)
    # the score both feed to their statistic: min(margin, 0.5), inf -> 0.5
    torch.testing.assert_close(clip_margins(mine, TOKEN_CLIP), ref[f"margin_feature_{setting}"], atol=1e-4, rtol=1e-5)
    if setting != "t1_p095":  # honest tokens score exactly 0; the others must exercise the clip
        assert (theirs > TOKEN_CLIP).any() and torch.isinf(theirs).any()


@pytest.mark.parametrize("k", [2, 8])
@pytest.mark.parametrize("case", ["honest", "cheat"])
def test_activation_difr_l2_matches_the_reference(fixture, k, case):
    inp, ref = fixture
    p = ref[f"projection_k{k}"]
    hp, hv = inp[f"hidden_provider_{case}"], inp[f"hidden_verifier_{case}"]
    n = inp["output_lengths_honest"]
    fp = Fingerprints((hp @ p).to(torch.float16), inp["prompt_ids_honest"], inp["prompt_lengths_honest"],
                      inp["gold"], n, "smollm2", "x", DiFRConfig(k=k))
    mine = activation_distances(fp, hv, projection=p)  # the default statistic is the paper's L2
    # Recomputed on another CPU type, both fp32 products h @ P differ in their last bits (seen on an Intel Xeon
    # against fixtures recorded on an AMD EPYC: honest distances ~5e-3 moved by up to 5e-5), and a provider
    # element next to an fp16 rounding boundary would round one fp16 ulp the other way. A token's distance
    # may move by that fp32 noise (5e-6 of the projection's norm) plus one ulp of each near-boundary element.
    x = hp @ p
    x16 = x.to(torch.float16).float()
    ulp = 2.0 ** (torch.floor(torch.log2(x16.abs().clamp_min(2.0**-14))) - 10)
    near = ((x - x16).abs() - ulp / 2).abs() <= 1e-5 * x.abs() + 1e-6
    allowed = 5e-6 * torch.linalg.vector_norm(x, dim=-1) + torch.linalg.vector_norm(ulp * near, dim=-1) + 1e-6
    theirs = ref[f"l2_k{k}_{case}"]
    assert bool(((mine - theirs).abs() <= allowed + 1e-4 * theirs.abs()).all()), (
        f"token distances differ by up to {(mine - theirs).abs().max():.3g} (allowed {allowed.min():.3g}..)")
    if case == "cheat":
        assert float(mine.min()) > 100 * float(ref[f"l2_k{k}_honest"].max())
    with pytest.raises(ValueError, match="projection must be"):
        activation_distances(fp, hv, projection=p[:, :1])


def test_window_means_match_the_reference_buckets_on_one_sequence(fixture):
    _, ref = fixture
    d = ref["l2_k8_honest"][:12]
    for b in (1, 4, 5):
        torch.testing.assert_close(window_means(d, torch.tensor([12]), b), ref[f"buckets_{b}"], rtol=1e-6, atol=0)
