"""experiments/mote/run_mote.py --rescore: every statistic of a saved run recomputed from its raw labels."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SAVED = ROOT / "experiments" / "mote" / "results_2026-11-26_selection_mask.json"


@pytest.mark.skipif(not SAVED.is_file(), reason="experiments/ ships with the source checkout, not the wheel")
def test_rescore_recomputes_mcnemar_from_raw_labels(tmp_path):
    out = tmp_path / "run.json"
    shutil.copy(SAVED, out)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "experiments/mote/run_mote.py", "--rescore", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = json.loads(out.read_text())
    rows = {r["condition"]: r for r in saved["rows"]}
    base = rows["baseline"]["fr_labels"]
    for name, r in rows.items():
        m = r["fr_vs_baseline"]
        gained = sum(1 for a, b in zip(base, r["fr_labels"]) if not a and b)
        lost = sum(1 for a, b in zip(base, r["fr_labels"]) if a and not b)
        assert (m["gained"], m["lost"], m["n"]) == (gained, lost, 40), name
        assert "fr_delta" not in r
    # the 3-discordant-pair row whose paired bootstrap CI was [-0.17, +0.00]: exact McNemar p = 2/8
    assert rows["random-10 off_zero (seed 3)"]["fr_vs_baseline"]["p_value"] == 0.25
    table = (tmp_path / "run_table.md").read_text()
    assert (
        "exact McNemar" in table and "| top-10 off_zero | 0.55 [0.40, 0.69] | +0.025 (+1/-0, p=1) |" in table
    )
    assert f"--rescore --out {out}" in table
