"""Intervention config: collect what the pages chose, validate against the model, download/export."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import streamlit as st

from steer.apps.explorer_common import (
    ACT_KEY,
    DIFR_KEY,
    LYNX_KEY,
    MOTE_KEY,
    current_model,
    folder_zip,
    saved_result,
)
from steer.config import ConfigError, InterventionConfig, ModelIdentity
from steer.export import export
from steer.options import EXPORT_TARGETS


def _copy(src: Path, dest: Path) -> None:
    import shutil

    if src.is_dir():
        shutil.copytree(src, dest, dirs_exist_ok=True)
    else:
        shutil.copy(src, dest / src.name)


st.title("Intervention config")
lm = current_model()

st.header("1. Start from a saved config (optional)")
loaded = saved_result("Intervention config", InterventionConfig.load, key="cfg_file", types=["json", "safetensors"],
                      multiple=True, help="config.json (+ config.safetensors) from `steer export --target steer`")

st.header("2. Sections")
picked = {
    "mote": (MOTE_KEY, "MoTE expert switch (Experts page)"),
    "act": (ACT_KEY, "ACT heads (Attention sinks page)"),
    "lynx": (LYNX_KEY, "LYNX probe + calibration (Probes page)"),
    "difr": (DIFR_KEY, "DiFR fingerprint settings (Fingerprints page)"),
}
sections = {}
for name, (key, label) in picked.items():
    from_page = st.session_state.get(key)
    from_file = getattr(loaded, name) if loaded is not None else None
    section = from_page or from_file
    where = "from the page" if from_page else ("from the loaded file" if from_file else "not set")
    on = st.checkbox(f"{label}: {where}", value=section is not None, disabled=section is None, key=f"use_{name}_{where}")
    if on and section is not None:
        sections[name] = section
        st.json({k: v for k, v in section.to_json().items() if k != "tensors"}, expanded=False)  # no tensor names
description = st.text_input("Description", loaded.description if loaded else "", key="cfg_desc")

if not sections:
    st.info("Nothing chosen yet: switch experts, run ACT, calibrate a probe or make fingerprints on the other "
            "pages (or load a config above); their settings appear here.")
    st.stop()

st.header("3. Validate and export")
cfg = InterventionConfig(ModelIdentity.from_model(lm.model, weights_hash=lm.weights_hash), description=description,
                         **sections)
try:
    cfg.check()
    problems = cfg.problems(lm)
except ConfigError as exc:
    problems = exc.problems
if problems:
    st.error("The config does not fit this model:\n\n" + "\n".join(f"- `{p}`" for p in problems))
else:
    st.success(f"Valid for {lm.name}: schema, tensors, model identity and every layer/expert/head in range.")
st.json(cfg.to_json(), expanded=False)
c1, c2, c3 = st.columns(3)
c1.download_button("Download config.json", json.dumps(cfg.to_json(), indent=2) + "\n", file_name="config.json",
                   mime="application/json", key="dl_cfg_json", disabled=bool(problems))
if not problems:
    c2.download_button("Download config folder (.zip, with tensors)", folder_zip(cfg.save), file_name="config.zip",
                       key="dl_cfg_zip")
target = c3.selectbox("Export for", [t for t in EXPORT_TARGETS if t != "steer"], key="cfg_target")
if c3.button("Export", key="run_export", disabled=bool(problems)):
    try:
        with tempfile.TemporaryDirectory(prefix="steer-app-") as d:
            res = export(cfg, target, Path(d) / target)
            data = folder_zip(lambda out: _copy(res.path, out))
        st.session_state["export_out"] = (target, data, res.notes)
    except (ValueError, NotImplementedError) as exc:
        st.error(str(exc))
out = st.session_state.get("export_out")
if out:
    for note in out[2]:
        st.warning(note)
    st.download_button(f"Download {out[0]} export (.zip)", out[1], file_name=f"steer-{out[0]}.zip", key="dl_export")

