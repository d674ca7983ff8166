"""`steer probe`: LYNX confidence probes and online early exit (steer.probes.lynx)."""

from __future__ import annotations

import argparse
import sys

from steer.cli import CLIError, print_json
from steer.options import CHECKERS, PROBE_SPLITS
from steer.progress import bar

EXAMPLES = """\
examples:
  steer probe label --model smollm2 --split train --n 100 --cues newline,blank_line \\
        --exit-string $'\\n\\nThe answer is ' --max-new-tokens 64 -o cues_train.safetensors
      generate for seeded arithmetic problems with a forced exit at every cue; save features + labels
  steer probe train cues_train.safetensors -o probe/
      fit the (256, 64) MLP probe; writes probe/probe.safetensors + probe/probe.json
  steer probe calibrate probe/ cues_cal.safetensors --delta 0.1
      class-conditional conformal thresholds (stored in probe/probe.json); +inf if too few events
  steer probe generate --model smollm2 --probe probe/ --question "Tom has 3 apples and gets 4 more. How many?"
      generate with online early exit (the probe's cues, exit string and calibration)

Exit codes: 0 ok, 2 bad input (wrong model for the probe, delta outside (0, 1), empty calibration set).
"""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "probe", help="LYNX confidence probes: label cue events, train, calibrate, generate with early exit",
        description="LYNX: learn when a model's reasoning can stop. A probe reads hidden states at cue tokens; "
                    "split conformal calibration bounds the premature-exit rate per cue event by delta.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ps = p.add_subparsers(dest="probe_command", metavar="ACTION")

    lab = ps.add_parser("label", help="label cue events on seeded arithmetic problems (forced exits)")
    lab.add_argument("--model", default="smollm2", help="packaged name, checkpoint dir, GGUF, or tiny:<family>")
    lab.add_argument("--split", default="train", choices=PROBE_SPLITS)
    lab.add_argument("--n", type=int, default=100, help="number of problems")
    lab.add_argument("--seed", type=int, default=0)
    lab.add_argument("--cues", default="hmm,wait,alternatively",
                     help="comma list of cue words, structural cues (blank_line, newline, sentence_end) and re:REGEX")
    lab.add_argument("--points", help="comma list of feature points (default ~30/50/75%% depth + final_norm.out)")
    lab.add_argument("--exit-string", default="\n\nThe answer is ")
    lab.add_argument("--max-new-tokens", type=int, default=64)
    lab.add_argument("--answer-max-tokens", type=int, default=8)
    lab.add_argument("--no-rollback", action="store_true",
                     help="label the exit vLLM serves (exit string after the cue, nothing rolled back): a probe "
                          "calibrated on these labels bounds premature exits of the served answers")
    lab.add_argument("--checker", default="numeric", choices=CHECKERS)
    lab.add_argument("--batch-size", type=int, default=8)
    lab.add_argument("-o", "--out", required=True, help="output .safetensors")
    lab.add_argument("--json", action="store_true")
    lab.set_defaults(func=run_label)

    tr = ps.add_parser("train", help="train a probe on labelled cue events")
    tr.add_argument("cues_file", help=".safetensors from `steer probe label`")
    tr.add_argument("-o", "--out", required=True, help="probe directory")
    tr.add_argument("--hidden", default="256,64")
    tr.add_argument("--max-epochs", type=int, default=200)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--json", action="store_true")
    tr.set_defaults(func=run_train)

    ca = ps.add_parser("calibrate", help="conformal calibration of a probe on held-out cue events")
    ca.add_argument("probe_dir")
    ca.add_argument("cues_file", help="calibration cue events (disjoint from training)")
    ca.add_argument("--delta", type=float, default=0.1, help="tolerated premature-exit rate per cue event, in (0, 1)")
    ca.add_argument("--json", action="store_true")
    ca.set_defaults(func=run_calibrate)

    ge = ps.add_parser("generate", help="generate with online early exit")
    ge.add_argument("--model", default="smollm2")
    ge.add_argument("--probe", required=True, help="calibrated probe directory")
    src = ge.add_mutually_exclusive_group(required=True)
    src.add_argument("--question", action="append", help="a question (chat template applied); repeatable")
    src.add_argument("--prompt", action="append", help="a raw prompt (no template); repeatable")
    ge.add_argument("--max-new-tokens", type=int, default=128)
    ge.add_argument("--answer-max-tokens", type=int, default=8)
    ge.add_argument("--figure", metavar="HTML", help="write each row's confidence figure (GenerationResult.figure) "
                                                     "to this .html file (one file, rows stacked)")
    ge.add_argument("--json", action="store_true")
    ge.set_defaults(func=run_generate)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def run_label(args) -> int:
    from steer.probes.cues import CueSet
    from steer.probes.data import arithmetic_problems, load_model
    from steer.probes.features import default_points
    from steer.probes.generate import ExitConfig
    from steer.probes.lynx import label

    model, tok, name = load_model(args.model)
    points = args.points.split(",") if args.points else default_points(model)
    cfg = ExitConfig(exit_string=args.exit_string, max_new_tokens=args.max_new_tokens,
                     answer_max_tokens=args.answer_max_tokens, answer_stop=(".", "\n"), rollback=not args.no_rollback)
    probs = arithmetic_problems(args.n, seed=args.seed, split=args.split)
    lab, res = label(model, tok, probs, points, CueSet.parse(args.cues), cfg, args.checker,
                     batch_size=args.batch_size, model_name=name,
                     progress=bar("steer probe label", "problem", enabled=not args.json))
    lab.meta["split"] = args.split
    lab.to_safetensors(args.out)
    summary = {"out": args.out, "problems": len(probs), "cue_events": len(lab), "positive": int(lab.labels.sum()),
               "points": points}
    if args.json:
        print_json(summary)
    else:
        print(f"wrote {args.out}: {len(lab)} cue events from {len(probs)} problems, {summary['positive']} positive")
    return 0


