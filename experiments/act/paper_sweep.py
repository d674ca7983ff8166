"""ACT head selection, the paper's procedure vs the screen + shortlist + greedy alternative, with raw outputs.

    nice -n 10 .venv/bin/python experiments/act/paper_sweep.py sweep --model smollm2 --cal 70 --until 20:45
    nice -n 10 .venv/bin/python experiments/act/paper_sweep.py heldout --model smollm2 --heldout 80
    .venv/bin/python experiments/act/paper_sweep.py rescore --model smollm2      # tables from the raw files

Phase `sweep` (calibration split only):
1. attribution screen of every head (steer.act_search.attribution_screen) on the calibration items --
   the alternative procedure's ranking; its best SHORTLIST heads with a positive score are swept first;
2. the exact one-head sweep (steer.act_search.sweep_heads, ACT on one head alone, every calibration
   item), head by head in chunks, the shortlist first and then every other head in a seeded random
   order, until the time box (--until, UTC) -- the paper's procedure sweeps every head; what was swept
   is recorded, so a partial sweep is reported as such.
Phase `heldout`: both procedures choose heads from the raw sweep (steer.act_search.select_paper,
select_shortlist; the greedy step evaluates combinations on the calibration items), then the held-out
split is scored without ACT and with each procedure's heads.
Phase `rescore`: recomputes every number of RESULTS.md from the raw per-item files alone.

Raw files, out/<model>/paper/: items_calibration.json, screen.json, sweep_NNN.json (per-item option
log-probabilities of the baseline and of every head of the chunk), combinations.json,
items_heldout.json, heldout.json (per-item option log-probabilities per configuration), summary.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

OUT = Path(__file__).parent / "out"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _key(hd) -> str:
    return f"{hd[0]},{hd[1]}"


def _unkey(s: str) -> tuple[int, int]:
    a, b = s.split(",")
    return int(a), int(b)


def _parse_heads(spec: str) -> tuple[str, list[tuple[int, int]]]:
    """NAME=L,H;L,H;... -> (NAME, heads): a fixed head set to score on the held-out items beside the procedures."""
    name, sep, heads = spec.partition("=")
    try:
        parsed = [_unkey(hd) for hd in heads.split(";") if hd.strip()]
    except ValueError:
        parsed = []
    if not sep or not name or not parsed or name in ("baseline", "paper", "shortlist_greedy"):
        raise SystemExit(f"--heads {spec!r}: expected NAME=LAYER,HEAD;LAYER,HEAD;... with a new NAME, e.g. "
                         "round1=26,1;11,1")
    return name, parsed


def _items_json(splits) -> list[dict]:
    return [
        {"task": it.task, "uid": it.uid, "answer": it.answer, "n_options": len(it.options)}
        for s in splits
        for it in s.items
    ]


def _deadline(hhmm: str) -> float:
    now = datetime.now(UTC)
    h, m = (int(x) for x in hhmm.split(":"))
    return now.replace(hour=h, minute=m, second=0, microsecond=0).timestamp()


def _load(args):
    """The packaged model; a Mixture-of-Experts one with args.experts as its experts implementation.

    transformers 5 runs MoE experts with `grouped_mm` by default; on this machine's CPU (one thread,
    smollm2-moe, 16 x 96 tokens) one forward took 8.05 CPU-s with it, 5.92 with `eager` (the per-expert
    loop) and 5.21 for dense SmolLM2; the two agree to 1e-6 relative. Every forward of a sweep (baseline
    and each head) uses the same implementation, and the choice is recorded with the raw files."""
    from steer.models import load

    lm = load(args.model, progress=False)
    if _is_moe(lm.model):
        lm.model.set_experts_implementation(args.experts)
        log(f"experts implementation: {args.experts}")
    return lm


def _is_moe(model) -> bool:
    return bool(getattr(model.config, "num_experts", None) or getattr(model.config, "num_local_experts", None))


def _experts_impl(model) -> str | None:
    return getattr(model.config, "_experts_implementation", None) if _is_moe(model) else None


def phase_sweep(args, out: Path) -> None:
    from steer.act_search import SHORTLIST, attribution_screen
    from steer.tasks import task_suite

    lm = _load(args)
    model, tok = lm.model, lm.tokenizer
    cal = task_suite("calibration", n=args.cal, seed=args.seed)
    items = [it for s in cal for it in s.items]
    (out / "items_calibration.json").write_text(
        json.dumps(
            {
                "model": args.model,
                "weights_hash": lm.weights_hash,
                "seed": args.seed,
                "n_per_task": args.cal,
                "experts_implementation": _experts_impl(model),
                "items": _items_json(cal),
            },
            indent=1,
        )
    )
    cfg = model.config
    heads = [(layer, h) for layer in range(cfg.num_hidden_layers) for h in range(cfg.num_attention_heads)]
    params = dict(beta=args.beta)
    if args.layers:  # an extra worker: sweep only these layers, cheapest (latest) first, no screen
        lo, hi = (int(x) for x in args.layers.split("-"))
        order = sorted((hd for hd in heads if lo <= hd[0] <= hi), key=lambda hd: (-hd[0], hd[1]))
        return _sweep_order(args, out, model, tok, items, order, params, prefix=f"sweep_layers{lo}-{hi}_p{os.getpid()}",
                            weights_hash=lm.weights_hash)  # one file series per worker
    screen_path = out / "screen.json"
    if screen_path.exists():
        est = {_unkey(k): v for k, v in json.loads(screen_path.read_text())["estimate"].items()}
        log("screen reused from screen.json")
    else:
        t = time.time()
        log(f"attribution screen of {len(heads)} heads on {len(items)} items")
        est = attribution_screen(model, tok, items, batch_size=args.batch_size, **params)
        screen_path.write_text(
            json.dumps(
                {
                    "estimate": {_key(hd): v for hd, v in est.items()},
                    "seconds": time.time() - t,
                    "load_average": os.getloadavg(),
                }
            )
        )
        log(f"screen done in {time.time() - t:.0f} s")
    ranked = sorted(est, key=lambda hd: -est[hd])
    short = [hd for hd in ranked if est[hd] > 0][:SHORTLIST]
    rest = [hd for hd in heads if hd not in short]
    random.Random(args.seed).shuffle(rest)
    _sweep_order(args, out, model, tok, items, short + rest, params, prefix="sweep", weights_hash=lm.weights_hash)


def _taken(out: Path, me: Path) -> set:
    """Heads already swept (any sweep*.json) or claimed by another live worker (claim_*.json): workers
    started on overlapping layer ranges share the work instead of repeating it."""
    taken = set()
    for f in sorted(out.glob("sweep*.json")):
        taken |= {_unkey(k) for k in json.loads(f.read_text())["per_head"]}
    for f in out.glob("claim_*.json"):
        if f == me:
            continue
        claim = json.loads(f.read_text())
        try:
            os.kill(claim["pid"], 0)  # a claim of a worker that died is void
        except OSError:
            continue
        taken |= {tuple(hd) for hd in claim["heads"]}
    return taken


def _units(chunk, n_layers: int) -> int:
    """Cost of one sweep_heads call in decoder-layer forwards: the baseline plus each head's suffix."""
    return n_layers + sum(n_layers - hd[0] for hd in chunk)


