"""Parity of steer.probes with the LYNX paper's released code (farukakgul/LYNX) on the same inputs.

tests/fixtures/lynx_reference/ holds what the reference's own scripts and functions returned (README.md there:
commit, functions, command): its probe (train_probe.py: StandardScaler + MLPClassifier) trained on the real
SmolLM2 cue events of experiments/lynx/out_rerun, its thresholds (calibrate_conformal.py) on the calibration
split, its prediction sets (utils.predictive_set_binary) on the test split, utils.conformal_quantile on fixed
scores, and its features / cue positions / exit prefixes on the packaged SmolLM2.

Where the reference is right, steer gives the same outputs: probe scores within fp32 rounding once its weights
are loaded into a LynxProbe, the same thresholds (exactly, on the same scores) and the same exit decisions, and
the same feature vectors for the same layers. Where steer deliberately differs, both behaviours are checked:
- too few calibration events of a class (rank ceil((n+1)(1-delta)) > n): the reference clamps the rank to n
  (its threshold is the largest score, and the guarantee is void); steer returns +inf, so it never exits
  (ALGORITHMS.md section 3, step 5; steer.probes.conformal).
- the rank is computed exactly (delta as a fraction); the reference's float ceil is one too high for some
  (n, delta), e.g. n=149, delta=0.18 (124th instead of 123rd smallest): steer's threshold is then lower.
- cue words: the reference matches substrings ("await", "Waiting" are cues there); steer matches whole words.
- exit cut: the reference cuts before the token holding the cue's LAST character, so for a multi-token cue
  ("; H" + "MM") the forced-exit prompt keeps the cue's first tokens; steer cuts before the whole cue.
  The reference also decodes that prompt without special tokens (the chat template's markers are lost) and
  re-tokenizes the text; steer appends the exit string's ids to the kept ids.
- feature layers: for depths outside the reference's table (28, 32, 36, 64 layers) the reference uses hidden
  states 9 and 16 whatever the depth; steer uses blocks at 30/50/75% of the depth (steer.probes.features).
  With the reference's points passed explicitly, steer's features equal the reference's.
Not compared: training. The reference fits sklearn's MLPClassifier (alpha=1e-4 over the batch weight sum, batch
min(200, n), up to 500 epochs, early stopping on validation ACCURACY, a further 20% held out inside the 80%
training split); steer trains its own torch MLP (ProbeConfig; its docstring says how weight_decay maps).
The recorded sklearn parameters are checked so that those statements stay true.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from steer.probes.conformal import calibrate, conformal_quantile, conformal_rank
from steer.probes.cues import CueSet, find_cues
from steer.probes.features import LYNX_LAYERS, capture_features, default_points
from steer.probes.generate import LYNX_EXIT_STRING, LynxPolicy
from steer.probes.probe import LynxProbe, ProbeConfig

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures" / "lynx_reference"
META = json.loads((FIX / "reference.json").read_text())
REF = load_file(FIX / "reference.safetensors")
CUES = ROOT / "experiments" / "lynx" / "out_rerun"
DELTAS = (0.05, 0.1, 0.2)


@pytest.fixture(scope="module")
def cues():
    """The real cue events the reference was run on (features of SmolLM2 at its cue tokens)."""
    if not CUES.is_dir():
        pytest.skip("experiments/ ships with the source checkout, not the wheel")
    out = {}
    for s in ("calibration", "test"):
        d = load_file(CUES / f"cues_{s}.safetensors")
        for k in ("features", "labels"):
            got = hashlib.sha256(d[k].numpy().tobytes()).hexdigest()
            assert got == META["cues_sha256"][s][k], f"experiments/lynx/out_rerun/cues_{s} changed: rerun capture.py"
        out[s] = d
    return out


@pytest.fixture(scope="module")
def probe():
    """The reference's trained pipeline, loaded into a LynxProbe (scaler -> mean/std, coefs_ -> weights)."""
    n_features = REF["scaler.mean"].numel()
    pr = LynxProbe(n_features, META["hidden"])
    with torch.no_grad():
        pr.mean.copy_(REF["scaler.mean"])
        pr.std.copy_(REF["scaler.scale"])
        for i, lin in enumerate(pr.linears):
            lin.weight.copy_(REF[f"coef.{i}"].T)
            lin.bias.copy_(REF[f"intercept.{i}"])
    return pr.eval()


def _exits(sets: list[list[int]]) -> list[bool]:
    return [s == [1] for s in sets]  # early_exit_eval.py: exit iff the set is exactly {1}


