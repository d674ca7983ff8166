"""Activation-DiFR: provider fingerprints, the file format, teacher-forced verification, calibration."""

from __future__ import annotations

import json

import pytest
import torch

from steer.difr import (
    Calibration,
    DiFRConfig,
    Fingerprints,
    SamplingParams,
    activation_distances,
    calibrate,
    fingerprint_prompts,
    generate,
    projection_matrix,
    quantize_rtn,
    teacher_force,
    verify,
)
from steer.difr.fingerprint import left_pad, output_lengths
from steer.identity import ModelMismatchError, model_identity
from steer.tiny import tiny_model, tiny_tokenizer

PROMPTS = ["hello there", "a much longer prompt, padded less", "x", "the quick brown fox"]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def _fp(model, tok, prompts=PROMPTS, batch_size=4, **kw):
    kw.setdefault("max_new_tokens", 10)
    kw.setdefault("sampling", SamplingParams(temperature=1.0, top_p=0.9))
    return fingerprint_prompts(model, tok, prompts, batch_size=batch_size, chat=False, **kw)


# ---- projection ---------------------------------------------------------------------------------

def test_projection_is_a_function_of_the_public_seed():
    a = projection_matrix(DiFRConfig(k=8, seed=3), 64)
    assert a.dtype == torch.float32 and a.shape == (64, 8)
    assert torch.equal(a, projection_matrix(DiFRConfig(k=8, seed=3), 64))
    assert not torch.equal(a, projection_matrix(DiFRConfig(k=8, seed=4), 64))
    q = projection_matrix(DiFRConfig(k=8, seed=3, projection="orthonormal"), 64)
    torch.testing.assert_close(q.T @ q, torch.eye(8), atol=1e-5, rtol=0)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="projection"):
        DiFRConfig(projection="sparse")
    with pytest.raises(ValueError, match="k must"):
        DiFRConfig(k=0)


# ---- provider -----------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "mixtral"])
def test_recorded_hidden_states_match_an_independent_forward(family, tok):
    """The recorder keeps the post-norm state of the position that produced each token."""
    model = tiny_model(family)
    fp = _fp(model, tok, keep_hidden=True)
    assert fp.n_tokens == int(fp.output_lengths.sum()) and fp.values.dtype == torch.float16
    p = projection_matrix(fp.config, model.config.hidden_size)
    start = 0
    for prompt, out in fp.sequences():
        ids = torch.cat([prompt, out]).unsqueeze(0)
        with torch.no_grad():  # independent reference: the base model's last_hidden_state (post-norm)
            h = model.model(input_ids=ids).last_hidden_state[0]
        n = out.numel()
        ref_h = h[prompt.numel() - 1: prompt.numel() - 1 + n]
        torch.testing.assert_close(fp.hidden[start:start + n], ref_h, atol=2e-4, rtol=1e-4)
        torch.testing.assert_close(fp.values[start:start + n].float(), (ref_h @ p), atol=2e-2, rtol=1e-2)
        start += n


def test_fingerprints_do_not_depend_on_batching(llama, tok):
    a = _fp(llama, tok, batch_size=4)
    b = _fp(llama, tok, batch_size=1)
    assert torch.equal(a.output_ids, b.output_ids)  # seeds are per sequence, not per batch
    assert (a.values.float() - b.values.float()).norm(dim=-1).max() < 0.05


def test_only_real_generated_tokens_are_kept(llama, tok):
    """A row that hits EOS stops contributing; its padding is neither a token nor a fingerprint."""
    free = _fp(llama, tok, sampling=None, max_new_tokens=8)
    first_out = int(free.sequences()[0][1][2])  # make row 0's third token the EOS
    ids, mask = left_pad([tok(p)["input_ids"] for p in PROMPTS], 0)
    fp = generate(llama, ids, mask, max_new_tokens=8, eos_token_id=first_out)
    assert int(fp.output_lengths[0]) <= 3 and int(fp.output_ids[int(fp.output_lengths[0]) - 1]) == first_out
    assert fp.values.shape[0] == int(fp.output_lengths.sum())
    assert output_lengths(torch.tensor([[5, 2, 2], [5, 6, 7]]), 2).tolist() == [2, 3]


