"""`steer sinks`: per-head attention-sink statistics of a model, with figures."""

from __future__ import annotations

import argparse
from pathlib import Path

from steer.cli import CLIError, print_json
from steer.progress import bar

EXAMPLES = """\
examples:
  steer sinks                                  SmolLM2, 100 book inputs of 64 tokens: sink rate + hidden sinks
  steer sinks --model gemma3-270m --n 50 --out sinks_gemma
  steer sinks --text "The cat sat on the mat." --text "Another input" --tau 0.05
  steer sinks --file prompts.txt --alpha 2 --min-queries 4 --json
  steer sinks --length 2048 --n 2 --no-maps    long inputs: streaming statistics, no N x N maps kept

Writes OUT/sinks.safetensors (SinkResult.from_safetensors) and OUT/sink_heatmap.html,
OUT/sink_map.html (one head's attention map, sinks marked), OUT/sink_tokens.html (token strip).
"""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "sinks", help="attention-sink scores per head: sink rate, hidden sinks, figures",
        description="Compute the sink score s_k (mean attention key k receives from the queries that see "
                    "it) for every layer, head and key, streaming (no N x N maps kept), and report the "
                    "sink rate (fraction of heads with s_1 > eps) and the hidden (non-initial) sinks.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="smollm2", help="packaged model name, checkpoint dir or .gguf (default smollm2)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--text", action="append", help="an input text (repeatable)")
    src.add_argument("--file", type=Path, help="one input text per line")
    p.add_argument("--n", type=int, default=100, help="book inputs when no --text/--file (default 100)")
    p.add_argument("--length", type=int, default=64, help="tokens per book input (default 64, the sink-rate protocol)")
    p.add_argument("--seed", type=int, default=0)
    rule = p.add_mutually_exclusive_group()
    rule.add_argument("--tau", type=float, default=0.1, help="sink if s_k > tau (default 0.1, ACT code)")
    rule.add_argument("--alpha", type=float, help="sink if s_k > alpha / N instead (ACT paper)")
    p.add_argument("--eps", type=float, default=0.3, help="sink-rate threshold on s_1 (default 0.3)")
    p.add_argument("--min-queries", type=int, default=8, help="observers a key needs to count as a sink")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--no-maps", action="store_true", help="do not keep the first input's per-head maps")
    p.add_argument("--out", type=Path, default=Path("sinks_out"), help="output folder (default ./sinks_out)")
    p.add_argument("--json", action="store_true", help="machine-readable summary")
    p.set_defaults(func=run)


def run(args) -> int:
    from steer.models import load
    from steer.sinks import PUBLISHED_SINK_RATES, book_inputs, detect_sinks, sink_rate_interval

    if args.n < 1 or args.length < 2:
        raise CLIError(f"--n must be >= 1 and --length >= 2 (got {args.n}, {args.length})")
    if args.text:
        inputs = args.text
    elif args.file:
        if not args.file.exists():
            raise CLIError(f"--file {args.file} does not exist")
        inputs = [line for line in args.file.read_text().splitlines() if line.strip()]
        if not inputs:
            raise CLIError(f"--file {args.file} has no non-empty lines")
    else:
        inputs = None
    lm = load(args.model, progress=bar("steer: loading", enabled=not args.json))
    if inputs is None:
        inputs = book_inputs(lm.tokenizer, n=args.n, length=args.length, seed=args.seed)
    tau = None if args.alpha is not None else args.tau
    res = detect_sinks(lm.model, lm.tokenizer, inputs, tau=tau, alpha=args.alpha, eps=args.eps,
                       min_queries=args.min_queries, batch_size=args.batch_size,
                       keep_maps=False if args.no_maps else None)
    args.out.mkdir(parents=True, exist_ok=True)
    res.to_safetensors(args.out / "sinks.safetensors")
    files = [str(args.out / "sinks.safetensors")]
    kinds = ("heatmap", "tokens") if not res.maps else ("heatmap", "map", "tokens")
    for kind in kinds:
        path = args.out / f"sink_{kind}.html"
        res.figure(kind).write_html(path, include_plotlyjs="cdn")
        files.append(str(path))
    summary = {**res.summary(), "sink_rate_ci95": sink_rate_interval(res), "files": files}
    if args.json:
        print_json(summary)
        return 0
    lo, hi = summary["sink_rate_ci95"]
    print(f"model {summary['model']}: {res.n_inputs} inputs, mean {summary['mean_length']:.0f} tokens, "
          f"{res.n_layers} layers x {res.n_heads} heads ({res.path} statistics)")
    print(f"sink rate (s_1 > {res.eps}): {summary['sink_rate']:.1%}  (95% CI {lo:.1%}-{hi:.1%}); published 7B: "
          + ", ".join(f"{k} {v:.1%}" for k, v in PUBLISHED_SINK_RATES.items()))
    print(f"hidden sinks ({summary['rule']}, >= {res.min_queries} observers): "
          f"{summary['hidden_sinks_per_input']:.1f} per input in {summary['heads_with_hidden_sinks']} heads")
    if summary["top_hidden_sink_tokens"]:
        print("commonest hidden-sink tokens: "
              + ", ".join(f"{t!r} x{c}" for t, c in summary["top_hidden_sink_tokens"].items()))
    top = res.heads_with_hidden_sinks()[:5]
    if top:
        print("heads most often with a hidden sink: "
              + ", ".join(f"L{layer}H{h} ({f:.0%})" for layer, h, f in top))
    print("wrote " + ", ".join(files))
    return 0