@torch.no_grad()
def test_probe_scores_match_the_reference(probe, cues):
    for s in ("calibration", "test"):
        torch.testing.assert_close(probe(cues[s]["features"]), REF[f"p.{s}"], atol=1e-6, rtol=0)
    # early_exit_eval.py scores one event at a time (float64 of the float32 probability)
    torch.testing.assert_close(probe(cues["test"]["features"]).double(), REF["p.test_single"], atol=1e-6, rtol=0)
    p = REF["p.test"]
    assert 0.01 < float((p > 0.5).float().mean()) < 0.99  # an informative probe, not a constant


@torch.no_grad()
@pytest.mark.parametrize("delta", DELTAS)
def test_thresholds_and_exit_decisions_match_the_reference(probe, cues, delta):
    """End to end: steer's probe -> steer's calibration -> steer's exit rule on the test cue events."""
    ref = META["conformal"][f"delta_{delta}"]
    y = cues["calibration"]["labels"]
    cal = calibrate(probe(cues["calibration"]["features"]), y, delta)
    assert (cal.n0, cal.n1) == (ref["n_neg"], ref["n_pos"])
    assert cal.q0 == pytest.approx(ref["q_neg"], abs=1e-6) and cal.q1 == pytest.approx(ref["q_pos"], abs=1e-6)
    p_test = probe(cues["test"]["features"])
    mine = cal.should_exit(p_test).tolist()
    assert mine == _exits(META["test_sets"][f"delta_{delta}"])
    assert 0 < sum(mine) < len(mine)
    policy = LynxPolicy(probe, cal)  # the online generator's decision, one score at a time
    assert [policy.decide(float(v), None) for v in p_test] == mine
    # the decisions are not within rounding of a threshold, so fp32 differences cannot flip them
    p64 = p_test.double()
    assert min(float((p64 - cal.q0).abs().min()), float((1 - p64 - cal.q1).abs().min())) > 1e-5


@pytest.mark.parametrize("delta", DELTAS)
def test_same_scores_give_the_same_thresholds_and_sets_exactly(delta):
    """On the reference's own probabilities, steer's thresholds and prediction sets are bit-identical,
    including at the thresholds and one float step either side of them."""
    ex = META["exact"][str(delta)]
    p_cal = REF["p.calibration"].double()
    cal = calibrate(p_cal, REF["labels.calibration"], delta)
    assert cal.q0 == ex["q_neg"] and cal.q1 == ex["q_pos"]
    sets = cal.prediction_set(REF[f"exact.grid.{delta}"])
    mine = [sorted(c for c in (0, 1) if row[c]) for row in sets.tolist()]
    assert mine == [sorted(s) for s in ex["sets"]]
    assert any(len(s) == 2 for s in mine) and any(s == [1] for s in mine) and any(s == [0] for s in mine)


@torch.no_grad()
def test_too_few_calibration_events_reference_clamps_steer_never_exits(probe, cues):
    """Deliberate difference: 8 negatives at delta 0.1 (the rank 9 > 8). The reference takes the largest
    score and exits; steer's threshold is +inf and it never exits. With the reference's clamped threshold
    put in its place, steer's exit rule gives the reference's decisions: the clamp is the only difference."""
    ref, n = META["conformal"]["clamp"], META["clamp_events"]
    p_cal = probe(cues["calibration"]["features"][:n])
    y = cues["calibration"]["labels"][:n]
    with pytest.warns(UserWarning, match="too few"):
        cal = calibrate(p_cal, y, ref["delta"])
    assert (cal.n0, cal.n1) == (ref["n_neg"], ref["n_pos"]) == (n, 0)
    assert conformal_rank(n, ref["delta"]) > n
    assert math.isinf(cal.q0) and math.isinf(cal.q1) and math.isinf(ref["q_pos"])
    assert ref["q_neg"] == pytest.approx(float(p_cal.max()), abs=1e-6)  # the reference's clamp: the n-th smallest
    p_test = probe(cues["test"]["features"])
    theirs = _exits(META["test_sets"]["clamp"])
    assert not cal.should_exit(p_test).any() and sum(theirs) > 0
    cal.q0 = ref["q_neg"]
    assert cal.should_exit(p_test).tolist() == theirs


@pytest.mark.parametrize("delta", [0.05, 0.1, 0.18, 0.2])
def test_conformal_quantile_over_n(delta):
    """conformal_quantile for every n in 1..200: equal to the reference wherever the rank is <= n and the
    reference's float rank is exact; +inf where the reference clamps; one rank lower where its float rounds up."""
    scores = REF["sweep.scores"]
    theirs = META["sweep"][str(delta)]
    float_rank_off = []
    for n in range(1, 201):
        mine, ref = conformal_quantile(scores[:n], delta), theirs[n - 1]
        k = conformal_rank(n, delta)
        ordered = torch.sort(scores[:n]).values.tolist()
        if k > n:
            assert math.isinf(mine) and ref == ordered[-1], n  # deliberate: no clamp
        elif ref != mine:
            assert ref == ordered[k] and mine == ordered[k - 1], n  # deliberate: exact rank
            float_rank_off.append(n)
        else:
            assert mine == ordered[k - 1]
    assert float_rank_off == ([149] if delta == 0.18 else [])


