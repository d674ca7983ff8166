"""steer installs like any library: its kernels, probes and explorer live under `steer`, never as
bare top-level `kernels` / `probes`, so Hugging Face's `kernels` package (which transformers >= 5.25
imports) is never shadowed, neither by an installed wheel nor by Python started in the repository root.

Import checks run in fresh interpreters, so nothing this test session imported earlier can hide a
failure of `import transformers` itself.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
IN_CHECKOUT = (REPO / "pyproject.toml").is_file() and (REPO / "kernels").is_dir()
needs_checkout = pytest.mark.skipif(not IN_CHECKOUT, reason="checks the source checkout (tests run from an installed wheel)")

PROBE = r"""
import importlib.util, json, sys
out = {}
spec = importlib.util.find_spec("kernels")
out["kernels_origin"] = spec.origin if spec else None
spec = importlib.util.find_spec("probes")
out["probes"] = None if spec is None else {"origin": spec.origin, "locations": list(spec.submodule_search_locations or [])}

import torch, transformers
from transformers.utils import import_utils as iu
out["transformers"] = transformers.__version__
out["hf_kernels_available"] = iu.is_kernels_available()
import steer, steer.kernels.router, steer.kernels.act, steer.mote, steer.probes.lynx, steer.apps.explorer_common
out["steer_kernels"] = steer.kernels.router.__file__
out["steer_probes"] = steer.probes.lynx.__file__

from steer.tiny import tiny_model
torch.manual_seed(0)
ids = torch.randint(3, 256, (2, 7))
for family in ("llama", "gpt_oss", "qwen2_moe"):
    with torch.no_grad():
        logits = tiny_model(family)(ids).logits
    out[family] = {"shape": list(logits.shape), "finite": bool(torch.isfinite(logits).all())}
print("PROBE" + json.dumps(out))
"""


def run_probe(cwd: Path, extra_path: Path | None = None) -> dict:
    env = None
    if extra_path is not None:
        import os

        env = dict(os.environ, PYTHONPATH=str(extra_path))
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, f"fresh interpreter in {cwd} failed:\n{proc.stderr[-3000:]}"
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("PROBE"))
    return json.loads(line.removeprefix("PROBE"))


def hf_kernels_origin() -> str:
    spec = importlib.util.find_spec("kernels")
    assert spec is not None, "Hugging Face's `kernels` is not installed (transformers >= 5.25 requires it)"
    return spec.origin


def check(out: dict) -> None:
    assert out["kernels_origin"] == hf_kernels_origin(), "`import kernels` must give Hugging Face's package"
    for family in ("llama", "gpt_oss", "qwen2_moe"):
        assert out[family]["shape"] == [2, 7, 256] and out[family]["finite"]
    assert Path(out["steer_kernels"]).parent.name == "kernels"
    assert Path(out["steer_probes"]).parent.name == "probes"


def test_imports_from_outside_the_repository(tmp_path):
    out = run_probe(tmp_path)
    check(out)
    assert out["probes"] is None, f"a top-level `probes` is importable from outside the repository: {out['probes']}"


@needs_checkout
def test_imports_from_the_repository_root():
    """From the root, `kernels/` and `probes/` are at most namespace portions (no __init__.py): any regular
    package of that name elsewhere on sys.path is found first, so we can shadow nothing."""
    assert not (REPO / "kernels" / "__init__.py").exists() and not (REPO / "probes" / "__init__.py").exists()
    out = run_probe(REPO)
    check(out)
    if out["probes"] is not None:
        assert out["probes"]["origin"] in (None, "namespace"), out["probes"]


@needs_checkout
def test_another_projects_probes_package_wins_from_the_root(tmp_path):
    other = tmp_path / "site"
    (other / "probes").mkdir(parents=True)
    (other / "probes" / "__init__.py").write_text("OWNER = 'another project'\n")
    proc = subprocess.run([sys.executable, "-c", "import probes; print(probes.OWNER)"], cwd=REPO,
                          capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(other), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0 and proc.stdout.strip() == "another project", proc.stderr


@needs_checkout
@pytest.mark.requires("setuptools")
def test_wheel_has_no_top_level_kernels_or_probes(tmp_path):
    """The wheel maps kernels/, probes/ and apps/ into steer/ (pyproject's package-dir)."""
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), str(REPO)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = tmp_path.glob("steer-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if ".dist-info/" not in n}
    assert tops == {"steer"}, f"top-level names besides steer in {wheel.name}: {tops}"
    for name in ("steer/kernels/router.py", "steer/kernels/_act_triton.py", "steer/probes/lynx.py",
                 "steer/apps/explorer.py", "steer/apps/pages/experts.py", "steer/schema/intervention-config.v1.json", "steer/data/prompts/questions_en.txt"):
        assert name in names, f"{name} missing from {wheel.name}"
    assert not any(n.endswith(("kernels/__init__.py", "probes/__init__.py")) for n in names)
    meta = zipfile.ZipFile(wheel)
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    text = meta.read(entry).decode()
    assert "steer.serving.vllm_plugin:register" in text and "steer.cli:main" in text