def run_train(args) -> int:
    from steer.probes.data import LabelledCues
    from steer.probes.lynx import train
    from steer.probes.probe import ProbeConfig

    lab = LabelledCues.from_safetensors(args.cues_file)
    hidden = tuple(int(h) for h in args.hidden.split(","))
    probe = train(lab, ProbeConfig(hidden=hidden, max_epochs=args.max_epochs, seed=args.seed))
    probe.save(args.out)
    info = probe.info
    summary = {"out": args.out, "n_train": info.n_train, "n_val": info.n_val, "val_auc": info.val_auc,
               "best_epoch": info.best_epoch, "points": info.points}
    if args.json:
        print_json(summary)
    else:
        print(f"wrote {args.out}: trained on {info.n_train} events, validation AUC {info.val_auc:.3f} "
              f"(n={info.n_val}), best epoch {info.best_epoch}")
    return 0


def run_calibrate(args) -> int:
    from steer.probes.data import LabelledCues
    from steer.probes.lynx import calibrate_probe
    from steer.probes.probe import LynxProbe

    probe = LynxProbe.load(args.probe_dir)
    lab = LabelledCues.from_safetensors(args.cues_file)
    cal = calibrate_probe(probe, lab, args.delta, warn=False)
    probe.save(args.probe_dir)
    if args.json:
        print_json(cal.to_json())
    else:
        print(f"calibrated {args.probe_dir} at delta={cal.delta}: q0={cal.q0:.4g} (n0={cal.n0}), "
              f"q1={cal.q1:.4g} (n1={cal.n1})")
    for note in cal.notes:
        print(f"steer probe calibrate: warning: {note}", file=sys.stderr)
    return 0


def run_generate(args) -> int:
    from steer.probes.data import chat_prompts, load_model
    from steer.probes.generate import ExitConfig
    from steer.probes.lynx import generate
    from steer.probes.probe import LynxProbe

    probe = LynxProbe.load(args.probe)
    if probe.calibration is None:
        raise CLIError(f"{args.probe} is not calibrated: run `steer probe calibrate {args.probe} CUES --delta D`")
    model, tok, _ = load_model(args.model)
    probe.check_compatible(model)
    prompts = chat_prompts(tok, args.question) if args.question else list(args.prompt)
    exit_string = probe.info.exit_string if probe.info and probe.info.exit_string else ExitConfig.exit_string
    cfg = ExitConfig(exit_string=exit_string, max_new_tokens=args.max_new_tokens,
                     answer_max_tokens=args.answer_max_tokens, answer_stop=(".", "\n"))
    res = generate(model, tok, prompts, probe, config=cfg)
    rows = [{"stop": r.stop, "reasoning": r.reasoning_text, "answer": r.answer.answer_text if r.answer else None,
             "n_tokens": n, "cue_events": len(r.events),
             "exit_cue_token": next((e.cue_token for e in r.events if e.exited), None)}
            for r, n in zip(res.rows, res.n_tokens())]
    if args.figure:
        with open(args.figure, "w") as f:
            for i in range(len(res.rows)):
                f.write(res.figure(i).to_html(full_html=False, include_plotlyjs="cdn" if i == 0 else False))
    if args.json:
        print_json({"delta": probe.calibration.delta, "rows": rows})
    else:
        for r in rows:
            how = {"exit": f"early exit at token {r['exit_cue_token']}", "eos": "finished",
                   "budget": "budget cut"}[r["stop"]]
            print(f"--- {how}, {r['n_tokens']} tokens, {r['cue_events']} cue events")
            print(r["reasoning"] + (f"{exit_string}{r['answer']}" if r["answer"] is not None else ""))
    return 0
