"""`steer switch`: MoTE expert switching during generation (steer.mote.ExpertSwitch)."""

from __future__ import annotations

import argparse
from pathlib import Path

from steer.cli import CLIError, print_json
from steer.options import FORCE_WEIGHTS, SWITCH_MODES
from steer.progress import bar

EXAMPLES = """\
examples:
  steer switch --profile runs/fr --k 10 --mode off_mask --prompt "Pourquoi le ciel est-il bleu ?"
  steer switch --profile runs/fr --k 10 --mode on --prompts builtin:questions-en --limit 8 --labeller french
  steer switch --profile runs/fr --k 10 --random 3 --prompt "..."        random-k control, same per-layer counts
  steer switch --model smollm2-moe --experts 7:3,12:0 --mode off_zero --renormalize --prompt "..."
  steer switch --profile runs/fr --k 10 --save-config cfg/               write the switch as a config, no generation
  steer switch --profile runs/fr --k 10 --prompt "..." --save-config cfg/   generate, and save the config

Prints the baseline and the switched answer for each prompt and how many tokens' routing the switch
changed; with --labeller, the label rate of both. Exit code 2 on bad input (expert/layer out of range,
a profile made on another model, a dense model).
"""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "switch", help="MoTE: generate with experts switched off/on (from a profile or a list)",
        description="Generate with routed experts switched off (mask or zero weight) or forced on, next to the "
                    "unswitched baseline; counts the tokens whose routing changed.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_switch_args(p)
    p.add_argument("--prompt", action="append", help="a prompt (repeat)")
    p.add_argument("--prompts", help="prompt SOURCE (.txt/.jsonl/.yaml or builtin:NAME)")
    p.add_argument("--limit", type=int, help="at most this many prompts from --prompts")
    p.add_argument("--labeller", help="label answers (refusal, french, numbered, code) and report rates")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--save-config", type=Path, metavar="DIR",
                   help="also write the switch as an intervention config (for `steer export`); without prompts, "
                        "only write it")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def add_switch_args(p) -> None:
    """The options that choose the experts and how they are switched (shared with `steer config build`)."""
    p.add_argument("--profile", type=Path, help="profile dir or .safetensors from `steer profile`")
    p.add_argument("--experts", help="explicit LAYER:EXPERT,LAYER:EXPERT,... instead of a profile")
    p.add_argument("--model", help="model (default: the one the profile was made on, else smollm2-moe)")
    p.add_argument("--k", type=int, default=10, help="top-k experts of the profile (default %(default)s)")
    p.add_argument("--per-layer", action="store_true", help="k experts in each layer instead of k overall")
    p.add_argument("--per-layer-cap", type=int, help="at most this many switched experts per layer")
    p.add_argument("--mode", default="off_mask", choices=SWITCH_MODES, help="default %(default)s")
    p.add_argument("--renormalize", action="store_true", help="off_zero: rescale the remaining weights")
    p.add_argument("--force-weight", choices=FORCE_WEIGHTS, default="gate", help="on: weight of a forced expert")
    p.add_argument("--random", type=int, metavar="SEED", help="random-k control with this seed instead")


def _parse_experts(text: str) -> list[tuple[int, int]]:
    pairs = []
    for item in text.split(","):
        try:
            layer, expert = item.strip().split(":")
            pairs.append((int(layer), int(expert)))
        except ValueError:
            raise CLIError(f"--experts: {item!r} is not LAYER:EXPERT (e.g. --experts 7:3,12:0)") from None
    return pairs


def _build_switch(args, prof, lm, kw):
    from steer.mote import ExpertSwitch

    if prof is not None:
        switch = ExpertSwitch.from_profile(prof, args.k, args.mode, per_layer=args.per_layer,
                                           per_layer_cap=args.per_layer_cap, model=lm.model, **kw)
    else:
        switch = ExpertSwitch(_parse_experts(args.experts), args.mode, per_layer_cap=args.per_layer_cap, **kw)
    if args.random is not None:
        switch = ExpertSwitch.random_like(switch, args.random, lm.model)
    from steer.adapters import model_map

    switch.validate(model_map(lm.model))  # range and identity errors before any generation
    return switch


