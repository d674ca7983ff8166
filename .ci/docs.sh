#!/usr/bin/env bash
# CI: build the documentation site strictly: a broken link, nav entry, snippet or API reference
# (a `::: module` or a docstring cross-reference that does not resolve) fails the build.
# Uses the CI venv from .ci/run (VENV overrides), adding the `docs` extra to it.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-ci}
export PIP_DISABLE_PIP_VERSION_CHECK=1 NO_MKDOCS_2_WARNING=1
if ! "$VENV/bin/uv" pip install -q --python "$VENV/bin/python" --find-links /opt/wheels torch==2.13.0 -e ".[docs]"; then
    "$VENV/bin/pip" install -q torch==2.13.0 -e ".[docs]"
fi
"$VENV/bin/mkdocs" build --strict --clean
grep -q "steer.kernels.router.route" build/site/api/kernels/index.html   # folder-mapped subpackages were rendered
echo "docs: built build/site with mkdocs build --strict"
