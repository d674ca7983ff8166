"""Fingerprint records on a serving engine's disk: written atomically, never overwritten, kept bounded.

One record per fingerprinted request, under `$STEER_FINGERPRINT_DIR`:

    KEY.f16.part   while the request decodes: one open handle, one fp16 row of k values per step
    KEY.f16        the rows, once the request has left the batch (hard-linked from the .part: never clobbers)
    KEY.json       the claim's metadata + prompt ids + row count, written last: its presence means "complete"
    KEY.error      why the engine could not record the request (the request itself still ran)

A crash mid-request leaves only a `.part`, which no reader accepts (it is removed by retention).
Retention (`STEER_FINGERPRINT_MAX_AGE_S`, `STEER_FINGERPRINT_MAX_BYTES`) is enforced by the writer each
time a record is finished: records older than the age limit go, then the oldest until the directory
holds at most the byte limit (the record just finished is always kept).

Reading over HTTP is guarded by a per-request token, HMAC-SHA256(server secret, key), issued with the
key in the response headers of the request that produced the record (`steer.serving.fingerprint_route`).
The secret is `$STEER_FINGERPRINT_SECRET` or a random one the server creates (mode 0600) in the
directory, so tokens stay valid across restarts. See docs/serving-security.md for the threat model.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

ENV_MAX_AGE = "STEER_FINGERPRINT_MAX_AGE_S"
ENV_MAX_BYTES = "STEER_FINGERPRINT_MAX_BYTES"
ENV_SECRET = "STEER_FINGERPRINT_SECRET"
DEFAULT_MAX_AGE_S = 7 * 24 * 3600.0
DEFAULT_MAX_BYTES = 1 << 30
SECRET_FILE = ".steer-secret"
ENGINE_FILE = ".steer-engine.json"  # what the last engine started on this directory can record
KEY_RE = re.compile(r"[A-Za-z0-9_-]{1,128}")

log = logging.getLogger("steer.serving")


class RecordError(RuntimeError):
    """The engine could not record the request (the reason it filed), or the record is corrupt."""


def check_key(key: object) -> str:
    """`key` if it is a valid record name (1-128 of letters, digits, - and _), else ValueError."""
    if not isinstance(key, str) or not KEY_RE.fullmatch(key):
        raise ValueError(f"fingerprint key {key!r} must be a string of 1-128 letters, digits, '-' and '_'")
    return key


@dataclass(frozen=True)
class RecordPaths:
    meta: Path
    rows: Path
    part: Path
    error: Path

    def exists(self) -> bool:
        return any(p.exists() for p in (self.meta, self.rows, self.part, self.error))


def record_paths(directory: str | Path, key: str) -> RecordPaths:
    d, key = Path(directory), check_key(key)
    return RecordPaths(d / f"{key}.json", d / f"{key}.f16", d / f"{key}.f16.part", d / f"{key}.error")


def _positive_env(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"{name}={raw!r} must be a positive number")
    return value


def retention_from_env() -> tuple[float, int]:
    """(max age in seconds, max bytes) from the environment (ValueError naming a bad variable)."""
    return _positive_env(ENV_MAX_AGE, DEFAULT_MAX_AGE_S), int(_positive_env(ENV_MAX_BYTES, DEFAULT_MAX_BYTES))


def _link_exclusive(src: Path, dst: Path) -> None:
    """Publish `src` as `dst`, failing (FileExistsError) rather than replacing an existing `dst`."""
    os.link(src, dst)
    src.unlink()


@dataclass
class _Open:
    fh: object
    meta: dict
    rows: int = 0


class RecordWriter:
    """The engine side: one per engine process. Never raises on a client's behalf: a request it
    cannot record is logged and, where possible, filed as `KEY.error` (the engine keeps serving)."""

    def __init__(self, directory: str | Path, *, max_age_s: float | None = None, max_bytes: int | None = None):
        env_age, env_bytes = retention_from_env()
        self.directory = Path(directory)
        self.max_age_s = float(max_age_s if max_age_s is not None else env_age)
        self.max_bytes = int(max_bytes if max_bytes is not None else env_bytes)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.open: dict[str, _Open] = {}
        self.finished_here: dict[str, int] = {}  # key -> rows, records this writer finished (for resumes)
        self.index: dict[str, tuple[float, int]] = {}  # finished key -> (finished at, bytes)
        self._scan()

    def _scan(self) -> None:
        """Index finished records already on disk; drop leftovers (.part, .error) past the age limit."""
        now = time.time()
        for p in self.directory.iterdir():
            name = p.name
            if name.startswith(".") or not p.is_file():
                continue
            try:
                st = p.stat()
            except OSError:
                continue
            if name.endswith(".json"):
                key = name[:-5]
                rows = p.with_suffix(".f16")
                size = st.st_size + (rows.stat().st_size if rows.exists() else 0)
                self.index[key] = (st.st_mtime, size)
            elif (name.endswith(".part") or name.endswith(".error")) and now - st.st_mtime > self.max_age_s:
                p.unlink(missing_ok=True)
        self._prune(keep=None)

    def start(self, key: str, meta: dict, *, resume: bool = False) -> bool:
        """Open request `key`'s record (exclusive create). `resume`: the request comes back after a
        preemption; continue the record this writer finished when it left the batch."""
        try:
            paths = record_paths(self.directory, key)
            if key in self.open:
                return True
            if resume and key in self.finished_here:
                # same request, back from preemption: unpublish (metadata first), then append again
                paths.meta.unlink(missing_ok=True)
                os.rename(paths.rows, paths.part)
                self.index.pop(key, None)
                self.open[key] = _Open(open(paths.part, "ab"), meta, self.finished_here.pop(key))
                return True
            if paths.exists():
                log.warning("fingerprint record %r already exists in %s: not recording this request (the "
                            "existing record is kept)", key, self.directory)
                return False
            fd = os.open(paths.part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            self.open[key] = _Open(os.fdopen(fd, "wb"), meta)
            return True
        except (OSError, ValueError) as exc:
            self.fail(key, f"could not open the record: {exc}")
            return False

    def append(self, key: str, data: bytes) -> None:
        rec = self.open.get(key)
        if rec is None:
            return
        try:
            rec.fh.write(data)
            rec.rows += 1
        except OSError as exc:
            self.fail(key, f"could not write a row: {exc}")

    def finish(self, key: str) -> None:
        """Publish the record: rows first, then the metadata (the commit marker); then retention."""
        rec = self.open.pop(key, None)
        if rec is None:
            return
        paths = record_paths(self.directory, key)
        try:
            rec.fh.close()
            _link_exclusive(paths.part, paths.rows)
            meta = {**rec.meta, "key": key, "rows": rec.rows, "finished_at": time.time()}
            tmp = paths.meta.with_name(f".{key}.json.tmp")
            tmp.write_text(json.dumps(meta))
            _link_exclusive(tmp, paths.meta)
        except OSError as exc:
            self.fail(key, f"could not publish the record: {exc}")
            return
        self.finished_here[key] = rec.rows
        while len(self.finished_here) > 4096:
            self.finished_here.pop(next(iter(self.finished_here)))
        self.index[key] = (time.time(), paths.meta.stat().st_size + paths.rows.stat().st_size)
        self._prune(keep=key)

    def fail(self, key: str, reason: str) -> None:
        """Give up on `key`: drop its partial rows and file the reason (never raises)."""
        log.error("fingerprint record %r: %s", key, reason)
        rec = self.open.pop(key, None)
        try:
            if rec is not None:
                rec.fh.close()
            paths = record_paths(self.directory, key)
            paths.part.unlink(missing_ok=True)
            fd = os.open(paths.error, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(reason)
        except (OSError, ValueError):
            pass

    def close(self) -> None:
        for key in list(self.open):
            self.finish(key)

    def _prune(self, keep: str | None) -> None:
        now = time.time()
        total = sum(size for _, size in self.index.values())
        for key, (when, size) in sorted(self.index.items(), key=lambda kv: kv[1][0]):
            if key == keep:
                continue
            if now - when > self.max_age_s or total > self.max_bytes:
                self._delete(key)
                total -= size

    def _delete(self, key: str) -> None:
        self.index.pop(key, None)
        self.finished_here.pop(key, None)
        paths = record_paths(self.directory, key)
        for p in (paths.meta, paths.rows, paths.error):  # metadata first: the record stops being complete
            p.unlink(missing_ok=True)


def read_record(directory: str | Path, key: str) -> tuple[dict, bytes]:
    """(metadata, fp16 row bytes) of a finished record; FileNotFoundError / RecordError saying why not."""
    paths = record_paths(directory, key)
    if not paths.meta.is_file():
        if paths.error.is_file():
            raise RecordError(f"the engine did not record request {key!r}: {paths.error.read_text()[:500]}")
        if paths.part.is_file():
            raise FileNotFoundError(f"request {key!r} is still being generated: fetch its fingerprints after the "
                                    f"response has ended")
        raise FileNotFoundError(f"no fingerprints for request {key!r} in {directory} (never recorded, or removed "
                                f"by retention: {ENV_MAX_AGE}, {ENV_MAX_BYTES})")
    meta = json.loads(paths.meta.read_text())
    raw = paths.rows.read_bytes()
    expected = int(meta["rows"]) * int(meta["k"]) * 2
    if len(raw) != expected:
        raise RecordError(f"record {key!r}: {len(raw)} bytes of rows, expected {expected} ({meta['rows']} rows of "
                          f"k={meta['k']} fp16): the file was altered")
    return meta, raw


# ---------------------------------------------------------------------------------------------
# Tokens: who may read a record over HTTP


def server_secret(directory: str | Path) -> bytes:
    """The HMAC key for tokens: $STEER_FINGERPRINT_SECRET, else DIR/.steer-secret (created once, 0600)."""
    env = os.environ.get(ENV_SECRET)
    if env:
        return env.encode()
    path = Path(directory) / SECRET_FILE
    Path(directory).mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32))
    for _ in range(50):  # another process may be writing it right now
        value = path.read_text().strip()
        if len(value) == 64:
            return value.encode()
        time.sleep(0.01)
    raise RuntimeError(f"{path} does not hold a 64-hex-digit secret; remove it or set {ENV_SECRET}")


def token_for(secret: bytes, key: str) -> str:
    return hmac.new(secret, b"steer-fingerprint:" + key.encode(), hashlib.sha256).hexdigest()


def new_key() -> str:
    return secrets.token_hex(16)
