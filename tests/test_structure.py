"""Structure of the code base: steer's modules import each other without cycles (lazy imports
inside functions included: a cycle hidden in a function is still a cycle)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# .ci/wheel.sh runs tests/ from a copy outside the checkout, where there is no source tree to read.
pytestmark = pytest.mark.skipif(not (ROOT / "steer" / "adapters.py").is_file(),
                                reason="reads the source checkout (tests run from an installed wheel)")
FOLDERS = ("steer", "kernels", "probes", "apps")  # kernels/, probes/, apps/ import as steer.<folder>


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] != "steer":
        parts.insert(0, "steer")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the steer modules it imports (a package's own __init__ excluded: it is not a cycle
    for a submodule to be imported through its package)."""
    files = {_module_name(p): p for folder in FOLDERS for p in (ROOT / folder).rglob("*.py")}
    graph = {name: set() for name in files}
    for name, path in files.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            graph[name] |= {t for t in targets if t in files and t != name and not name.startswith(t + ".")}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_among_steer_modules():
    graph = import_graph()
    assert "steer.kernels.router" in graph and "steer.models" in graph["steer.cli.models"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


MAX_FUNCTION_LINES = 60


def _is_triton_kernel(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """Decorated with triton.jit / triton.autotune / triton.heuristics (or `jit` imported from triton)."""
    for dec in fn.decorator_list:
        target = dec.func if isinstance(dec, ast.Call) else dec
        name = ast.unparse(target)
        if name.startswith("triton.") or name in ("jit", "tl.jit"):
            return True
    return False


def long_functions(limit: int = MAX_FUNCTION_LINES) -> dict[str, int]:
    """{module.qualname: lines} of every function longer than `limit` lines (Triton kernels excepted)."""
    found = {}
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            module = _module_name(path)

            def visit(node: ast.AST, prefix: str) -> None:
                for child in ast.iter_child_nodes(node):
                    if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                        name = f"{prefix}.{child.name}"
                        n = child.end_lineno - child.lineno + 1
                        if n > limit and not _is_triton_kernel(child):
                            found[name] = n
                        visit(child, name)
                    elif isinstance(child, ast.ClassDef):
                        visit(child, f"{prefix}.{child.name}")

            visit(ast.parse(path.read_text()), module)
    return found


def test_long_function_finder():
    src = "@triton.jit\ndef k():\n" + "    x = 1\n" * 70 + "def f():\n" + "    x = 1\n" * 70
    tree = ast.parse(src)
    kernel, plain = tree.body
    assert _is_triton_kernel(kernel) and not _is_triton_kernel(plain)
    assert long_functions(limit=10**6) == {}


def test_no_long_functions():
    """No function over ~60 lines outside Triton kernels: long ones become small named steps."""
    too_long = long_functions()
    assert not too_long, "functions over 60 lines (split them into named steps): " + ", ".join(
        f"{name} ({n} lines)" for name, n in sorted(too_long.items(), key=lambda kv: -kv[1]))
