"""Execute experiments/walkthrough.py (a jupytext percent notebook) top to bottom, so it cannot rot.

The executed notebook is written to artifacts/notebooks/walkthrough.ipynb for inspection.
"""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "experiments" / "walkthrough.py"

pytestmark = [pytest.mark.slow, pytest.mark.requires("jupytext", "nbclient", "ipykernel")]


def test_walkthrough_executes():
    import jupytext
    import nbformat
    from nbclient import NotebookClient

    nb = jupytext.read(NOTEBOOK)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert len(code) >= 10
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    out = ROOT / "artifacts" / "notebooks" / "walkthrough.ipynb"
    out.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, out)
    errors = [o for c in code for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    # each method left its figure or table: plotly figures are rich outputs of their cells
    figures = [c for c in code if any("application/vnd.plotly.v1+json" in o.get("data", {}) for o in c.outputs)]
    assert len(figures) >= 7, f"only {len(figures)} cells show a plotly figure"
    text = "".join(o.get("text", "") for c in code for o in c.outputs if o.get("output_type") == "stream")
    assert "honest: verified" in text and "switched model: rejected" in text
