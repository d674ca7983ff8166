"""The `steer` command line.

Each module in this package is one subcommand and defines `add_parser(subparsers)`, which adds its
parser and sets `func=handler` (handler(args) -> exit code). Modules are discovered, so adding a
command is adding a file. No logic lives here or in the command modules: they parse arguments,
call the Python API and print its result objects.

Exit codes: 0 ok, 1 the job ran but its check failed (e.g. verification rejected), 2 bad input.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import sys

EXIT_OK, EXIT_CHECK_FAILED, EXIT_BAD_INPUT = 0, 1, 2


class CLIError(Exception):
    """Bad input from the user: printed as one line, exit code 2."""


def _command_modules() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="steer",
        description="Look inside LLMs and steer them at inference time.",
        epilog="Run 'steer COMMAND --help' for each command's options and examples.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _command_modules():
        importlib.import_module(f"{__name__}.{name}").add_parser(sub)
    return parser


def print_json(obj) -> None:
    json.dump(obj, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_BAD_INPUT
    try:
        return int(args.func(args) or 0)
    except (CLIError, ValueError, FileNotFoundError) as exc:
        print(f"steer {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"steer {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
