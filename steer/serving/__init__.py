"""Serving: apply a steer intervention config inside a real inference engine.

`steer.serving.vllm_plugin` is a vLLM general plugin (entry point `vllm.general_plugins`, installed
with steer): give vLLM a config with `hf_overrides={"steer_config": path}` (or env STEER_CONFIG)
and it switches experts exactly as steer's HF path does, and can record DiFR fingerprints of every
generated token for `steer verify`. Fingerprint files are written per request by the engine and
assembled here, on the client, with the token ids the response carried: read from the engine's
directory (`served_fingerprints`), or over HTTP from the OpenAI-compatible server itself
(`vllm serve ... --middleware steer.serving.fingerprint_route`, then `fetch_fingerprints`).
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import numpy as np
import torch

FINGERPRINT_KEY = "steer_fingerprint"  # SamplingParams.extra_args key naming a request's fingerprint file
FINGERPRINT_ROUTE = "/steer/fingerprints/"  # GET <server>/steer/fingerprints/KEY (fingerprint_route)
ENV_FINGERPRINT_DIR = "STEER_FINGERPRINT_DIR"


def fingerprint_paths(directory: str | Path, key: str) -> tuple[Path, Path]:
    """(metadata .json, raw fp16 rows .f16) of one request's fingerprints."""
    if not key or "/" in key or key.startswith("."):
        raise ValueError(f"fingerprint key {key!r} must be a plain file name (letters, digits, - and _)")
    d = Path(directory)
    return d / f"{key}.json", d / f"{key}.f16"


def served_fingerprints(directory: str | Path, key: str, prompt_ids: list[int], output_ids: list[int], *,
                        model_id: str | None = None):
    """The steer.difr.Fingerprints of one served request (what `steer verify` checks).

    The engine wrote one fp16 row per generated token; the client supplies the prompt and output
    ids it sent and received, so a mismatch in counts (a dropped or extra step) is an error. The
    claim names the model as the engine saw it (its model_type) unless `model_id` is given (use the
    name `steer verify --model` will load), and the served config by its digest.
    """
    meta_path, rows_path = fingerprint_paths(directory, key)
    if not meta_path.is_file() or not rows_path.is_file():
        raise FileNotFoundError(f"no fingerprints for request {key!r} in {directory}: was the engine started with "
                                f"the steer plugin, a config with a difr section and STEER_FINGERPRINT_DIR={directory}?")
    return _claim(json.loads(meta_path.read_text()), rows_path.read_bytes(), key, prompt_ids, output_ids, model_id,
                  where=str(rows_path))


def fetch_fingerprints(base_url: str, key: str, prompt_ids: list[int], output_ids: list[int], *,
                       model_id: str | None = None, timeout: float = 30.0):
    """`served_fingerprints` over HTTP: the claim of request `key` from a vLLM OpenAI-compatible server
    started with `--middleware steer.serving.fingerprint_route` (same checks on counts and prompt)."""
    import urllib.error
    import urllib.request

    fingerprint_paths(".", key)  # the same key rules as the engine
    url = base_url.rstrip("/") + FINGERPRINT_ROUTE + key
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            doc = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")[:500]
        raise FileNotFoundError(f"{url}: HTTP {exc.code}: {detail}") from None
    return _claim(doc["meta"], base64.b64decode(doc["rows"]), key, prompt_ids, output_ids, model_id, where=url)


def _claim(meta: dict, raw_bytes: bytes, key: str, prompt_ids: list[int], output_ids: list[int],
           model_id: str | None, where: str):
    from steer.difr import DiFRConfig, Fingerprints

    k = int(meta["k"])
    raw = np.frombuffer(raw_bytes, dtype=np.float16)
    if raw.size % k:
        raise ValueError(f"{where} holds {raw.size} values, not a multiple of k={k}: the file is truncated")
    values = torch.from_numpy(raw.copy()).view(-1, k)
    if values.shape[0] != len(output_ids):
        raise ValueError(f"the engine fingerprinted {values.shape[0]} steps but the response has {len(output_ids)} "
                         f"output tokens; fingerprints and tokens must come from the same request")
    if list(meta["prompt_ids"]) != list(prompt_ids):
        raise ValueError(f"request {key!r}: the prompt ids the engine saw differ from the ones given here")
    return Fingerprints(
        values=values, prompt_ids=torch.tensor(prompt_ids, dtype=torch.int64),
        prompt_lengths=torch.tensor([len(prompt_ids)], dtype=torch.int64),
        output_ids=torch.tensor(output_ids, dtype=torch.int64),
        output_lengths=torch.tensor([len(output_ids)], dtype=torch.int64),
        model_id=model_id or meta["model_id"], config_hash=meta["config_hash"],
        config=DiFRConfig(k=k, seed=int(meta["seed"]), projection=meta["projection"]), dtype=meta["dtype"],
        intervention=meta.get("intervention") or None,
    )


async def fingerprint_route(request, call_next):
    """HTTP middleware for vLLM's OpenAI-compatible server (`vllm serve ... --middleware
    steer.serving.fingerprint_route`): `GET /steer/fingerprints/KEY` returns the fingerprints the
    engine filed for the request sent with `vllm_xargs={"steer_fingerprint": KEY}`, so a remote
    client can verify what the server ran. Other paths pass through untouched."""
    path = request.url.path
    if not path.startswith(FINGERPRINT_ROUTE):
        return await call_next(request)
    from starlette.responses import JSONResponse

    if request.method != "GET":
        return JSONResponse({"error": f"{path}: only GET is supported"}, status_code=405)
    directory = os.environ.get(ENV_FINGERPRINT_DIR)
    if not directory:
        return JSONResponse({"error": f"the server was started without {ENV_FINGERPRINT_DIR}: no fingerprints are "
                                      f"recorded"}, status_code=503)
    key = path[len(FINGERPRINT_ROUTE):]
    try:
        meta_path, rows_path = fingerprint_paths(directory, key)
    except ValueError as exc:
        return JSONResponse({"error": str(exc)}, status_code=400)
    if not meta_path.is_file() or not rows_path.is_file():
        return JSONResponse({"error": f"no fingerprints for request {key!r}: send it with "
                                      f"vllm_xargs={{\"{FINGERPRINT_KEY}\": \"{key}\"}}"}, status_code=404)
    return JSONResponse({"meta": json.loads(meta_path.read_text()),
                         "rows": base64.b64encode(rows_path.read_bytes()).decode("ascii")})