def test_feature_layer_rule():
    """The reference's rule (early_exit_eval.main, run for each depth): steer follows its table for the depths
    it names and uses its own depth-aware fallback elsewhere, where the reference always takes 9 and 16."""
    for n, layers in META["layer_table"].items():
        n = int(n)
        ref_points = [f"blocks.{i - 1}.resid_post" for i in layers] + ["final_norm.out"]
        if n in LYNX_LAYERS:
            assert default_points(n) == ref_points
        else:
            assert layers == [9, 16] and default_points(n) != ref_points  # deliberate: the fallback
    assert META["features"]["feature_layers"] == [9, 16]  # SmolLM2 (30 layers) is not in the reference's table
    assert default_points(30) == ["blocks.8.resid_post", "blocks.14.resid_post", "blocks.22.resid_post",
                                  "final_norm.out"]


def test_features_cue_positions_and_exit_cut_on_smollm2(smollm2):
    """build_event_features on SmolLM2 equals steer's features at the same points (both backends); steer finds
    the reference's whole-word cues at the same tokens and cuts before the whole cue."""
    f = META["features"]
    assert smollm2.weights_hash == f["weights_hash"] and f["last_layer"] == 30
    ids, enc = REF["input_ids"], f["enc_len"]
    events = f["events"]
    points = [f"blocks.{i - 1}.resid_post" for i in f["feature_layers"]] + ["final_norm.out"]
    positions = torch.tensor([e["abs_pos"] for e in events])
    for backend in ("hooks", "hidden_states"):
        mine = capture_features(smollm2.model, ids[None], None, points, backend=backend)[0, positions]
        torch.testing.assert_close(mine, REF["features"], atol=1e-4, rtol=1e-4)  # thread count: summation order

    tok = smollm2.tokenizer
    new = ids[enc:].tolist()
    found = find_cues(new, tok, CueSet())  # hmm / wait / alternatively, as the reference
    theirs = {(e["cue"], e["pos_rel"] - 1) for e in events}  # pos_rel is 1-based
    mine_ev = {(m.cue, m.cue_token) for m in found}
    assert mine_ev < theirs and len(mine_ev) == 4
    for cue, t in theirs - mine_ev:  # "await", "Waiting": a cue only for the reference's substring match
        window = tok.decode(new[max(0, t - 2): t + 2]).lower()
        assert re.search(rf"\w{cue}|{cue}\w", window), window

    def prefix(n_new: int) -> str:
        kept = tok.decode(ids[: enc + n_new].tolist(), skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return kept + LYNX_EXIT_STRING

    by_token = {e["pos_rel"] - 1: e for e in events}
    multi = 0
    for m in found:
        ref_prefix = by_token[m.cue_token]["exit_prefix"]
        assert ref_prefix == prefix(m.cue_token)  # the reference cuts before the cue's last token
        if m.cut == m.cue_token:
            assert prefix(m.cut) == ref_prefix
        else:  # a cue of several tokens: the reference's prompt keeps its first tokens, steer's does not
            multi += 1
            assert ref_prefix.startswith(prefix(m.cut)[: -len(LYNX_EXIT_STRING)]) and prefix(m.cut) != ref_prefix
    assert multi == 1
    assert "<|im_start|>" in tok.decode(ids[:enc].tolist()) and "<|im_start|>" not in ref_prefix


def test_recorded_reference_training_parameters():
    """What the docstrings say about the reference's training is what it ran with."""
    mp = META["mlp_params"]
    cfg = ProbeConfig()
    assert (mp["activation"], mp["out_activation"], mp["solver"]) == ("relu", "logistic", "adam")
    assert mp["learning_rate_init"] == cfg.lr and mp["n_iter_no_change"] == cfg.patience
    assert mp["validation_fraction"] == cfg.validation_fraction and mp["early_stopping"]
    assert mp["alpha"] == 1e-4 and mp["batch_size"] == "auto"  # sklearn: alpha / min(200, n) on weights only
    assert META["probe_metrics"]["w_pos"] == pytest.approx(META["probe_metrics"]["n_train"] / (2 * META["probe_metrics"]["train_pos"]))