def test_right_padding_is_refused(llama):
    ids = torch.tensor([[5, 6, 0]])
    with pytest.raises(ValueError, match="left"):
        generate(llama, ids, torch.tensor([[1, 1, 0]]), max_new_tokens=2)
    # the recorder on its own (no up-front check) refuses too, once, when the block ends
    from steer.difr import FingerprintRecorder

    with pytest.raises(ValueError, match="left padding"):
        with FingerprintRecorder(llama, DiFRConfig()) as rec, torch.no_grad():
            llama(input_ids=ids, attention_mask=torch.tensor([[1, 1, 0]]))
    assert len(rec.steps) == 1


# ---- file format and bad inputs -------------------------------------------------------------------

def test_save_load_round_trip_with_metadata(llama, tok, tmp_path):
    fp = _fp(llama, tok, config=DiFRConfig(k=16, seed=5, projection="orthonormal"), model_id="tiny-llama")
    path = fp.save(tmp_path / "fp.safetensors")
    back = Fingerprints.load(path)
    assert back.config == fp.config and back.model_id == "tiny-llama" and back.dtype == "float32"
    assert back.sampling == {"temperature": 1.0, "top_p": 0.9, "top_k": 0}
    assert torch.equal(back.values, fp.values) and torch.equal(back.output_ids, fp.output_ids)
    assert back.config_hash == fp.config_hash and back.bytes_per_token == 32
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert (meta["format"], meta["version"]) == ("steer.difr.fingerprints", "2")
    assert {"model_id", "seed", "k", "dtype", "projection"} <= set(json.loads(meta["steer"]))
    assert json.loads(meta["identity"]) == model_identity(llama) == back.identity


def test_truncated_and_corrupt_files_are_errors(llama, tok, tmp_path):
    path = _fp(llama, tok).save(tmp_path / "fp.safetensors")
    raw = path.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(raw[: len(raw) - 40])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        Fingerprints.load(tmp_path / "trunc.safetensors")
    flipped = bytearray(raw)
    flipped[-3] ^= 0x40  # a bit flip inside the tensor data: header still parses
    (tmp_path / "flip.safetensors").write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="corrupt"):
        Fingerprints.load(tmp_path / "flip.safetensors")
    with pytest.raises(FileNotFoundError):
        Fingerprints.load(tmp_path / "missing.safetensors")
    cal_path = tmp_path / "cal.safetensors"
    calibrate(llama, [Fingerprints.load(path)]).save(cal_path)
    with pytest.raises(ValueError, match="not a fingerprint file"):
        Fingerprints.load(cal_path)


def test_mismatched_token_counts_are_errors(llama, tok):
    fp = _fp(llama, tok)
    with pytest.raises(ValueError, match="token counts disagree"):
        Fingerprints(fp.values[:-1], fp.prompt_ids, fp.prompt_lengths, fp.output_ids, fp.output_lengths,
                     fp.model_id, fp.identity, fp.config)
    with pytest.raises(ValueError, match="k=8"):
        Fingerprints(fp.values[:, :4], fp.prompt_ids, fp.prompt_lengths, fp.output_ids, fp.output_lengths,
                     fp.model_id, fp.identity, fp.config)


def test_wrong_model_seed_or_k_never_verifies(llama, tok):
    fp = _fp(llama, tok, model_id="tiny-llama")
    cal = calibrate(llama, [fp], target_fpr=0.1)
    with pytest.raises(ModelMismatchError, match="the fingerprint claim was computed on a different model .*config_hash"):
        verify(tiny_model("qwen2"), fp, cal)
    with pytest.raises(ValueError, match="claim model"):
        verify(llama, fp, cal, model_id="other-model")
    other = _fp(llama, tok, model_id="tiny-llama", config=DiFRConfig(k=4))
    with pytest.raises(ValueError, match="calibration was made for k=8"):
        verify(llama, other, cal)
    reseeded = _fp(llama, tok, PROMPTS[:1], model_id="tiny-llama", config=DiFRConfig(k=8, seed=1), max_new_tokens=2)
    with pytest.raises(ValueError, match="seed=0"):
        verify(llama, reseeded, cal)
    # fingerprints made with another seed but relabelled as seed 0: a plain rejection, not a pass
    forged = reseeded.with_config(reseeded.values, DiFRConfig(k=8, seed=0))
    report = verify(llama, forged, cal)
    assert cal.sufficient(report.n_tokens) and report.decision == "rejected"


