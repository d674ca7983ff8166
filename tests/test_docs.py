"""The front door and the documentation site stay true to the repository.

Fast checks only: the strict MkDocs build (every reference resolved) runs in CI (.ci/docs.sh). Here:
every page in mkdocs.yml's nav exists, README and docs links point at files that exist, every
`::: module` of the API reference names a module in the installed layout and every public module is
documented or deliberately left out, the README's test command is the one .ci/run runs, and the
README's notebook example runs as written on the real packaged SmolLM2.
"""

from __future__ import annotations

import importlib.util
import re
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
TEST_COMMAND = "python -m pytest -n 2 --dist loadfile -q -rs"

# .ci/wheel.sh runs tests/ from a copy outside the checkout, where there is no README or docs/ to check.
pytestmark = pytest.mark.skipif(
    not (ROOT / "mkdocs.yml").is_file(),
    reason="checks the source checkout (tests run from an installed wheel)",
)

# Modules deliberately absent from the API reference (docs/api/index.md says why, in prose).
LEFT_OUT = re.compile(r"^steer\.(__main__|kernels\._\w+|apps\.pages(\.\w+)?)$")


def _nav_pages(node) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, list):
        return [p for item in node for p in _nav_pages(item)]
    if isinstance(node, dict):
        return [p for value in node.values() for p in _nav_pages(value)]
    return []


def _mkdocs() -> dict:
    return yaml.safe_load((ROOT / "mkdocs.yml").read_text())


def _hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", DOCS / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _package_dirs() -> dict[str, Path]:
    """Import name -> source folder, as the wheel installs it (pyproject's packages + package-dir)."""
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    remap = tool.get("package-dir", {})
    dirs = {}
    for pkg in tool["packages"]:
        parent = next(
            (p for p in sorted(remap, key=len, reverse=True) if pkg == p or pkg.startswith(p + ".")), None
        )
        dirs[pkg] = ROOT / (
            remap[parent] + pkg[len(parent) :].replace(".", "/") if parent else pkg.replace(".", "/")
        )
    return dirs


def _public_modules() -> set[str]:
    mods = set()
    for pkg, folder in _package_dirs().items():
        for f in folder.glob("*.py"):
            mods.add(pkg if f.stem == "__init__" else f"{pkg}.{f.stem}")
    return mods


def _api_directives() -> list[tuple[str, str]]:
    out = []
    for page in sorted((DOCS / "api").glob("*.md")):
        out += [(page.name, m) for m in re.findall(r"^::: ([\w.]+)\s*$", page.read_text(), re.M)]
    return out


