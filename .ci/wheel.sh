#!/usr/bin/env bash
# CI: build steer's wheel, install it (not editable) into a fresh venv, and run the fast suite against
# the installed package from a directory outside the repository.
#
# This is how most users install steer. It checks what an editable install cannot: that the wheel
# carries kernels/, probes/ and apps/ as steer.kernels / steer.probes / steer.apps (pyproject's
# package-dir), ships no top-level `kernels` or `probes` (Hugging Face's `kernels`, which transformers
# >= 5.25 imports, must stay importable), and that the tests pass with nothing of the checkout on
# sys.path. Versions float as for users: the newest our ranges allow.
#
# Env: WHEEL_VENV (default .venv-wheel, gitignored), PYTEST_ARGS (extra pytest arguments).
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
VENV="$(pwd)/${WHEEL_VENV:-.venv-wheel}"
rm -rf "$VENV" dist
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q -U pip uv setuptools
"$VENV/bin/pip" wheel -q --no-deps -w dist .
WHEEL=$(ls dist/steer-*.whl)
"$VENV/bin/python" - "$WHEEL" <<'PY'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
tops = sorted({n.split("/")[0] for n in names if ".dist-info/" not in n})
assert tops == ["steer"], f"the wheel installs top-level names besides steer: {tops}"
for need in ("steer/kernels/router.py", "steer/probes/lynx.py", "steer/apps/explorer.py"):
    assert need in names, f"{need} is missing from the wheel"
print(f"{sys.argv[1]}: {len(names)} files, top level {tops}")
PY
# torch==2.13.0 resolves to the local CPU wheel; uv needs the find-links AND the pin (see .ci/run).
"$VENV/bin/uv" pip install --python "$VENV/bin/python" --find-links /opt/wheels torch==2.13.0 "steer[dev] @ file://$PWD/$WHEEL"
WORK=$(mktemp -d)
cp -r tests pyproject.toml "$WORK/"
cd "$WORK"
"$VENV/bin/python" - <<'PY'
import importlib.util, kernels, steer, steer.kernels.router, steer.mote, transformers
assert "site-packages" in steer.__file__, f"steer imported from {steer.__file__}, not the installed wheel"
assert "site-packages" in kernels.__file__ and hasattr(kernels, "get_kernel"), f"`kernels` is not Hugging Face's: {kernels.__file__}"
assert importlib.util.find_spec("probes") is None, "a top-level `probes` is importable"
print(f"steer from {steer.__file__}; kernels (Hugging Face) from {kernels.__file__}; transformers {transformers.__version__}")
PY
"$VENV/bin/steer" --help > /dev/null
"$VENV/bin/python" -m pytest -n 2 --dist loadfile -q -rs -m "not slow" -p no:cacheprovider ${PYTEST_ARGS:-} tests
