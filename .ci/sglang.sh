#!/usr/bin/env bash
# CI: steer's SGLang export loaded by SGLang's own hook manager (tests/test_sglang.py).
#
# The sglang wheel is installed WITHOUT its dependencies into a venv of its own (.venv-sglang, ~40 MB):
# its package __init__ starts the whole serving stack (CUDA kernels, FlashInfer), so the test does not
# `import sglang`; it loads the unmodified files it needs (srt/model_executor/hook_manager.py,
# srt/utils/server_args_config_parser.py) from that venv's site-packages and runs them in steer's env.
#
# Env: SGLANG_VENV (default .venv-sglang, gitignored), PYTHON (steer's interpreter, default python),
# PYTEST_ARGS (extra pytest arguments).
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
VENV="${SGLANG_VENV:-.venv-sglang}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --no-deps sglang==0.5.23
export STEER_SGLANG_VENV="$PWD/$VENV"
OMP_NUM_THREADS=1 "${PYTHON:-python}" -m pytest tests/test_sglang.py -q -rs -n 0 ${PYTEST_ARGS:-}
