"""`steer config build|show|validate|diff` and `steer switch --save-config`: the CLI path from a
profile to a config `steer export` takes, on a tiny Qwen2-MoE checkpoint, with the bad inputs."""

from __future__ import annotations

import json

import pytest
import torch

from steer.cli import main
from steer.config import DiFRSection, InterventionConfig, MoTESection
from steer.config_diff import diff, summary
from steer.tiny import save_tiny, tiny_model


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny_qwen2_moe"), "qwen2_moe")


@pytest.fixture(scope="module")
def prof_dir(ckpt, tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("prof")
    assert (
        main(
            [
                "profile",
                "--model",
                str(ckpt),
                "--limit",
                "4",
                "--bootstrap",
                "0",
                "--quiet",
                "--json",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    return out


def test_build_show_validate_export(ckpt, prof_dir, tmp_path, capsys):
    capsys.readouterr()
    cfg_dir = tmp_path / "cfg"
    assert (
        main(
            [
                "config",
                "build",
                "--profile",
                str(prof_dir),
                "--k",
                "2",
                "--per-layer-cap",
                "1",
                "--difr-k",
                "8",
                "--difr-seed",
                "3",
                "--description",
                "fr off",
                "-o",
                str(cfg_dir),
                "--quiet",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    cfg = InterventionConfig.load(cfg_dir)
    assert len(cfg.mote.experts) == 2 and cfg.mote.mode == "off_mask" and cfg.difr == DiFRSection(8, 3)
    assert cfg.model.weights_hash and cfg.description == "fr off"  # the profile's model, from its checkpoint
    assert f"profile {prof_dir} top 2" in cfg.mote.source
    assert "mote: off_mask, 2 experts" in out and "difr: k 8, seed 3" in out and "digest " in out

    assert main(["config", "show", str(cfg_dir / "config.json"), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["sections"] == ["mote", "difr"]
    assert shown["mote"]["by_layer"] == {str(la): es for la, es in cfg.mote.by_layer().items()}
    assert len(shown["digest"]) == 16

    assert main(["config", "validate", str(cfg_dir), "--model", str(ckpt)]) == 0
    assert "valid, fits" in capsys.readouterr().out
    # the config goes straight into the export the server reads
    assert (
        main(
            ["export", "--target", "vllm", str(cfg_dir), "-o", str(tmp_path / "served"), "--model", str(ckpt)]
        )
        == 0
    )


def test_validate_reports_bad_configs(ckpt, tmp_path, capsys):
    model = tiny_model("qwen2_moe")
    cfg_dir = InterventionConfig.for_model(model, mote=MoTESection([(1, 3)])).save(tmp_path / "cfg")
    doc = json.loads((cfg_dir / "config.json").read_text())
    doc["mote"]["experts"][0]["expert"] = 19
    doc["mote"]["mode"] = "sideways"
    (cfg_dir / "config.json").write_text(json.dumps(doc))
    assert main(["config", "validate", str(cfg_dir)]) == 2
    err = capsys.readouterr().err
    assert "mote.mode: 'sideways' is not one of" in err
    # schema-valid, but made for other weights than the checkpoint's
    other = InterventionConfig.for_model(tiny_model("qwen2_moe", seed=5), mote=MoTESection([(1, 3)]))
    assert main(["config", "validate", str(other.save(tmp_path / "other")), "--model", str(ckpt)]) == 2
    assert "model.params_hash: config was made for" in capsys.readouterr().err
    out_of_range = InterventionConfig.for_model(model, mote=MoTESection([(0, 2)]))  # layer 0 is dense here
    assert main(["config", "validate", str(out_of_range.save(tmp_path / "oor")), "--model", str(ckpt)]) == 2
    assert "mote.experts[0].layer: 0 is not an MoE layer" in capsys.readouterr().err
    assert main(["config", "show", str(tmp_path / "missing")]) == 2
    assert "no intervention config at" in capsys.readouterr().err
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    assert main(["config", "show", str(tmp_path / "broken")]) == 2
    assert "(file): not valid JSON" in capsys.readouterr().err


def test_build_bad_inputs(ckpt, prof_dir, tmp_path, capsys):
    capsys.readouterr()
    assert main(["config", "build", "--model", str(ckpt), "-o", str(tmp_path / "x")]) == 2
    assert "give exactly one of --profile DIR or --experts" in capsys.readouterr().err
    assert (
        main(["config", "build", "--model", str(ckpt), "--experts", "1:99", "-o", str(tmp_path / "x")]) == 2
    )
    assert "99 out of range 0..7" in capsys.readouterr().err
    assert main(["config", "build", "--model", str(ckpt), "--experts", "1-3", "-o", str(tmp_path / "x")]) == 2
    assert "--experts: '1-3' is not LAYER:EXPERT" in capsys.readouterr().err
    assert (
        main(["config", "build", "--profile", str(prof_dir), "--difr-k", "0", "-o", str(tmp_path / "x")]) == 2
    )
    assert "--difr-k must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    with pytest.raises(SystemExit):  # argparse: a verb is required
        main(["config"])


def test_diff(tmp_path, capsys):
    model = tiny_model("qwen2_moe")
    a = InterventionConfig.for_model(model, mote=MoTESection([(1, 3), (2, 5)]), difr=DiFRSection(8, 0))
    b = InterventionConfig.for_model(
        model, mote=MoTESection([(1, 3), (2, 1), (1, 0)], "on"), description="v2"
    )
    assert diff(a, a) == []
    lines = diff(a, b)
    assert "description: '' -> 'v2'" in lines
    assert "mote.experts: + 1:0, 2:1; - 2:5" in lines and "mote.mode: 'off_mask' -> 'on'" in lines
    assert "difr: only in the first config" in lines
    da, db = a.save(tmp_path / "a"), b.save(tmp_path / "b")
    capsys.readouterr()
    assert main(["config", "diff", str(da), str(da)]) == 0
    assert "are the same config" in capsys.readouterr().out
    assert main(["config", "diff", str(da), str(db), "--json"]) == 1
    got = json.loads(capsys.readouterr().out)
    assert not got["equal"] and got["differences"] == lines
    assert main(["config", "diff", str(da), str(tmp_path / "nope")]) == 2
    other = InterventionConfig.for_model(
        tiny_model("qwen2_moe", seed=9), mote=MoTESection([(1, 3), (2, 5)]), difr=DiFRSection(8, 0)
    )
    assert any(line.startswith("model.params_hash:") for line in diff(a, other))
    assert summary(a)["mote"]["by_layer"] == {1: [3], 2: [5]}


def test_switch_save_config(ckpt, prof_dir, tmp_path, capsys):
    capsys.readouterr()
    out = tmp_path / "from_switch"
    assert main(["switch", "--profile", str(prof_dir), "--k", "2", "--save-config", str(out), "--quiet"]) == 0
    assert "wrote intervention config" in capsys.readouterr().out
    saved = InterventionConfig.load(out)
    assert len(saved.mote.experts) == 2 and saved.difr is None
    built = tmp_path / "built"
    assert main(["config", "build", "--profile", str(prof_dir), "--k", "2", "-o", str(built), "--quiet"]) == 0
    assert diff(saved, InterventionConfig.load(built)) == []  # the same switch, the same config
    capsys.readouterr()
    # with prompts it also generates, and still saves
    assert (
        main(
            [
                "switch",
                "--model",
                str(ckpt),
                "--experts",
                "1:0",
                "--prompt",
                "hi",
                "--max-new-tokens",
                "2",
                "--save-config",
                str(tmp_path / "s2"),
                "--quiet",
                "--json",
            ]
        )
        == 0
    )
    res = json.loads(capsys.readouterr().out)
    assert res["config"] == str(tmp_path / "s2") and InterventionConfig.load(
        tmp_path / "s2"
    ).mote.experts == [(1, 0)]
    assert main(["switch", "--model", str(ckpt), "--experts", "1:0"]) == 2
    assert "no prompts" in capsys.readouterr().err
