"""`steer generate` with a whole intervention config, and the CLI's verifiable-steering round trip
(`steer fingerprint --config` -> `steer verify --config`), on a tiny Qwen2-MoE checkpoint."""

from __future__ import annotations

import json

import pytest
import torch

from steer.cli import main
from steer.config import DiFRSection, InterventionConfig, LynxSection, MoTESection
from steer.hooks import capture
from steer.tiny import tiny_model, tiny_tokenizer

PROMPTS = ["the quick brown fox", "hello there", "x marks the spot", "another prompt"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("gen_moe")
    tiny_model("qwen2_moe").save_pretrained(d / "moe")
    tiny_tokenizer().save_pretrained(d / "moe")
    (d / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return d


@pytest.fixture(scope="module")
def model(ckpt):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(ckpt / "moe").eval()


@pytest.fixture(scope="module")
def busiest(model):
    """(layer, expert) pairs the prompts route to most: switching them off surely changes something."""
    tok = tiny_tokenizer()
    with capture(model, ["blocks.*.mlp.router.indices"]) as cap, torch.no_grad():
        for p in PROMPTS:
            model(**tok(p, return_tensors="pt"))
    pairs = []
    for point, rows in cap.items():
        counts = torch.bincount(torch.cat([r.flatten() for r in rows]), minlength=8)
        pairs.append((int(point.split(".")[1]), int(counts.argmax())))
    return pairs


def _run(capsys, *argv):
    capsys.readouterr()
    rc = main(["generate", *map(str, argv)])
    out = capsys.readouterr()
    return rc, out


def test_generate_applies_mote_and_reports_touched(ckpt, model, busiest, tmp_path, capsys):
    cfg = InterventionConfig.for_model(model, mote=MoTESection(busiest, "off_mask")).save(tmp_path / "cfg")
    rc, out = _run(capsys, "--config", cfg, "--model", ckpt / "moe", "--prompts", ckpt / "prompts.txt",
                   "--no-chat-template", "--max-new-tokens", 8, "--baseline", "--json", "--quiet")
    assert rc == 0, out.err
    res = json.loads(out.out)
    assert res["applied"] == ["mote"] and res["touched"]["ExpertSwitch"] > 0
    assert len(res["rows"]) == len(PROMPTS)
    assert any(r["output"] != r["baseline"] for r in res["rows"])  # the switch changes some answer


def test_generate_records_a_claim_that_verifies(ckpt, model, busiest, tmp_path, capsys):
    """generate --fingerprints names the config; verify --config accepts it; a claim generated without
    the switch is refused with the config; `steer fingerprint --config` names it too."""
    cfg = InterventionConfig.for_model(model, mote=MoTESection(busiest, "off_mask"),
                                       difr=DiFRSection(k=8, seed=1)).save(tmp_path / "cfg")
    common = ["--model", ckpt / "moe", "--prompts", ckpt / "prompts.txt", "--no-chat-template",
              "--max-new-tokens", 8, "--quiet"]
    rc, out = _run(capsys, "--config", cfg, *common)
    assert rc == 2 and "--fingerprints" in out.err  # a difr section never silently records nothing
    rc, out = _run(capsys, "--config", cfg, *common, "--fingerprints", tmp_path / "claim.safetensors", "--json")
    assert rc == 0, out.err
    assert json.loads(out.out)["fingerprint_tokens"] == 8 * len(PROMPTS)
    fp_common = [a for a in common if a != "--quiet"] + ["--k", 8, "--seed", 1]
    # the claim's mean is over its 32 tokens, and the calibration units are disjoint 32-token windows
    # inside benign runs: 32-token benign runs give 2 x 4 = 8 of them, enough for a threshold at FPR 0.2
    # (1/0.2 = 5 windows needed; the default 1% would need 100)
    fp_benign = [32 if a == 8 and prev == "--max-new-tokens" else a for prev, a in zip([None, *fp_common], fp_common)]
    for b, batch in ((1, 1), (2, 3)):
        assert main(["fingerprint", *map(str, fp_benign), "--config", str(cfg), "--batch-size", str(batch),
                     "-o", str(tmp_path / f"b{b}.safetensors")]) == 0
    capsys.readouterr()
    assert main(["verify", "--calibrate", str(tmp_path / "b1.safetensors"), str(tmp_path / "b2.safetensors"),
                 "--model", str(ckpt / "moe"), "--config", str(cfg), "--target-fpr", "0.2",
                 "-o", str(tmp_path / "cal.safetensors"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["max_tokens_calibrated"] >= 8 * len(PROMPTS)
    capsys.readouterr()
    rc = main(["verify", str(tmp_path / "claim.safetensors"), "--model", str(ckpt / "moe"), "--config", str(cfg),
               "--calibration", str(tmp_path / "cal.safetensors"), "--json"])
    assert rc == 0 and json.loads(capsys.readouterr().out)["decision"] == "verified"
    # the same prompts fingerprinted without the switch cannot pass as the config's output
    assert main(["fingerprint", *map(str, fp_common), "-o", str(tmp_path / "plain.safetensors")]) == 0
    capsys.readouterr()
    rc = main(["verify", str(tmp_path / "plain.safetensors"), "--model", str(ckpt / "moe"), "--config", str(cfg),
               "--calibration", str(tmp_path / "cal.safetensors")])
    assert rc == 2 and "claim" in capsys.readouterr().err


def test_generate_exits_early_with_the_lynx_section(ckpt, model, tmp_path, capsys):
    from steer.probes.conformal import ConformalCalibration
    from steer.probes.cues import CueSet
    from steer.probes.features import default_points
    from steer.probes.probe import LynxProbe, ProbeInfo

    points = default_points(model)
    d = model.config.hidden_size
    cues = CueSet(words=(), patterns={"char": r"[!-~]"})  # tiny random models: any printable byte is a cue
    probe = LynxProbe(d * len(points), (8, 4), ProbeInfo("tiny", model.config.num_hidden_layers, d, points,
                                                          cues=cues.to_json(), exit_string="=>"))
    probe.calibration = ConformalCalibration(0.1, -1.0, 1.0, 50, 50)  # the set is always {1}: exit at a cue
    cfg = InterventionConfig.for_model(model, lynx=LynxSection.from_probe(probe.eval())).save(tmp_path / "cfg")
    rc, out = _run(capsys, "--config", cfg, "--model", ckpt / "moe", "--prompts", ckpt / "prompts.txt",
                   "--no-chat-template", "--max-new-tokens", 12, "--json", "--quiet")
    assert rc == 0, out.err
    res = json.loads(out.out)
    assert res["applied"] == ["lynx"] and res["lynx"]["early_exits"] > 0
    assert all("=>" in r["output"] for r in res["rows"] if r["stop"] == "exit")


def test_generate_bad_inputs(ckpt, model, busiest, tmp_path, capsys):
    from test_config import _probe

    both = InterventionConfig.for_model(model, mote=MoTESection(busiest, "off_mask"),
                                        lynx=LynxSection.from_probe(_probe(model.config.hidden_size, 2)),
                                        difr=DiFRSection(k=8, seed=0)).save(tmp_path / "both")
    base = ["--model", ckpt / "moe", "--prompt", "hi", "--no-chat-template", "--quiet"]
    rc, out = _run(capsys, "--config", both, *base, "--fingerprints", tmp_path / "f.safetensors")
    assert rc == 2 and "--skip difr or --skip lynx" in out.err
    rc, out = _run(capsys, "--config", both, *base, "--skip", "lynx,mote", "--fingerprints", tmp_path / "f.safetensors")
    assert rc == 2 and "claim the whole config" in out.err
    rc, out = _run(capsys, "--config", both, *base, "--skip", "bogus")
    assert rc == 2 and "unknown section" in out.err
    rc, out = _run(capsys, "--config", both, *base, "--skip", "mote,lynx,difr")
    assert rc == 2 and "nothing to apply" in out.err
    # a config made for other weights: named identity mismatch, exit 2, before any generation
    other = tiny_model("qwen2_moe", seed=1)
    wrong = InterventionConfig.for_model(other, mote=MoTESection([(1, 0)], "off_mask")).save(tmp_path / "wrong")
    rc, out = _run(capsys, "--config", wrong, *base)
    assert rc == 2 and "model" in out.err
    rc, out = _run(capsys, "--config", tmp_path / "missing", *base)
    assert rc == 2


def test_verify_statistic_choices_track_the_library():
    """`steer verify --statistic` lists every distance steer.difr implements (kept literal in the CLI
    so `steer --help` does not import torch)."""
    import argparse

    from steer.cli import verify as verify_cli
    from steer.difr.verify import STATISTICS

    sub = argparse.ArgumentParser().add_subparsers()
    verify_cli.add_parser(sub)
    action = next(a for a in sub.choices["verify"]._actions if a.dest == "statistic")
    assert tuple(action.choices) == tuple(STATISTICS)
