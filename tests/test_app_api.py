"""The steer APIs the explorer is built on, tested without Streamlit on tiny models.

- steer.ftri.expert_tokens / Profile.expert_tokens: the tokens behind a profile heatmap cell, checked
  against a plain router capture and against the profile's own counts.
- steer.ftri.profile(progress=callable, cancel=flag): progress callbacks and partial profiles.
- steer.sinks.SinkResult.figure("tokens"): readable labels for long inputs.
"""

from __future__ import annotations

import functools
import threading

import pytest
import torch

from steer.ftri import DenseModelError, ProfileCancelled, ProfileConfig, expert_tokens, profile
from steer.hooks import capture
from steer.identity import ModelMismatchError
from steer.prompts import EmptyPromptSetError
from steer.tiny import tiny_model as _build_tiny
from steer.tiny import tiny_tokenizer

A = [f"alpha beta {i} gamma delta" for i in range(6)]
B = [f"ZZ{i}!!QQ" * (1 + i % 2) for i in range(6)]


@functools.cache
def tiny(family: str, seed: int = 0):
    return _build_tiny(family, seed=seed)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


# ---- expert_tokens ---------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3"])
def test_expert_tokens_match_a_plain_router_capture(family, tok):
    model = tiny(family)
    layer = 2
    cfg = ProfileConfig(chat_template=False)
    for prompt in A[:2] + B[:2]:
        enc = tok(prompt, return_tensors="pt")
        pts = [f"blocks.{layer}.mlp.router.indices", f"blocks.{layer}.mlp.router.weights"]
        with torch.no_grad(), capture(model, pts) as cap:
            model(**enc)
        idx, w = cap[pts[0]][0].reshape(enc.input_ids.shape[1], -1), cap[pts[1]][0].reshape(enc.input_ids.shape[1], -1)
        for expert in range(8):
            df = expert_tokens(model, tok, prompt, layer, expert, cfg)
            want = (idx == expert).any(-1).nonzero().flatten().tolist()
            assert df.position.tolist() == want
            assert df.routed.all() and (df.prompt == 0).all()
            for _, r in df.iterrows():
                assert idx[r.position, r.slot] == expert
                assert r.weight == pytest.approx(float(w[r.position, r.slot]))
                assert r.token == tok.decode([int(enc.input_ids[0, r.position])])
                assert f"[{r.token}]".replace("\n", "\\n") in r.context


def test_expert_tokens_add_up_to_the_profile_counts(tok):
    """Batched with left padding, the counted routed tokens of every expert are exactly the profile's counts."""
    model = tiny("qwen2_moe")
    cfg = ProfileConfig(n_bootstrap=0, batch_size=4)
    prof = profile(model, tok, {"a": A, "b": B}, cfg, progress=False)
    for li, layer in enumerate(prof.layers):
        for expert in range(8):
            for c, prompts in enumerate((A, B)):
                df = expert_tokens(model, tok, prompts, layer, expert, cfg)
                assert int(df.counted.sum()) == int(prof.sums["count"][c, li, expert])
    everything = expert_tokens(model, tok, A, 1, 0, cfg, routed_only=False)
    assert len(everything) == sum(len(tok(p).input_ids) for p in A)
    assert everything.slot.isna().sum() == (~everything.routed).sum()
    assert set(everything.prompt) == set(range(len(A)))


def test_profile_expert_tokens_uses_its_settings_and_checks_the_model(tok):
    model = tiny("qwen2_moe")
    responses = ["one two", "three", "four five six", "x", "yy", "zzz"]
    prof = profile(model, tok, {"a": A[:3], "b": B[:3]}, ProfileConfig(n_bootstrap=0, tokens="both"),
                   responses=responses, progress=False)
    # tokens="both": prompt and teacher-forced response, all counted, adding up to the profile's counts
    for expert in range(8):
        df = prof.expert_tokens(model, tok, A[:3], 2, expert, responses=responses[:3])
        assert df.counted.all() and int(df.routed.sum()) == int(prof.sums["count"][0, 1, expert])
    whole = prof.expert_tokens(model, tok, A[0], 2, 0, responses=responses[:1], routed_only=False)
    assert len(whole) == len(tok(A[0]).input_ids) + len(tok(responses[0], add_special_tokens=False).input_ids)
    with pytest.raises(ValueError, match="layer 0 is not an MoE layer of this profile"):
        prof.expert_tokens(model, tok, A[0], 0, 3)
    with pytest.raises(ModelMismatchError):
        prof.expert_tokens(tiny("qwen2_moe", seed=1), tok, A[0], 1, 3)


def test_expert_tokens_bad_input(tok):
    model = tiny("qwen2_moe")
    with pytest.raises(ValueError, match=r"layer 0 has no router; the MoE layers of this model are \[1, 2\]"):
        expert_tokens(model, tok, "hi", 0, 0)
    with pytest.raises(ValueError, match=r"expert 8 is out of range: each MoE layer has experts 0..7"):
        expert_tokens(model, tok, "hi", 1, 8)
    with pytest.raises(EmptyPromptSetError, match="at least one non-empty prompt"):
        expert_tokens(model, tok, ["  "], 1, 0)
    with pytest.raises(ValueError, match="context must be >= 0"):
        expert_tokens(model, tok, "hi", 1, 0, context=-1)
    with pytest.raises(DenseModelError, match="dense llama model"):
        expert_tokens(tiny("llama"), tok, "hi", 1, 0)


