"""ACT head search (steer.act_search): sweeps, screens, the keep rule and `steer calibrate`."""

import json

import pytest
import torch

from steer.act import ACT, ACTConfig
from steer.act_search import (
    HeadSweep,
    attribution_screen,
    calibrate_heads,
    candidate_heads,
    combine_greedy,
    keep_alone,
    select_paper,
    sweep_heads,
)
from steer.tasks import Item, TaskSplit, evaluate
from steer.tiny import tiny_model, tiny_tokenizer

TAU, MINQ = 0.15, 2


def test_calibrate_bad_inputs():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    small = TaskSplit("x", "calibration", 0, [Item("x", f"p{i}", ("a", "b"), 0, f"u{i}") for i in range(5)])
    with pytest.raises(ValueError, match="calibration set too small"):
        calibrate_heads(model, tok, small)
    held = TaskSplit("x", "heldout", 0, small.items * 5)
    with pytest.raises(ValueError, match="heldout"):
        calibrate_heads(model, tok, held)


def test_calibrate_heads_and_config_roundtrip(tmp_path):
    """The default (paper) procedure: every candidate alone, all heads that gain applied together."""
    model, tok = tiny_model("llama"), tiny_tokenizer()
    items = [Item("x", f"in {i}: " + "ab" * (i % 5 + 2), ("a", "b", "c"), i % 3, f"u{i}") for i in range(21)]
    split = TaskSplit("x", "calibration", 0, items)
    cfg = calibrate_heads(model, tok, split, tau=TAU, min_queries=MINQ, max_candidates=4, min_gain=0)
    rows = cfg.search["candidates"]
    assert cfg.search["procedure"] == "paper" and cfg.search["screening"] == []
    assert len(rows) == 4 and cfg.search["n_items"] == 21
    assert all(r["kept"] == (r["gain"] >= 0) for r in rows)
    assert all(r["chosen"] == r["kept"] for r in rows)  # every kept head is applied, no combination check
    assert set(cfg.heads) == {(r["layer"], r["head"]) for r in rows if r["kept"]}
    if cfg.heads:  # the kept heads together really score what the search recorded
        res = evaluate(model, tok, split, interventions=[cfg.intervention(on_no_effect="ignore")])
        assert res.n_correct() == cfg.search["final_correct"]
    path = tmp_path / "act.json"
    cfg.save(path)
    again = ACTConfig.load(path)
    assert (
        again.heads == cfg.heads
        and again.beta == cfg.beta
        and again.search == json.loads(cfg.to_json())["search"]
    )
    assert len(again.to_dataframe()) == 4


def _items(n):
    return [
        Item("x", f"in {i}: " + "ab " * (i % 7 + 3) + "cd" * (i % 3), ("a", " bb", "c"), i % 3, f"u{i}")
        for i in range(n)
    ]


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "qwen2_moe"])
def test_sweep_suffix_path_equals_whole_forwards(family):
    """The layer-suffix shortcut gives the scores of whole forwards with ACT on each head."""
    model, tok = tiny_model(family), tiny_tokenizer()
    items = _items(9)
    heads = [(0, 1), (1, 0), (1, 3)]
    params = dict(tau=TAU, min_queries=MINQ)
    sw = sweep_heads(model, tok, items, heads, batch_size=4, **params)
    assert sw.path == "suffix"
    split = TaskSplit("x", "calibration", 0, items)
    base = evaluate(model, tok, split, batch_size=4)
    assert torch.allclose(torch.tensor(sw.baseline), torch.tensor(base.logprobs), atol=1e-5)
    changed = 0
    for hd in heads:
        act = ACT([hd], on_no_effect="ignore", **params)
        res = evaluate(model, tok, split, batch_size=4, interventions=[act])
        assert torch.allclose(torch.tensor(sw.per_head[hd]), torch.tensor(res.logprobs), atol=1e-5)
        assert sw.touched[hd] == act.total_touched
        changed += sw.touched[hd] > 0 and not torch.allclose(
            torch.tensor(sw.per_head[hd]), torch.tensor(base.logprobs)
        )
    assert changed  # ACT really acted in the sweep, so the equality above is not vacuous
    slow = sweep_heads(model, tok, items, heads[:1], batch_size=4, fast=False, **params)
    assert slow.path == "full" and torch.allclose(
        torch.tensor(slow.per_head[heads[0]]), torch.tensor(sw.per_head[heads[0]]), atol=1e-5
    )


@pytest.mark.parametrize("family", ["llama", "qwen2_moe"])
def test_attribution_screen_is_the_first_order_effect(family):
    """For a small perturbation (beta near 1) the estimate equals the exact one-head effect to first order."""
    model, tok = tiny_model(family), tiny_tokenizer()
    items = _items(9)
    params = dict(beta=0.98, tau=TAU, min_queries=MINQ)
    est = attribution_screen(model, tok, items, batch_size=4, **params)
    heads = sorted(est, key=lambda hd: -abs(est[hd]))[:4]  # the heads with the largest estimated effects
    sw = sweep_heads(model, tok, items, heads, batch_size=4, **params)
    exact = torch.tensor([sw.delta_logp(hd) for hd in heads], dtype=torch.float64)
    approx = torch.tensor([est[hd] for hd in heads], dtype=torch.float64)
    assert exact.abs().max() > 1e-5  # the effects are not vacuous
    assert torch.allclose(approx, exact, rtol=0.1, atol=0.05 * float(exact.abs().max()))
    assert all(p.requires_grad for p in model.parameters())  # parameters unfrozen again


