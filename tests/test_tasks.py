import math

import pytest
import torch

from steer import tasks
from steer.prompts import book_passages
from steer.tasks import EvalResult, Item, TaskSplit, evaluate, load_task, score_items, wilson_interval
from steer.tiny import tiny_model, tiny_tokenizer


@pytest.mark.parametrize("task", tasks.TASKS)
def test_splits_never_overlap_and_are_seeded(task):
    n = 40
    cal = load_task(task, "calibration", n=n)
    held = load_task(task, "heldout", n=n)
    assert len(cal) == n and len(held) == n
    assert not cal.uids & held.uids
    assert not {it.prompt for it in cal.items} & {it.prompt for it in held.items}
    again = load_task(task, "calibration", n=n)
    assert [it.uid for it in again.items] == [it.uid for it in cal.items]
    other_seed_cal = load_task(task, "calibration", n=n, seed=1)
    assert not other_seed_cal.uids & held.uids  # a seed changes items, never the split membership


def test_cloze_passages_partitioned():
    cal = load_task("cloze", "calibration")
    held = load_task("cloze", "heldout")
    passages = book_passages()
    assert len(cal) + len(held) <= len(passages) and len(cal) > 100 and len(held) > 300
    for it in cal.items[:20]:
        text = passages[int(it.uid.split("/p")[1])]
        word = it.options[it.answer]
        assert text.startswith(it.prompt) and text[len(it.prompt):].startswith(word)
        assert len(set(it.options)) == 4


def test_generated_items_are_answerable():
    for it in load_task("kv_retrieval", "heldout", n=20).items:
        key = it.prompt.rsplit("\n", 1)[1].rstrip(":")
        assert f"\n{key}:{it.options[it.answer]}\n" in "\n" + it.prompt
    for it in load_task("fewshot", "heldout", n=20).items:
        assert it.prompt.count(f"Label:{it.options[it.answer]}") == 5
        assert it.prompt.count(f"Label:{it.options[1 - it.answer]}") == 5


def test_bad_inputs():
    with pytest.raises(ValueError, match="unknown task"):
        load_task("sst2")
    with pytest.raises(ValueError, match="split"):
        load_task("cloze", "test")
    with pytest.raises(ValueError, match="only"):
        load_task("cloze", "calibration", n=100000)
    with pytest.raises(ValueError, match="positive"):
        load_task("fewshot", n=0)


def _reference_scores(model, tok, item):
    out = []
    for opt in item.options:
        ctx = tok(item.prompt).input_ids
        o = tok(opt, add_special_tokens=False).input_ids
        ids = torch.tensor([ctx + o])
        logp = torch.log_softmax(model(ids).logits.float(), -1)[0]
        out.append(sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(o)))
    return out


def test_score_items_matches_unbatched_reference():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    items = [
        Item("x", "hello there", (" ab", " c", " def"), 0, "a"),  # multi-token options
        Item("x", "a much longer prompt to force padding", ("x", "y"), 1, "b"),  # single-token path
        Item("x", "hi", ("q", "rs"), 0, "c"),
    ]
    got = score_items(model, tok, items, batch_size=4)
    for it, row in zip(items, got):
        assert row == pytest.approx(_reference_scores(model, tok, it), abs=1e-4)


def test_options_share_rows_and_score_as_separate_rows_would():
    """Single-token options share the bare prompt's row; an option whose tokens but the last are a prefix
    of another's is read on that row; no row holds an option's last token. Scores equal one row per option."""
    from steer.tasks import _requests, batches

    model, tok = tiny_model("llama"), tiny_tokenizer()
    items = [
        Item("x", "p", ("abc", "ab", "a", "b", "abd"), 0, "a"),  # "ab", "a", "b" read on "ab" (from "abc"/"abd")
        Item("x", "prompt", ("x", "y", "z"), 2, "b"),  # one row: the prompt
        Item("x", "q", ("xy", "zw", "xy"), 1, "c"),  # a repeated option is one read of the same row
    ]
    rows = [(r.item, tok.decode(r.ids[r.start :]), sorted(j for j, _ in r.reads)) for r in _requests(tok, items)]
    assert rows == [(0, "ab", [0, 1, 2, 3, 4]), (1, "", [0, 1, 2]), (2, "x", [0, 2]), (2, "z", [1])]
    for bs in (1, 2, 4):
        assert sum(len(b.requests) for b in batches(tok, items, bs)) == 4
        got = score_items(model, tok, items, batch_size=bs)
        for it, row in zip(items, got):
            assert row == pytest.approx(_reference_scores(model, tok, it), abs=1e-4)


def test_eval_result_accuracy_ci_and_compare():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    split = TaskSplit("x", "calibration", 0, [Item("x", f"p{i}", ("a", "b"), i % 2, f"u{i}") for i in range(6)])
    res = evaluate(model, tok, split)
    df = res.to_dataframe()
    k = res.n_correct()
    assert df.iloc[-1]["correct"] == k and math.isclose(df.iloc[-1]["accuracy"], k / 6)
    same = res.compare(res)
    assert same.iloc[-1]["delta"] == 0 and same.iloc[-1]["gained"] == 0
    flipped = EvalResult(res.tasks, res.uids, res.answers, [lp[::-1] for lp in res.logprobs], res.chance)
    cmp = res.compare(flipped)
    assert cmp.iloc[-1]["delta"] == pytest.approx((6 - 2 * k) / 6)
    lo, hi = wilson_interval(8, 10)
    assert 0.49 < lo < 0.5 and 0.94 < hi < 0.95  # textbook values 0.490, 0.943


def test_evaluate_rejects_empty():
    with pytest.raises(ValueError, match="nothing to evaluate"):
        evaluate(tiny_model("llama"), tiny_tokenizer(), TaskSplit("x", "calibration", 0, []))
