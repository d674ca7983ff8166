"""`steer generate`: generate with a whole intervention config applied (steer.config.InterventionConfig)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from steer.cli import CLIError, print_json
from steer.progress import bar

EXAMPLES = """\
examples:
  steer generate --config runs/cfg --prompt "Quelle est la capitale de l'Italie ?"
  steer generate --config runs/cfg --prompts questions.txt --baseline --json
      the unsteered answers beside the steered ones
  steer generate --config runs/cfg --prompts p.txt --fingerprints fp.safetensors
      the config has a difr section: record the claim for `steer verify --config runs/cfg`
  steer generate --config runs/cfg --skip lynx --prompt "..."
      serve the switches but not the early exit

What each section does: mote and act change the forward pass (their touched-token counts are
printed: a section that touched nothing is reported, never silently ignored); lynx exits early at
reasoning cues with its calibrated probe; difr records a fingerprint per generated token. Exit code
2 on bad input (a config made for another model, lynx and difr together, a difr section without
--fingerprints).
"""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "generate", help="generate with an intervention config applied (MoTE, ACT, LYNX exit, DiFR fingerprints)",
        description="Greedy generation with every section of a steer intervention config applied, as a "
                    "serving engine with the exported config would run it.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="intervention config directory (or its config.json)")
    p.add_argument("--model", help="packaged name, checkpoint dir or .gguf (default: smollm2-moe for a config "
                                   "with a mote section, else smollm2)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for several)")
    p.add_argument("--prompts", type=Path, help="a text file with one prompt per line")
    p.add_argument("--skip", default="", help="comma list of sections not to apply (mote, act, lynx, difr)")
    p.add_argument("--baseline", action="store_true", help="also generate without the config, for comparison")
    p.add_argument("--fingerprints", type=Path, help="difr: write the fingerprint claim to this .safetensors")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--answer-max-tokens", type=int, default=8, help="lynx: answer tokens after an exit")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--no-chat-template", action="store_true", help="feed prompts raw")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def _sections(cfg, skip: str) -> set[str]:
    from steer.config import section_names

    skipped = {s.strip() for s in skip.split(",") if s.strip()}
    unknown = skipped - set(section_names())
    if unknown:
        raise CLIError(f"--skip: unknown section(s) {', '.join(sorted(unknown))}; choose from "
                       f"{', '.join(section_names())}")
    present = set(cfg.sections)
    for s in sorted(skipped - present):
        print(f"note: --skip {s}: the config has no {s} section", file=sys.stderr)
    active = present - skipped
    if not active:
        raise CLIError(f"nothing to apply: the config's sections ({', '.join(sorted(present)) or 'none'}) are all "
                       f"skipped")
    return active


def run(args) -> int:
    from steer.cli.fingerprint import read_prompts
    from steer.config import InterventionConfig
    from steer.models import load

    prompts = read_prompts(args)
    cfg = InterventionConfig.load(args.config)
    active = _sections(cfg, args.skip)
    _check_sections(cfg, active, args)
    lm = load(args.model or ("smollm2-moe" if cfg.mote is not None else "smollm2"), progress=bar("steer: loading", enabled=not args.quiet))
    ivs = _interventions(cfg, active, lm)
    chat = not args.no_chat_template
    rows, extra = _steered_rows(args, cfg, lm, prompts, active, ivs, chat)
    if args.baseline:
        for row, text in zip(rows, _greedy(args, lm, prompts, chat)):
            row["baseline"] = text
    touched = {type(iv).__name__: int(sum(iv.touched.values())) for iv in ivs}
    result = {"model": lm.name, "config": str(args.config), "applied": sorted(active), "touched": touched,
              "rows": rows, **extra}
    if args.json:
        print_json(result)
    else:
        _print_rows(rows, touched, extra, lm.name, args.config)
    return 0


def _check_sections(cfg, active: set[str], args) -> None:
    """Refuse section combinations whose output would misrepresent what ran."""
    unknown = sorted(s for s in active if not cfg.sections[s].intervenes and s not in ("lynx", "difr"))
    if unknown:  # a monitor or recorder this command has no step for would be skipped silently
        raise CLIError(f"steer generate does not know how to run the {', '.join(unknown)} section(s): they do not "
                       f"change the forward pass and have no generation step here; run with --skip {','.join(unknown)}")
    if {"lynx", "difr"} <= active:
        raise CLIError("the config has both lynx and difr sections: an early exit rewrites the token stream, so "
                       "its fingerprints could not be verified; run with --skip difr or --skip lynx")
    unapplied = [s for s, section in cfg.sections.items() if section.intervenes and s not in active]
    if "difr" in active and unapplied:
        raise CLIError(f"--skip {','.join(unapplied)} with a difr section: the fingerprints would claim the whole "
                       f"config ran; skip difr too, or export a config without those sections")
    if "difr" in active and args.fingerprints is None:
        raise CLIError("the config has a difr section: give --fingerprints OUT.safetensors to record the claim, "
                       "or --skip difr")
    if args.fingerprints is not None and "difr" not in active:
        raise CLIError("--fingerprints needs a config with a difr section (steer export / InterventionConfig "
                       "difr=DiFRSection(...))")


def _interventions(cfg, active: set[str], lm) -> list:
    """The sections that change the forward pass, validated against the model here (exit 2 on a mismatch)."""
    forward = {s for s in active if cfg.sections[s].intervenes}
    ivs = []
    if forward:
        ivs = cfg.replace(sections={s: cfg.sections[s] for s in forward}).interventions(lm.model)
    if active - forward:
        cfg.validate(lm.model)
    for iv in ivs:
        iv.on_no_effect = "warn"  # reported below with the counts, not raised mid-run
    return ivs


def _steered_rows(args, cfg, lm, prompts: list[str], active: set[str], ivs: list, chat: bool) -> tuple[list, dict]:
    """Generate under the interventions: with early exit (lynx), fingerprints (difr) or plain greedy."""
    import contextlib

    from steer.interventions import apply

    rows = [{"prompt": p} for p in prompts]
    extra: dict = {}
    with apply(lm.model, *ivs) if ivs else contextlib.nullcontext():
        if "lynx" in active:
            rows, extra = _lynx(args, cfg, lm, prompts, chat)
        elif "difr" in active:
            texts, extra = _difr(args, cfg, lm, prompts, chat)
            for row, text in zip(rows, texts):
                row["output"] = text
        else:
            texts = _greedy(args, lm, prompts, chat)
            for row, text in zip(rows, texts):
                row["output"] = text
    return rows, extra


def _print_rows(rows: list[dict], touched: dict[str, int], extra: dict, model_name: str, config_path) -> None:
    for row in rows:
        print(f"\n> {row['prompt']}")
        if "baseline" in row:
            print(f"  baseline: {row['baseline']!r}")
        print(f"  steered:  {row['output']!r}" + (f"  [{row['stop']}]" if "stop" in row else ""))
    for name, n in touched.items():
        print(f"{name}: touched {n} token positions" + ("  (WARNING: no effect)" if n == 0 else ""),
              file=sys.stderr)
    if "fingerprints" in extra:
        print(f"wrote {extra['fingerprints']} ({extra['fingerprint_tokens']} tokens); verify with "
              f"`steer verify {extra['fingerprints']} --model {model_name} --config {config_path} ...`",
              file=sys.stderr)


def _greedy(args, lm, prompts, chat) -> list[str]:
    from steer.prompts import generate_responses

    return generate_responses(lm.model, lm.tokenizer, prompts, max_new_tokens=args.max_new_tokens,
                              batch_size=args.batch_size, chat_template=chat,
                              progress=bar("steer generate", "prompt", enabled=not args.quiet))


def _lynx(args, cfg, lm, prompts, chat):
    from steer.probes.data import chat_prompts
    from steer.probes.generate import ExitConfig
    from steer.probes.lynx import generate

    probe = cfg.lynx.probe()
    if probe.calibration is None:
        raise CLIError("the config's lynx section has no conformal calibration: calibrate the probe "
                       "(`steer probe calibrate`) before exporting it")
    probe.check_compatible(lm.model)
    texts = chat_prompts(lm.tokenizer, prompts) if chat else list(prompts)
    exit_string = probe.info.exit_string if probe.info and probe.info.exit_string else ExitConfig.exit_string
    exit_cfg = ExitConfig(exit_string=exit_string, max_new_tokens=args.max_new_tokens,
                          answer_max_tokens=args.answer_max_tokens, answer_stop=(".", "\n"))
    res = generate(lm.model, lm.tokenizer, texts, probe, config=exit_cfg)
    rows = [{"prompt": p, "output": r.reasoning_text + (exit_string + r.answer.answer_text if r.answer else ""),
             "stop": r.stop, "n_tokens": n, "cue_events": len(r.events)}
            for p, r, n in zip(prompts, res.rows, res.n_tokens())]
    exits = sum(r["stop"] == "exit" for r in rows)
    return rows, {"lynx": {"delta": probe.calibration.delta, "early_exits": exits}}


def _difr(args, cfg, lm, prompts, chat):
    from steer.difr import fingerprint_prompts, intervention_digest

    # the claim names the whole config it was generated under (what `steer verify --config` applies)
    fp = fingerprint_prompts(lm.model, lm.tokenizer, prompts, config=cfg.difr.difr_config(),
                             max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, chat=chat,
                             model_id=lm.name, intervention=intervention_digest(args.config))
    args.fingerprints.parent.mkdir(parents=True, exist_ok=True)
    fp.save(args.fingerprints)
    texts = [lm.tokenizer.decode(out, skip_special_tokens=True) for _, out in fp.sequences()]
    return texts, {"fingerprints": str(args.fingerprints), "fingerprint_tokens": fp.n_tokens}
