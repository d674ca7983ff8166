"""Serving: apply a steer intervention config inside a real inference engine.

`steer.serving.vllm_plugin` is a vLLM general plugin (entry point `vllm.general_plugins`, installed
with steer): give vLLM a config with `hf_overrides={"steer_config": path}` (or env STEER_CONFIG)
and it switches experts exactly as steer's HF path does, and can record DiFR fingerprints of every
generated token for `steer verify`. Fingerprint files are written per request by the engine and
assembled here, on the client, with the token ids the response carried.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

FINGERPRINT_KEY = "steer_fingerprint"  # SamplingParams.extra_args key naming a request's fingerprint file


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
    from steer.difr import DiFRConfig, Fingerprints

    meta_path, rows_path = fingerprint_paths(directory, key)
    if not meta_path.is_file() or not rows_path.is_file():
        raise FileNotFoundError(f"no fingerprints for request {key!r} in {directory}: was the engine started with "
                                f"the steer plugin, a config with a difr section and STEER_FINGERPRINT_DIR={directory}?")
    meta = json.loads(meta_path.read_text())
    k = int(meta["k"])
    raw = np.frombuffer(rows_path.read_bytes(), dtype=np.float16)
    if raw.size % k:
        raise ValueError(f"{rows_path} holds {raw.size} values, not a multiple of k={k}: the file is truncated")
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
