"""Runs every `test_triton_*` kernel test under Triton's CPU interpreter, in a subprocess.

TRITON_INTERPRET=1 has to be in the environment before triton is first imported (triton's own
tl.max/tl.sigmoid are jit functions decorated at import), which a pytest process that already
imported torch/transformers cannot guarantee. So this test starts a fresh pytest with the variable
set; when the whole suite already runs under the interpreter, those tests ran in-process and this
one has nothing to add.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from steer.kernels._triton import interpreter_ready

TESTS = Path(__file__).parent
KERNEL_TEST_FILES = sorted(
    str(p) for p in TESTS.glob("test_kernels_*.py")
    if p.name not in ("test_kernels_interpreter.py", "test_kernels_gpu.py")
)


@pytest.mark.skipif(interpreter_ready(), reason="the test_triton_* tests already run in this process")
def test_all_triton_kernels_match_references_under_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1", "STEER_KERNELS": ""}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "triton", *KERNEL_TEST_FILES]
    proc = subprocess.run(cmd, cwd=TESTS.parent, env=env, capture_output=True, text=True, timeout=600)
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, f"interpreter kernel tests failed:\n{tail}"
    assert " passed" in proc.stdout and " skipped" not in proc.stdout.splitlines()[-1], tail


@pytest.mark.skipif(not (TESTS.parent / "experiments" / "bench_kernels.py").is_file(),
                    reason="experiments/ ships with the source checkout, not the wheel")
def test_bench_script_cpu_smoke(tmp_path):
    """experiments/bench_kernels.py runs end to end (tiny shapes, interpreter) and its checks pass."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "STEER_KERNELS": ""}
    env.pop("TRITON_INTERPRET", None)  # the script sets it itself before importing triton
    proc = subprocess.run([sys.executable, "experiments/bench_kernels.py", "--cpu-smoke", "--out", str(tmp_path)],
                          cwd=TESTS.parent, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "correctness: ALL OK" in out and "GPU results pending" in out
    table = (tmp_path / "bench_kernels.md").read_text()
    for kernel in ("router", "act_attention", "sink_stats", "fingerprint", "probe_score"):
        assert f"| {kernel} |" in table
