"""`steer fingerprint` / `steer verify` on a local tiny checkpoint: decisions, exit codes, bad inputs."""

from __future__ import annotations

import json

import pytest

from steer.cli import main
from steer.difr import quantize_rtn
from steer.tiny import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("difr_cli")
    model, tok = tiny_model("llama"), tiny_tokenizer()
    model.save_pretrained(d / "ref")
    tok.save_pretrained(d / "ref")
    quantize_rtn(model, 4, 32).save_pretrained(d / "q4")  # a cheaper model under the same name
    tok.save_pretrained(d / "q4")
    (d / "prompts.txt").write_text("hello there\nthe quick brown fox\nx marks\nanother prompt\n")
    return d


def _fp(d, name, out, *extra):
    argv = ["fingerprint", "--model", str(d / name), "--prompts", str(d / "prompts.txt"), "-o", str(out),
            "--max-new-tokens", "8", "--no-chat-template", "--temperature", "1.0", "--top-p", "0.9", *extra]
    return main(argv)


def test_fingerprint_calibrate_verify(ckpts, tmp_path, capsys):
    d = ckpts
    assert _fp(d, "ref", tmp_path / "b1.safetensors", "--batch-size", "4", "--sample-seed", "1") == 0
    assert _fp(d, "ref", tmp_path / "b2.safetensors", "--batch-size", "1", "--attn", "eager", "--sample-seed", "2") == 0
    assert main(["verify", "--calibrate", str(tmp_path / "b1.safetensors"), str(tmp_path / "b2.safetensors"),
                 "--model", str(d / "ref"), "-o", str(tmp_path / "cal.safetensors")]) == 0
    assert _fp(d, "ref", tmp_path / "honest.safetensors", "--batch-size", "3", "--sample-seed", "1") == 0
    capsys.readouterr()
    rc = main(["verify", str(tmp_path / "honest.safetensors"), "--model", str(d / "ref"),
               "--calibration", str(tmp_path / "cal.safetensors"), "--json", "--report", str(tmp_path / "r.html"),
               "--csv", str(tmp_path / "t.csv")])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["decision"] == "verified", out
    assert (tmp_path / "r.html").stat().st_size > 1000 and len((tmp_path / "t.csv").read_text().splitlines()) > 8
    # the quantised model's fingerprints, claimed under the reference's name (same dir name "ref")
    (tmp_path / "q").mkdir()
    import shutil

    shutil.copytree(d / "q4", tmp_path / "q" / "ref")
    rc = main(["fingerprint", "--model", str(tmp_path / "q" / "ref"), "--prompts", str(d / "prompts.txt"),
               "-o", str(tmp_path / "cheat.safetensors"), "--max-new-tokens", "8", "--no-chat-template",
               "--temperature", "1.0", "--top-p", "0.9", "--sample-seed", "1"])
    assert rc == 0
    capsys.readouterr()
    rc = main(["verify", str(tmp_path / "cheat.safetensors"), "--model", str(d / "ref"),
               "--calibration", str(tmp_path / "cal.safetensors"), "--json"])
    assert rc == 1 and json.loads(capsys.readouterr().out)["decision"] == "rejected"
    # no calibration: no decision, and never exit 0
    assert main(["verify", str(tmp_path / "honest.safetensors"), "--model", str(d / "ref")]) == 1
    # bad inputs: exit 2 with a message naming the problem
    raw = (tmp_path / "honest.safetensors").read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(raw[:-50])
    capsys.readouterr()
    assert main(["verify", str(tmp_path / "trunc.safetensors"), "--model", str(d / "ref"),
                 "--calibration", str(tmp_path / "cal.safetensors")]) == 2
    assert "truncated or corrupt" in capsys.readouterr().err
    assert _fp(d, "ref", tmp_path / "k4.safetensors", "--k", "4") == 0
    capsys.readouterr()
    assert main(["verify", str(tmp_path / "k4.safetensors"), "--model", str(d / "ref"),
                 "--calibration", str(tmp_path / "cal.safetensors")]) == 2
    assert "k=8" in capsys.readouterr().err
    capsys.readouterr()
    assert main(["verify", str(tmp_path / "honest.safetensors"), "--model", str(d / "q4"),
                 "--calibration", str(tmp_path / "cal.safetensors")]) == 2  # model id 'q4' != claimed 'ref'
    assert "claim" in capsys.readouterr().err


def test_fingerprint_needs_prompts(ckpts, tmp_path, capsys):
    assert main(["fingerprint", "--model", str(ckpts / "ref"), "-o", str(tmp_path / "x.safetensors")]) == 2
    assert "no prompts" in capsys.readouterr().err
