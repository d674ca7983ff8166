"""Online early exit on tiny models: rollback == rerun from scratch, batched rows exit independently,
features read online == features of a fresh forward pass, hooks == hidden_states."""

from __future__ import annotations

import math

import pytest
import torch

from steer.probes.conformal import ConformalCalibration
from steer.probes.cues import CueSet
from steer.probes.features import capture_features, default_points
from steer.probes.generate import DeerPolicy, ExitConfig, LynxPolicy, NeverExit, generate_with_exit
from steer.probes.probe import LynxProbe, ProbeInfo
from steer.tiny import tiny_model, tiny_tokenizer

PROMPTS = ["hello there, how", "a", "the quick brown fox"]
# Tiny random models emit arbitrary bytes; "any printable char" makes nearly every token a cue.
ANY = CueSet(words=(), patterns={"char": r"[!-~]"})


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama"), tiny_tokenizer()


def _greedy_from_scratch(model, ids: list[int], n: int) -> list[int]:
    """Reference: no cache, no padding, full forward each step."""
    out = []
    for _ in range(n):
        logits = model(input_ids=torch.tensor([ids + out])).logits[0, -1]
        out.append(int(logits.argmax()))
    return out


@torch.no_grad()
def test_rollback_equals_rerun_from_scratch(llama):
    model, tok = llama
    cfg = ExitConfig(exit_string="=>", answer_max_tokens=3, max_new_tokens=8)
    res = generate_with_exit(model, tok, PROMPTS, cues=ANY, config=cfg, record_trials=True)
    exit_ids = tok("=>", add_special_tokens=False)["input_ids"]
    checked = 0
    for prompt, row in zip(PROMPTS, res.rows):
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        # uninterrupted greedy generation must equal the cached, left-padded batch
        assert row.generated_ids == _greedy_from_scratch(model, p_ids, len(row.generated_ids))
        for ev in row.events[:3]:
            ref = _greedy_from_scratch(model, p_ids + row.generated_ids[: ev.cut] + exit_ids, 3)
            got = ev.trial.answer_ids
            assert got == ref[: len(got)], (ev, got, ref)
            checked += 1
        if row.stop == "budget":  # the budget cut keeps every token then exits
            ref = _greedy_from_scratch(model, p_ids + row.generated_ids + exit_ids, 3)
            assert row.answer.answer_ids == ref[: len(row.answer.answer_ids)]
    assert checked >= 6


def _probe_for(model, points, seed=0):
    torch.manual_seed(seed)
    n = model.config.num_hidden_layers
    d = model.config.hidden_size
    info = ProbeInfo("tiny-llama", n, d, list(points))
    return LynxProbe(len(points) * d, (16, 8), info).eval()


@torch.no_grad()
def test_batched_exit_rows_are_independent(llama):
    """Each row of a batch exits exactly where it exits when generated alone."""
    model, tok = llama
    points = default_points(model)
    probe = _probe_for(model, points)
    cfg = ExitConfig(exit_string="=>", answer_max_tokens=3, max_new_tokens=16)
    # threshold at the median score seen on a plain run, so some cues exit and some do not
    plain = generate_with_exit(model, tok, PROMPTS, cues=ANY, config=cfg, points=points, record_features=True)
    scores = probe(plain.features)
    q0 = float(scores.median())
    policy = LynxPolicy(probe, ConformalCalibration(0.1, q0, math.inf, 50, 50))
    batched = generate_with_exit(model, tok, PROMPTS, policy, cues=ANY, config=cfg)
    stops = [r.stop for r in batched.rows]
    assert "exit" in stops
    for i, prompt in enumerate(PROMPTS):
        alone = generate_with_exit(model, tok, [prompt], policy, cues=ANY, config=cfg).rows[0]
        row = batched.rows[i]
        assert (row.stop, row.kept, row.generated_ids) == (alone.stop, alone.kept, alone.generated_ids)
        assert row.final_text == alone.final_text
        exited = [e for e in row.events if e.exited]
        if row.stop == "exit":
            assert len(exited) == 1 and exited[0] is row.events[-1]
            assert exited[0].score > q0
            assert all(e.score <= q0 for e in row.events[:-1])  # exits at the FIRST accepted cue
            assert row.kept == exited[0].cut
        else:
            assert not exited


