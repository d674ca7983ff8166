"""Saved results: one file convention, one reader, one writer, for every result steer writes.

A tensor result is one safetensors file whose header metadata holds (all strings, as safetensors
requires):

    format     the result kind, e.g. "steer.ftri.Profile" (FORMATS lists every kind)
    version    integer, bumped when the layout changes; a reader takes its own and older versions
    steer      JSON: the result's own fields (parameters, labels, ...)
    identity   JSON: steer.identity.model_identity of the model it was computed on (when it has one)
    checksum   sha256 of the tensors: a truncated or altered file is an error, not a wrong answer

A result without tensors (an ACT config) is one JSON file with the same `format`, `version` and
`identity` keys beside its fields. `load_tensors` / `load_json` return a `Stored` with the version
the file was written in, so each result's loader reads older layouts explicitly; files of a newer
version, of another kind, or without a tag are errors that name the problem and the fix.

Files written before this module existed carry their kind in older ways (a "format" tag with a
"/N" suffix, or a "format" field inside the "steer" JSON); they read as that version of the kind.
`load(path)` opens any steer result file as its result object.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class Format:
    """One kind of saved result: its tag, current version, what to call it, and who loads it."""

    name: str
    version: int
    what: str
    loader: str  # "module:Class.method" that reads a path of this kind
    make: str  # how to create one (named in errors)


PROFILE = Format("steer.ftri.Profile", 2, "expert profile", "steer.ftri:Profile.load", "`steer profile --out DIR`")
SINKS = Format("steer.sinks.SinkResult", 2, "sink result", "steer.sinks:SinkResult.load", "`steer sinks --out DIR`")
ACT_CONFIG = Format("steer.act.ACTConfig", 2, "ACT config", "steer.act:ACTConfig.load", "`steer act-search`")
LYNX_CUES = Format("steer.lynx_cues", 2, "labelled cue file", "steer.probes.data:LabelledCues.load",
                   "`steer probe label`")
LYNX_PROBE = Format("steer.lynx_probe", 2, "LYNX probe", "steer.probes.probe:LynxProbe.load", "`steer probe train`")
FINGERPRINTS = Format("steer.difr.fingerprints", 2, "fingerprint", "steer.difr:Fingerprints.load",
                      "`steer fingerprint`")
CALIBRATION = Format("steer.difr.calibration", 4, "calibration", "steer.difr:Calibration.load",
                     "`steer verify --calibrate`")
# An intervention config is config.json (its own schema, with `format`/`version` and the model identity) plus
# config.safetensors; this kind tags the tensor file, and `load` opens the directory as an InterventionConfig.
INTERVENTION_CONFIG = Format("steer.intervention-config", 1, "intervention config",
                             "steer.config:InterventionConfig.load",
                             "`steer config build`, `steer switch --save-config` or InterventionConfig.save")
FORMATS = {f.name: f for f in (PROFILE, SINKS, ACT_CONFIG, LYNX_CUES, LYNX_PROBE, FINGERPRINTS, CALIBRATION,
                               INTERVENTION_CONFIG)}


class FormatError(ValueError):
    """A file is not the result asked for: missing, unreadable, another kind, or corrupt."""


class NewerFormatError(FormatError):
    """A file was written by a newer steer, in a version of its format this one cannot read."""


@dataclass
class Stored:
    """What a steer file holds: tensors, the result's fields, its model identity, its version."""

    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]
    identity: dict | None
    version: int
    path: Path
    header: dict[str, str] = field(default_factory=dict, repr=False)  # the raw metadata (older layouts)


def checksum(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the tensors' names and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())  # 0-dim too
    return h.hexdigest()


def save_tensors(path: str | Path, fmt: Format, tensors: dict[str, torch.Tensor], meta: dict | None = None,
                 identity: dict | None = None) -> Path:
    """Write `tensors` with the kind's tag, version, `meta`, `identity` and a checksum; returns the path."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    header = {"format": fmt.name, "version": str(fmt.version), "steer": json.dumps(meta or {}, default=_default),
              "checksum": checksum(tensors)}
    if identity is not None:
        header["identity"] = json.dumps(identity, default=_default)
    save_file(tensors, str(path), metadata=header)
    return path


def load_tensors(path: str | Path, fmt: Format, untagged: int | None = None) -> Stored:
    """Read a file of kind `fmt` (any version up to the current one). `untagged`: the version to read
    a file without a format tag as (results saved before they had one), None if such files are errors."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{fmt.what} file {path} does not exist; create one with {fmt.make}")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own (Rust) error types for bad headers and sizes
        raise FormatError(f"{path} is not a readable {fmt.what} file (truncated or corrupt?): {exc}") from None
    name, version, meta = _tag(header)
    if name is None and untagged is not None:
        name, version, meta = fmt.name, untagged, dict(header)
    _check_kind(path, fmt, name, version)
    if "checksum" in header and header["checksum"] != checksum(tensors):
        raise FormatError(f"{path} is corrupt: its checksum does not match its contents; regenerate it with {fmt.make}")
    identity = json.loads(header["identity"]) if header.get("identity") else None
    return Stored(tensors, meta, identity, version, path, header)


