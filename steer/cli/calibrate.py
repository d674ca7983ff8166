"""`steer calibrate`: choose ACT heads on the calibration split and write an ACT config."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from steer.cli import print_json

EXAMPLES = """\
examples:
  steer calibrate --out act.json                          SmolLM2, 20 items per task, every head screened
  steer calibrate --screen exact --screen-items 8 --shortlist 16 --out act.json   each head alone in screening
  steer calibrate --tasks kv_retrieval,fewshot --n 40 --beta 0.4 --out act.json
  steer calibrate --heads 3:1,7:4 --out act.json          search only these (layer:head) candidates
  steer calibrate --alpha 2 --min-gain 2 --no-combine --json --out act.json

The config is JSON (steer.act.ACTConfig.load): the chosen heads, beta/tau/alpha/min_queries, and the
whole search (the screening score of every head, baseline, every shortlisted head's gain, the
combinations tried). Apply it with
  ACTConfig.load("act.json").intervention().apply(model)
Evaluate on the held-out split (never used here): experiments/act/run_act.py.
"""


def _heads(text: str) -> list[tuple[int, int]]:
    out = []
    for part in text.split(","):
        try:
            layer, head = part.split(":")
            out.append((int(layer), int(head)))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"--heads wants LAYER:HEAD pairs separated by commas, e.g. 3:1,7:4 (got {part!r})") from None
    return out


def add_parser(sub) -> None:
    p = sub.add_parser(
        "calibrate", help="ACT head search on the calibration split; writes an ACT config",
        description="One-head-at-a-time ACT calibration: every head with a hidden sink is screened (--screen), "
                    "the best --shortlist go on: baseline accuracy, each head "
                    "alone (keep it if it gains >= --min-gain items), then a greedy combination of the kept heads.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="smollm2", help="packaged model name, checkpoint dir or .gguf")
    p.add_argument("--tasks", default="cloze,kv_retrieval,fewshot", help="comma-separated tasks")
    p.add_argument("--n", type=int, default=20, help="calibration items per task (default 20)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--beta", type=float, default=0.4, help="scale of non-initial sinks, in (0, 1]")
    rule = p.add_mutually_exclusive_group()
    rule.add_argument("--tau", type=float, default=0.1)
    rule.add_argument("--alpha", type=float)
    p.add_argument("--min-queries", type=int, default=8)
    p.add_argument("--heads", type=_heads, help="candidate heads LAYER:HEAD,... (default: heads with hidden sinks)")
    p.add_argument("--max-candidates", type=int, help="search at most this many candidates (default: all)")
    p.add_argument("--screen", choices=("attribution", "exact"), default="attribution",
                   help="screening: first-order estimate of every head at once (default), or each head alone")
    p.add_argument("--screen-items", type=int, default=8, help="items per task in an exact screening pass (default 8)")
    p.add_argument("--shortlist", type=int, default=16,
                   help="heads sent from screening to the keep rule (0 = no screening, keep rule on every head)")
    p.add_argument("--min-gain", type=int, default=1, help="items a head must add alone to be kept")
    p.add_argument("--no-combine", action="store_true", help="keep every head that passes, no greedy check")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", type=Path, required=True, help="where to write the ACT config (JSON)")
    p.add_argument("--json", action="store_true", help="machine-readable summary")
    p.set_defaults(func=run)


def run(args) -> int:
    from steer.act_search import calibrate_heads
    from steer.models import load
    from steer.tasks import load_task

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    splits = [load_task(t, "calibration", n=args.n, seed=args.seed) for t in tasks]
    lm = load(args.model, progress=not args.json)
    say = None if args.json else (lambda msg: print(msg, file=sys.stderr, flush=True))
    cfg = calibrate_heads(
        lm.model, lm.tokenizer, splits, candidates=args.heads, max_candidates=args.max_candidates,
        beta=args.beta, tau=None if args.alpha is not None else args.tau, alpha=args.alpha,
        min_queries=args.min_queries, min_gain=args.min_gain, combine=not args.no_combine,
        shortlist=args.shortlist or None, screen=args.screen, screen_items=args.screen_items,
        batch_size=args.batch_size, progress=say,
    )
    cfg.save(args.out)
    s = cfg.search
    summary = {"heads": cfg.heads, "baseline_correct": s["baseline_correct"], "final_correct": s["final_correct"],
               "n_items": s["n_items"], "screened": len(s["screening"]), "candidates": len(s["candidates"]),
               "config": str(args.out)}
    if args.json:
        print_json(summary)
        return 0
    n = s["n_items"]
    print(f"calibration: {n} items ({', '.join(tasks)}), baseline {s['baseline_correct']}/{n}")
    if s["screening"]:
        print(f"screened {len(s['screening'])} heads ({s['screen']}); shortlist {s['shortlist']}")
    print(cfg.to_dataframe().to_string(index=False))
    if cfg.heads:
        print(f"chosen heads {cfg.heads}: {s['final_correct']}/{n} on the calibration items")
    else:
        print("no head improved calibration accuracy: the config holds no heads (ACT would not be applied)")
    print(f"wrote {args.out}")
    return 0
