"""One progress convention (steer.progress): callbacks get (done, total, note), the library is silent
by default, the CLI's tqdm bar draws on stderr."""

from __future__ import annotations

import pytest

from steer.progress import Bar, Steps, as_progress, bar, silent


def test_none_and_false_are_silent_and_true_is_a_clear_error():
    assert as_progress(None) is silent and as_progress(False) is silent
    with pytest.raises(TypeError, match=r"steer\.progress\.bar"):
        as_progress(True)
    with pytest.raises(TypeError, match="callable"):
        as_progress("yes")
    assert bar("x", enabled=False) is None and isinstance(bar("x"), Bar)


def test_steps_report_a_running_count():
    calls = []
    steps = Steps(lambda *a: calls.append(a), 5, "start")
    steps.advance(2, "two")
    steps.advance(3)
    assert calls == [(0, 5, "start"), (2, 5, "two"), (5, 5, "")]


def test_bar_draws_on_stderr_and_prints_status_notes(capsys):
    b = Bar("steer test", "prompt")
    b(0, 0, "loading")  # nothing to count: a line
    for done in range(4):
        b(done, 3, "working")
    b(1, 2, "next phase")  # a new total starts a new bar
    b.close()
    err = capsys.readouterr().err
    assert "steer test: loading" in err and "3/3" in err and "1/2" in err and "next phase" in err


def test_generate_responses_reports_every_batch():
    from steer.prompts import generate_responses
    from steer.tiny import tiny_model, tiny_tokenizer

    calls = []
    out = generate_responses(tiny_model("llama"), tiny_tokenizer(), ["a", "bc", "def"], max_new_tokens=2,
                             batch_size=2, progress=lambda done, total, note: calls.append((done, total)))
    assert len(out) == 3 and calls == [(0, 3), (2, 3), (3, 3)]


def test_head_combination_reports_each_trial_with_its_score():
    from steer.act_search import combine_greedy

    rows = [dict(layer=0, head=h, kept=True, gain=g, correct=c) for h, g, c in [(0, 2, 7), (1, 1, 6), (2, 1, 6)]]
    calls = []
    combine_greedy(rows, 5, lambda heads: 8 if len(heads) == 2 else 6, lambda *a: calls.append(a))
    assert calls == [(2, 3, "combination [(0, 0), (0, 1)]: 8"), (3, 3, "combination [(0, 0), (0, 1), (0, 2)]: 6")]
