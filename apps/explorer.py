"""steer explorer: `steer app` (or `streamlit run apps/explorer.py`).

Pick a model in the sidebar; each page runs one method through steer's Python API (or loads its
saved result) and shows the result objects' own figures. Selections made on the pages (experts
switched, ACT heads, a calibrated probe, fingerprint settings) are collected on the Config page.
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from steer.apps.explorer_common import model_picker

HERE = Path(__file__).resolve().parent

st.set_page_config(page_title="steer explorer", layout="wide")

PAGES = [
    st.Page(HERE / "pages" / "experts.py", title="Experts (fTRI / MoTE)", default=True),
    st.Page(HERE / "pages" / "sinks.py", title="Attention sinks (ACT)"),
    st.Page(HERE / "pages" / "probes.py", title="Probes (LYNX)"),
    st.Page(HERE / "pages" / "fingerprints.py", title="Fingerprints (DiFR)"),
    st.Page(HERE / "pages" / "config.py", title="Intervention config"),
]

page = st.navigation(PAGES)
model_picker()
page.run()