# ---- progress and cancellation -------------------------------------------------------------------

def test_progress_callback_reports_every_batch(tok):
    calls = []
    profile(tiny("qwen2_moe"), tok, {"a": A, "b": B}, ProfileConfig(n_bootstrap=0, batch_size=5),
            progress=lambda done, total, note: calls.append((done, total)))
    assert calls == [(0, 12), (5, 12), (10, 12), (12, 12)]
    calls.clear()  # responses generated first: answering, then counting
    profile(tiny("qwen2_moe"), tok, {"a": A[:3], "b": B[:3]},
            ProfileConfig(n_bootstrap=0, batch_size=4, tokens="response", max_new_tokens=2),
            progress=lambda done, total, note: calls.append((done, total)))
    assert calls == [(0, 12), (4, 12), (6, 12), (10, 12), (12, 12)]


def test_cancel_returns_the_partial_profile_of_the_prompts_counted(tok):
    model = tiny("qwen2_moe")
    stop = threading.Event()
    cfg = ProfileConfig(n_bootstrap=0, batch_size=4)

    def progress(done, total, note):
        if done >= 4:
            stop.set()  # what a GUI's cancel button does, from any thread

    part = profile(model, tok, {"a": A, "b": B}, cfg, progress=progress, cancel=stop)
    assert part.cancelled and part.stats["prompts"] == 4 and part.stats["prompts_requested"] == 12
    # classes are interleaved, so the first batch holds two prompts of each class: the same sums as
    # profiling just those four prompts
    ref = profile(model, tok, {"a": A[:2], "b": B[:2]}, cfg, progress=False)
    assert not ref.cancelled
    for k in ("n", "count", "frac", "tokens"):
        torch.testing.assert_close(part.sums[k], ref.sums[k])
    torch.testing.assert_close(part.scores, ref.scores)
    assert part.stats["prompts_per_class"] == {"a": 2, "b": 2}
    # a full run is unchanged by the interleaving: same sums as class by class, one prompt per batch
    full = profile(model, tok, {"a": A, "b": B}, cfg, progress=False)
    one = profile(model, tok, {"a": A, "b": B}, ProfileConfig(n_bootstrap=0, batch_size=1), progress=False)
    torch.testing.assert_close(full.sums["count"], one.sums["count"])


def test_cancel_before_every_class_is_counted_raises(tok):
    model = tiny("qwen2_moe")
    with pytest.raises(ProfileCancelled, match="cancelled while answering the prompts") as err:
        profile(model, tok, {"a": A[:2], "b": B[:2]},
                ProfileConfig(n_bootstrap=0, batch_size=2, tokens="response", max_new_tokens=2),
                progress=False, cancel=lambda: True)
    assert err.value.done == 0 and err.value.total == 4
    # classes of very different sizes: the first batch of one prompt has only the larger class
    with pytest.raises(ProfileCancelled, match=r"before class\(es\) \['b'\] had a counted prompt"):
        profile(model, tok, {"a": A, "b": B[:1]}, ProfileConfig(n_bootstrap=0, batch_size=1), progress=False,
                cancel=lambda: True)


# ---- sinks token strip -------------------------------------------------------------------------------

def test_token_strip_labels_stay_apart_on_long_inputs_and_hover_names_every_token(tok):
    from steer.sinks import STRIP_CELL_TEXT_UP_TO, STRIP_MAX_LABELS, detect_sinks, token_label

    model = tiny("llama")
    long_ids = [(7 * i) % 200 + 3 for i in range(150)]
    res = detect_sinks(model, tok, [long_ids, [5, 6, 7, 8, 9, 10]], tau=0.05)
    fig = res.figure("tokens", input=0)
    heat, ax = fig.data[0], fig.layout.xaxis
    ticks = list(ax.tickvals)
    step = -(-150 // STRIP_MAX_LABELS)
    assert step > 1 and ax.tickangle == -90 and heat.texttemplate is None  # no text crammed into cells
    assert all(b - a >= step for a, b in zip(ticks, ticks[1:]))  # labels a step apart never overlap
    assert len(ticks) <= STRIP_MAX_LABELS and ticks[0] == 0
    frac = res.sink_mask()[0, ..., :150].float().mean((0, 1))
    strongest = int(frac[1:].argmax()) + 1
    if frac[strongest] >= 0.25:  # the strongest hidden sink is labelled even off the regular grid
        assert strongest in ticks or any(abs(strongest - t) < step and frac[t] >= frac[strongest] for t in ticks)
    assert list(ax.ticktext) == [token_label(res.tokens[0][p]) for p in ticks]
    hover = list(heat.customdata[0])
    assert len(hover) == 150 and all(f"position {p}: " in h for p, h in enumerate(hover))
    short = res.figure("tokens", input=1)
    assert 6 <= STRIP_CELL_TEXT_UP_TO and short.data[0].texttemplate == "%{text}"
    assert token_label(" the") == "the" and token_label("\n") == "\\n" and token_label("  ") == "\u2423\u2423"
    assert token_label("x" * 40) == "x" * 11 + "\u2026"