def _sweep_order(args, out: Path, model, tok, items, order, params, prefix: str, weights_hash: str) -> None:
    """Exact one-head sweeps of `order`, args.chunk heads per file, skipping heads already swept or
    claimed by another worker (re-read before every chunk); the time box is checked against the next
    chunk's cost scaled from the last chunk's seconds per layer forward."""
    from steer.act_search import sweep_heads

    n_layers = model.config.num_hidden_layers
    claim_path = out / f"claim_{prefix}_{os.getpid()}.json"
    stop = _deadline(args.until)
    rate = None
    n = len(list(out.glob(f"{prefix}_*.json")))
    while True:
        todo = [hd for hd in order if hd not in _taken(out, claim_path)]
        if not todo:
            break
        chunk = todo[: args.chunk]
        if rate is not None and time.time() + rate * _units(chunk, n_layers) > stop:
            log(f"time box: stopping with {len(todo)} heads not swept")
            break
        claim_path.write_text(json.dumps({"pid": os.getpid(), "heads": [list(hd) for hd in chunk]}))
        t = time.time()
        sw = sweep_heads(model, tok, items, chunk, batch_size=args.batch_size, **params)
        chunk_s = time.time() - t
        rate = chunk_s / _units(chunk, n_layers)
        (out / f"{prefix}_{n:03d}.json").write_text(
            json.dumps(
                {
                    "heads": [list(hd) for hd in chunk],
                    "baseline": sw.baseline,
                    "per_head": {_key(hd): sw.per_head[hd] for hd in chunk},
                    "touched": {_key(hd): sw.touched[hd] for hd in chunk},
                    "path": sw.path,
                    "experts_implementation": _experts_impl(model),
                    "weights_hash": weights_hash,
                    "seconds": chunk_s,
                    "load_average": os.getloadavg(),
                    "finished": datetime.now(UTC).isoformat(timespec="seconds"),
                }
            )
        )
        claim_path.unlink()
        n += 1
        log(f"chunk {n}: {len(chunk)} heads in {chunk_s:.0f} s; {len(todo) - len(chunk)} left")