@pytest.mark.parametrize("screen", ["attribution", "exact"])
def test_calibrate_screens_every_head_then_keep_rule_on_shortlist(screen):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    split = TaskSplit("x", "calibration", 0, _items(21))
    cfg = calibrate_heads(
        model,
        tok,
        split,
        procedure="shortlist",
        tau=TAU,
        min_queries=MINQ,
        shortlist=2,
        screen=screen,
        screen_items=6,
        min_gain=0,
    )
    search = cfg.search
    screened = search["screening"]
    assert search["screen"] == screen
    assert search["n_candidates"] == len(screened) > 2  # every candidate head was scored
    ranked = sorted(screened, key=lambda r: -r["screen_score"])
    want = [(r["layer"], r["head"]) for r in ranked if r["screen_score"] > 0][:2]
    assert want and [tuple(hd) for hd in search["swept"]] == want
    assert [(r["layer"], r["head"]) for r in search["candidates"]] == want  # keep rule on the shortlist only
    assert all(r["shortlisted"] == ((r["layer"], r["head"]) in want) for r in screened)
    with pytest.raises(ValueError, match="shortlist must be"):
        calibrate_heads(model, tok, split, shortlist=0)
    with pytest.raises(ValueError, match="screen must be"):
        calibrate_heads(model, tok, split, screen="fast")
    with pytest.raises(ValueError, match="procedure must be one of paper, shortlist"):
        calibrate_heads(model, tok, split, procedure="greedy")


def test_cli_calibrate_writes_config(tiny_dir, tmp_path, capsys):
    from steer.cli import main

    out = tmp_path / "act.json"
    rc = main(
        [
            "calibrate",
            "--model",
            str(tiny_dir),
            "--tasks",
            "kv_retrieval",
            "--n",
            "20",
            "--tau",
            "0.05",
            "--min-queries",
            "2",
            "--max-candidates",
            "2",
            "--min-gain",
            "0",
            "--out",
            str(out),
        ]
    )
    assert rc == 0 and "baseline" in capsys.readouterr().out
    cfg = ACTConfig.load(out)
    assert len(cfg.search["candidates"]) <= 2 and cfg.search["n_items"] == 20


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--beta", "1.5"], "beta must be in (0, 1]"),
        (["--heads", "9:0"], "out of range"),
        (["--n", "5"], "calibration set too small"),
    ],
)
def test_cli_calibrate_bad_inputs(tiny_dir, tmp_path, capsys, argv, message):
    from steer.cli import main

    rc = main(
        [
            "calibrate",
            "--model",
            str(tiny_dir),
            "--tasks",
            "kv_retrieval",
            "--n",
            "20",
            "--out",
            str(tmp_path / "a.json"),
            *argv,
        ]
    )
    assert rc == 2 and message in capsys.readouterr().err


def _sweep(answers, base_right, per_head_right):
    """A HeadSweep whose items are right exactly where the given sets say (two options per item)."""
    items = [Item("x", f"p{i}", ("a", "b"), a, f"u{i}") for i, a in enumerate(answers)]

    def scores(right):
        return [[0.0, -1.0] if (i in right) == (a == 0) else [-1.0, 0.0] for i, a in enumerate(answers)]

    per_head = {hd: scores(r) for hd, r in per_head_right.items()}
    return HeadSweep(items, scores(base_right), per_head, dict.fromkeys(per_head, 1), "suffix")


def test_keep_rules_paper_keeps_every_gain_shortlist_combines_greedily():
    answers = [0, 1] * 5
    base = {0, 1, 2, 3, 4}
    per_head = {(0, 0): base | {5, 6}, (0, 1): base | {7}, (1, 0): base - {0}, (1, 1): base}
    sw = _sweep(answers, base, per_head)
    base_k, rows = keep_alone(sw, list(per_head), min_gain=1)
    assert base_k == 5 and [r["gain"] for r in rows] == [2, 1, -1, 0]
    assert select_paper([dict(r) for r in rows]) == [(0, 0), (0, 1)]  # all that gain, applied together

    calls = []

    def score(heads):  # (0, 0) and (0, 1) together do worse than (0, 0) alone
        calls.append(list(heads))
        return 6

    chosen, best, combos = combine_greedy([dict(r) for r in rows], base_k, score)
    assert chosen == [(0, 0)] and best == 7 and calls == [[(0, 0), (0, 1)]]
    assert combos == [{"heads": [[0, 0], [0, 1]], "correct": 6}]
    _, rows2 = keep_alone(sw, list(per_head), min_gain=2)
    assert select_paper(rows2) == [(0, 0)]


def test_candidates_are_hidden_sink_heads_or_every_head_without_keep_first():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    params = dict(tau=TAU, alpha=None, min_queries=MINQ, keep_first=True)
    cands, freq = candidate_heads(model, tok, _items(6), None, None, 4, params)
    assert cands == list(freq) and all(f > 0 for f in freq.values())
    every, _ = candidate_heads(model, tok, _items(6), None, None, 4, {**params, "keep_first": False})
    n_layers, n_heads = model.config.num_hidden_layers, model.config.num_attention_heads
    assert len(every) == n_layers * n_heads and set(cands) <= set(every)
    assert candidate_heads(model, tok, _items(6), [(1, 2), (0, 1)], 1, 4, params)[0] == [(0, 1)]