def test_out_of_vocabulary_tokens_are_errors(llama, tok):
    fp = _fp(llama, tok)
    fp.output_ids = fp.output_ids.clone()
    fp.output_ids[0] = 10_000
    with pytest.raises(ValueError, match="vocabulary"):
        verify(llama, fp)


# ---- verification ------------------------------------------------------------------------------

def test_teacher_forcing_reproduces_the_provider(llama, tok):
    fp = _fp(llama, tok, keep_hidden=True)
    ref = teacher_force(llama, fp, batch_size=3)
    torch.testing.assert_close(ref.hidden, fp.hidden, atol=1e-4, rtol=1e-4)
    # in each component's own fp16 steps, rounding alone is U(-1/2, 1/2) per component: RMS 12**-0.5
    raw = activation_distances(fp, ref.hidden, "ulp_unfloored")
    assert raw.max() < 0.75 and abs(float(raw.mean()) - 12 ** -0.5) < 0.05
    d = activation_distances(fp, ref.hidden, "ulp")  # floored steps are never smaller, so distances never larger
    assert d.max() < 0.75 and bool((d <= raw + 1e-6).all()) and float(d.mean()) > 0.1
    l2 = activation_distances(fp, ref.hidden)  # the default: the paper's L2
    assert l2.max() < 0.05 and torch.equal(l2, activation_distances(fp, ref.hidden, "l2"))
    assert ref.margins is not None and ref.margins.abs().max() < 1e-3


def test_uncalibrated_report_never_says_verified(llama, tok):
    report = verify(llama, _fp(llama, tok))
    assert report.decision == "uncalibrated" and not report.verified
    assert report.threshold is None and report.n_tokens == report.scores.numel()


def test_calibrated_verification_accepts_benign_and_rejects_quantised(llama, tok):
    benign = [_fp(llama, tok, seed=s, batch_size=b, max_new_tokens=20) for s, b in ((0, 4), (1, 1), (2, 3))]
    cal = calibrate(llama, benign, target_fpr=0.05)
    assert isinstance(cal, Calibration) and cal.n_benign == 12 and cal.statistic == "l2"
    honest = _fp(llama, tok, ["the quick brown fox"], seed=7, batch_size=1, max_new_tokens=6)
    ok = verify(llama, honest, cal, batch_size=4)
    assert cal.n_units(ok.n_tokens) >= 20 and ok.verified and ok.p_value > 0.05
    q4 = _fp(quantize_rtn(llama, bits=4, group_size=32), tok, ["the quick brown fox"], seed=7, max_new_tokens=6)
    bad = verify(llama, q4, cal)
    assert bad.decision == "rejected" and bad.score > 10 * cal.threshold(bad.n_tokens)
    assert bad.p_value < 0.05
    df = bad.to_dataframe()
    assert len(df) == bad.n_tokens and {"distance", "l2", "ulp", "margin", "token_id"} <= set(df.columns)
    assert torch.equal(bad.distances, bad.l2) and bad.summary()["mean_ulp"] > bad.summary()["mean_l2"]
    assert bad.figure().data


def test_too_few_calibration_windows_is_insufficient_never_a_pass(llama, tok):
    """Each of the claim's 4 sequences is tested at 0.05/4 per window: 24 benign tokens are too few."""
    cal = calibrate(llama, [_fp(llama, tok, max_new_tokens=6)], target_fpr=0.05)
    claim = _fp(llama, tok, seed=7)  # 4 sequences of 10 tokens
    report = verify(llama, claim, cal)
    assert cal.n_units(report.n_tokens) == 0 and cal.threshold(report.n_tokens) is None
    assert report.decision == "insufficient" and not report.verified and report.threshold is None
    first = report.sequences[0]  # at n = 1: 10 windows at 0.05 / (4 * 10) need 800 benign tokens
    assert first.window is None and first.n_tokens == 10 and first.windows_needed == 800
    assert report.summary()["windows_needed"] == 800 and report.summary()["calibration_windows"] == 24
    assert {d.decision for d in report.sequences} == {"insufficient"} and report.rejected_sequences == []
    assert report.figure().data  # no threshold line, still a figure


def _uniform_cal(units: int, per_seq: int, alpha: float, seed: int = 0) -> Calibration:
    g = torch.Generator().manual_seed(seed)
    return Calibration("activation", alpha, torch.rand(units * per_seq, generator=g),
                       torch.full((units,), per_seq), DiFRConfig(), "h", "m")