def _load_sweep(out: Path):
    """HeadSweep of every head swept so far, on the calibration items regenerated from their seed."""
    from steer.act_search import HeadSweep
    from steer.tasks import task_suite

    meta = json.loads((out / "items_calibration.json").read_text())
    cal = task_suite("calibration", n=meta["n_per_task"], seed=meta["seed"])
    items = [it for s in cal for it in s.items]
    if [it.uid for it in items] != [r["uid"] for r in meta["items"]]:
        raise SystemExit("the calibration items regenerated from the seed differ from items_calibration.json")
    base, per_head, touched, seconds, drift = None, {}, {}, 0.0, 0.0
    answers = [it.answer for it in items]
    for f in sorted(out.glob("sweep*.json")):
        d = json.loads(f.read_text())
        if base is None:
            base = d["baseline"]
        diff = max(abs(a - b) for a, b in zip(sum(base, []), sum(d["baseline"], [])))
        if diff > 1e-4 and _correct(base, answers) != _correct(d["baseline"], answers):
            # a chunk swept on other weights (e.g. the MoE built on another CPU type) is usable only if its
            # baseline gets exactly the same items right: a head's gain is counted against that baseline
            raise SystemExit(f"{f.name}: baseline answers differ from the first chunk's (max |d logprob| {diff:.3g}):"
                             " the chunks were swept on different weights; sweep again on one build")
        drift = max(drift, diff)
        # each head against its own chunk's baseline, expressed on the first chunk's: chunks batched differently
        # (steer.tasks' row sharing, from 2026-12-07) or on other weights bits differ by float rounding only
        shift = [[b0 - b1 for b0, b1 in zip(r0, r1)] for r0, r1 in zip(base, d["baseline"])]
        per_head.update(
            {_unkey(k): [[x + s for x, s in zip(r, rs)] for r, rs in zip(v, shift)] for k, v in d["per_head"].items()}
        )
        touched.update({_unkey(k): v for k, v in d["touched"].items()})
        seconds += d["seconds"]
    if drift > 1e-4:
        log(f"chunk baselines differ by up to {drift:.3g} nats (other weights bits) with the same items right")
    return cal, HeadSweep(items, base, per_head, touched, "suffix"), seconds, drift


def _shortlist(out: Path) -> list[tuple[int, int]]:
    from steer.act_search import SHORTLIST

    est = {_unkey(k): v for k, v in json.loads((out / "screen.json").read_text())["estimate"].items()}
    return [hd for hd in sorted(est, key=lambda hd: -est[hd]) if est[hd] > 0][:SHORTLIST]


