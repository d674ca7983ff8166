"""The LYNX exit vLLM serves (no rollback) against steer's exact rollback exit, on SmolLM2-135M.

Same model, problems, cues, exit string and budget as run_lynx.py (arithmetic word problems,
line-break cues, "\\n\\nThe answer is ", budget 64, answers of up to 8 tokens).

Stages (outputs under experiments/lynx/out_vllm/):
  label    HF generation with a forced-exit trial at every cue, for train (rollback labels), and for
           calibration and test in both modes: rollback (cut before the cue) and no rollback (the exit
           string after the cue's look-ahead token, what vLLM serves). Greedy decoding gives both
           modes the same trajectories and cue events (checked); only the trial answers differ.
  analyse  probe trained on train; per delta, three policies on the test split, from the trials:
             exact    : rollback exit, calibrated on rollback labels (steer generate)
             served   : no-rollback exit, same thresholds (same decisions, other answers)
             served*  : no-rollback exit, calibrated on no-rollback labels (guarantee on served answers)
           accuracy, output tokens, exits, premature exits per negative cue event and per trajectory.
  vllm     (run in .venv-vllm) the served* policy at ONLINE_DELTA through a real vLLM engine
           (steer.serving.vllm_lynx), against steer's HF loop with ExitConfig(rollback=False) and
           against the analyse stage's prediction, token for token.

    .venv-vllm/bin/python experiments/lynx/run_vllm_exit.py --stage all --n 60,60,40
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from steer.probes.answers import NumericChecker
from steer.probes.conformal import calibrate
from steer.probes.cues import CueSet
from steer.probes.data import LabelledCues, arithmetic_problems, chat_prompts, label_cue_events
from steer.probes.features import default_points
from steer.probes.generate import ExitConfig
from steer.probes.probe import LynxProbe, ProbeConfig, ProbeInfo, auc, train_probe

OUT = Path(__file__).parent / "out_vllm"
N = {"train": 60, "calibration": 60, "test": 40}
DELTAS = (0.1, 0.2, 0.3, 0.4)
ONLINE_DELTA = 0.3
CUES = CueSet(structural=("blank_line", "newline"))
CONFIG = ExitConfig(exit_string="\n\nThe answer is ", answer_max_tokens=8, answer_stop=(".", "\n"), max_new_tokens=64)
MODES = {"rollback": CONFIG, "keep": ExitConfig(**{**CONFIG.__dict__, "rollback": False})}
BATCH = 20


def problems(split):
    return arithmetic_problems(N[split], seed=0, split=split)


def stage_label(model, tok, name, splits=None):
    OUT.mkdir(parents=True, exist_ok=True)
    points, chk = default_points(model), NumericChecker()
    jobs = [("train", "rollback"), ("calibration", "rollback"), ("calibration", "keep"), ("test", "rollback"),
            ("test", "keep")]
    jobs = [j for j in jobs if splits is None or j[0] in splits]
    for split, mode in jobs:
        probs, t0 = problems(split), time.time()
        lab, results = label_cue_events(model, tok, probs, points, CUES, MODES[mode], chk, batch_size=BATCH,
                                        model_name=name, progress=lambda d, n, s=split, m=mode, t=t0: print(
                                            f"  {s}/{m}: {d}/{n} {time.time() - t:.0f}s", flush=True))
        lab.to_safetensors(OUT / f"cues_{split}_{mode}.safetensors")
        rows, i = [], 0
        for res in results:
            for row in res.rows:
                p = probs[i]
                i += 1
                rows.append({"gold": p.answer, "stop": row.stop, "kept": row.kept, "n_tokens": row.n_tokens(len(res.exit_ids)),
                             "generated": len(row.generated_ids), "correct": chk.check(row.final_text, p.answer, forced=row.forced),
                             "events": [{"cue_token": e.cue_token, "cut": e.cut, "answer": e.trial.answer_text,
                                         "answer_len": len(e.trial.answer_ids),
                                         "label": int(chk.check(e.trial.answer_text, p.answer, forced=True))}
                                        for e in row.events]})
        (OUT / f"rows_{split}_{mode}.json").write_text(json.dumps(rows, indent=1))
        print(f"{split}/{mode}: {len(probs)} problems, {len(lab)} cue events, {int(lab.labels.sum())} positive, "
              f"{time.time() - t0:.0f}s", flush=True)


def fit() -> LynxProbe:
    lab = LabelledCues.from_safetensors(OUT / "cues_train_rollback.safetensors")
    m = lab.meta
    info = ProbeInfo(model=m["model"], n_layers=m["n_layers"], d_model=m["d_model"], points=m["points"],
                     cues=m["cues"], exit_string=m["exit_string"])
    return train_probe(lab.features, lab.labels, ProbeConfig(), info, groups=lab.trajectory)


def load_split(split: str) -> tuple[dict, dict]:
    labs = {m: LabelledCues.from_safetensors(OUT / f"cues_{split}_{m}.safetensors") for m in MODES}
    rows = {m: json.loads((OUT / f"rows_{split}_{m}.json").read_text()) for m in MODES}
    a, b = labs["rollback"], labs["keep"]
    assert torch.equal(a.cue_token, b.cue_token) and torch.equal(a.trajectory, b.trajectory), \
        "the two modes' trajectories differ: greedy decoding should make them identical"
    assert torch.allclose(a.features, b.features, atol=1e-4)
    return labs, rows


def simulate(rows: list[dict], exits: list[bool], mode: str, exit_len: int) -> dict:
    """Each trajectory exits at its first cue event in `exits` (flat, in event order)."""
    correct, tokens, n_exit, bad, k = [], [], 0, 0, 0
    for r in rows:
        n = len(r["events"])
        flags, k = exits[k: k + n], k + n
        # without rollback an exit follows the look-ahead token: an eos there ended the row already
        first = next((j for j, f in enumerate(flags) if f and not (
            mode == "keep" and r["stop"] == "eos" and r["events"][j]["cue_token"] == r["generated"] - 2)), None)
        if first is None:
            correct.append(bool(r["correct"]))
            tokens.append(r["n_tokens"])
            continue
        e = r["events"][first]
        n_exit += 1
        bad += int(e["label"] == 0)
        correct.append(bool(e["label"]))
        kept = e["cut"] if mode == "rollback" else e["cue_token"] + 2
        tokens.append(kept + exit_len + e["answer_len"])
    return {"accuracy": sum(correct) / len(rows), "mean_tokens": sum(tokens) / len(rows),
            "exit_fraction": n_exit / len(rows), "premature_per_trajectory": bad / len(rows)}


def _answers_identical(rows: dict) -> float:
    """Share of test cue events whose trial answer text is the same in both modes."""
    pairs = [(a["answer"], b["answer"]) for ra, rb in zip(rows["rollback"], rows["keep"])
             for a, b in zip(ra["events"], rb["events"])]
    return sum(a == b for a, b in pairs) / max(len(pairs), 1)


def per_event(exits: torch.Tensor, y: torch.Tensor) -> float:
    neg = y == 0
    return float(exits[neg].double().mean()) if bool(neg.any()) else math.nan


def stage_analyse(tok) -> dict:
    exit_len = len(tok(CONFIG.exit_string, add_special_tokens=False)["input_ids"])
    probe = fit()
    cal, _ = load_split("calibration")
    test, rows = load_split("test")
    with torch.no_grad():
        p_cal, p_test = probe(cal["rollback"].features), probe(test["rollback"].features)
    y_r, y_k = test["rollback"].labels, test["keep"].labels
    out = {"n": {s: len(json.loads((OUT / f"rows_{s}_rollback.json").read_text())) for s in N},
           "test_events": int(len(y_r)), "test_positive": {"rollback": int(y_r.sum()), "keep": int(y_k.sum())},
           "labels_agree": float((y_r == y_k).double().mean()),
           "calibration_labels_agree": float((cal["rollback"].labels == cal["keep"].labels).double().mean()),
           "answers_identical": _answers_identical(rows), "test_auc": auc(p_test, y_r),
           "exit_len": exit_len, "deltas": {}}
    out["full"] = simulate(rows["rollback"], [False] * len(y_r), "rollback", exit_len)
    for delta in DELTAS:
        c_r = calibrate(p_cal, cal["rollback"].labels, delta, warn=False)
        c_k = calibrate(p_cal, cal["keep"].labels, delta, warn=False)
        ex_r, ex_k = c_r.should_exit(p_test), c_k.should_exit(p_test)
        out["deltas"][str(delta)] = {
            "exact": {**simulate(rows["rollback"], ex_r.tolist(), "rollback", exit_len),
                      "premature_per_event": per_event(ex_r, y_r), "q0": c_r.q0},
            "served": {**simulate(rows["keep"], ex_r.tolist(), "keep", exit_len),
                       "premature_per_event": per_event(ex_r, y_k),
                       "premature_per_event_rollback_labels": per_event(ex_r, y_r)},
            "served_own_cal": {**simulate(rows["keep"], ex_k.tolist(), "keep", exit_len),
                               "premature_per_event": per_event(ex_k, y_k), "q0": c_k.q0},
        }
    (OUT / "analyse.json").write_text(json.dumps(out, indent=1))
    print(tables(out))
    return out


def tables(out: dict) -> str:
    lines = ["| delta | policy | accuracy | mean output tokens | exits | premature exits / trajectory | "
             "P(exit \\| y=0) per cue event |", "|---|---|---|---|---|---|---|"]
    f = out["full"]
    lines.append(f"| - | full generation (budget 64) | {f['accuracy']:.3f} | {f['mean_tokens']:.1f} | - | - | - |")
    names = {"exact": "exact (rollback), rollback labels", "served": "served (no rollback), same thresholds",
             "served_own_cal": "served (no rollback), no-rollback labels"}
    for d, pol in out["deltas"].items():
        for k, name in names.items():
            r = pol[k]
            extra = f" ({r['premature_per_event_rollback_labels']:.3f} vs rollback labels)" if k == "served" else ""
            lines.append(f"| {d} | {name} | {r['accuracy']:.3f} | {r['mean_tokens']:.1f} | {r['exit_fraction']:.2f} | "
                         f"{r['premature_per_trajectory']:.3f} | {r['premature_per_event']:.3f}{extra} |")
    return "\n".join(lines)


def stage_vllm(model, tok, name) -> dict:
    """The served* policy at ONLINE_DELTA through a real vLLM engine, against HF and the prediction."""
    import os

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM's CPU default reserves 92% of the memory
    from steer.config import InterventionConfig, LynxSection
    from steer.probes.generate import LynxPolicy, generate_with_exit
    from steer.serving.vllm_lynx import generate_lynx, lynx_engine

    probe = fit()
    cal, _ = load_split("calibration")
    with torch.no_grad():
        probe.calibration = calibrate(probe(cal["rollback"].features), cal["keep"].labels, ONLINE_DELTA, warn=False)
    cfg_dir = InterventionConfig.for_model(model, lynx=LynxSection.from_probe(probe)).save(OUT / "served_config")
    probs = problems("test")
    prompts = chat_prompts(tok, [p.question for p in probs])
    t0 = time.time()
    hf = []
    for s in range(0, len(prompts), BATCH):
        hf += generate_with_exit(model, tok, prompts[s: s + BATCH], LynxPolicy(probe, probe.calibration), cues=CUES,
                                 config=MODES["keep"]).rows
    t_hf = time.time() - t0
    exit_ids = tok(CONFIG.exit_string, add_special_tokens=False)["input_ids"]
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    llm = lynx_engine(name, cfg_dir, max_model_len=512, max_num_seqs=BATCH)
    t0 = time.time()
    got = generate_lynx(llm, ids, CONFIG.max_new_tokens + len(exit_ids) + CONFIG.answer_max_tokens + 1,
                        budget=CONFIG.max_new_tokens, answer_tokens=CONFIG.answer_max_tokens, answer_stop=CONFIG.answer_stop)
    t_vllm = time.time() - t0
    eos = {tok.eos_token_id}
    chk, same, exits_hf, exits_vllm, correct = NumericChecker(), 0, 0, 0, 0
    for p, row, g in zip(probs, hf, got):
        want = list(row.generated_ids) + (exit_ids + list(row.answer.answer_ids) if row.answer else [])
        strip = [t for t in g if t not in eos] == [t for t in want if t not in eos]
        same += int(strip)
        exits_hf += int(row.stop == "exit")
        text = tok.decode(g, skip_special_tokens=True)
        answer = text.split(CONFIG.exit_string, 1)[1] if CONFIG.exit_string in text else text
        correct += int(chk.check(answer, p.answer, forced=CONFIG.exit_string in text))
        at = next((j for j in range(len(g)) if g[j: j + len(exit_ids)] == exit_ids), None)
        exits_vllm += int(at is not None and at < CONFIG.max_new_tokens)  # exited at a cue, not at the budget
    res = {"delta": ONLINE_DELTA, "n": len(probs), "identical_to_hf": same, "hf_exits": exits_hf, "vllm_exits_before_budget": exits_vllm,
           "vllm_accuracy": correct / len(probs), "hf_accuracy": sum(chk.check(r.final_text, p.answer, forced=r.forced)
                                                                     for p, r in zip(probs, hf)) / len(probs),
           "hf_seconds": t_hf, "vllm_seconds": t_vllm, "model": name}
    (OUT / "vllm.json").write_text(json.dumps(res, indent=1))
    print(res, flush=True)
    return res


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage", choices=["label", "analyse", "vllm", "all"], default="all")
    ap.add_argument("--n", help="problems per split as train,calibration,test (default 60,60,40)")
    ap.add_argument("--splits", help="label stage: only these splits (comma list), e.g. to run them in parallel")
    args = ap.parse_args(argv)
    if args.n:
        N.update(zip(N, map(int, args.n.split(","))))
    torch.set_num_threads(1)
    from steer.models import load

    lm = load("smollm2", progress=False)
    model, tok = lm.model, lm.tokenizer
    if args.stage in ("label", "all"):
        stage_label(model, tok, lm.source, args.splits.split(",") if args.splits else None)
    if args.stage in ("analyse", "all"):
        stage_analyse(tok)
    if args.stage in ("vllm", "all"):
        stage_vllm(model, tok, lm.source)


if __name__ == "__main__":
    main()
