"""experiments/difr/run.py --extend: new conditions collected against a kept raw collection (its calibration
and held-out honest runs reused), on a tiny llama checkpoint (seconds)."""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import pandas as pd
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "experiments" / "difr" / "run.py"
pytestmark = pytest.mark.skipif(not RUN.is_file(), reason="experiments/ ships with the source checkout, not the wheel")

# 2 calibration + 2 held-out prompts x 4 tokens; alpha 0.5 needs only 2 calibration windows per n
SMALL = ["--n-calib", "2", "--n-heldout", "2", "--max-new-tokens", "4", "--benign-batch", "1", "1", "1",
         "--cheat-batch", "2", "--target-fpr", "0.5", "--toploc-cap", "4"]


def _module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def run():
    yield _module("difr_run", RUN)
    torch.set_num_threads(1)  # main() sets it; every test in this suite runs with one thread anyway


@pytest.fixture(scope="module")
def base(run, tiny_dir, tmp_path_factory):
    """A kept collection with one cheating condition and no steering runs (as results_smollm2_long)."""
    d = tmp_path_factory.mktemp("difr_base")
    run.main(["--model", str(tiny_dir), *SMALL, "--conditions", "4-bit RTN g128", "--no-steering",
              "--raw", str(d / "raw.pt"), "--out", str(d / "results")])
    return d


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_extend_adds_conditions_and_steering_without_recollecting(run, tiny_dir, base, tmp_path, capsys):
    before = _sha(base / "raw.pt")
    run.main(["--model", str(tiny_dir), *SMALL, "--conditions", "wrong seed", "steering", "--extend",
              str(base / "raw.pt"), "--raw", str(tmp_path / "raw.pt"), "--out", str(tmp_path / "results")])
    assert _sha(base / "raw.pt") == before  # the kept collection is read, never written
    old, new = run.load_raw(base / "raw.pt"), run.load_raw(tmp_path / "raw.pt")
    assert new["cheats"] == ["4-bit RTN g128", "wrong seed", "steering applied, not claimed"]
    assert new["extends"]["raw"] == str(base / "raw.pt") and new["extends"]["conditions"] == ["4-bit RTN g128"]
    for key in ("calib", "ref_calib"):  # reused objects, not a second collection that happens to agree
        assert torch.equal(new[key].hidden, old[key].hidden)
    for name in ("benign", "4-bit RTN g128"):
        assert torch.equal(new["claims"][name].values, old["claims"][name].values)
        assert torch.equal(new["refs"][name].hidden, old["refs"][name].hidden)
    assert new["steered_benign"] is not None and new["steered_calib"].n_tokens == old["calib"].n_tokens

    # the added run is exactly what a from-scratch collection of that condition gives
    fresh = tmp_path / "fresh"
    run.main(["--model", str(tiny_dir), *SMALL, "--conditions", "wrong seed", "--no-steering",
              "--raw", str(fresh / "raw.pt"), "--out", str(fresh / "results")])
    scratch = run.load_raw(fresh / "raw.pt")
    assert torch.equal(scratch["claims"]["wrong seed"].output_ids, new["claims"]["wrong seed"].output_ids)
    assert torch.equal(scratch["claims"]["wrong seed"].values, new["claims"]["wrong seed"].values)
    assert not torch.equal(scratch["claims"]["wrong seed"].output_ids, old["claims"]["benign"].output_ids)

    auc = pd.read_csv(tmp_path / "results" / "auc.csv")
    assert set(auc.condition) == {"4-bit RTN g128", "wrong seed", "steering applied, not claimed",
                                  "steering claimed, not applied"}
    fpr = pd.read_csv(tmp_path / "results" / "fpr.csv")
    old_fpr = pd.read_csv(base / "results" / "fpr.csv")
    shared = ["method", "target_fpr", "n_tokens", "threshold", "heldout_fpr"]  # same calibration, same cells
    pd.testing.assert_frame_equal(fpr[fpr.method.isin(old_fpr.method)][shared].reset_index(drop=True),
                                  old_fpr[shared].reset_index(drop=True))
    assert "tpr: wrong seed" in fpr and "tpr: 4-bit RTN g128" in fpr

    tables = _module("difr_tables", RUN.parent / "tables.py")  # the power table names every condition
    tables.main([str(tmp_path / "results")])
    power = capsys.readouterr().out.split("## power")[1].split("## whole claims")[0]
    assert "| wrong seed |" in power and "| steering applied, not claimed |" in power


@pytest.mark.parametrize("extra, error", [
    (["--max-new-tokens", "5"], "other settings .*max_new_tokens: 4 there, 5 here.*pass --max-new-tokens 4"),
    (["--n-heldout", "3"], "more than .* 2 held-out"),
    (["--conditions", "4-bit RTN g128"], "already holds .*4-bit RTN g128"),
    (["--no-steering", "--conditions", "nothing matches this"], "nothing to add"),
    (["--raw", "{base}/raw.pt"], "would be overwritten"),
    (["--out", "{base}/results"], "results folder"),
])
def test_extend_refuses_a_base_it_would_not_match_or_would_overwrite(run, tiny_dir, base, tmp_path, extra, error):
    argv = ["--model", str(tiny_dir), *SMALL, "--conditions", "wrong seed", "--raw", str(tmp_path / "raw.pt"),
            "--out", str(tmp_path / "results"), "--extend", str(base / "raw.pt")]
    argv += [a.format(base=base) for a in extra]  # argparse: a repeated flag's last value wins
    with pytest.raises(SystemExit, match=error):
        run.main(argv)
    assert not (tmp_path / "raw.pt").exists()


def test_extend_refuses_other_weights(run, base, tmp_path):
    from steer.tiny import save_tiny

    other = save_tiny(tmp_path / "other", "llama", seed=1)
    with pytest.raises(SystemExit, match="same model and weights"):
        run.main(["--model", str(other), *SMALL, "--conditions", "wrong seed", "--extend", str(base / "raw.pt"),
                  "--raw", str(tmp_path / "raw.pt"), "--out", str(tmp_path / "results")])
