"""Which model a saved result belongs to: a cheap identity (config + a few weight checksums).

Results computed on one model (an expert profile, a steering vector, a fingerprint) are meaningless
on another. Saving `model_identity(model)` next to them and calling `check_same_model` before use
turns a silent wrong answer into an error that says which field differs.

The hash reads the config (minus runtime-only keys) and a strided sample of a few named tensors
(embeddings, final norm, lm_head, every router), so it costs milliseconds even for large models,
and any retraining, requantisation or expert surgery changes it. `steer.models.LoadedModel` also
carries `weights_hash` (sha256 of the weight files); when known it is stored too.

Every identity names its `scheme` (SCHEME): how its config hash was computed. Files written before
schemes existed carry none and read as SCHEME; fingerprint claims written by DiFR's old format carry
the hash of its own key set, scheme "steer.difr/1". To compare a saved identity with a model, compute
the model's identity in the saved scheme (`check_model`, `model_identity(..., scheme=)`); an identity
of an unknown (newer) scheme is an error that says so, never a silent mismatch.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from torch import nn

from steer.adapters import UnsupportedModelError, model_map

# Config keys that change how a model runs here, not what it computes.
_RUNTIME_KEYS = {
    "_attn_implementation", "_attn_implementation_autoset", "_attn_implementation_internal", "transformers_version",
    "torch_dtype", "dtype", "use_cache", "_name_or_path", "name_or_path", "_commit_hash", "output_attentions",
    "output_hidden_states", "return_dict", "architectures", "quantization_config", "_experts_implementation",
    "experts_implementation", "num_experts_per_tok", "tie_word_embeddings_autoset",
}
# DiFR's fingerprint files of format 1 hashed the config by this rule instead (kept to read them).
_DIFR_V1_VOLATILE = {
    "dtype", "torch_dtype", "transformers_version", "use_cache", "return_dict", "output_hidden_states",
    "output_attentions", "attn_implementation", "name_or_path", "architectures", "quantization_config",
}
_SAMPLE = 4096  # elements read per hashed tensor

SCHEME = "steer.identity/1"  # the identity every result and config saves
LEGACY_DIFR = "steer.difr/1"  # config hash only: DiFR claims and calibrations of their format 1
SCHEMES = (SCHEME, LEGACY_DIFR)


class ModelMismatchError(ValueError):
    """A result saved from one model was applied to a different one."""


class IdentitySchemeError(ValueError):
    """A saved identity names a scheme this steer does not know (written by a newer steer)."""


def scheme_of(identity: dict) -> str:
    """The identity's scheme (identities saved before schemes existed are SCHEME); raises
    IdentitySchemeError for an unknown one."""
    scheme = identity.get("scheme", SCHEME)
    if scheme not in SCHEMES:
        raise IdentitySchemeError(
            f"the saved model identity uses scheme {scheme!r}, which this steer does not know (it knows "
            f"{', '.join(SCHEMES)}): it was written by a newer steer; upgrade steer to read it")
    return scheme


def config_hash(config, scheme: str = SCHEME) -> str:
    """Hash of the config fields that define what a model computes (not paths, dtype or kernels).

    `config`: an HF config or anything with `.config`; `scheme`: SCHEME, or LEGACY_DIFR to check
    an old DiFR claim."""
    config = getattr(config, "config", config)
    d = config.to_dict()
    if scheme_of({"scheme": scheme}) == LEGACY_DIFR:
        d = {k: v for k, v in d.items() if not k.startswith("_") and k not in _DIFR_V1_VOLATILE}
    else:
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


def config_identity(config) -> dict:
    """The part of an identity a config alone gives (a model of a family without an adapter, or a
    server that has only the checkpoint's config)."""
    config = getattr(config, "config", config)
    text = getattr(config, "text_config", None) or config
    return {"scheme": SCHEME, "model_type": text.model_type, "config_hash": config_hash(config)}


def model_identity(model: Any, weights_hash: str | None = None, scheme: str = SCHEME,
                   any_family: bool = False) -> dict:
    """A JSON-able identity: scheme, family, layer/expert layout, config hash, parameter checksum.

    `model` may be an HF model, a `steer.models.LoadedModel` (its weights_hash is used), or anything
    `steer.hooks.unwrap_model` accepts. `scheme` LEGACY_DIFR gives only what such claims saved.
    `any_family`: a model of a family without an adapter gets its `config_identity` (DiFR runs on any
    causal LM) instead of an UnsupportedModelError.
    """
    from steer.hooks import unwrap_model

    if weights_hash is None:
        weights_hash = getattr(model, "weights_hash", None)
    if hasattr(model, "model") and hasattr(model, "tokenizer") and not isinstance(model, nn.Module):
        model = model.model
    hf = unwrap_model(model)
    if scheme_of({"scheme": scheme}) == LEGACY_DIFR:
        return {"scheme": scheme, "config_hash": config_hash(hf.config, scheme)}
    try:
        mm = model_map(hf)
    except UnsupportedModelError:
        if not any_family:
            raise
        return config_identity(hf.config)
    ident = {
        "scheme": scheme,
        "family": mm.adapter.family,
        "model_type": hf.config.model_type,
        "n_layers": mm.n_layers,
        "d_model": mm.d_model,
        "moe_layers": list(mm.moe_layers),
        "num_experts": mm.num_experts,
        "top_k": mm.top_k,
        "config_hash": config_hash(hf.config),
        "params_hash": params_hash(hf),
    }
    if weights_hash:
        ident["weights_hash"] = str(weights_hash)
    return ident


# Fields whose difference makes a saved result inapplicable. top_k is excluded: the same weights run
# with a different number of active experts are the same experts (a profile still names them).
MUST_MATCH = ("family", "n_layers", "d_model", "moe_layers", "num_experts", "config_hash", "params_hash",
              "weights_hash")
# What a DiFR claim must match: the computation (top_k included), not the weights: the fingerprints
# themselves test the weights, and a verifier may run another dtype than the provider (params_hash
# samples the weights in the model's dtype).
COMPUTATION = ("family", "n_layers", "d_model", "moe_layers", "num_experts", "top_k", "config_hash")


def differences(saved: dict, current: dict, keys: tuple[str, ...] = MUST_MATCH) -> list[tuple[str, Any, Any]]:
    """(field, saved, current) for each of `keys` that both identities have and that differ.

    Both must be of the same scheme (compute the current one with `model_identity(..., scheme=
    scheme_of(saved))`); comparing across schemes raises IdentitySchemeError instead of reporting a
    config_hash difference that only reflects the hashing rule."""
    s, c = scheme_of(saved), scheme_of(current)
    if s != c:
        raise IdentitySchemeError(
            f"cannot compare a model identity of scheme {s!r} with one of {c!r}: compute the model's identity in "
            f"the saved scheme (steer.identity.check_model or model_identity(model, scheme={s!r}))")
    return [(k, saved[k], current[k]) for k in keys
            if saved.get(k) is not None and current.get(k) is not None and saved[k] != current[k]]


RECOMPUTE = "Recompute it on this model (e.g. `steer profile --model ...`) or load the model it was made from"


def check_same_model(saved: dict, current: dict, what: str = "this result",
                     keys: tuple[str, ...] = MUST_MATCH, fix: str = RECOMPUTE) -> None:
    """Raise ModelMismatchError naming the fields that differ between two identities, and `fix`."""
    diffs = [f"{k}: saved {a!r}, model {b!r}" for k, a, b in differences(saved, current, keys)]
    if diffs:
        raise ModelMismatchError(f"{what} was computed on a different model ({'; '.join(diffs)}). {fix}.")


def check_model(saved: dict, model: Any, what: str = "this result", keys: tuple[str, ...] = MUST_MATCH,
                any_family: bool = False, fix: str = RECOMPUTE) -> None:
    """check_same_model against `model`'s identity computed in the saved identity's scheme."""
    current = model_identity(model, scheme=scheme_of(saved), any_family=any_family)
    check_same_model(saved, current, what, keys, fix)