def _relative_links(md: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", md.read_text(), flags=re.S)  # links inside code are not links
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    return [link for link in links if not re.match(r"^(https?:|mailto:|#)", link)]


def test_every_nav_page_exists():
    pages = _nav_pages(_mkdocs()["nav"])
    assert len(pages) >= 20
    missing = [p for p in pages if not (DOCS / p).is_file()]
    assert not missing, f"mkdocs.yml nav lists pages that do not exist under docs/: {missing}"
    assert len(pages) == len(set(pages)), "a page is listed twice in the nav"


def test_every_docs_page_is_in_the_nav():
    in_nav = set(_nav_pages(_mkdocs()["nav"]))
    pages = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")}
    assert not pages - in_nav, f"pages under docs/ missing from mkdocs.yml's nav: {sorted(pages - in_nav)}"


@pytest.mark.parametrize("md", [README, *sorted(DOCS.rglob("*.md"))], ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(md):
    broken = [link for link in _relative_links(md) if not (md.parent / link.split("#")[0]).exists()]
    assert not broken, f"{md.relative_to(ROOT)} links to files that do not exist: {broken}"


def test_readme_links_into_the_docs():
    links = {link.split("#")[0] for link in _relative_links(README)}
    for page in ["docs/getting-started.md", "docs/models.md", "docs/export.md", "docs/results/index.md"]:
        assert page in links, f"README.md should link to {page}"


def test_readme_is_a_front_door():
    lines = README.read_text().splitlines()
    assert len(lines) <= 150, f"README.md has {len(lines)} lines; move detail into docs/"


def test_readme_test_command_is_what_ci_runs():
    readme = README.read_text()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert TEST_COMMAND in readme
    assert TEST_COMMAND in [line.strip() for line in ci], ".ci/run must run the README's test command"
    assert "bash .ci/docs.sh" in [line.strip() for line in ci], ".ci/run must build the docs (.ci/docs.sh)"


def test_docs_extra_and_strict_build_in_ci():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names = {re.split(r"[\[<>=!~ ]", req)[0] for req in extras["docs"]}
    assert {"mkdocs", "mkdocs-material", "mkdocstrings"} <= names
    assert all(re.search(r"[<>=]", req) for req in extras["docs"]), "docs extra needs version ranges"
    script = (ROOT / ".ci" / "docs.sh").read_text()
    assert ".[docs]" in script and "mkdocs build --strict" in script


def test_api_reference_names_real_modules():
    known = _public_modules()
    directives = _api_directives()
    assert len(directives) >= 40
    unknown = [(page, mod) for page, mod in directives if mod not in known]
    assert not unknown, f"API pages document modules that do not exist: {unknown}"


def test_every_public_module_is_documented_or_deliberately_left_out():
    documented = {mod for _, mod in _api_directives()}
    undocumented = sorted(m for m in _public_modules() - documented if not LEFT_OUT.match(m))
    assert not undocumented, (
        f"modules missing from the API reference: {undocumented}; add `::: name` to a page in docs/api/ "
        "(or, with a reason in docs/api/index.md, to LEFT_OUT here)"
    )


def test_hook_tree_is_the_wheel_layout(tmp_path):
    """docs/hooks.py mirrors pyproject's package-dir, so griffe finds steer.kernels/probes/apps."""
    hooks = _hooks()
    remap = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    assert {f"steer.{k}": v for k, v in hooks.FOLDERS.items()} == remap
    tree = hooks.build_tree(tmp_path / "site-packages")
    for mod in sorted(_public_modules()):
        parts = mod.split(".")
        as_file, as_pkg = tree.joinpath(*parts).with_suffix(".py"), tree.joinpath(*parts, "__init__.py")
        assert as_file.is_file() or as_pkg.is_file(), f"{mod} is missing from the docs import tree"
    assert (tree / "steer" / "kernels" / "router.py").resolve() == ROOT / "kernels" / "router.py"
    assert not (ROOT / "kernels" / "__init__.py").exists()  # the tree's __init__.py stays out of the repo


def _readme_example() -> str:
    text = README.read_text()
    section = re.search(r"\[start:example\].*?\n```python\n(.*?)```\n.*?\[end:example\]", text, re.S)
    assert section, "README.md has no ```python block between the example snippet markers"
    return section.group(1)


def test_readme_example_runs():
    code = _readme_example()
    assert len(code.splitlines()) <= 20
    scope: dict = {}
    exec(compile(code, str(README), "exec"), scope)
    pattern = scope["cap"]["blocks.10.attn.pattern"][0]
    batch = scope["batch"]
    assert pattern.shape[:2] == (2, 9) and pattern.shape[2] == pattern.shape[3] == batch["input_ids"].shape[1]
    # steered generation touched real tokens at the point it names
    assert scope["iv"].touched["blocks.12.resid_post"] > 0


def test_docstring_lists_get_their_blank_line():
    fix = _hooks().blank_line_before_lists
    lines = ["Rules:", "- a", "  more of a", "- b", "", "```", "x:", "- not a list", "```", "| t |", "- c"]
    assert fix(lines) == [
        "Rules:",
        "",
        "- a",
        "  more of a",
        "- b",
        "",
        "```",
        "x:",
        "- not a list",
        "```",
        "| t |",
        "- c",
    ]
    assert fix(["1. one", "2. two"]) == ["1. one", "2. two"]


def test_guides_show_walkthrough_sections_that_exist():
    """Guides embed code from experiments/walkthrough.py (executed by tests/test_notebook.py) by section."""
    hooks = _hooks()
    marks = [
        (p.name, int(n))
        for p in DOCS.rglob("*.md")
        for n in re.findall(r"<!-- walkthrough: (\d+) -->", p.read_text())
    ]
    assert {n for _, n in marks} == set(range(1, 8)), (
        "each of the walkthrough's 7 sections belongs in a guide"
    )
    for _, n in marks:
        assert "import" in hooks.walkthrough_section(n)
    with pytest.raises(ValueError, match="no section '## 99.'"):
        hooks.walkthrough_section(99)
