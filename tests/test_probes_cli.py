"""`steer probe label | train | calibrate | generate` end to end on a tiny model, and bad inputs."""

from __future__ import annotations

import json

import pytest
import torch

from steer.cli import main
from steer.probes.data import LabelledCues
from steer.probes.features import default_points
from steer.probes.lynx import calibrate_probe, generate
from steer.probes.probe import LynxProbe

# byte-level tiny models: any printable char is a cue, so every generation has cue events
CUES = "re:[!-~]"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("lynx")
    common = ["--model", "tiny:llama", "--n", "3", "--cues", CUES, "--exit-string", "=>", "--max-new-tokens", "5",
              "--answer-max-tokens", "1", "--batch-size", "3", "--json"]
    assert main(["probe", "label", "--split", "train", *common, "-o", str(d / "train.safetensors")]) == 0
    assert main(["probe", "label", "--split", "calibration", *common, "-o", str(d / "cal.safetensors")]) == 0
    assert main(["probe", "label", "--split", "train", *common, "--points", "blocks.0.resid_post,final_norm.out",
                 "-o", str(d / "other_points.safetensors")]) == 0
    return d


def test_label_train_calibrate_generate(files, capsys):
    d = files
    lab = LabelledCues.from_safetensors(d / "train.safetensors")
    assert len(lab) >= 6 and lab.meta["model"] == "tiny:llama"
    assert lab.features.shape[1] == len(default_points(3)) * 64 and lab.meta["points"] == default_points(3)
    capsys.readouterr()
    assert main(["probe", "train", str(d / "train.safetensors"), "-o", str(d / "probe"), "--max-epochs", "3",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n_train"] > 0
    assert main(["probe", "calibrate", str(d / "probe"), str(d / "cal.safetensors"), "--delta", "0.2",
                 "--json"]) == 0
    cal = json.loads(capsys.readouterr().out)
    assert cal["delta"] == 0.2 and cal["n0"] + cal["n1"] == len(LabelledCues.from_safetensors(d / "cal.safetensors"))
    assert main(["probe", "generate", "--model", "tiny:llama", "--probe", str(d / "probe"), "--prompt", "abc",
                 "--prompt", "hello", "--max-new-tokens", "8", "--json", "--figure", str(d / "fig.html")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["rows"]) == 2 and all(r["stop"] in ("exit", "eos", "budget") for r in out["rows"])
    html = (d / "fig.html").read_text()
    assert html.count("LYNX confidence over the generation") == 2
    # the Python API gives the same rows
    from steer.probes.data import load_model

    model, tok, _ = load_model("tiny:llama")
    probe = LynxProbe.load(d / "probe")
    from steer.probes.generate import ExitConfig

    res = generate(model, tok, ["abc", "hello"], probe,
                   config=ExitConfig(exit_string="=>", max_new_tokens=8, answer_max_tokens=8, answer_stop=(".", "\n")))
    assert [r.stop for r in res.rows] == [r["stop"] for r in out["rows"]]
    assert res.n_tokens() == [r["n_tokens"] for r in out["rows"]]


def test_bad_inputs(files, capsys, tmp_path):
    d = files
    if not (d / "probe").exists():
        assert main(["probe", "train", str(d / "train.safetensors"), "-o", str(d / "probe"), "--max-epochs", "2"]) == 0
    capsys.readouterr()
    # delta outside (0, 1)
    assert main(["probe", "calibrate", str(d / "probe"), str(d / "cal.safetensors"), "--delta", "1.5"]) == 2
    assert "delta must be in (0, 1)" in capsys.readouterr().err
    # calibration cue events from another layer set
    assert main(["probe", "calibrate", str(d / "probe"), str(d / "other_points.safetensors")]) == 2
    assert "feature points" in capsys.readouterr().err
    # a probe for a 3-layer model used on a 4-layer model (API) and another family name (CLI)
    probe = LynxProbe.load(d / "probe")
    from steer.tiny import tiny_model, tiny_tokenizer

    with pytest.raises(ValueError, match="trained on 'tiny:llama'"):
        generate(tiny_model("llama", num_hidden_layers=4), tiny_tokenizer(), ["x"], probe)
    # empty calibration set
    empty = LabelledCues(torch.empty(0, probe.n_features), torch.empty(0, dtype=torch.long),
                         torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long),
                         LabelledCues.from_safetensors(d / "cal.safetensors").meta)
    empty.to_safetensors(tmp_path / "empty.safetensors")
    assert main(["probe", "calibrate", str(d / "probe"), str(tmp_path / "empty.safetensors")]) == 2
    assert "empty calibration set" in capsys.readouterr().err
    with pytest.raises(ValueError, match="empty calibration set"):
        calibrate_probe(probe, empty, 0.1)
    # uncalibrated probe
    fresh = LynxProbe.load(d / "probe")
    fresh.calibration = None
    fresh.save(tmp_path / "uncal")
    assert main(["probe", "generate", "--model", "tiny:llama", "--probe", str(tmp_path / "uncal"), "--prompt", "a"]) == 2
    assert "not calibrated" in capsys.readouterr().err
    # not a probe / not a cue file
    assert main(["probe", "train", str(d / "probe" / "probe.json"), "-o", str(tmp_path / "p")]) == 2


def test_label_without_rollback_keeps_the_cue_events(files, tmp_path):
    """`--no-rollback` labels the exit vLLM serves: the same generations, cue events and features, only
    the trial answers (hence labels) come from the exit string placed after the cue."""
    common = ["--model", "tiny:llama", "--n", "3", "--cues", CUES, "--exit-string", "=>", "--max-new-tokens", "5",
              "--answer-max-tokens", "1", "--batch-size", "3", "--json", "--split", "train"]
    assert main(["probe", "label", *common, "--no-rollback", "-o", str(tmp_path / "keep.safetensors")]) == 0
    keep = LabelledCues.from_safetensors(tmp_path / "keep.safetensors")
    cut = LabelledCues.from_safetensors(files / "train.safetensors")
    assert torch.equal(keep.cue_token, cut.cue_token) and torch.equal(keep.trajectory, cut.trajectory)
    assert torch.allclose(keep.features, cut.features)
