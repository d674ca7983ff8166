"""Each option set (scores, modes, projections, targets...) is written once, in steer.options: the
methods validate against it, and the CLI and the app offer it without spelling it out again."""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

import pytest

from steer import options

ROOT = Path(__file__).resolve().parents[1]
OPTION_SETS = {name: value for name, value in vars(options).items() if name.isupper() and isinstance(value, tuple)}


def test_methods_validate_against_the_option_sets():
    from steer.difr import fingerprint
    from steer.difr.verify import DEFAULT_STATISTIC, METHODS, STATISTICS
    from steer.export import TARGETS
    from steer.ftri import SCORES, ProfileConfig
    from steer.mote import MODES, spec_problems
    from steer.probes.answers import CHECKERS
    from steer.probes.data import SPLITS

    assert SCORES is options.PROFILE_SCORES and MODES is options.SWITCH_MODES and TARGETS is options.EXPORT_TARGETS
    assert fingerprint.PROJECTIONS is options.PROJECTIONS and STATISTICS is options.VERIFY_STATISTICS
    assert METHODS is options.VERIFY_METHODS and DEFAULT_STATISTIC == options.DEFAULT_STATISTIC
    assert tuple(SPLITS) == options.PROBE_SPLITS and tuple(CHECKERS) == options.CHECKERS
    for tokens in options.PROFILE_TOKENS:
        ProfileConfig(tokens=tokens).validate()
    with pytest.raises(ValueError, match="prompt, response, both"):
        ProfileConfig(tokens="all").validate()
    assert not spec_problems([(0, 1)], "on", False, "max")
    assert "gate, max" in str(spec_problems([(0, 1)], "on", False, "heaviest")[0])


def _choices() -> dict[tuple[str, str], tuple]:
    from steer.cli import build_parser

    found = {}
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for command, parser in sub.choices.items():
        nested = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        parsers = [(f"{command} {n}", p) for a in nested for n, p in a.choices.items()] or [(command, parser)]
        for name, p in parsers:
            for action in p._actions:
                if action.choices is not None and not isinstance(action, argparse._SubParsersAction):
                    found[(name, action.dest)] = tuple(action.choices)
    return found


def test_cli_choices_are_the_option_sets():
    choices = _choices()
    want = {
        ("profile", "score"): options.PROFILE_SCORES, ("profile", "tokens"): options.PROFILE_TOKENS,
        ("profile", "engine"): options.PROFILE_ENGINES, ("switch", "mode"): options.SWITCH_MODES,
        ("switch", "force_weight"): options.FORCE_WEIGHTS, ("fingerprint", "projection"): options.PROJECTIONS,
        ("verify", "statistic"): options.VERIFY_STATISTICS, ("verify", "method"): options.VERIFY_METHODS,
        ("export", "target"): options.EXPORT_TARGETS, ("probe label", "split"): options.PROBE_SPLITS,
        ("probe label", "checker"): options.CHECKERS, ("verify", "dtype"): options.DTYPES,
        ("fingerprint", "attn"): options.ATTN_IMPLEMENTATIONS,
    }
    assert {k: choices.get(k) for k in want} == want


def _string_sequences(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.Tuple, ast.List)) and len(node.elts) > 1 and all(
                isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts):
            yield node.lineno, tuple(e.value for e in node.elts)


@pytest.mark.skipif(not (ROOT / "steer" / "options.py").is_file(), reason="reads the source checkout")
def test_cli_and_app_spell_out_no_option_set():
    sets = {frozenset(v): k for k, v in OPTION_SETS.items()}
    files = sorted((ROOT / "steer" / "cli").glob("*.py")) + sorted((ROOT / "apps").rglob("*.py"))
    repeated = [f"{path.relative_to(ROOT)}:{line} spells out options.{sets[frozenset(seq)]}"
                for path in files for line, seq in _string_sequences(path) if frozenset(seq) in sets]
    assert repeated == []
