"""MkDocs hook: lay out the import tree `steer.*` for mkdocstrings' static loader (griffe).

In the repository `steer.kernels`, `steer.probes` and `steer.apps` live in the top-level folders
kernels/, probes/ and apps/, which have no `__init__.py` on purpose (a top-level `kernels` would
shadow Hugging Face's `kernels`); steer/__init__.py maps them at import time, and a wheel installs
them inside steer/. Griffe reads files without importing, so it sees neither mapping. This hook
builds build/docs-api/site-packages/steer/ from symlinks, exactly the layout a wheel installs (pyproject's
package-dir), and mkdocs.yml points the Python handler there. The `__init__.py` files it writes for
the three folders exist only in that build tree: they are empty and carry no docstring.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Named like an install directory: mkdocstrings then labels source blocks "steer/kernels/router.py",
# the path a wheel installs, instead of the build folder.
TREE = ROOT / "build" / "docs-api" / "site-packages"
FOLDERS = {"kernels": "kernels", "probes": "probes", "apps": "apps"}  # steer.<name> -> repo folder


def _link_python_tree(src: Path, dst: Path) -> None:
    """Mirror src's Python files and folders into dst as symlinks (no __pycache__)."""
    dst.mkdir(parents=True, exist_ok=True)
    for item in sorted(src.iterdir()):
        if item.name == "__pycache__":
            continue
        if item.is_dir() and not (item / "__init__.py").exists() and any(item.rglob("*.py")):
            _link_python_tree(item, dst / item.name)  # a folder of modules (apps/pages)
            (dst / item.name / "__init__.py").touch()
        else:
            (dst / item.name).symlink_to(item)


def build_tree(tree: Path = TREE) -> Path:
    """(Re)build the `steer` import tree under `tree`; returns `tree`."""
    if tree.exists():
        shutil.rmtree(tree)
    steer = tree / "steer"
    steer.mkdir(parents=True)
    for item in sorted((ROOT / "steer").iterdir()):
        if item.name != "__pycache__":
            (steer / item.name).symlink_to(item)
    for name, folder in FOLDERS.items():
        _link_python_tree(ROOT / folder, steer / name)
        (steer / name / "__init__.py").touch()
    return tree


_LIST_ITEM = re.compile(r"^\s*(?:[-*+]|\d+\.)\s")
_FENCE = re.compile(r"^\s*(```|~~~)")


def blank_line_before_lists(lines: list[str]) -> list[str]:
    """Start a list where a docstring starts one: steer's docstrings write `Intro:` and `- item` on the
    next line, which Python-Markdown (unlike GitHub) reads as one paragraph unless a blank line
    separates them. Inserts that blank line, outside code fences only."""
    out: list[str] = []
    fenced = False
    for line in lines:
        if _FENCE.match(line):
            fenced = not fenced
        elif not fenced and _LIST_ITEM.match(line) and out and out[-1].strip():
            prev = out[-1]
            if not _LIST_ITEM.match(prev) and not prev.startswith((" ", "\t", "|")):
                out.append("")
        out.append(line)
    return out


def lists_after_text():
    """The Markdown extension running `blank_line_before_lists` (markdown comes with mkdocs)."""
    from markdown import Extension
    from markdown.preprocessors import Preprocessor

    class _Pre(Preprocessor):
        def run(self, lines):
            return blank_line_before_lists(lines)

    class _Ext(Extension):
        def extendMarkdown(self, md):  # noqa: N802 (Markdown's API)
            md.preprocessors.register(_Pre(md), "steer_lists_after_text", 25)

    return _Ext()


WALKTHROUGH = ROOT / "experiments" / "walkthrough.py"
_WALKTHROUGH_MARK = re.compile(r"^<!-- walkthrough: (\d+) -->$", re.M)


def walkthrough_section(number: int, source: Path = WALKTHROUGH) -> str:
    """The code cells of section `number` ("## N. ...") of the executed walkthrough notebook (a jupytext
    percent file), as one Python block: guides show code that CI runs (tests/test_notebook.py)."""
    parts = re.split(r"^# %%(.*)$", source.read_text(), flags=re.M)  # [preamble, kind, body, kind, body, ...]
    code, inside = [], False
    for kind, body in zip(parts[1::2], parts[2::2]):
        if "[markdown]" in kind:
            heading = re.match(r"\s*# ## (\d+)\.", body)
            if heading:
                inside = int(heading.group(1)) == number
        elif inside and body.strip():
            code.append(
                "\n".join(line for line in body.strip().splitlines() if not line.startswith("# ruff:"))
            )
    if not code:
        raise ValueError(f"{source.name} has no section '## {number}.' with code cells")
    return "\n\n".join(code)


def on_page_markdown(markdown, page, **kwargs):
    def block(match):
        number = int(match.group(1))
        try:
            code = walkthrough_section(number)
        except ValueError as error:
            from mkdocs.exceptions import PluginError

            raise PluginError(f"{page.file.src_path}: {error}") from error
        return (
            f"From section {number} of the walkthrough notebook `experiments/walkthrough.py`, which CI "
            'executes (setup cell: `lm = load("smollm2-moe"); model, tok = lm.model, lm.tokenizer`; names '
            "such as `prof`, `fr` and `switch` come from the sections before):\n\n"
            f"```python\n{code}\n```"
        )

    return _WALKTHROUGH_MARK.sub(block, markdown)


def on_config(config, **kwargs):
    # The same list object is what mkdocstrings renders docstrings with, so docstrings get it too.
    config.markdown_extensions.append(lists_after_text())
    return config


def on_startup(command, dirty):
    # Before any plugin's on_config: mkdocstrings' handler may scan its search paths as soon as it
    # starts, and a tree that appears later is then not seen on a fresh checkout.
    build_tree()
