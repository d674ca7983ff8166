"""docs/serving.md's round trip, run as written: `steer profile` -> `steer config build/validate/show`
-> `steer export --target vllm` -> vLLM's OpenAI-compatible server with steer's plugin, fingerprint
processor and HTTP route -> a client asks and fetches fingerprints -> `steer verify` (VERIFIED).

Runs in the vLLM venv (.ci/vllm.sh); skipped where vLLM is not installed. The model is a tiny
Qwen2-MoE checkpoint (vLLM's CPU attention needs head_dim >= 32), so the block's commands are the
documented ones with MODEL, PORT and QUESTION set; the whole block is extracted from the page
between its round-trip markers, so the page cannot drift from what is tested.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed here; .ci/vllm.sh runs this file in its own venv")

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "serving.md"
TIMEOUT = 1800


def documented_round_trip() -> str:
    """The bash block of docs/serving.md between <!-- round-trip:begin --> and <!-- round-trip:end -->."""
    text = DOC.read_text()
    m = re.search(r"<!-- round-trip:begin -->\s*```bash\n(.*?)```\s*<!-- round-trip:end -->", text, re.S)
    assert m, f"{DOC} has no round-trip block"
    return m.group(1)


def run_round_trip(workdir: Path, model: Path, question: str) -> subprocess.CompletedProcess:
    """The one place that runs the documented sequence (server start, client, verification); the key
    handshake of step 5 lives in the page's client snippet."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    bin_dir = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "MODEL": str(model),
        "PORT": str(port),
        "QUESTION": question,
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "VLLM_CPU_KVCACHE_SPACE": "1",
    }
    script = workdir / "round_trip.sh"
    script.write_text(documented_round_trip())
    return subprocess.run(
        ["bash", str(script)], cwd=workdir, env=env, capture_output=True, text=True, timeout=TIMEOUT
    )


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    from steer.tiny import tiny_model, tiny_tokenizer

    d = tmp_path_factory.mktemp("tiny_qwen2_moe")
    tiny_model(
        "qwen2_moe", num_attention_heads=1, num_key_value_heads=1, head_dim=64, max_position_embeddings=2048
    ).save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


@pytest.mark.slow
def test_documented_round_trip(tiny_ckpt, tmp_path):
    proc = run_round_trip(tmp_path, tiny_ckpt, "Quelle est la capitale de la France ?")
    log = (tmp_path / "server.log").read_text()[-4000:] if (tmp_path / "server.log").exists() else ""
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}\n--- server.log\n{log}"
    out = proc.stdout
    assert "answer:" in out and "VERIFIED:" in out, out
    assert "mote: off_mask" in out and "difr: k 8, seed 0" in out  # `steer config show cfg`
    for name in (
        "runs/fr/profile.safetensors",
        "cfg/config.json",
        "served/vllm_args.json",
        "question.safetensors",
        "cal.safetensors",
    ):
        assert (tmp_path / name).is_file(), name

    from steer.config import InterventionConfig
    from steer.difr import Fingerprints
    from steer.difr.fingerprint import intervention_digest

    served = InterventionConfig.load(tmp_path / "served")
    assert served.mote.experts and served.difr is not None
    claim = Fingerprints.load(tmp_path / "question.safetensors")
    assert claim.intervention == intervention_digest(tmp_path / "served")  # the server named what it ran

    steer = [sys.executable, "-m", "steer"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    # the same claim checked without the config it names is refused, not silently passed
    no_cfg = subprocess.run(
        steer
        + ["verify", "question.safetensors", "--calibration", "cal.safetensors", "--model", str(tiny_ckpt)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert no_cfg.returncode == 2 and "claim intervention config" in no_cfg.stderr, no_cfg.stderr[-2000:]
