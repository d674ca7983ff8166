"""`steer calibrate`: choose ACT heads on the calibration split and write an ACT config."""

from __future__ import annotations

import argparse
from pathlib import Path

from steer.cli import print_json
from steer.progress import bar

EXAMPLES = """\
examples:
  steer calibrate --out act.json                  SmolLM2, the paper's procedure: every head alone, keep all that gain
  steer calibrate --procedure shortlist --out act.json                  screen, best 16, greedy combination
  steer calibrate --procedure shortlist --screen exact --screen-items 8 --out act.json
  steer calibrate --tasks kv_retrieval,fewshot --n 100 --beta 0.4 --out act.json
  steer calibrate --heads 3:1,7:4 --out act.json          search only these (layer:head) candidates
  steer calibrate --alpha 2 --min-gain 2 --json --out act.json

Procedures (steer.act_search.PROCEDURES): `paper` (default) sweeps every candidate head alone on all
calibration items and applies every head that gains >= --min-gain items; `shortlist` screens every
head, sweeps the best --shortlist and combines the kept ones greedily (cheaper, not the paper's).
The config is JSON (steer.act.ACTConfig.load): the chosen heads, beta/tau/alpha/min_queries, and the
whole search (procedure, baseline, every swept head's gain, screening scores and combinations). Apply it with
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
                f"--heads wants LAYER:HEAD pairs separated by commas, e.g. 3:1,7:4 (got {part!r})"
            ) from None
    return out


def add_parser(sub) -> None:
    p = sub.add_parser(
        "calibrate",
        help="ACT head search on the calibration split; writes an ACT config",
        description="One-head-at-a-time ACT calibration. --procedure paper (default): every head with a hidden "
        "sink alone on every calibration item; every head that gains >= --min-gain items is applied. "
        "--procedure shortlist: screen every head (--screen), the best --shortlist alone, then a greedy "
        "combination of the kept heads.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="smollm2", help="packaged model name, checkpoint dir or .gguf")
    p.add_argument("--tasks", default="cloze,kv_retrieval,fewshot", help="comma-separated tasks")
    p.add_argument(
        "--n",
        type=int,
        default=70,
        help="calibration items per task (default 70: 210 items in all, one item < 0.5%%)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--beta", type=float, default=0.4, help="scale of non-initial sinks, in (0, 1]")
    rule = p.add_mutually_exclusive_group()
    rule.add_argument("--tau", type=float, default=0.1)
    rule.add_argument("--alpha", type=float)
    p.add_argument("--min-queries", type=int, default=8)
    p.add_argument(
        "--heads", type=_heads, help="candidate heads LAYER:HEAD,... (default: heads with hidden sinks)"
    )
    p.add_argument("--max-candidates", type=int, help="search at most this many candidates (default: all)")
    _add_procedure_options(p)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", type=Path, required=True, help="where to write the ACT config (JSON)")
    p.add_argument("--json", action="store_true", help="machine-readable summary")
    p.set_defaults(func=run)


def _add_procedure_options(p: argparse.ArgumentParser) -> None:
    """How heads are selected: the procedure and the shortlist procedure's screen."""
    from steer.act_search import MIN_GAIN, PROCEDURE, PROCEDURES, SCREEN_ITEMS, SCREENS, SHORTLIST

    p.add_argument(
        "--procedure",
        choices=tuple(PROCEDURES),
        default=PROCEDURE,
        help="head selection: paper (every head alone, keep all that gain; default) or shortlist",
    )
    p.add_argument(
        "--screen",
        choices=SCREENS,
        default="attribution",
        help="shortlist procedure's screen: first-order estimate of every head at once (default), "
        "or each head alone on --screen-items items per task",
    )
    p.add_argument(
        "--screen-items",
        type=int,
        default=SCREEN_ITEMS,
        help=f"items per task in an exact screening pass (default {SCREEN_ITEMS})",
    )
    p.add_argument(
        "--shortlist",
        type=int,
        default=SHORTLIST,
        help=f"shortlist procedure: heads sent from screening to the exact sweep (default {SHORTLIST})",
    )
    p.add_argument("--min-gain", type=int, default=MIN_GAIN, help="items a head must add alone to be kept")


def run(args) -> int:
    from steer.act_search import calibrate_heads
    from steer.models import load
    from steer.tasks import load_task

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    splits = [load_task(t, "calibration", n=args.n, seed=args.seed) for t in tasks]
    lm = load(args.model, progress=bar("steer: loading", enabled=not args.json))
    cfg = calibrate_heads(
        lm.model,
        lm.tokenizer,
        splits,
        candidates=args.heads,
        max_candidates=args.max_candidates,
        beta=args.beta,
        tau=None if args.alpha is not None else args.tau,
        alpha=args.alpha,
        min_queries=args.min_queries,
        min_gain=args.min_gain,
        procedure=args.procedure,
        shortlist=args.shortlist,
        screen=args.screen,
        screen_items=args.screen_items,
        batch_size=args.batch_size,
        progress=bar("steer calibrate", "step", enabled=not args.json),
    )
    cfg.save(args.out)
    s = cfg.search
    summary = {
        "procedure": s["procedure"],
        "heads": cfg.heads,
        "baseline_correct": s["baseline_correct"],
        "final_correct": s["final_correct"],
        "n_items": s["n_items"],
        "screened": len(s["screening"]),
        "candidates": len(s["candidates"]),
        "config": str(args.out),
    }
    if args.json:
        print_json(summary)
        return 0
    n = s["n_items"]
    print(
        f"calibration: {n} items ({', '.join(tasks)}), baseline {s['baseline_correct']}/{n}; "
        f"procedure {s['procedure']}: {s['rule']}"
    )
    if s["screening"]:
        print(f"screened {len(s['screening'])} heads ({s['screen']}); shortlist {s['swept']}")
    print(cfg.to_dataframe().to_string(index=False))
    if cfg.heads:
        print(f"chosen heads {cfg.heads}: {s['final_correct']}/{n} on the calibration items together")
    else:
        print("no head improved calibration accuracy: the config holds no heads (ACT would not be applied)")
    print(f"wrote {args.out}")
    return 0