def select(out: Path, min_gain: int, score=None, greedy: bool = True) -> dict:
    """Both procedures from the raw sweep. score(heads) -> calibration items right (None: combinations
    are read from combinations.json only, as in rescore). The paper procedure's joint calibration score
    (recorded, never used to choose) is measured with `score` (one calibration pass, then kept in
    combinations.json); without `score` it is read from there if it was measured, else None.
    greedy=False: the paper procedure only (no combination needs scoring)."""
    from steer.act_search import combine_greedy, keep_alone, select_paper

    cal, sw, seconds, drift = _load_sweep(out)
    swept = sorted(sw.per_head)
    base_k, rows = keep_alone(sw, swept, min_gain)
    paper = select_paper([dict(r) for r in rows])
    screened = (out / "screen.json").exists()  # the shortlist procedure's input; a --layers-only sweep has none
    short = _shortlist(out) if screened else []
    missing = [hd for hd in short if hd not in sw.per_head]  # a time-boxed sweep may not reach them all
    short = [hd for hd in short if hd in sw.per_head]
    combos_path = out / "combinations.json"
    known = json.loads(combos_path.read_text()) if combos_path.exists() else {}

    def cached(heads):
        key = ";".join(_key(hd) for hd in heads)
        if key not in known:
            if score is None:
                raise SystemExit(f"combination {heads} was never scored: run the heldout phase")
            known[key] = score(heads)
            combos_path.write_text(json.dumps(known, indent=1))
        return known[key]

    _, short_rows = keep_alone(sw, short, min_gain)
    chosen, greedy_k, combos = (
        combine_greedy(short_rows, base_k, cached, lambda done, total, note: log(note))
        if greedy and screened
        else (None, None, None)
    )
    if len(paper) > 1:  # measured (and recorded) where a scorer is given, else read if it was recorded
        paper_k = cached(paper) if score is not None else known.get(";".join(_key(hd) for hd in paper))
    else:
        paper_k = base_k if not paper else sw.result(paper[0]).n_correct()
    return {
        "n_items": len(sw.items),
        "baseline_correct": base_k,
        "n_swept": len(swept),
        "sweep_seconds": seconds,
        "baseline_drift_nats": drift,  # max |logprob| difference between chunk baselines (same answers)
        "swept": [list(hd) for hd in swept],
        "rows": rows,
        "shortlist": [list(hd) for hd in short],
        "shortlist_not_swept": [list(hd) for hd in missing],
        "paper": {"heads": [list(hd) for hd in paper], "calibration_correct": paper_k},
        "shortlist_greedy": {
            "heads": None if chosen is None else [list(hd) for hd in chosen],
            "calibration_correct": greedy_k,
            "combinations": combos,
            "kept_alone": [(r["layer"], r["head"], r["gain"]) for r in short_rows if r["kept"]],
        },
    }