def save_json(path: str | Path, fmt: Format, doc: dict, identity: dict | None = None) -> Path:
    """Write `doc` as JSON with the kind's tag, version and `identity` first; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json_doc(fmt, doc, identity), indent=2, default=_default) + "\n")
    return path


def load_json(path: str | Path, fmt: Format, untagged: int | None = None) -> Stored:
    """Read a JSON file of kind `fmt`. `untagged`: the version to read a file without a format tag
    as (results saved before they had one), None if such files are errors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{fmt.what} file {path} does not exist; create one with {fmt.make}")
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FormatError(f"{path} is not a readable {fmt.what} file (not JSON: {exc})") from None
    return read_doc(doc, fmt, path, untagged)


def read_doc(doc: Any, fmt: Format, where: str | Path = "<json>", untagged: int | None = None) -> Stored:
    """`load_json` of an already parsed JSON document (`where` names it in errors)."""
    where = Path(where)
    if not isinstance(doc, dict):
        raise FormatError(f"{where} is not {_a(fmt.what)} file (a JSON {type(doc).__name__}, not an object)")
    if "format" not in doc and untagged is not None:
        name, version = fmt.name, untagged
    else:
        name, version = _split_tag(doc.get("format"), doc.get("version"))
    _check_kind(where, fmt, name, version)
    meta = {k: v for k, v in doc.items() if k not in ("format", "version", "identity")}
    return Stored({}, meta, doc.get("identity"), version, where, {})


def json_doc(fmt: Format, doc: dict, identity: dict | None = None) -> dict:
    """`doc` with the kind's tag, version and `identity` first (what `save_json` writes)."""
    head: dict[str, Any] = {"format": fmt.name, "version": fmt.version}
    if identity is not None:
        head["identity"] = identity
    return {**head, **doc}


def load(path: str | Path):
    """Open any steer result file (or a result's directory) as its result object, by its format tag."""
    path = _result_file(Path(path))
    name = _kind_of(path)
    fmt = FORMATS.get(name)
    if fmt is None:
        raise FormatError(f"{path} holds {name!r}, which is not a steer result kind ({', '.join(FORMATS)})")
    module, attr = fmt.loader.split(":")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj(path)


# ---- tags -----------------------------------------------------------------------------------------

def _tag(header: dict[str, str]) -> tuple[str | None, int | None, dict]:
    """(kind, version, fields) of a safetensors header in the current or an older layout."""
    try:
        inner = json.loads(header["steer"]) if "steer" in header else None
    except json.JSONDecodeError:
        inner = None
    if "format" in header:  # current ("format" + "version"), or older "name/N" tags
        name, version = _split_tag(header["format"], header.get("version"))
        if inner is None:  # older DiFR files: the fields are the header's own strings
            inner = {k: v for k, v in header.items() if k not in ("format", "version", "checksum", "identity")}
        return name, version, inner
    if isinstance(inner, dict) and "format" in inner:  # older profiles: the tag inside the "steer" JSON
        name, version = _split_tag(inner["format"], inner.get("version"))
        return name, version, inner
    return None, None, inner or {}


def _split_tag(tag: Any, version: Any) -> tuple[str | None, int | None]:
    if not isinstance(tag, str):
        return None, None
    if version is None and "/" in tag:
        tag, _, version = tag.rpartition("/")
    try:
        return tag, int(version) if version is not None else 1
    except (TypeError, ValueError):
        return tag, None


def _a(what: str) -> str:
    return f"{'an' if what[0].lower() in 'aeiou' else 'a'} {what}"


def _check_kind(path: Path, fmt: Format, name: str | None, version: int | None) -> None:
    if name is None:
        raise FormatError(f"{path} is not {_a(fmt.what)} file (it carries no steer format tag); create one with "
                          f"{fmt.make}")
    if name != fmt.name:
        other = FORMATS.get(name)
        hint = f"it is {_a(other.what)} file (open it with {other.loader.replace(':', '.')})" if other else \
            f"it holds {name!r}"
        raise FormatError(f"{path} is not {_a(fmt.what)} file: {hint}")
    if version is None or version < 1:
        raise FormatError(f"{path}: unreadable {fmt.name} version tag; regenerate it with {fmt.make}")
    if version > fmt.version:
        raise NewerFormatError(
            f"{path} is {_a(fmt.what)} file of version {version}, written by a newer steer; this steer reads "
            f"{fmt.name} up to version {fmt.version}: upgrade steer (pip install -U steer) or regenerate it")


_RESULT_FILES = ("profile.safetensors", "sinks.safetensors", "probe.json", "config.json")  # what the CLI writes


def _result_file(path: Path) -> Path:
    if not path.is_dir():
        return path
    for inner in _RESULT_FILES:
        if (path / inner).is_file():
            return path / inner
    raise FormatError(f"{path} holds no steer result ({', '.join(_RESULT_FILES)})")


def _kind_of(path: Path) -> str | None:
    """The format tag of a result file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    if path.suffix == ".json":
        try:
            doc = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise FormatError(f"{path} is not a steer result (not JSON: {exc})") from None
        if isinstance(doc, dict) and doc.get("method") == "act" and "format" not in doc:
            return ACT_CONFIG.name  # ACT configs saved before they carried a tag
        return _split_tag(doc.get("format"), doc.get("version"))[0] if isinstance(doc, dict) else None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except Exception as exc:  # safetensors' Rust error type
        raise FormatError(f"{path} is not a readable safetensors file (truncated or corrupt?): {exc}") from None
    name = _tag(header)[0]
    if name is None and {"tokens", "params"} <= set(header):
        return SINKS.name  # sink results saved before they carried a tag
    return name


def _default(x):
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, tuple):
        return list(x)
    return str(x)
