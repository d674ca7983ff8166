"""Cues, answer checkers, conformal calibration (the guarantee on synthetic exchangeable scores),
the probe (training, exact forward, safetensors round trip), labelled-cue files, task splits."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

from steer.probes.answers import BoxedChecker, ChoiceChecker, NumericChecker, get_checker
from steer.probes.conformal import (
    ConformalCalibration,
    calibrate,
    conformal_quantile,
    conformal_rank,
    min_calibration_size,
)
from steer.probes.cues import CueSet, CueTracker, find_cues
from steer.probes.data import SPLITS, LabelledCues, arithmetic_problems, split_of
from steer.probes.features import default_points, hidden_state_index
from steer.probes.probe import LynxProbe, ProbeConfig, ProbeInfo, auc, train_probe
from steer.tiny import tiny_tokenizer

# ---- cues ----------------------------------------------------------------------------------------


def _events(text, cues):
    tok = tiny_tokenizer()
    return find_cues(tok(text, add_special_tokens=False)["input_ids"], tok, cues)


def test_word_cues_respect_word_boundaries():
    cues = CueSet()
    names = [e.cue for e in _events("we await. Wait, waiting... hmm ok; alternatively x", cues)]
    assert names == ["wait", "hmm", "alternatively"]  # not "await", not "waiting"
    ev = _events("so wait then", cues)[0]
    # byte tokenizer: the cue is chars 3..7, its last token is 'wait'[-1], the cut is its first token
    assert (ev.cut, ev.cue_token, ev.char_start, ev.char_end) == (3, 6, 3, 7)


def test_cue_needs_lookahead_for_right_boundary():
    tok = tiny_tokenizer()
    tr = CueTracker(CueSet(), tok)
    ids = tok("a wait", add_special_tokens=False)["input_ids"]
    out = [tr.push(i) for i in ids]
    assert not any(out)  # "wait" at the very end: not yet known to be a whole word
    assert tr.push(tok("!", add_special_tokens=False)["input_ids"][0])[0].cue == "wait"
    tr2 = CueTracker(CueSet(), tok)
    for i in tok("a waiting", add_special_tokens=False)["input_ids"]:
        assert not tr2.push(i)


def test_structural_cues():
    cues = CueSet(words=(), structural=("blank_line", "newline", "sentence_end"))
    text = "Step 1. x = 2.5 ok\nnext\n\nlast line\nz"
    assert [m[0] for m in cues.matches(text)] == ["sentence_end", "newline", "blank_line", "newline"]
    assert [e.cue for e in _events("Step 1. x = 2.5 ok", cues)] == ["sentence_end"]  # not the decimal point
    assert CueSet.parse("wait, blank_line").structural == ("blank_line",)
    with pytest.raises(ValueError, match="unknown structural"):
        CueSet(structural=("paragraph",))
    with pytest.raises(ValueError, match="empty cue set"):
        CueSet(words=())


# ---- answers -------------------------------------------------------------------------------------


def test_checkers():
    num = NumericChecker()
    assert num.check(" 1,200.", 1200) and num.check("3/4 of", "0.75") and not num.check(" about", 3)
    assert num.check(" 2 * 5 = 10 apples", 10) and not num.check(" 2 * 5 = 10", 2)  # a calculation's result
    assert num.check("so 2 + 3 = 5.\nThe answer is 5.", 5, forced=False)
    assert not num.check("The answer is 6. then 5", 5, forced=False)  # last *stated* answer counts
    box = BoxedChecker()
    assert box.check("42} because", 42) and box.check("x \\boxed{\\frac{1}{2}} y", "\\frac{1}{2}", forced=False)
    ch = ChoiceChecker()
    assert ch.check(" (B) since", "b") and not ch.check(" none", "A")
    assert get_checker("boxed").name == "boxed"
    with pytest.raises(ValueError, match="unknown answer checker"):
        get_checker("regex")


# ---- conformal -----------------------------------------------------------------------------------


def test_rank_and_quantile_exact():
    assert conformal_rank(19, 0.05) == 19
    assert conformal_rank(149, 0.18) == 123  # float arithmetic gives 124
    assert min_calibration_size(0.05) == 19 and min_calibration_size(0.1) == 9
    s = torch.arange(1.0, 20.0)  # 1..19
    assert conformal_quantile(s, 0.05) == 19.0
    assert math.isinf(conformal_quantile(s[:18], 0.05))
    assert conformal_quantile(s, 0.5) == 10.0  # ceil(20 * 0.5) = 10th smallest


def test_prediction_set_and_exit_rule():
    cal = ConformalCalibration(0.1, q0=0.6, q1=0.5, n0=100, n1=100)
    p = torch.tensor([0.3, 0.55, 0.7, 0.9])
    sets = cal.prediction_set(p)
    assert sets.tolist() == [[True, False], [True, True], [False, True], [False, True]]
    assert cal.should_exit(p).tolist() == [False, False, True, True]


@pytest.mark.parametrize("delta", [0.05, 0.1, 0.2])
def test_conformal_guarantee_on_exchangeable_scores(delta):
    """Over many seeds, the premature-exit rate P(exit | y=0) on fresh exchangeable negatives is
    <= delta within sampling error; the bound is tight on its driver P(0 not in set | y=0)."""
    seeds, n_cal, n_test = 300, 80, 200
    exits, excluded, n0s = [], [], []
    for seed in range(seeds):
        g = torch.Generator().manual_seed(seed)
        y = (torch.rand(n_cal, generator=g) < 0.5).long()
        p = torch.sigmoid(torch.randn(n_cal, generator=g) + 1.0 * (2 * y - 1))  # informative, noisy
        cal = calibrate(p, y, delta, warn=False)
        p_neg = torch.sigmoid(torch.randn(n_test, generator=g) - 1.0)  # fresh negatives, same law
        exits.append(float(cal.should_exit(p_neg).double().mean()))
        excluded.append(float((p_neg > cal.q0).double().mean()))
        n0s.append(cal.n0)
    exits, excluded = torch.tensor(exits), torch.tensor(excluded)
    se = float(excluded.std()) / math.sqrt(seeds)
    assert float(exits.mean()) <= delta + 3 * se
    assert float(excluded.mean()) <= delta + 3 * se
    # finite-sample: E[excluded] = 1 - k/(n0+1) >= delta - 1/(n0+1); so not vacuous either
    slack = max(1 / (n + 1) for n in n0s)
    assert float(excluded.mean()) >= delta - slack - 3 * se


def test_conformal_exact_coverage_fixed_n():
    """With n0 fixed, P(test negative exceeds q0) = 1 - k/(n0+1) exactly (continuous scores)."""
    n0, delta, seeds = 29, 0.1, 3000
    k = conformal_rank(n0, delta)
    g = torch.Generator().manual_seed(0)
    hits = 0
    for _ in range(seeds):
        s = torch.rand(n0 + 1, generator=g)
        cal = calibrate(s[:n0], torch.zeros(n0), delta, warn=False)
        hits += int(cal.should_exit(s[n0:]).item())  # no positives: q1 = +inf, label 1 always in the set
    expected = 1 - k / (n0 + 1)
    assert expected <= delta
    assert abs(hits / seeds - expected) < 4 * math.sqrt(expected * (1 - expected) / seeds)


def test_small_calibration_set_never_exits_and_says_so():
    p = torch.tensor([0.1, 0.2, 0.9, 0.8, 0.95])
    y = torch.tensor([0, 0, 1, 1, 1])
    with pytest.warns(UserWarning, match="too few for delta=0.1"):
        cal = calibrate(p, y, 0.1)
    assert math.isinf(cal.q0) and not cal.can_exit
    assert not bool(cal.should_exit(torch.tensor([0.999999])).any())
    assert any("never trigger an exit" in n for n in cal.notes)
    # a clamped quantile (the released code's bug) would exit here; we do not
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        big = calibrate(torch.rand(100), torch.arange(100) % 2, 0.1)
    assert math.isfinite(big.q0)


@pytest.mark.parametrize("delta", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_bad_delta(delta):
    with pytest.raises(ValueError, match=r"delta must be in \(0, 1\)"):
        calibrate(torch.rand(10), torch.zeros(10), delta)


def test_empty_calibration_set():
    with pytest.raises(ValueError, match="empty calibration set"):
        calibrate(torch.empty(0), torch.empty(0), 0.1)
    with pytest.raises(ValueError, match="labels must be 0 or 1"):
        calibrate(torch.rand(3), torch.tensor([0, 1, 2]), 0.1)


def test_calibration_json_round_trip(tmp_path):
    cal = calibrate(torch.tensor([0.1, 0.9]), torch.tensor([0, 1]), 0.2, warn=False)
    cal.save(tmp_path / "c.json")
    back = ConformalCalibration.load(tmp_path / "c.json")
    assert back == cal and math.isinf(back.q0)


# ---- probe ---------------------------------------------------------------------------------------


def _synthetic(n=400, f=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = (torch.rand(n, generator=g) < 0.3).long()
    x = torch.randn(n, f, generator=g) * 3 + 5
    x[:, 0] += 7.0 * y  # one informative feature (Bayes AUC ~0.95), offset and scale need standardising
    return x, y


def test_probe_learns_and_forward_is_the_documented_function():
    x, y = _synthetic()
    info = ProbeInfo("m", 3, 4, ["blocks.0.resid_post", "blocks.1.resid_post", "final_norm.out"])
    probe = train_probe(x[:300], y[:300], ProbeConfig(max_epochs=60, patience=8), info)
    with torch.no_grad():
        p = probe(x[300:])
    assert auc(p, y[300:]) > 0.85
    assert probe.info.n_val > 0 and not math.isnan(probe.info.val_auc)
    # standardise -> Linear 256 -> ReLU -> Linear 64 -> ReLU -> Linear 1 -> sigmoid
    (w1, b1), (w2, b2), (w3, b3) = [(lin.weight, lin.bias) for lin in probe.linears]
    assert w1.shape == (256, 12) and w2.shape == (64, 256) and w3.shape == (1, 64)
    h = (x[300:] - probe.mean) / probe.std
    ref = torch.sigmoid(torch.relu(torch.relu(h @ w1.T + b1) @ w2.T + b2) @ w3.T + b3).squeeze(-1)
    torch.testing.assert_close(p, ref.detach())
    # score_hidden: per-point hidden states at positions == forward of concatenated features
    hid = [torch.randn(5, 7, 4) for _ in range(3)]
    pos = torch.tensor([0, 6, 3, 2, 1])
    feats = torch.cat([h[torch.arange(5), pos] for h in hid], -1)
    small = LynxProbe(12, (8, 4))
    torch.testing.assert_close(small.score_hidden(hid, pos), small(feats))


def test_probe_save_load_is_safetensors_and_json(tmp_path):
    x, y = _synthetic(80)
    info = ProbeInfo("m", 3, 4, ["final_norm.out"], cues=CueSet(structural=("newline",)).to_json())
    probe = train_probe(x, y, ProbeConfig(max_epochs=5), info)
    probe.calibration = calibrate(torch.rand(50), torch.zeros(50), 0.1, warn=False)
    d = probe.save(tmp_path / "probe")
    assert sorted(p.name for p in d.iterdir()) == ["probe.json", "probe.safetensors"]
    meta = json.loads((d / "probe.json").read_text())
    assert meta["info"]["points"] == ["final_norm.out"] and (meta["format"], meta["version"]) == ("steer.lynx_probe", 2)
    back = LynxProbe.load(d)
    with torch.no_grad():
        torch.testing.assert_close(back(x), probe(x))
    assert back.calibration == probe.calibration and back.cue_set.structural == ("newline",)
    with pytest.raises(ValueError, match="expects 12 features"):
        back(torch.randn(2, 11))
    with pytest.raises(FileNotFoundError, match="not a saved probe"):
        LynxProbe.load(tmp_path)


def test_probe_training_bad_inputs():
    with pytest.raises(ValueError, match="at least 4"):
        train_probe(torch.randn(3, 2), torch.tensor([0, 1, 0]))
    with pytest.raises(ValueError, match="one label each"):
        train_probe(torch.randn(10, 2), torch.zeros(9))


# ---- features / data -----------------------------------------------------------------------------


def test_default_points_and_hidden_state_indexing():
    assert default_points(30) == ["blocks.8.resid_post", "blocks.14.resid_post", "blocks.22.resid_post",
                                  "final_norm.out"]
    assert hidden_state_index("blocks.8.resid_post", 30) == 9
    # the reference's table (farukakgul/LYNX feature_layers): HF hidden-state indices + the last entry
    for n, want in {28: [9, 16], 32: [8, 16, 24], 36: [12, 18, 24], 64: [16, 32, 48]}.items():
        pts = default_points(n)
        assert [hidden_state_index(p, n) for p in pts] == want + [n], n  # R1-1.5B: hidden states 9, 16, last
        assert pts[-1] == "final_norm.out"
    assert default_points(28, depths=(0.5,)) == ["blocks.13.resid_post", "final_norm.out"]  # explicit depths win
    assert hidden_state_index("final_norm.out", 30) == 30
    with pytest.raises(ValueError, match="pre-norm output of the last layer"):
        hidden_state_index("blocks.29.resid_post", 30)
    with pytest.raises(ValueError, match="does not exist"):
        hidden_state_index("blocks.30.resid_post", 30)


def test_problem_splits_are_disjoint_and_checkable(tmp_path):
    qs = {s: arithmetic_problems(40, seed=1, split=s) for s in SPLITS}
    sets = {s: {p.question for p in ps} for s, ps in qs.items()}
    assert not (sets["train"] & sets["calibration"]) and not (sets["train"] & sets["test"])
    assert not (sets["calibration"] & sets["test"])
    assert all(split_of(p.question) == s for s, ps in qs.items() for p in ps)
    assert arithmetic_problems(5, seed=1) == arithmetic_problems(5, seed=1)
    lab = LabelledCues(torch.randn(4, 3), torch.tensor([0, 1, 1, 0]), torch.tensor([0, 0, 1, 1]),
                       torch.tensor([3, 9, 2, 5]), {"points": ["final_norm.out"]})
    lab.to_safetensors(tmp_path / "c.safetensors")
    back = LabelledCues.from_safetensors(tmp_path / "c.safetensors")
    assert torch.equal(back.features, lab.features) and back.meta == lab.meta


def test_probe_matches_fused_kernel_reference():
    """The probe computes exactly what steer.kernels.probe_score computes (its CPU reference)."""
    probe_score = pytest.importorskip("steer.kernels.probe_score")
    torch.manual_seed(0)
    probe = LynxProbe(3 * 8, (256, 64)).eval()
    probe.mean.normal_()
    probe.std.uniform_(0.5, 2.0)
    hid = [torch.randn(4, 5, 8) for _ in range(3)]
    pos = torch.tensor([4, 0, 2, 3])
    layers = [(lin.weight, lin.bias) for lin in probe.linears]
    with torch.no_grad():
        ref = probe_score.probe_score_reference(hid, pos, probe.mean, probe.std, layers)
        torch.testing.assert_close(probe.score_hidden(hid, pos), ref)