def phase_heldout(args, out: Path) -> None:
    from steer.act import ACT
    from steer.tasks import evaluate, task_suite

    lm = _load(args)
    model, tok = lm.model, lm.tokenizer
    cal_splits = task_suite(
        "calibration",
        n=json.loads((out / "items_calibration.json").read_text())["n_per_task"],
        seed=args.seed,
    )
    params = dict(beta=args.beta)

    def score(heads):
        t = time.time()
        k = evaluate(
            model,
            tok,
            cal_splits,
            batch_size=args.batch_size,
            interventions=[ACT(heads, on_no_effect="ignore", **params)],
        ).n_correct()
        log(f"calibration with {len(heads)} heads: {k} ({time.time() - t:.0f} s)")
        return k

    fixed = _parse_heads(args.heads) if args.heads else None
    sel = None if args.baseline_only or fixed else select(out, args.min_gain, score, greedy=args.config != "paper")
    if sel is not None and args.config != "paper":
        (out / "selection.json").write_text(json.dumps(sel, indent=1))
    held = task_suite("heldout", n=args.heldout, seed=args.seed)
    (out / "items_heldout.json").write_text(
        json.dumps({"n_per_task": args.heldout, "seed": args.seed, "items": _items_json(held)}, indent=1)
    )
    path = out / "heldout.json"
    res = json.loads(path.read_text()) if path.exists() else {}
    configs = {"baseline": []} if fixed is None else dict([fixed])
    if sel is not None:
        configs.update(paper=sel["paper"]["heads"], shortlist_greedy=sel["shortlist_greedy"]["heads"])
        if configs["shortlist_greedy"] is None:  # no attribution screen: the paper procedure only
            if args.config == "shortlist_greedy":
                raise SystemExit(f"{out} has no screen.json: run `sweep` once without --layers (it screens first)")
            del configs["shortlist_greedy"]
        if args.config:
            configs = {args.config: configs[args.config]}
    for name, heads in configs.items():
        key = ";".join(_key(hd) for hd in heads)
        if key in res:
            continue
        t = time.time()
        acts = [ACT([tuple(hd) for hd in heads], on_no_effect="warn", **params)] if heads else []
        r = evaluate(model, tok, held, batch_size=args.batch_size, interventions=acts)
        res = json.loads(path.read_text()) if path.exists() else {}  # another process may have added one
        res[key] = {
            "config": name,
            "heads": heads,
            "logprobs": r.logprobs,
            "uids": r.uids,
            "rows_touched": acts[0].total_touched if acts else 0,
            "seconds": time.time() - t,
        }
        path.write_text(json.dumps(res))
        log(f"held-out {name}: {r.n_correct()}/{len(r.uids)} ({time.time() - t:.0f} s)")
    if sel is not None and not args.config:
        rescore(args, out)


def _mcnemar_exact(gained: int, lost: int) -> float:
    """Two-sided exact McNemar p-value: binomial(gained + lost, 1/2) on the discordant pairs."""
    from math import comb

    n, k = gained + lost, min(gained, lost)
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(comb(n, i) for i in range(k + 1)) / 2**n)


def _correct(logprobs, answers) -> list[bool]:
    return [max(range(len(lp)), key=lp.__getitem__) == a for lp, a in zip(logprobs, answers)]