@torch.no_grad()
@pytest.mark.parametrize("family", ["llama", "qwen2_moe"])
def test_online_features_equal_fresh_forward(family):
    model, tok = tiny_model(family), tiny_tokenizer()
    points = default_points(model)
    cfg = ExitConfig(exit_string="=>", answer_max_tokens=2, max_new_tokens=6)
    res_h = generate_with_exit(model, tok, PROMPTS, cues=ANY, config=cfg, points=points, record_features=True)
    res_s = generate_with_exit(model, tok, PROMPTS, cues=ANY, config=cfg, points=points, record_features=True,
                               feature_backend="hidden_states")
    torch.testing.assert_close(res_h.features, res_s.features, rtol=0, atol=0)  # same numbers, two backends
    for prompt, row in zip(PROMPTS, res_h.rows):
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        full = torch.tensor([p_ids + row.generated_ids])
        for backend in ("hooks", "hidden_states"):
            ref = capture_features(model, full, None, points, backend=backend)[0]
            for ev in row.events:
                torch.testing.assert_close(res_h.features[ev.feature_index], ref[len(p_ids) + ev.cue_token],
                                           rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_final_point_is_lm_head_input(llama):
    """'final_norm.out' (hidden_states[-1] in HF) is post-norm: lm_head of it gives the logits."""
    model, tok = llama
    ids = torch.tensor([tok("abc def", add_special_tokens=False)["input_ids"]])
    out = model(input_ids=ids, output_hidden_states=True)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    feats = capture_features(model, ids, None, ["final_norm.out"], backend="hooks")
    torch.testing.assert_close(model.lm_head(feats), out.logits)
    torch.testing.assert_close(feats, out.hidden_states[-1])


@torch.no_grad()
def test_deer_and_never_policies(llama):
    model, tok = llama
    cfg = ExitConfig(exit_string="=>", answer_max_tokens=3, max_new_tokens=10)
    never = generate_with_exit(model, tok, PROMPTS, NeverExit(), cues=ANY, config=cfg)
    assert all(r.stop in ("eos", "budget") for r in never.rows)
    always = generate_with_exit(model, tok, PROMPTS, DeerPolicy(threshold=-1.0), cues=ANY, config=cfg)
    for r in always.rows:  # confidence > -1 always: exit at the first cue
        assert r.stop == "exit" and r.events[0].exited and len(r.events) == 1
        assert r.answer is r.events[0].trial
    # DEER pays for its trials
    assert all(r.forward_tokens > r.kept for r in always.rows)


@torch.no_grad()
def test_sampling_is_seeded(llama):
    model, tok = llama
    cfg = ExitConfig(exit_string="=>", max_new_tokens=8, answer_max_tokens=2, do_sample=True, seed=3)
    a = generate_with_exit(model, tok, PROMPTS, cues=ANY, config=cfg)
    b = generate_with_exit(model, tok, PROMPTS, cues=ANY, config=cfg)
    assert [r.generated_ids for r in a.rows] == [r.generated_ids for r in b.rows]


def test_probe_for_other_model_is_refused(llama):
    model, tok = llama
    other = tiny_model("llama", num_hidden_layers=4)
    probe = _probe_for(other, default_points(other))
    policy = LynxPolicy(probe, ConformalCalibration(0.1, 0.5, 0.5, 50, 50))
    with pytest.raises(ValueError, match="trained on"):
        generate_with_exit(model, tok, PROMPTS, policy, cues=ANY)
    with pytest.raises(ValueError, match="delta"):
        LynxPolicy(probe, ConformalCalibration(1.5, 0.5, 0.5, 50, 50))


@torch.no_grad()
def test_generation_result_figure(llama):
    """figure(): the probe trace is the events' scores, the red exit line sits at the first cue the
    calibration accepts, and a plain run is replayed at any delta from its recorded features."""
    model, tok = llama
    points = default_points(model)
    probe = _probe_for(model, points)
    cfg = ExitConfig(exit_string="=>", answer_max_tokens=3, max_new_tokens=16)
    plain = generate_with_exit(model, tok, PROMPTS, cues=ANY, config=cfg, points=points, record_features=True)
    q0 = float(probe(plain.features).median())
    cal = ConformalCalibration(0.1, q0, math.inf, 50, 50)
    with pytest.raises(ValueError, match="no probe scores"):
        plain.figure(0)  # nothing to plot without a probe
    for row in range(len(PROMPTS)):
        fig = plain.figure(row, probe=probe, calibration=cal)
        events = plain.rows[row].events
        expect = probe(plain.features[[e.feature_index for e in events]]).double().tolist()
        trace = next(t for t in fig.data if t.name.startswith("probe p"))
        assert list(trace.x) == [e.cue_token for e in events]
        assert list(trace.y) == pytest.approx(expect)
        cues = next(t for t in fig.data if t.name == "cue events")
        assert len(cues.x) == len(events)
        reds = [s for s in fig.layout.shapes if s.line.color == "red"]
        first = next((e for e, p in zip(events, expect) if p > q0), None)
        if first is None:
            assert not reds
        else:
            assert [s.x0 for s in reds] == [first.cue_token]
    # the online run marks where it really exited, at the same cue the replay predicts
    online = generate_with_exit(model, tok, PROMPTS, LynxPolicy(probe, cal), cues=ANY, config=cfg)
    assert online.calibration is cal
    for row, r in enumerate(online.rows):
        fig = online.figure(row)
        stars = [t for t in fig.data if t.name.startswith("online exit")]
        if r.stop == "exit":
            ex = next(e for e in r.events if e.exited)
            assert list(stars[0].x) == [ex.cue_token]
            assert [s.x0 for s in fig.layout.shapes if s.line.color == "red"] == [ex.cue_token]
        else:
            assert not stars
    with pytest.raises(IndexError, match="out of range"):
        online.figure(len(PROMPTS))
    # a DEER run plots its trial confidences without any probe
    deer = generate_with_exit(model, tok, PROMPTS[:1], DeerPolicy(threshold=2.0), cues=ANY, config=cfg)
    fig = deer.figure(0)
    conf = next(t for t in fig.data if t.name.startswith("trial answer"))
    assert list(conf.y) == pytest.approx([e.trial.confidence for e in deer.rows[0].events])


# ---- sliding-window caches (gemma3) and batched trials ------------------------------------------

LONG = ["the quick brown fox jumps over it", "a"]  # 33 and 1 prompt tokens; the window is 8
# About one cue every other token (the tiny tokenizer decodes most bytes as "<0xNN>"), matches of at
# most 2 chars: exits cut at most a few tokens back, so sliding layers keep a short tail.
SHORT = CueSet(words=(), patterns={"byte": r"<|[A-Z]"}, max_chars=2)


def _sliding_sizes(model):
    """Records, at every forward call, how many positions each sliding cache layer holds."""
    from transformers.cache_utils import DynamicSlidingWindowLayer

    seen = []

    def pre(mod, args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None:
            seen.extend((layer.keys.shape[-2], layer.cumulative_length) for layer in cache.layers
                        if type(layer) is DynamicSlidingWindowLayer and layer.is_initialized)
    return seen, model.register_forward_pre_hook(pre, with_kwargs=True)


@torch.no_grad()
@pytest.mark.parametrize("slack", [None, -10**6])
def test_sliding_window_rollback_equals_rerun_from_scratch(slack, monkeypatch):
    """gemma3_text with a window (8) far shorter than the sequence: generation, trial exits far back
    in the sequence and the budget cut equal greedy decoding from scratch, and sliding layers stay
    bounded. slack=-1e6 trims them to the bare window, so rollbacks take the recompute fallback."""
    import steer.probes.generate as gen

    if slack is not None:
        monkeypatch.setattr(gen, "SLIDING_SLACK", slack)
    model, tok = tiny_model("gemma3_text"), tiny_tokenizer()
    window = model.config.sliding_window
    assert window == 8
    cfg = ExitConfig(exit_string="=>", answer_max_tokens=3, max_new_tokens=24)
    seen, handle = _sliding_sizes(model)
    try:
        res = generate_with_exit(model, tok, LONG, cues=SHORT, config=cfg, record_trials=True)
    finally:
        handle.remove()
    assert max(c for _, c in seen) >= 33 + 23  # sequences ran far past the window...
    held = max(n for n, _ in seen)  # ...but sliding layers kept a short tail (query included)
    assert held <= window + (SHORT.max_chars + gen.SLIDING_SLACK + 2 if slack is None else 1)
    assert (res.reprefills == 0) if slack is None else (res.reprefills > 0)
    exit_ids = tok("=>", add_special_tokens=False)["input_ids"]
    checked = 0
    for prompt, row in zip(LONG, res.rows):
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        assert row.generated_ids == _greedy_from_scratch(model, p_ids, len(row.generated_ids))
        late = [e for e in row.events if len(p_ids) + e.cut > 3 * window]
        assert late or len(p_ids) == 1
        for ev in row.events[:1] + late[:: max(1, len(late) // 3)]:
            ref = _greedy_from_scratch(model, p_ids + row.generated_ids[: ev.cut] + exit_ids, 3)
            assert ev.trial.answer_ids == ref[: len(ev.trial.answer_ids)], ev
            checked += 1
        if row.stop == "budget":
            ref = _greedy_from_scratch(model, p_ids + row.generated_ids + exit_ids, 3)
            assert row.answer.answer_ids == ref[: len(row.answer.answer_ids)]
    assert checked >= 5


class _ExitAtNthCue:
    """A policy (single-row runs) that exits at its n-th cue event: puts an exit where the test wants it."""

    needs_score = False
    needs_trial = False

    def __init__(self, n: int):
        self.n, self.calls = n, 0

    def decide(self, score, trial) -> bool:
        self.calls += 1
        return self.calls == self.n


@torch.no_grad()
def test_sliding_window_online_exit_equals_rerun():
    """Online exits early and deep into a gemma3 generation (far past the window): the kept tokens
    and the answer equal a from-scratch greedy run of prompt + kept + exit string."""
    model, tok = tiny_model("gemma3_text"), tiny_tokenizer()
    cfg = ExitConfig(exit_string="=>", answer_max_tokens=3, max_new_tokens=40)
    plain = generate_with_exit(model, tok, LONG[:1], cues=SHORT, config=cfg)
    p_ids = tok(LONG[0], add_special_tokens=False)["input_ids"]
    n_events = len(plain.rows[0].events)
    assert len(p_ids) + plain.rows[0].events[-1].cut > 4 * model.config.sliding_window
    for nth in (2, n_events // 2, n_events):
        res = generate_with_exit(model, tok, LONG[:1], _ExitAtNthCue(nth), cues=SHORT, config=cfg)
        row, ev = res.rows[0], plain.rows[0].events[nth - 1]
        assert row.stop == "exit" and row.kept == ev.cut and len(row.events) == nth
        assert row.generated_ids == plain.rows[0].generated_ids[: ev.cut]
        ref = _greedy_from_scratch(model, p_ids + row.generated_ids + tok("=>", add_special_tokens=False)["input_ids"],
                                   3)
        assert row.answer.answer_ids == ref[: len(row.answer.answer_ids)]


@torch.no_grad()
@pytest.mark.parametrize("family", ["llama", "gemma3_text", pytest.param("qwen2_moe", marks=pytest.mark.slow)])
def test_batched_trials_equal_row_at_a_time(family):
    """Trial answers decoded as one left-padded batch give exactly the tokens (and the confidences and
    forward counts) of decoding them one row at a time: labelling trials, DEER and the budget cut."""
    model, tok = tiny_model(family), tiny_tokenizer()
    # "<" stops an answer at most non-ASCII bytes: rows leave the trial batch at different steps
    base = dict(exit_string="=>", answer_max_tokens=4, max_new_tokens=16, answer_stop=("<",))
    one = ExitConfig(**base, batch_trials=False)
    many = ExitConfig(**base, batch_trials=True)
    for kw in ({"record_trials": True}, {"policy": DeerPolicy(threshold=0.08)}):
        a = generate_with_exit(model, tok, LONG + PROMPTS, cues=SHORT, config=one, **kw)
        b = generate_with_exit(model, tok, LONG + PROMPTS, cues=SHORT, config=many, **kw)
        trials = 0
        for ra, rb in zip(a.rows, b.rows):
            assert (ra.stop, ra.kept, ra.generated_ids, ra.forward_tokens) == (rb.stop, rb.kept, rb.generated_ids,
                                                                             rb.forward_tokens)
            for ea, eb in zip(ra.events, rb.events, strict=True):
                assert ea.trial.answer_ids == eb.trial.answer_ids
                assert ea.trial.forward_tokens == eb.trial.forward_tokens
                assert ea.trial.confidence == pytest.approx(eb.trial.confidence, abs=1e-5)
                trials += 1
            if ra.answer is not None:
                assert ra.answer.answer_ids == rb.answer.answer_ids
        assert trials > 20
        assert any(r.stop == "budget" for r in a.rows)
        assert {len(e.trial.answer_ids) for e in a.events} != {base["answer_max_tokens"]}  # rows stop apart


def test_unrollbackable_cache_is_refused():
    """A cache layer kind that cannot be rolled back (linear attention state) is a clear ValueError."""
    from steer.probes.generate import UnsupportedCacheError

    model, tok = tiny_model("llama"), tiny_tokenizer()
    model.config.layer_types = ["full_attention", "linear_attention", "full_attention"]
    with pytest.raises(UnsupportedCacheError, match="layer 1 of this model uses LinearAttentionLayer"):
        generate_with_exit(model, tok, PROMPTS, cues=ANY, config=ExitConfig(max_new_tokens=2))
    model.config.layer_types = ["chunked_attention"] * 3
    with pytest.raises(ValueError, match="chunked attention"):
        generate_with_exit(model, tok, PROMPTS, cues=ANY, config=ExitConfig(max_new_tokens=2))


@torch.no_grad()
def test_exit_without_rollback_keeps_the_cue(llama):
    """ExitConfig(rollback=False), the variant vLLM serves: the same cue events, scores and exit
    decision as the rollback exit, but the exit string follows everything generated so far (the cue
    and its look-ahead token), and the answer is the greedy continuation of exactly that."""
    model, tok = llama
    points = default_points(model)
    probe = _probe_for(model, points)
    cfg = ExitConfig(exit_string="=>", answer_max_tokens=3, max_new_tokens=16)
    plain = generate_with_exit(model, tok, PROMPTS, cues=ANY, config=cfg, points=points, record_features=True)
    policy = LynxPolicy(probe, ConformalCalibration(0.1, float(probe(plain.features).median()), math.inf, 50, 50))
    exact = generate_with_exit(model, tok, PROMPTS, policy, cues=ANY, config=cfg)
    keep = generate_with_exit(model, tok, PROMPTS, policy, cues=ANY,
                              config=ExitConfig(**{**cfg.__dict__, "rollback": False}))
    exit_ids = tok("=>", add_special_tokens=False)["input_ids"]
    exits = 0
    for prompt, a, b in zip(PROMPTS, exact.rows, keep.rows):
        assert [(e.cue_token, e.cut, e.score, e.exited) for e in a.events] == \
               [(e.cue_token, e.cut, e.score, e.exited) for e in b.events]
        assert a.stop == b.stop
        if b.stop != "exit":
            assert b.generated_ids == a.generated_ids
            continue
        exits += 1
        ev = b.events[-1]
        assert b.kept == ev.cue_token + 2 == len(b.generated_ids)  # the cue token and its look-ahead
        assert a.generated_ids == b.generated_ids[: ev.cut]  # the rollback exit cut the same trajectory
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        ref = _greedy_from_scratch(model, p_ids + b.generated_ids + exit_ids, 3)
        assert b.answer.answer_ids == ref[: len(b.answer.answer_ids)]
    assert exits >= 1
