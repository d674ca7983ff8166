"""LYNX on SmolLM2-135M-Instruct with seeded arithmetic word problems (CPU-sized).

Stages (each saves its output under experiments/lynx/out/, so `--stage analyse` reruns cheaply):
  label     generate for train / calibration / test problems with a forced-exit trial at every cue
            event (the same rollback an online exit uses); save features + labels per split.
  online    truly online runs on the test split: LYNX at one delta, DEER (threshold 0.95), fixed
            budget cuts.
  analyse   train the probe, calibrate at several deltas, evaluate on the test split, write
            RESULTS.md tables (results.json holds every number).
  resplit   the conformal check over 1000 random calibration/test splits of the pooled cue events
            (by trajectory), with the saved probe: the guarantee is marginal over these draws.
  rescore   analyse + resplit from the saved outputs only (rows_*.json, cues_*.safetensors,
            online.json, run.json): no model is loaded and nothing is generated.

Test-split LYNX / DEER numbers at every delta are computed from the test labelling pass: greedy
decoding is deterministic and the trial at cue j is exactly what exiting at cue j produces, so the
first cue a policy accepts gives its answer and token count. The online stage checks this against
real online runs.

    .venv/bin/python experiments/lynx/run_lynx.py --stage all
    .venv/bin/python experiments/lynx/run_lynx.py --model qwen2.5-coder --budget 256 --n 40,30,30 \
        --out experiments/lynx/out_qwen --stage all
    .venv/bin/python experiments/lynx/run_lynx.py --out experiments/lynx/out_qwen --stage rescore
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from steer.probes.answers import NumericChecker
from steer.probes.conformal import calibrate
from steer.probes.cues import CueSet
from steer.probes.data import LabelledCues, arithmetic_problems, chat_prompts, label_cue_events, load_model
from steer.probes.features import default_points
from steer.probes.generate import DeerPolicy, ExitConfig, LynxPolicy, generate_with_exit, premature_exit_rates
from steer.probes.probe import LynxProbe, ProbeConfig, ProbeInfo, auc, train_probe
from steer.stats import mcnemar_exact, wilson_ci

OUT = Path(__file__).parent / "out"  # --out changes it (e.g. out_moe for the embedded MoE)
N = {"train": 100, "calibration": 80, "test": 60}  # --n changes it
DELTAS = (0.05, 0.1, 0.2, 0.3)
ONLINE_DELTA = 0.2
BUDGETS = (16, 32)  # fixed-budget baselines: a quarter and half of the reasoning budget (--budget)
DEER_N = 20  # DEER's online run covers the first DEER_N test problems (a consistency check; --deer-n)
DEER_THRESHOLD = 0.95
# SmolLM2 never says "wait"/"hmm": it ends steps with line breaks, so structural cues do the work.
CUES = CueSet(structural=("blank_line", "newline"))
CONFIG = ExitConfig(exit_string="\n\nThe answer is ", answer_max_tokens=8, answer_stop=(".", "\n"),
                    max_new_tokens=64)
BATCH = 20


def problems(split):
    return arithmetic_problems(N[split], seed=0, split=split)


def row_records(problems_, results, checker) -> list[dict]:
    recs, i = [], 0
    for res in results:
        for row in res.rows:
            p = problems_[i]
            i += 1
            recs.append({
                "question": p.question, "gold": p.answer, "stop": row.stop, "kept": row.kept,
                "n_tokens": row.n_tokens(len(res.exit_ids)), "forward_tokens": row.forward_tokens,
                "correct": checker.check(row.final_text, p.answer, forced=row.forced),
                "text": row.reasoning_text, "final": row.final_text,
                "events": [{"cue": e.cue, "cue_token": e.cue_token, "cut": e.cut,
                            "answer": e.trial.answer_text, "answer_len": len(e.trial.answer_ids),
                            "trial_forward": e.trial.forward_tokens, "confidence": e.trial.confidence,
                            "label": int(checker.check(e.trial.answer_text, p.answer, forced=True))}
                           for e in row.events],
            })
    return recs


def stage_label(model, tok, name, splits=("train", "calibration", "test")):
    OUT.mkdir(parents=True, exist_ok=True)
    points = default_points(model)
    chk = NumericChecker()
    for split in splits:
        probs = problems(split)
        t0 = time.time()
        lab, results = label_cue_events(model, tok, probs, points, CUES, CONFIG, chk, batch_size=BATCH,
                                        model_name=name,
                                        progress=lambda d, n, _note, s=split, t=t0: print(
                                            f"  {s}: {d}/{n} {time.time()-t:.0f}s", flush=True))
        lab.meta["split"] = split
        lab.to_safetensors(OUT / f"cues_{split}.safetensors")
        recs = row_records(probs, results, chk)
        (OUT / f"rows_{split}.json").write_text(json.dumps(recs, indent=1))
        acc = sum(r["correct"] for r in recs) / len(recs)
        print(f"{split}: {len(probs)} problems, {len(lab)} cue events, {int(lab.labels.sum())} positive, "
              f"full-generation accuracy {acc:.3f}, {time.time()-t0:.0f}s", flush=True)
        _record_run(name, tok, points, **{f"label_{split}_seconds": round(time.time() - t0)})


def _record_run(name, tok, points, **extra):
    """run.json: what produced this directory (read back by --stage rescore, which loads no model)."""
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / "run.json"
    run = json.loads(path.read_text()) if path.exists() else {}
    run.update({"model": name, "points": list(points), "n": dict(N), "budget": CONFIG.max_new_tokens,
                "cues": CUES.to_json(), "exit_string": CONFIG.exit_string,
                "exit_len": len(tok(CONFIG.exit_string, add_special_tokens=False)["input_ids"]),
                "deer_n": DEER_N, "machine": _machine(), **extra})
    path.write_text(json.dumps(run, indent=1))


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")


def _machine() -> str:
    return f"{platform.machine()} {platform.processor() or ''} CPU, torch {torch.__version__}, 1 thread"


def fit(lab_train: LabelledCues) -> LynxProbe:
    m = lab_train.meta
    info = ProbeInfo(model=m["model"], n_layers=m["n_layers"], d_model=m["d_model"], points=m["points"],
                     cues=m["cues"], exit_string=m["exit_string"])
    return train_probe(lab_train.features, lab_train.labels, ProbeConfig(), info, groups=lab_train.trajectory)


def simulate(recs, exit_at) -> dict:
    """Accuracy and tokens when each trajectory exits at the first event `exit_at(ev)` accepts."""
    correct, tokens, compute, exits = [], [], [], 0
    for r in recs:
        ex = next((e for e in r["events"] if exit_at(e)), None)
        if ex is None:
            correct.append(r["correct"])
            tokens.append(r["n_tokens"])
        else:
            exits += 1
            correct.append(bool(ex["label"]))
            tokens.append(ex["cut"] + EXIT_LEN + ex["answer_len"])
        compute.append(tokens[-1])
    return {"accuracy": sum(correct) / len(recs), "mean_tokens": sum(tokens) / len(recs),
            "exit_fraction": exits / len(recs), "correct_rows": correct}


def simulate_budget_at_cue(recs, budget: int) -> dict:
    """A fixed budget simulated from the labelling pass: a row that stops by itself within `budget`
    tokens keeps its answer; any other row exits at its last cue whose cut is <= budget (the trial
    there is exactly that exit). Not the same as the online budget cut, which forces the answer at
    token `budget` itself (mid-step); rows with no cue by then count as wrong (`no_cue_rows`)."""
    correct, tokens, no_cue = [], [], 0
    for r in recs:
        if r["stop"] == "eos" and r["kept"] <= budget:
            correct.append(r["correct"])
            tokens.append(r["n_tokens"])
            continue
        ev = [e for e in r["events"] if e["cut"] <= budget]
        if not ev:
            no_cue += 1
            correct.append(False)
            tokens.append(budget)
            continue
        correct.append(bool(ev[-1]["label"]))
        tokens.append(ev[-1]["cut"] + EXIT_LEN + ev[-1]["answer_len"])
    return {"accuracy": sum(correct) / len(recs), "mean_tokens": sum(tokens) / len(recs), "no_cue_rows": no_cue,
            "correct_rows": correct}


def stage_relabel():
    """Re-check the saved trial answers with the current checker and rewrite the labels (cheap:
    generation is not rerun). Events are stored in feature order."""
    chk = NumericChecker()
    for s in N:
        lab = LabelledCues.from_safetensors(OUT / f"cues_{s}.safetensors")
        recs = json.loads((OUT / f"rows_{s}.json").read_text())
        labels = []
        for r in recs:
            r["correct"] = chk.check(r["final"], r["gold"], forced=r["stop"] != "eos")
            for e in r["events"]:
                e["label"] = int(chk.check(e["answer"], r["gold"], forced=True))
                labels.append(e["label"])
        assert len(labels) == len(lab)
        changed = int((torch.tensor(labels) != lab.labels).sum())
        lab.labels = torch.tensor(labels, dtype=torch.long)
        lab.to_safetensors(OUT / f"cues_{s}.safetensors")
        (OUT / f"rows_{s}.json").write_text(json.dumps(recs, indent=1))
        print(f"{s}: {changed} labels changed, {sum(labels)} positive of {len(labels)}")


def stage_online(model, tok, name, only=None):
    """Truly online runs on the test split."""
    chk = NumericChecker()
    probs = problems("test")
    prompts = chat_prompts(tok, [p.question for p in probs])
    golds = [p.answer for p in probs]
    probe = fit(LabelledCues.from_safetensors(OUT / "cues_train.safetensors"))
    cal = LabelledCues.from_safetensors(OUT / "cues_calibration.safetensors")
    with torch.no_grad():
        calib = calibrate(probe(cal.features), cal.labels, ONLINE_DELTA)
    runs = {}

    def go(label, n=None, **kw):
        t0, n = time.time(), min(n or len(prompts), len(prompts))
        rows, toks, fwd, secs = [], [], [], 0.0
        for s in range(0, n, BATCH):
            res = generate_with_exit(model, tok, prompts[s: min(s + BATCH, n)], cues=CUES, **kw)
            rows += res.correct(golds[s: min(s + BATCH, n)], chk)
            toks += res.n_tokens()
            fwd += [r.forward_tokens for r in res.rows]
            secs += res.seconds
            runs.setdefault(label + "_rows", []).extend(
                [{"stop": r.stop, "kept": r.kept, "exit_cue": next((e.cue_token for e in r.events if e.exited), None),
                  "final": r.final_text} for r in res.rows])
        runs[label] = {"n": len(rows), "accuracy": sum(rows) / len(rows), "mean_tokens": sum(toks) / len(toks),
                       "mean_forward_tokens": sum(fwd) / len(fwd), "seconds": secs}
        print(label, runs[label], f"{time.time()-t0:.0f}s", flush=True)

    if only in (None, "lynx"):
        go(f"lynx_online_delta{ONLINE_DELTA}", policy=LynxPolicy(probe, calib), config=CONFIG)
    if only in (None, "deer"):
        go(f"deer_online_first{DEER_N}", n=DEER_N, policy=DeerPolicy(DEER_THRESHOLD), config=CONFIG)  # consistency
    if only in (None, "budget"):
        for b in BUDGETS:
            cfg = ExitConfig(**{**CONFIG.__dict__, "max_new_tokens": b})
            go(f"budget{b}", config=cfg)
    merged = json.loads((OUT / "online.json").read_text()) if (OUT / "online.json").exists() else {}
    merged.update(runs)  # other runs already recorded stay
    (OUT / "online.json").write_text(json.dumps(merged, indent=1))


EXIT_LEN = 0


def stage_analyse(exit_len: int):
    global EXIT_LEN
    EXIT_LEN = exit_len
    labs = {s: LabelledCues.from_safetensors(OUT / f"cues_{s}.safetensors") for s in N}
    recs = {s: json.loads((OUT / f"rows_{s}.json").read_text()) for s in N}
    chk = NumericChecker()
    probe = fit(labs["train"])
    probe.calibration = calibrate(p_cal := probe(labs["calibration"].features).detach(),
                                  labs["calibration"].labels, ONLINE_DELTA, warn=False)
    probe.save(OUT / "probe")
    del p_cal
    with torch.no_grad():
        p = {s: probe(labs[s].features).double() for s in N}
    out = {"probe": {"val_auc": probe.info.val_auc, "best_epoch": probe.info.best_epoch,
                     "test_auc": auc(p["test"], labs["test"].labels),
                     "calibration_auc": auc(p["calibration"], labs["calibration"].labels)},
           "splits": {s: {"problems": len(recs[s]), "events": len(labs[s]), "positive": int(labs[s].labels.sum()),
                          "full_accuracy": sum(r["correct"] for r in recs[s]) / len(recs[s])} for s in N}}
    test = recs["test"]
    # attach probe scores to test events in order (events are stored in the same order as features)
    k = 0
    for r in test:
        for e in r["events"]:
            e["p"] = float(p["test"][k])
            k += 1
    assert k == len(labs["test"])
    out["full"] = {"accuracy": out["splits"]["test"]["full_accuracy"],
                   "mean_tokens": sum(r["n_tokens"] for r in test) / len(test),
                   "correct_rows": [bool(r["correct"]) for r in test]}
    out["oracle_first_correct_cue"] = simulate(test, lambda e: e["label"] == 1)
    out["deer"] = simulate(test, lambda e: e["confidence"] > DEER_THRESHOLD)
    out["deer"]["mean_forward_tokens_incl_trials"] = _deer_compute(test)
    out[f"deer_first{DEER_N}_simulated"] = simulate(test[:DEER_N], lambda e: e["confidence"] > DEER_THRESHOLD)
    out["budget_at_last_cue"] = {str(b): simulate_budget_at_cue(test, b) for b in BUDGETS}
    out["lynx"] = {}
    for d in DELTAS:
        calib = calibrate(p["calibration"], labs["calibration"].labels, d, warn=False)
        rates = premature_exit_rates(p["test"], labs["test"].labels, labs["test"].trajectory, calib)
        n_neg = rates["n_negative_events"]
        se = math.sqrt(d * (1 - d) / max(n_neg, 1))
        sim = simulate(test, lambda e, c=calib: bool(c.should_exit(torch.tensor([e["p"]]))[0]))
        out["lynx"][str(d)] = {**sim, **rates, "q0": calib.q0, "q1": calib.q1, "n0": calib.n0, "n1": calib.n1,
                               "binomial_se_at_delta": se, "notes": calib.notes}
    out["exit_len"] = EXIT_LEN
    out["points"] = labs["train"].meta["points"]
    if (OUT / "online.json").exists():
        online = json.loads((OUT / "online.json").read_text())
        out["online"] = {k: v for k, v in online.items() if not k.endswith("_rows")}
        for k in out["online"]:  # re-check online answers with the current checker too
            rows = online[k + "_rows"]
            ok = [chk.check(r["final"], t["gold"], forced=r["stop"] != "eos") for r, t in zip(rows, test)]
            out["online"][k]["accuracy"] = sum(ok) / len(ok)
            out["online"][k]["correct_rows"] = ok
            if k.startswith("lynx"):  # same exits as the simulation? (batch composition can nudge floats)
                sim_exit = [next((e["cue_token"] for e in t["events"]
                                  if bool(probe.calibration.should_exit(torch.tensor([e["p"]]))[0])), None)
                            for t in test[: len(rows)]]
                out["online"][k]["same_exit_as_simulation"] = sum(
                    a == r["exit_cue"] for a, r in zip(sim_exit, rows)) / len(rows)
    add_stats(out)
    out["machine"] = _machine()
    out["budget"] = CONFIG.max_new_tokens
    out["date"] = _now()
    (OUT / "results.json").write_text(json.dumps(out, indent=1, default=str))
    (OUT / "tables.md").write_text(tables(out))
    print(json.dumps(out, indent=1, default=str))
    print(tables(out))


def stage_resplit(n_splits: int = 1000):
    """The guarantee is marginal over calibration draws; one calibration/test split is one draw. Pool
    the calibration and test cue events, redraw the split by trajectory `n_splits` times (same
    sizes), recalibrate the saved probe each time and measure P(exit | y=0) on the held-out part."""
    probe = LynxProbe.load(OUT / "probe")
    labs = [LabelledCues.from_safetensors(OUT / f"cues_{s}.safetensors") for s in ("calibration", "test")]
    with torch.no_grad():
        p = torch.cat([probe(lab.features).double() for lab in labs])
    y = torch.cat([lab.labels for lab in labs])
    traj = torch.cat([labs[0].trajectory, labs[1].trajectory + int(labs[0].trajectory.max()) + 1])
    ids = torch.unique(traj)
    n_cal = len(torch.unique(labs[0].trajectory))
    gen = torch.Generator().manual_seed(0)
    out = {"n_splits": n_splits, "n_trajectories": len(ids), "n_calibration_trajectories": n_cal, "deltas": {}}
    rates = {d: [] for d in DELTAS}
    traj_rates = {d: [] for d in DELTAS}
    for _ in range(n_splits):
        perm = ids[torch.randperm(len(ids), generator=gen)]
        is_cal = torch.isin(traj, perm[:n_cal])
        for d in DELTAS:
            c = calibrate(p[is_cal], y[is_cal], d, warn=False)
            r = premature_exit_rates(p[~is_cal], y[~is_cal], traj[~is_cal], c)
            rates[d].append(r["per_event"])
            traj_rates[d].append(r["per_trajectory"])
    for d in DELTAS:
        t = torch.tensor(rates[d], dtype=torch.float64)
        t = t[~t.isnan()]
        out["deltas"][str(d)] = {"mean_per_event": float(t.mean()), "sd_per_event": float(t.std()),
                                 "share_of_splits_above_delta": float((t > d).double().mean()),
                                 "mean_per_trajectory": float(torch.tensor(traj_rates[d]).mean())}
    (OUT / "resplit.json").write_text(json.dumps(out, indent=1))
    lines = ["| delta | mean P(exit given y=0) over splits | sd over splits | share of splits above delta | "
             "mean premature exits per trajectory |", "|---|---|---|---|---|"]
    for d, v in out["deltas"].items():
        lines.append(f"| {d} | {v['mean_per_event']:.3f} | {v['sd_per_event']:.3f} | "
                     f"{v['share_of_splits_above_delta']:.2f} | {v['mean_per_trajectory']:.3f} |")
    print("\n".join(lines))
    (OUT / "resplit.md").write_text("\n".join(lines) + "\n")


def method_rows(out) -> list[tuple[str, dict]]:
    """(label, entry) for every method in the accuracy table, in table order."""
    rows = [(f"full generation (budget {CONFIG.max_new_tokens})", out["full"])]
    rows += [(f"LYNX delta={d}", r) for d, r in out["lynx"].items()]
    rows += [(f"DEER (trial confidence > {DEER_THRESHOLD})", out["deer"]),
             ("oracle: first cue whose forced answer is right", out["oracle_first_correct_cue"])]
    rows += [(f"budget {b}, exit at the last cue before it (simulated)", v)
             for b, v in out.get("budget_at_last_cue", {}).items()]
    rows += [(f"fixed budget cut at {k[6:]} tokens (online)", v) for k, v in out.get("online", {}).items()
             if k.startswith("budget")]
    return rows


def add_stats(out):
    """Wilson 95% CI of each accuracy and an exact McNemar test against full generation on the same
    test problems (paired binary outcomes), for every method with per-row outcomes."""
    full = out["full"]["correct_rows"]
    for _, r in method_rows(out):
        ok = r.get("correct_rows")
        if ok is None:
            continue
        r["ci95"] = list(wilson_ci(sum(ok), len(ok)))
        if len(ok) == len(full) and r is not out["full"]:
            m = mcnemar_exact(full, ok)
            r["vs_full"] = {"gained": m.gained, "lost": m.lost, "p_exact_mcnemar": m.p_value}


def tables(out) -> str:
    """Markdown tables of results.json (pasted into RESULTS.md)."""
    full_tok = out["full"]["mean_tokens"]
    lines = [f"| method (test split, n={len(out['full']['correct_rows'])}) | accuracy | 95% CI (Wilson) | "
             "vs full: gained / lost, exact McNemar p | mean output tokens | tokens vs full | exited early |",
             "|---|---|---|---|---|---|---|"]
    for label, r in method_rows(out):
        ci = "[{:.2f}, {:.2f}]".format(*r["ci95"]) if "ci95" in r else "-"
        vs = r.get("vs_full")
        vs = f"+{vs['gained']} / -{vs['lost']}, p={vs['p_exact_mcnemar']:.2f}" if vs else "-"
        ex = f"{r['exit_fraction']:.2f}" if "exit_fraction" in r else "-"
        lines.append(f"| {label} | {r['accuracy']:.3f} | {ci} | {vs} | {r['mean_tokens']:.1f} | "
                     f"{r['mean_tokens'] / full_tok:.2f} | {ex} |")
    lines += ["", "| delta | q0 | n0 / n1 (calibration) | premature exits per negative cue event (test) | "
                  "+-1 binomial SE at delta | negative test events | premature exits per trajectory |",
              "|---|---|---|---|---|---|---|"]
    for d, r in out["lynx"].items():
        lines.append(f"| {d} | {r['q0']:.4g} | {r['n0']} / {r['n1']} | {r['per_event']:.3f} | "
                     f"{r['binomial_se_at_delta']:.3f} | {r['n_negative_events']} | {r['per_trajectory']:.3f} |")
    if out.get("online"):
        lines += ["", "| online run (test split) | n | accuracy | mean output tokens | mean forward tokens | seconds |",
                  "|---|---|---|---|---|---|"]
        for k, v in out["online"].items():
            lines.append(f"| {k} | {v['n']} | {v['accuracy']:.3f} | {v['mean_tokens']:.1f} | "
                         f"{v['mean_forward_tokens']:.1f} | {v['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def _deer_compute(test) -> float:
    """DEER's real cost: every trial it ran (at each cue until it exits) plus the kept tokens."""
    tot = 0
    for r in test:
        spent = 0
        ex = None
        for e in r["events"]:
            spent += e["trial_forward"]
            if e["confidence"] > DEER_THRESHOLD:
                ex = e
                break
        tot += spent + (ex["cut"] if ex else r["n_tokens"])
    return tot / len(test)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage", choices=["label", "relabel", "online", "analyse", "resplit", "rescore", "all"],
                    default="all")
    ap.add_argument("--only", choices=["lynx", "deer", "budget"], help="online stage: run only these runs")
    ap.add_argument("--model", default="smollm2",
                    help="smollm2, moe (the embedded SmolLM2 MoE, steer.moebuild.ensure_moe), or a checkpoint dir")
    ap.add_argument("--out", help="output dir (default experiments/lynx/out)")
    ap.add_argument("--n", help="problems per split as train,calibration,test (default 100,80,60)")
    ap.add_argument("--budget", type=int, help="reasoning budget in new tokens (default 64)")
    ap.add_argument("--deer-n", type=int, help="test problems in DEER's online run (default 20)")
    ap.add_argument("--splits", default="train,calibration,test",
                    help="label stage: which splits (separate processes can label splits in parallel)")
    args = ap.parse_args(argv)
    _configure(args)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    if args.stage == "relabel":
        stage_relabel()
        return 0
    if args.stage == "resplit":
        stage_resplit()
        return 0
    if args.stage == "rescore":
        stage_analyse(json.loads((OUT / "run.json").read_text())["exit_len"])
        stage_resplit()
        return 0
    if args.model == "moe":
        from steer.moebuild import ensure_moe

        model, tok, name = load_model(str(ensure_moe()))
    else:
        model, tok, name = load_model(args.model)
    print(f"model {name}: {type(model).__name__}, splits {N}, budget {CONFIG.max_new_tokens}, out {OUT}", flush=True)
    _record_run(name, tok, default_points(model), **{f"command_{args.stage}": " ".join(sys.argv),
                                                    f"started_{args.stage}": _now()})
    if args.stage in ("label", "all"):
        stage_label(model, tok, name, tuple(args.splits.split(",")))
    if args.stage in ("online", "all"):
        stage_online(model, tok, name, args.only)
    if args.stage in ("analyse", "all"):
        stage_analyse(len(tok(CONFIG.exit_string, add_special_tokens=False)["input_ids"]))
    return 0


def _configure(args):
    """Apply --out / --n / --budget / --deer-n; a directory with a run.json keeps its own settings
    unless they are given again (so later stages and --rescore see the labelling run's budget)."""
    global OUT, CONFIG, BUDGETS, DEER_N
    if args.out:
        OUT = Path(args.out)
    run = json.loads((OUT / "run.json").read_text()) if (OUT / "run.json").exists() else {}
    if args.n:
        N.update(zip(("train", "calibration", "test"), (int(x) for x in args.n.split(","))))
    elif "n" in run:
        N.update(run["n"])
    budget = args.budget or run.get("budget", CONFIG.max_new_tokens)
    if run.get("budget") not in (None, budget):
        raise SystemExit(f"{OUT} was labelled with budget {run['budget']}, not {budget}: use another --out")
    CONFIG = ExitConfig(**{**CONFIG.__dict__, "max_new_tokens": budget})
    BUDGETS = (budget // 4, budget // 2)
    DEER_N = args.deer_n or run.get("deer_n", DEER_N)


if __name__ == "__main__":
    sys.exit(main())
