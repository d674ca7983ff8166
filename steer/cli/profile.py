"""`steer profile`: fTRI expert profiling of an MoE (steer.ftri)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from steer.cli import CLIError, print_json

DEFAULT_MODEL = "smollm2-moe"
# French vs English everyday questions (steer/data/prompts): a behaviour SmolLM2 shows reliably
# (it mostly answers French questions in French) that a transparent labeller can measure.
DEFAULT_CLASSES = ("french=builtin:questions-fr", "english=builtin:questions-en")

EXAMPLES = """\
examples:
  steer profile                                    French vs English questions on the SmolLM2 MoE
  steer profile --model ./my_moe_checkpoint --class harmful=builtin:advbench --class benign=builtin:benign
  steer profile --class refusal=refusal.txt --class base=base.jsonl --score risk_diff --tokens response
  steer profile --prompts builtin:advbench --labeller refusal --target REFUSED --limit 100
  steer profile --out runs/fr --top 20 --json

Class SOURCE is a .txt (one prompt per line), .jsonl, .yaml (list, {prompts: [...]}, PyRIT seeds, or
{template: "What happened {time} {place}?", slots: {...}}) or builtin:NAME (questions-en,
questions-fr, advbench, benign, prose). The first class is the target unless --target says.
Writes DIR/profile.safetensors, DIR/profile.json, DIR/heatmap.html, DIR/top.html.
"""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "profile", help="fTRI: find the experts a behaviour uses (per-class routing maps, scores, CIs)",
        description="Run prompt classes through an MoE, count per (layer, expert) the tokens routed there, "
                    "score experts (mote / risk_diff / npmi) with bootstrap CIs, save the profile and heatmaps.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="packaged name, checkpoint dir or .gguf (default %(default)s, built on first use)")
    p.add_argument("--class", dest="classes", action="append", metavar="NAME=SOURCE",
                   help=f"a prompt class (repeat; default {' '.join(DEFAULT_CLASSES)})")
    p.add_argument("--prompts", metavar="SOURCE", help="one pooled prompt set whose classes come from --labeller")
    p.add_argument("--labeller", help="label the model's answers (refusal, french, numbered, code) into classes")
    p.add_argument("--tokens", choices=("prompt", "response", "both"), default="prompt",
                   help="which tokens count (default %(default)s: MoTE; response = SteerMoE, teacher-forced)")
    p.add_argument("--score", choices=("mote", "risk_diff", "npmi"), default="mote", help="default %(default)s")
    p.add_argument("--target", help="the behaviour class (default: the first class)")
    p.add_argument("--no-normalize", action="store_true", help="mote: raw counts, not per-prompt fractions")
    p.add_argument("--bootstrap", type=int, default=200, help="Poisson bootstrap replicates (default %(default)s)")
    p.add_argument("--limit", type=int, help="at most this many prompts per class (seeded sample)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=48, help="answer length for --labeller / response tokens")
    p.add_argument("--no-chat-template", action="store_true", help="feed prompts raw")
    p.add_argument("--top", type=int, default=10, help="rows of the printed ranking (default %(default)s)")
    p.add_argument("--out", type=Path, help="output dir (default runs/profile-<timestamp>)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--json", action="store_true", help="machine-readable summary on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def _classes(args):
    from steer.prompts import parse_class_spec

    if args.prompts:
        if args.classes:
            raise CLIError("give either --class (prompt classes) or --prompts with --labeller, not both")
        if not args.labeller:
            raise CLIError("--prompts needs --labeller to split the answers into classes")
        sets = [parse_class_spec(args.prompts)]
    else:
        if args.labeller:
            raise CLIError("--labeller needs --prompts SOURCE (the pooled prompts to answer and label)")
        specs = args.classes or list(DEFAULT_CLASSES)
        if len(specs) < 2:
            raise CLIError("give at least two --class NAME=SOURCE (a behaviour and a baseline)")
        sets = [parse_class_spec(s) for s in specs]
    if args.limit:
        sets = [s.sample(args.limit, seed=0) for s in sets]
    return sets


def run(args) -> int:
    import torch

    from steer.ftri import ProfileConfig, profile
    from steer.models import load

    if args.threads:
        torch.set_num_threads(args.threads)
    config = ProfileConfig(tokens=args.tokens, score=args.score, target=args.target,
                           normalize=not args.no_normalize, n_bootstrap=args.bootstrap, batch_size=args.batch_size,
                           max_new_tokens=args.max_new_tokens, chat_template=False if args.no_chat_template else None)
    config.validate()
    sets = _classes(args)
    lm = load(args.model, progress=not args.quiet)
    if args.labeller:
        classes = sets[0]
    else:
        classes = sets
    prof = profile(lm.model, lm.tokenizer, classes, config, labeller=args.labeller, progress=not args.quiet,
                   weights_hash=lm.weights_hash)
    prof.stats["model_name"] = args.model  # lets `steer switch --profile DIR` reload the same model
    out = args.out or Path("runs") / f"profile-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    st, js = prof.save(out)
    prof.figure().write_html(out / "heatmap.html", include_plotlyjs="cdn")
    prof.bar_figure(min(args.top, prof.scores.numel())).write_html(out / "top.html", include_plotlyjs="cdn")
    top = prof.top(args.top)
    summary = {"out": str(out), "files": [str(st), str(js), str(out / "heatmap.html"), str(out / "top.html")],
               "model": lm.name, "classes": prof.classes, "target": prof.target, "score": config.score,
               "tokens": config.tokens, "stats": prof.stats,
               "top": [t.__dict__ for t in top]}
    if args.json:
        print_json(summary)
        return 0
    print(f"{lm.name}: {prof.stats['prompts']} prompts ({prof.stats['prompts_per_class']}), "
          f"{prof.stats['tokens']} tokens, {prof.stats['seconds']} s; target {prof.target!r}, score {config.score}")
    ci = f" {round(config.ci * 100)}% CI" if prof.ci_low is not None else ""
    print(f"{'rank':>4} {'layer':>5} {'expert':>6} {'score':>9}{ci}")
    for t in top:
        tail = f"  [{t.ci_low:+.4f}, {t.ci_high:+.4f}]" if t.ci_low is not None else ""
        print(f"{t.rank:>4} {t.layer:>5} {t.expert:>6} {t.score:+9.4f}{tail}")
    print(f"wrote {out}/ (profile.safetensors, profile.json, heatmap.html, top.html)", file=sys.stderr)
    return 0
