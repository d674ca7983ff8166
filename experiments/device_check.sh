#!/usr/bin/env bash
# GPU check of the fused kernels, in one call on the lent GPU machine (at most ~9.5 minutes, typically less;
# run it with the run tool's timeout_s=600):
#   1. pytest -m gpu tests/test_kernels_gpu.py tests/test_kernels_lse.py  (agreement at realistic shapes,
#      CUDA-graph capture; SDPA-with-lse ACT and sink statistics against the fp32 references)
#   2. experiments/bench_kernels.py             (correctness table, timings vs eager/compile, sweep)
#   3. experiments/act/bench_attention_gpu.py   (ACT and sink statistics: CUDA SDPA with lse vs our Triton
#      kernel vs eager, decode steps in GB/s against the copy bandwidth it measures; issue 16)
# Everything is written under $OUT (default ./device_out). Exit code: nonzero if either step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-device_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET STEER_KERNELS

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv 2>&1
  "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  "$PY" -c "import transformers; print('transformers', transformers.__version__)" 2>&1
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

rc_test=0
if "$PY" -c "import pytest" 2>/dev/null; then
  timeout 200 "$PY" -m pytest -m gpu tests/test_kernels_gpu.py tests/test_kernels_lse.py -q -p no:cacheprovider -o addopts="" 2>&1 | tee "$OUT/pytest_gpu.txt"
  rc_test=${PIPESTATUS[0]}
else
  echo "pytest not installed on this machine: skipping tests/test_kernels_gpu.py (the bench still checks correctness)" | tee "$OUT/pytest_gpu.txt"
fi

timeout 280 "$PY" experiments/bench_kernels.py --out "$OUT" 2>&1 | tee "$OUT/bench_kernels.txt"
rc_bench=${PIPESTATUS[0]}

timeout 90 "$PY" experiments/act/bench_attention_gpu.py --out "$OUT" 2>&1 | tee "$OUT/bench_attention_gpu.txt"
rc_attn=${PIPESTATUS[0]}

echo "device_check: pytest rc=$rc_test, bench rc=$rc_bench, attention bench rc=$rc_attn" | tee -a "$OUT/env.txt"
[ "$rc_test" -eq 0 ] && [ "$rc_bench" -eq 0 ] && [ "$rc_attn" -eq 0 ]
