"""Our top-level `kernels` package shares its name with Hugging Face's `kernels` (hub kernels).

transformers decides whether HF kernels are usable with `is_kernels_available()`: find_spec('kernels')
plus the version of the distribution that ships it, which for our package is *steer's* version. While
that version is below transformers' KERNELS_MIN_VERSION the check is False and transformers falls back
to its plain PyTorch layers; these tests make sure that stays so, that models whose layers carry
`@use_kernel_forward_from_hub` still run, and that `import kernels` gives ours.

Checks run in a fresh interpreter (from a directory outside the repo) so no earlier import in the
test session can hide a failure of `import transformers` itself.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

PROBE = r"""
import importlib.util, json
import torch
import kernels
out = {"kernels_file": kernels.__file__, "spec_origin": importlib.util.find_spec("kernels").origin}

import transformers
from transformers.utils import import_utils as iu
out["available"] = iu.is_kernels_available()
out["seen"] = list(iu._is_package_available("kernels", return_version=True))
out["min_version"] = iu.KERNELS_MIN_VERSION
from transformers.integrations import hub_kernels, use_kernel_forward_from_hub
out["hub_imports_hf_kernels"] = hasattr(hub_kernels, "_kernels_kernelize")

class Probe(torch.nn.Module):
    pass
out["decorator_is_identity"] = use_kernel_forward_from_hub("RMSNorm")(Probe) is Probe

from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP, GptOssRMSNorm
out["no_hub_layer_names"] = not any(hasattr(c, "kernel_layer_name") for c in (LlamaRMSNorm, GptOssRMSNorm, GptOssMLP))

from steer.tiny import tiny_model
torch.manual_seed(0)
ids = torch.randint(3, 256, (2, 7))
for family in ("llama", "gpt_oss"):
    model = tiny_model(family)
    with torch.no_grad():
        logits = model(ids).logits
        norm = model.model.norm
        x = torch.randn(2, 7, 64)
        ref = norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon))
        out[family] = {"shape": list(logits.shape), "finite": bool(torch.isfinite(logits).all()),
                       "norm_err": float((norm(x) - ref).abs().max())}
try:
    model.set_use_kernels(True)
    out["use_kernels"] = "accepted"
except Exception as exc:
    out["use_kernels"] = f"{type(exc).__name__}: {exc}"
print("PROBE" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> dict:
    cwd = tmp_path_factory.mktemp("elsewhere")  # not the repo root: `kernels` must resolve via the install
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"fresh interpreter failed:\n{proc.stderr[-3000:]}"
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("PROBE"))
    return json.loads(line.removeprefix("PROBE"))


def test_import_kernels_gives_ours(probe):
    ours = REPO / "kernels" / "__init__.py"
    assert Path(probe["kernels_file"]).resolve() == ours.resolve()
    assert Path(probe["spec_origin"]).resolve() == ours.resolve()


def test_transformers_does_not_take_ours_for_hf_kernels(probe):
    from packaging.version import Version

    assert probe["available"] is False and probe["hub_imports_hf_kernels"] is False
    exists, version = probe["seen"]
    if exists and version != "N/A":
        assert Version(version) < Version(probe["min_version"]), (
            f"transformers reads {version} (steer's distribution version) as the version of `kernels`; "
            f"from {probe['min_version']} on it would import HF-kernels names from our package and fail. "
            "Keep steer's version below it or stop installing `kernels` as a top-level package."
        )


def test_hub_kernel_layers_run_plain_pytorch(probe):
    assert probe["decorator_is_identity"] and probe["no_hub_layer_names"]
    for family in ("llama", "gpt_oss"):
        assert probe[family]["shape"] == [2, 7, 256] and probe[family]["finite"]
        assert probe[family]["norm_err"] < 1e-6  # the RMSNorm that ran is the PyTorch one


def test_asking_for_hub_kernels_fails_cleanly(probe):
    # use_kernels=True must be refused by transformers' own check, not crash inside our package
    assert probe["use_kernels"].startswith("ValueError: Kernels are not available"), probe["use_kernels"]


def test_in_this_process_too():
    from transformers.utils.import_utils import is_kernels_available

    import kernels

    assert Path(kernels.__file__).resolve().parent == (REPO / "kernels").resolve()
    assert is_kernels_available() is False
