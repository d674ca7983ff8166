"""`steer config`: build, show, validate and diff intervention configs (steer.config, steer.config_diff)."""

from __future__ import annotations

import argparse
from pathlib import Path

from steer.cli import EXIT_CHECK_FAILED, EXIT_OK, CLIError, print_json
from steer.options import PROJECTIONS

EXAMPLES = """\
examples:
  steer config build --profile runs/fr --k 10 --mode off_mask --difr-k 8 -o cfg/
      the profile's top-10 experts switched off, plus DiFR fingerprint settings, bound to the
      model the profile was made on (or --model); next: steer export --target vllm cfg/ ...
  steer config build --model ./ckpt --experts 1:0,2:3 --mode on -o cfg/
  steer config show cfg/                          identity, sections, experts per layer, digest
  steer config validate cfg/ --model ./ckpt       schema, tensors, then ids and identity vs the model
  steer config diff cfg/ other/                   field by field; exit 1 when they differ

Exit codes: 0 ok (diff: equal), 1 diff: the configs differ, 2 bad input (every problem listed with
its field path).
"""


def add_parser(sub) -> None:
    from steer.cli.switch import add_switch_args

    p = sub.add_parser(
        "config",
        help="build, show, validate and diff intervention configs (the file steer export reads)",
        description="Intervention configs (config.json + config.safetensors): build one from a profile or an "
        "expert list, print it, check it against a model, or compare two.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True)

    b = verbs.add_parser(
        "build",
        help="a config from a profile (top-k experts) or an expert list",
        description="Choose experts as `steer switch` does and write them as a config bound to "
        "the model's identity; optionally add DiFR fingerprint settings.",
    )
    add_switch_args(b)
    b.add_argument("--difr-k", type=int, help="add a difr section: fingerprint width k (paper 2..128)")
    b.add_argument(
        "--difr-seed", type=int, default=0, help="difr: public projection seed (default %(default)s)"
    )
    b.add_argument("--difr-projection", choices=PROJECTIONS, default="gaussian")
    b.add_argument("--description", default="", help="free text kept in the config")
    b.add_argument("-o", "--out", type=Path, required=True, help="output config directory")
    b.add_argument("--json", action="store_true", help="machine-readable output")
    b.add_argument("--quiet", action="store_true", help="no progress bars")
    b.set_defaults(func=run_build)

    s = verbs.add_parser("show", help="print a config in brief")
    s.add_argument("config", help="config directory or its config.json")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=run_show)

    v = verbs.add_parser(
        "validate", help="check a config (schema, tensors) and, with --model, that it fits it"
    )
    v.add_argument("config", help="config directory or its config.json")
    v.add_argument("--model", help="packaged name or checkpoint dir the config is meant for (loaded)")
    v.add_argument("--json", action="store_true", help="machine-readable output")
    v.set_defaults(func=run_validate)

    d = verbs.add_parser("diff", help="differences between two configs (exit 1 when they differ)")
    d.add_argument("a", help="first config")
    d.add_argument("b", help="second config")
    d.add_argument("--json", action="store_true", help="machine-readable output")
    d.set_defaults(func=run_diff)


def run_build(args) -> int:
    from steer.cli.switch import switch_from_args, switch_source
    from steer.config import InterventionConfig
    from steer.difr.section import DiFRSection
    from steer.mote_section import MoTESection

    if args.difr_k is not None and args.difr_k < 1:
        raise CLIError(f"--difr-k must be >= 1, got {args.difr_k}")
    lm, switch = switch_from_args(args)
    difr = DiFRSection(args.difr_k, args.difr_seed, args.difr_projection) if args.difr_k else None
    cfg = InterventionConfig.for_model(
        lm,
        mote=MoTESection.from_switch(switch, source=switch_source(args)),
        difr=difr,
        description=args.description,
    )
    out = cfg.save(args.out)
    return _print_summary(cfg, out, args.json, f"wrote {out}/ for {lm.name}")


def run_show(args) -> int:
    from steer.config import InterventionConfig

    return _print_summary(InterventionConfig.load(args.config), Path(args.config), args.json, None)


def run_validate(args) -> int:
    from steer.config import ConfigError, InterventionConfig

    cfg = InterventionConfig.load(args.config)  # schema, version, tensors: ConfigError lists each problem
    result = {"config": str(args.config), "valid": True, "model": args.model}
    if args.model:
        from steer.models import load

        lm = load(args.model, progress=False)
        problems = cfg.problems(lm)
        if problems:
            raise ConfigError(problems, f"{args.config} does not fit {args.model}")
    if args.json:
        print_json(result)
    else:
        print(
            f"{args.config}: valid"
            + (
                f", fits {args.model}"
                if args.model
                else " (schema and tensors; add --model to check it against a model)"
            )
        )
    return EXIT_OK


def run_diff(args) -> int:
    from steer.config import InterventionConfig
    from steer.config_diff import diff

    lines = diff(InterventionConfig.load(args.a), InterventionConfig.load(args.b))
    if args.json:
        print_json({"a": args.a, "b": args.b, "equal": not lines, "differences": lines})
    elif lines:
        print(f"--- {args.a}\n+++ {args.b}")
        for line in lines:
            print(line)
    else:
        print(f"{args.a} and {args.b} are the same config")
    return EXIT_CHECK_FAILED if lines else EXIT_OK


def _print_summary(cfg, path: Path, as_json: bool, headline: str | None) -> int:
    from steer.config_diff import summary
    from steer.difr.fingerprint import intervention_digest

    info = summary(cfg)
    try:
        info["digest"] = intervention_digest(path)  # what DiFR claims served with this config name
    except FileNotFoundError:
        pass
    if as_json:
        print_json({"config": str(path), **info})
        return EXIT_OK
    if headline:
        print(headline)
    m = info["model"]
    print(
        f"config {path}  version {info['version']}"
        + (f"  digest {info['digest']}" if "digest" in info else "")
    )
    if info.get("description"):
        print(f"  description: {info['description']}")
    ident = f"{m['family']} ({m['model_type']}), {m['n_layers']} layers, d_model {m['d_model']}"
    if m.get("num_experts"):
        ident += f", {m['num_experts']} experts top-{m.get('top_k')}"
    print(f"  model: {ident}" + (f", weights {m['weights_hash'][:12]}" if m.get("weights_hash") else ""))
    for section in cfg.sections.values():  # each section says itself (steer.sections.Section.describe)
        for line in section.describe():
            print(f"  {line}")
    if not info["sections"]:
        print("  (no sections: nothing to apply)")
    return EXIT_OK
