"""ACT on a packaged model: sink rate, calibration head search, held-out accuracy baseline vs ACT.

    .venv/bin/python experiments/act/run_act.py --model smollm2 --cal 20 --shortlist 10 --heldout 60

Head search (steer.act_search.calibrate_heads): every head with a hidden sink is screened (attribution: a
first-order estimate for all heads from one forward + backward; exact: each head alone on --screen
items per task), the best --shortlist go to the keep rule on --cal items per task.

Writes experiments/act/out/<model>/{sinks.safetensors, sink_*.html, act_config.json, results.json}.
Everything is measured in this run; RESULTS.md quotes results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from steer.act_search import calibrate_heads
from steer.models import load
from steer.sinks import PUBLISHED_SINK_RATES, SinkResult, book_inputs, detect_sinks, sink_rate_interval
from steer.tasks import evaluate, task_suite


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--sink-inputs", type=int, default=100)
    ap.add_argument("--cal", type=int, default=30, help="calibration items per task (keep rule)")
    ap.add_argument("--procedure", choices=("paper", "shortlist"), default="shortlist",
                    help="head selection (steer.act_search.PROCEDURES); the 2026-11-26 run used shortlist; "
                         "the paper's procedure at scale is paper_sweep.py")
    ap.add_argument("--screen-method", choices=("attribution", "exact"), default="attribution",
                    help="screening: first-order estimate for all heads at once, or each head alone on --screen items")
    ap.add_argument("--screen", type=int, default=8, help="items per task in an exact screening pass")
    ap.add_argument("--shortlist", type=int, default=16, help="heads sent from screening to the keep rule")
    ap.add_argument("--candidates", type=int, default=None, help="max candidate heads (default: all with a hidden sink)")
    ap.add_argument("--heldout", type=int, default=80, help="held-out items per task")
    ap.add_argument("--beta", type=float, default=0.4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-act", action="store_true", help="sink rate only")
    ap.add_argument("--reuse-sinks", action="store_true", help="reuse out/<model>/sinks.safetensors of an earlier run")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(__file__).parent / "out" / args.model
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    lm = load(args.model, progress=False)
    model, tok = lm.model, lm.tokenizer
    info = lm.info()
    log(f"loaded {args.model}: {info.layers} layers x {info.heads} heads")
    results: dict = {
        "model": args.model, "weights_hash": lm.weights_hash, "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {platform.processor() or ''} torch {torch.__version__}, "
                   f"{args.threads} thread(s), CPU",
        "args": vars(args), "load_average_start": os.getloadavg(),
    }

    # 1. sink rate on 64-token book inputs
    t = time.time()
    if args.reuse_sinks:
        sinks = SinkResult.from_safetensors(out / "sinks.safetensors")
    else:
        inputs = book_inputs(tok, n=args.sink_inputs, length=64, seed=args.seed)
        sinks = detect_sinks(model, tok, inputs, batch_size=10)
        sinks.to_safetensors(out / "sinks.safetensors")
    for kind in ("heatmap", "map", "tokens"):
        sinks.figure(kind).write_html(out / f"sink_{kind}.html", include_plotlyjs="cdn")
    lo, hi = sink_rate_interval(sinks)
    summ = sinks.summary()
    results["sinks"] = {**summ, "sink_rate_ci": [lo, hi], "bos_added": tok("").input_ids != [],
                        "seconds": time.time() - t}
    log(f"sink rate {summ['sink_rate']:.3f} (95% CI {lo:.3f}-{hi:.3f}); published 7B: {PUBLISHED_SINK_RATES}; "
        f"{summ['hidden_sinks_per_input']:.1f} hidden sinks/input, top tokens {summ['top_hidden_sink_tokens']}")
    if args.skip_act:
        (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
        return 0

    # 2. calibration search
    t = time.time()
    cal = task_suite("calibration", n=args.cal, seed=args.seed)
    cfg = calibrate_heads(model, tok, cal, procedure=args.procedure, max_candidates=args.candidates,
                          shortlist=args.shortlist,
                          screen=args.screen_method, screen_items=args.screen, beta=args.beta,
                          progress=lambda done, total, note: log(f"{note} ({done}/{total})" if total else note))
    cfg.save(out / "act_config.json")
    results["calibration"] = {"heads": cfg.heads, "baseline_correct": cfg.search["baseline_correct"],
                              "final_correct": cfg.search["final_correct"], "n_items": cfg.search["n_items"],
                              "candidates": cfg.search["candidates"], "combinations": cfg.search["combinations"],
                              "n_candidates": cfg.search["n_candidates"], "n_heads_total": cfg.search["n_heads_total"],
                              "swept": cfg.search["swept"], "screen": cfg.search["screen"],
                              "screening": cfg.search["screening"],
                              "seconds": time.time() - t}
    log(f"chosen heads {cfg.heads}")

    # 3. held-out evaluation
    t = time.time()
    held = task_suite("heldout", n=args.heldout, seed=args.seed)
    assert not any(c.uids & h.uids for c, h in zip(cal, held))
    base = evaluate(model, tok, held)
    results["heldout_baseline"] = base.to_dataframe().to_dict("records")
    log("baseline\n" + base.to_dataframe().to_string())
    if cfg.heads:
        act = cfg.intervention(on_no_effect="warn")
        res = evaluate(model, tok, held, interventions=[act])
        results["heldout_act"] = res.to_dataframe().to_dict("records")
        results["heldout_delta"] = base.compare(res).to_dict("records")
        results["act_rows_touched"] = act.total_touched
        log("ACT\n" + res.to_dataframe().to_string())
        log("delta\n" + base.compare(res).to_string())
    else:
        results["heldout_act"] = None
        log("calibration kept no head: ACT is not applied (held-out ACT == baseline)")
    results["heldout_seconds"] = time.time() - t
    results["total_seconds"] = time.time() - t0
    results["load_average_end"] = os.getloadavg()
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    log(f"done in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
