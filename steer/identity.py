"""Which model a saved result belongs to: a cheap identity (config + a few weight checksums).

Results computed on one model (an expert profile, a steering vector, a fingerprint) are meaningless
on another. Saving `model_identity(model)` next to them and calling `check_same_model` before use
turns a silent wrong answer into an error that says which field differs.

The hash reads the config (minus runtime-only keys) and a strided sample of a few named tensors
(embeddings, final norm, lm_head, every router), so it costs milliseconds even for large models,
and any retraining, requantisation or expert surgery changes it. `steer.models.LoadedModel` also
carries `weights_hash` (sha256 of the weight files); when known it is stored too.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from torch import nn

from steer.adapters import model_map

# Config keys that change how a model runs here, not what it computes.
_RUNTIME_KEYS = {
    "_attn_implementation", "_attn_implementation_autoset", "_attn_implementation_internal", "transformers_version",
    "torch_dtype", "dtype", "use_cache", "_name_or_path", "name_or_path", "_commit_hash", "output_attentions",
    "output_hidden_states", "return_dict", "architectures", "quantization_config", "_experts_implementation",
    "experts_implementation", "num_experts_per_tok", "tie_word_embeddings_autoset",
}
_SAMPLE = 4096  # elements read per hashed tensor


class ModelMismatchError(ValueError):
    """A result saved from one model was applied to a different one."""


def _config_hash(config) -> str:
    d = config.to_dict()
    d = {k: v for k, v in d.items() if k not in _RUNTIME_KEYS}
    blob = json.dumps(d, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _tensor_sample(t: torch.Tensor) -> bytes:
    flat = t.detach().reshape(-1)
    step = max(1, flat.numel() // _SAMPLE)
    return flat[::step][:_SAMPLE].float().cpu().numpy().tobytes()


def params_hash(model: nn.Module) -> str:
    """Checksum of a strided sample of the identifying tensors (embeddings, norms, head, routers)."""
    mm = model_map(model)
    a = mm.adapter
    names = [a.embed, a.final_norm, a.lm_head]
    names += [f"{a.layers}.{i}.{a.router}" for i in mm.moe_layers]
    if not mm.moe_layers:  # dense: sample the first and last MLP too
        names += [f"{a.layers}.0.{a.mlp}", f"{a.layers}.{mm.n_layers - 1}.{a.mlp}"]
    digest = hashlib.sha256()
    for name in names:
        try:
            module = mm.module(name)
        except (AttributeError, IndexError):
            continue
        for pname, p in sorted(module.named_parameters(), key=lambda x: x[0]):
            digest.update(f"{name}.{pname}:{tuple(p.shape)}".encode())
            digest.update(_tensor_sample(p))
        for bname, b in sorted(module.named_buffers(), key=lambda x: x[0]):
            if b.is_floating_point():
                digest.update(f"{name}.{bname}:{tuple(b.shape)}".encode())
                digest.update(_tensor_sample(b))
    return digest.hexdigest()[:16]


def model_identity(model: Any, weights_hash: str | None = None) -> dict:
    """A JSON-able identity: family, layer/expert layout, config hash, parameter checksum.

    `model` may be an HF model, a `steer.models.LoadedModel` (its weights_hash is used), or anything
    `steer.hooks.unwrap_model` accepts.
    """
    from steer.hooks import unwrap_model

    if weights_hash is None:
        weights_hash = getattr(model, "weights_hash", None)
    if hasattr(model, "model") and hasattr(model, "tokenizer") and not isinstance(model, nn.Module):
        model = model.model
    hf = unwrap_model(model)
    mm = model_map(hf)
    ident = {
        "family": mm.adapter.family,
        "model_type": hf.config.model_type,
        "n_layers": mm.n_layers,
        "d_model": mm.d_model,
        "moe_layers": list(mm.moe_layers),
        "num_experts": mm.num_experts,
        "top_k": mm.top_k,
        "config_hash": _config_hash(hf.config),
        "params_hash": params_hash(hf),
    }
    if weights_hash:
        ident["weights_hash"] = str(weights_hash)
    return ident


# Fields whose difference makes a saved result inapplicable. top_k is excluded: the same weights run
# with a different number of active experts are the same experts (a profile still names them).
_MUST_MATCH = ("family", "n_layers", "d_model", "moe_layers", "num_experts", "config_hash", "params_hash")


def check_same_model(saved: dict, current: dict, what: str = "this result") -> None:
    """Raise ModelMismatchError naming the fields that differ between two identities."""
    diffs = []
    for key in _MUST_MATCH:
        if key in saved and key in current and saved[key] != current[key]:
            diffs.append(f"{key}: saved {saved[key]!r}, model {current[key]!r}")
    if saved.get("weights_hash") and current.get("weights_hash") and saved["weights_hash"] != current["weights_hash"]:
        diffs.append(f"weights_hash: saved {saved['weights_hash']!r}, model {current['weights_hash']!r}")
    if diffs:
        raise ModelMismatchError(
            f"{what} was computed on a different model ({'; '.join(diffs)}). Recompute it on this model "
            f"(e.g. `steer profile --model ...`) or load the model it was made from."
        )
