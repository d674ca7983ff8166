"""steer: look inside LLMs and steer them at inference time.

Subpackages that live in the repository's own top-level folders: `steer.kernels` (kernels/, fused
Triton hook kernels and their PyTorch references), `steer.probes` (probes/, LYNX) and `steer.apps`
(apps/, the Streamlit explorer). A wheel installs them inside `steer/` (pyproject's package-dir).
Nothing is importable as a bare `kernels` or `probes`: Hugging Face's `kernels` package, which
transformers >= 5.25 imports, must never be shadowed, so those folders have no `__init__.py`.

In a source checkout (an editable install, or Python started in the repository root) the folders sit
beside `steer/`, where setuptools' editable finder cannot map a folder without `__init__.py`; the
finder below maps the three names to them. It is consulted only after every other finder, so it never
changes what an installed wheel imports.
"""

from __future__ import annotations

import sys
from importlib.machinery import ModuleSpec
from pathlib import Path

_CHECKOUT = Path(__file__).resolve().parent.parent
SOURCE_FOLDERS = {"steer.kernels": "kernels", "steer.probes": "probes", "steer.apps": "apps"}


class _CheckoutFolders:
    """Meta-path finder: `steer.<name>` -> the checkout's top-level folder, as a namespace package."""

    @staticmethod
    def find_spec(fullname: str, path=None, target=None) -> ModuleSpec | None:
        folder = SOURCE_FOLDERS.get(fullname)
        if folder is None or not (_CHECKOUT / folder).is_dir():
            return None
        spec = ModuleSpec(fullname, None, is_package=True)
        spec.submodule_search_locations = [str(_CHECKOUT / folder)]
        return spec


if (_CHECKOUT / "pyproject.toml").is_file() and _CheckoutFolders.__qualname__ not in {
        getattr(f, "__qualname__", "") for f in sys.meta_path}:
    sys.meta_path.append(_CheckoutFolders)