def rescore(args, out: Path) -> dict:
    """Every number of the RESULTS.md tables, from the raw files alone (no model)."""
    from steer.tasks import wilson_interval

    sel = select(out, args.min_gain)
    held_items = json.loads((out / "items_heldout.json").read_text())["items"]
    answers = [r["answer"] for r in held_items]
    tasks = [r["task"] for r in held_items]
    res = json.loads((out / "heldout.json").read_text())
    base = _correct(res[""]["logprobs"], answers)
    runs = [(name, sel[name]["heads"]) for name in ("paper", "shortlist_greedy")
            if sel[name]["heads"] is not None]  # None: the shortlist procedure without a screen, not run
    runs += [(r["config"], r["heads"]) for r in res.values()  # fixed head sets (heldout --heads)
             if r["config"] not in ("baseline", "paper", "shortlist_greedy")]
    table = []
    for name, heads in runs:
        new = _correct(res[";".join(_key(hd) for hd in heads)]["logprobs"], answers) if heads else base
        for task in [*dict.fromkeys(tasks), "all"]:
            idx = [i for i, t in enumerate(tasks) if task in ("all", t)]
            kb, kn = sum(base[i] for i in idx), sum(new[i] for i in idx)
            g = sum(new[i] and not base[i] for i in idx)
            lo = sum(base[i] and not new[i] for i in idx)
            table.append(
                {
                    "procedure": name,
                    "task": task,
                    "n": len(idx),
                    "baseline": kb,
                    "baseline_ci": wilson_interval(kb, len(idx)),
                    "act": kn,
                    "act_ci": wilson_interval(kn, len(idx)),
                    "delta_pts": 100 * (kn - kb) / len(idx),
                    "gained": g,
                    "lost": lo,
                    "mcnemar_p": _mcnemar_exact(g, lo),
                    "n_heads": len(heads),
                }
            )
    summary = {
        "selection": {k: v for k, v in sel.items() if k != "rows"},
        "calibration_logp_change": _logp_changes(out),
        "heldout": table,
        "kept_alone": [(r["layer"], r["head"], r["gain"]) for r in sel["rows"] if r["kept"]],
        "gain_histogram": {
            str(g): sum(r["gain"] == g for r in sel["rows"]) for g in sorted({r["gain"] for r in sel["rows"]})
        },
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(
        "| procedure | task | n | baseline (95% Wilson) | ACT (95% Wilson) | delta | gained / lost | exact McNemar p |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in table:
        print(
            f"| {r['procedure']} ({r['n_heads']} heads) | {r['task']} | {r['n']} | {_pct(r['baseline'], r['n'], r['baseline_ci'])} "
            f"| {_pct(r['act'], r['n'], r['act_ci'])} | {r['delta_pts']:+.1f} pts | {r['gained']} / {r['lost']} "
            f"| {r['mcnemar_p']:.3g} |"
        )
    return summary


def _logp_changes(out: Path) -> dict:
    """Each swept head's change of the calibration items' mean log P(right option) (nats, HeadSweep.delta_logp):
    the continuous effect behind the paper's item counts, to tell "ACT moves nothing" from "moves it, flips
    no answer"."""
    import torch

    _, sw, _, _ = _load_sweep(out)
    base = sum(float(torch.log_softmax(torch.tensor(sc), 0)[it.answer]) for sc, it in zip(sw.baseline, sw.items))
    d = sorted((sw.delta_logp(hd), _key(hd)) for hd in sw.per_head)
    return {
        "baseline_mean_logp": base / len(sw.items),
        "n_heads": len(d),
        "min": d[0],
        "median": d[len(d) // 2][0],
        "max": d[-1],
        "n_above_0.01": sum(x > 0.01 for x, _ in d),
        "n_below_-0.01": sum(x < -0.01 for x, _ in d),
    }


def _pct(k: int, n: int, ci) -> str:
    return f"{k} = {100 * k / n:.1f}% ({100 * ci[0]:.0f}-{100 * ci[1]:.0f}%)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("phase", choices=("sweep", "heldout", "rescore"))
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--cal", type=int, default=70, help="calibration items per task")
    ap.add_argument("--heldout", type=int, default=80, help="held-out items per task")
    ap.add_argument("--beta", type=float, default=0.4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--chunk", type=int, default=8, help="heads per sweep_heads call (one baseline forward each)"
    )
    ap.add_argument("--layers", help="sweep phase, extra workers: only heads of layers LO-HI, latest first, no screen; workers on overlapping ranges share heads through claim files")
    ap.add_argument("--until", default="20:45", help="UTC time box of the sweep phase (HH:MM)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument(
        "--baseline-only",
        action="store_true",
        help="heldout phase: score only the held-out baseline (it needs no selection; run it early)",
    )
    ap.add_argument(
        "--config",
        choices=("paper", "shortlist_greedy"),
        help="heldout phase: evaluate only this procedure's heads (two processes can run at once)",
    )
    ap.add_argument(
        "--heads",
        help="heldout phase: score this fixed head set instead, NAME=L,H;L,H (e.g. an earlier run's choice); "
        "rescore reports it beside the procedures",
    )
    ap.add_argument("--min-gain", type=int, default=1, help="items a head must gain alone to be kept")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--experts",
        default="eager",
        choices=("eager", "grouped_mm", "batched_mm"),
        help="MoE models: transformers' experts implementation for every forward (eager is fastest on CPU)",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = OUT / args.model / "paper"
    out.mkdir(parents=True, exist_ok=True)
    if args.phase == "sweep":
        phase_sweep(args, out)
    elif args.phase == "heldout":
        phase_heldout(args, out)
    else:
        rescore(args, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
