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
    (d / "one.txt").write_text("the quick brown fox\n")
    return d


def _fp(d, name, out, *extra, prompts="prompts.txt"):
    argv = ["fingerprint", "--model", str(d / name), "--prompts", str(d / prompts), "-o", str(out),
            "--max-new-tokens", "8", "--no-chat-template", "--temperature", "1.0", "--top-p", "0.9", *extra]
    return main(argv)


def test_fingerprint_calibrate_verify(ckpts, tmp_path, capsys):
    d = ckpts
    assert _fp(d, "ref", tmp_path / "b1.safetensors", "--batch-size", "4", "--sample-seed", "1") == 0
    assert _fp(d, "ref", tmp_path / "b2.safetensors", "--batch-size", "1", "--attn", "eager", "--sample-seed", "2") == 0
    capsys.readouterr()
    # 64 benign tokens in sequences of 8: at FPR 0.05 (20 windows needed) claims of up to 3 tokens decide
    assert main(["verify", "--calibrate", str(tmp_path / "b1.safetensors"), str(tmp_path / "b2.safetensors"),
                 "--model", str(d / "ref"), "-o", str(tmp_path / "cal.safetensors"), "--target-fpr", "0.05",
                 "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["statistic"] == "l2" and summary["windows_needed"] == 20 and summary["max_tokens_calibrated"] == 2
    assert _fp(d, "ref", tmp_path / "long.safetensors", "--batch-size", "3", "--sample-seed", "1") == 0
    capsys.readouterr()
    # 4 sequences of 8 tokens, each at 0.05/4: even 1-token windows need 4 * 8 / 0.05 = 640 benign
    # tokens, there are 64: no decision (exit 1), never a pass
    assert main(["verify", str(tmp_path / "long.safetensors"), "--model", str(d / "ref"),
                 "--calibration", str(tmp_path / "cal.safetensors")]) == 1
    captured = capsys.readouterr()
    assert captured.out.startswith("INSUFFICIENT") and "needs 640" in captured.out and "nothing was verified" in captured.err
    one = ("--max-new-tokens", "2")
    assert _fp(d, "ref", tmp_path / "honest.safetensors", "--sample-seed", "1", *one, prompts="one.txt") == 0
    capsys.readouterr()
    rc = main(["verify", str(tmp_path / "honest.safetensors"), "--model", str(d / "ref"),
               "--calibration", str(tmp_path / "cal.safetensors"), "--json", "--report", str(tmp_path / "r.html"),
               "--csv", str(tmp_path / "t.csv")])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["decision"] == "verified", out
    assert out["mean_l2"] == out["score"] and out["mean_ulp"] > 0 and out["calibration_windows"] >= 20
    csv = (tmp_path / "t.csv").read_text().splitlines()
    assert (tmp_path / "r.html").stat().st_size > 1000 and len(csv) == out["n_tokens"] + 1 and ",l2,ulp" in csv[0]
    # the quantised model's fingerprints, claimed under the reference's name (same dir name "ref")
    (tmp_path / "q").mkdir()
    import shutil

    shutil.copytree(d / "q4", tmp_path / "q" / "ref")
    rc = main(["fingerprint", "--model", str(tmp_path / "q" / "ref"), "--prompts", str(d / "one.txt"),
               "-o", str(tmp_path / "cheat.safetensors"), "--max-new-tokens", "2", "--no-chat-template",
               "--temperature", "1.0", "--top-p", "0.9", "--sample-seed", "1"])
    assert rc == 0
    capsys.readouterr()
    rc = main(["verify", str(tmp_path / "cheat.safetensors"), "--model", str(d / "ref"),
               "--calibration", str(tmp_path / "cal.safetensors"), "--json"])
    assert rc == 1 and json.loads(capsys.readouterr().out)["decision"] == "rejected"
    assert main(["verify", str(tmp_path / "cheat.safetensors"), "--model", str(d / "ref"),
                 "--calibration", str(tmp_path / "cal.safetensors")]) == 1
    assert capsys.readouterr().out.startswith("REJECTED: 1 sequence(s), 2 tokens, decided per sequence at FPR 0.05/1")
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


def test_cli_choices_match_the_library():
    """The CLI spells the statistics and the clip out (no torch import at start-up): keep them in step."""
    import importlib

    cli = importlib.import_module("steer.cli.verify")
    lib = importlib.import_module("steer.difr.verify")  # steer.difr exports a function named verify

    assert (cli.STATISTICS, cli.DEFAULT_STATISTIC, cli.TOKEN_CLIP) == (lib.STATISTICS, lib.DEFAULT_STATISTIC,
                                                                       lib.TOKEN_CLIP)


def test_fingerprint_needs_prompts(ckpts, tmp_path, capsys):
    assert main(["fingerprint", "--model", str(ckpts / "ref"), "-o", str(tmp_path / "x.safetensors")]) == 2
    assert "no prompts" in capsys.readouterr().err