def switch_from_args(args):
    """(loaded model, ExpertSwitch) from the add_switch_args options; range/identity errors are CLIErrors."""
    from steer.ftri import Profile
    from steer.models import load

    if bool(args.profile) == bool(args.experts):
        raise CLIError("give exactly one of --profile DIR or --experts LAYER:EXPERT,...")
    prof = Profile.load(args.profile) if args.profile else None
    model_name = args.model or (prof.stats.get("model_name") if prof else None) or "smollm2-moe"
    lm = load(model_name, progress=bar("steer: loading", enabled=not getattr(args, "quiet", False)))
    kw = dict(renormalize=args.renormalize, force_weight=args.force_weight)
    try:
        return lm, _build_switch(args, prof, lm, kw)
    except IndexError as exc:  # expert or layer out of range: bad input, exit code 2
        raise CLIError(str(exc)) from None


def switch_source(args) -> str:
    """Where a config's expert list came from, in words (kept in the config's mote.source)."""
    if args.profile:
        what = f"profile {args.profile} top {args.k}{' per layer' if args.per_layer else ''}"
    else:
        what = f"experts {args.experts}"
    return what + (f", random-k control seed {args.random}" if args.random is not None else "")


def run(args) -> int:
    from steer.mote_eval import behaviour_labels
    from steer.prompts import load_prompts

    if bool(args.profile) == bool(args.experts):
        raise CLIError("give exactly one of --profile DIR or --experts LAYER:EXPERT,...")
    prompts = list(args.prompt or [])
    if args.prompts:
        ps = load_prompts(args.prompts)
        prompts += (ps.sample(args.limit) if args.limit else ps).prompts
    if not prompts and not args.save_config:
        raise CLIError("no prompts: give --prompt TEXT (repeatable) or --prompts SOURCE (or only --save-config DIR)")
    lm, switch = switch_from_args(args)
    saved = None
    if args.save_config:
        from steer.config import InterventionConfig
        from steer.mote_section import MoTESection

        cfg = InterventionConfig.for_model(lm, mote=MoTESection.from_switch(switch, source=switch_source(args)))
        saved = cfg.save(args.save_config)
        if not prompts:
            if args.json:
                print_json({"model": lm.name, "switch": switch.to_dict(), "config": str(saved)})
            else:
                print(f"wrote intervention config {saved}/ ({switch!r} on {lm.name}); next: steer export")
            return 0
    switch.on_no_effect = "warn"
    labeller = args.labeller or (lambda r: "")
    common = dict(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, progress=bar("steer: answering", "prompt", enabled=not args.quiet))
    base, base_lab = behaviour_labels(lm.model, lm.tokenizer, prompts, labeller, **common)
    steered, steer_lab = behaviour_labels(lm.model, lm.tokenizer, prompts, labeller, switch=switch, **common)
    result = {"model": lm.name, "switch": switch.to_dict(), "config": str(saved) if saved else None,
              "touched": switch.total_touched,
              "touched_fraction": round(switch.touched_fraction(), 4),
              "touched_per_layer": dict(switch.touched),
              "rows": [{"prompt": p, "baseline": b, "switched": s, **({"baseline_label": bl, "switched_label": sl}
                                                                         if args.labeller else {})}
                       for p, b, s, bl, sl in zip(prompts, base, steered, base_lab, steer_lab)]}
    if args.labeller:
        labels = sorted(set(base_lab) | set(steer_lab))
        result["label_rates"] = {lab: {"baseline": base_lab.count(lab) / len(prompts),
                                       "switched": steer_lab.count(lab) / len(prompts)} for lab in labels}
    if args.json:
        print_json(result)
        return 0
    print(f"{switch!r} on {lm.name}: routing changed for {switch.total_touched} token-layers "
          f"({100 * switch.touched_fraction():.1f}% of those routed through switched layers)")
    for row in result["rows"]:
        print(f"\n> {row['prompt']}\n  baseline: {row['baseline']!r}\n  switched: {row['switched']!r}")
    for lab, r in result.get("label_rates", {}).items():
        print(f"{lab}: baseline {r['baseline']:.2f} -> switched {r['switched']:.2f}")
    if saved:
        print(f"wrote intervention config {saved}/")
    return 0