def test_window_plan_is_the_longest_window_calibrated_at_the_bonferroni_level():
    cal = _uniform_cal(100, 10, 0.1)  # 100 benign sequences of 10 tokens
    assert cal.window_plan(10, 1) == (10, 1, 0.1)  # one sequence, whole length: the plain rule
    assert cal.window_plan(10, 2) == (10, 1, 0.05)  # 100 units >= 1/0.05
    assert cal.window_plan(10, 5) == (10, 1, pytest.approx(0.02))  # 50 needed
    # no 25-token benign window: 3 windows of 10 at 0.1 / (2 * 3) (60 needed, 100 there)
    assert cal.window_plan(25, 2) == (10, 3, pytest.approx(0.1 / 6))
    assert cal.window_plan(25, 4) == (5, 5, pytest.approx(0.005))  # 10 needs 120 > 100; 5 needs 200 = 200
    # 4 sequences of 30 tokens need 4 * 30 / 0.1 = 1200 benign tokens whatever n: 1000 are too few
    assert cal.window_plan(30, 4) is None
    with pytest.raises(ValueError, match=">= 1 token"):
        cal.window_plan(0, 1)


def test_tail_window_covers_a_sequences_last_tokens():
    """A sequence of 7 tokens in windows of 5: [0, 5) and [2, 7); a cheat in the last token is tested."""
    cal = _uniform_cal(400, 5, 0.1)
    scores = torch.tensor([0.5] * 6 + [50.0])
    (d,) = cal.decide_sequences(scores, torch.tensor([7]))
    assert (d.window, d.n_windows) == (5, 2) and d.decision == "rejected" and d.score == pytest.approx(10.4)


def test_per_sequence_rule_holds_the_claim_fpr_and_names_the_tampered_sequence():
    """Exchangeable benign scores: honest 4-sequence claims are rejected at <= alpha over draws;
    one shifted sequence is rejected and named, the other three are not."""
    g = torch.Generator().manual_seed(3)
    alpha, lengths = 0.1, torch.tensor([12, 7, 20, 3])
    rejected = 0
    for trial in range(300):
        cal = _uniform_cal(120, 20, alpha, seed=trial)
        decisions = cal.decide_sequences(torch.rand(int(lengths.sum()), generator=g), lengths)
        assert {d.decision for d in decisions} <= {"verified", "rejected"}
        assert all(d.alpha == pytest.approx(alpha / (4 * d.n_windows)) for d in decisions)
        rejected += any(d.decision == "rejected" for d in decisions)
    assert rejected / 300 <= alpha + 0.03, rejected
    scores = torch.rand(int(lengths.sum()), generator=g)
    scores[12:19] += 0.6  # sequence 1 (7 tokens) from another distribution
    decisions = _uniform_cal(120, 20, alpha).decide_sequences(scores, lengths)
    assert [d.decision for d in decisions] == ["verified", "rejected", "verified", "verified"]


def test_multi_sequence_claim_gets_a_verdict_and_a_tampered_request_is_named(llama, tok):
    """Several requests in one claim: honest passes; one request served by 4-bit weights is caught."""
    benign = [_fp(llama, tok, seed=s, batch_size=1 + s % 3) for s in range(10, 22)]  # 48 sequences
    cal = calibrate(llama, benign, target_fpr=0.1)
    honest = [_fp(llama, tok, seed=s, batch_size=2) for s in (7, 8, 9, 30, 31)]  # 4 requests, 40 tokens each
    reports = [verify(llama, h, cal) for h in honest]
    # no benign window is as long as a whole claim, but each request is decided: at FPR 0.1 per claim
    # (0.025 per request), 5 honest claims give 0-1 rejections (P(>= 2) = 0.08); here seed 7's "x"
    # request is the one, just above the largest of 48 benign 10-token windows
    assert all(cal.threshold(r.n_tokens) is None and r.decision != "insufficient" for r in reports)
    assert sum(r.verified for r in reports) >= 4, [r.rejected_sequences for r in reports]
    ok = reports[1]
    assert ok.decision == "verified" and ok.rejected_sequences == []
    assert len(ok.sequences) == 4 and all(d.alpha <= 0.1 / 4 for d in ok.sequences)
    assert ok.summary()["per_sequence_fpr"] == pytest.approx(0.025) and "Bonferroni" in ok.summary()["rule"]
    q4 = quantize_rtn(llama, bits=4, group_size=32)
    cheat = _fp(q4, tok, PROMPTS[2:3], seed=8, batch_size=1)
    cheat.identity = honest[0].identity  # claims the reference model
    parts = [_fp(llama, tok, PROMPTS[:2], seed=7, batch_size=2), cheat, _fp(llama, tok, PROMPTS[3:], seed=9)]
    bad = verify(llama, Fingerprints.concat(parts), cal)
    assert bad.decision == "rejected" and bad.rejected_sequences == [2], bad.sequences_dataframe()
    assert bad.p_value <= 0.1 and bad.threshold == bad.sequences[2].threshold
    assert len(bad.sequences_dataframe()) == 4 and bad.figure().data


def test_attention_kernel_is_benign(tok):
    model = tiny_model("llama")
    fp = _fp(model, tok, keep_hidden=True)
    model.set_attn_implementation("eager")
    ref = teacher_force(model, fp)
    assert activation_distances(fp, ref.hidden).max() < 0.75


def test_calibration_threshold_holds_its_false_positive_rate():
    """On i.i.d. benign scores the held-out FPR of the calibrated threshold stays near the target."""
    g = torch.Generator().manual_seed(0)
    calib = torch.rand(4000, generator=g)
    held = torch.rand(20000, generator=g)
    cal = Calibration("activation", 0.01, calib, torch.full((40,), 100), DiFRConfig(), {"config_hash": "h"}, "m")
    for n in (1, 4):
        thr = cal.threshold(n)
        fpr = float((held[: len(held) // n * n].reshape(-1, n).mean(1) > thr).float().mean())
        assert fpr <= 0.02, (n, fpr)
    assert cal.threshold(4) < cal.threshold(1)  # averaging shrinks benign spread
    assert cal.p_value(10.0, 1) < 0.001 and cal.p_value(0.0, 1) == 1.0


def test_windows_are_disjoint_and_never_cross_sequences():
    from steer.difr.verify import window_means

    scores = torch.tensor([1.0, 2, 3, 10, 20, 30, 40, 50])  # sequences of 3 and 5 tokens
    means = window_means(scores, torch.tensor([3, 5]), 2)
    assert means.tolist() == [1.5, 15.0, 35.0]  # [1,2] | [10,20] [30,40]; 3 and 50 are remainders
    assert window_means(scores, torch.tensor([3, 5]), 4).tolist() == [25.0]
    with pytest.raises(ValueError, match="scores for sequences"):
        window_means(scores, torch.tensor([3, 4]), 2)


def test_threshold_is_the_exact_conformal_rank():
    """Units 1..m (one token per window): the threshold is the ceil((m+1)(1-alpha))-th smallest."""
    from steer.difr.verify import conformal_rank

    def cal(m, alpha):
        return Calibration("activation", alpha, torch.arange(1.0, m + 1), torch.ones(m, dtype=torch.long),
                           DiFRConfig(), "h", "m")

    assert conformal_rank(199, 0.01) == 198 and conformal_rank(100, 0.01) == 100 and conformal_rank(99, 0.01) == 99
    assert cal(199, 0.01).threshold(1) == 198.0
    assert cal(100, 0.01).threshold(1) == 100.0  # the maximum: exactly 100 units hold 1%
    assert cal(99, 0.01).threshold(1) is None and cal(99, 0.01).decide(0.0, 1) == "insufficient"
    assert cal(19, 0.05).threshold(1) is None and cal(20, 0.05).threshold(1) == 20.0
    assert cal(199, 0.01).decide(198.0, 1) == "verified" and cal(199, 0.01).decide(198.5, 1) == "rejected"
    assert cal(199, 0.01).decide(float("nan"), 1) == "rejected"
    # conformal p-value: (1 + #{units >= score}) / (m + 1)
    assert cal(199, 0.01).p_value(198.5, 1) == pytest.approx(2 / 200)


def test_conformal_threshold_holds_the_fpr_over_calibrations():
    """Exchangeable units: P(fresh benign unit > threshold) = 1 - rank/(m+1) <= alpha, over draws."""
    g = torch.Generator().manual_seed(1)
    m, alpha, trials = 150, 0.05, 4000
    units = torch.rand(trials, m, generator=g).sort(dim=1).values
    fresh = torch.rand(trials, generator=g)
    from steer.difr.verify import conformal_rank

    rank = conformal_rank(m, alpha)
    fpr = float((fresh > units[:, rank - 1]).float().mean())
    exact = 1 - rank / (m + 1)
    assert exact <= alpha and abs(fpr - exact) < 0.012, (fpr, exact)


def test_calibration_round_trip(llama, tok, tmp_path):
    cal = calibrate(llama, [_fp(llama, tok)], method="token", target_fpr=0.1)
    assert cal.clip == 0.5 and cal.clip_percentile is None  # the paper's fixed clip
    back = Calibration.load(cal.save(tmp_path / "cal.safetensors"))
    assert back.method == "token" and back.clip == cal.clip and torch.equal(back.benign, cal.benign)
    assert back.threshold(3) == cal.threshold(3) and back.clip_percentile is None
    pct = calibrate(llama, [_fp(llama, tok)], method="token", clip_percentile=99.9)
    assert pct.clip >= 1.0 and pct.clip_percentile == 99.9  # steer's earlier rule, kept as an option
    assert Calibration.load(pct.save(tmp_path / "pct.safetensors")).clip == pct.clip
    assert len(back.to_dataframe()) > 3 and back.figure().data


def test_ulp_floor_bounds_benign_noise_on_near_zero_components(llama, tok):
    """A fingerprint component near 0 has a tiny fp16 step; fp32-sized noise must not blow it up."""
    fp = _fp(llama, tok, keep_hidden=True)
    p = projection_matrix(fp.config, llama.config.hidden_size)
    h = fp.hidden.clone()
    col = p[:, 0] / p[:, 0].norm()
    h -= (h @ col).unsqueeze(1) * col  # f_0 = 0 exactly: the worst case for per-component steps
    g = torch.Generator().manual_seed(0)
    noisy = h + 1e-6 * h.norm(dim=1, keepdim=True) * torch.randn(h.shape, generator=g)  # benign fp32-sized noise
    claim = fp.with_config((h @ p).to(torch.float16), fp.config)
    unfloored = activation_distances(claim, noisy, "ulp_unfloored")
    floored = activation_distances(claim, noisy, "ulp")
    assert float(unfloored.median()) > 5  # the unfloored tail that broke the held-out FPR on SmolLM2
    assert float(floored.max()) < 0.75
    # a real weight perturbation still stands far above the floored benign range
    wrong = activation_distances(claim, h * 1.01, "ulp")
    assert float(wrong.min()) > 3


def _legacy_header(fmt: str, model, fields: dict, tensors: dict) -> dict:
    """The flat string header steer wrote before steer.io (DiFR formats 1-3): its own config hash rule."""
    from steer.identity import LEGACY_DIFR, config_hash
    from steer.io import checksum

    return {"format": fmt, **{k: str(v) for k, v in fields.items()},
            "config_hash": config_hash(model.config, LEGACY_DIFR), "checksum": checksum(tensors)}


def _legacy_calibration(cal, model, path, fmt, **extra):
    from safetensors.torch import save_file

    tensors = {"benign": cal.benign.float().contiguous(), "lengths": cal.lengths.to(torch.int64).contiguous()}
    fields = {"method": cal.method, "target_fpr": repr(cal.target_fpr), "k": cal.config.k, "seed": cal.config.seed,
              "projection": cal.config.projection, "model_id": cal.model_id, "clip": repr(cal.clip),
              "clip_percentile": repr(cal.clip_percentile), "threshold_rule": "disjoint windows",
              "statistic": cal.statistic, "intervention": "", "min_threshold": repr(cal.min_threshold), **extra}
    save_file(tensors, str(path), metadata=_legacy_header(fmt, model, fields, tensors))
    return path


def test_version_1_calibration_files_keep_their_statistic(llama, tok, tmp_path):
    """Files written when "ulp" meant the unfloored distance load as "ulp_unfloored", not silently re-labelled."""
    cal = calibrate(llama, [_fp(llama, tok)], statistic="ulp_unfloored", target_fpr=0.1)
    old = Calibration.load(_legacy_calibration(cal, llama, tmp_path / "v1.safetensors", "steer.difr.calibration/1",
                                               statistic="ulp"))
    assert old.statistic == "ulp_unfloored" and old.threshold(2) == cal.threshold(2) is not None
    assert old.identity["scheme"] == "steer.difr/1"
    v2 = _legacy_calibration(cal, llama, tmp_path / "v2.safetensors", "steer.difr.calibration/2", statistic="ulp",
                             n_resamples=4000)
    assert Calibration.load(v2).statistic == "ulp"  # version 2 "ulp" was floored
    with pytest.raises(ValueError, match="statistic must be one of"):
        calibrate(llama, [_fp(llama, tok)], statistic="cosine")


def test_claims_and_calibrations_of_the_old_format_verify_by_their_own_hash_rule(llama, tok, tmp_path):
    """Format-1 claims carry the config hash of DiFR's old rule (identity scheme steer.difr/1): they
    verify against the model they name, are rejected on another model with the differing field named,
    and mix with new calibrations (each is checked against the model)."""
    from safetensors.torch import save_file

    fp = _fp(llama, tok, model_id="tiny-llama")
    tensors = fp._tensors()
    fields = {"model_id": fp.model_id, "seed": 0, "k": 8, "projection": "gaussian", "dtype": fp.dtype,
              "fingerprint_dtype": "float16", "sampling": json.dumps(fp.sampling), "intervention": ""}
    save_file(tensors, str(tmp_path / "old.safetensors"),
              metadata=_legacy_header("steer.difr.fingerprints/1", llama, fields, tensors))
    old = Fingerprints.load(tmp_path / "old.safetensors")
    assert old.identity["scheme"] == "steer.difr/1" and old.identity != fp.identity
    assert torch.equal(old.values, fp.values) and old.sampling == fp.sampling
    new_cal = calibrate(llama, [fp], target_fpr=0.1)
    for cal in (new_cal, calibrate(llama, [old], target_fpr=0.1)):  # no identity error; same values, same decision
        assert verify(llama, old, cal).decision == verify(llama, fp, cal).decision != "rejected"
    other = tiny_model("llama", num_hidden_layers=llama.config.num_hidden_layers + 1)
    with pytest.raises(ModelMismatchError, match="config_hash"):
        verify(other, old)
    old_cal = Calibration.load(_legacy_calibration(new_cal, other, tmp_path / "c3.safetensors",
                                                   "steer.difr.calibration/3"))
    with pytest.raises(ModelMismatchError, match="the calibration was computed on a different model"):
        verify(llama, fp, old_cal)


def test_ulp_thresholds_never_go_below_the_rounding_bound(llama, tok):
    """Storage rounding alone gives up to half a step per component; a calibration whose benign
    tokens happened to round less must not reject another prompt's honest rounding."""
    fp = _fp(llama, tok)
    cal = calibrate(llama, [fp], statistic="ulp", target_fpr=0.1)
    assert cal.min_threshold == 0.5 and all(cal.threshold(n) >= 0.5 for n in (1, 2))
    low = Calibration("activation", 0.05, torch.full((40,), 0.1), torch.tensor([40]), fp.config, "h", "m",
                      statistic="ulp", min_threshold=0.5)
    assert low.threshold(1) == 0.5
    l2 = calibrate(llama, [fp], target_fpr=0.1)
    assert l2.statistic == "l2" and l2.min_threshold is None and l2.threshold(1) < 0.05  # no content-free bound
    assert calibrate(llama, [fp], method="token").min_threshold is None


def test_fingerprints_pickled_before_identities_unpickle_as_the_legacy_scheme(llama, tok):
    """experiments/difr/run.py --rescore reads raw caches pickled by older steer: a bare DiFR config hash
    becomes an identity of the legacy scheme, and current pickles round-trip unchanged."""
    import copy

    from steer.identity import LEGACY_DIFR

    fp = _fp(llama, tok)
    assert copy.deepcopy(fp).identity == fp.identity  # deepcopy restores through __setstate__, as unpickling does
    old_state = {k: v for k, v in vars(fp).items() if k != "identity"} | {"config_hash": "0123abcd"}
    old = Fingerprints.__new__(Fingerprints)
    old.__setstate__(old_state)
    assert old.identity == {"scheme": LEGACY_DIFR, "config_hash": "0123abcd"} and old.config_hash == "0123abcd"
    assert "config_hash" not in vars(old)
