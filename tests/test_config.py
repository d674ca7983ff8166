"""The intervention config: round trip, schema, clear errors for bad configs, apply in steer."""

from __future__ import annotations

import json

import pytest
import torch

from steer.config import (
    ACTSection,
    ConfigError,
    DiFRSection,
    InterventionConfig,
    LynxSection,
    MoTESection,
    schema,
    schema_problems,
)
from steer.tiny import tiny_model


def _probe(d_model: int, layer: int):
    from steer.probes.conformal import ConformalCalibration
    from steer.probes.probe import LynxProbe, ProbeInfo

    torch.manual_seed(0)
    probe = LynxProbe(d_model, (8, 4), ProbeInfo("tiny", 3, d_model, [f"blocks.{layer}.resid_post"]))
    probe.mean.normal_()
    probe.calibration = ConformalCalibration(0.1, 0.7, float("inf"), 40, 12)
    return probe.eval()


def full_config(model) -> InterventionConfig:
    return InterventionConfig.for_model(
        model,
        mote=MoTESection([(1, 3), (2, 5)], "off_mask"),
        act=ACTSection([(0, 1), (2, 3)], {"beta": 0.4}),
        lynx=LynxSection.from_probe(_probe(64, 2)),
        difr=DiFRSection(k=8, seed=3),
        description="tiny test",
    )


def test_round_trip_all_sections(tiny_moe, tmp_path):
    cfg = full_config(tiny_moe)
    out = cfg.save(tmp_path / "cfg")
    assert (out / "config.json").is_file() and (out / "config.safetensors").is_file()
    back = InterventionConfig.load(out)
    assert back.to_json() == cfg.to_json()
    assert back.mote == cfg.mote and back.act == cfg.act and back.difr == cfg.difr
    assert back.model.weights_hash and back.model.weights_hash == cfg.model.weights_hash  # from the checkpoint dir
    for k, v in cfg.lynx.weights.items():
        assert torch.equal(back.lynx.weights[k], v)
    x = torch.randn(5, 64)
    probe = back.lynx.probe()
    assert torch.equal(probe(x), _probe(64, 2)(x))
    assert probe.calibration.q1 == float("inf")  # non-finite thresholds survive JSON
    assert back.problems(tiny_moe) == []
    # the file itself validates against the published JSON Schema with an independent validator
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.Draft202012Validator.check_schema(schema())
    jsonschema.validate(json.loads((out / "config.json").read_text()), schema())


def test_json_path_names_file(tiny_moe, tmp_path):
    cfg = InterventionConfig.for_model(tiny_moe, mote=MoTESection([(1, 0)], "on"))
    cfg.save(tmp_path / "x.json")
    assert not (tmp_path / "x.safetensors").exists()  # no tensors, no tensor file
    assert InterventionConfig.load(tmp_path / "x.json").mote.mode == "on"


def _doc(tiny_moe, tmp_path, **sections):
    cfg = InterventionConfig.for_model(tiny_moe, **sections)
    d = cfg.save(tmp_path / "cfg")
    return d, json.loads((d / "config.json").read_text())


def _rewrite(d, doc):
    (d / "config.json").write_text(json.dumps(doc))


def test_unknown_version(tiny_moe, tmp_path):
    d, doc = _doc(tiny_moe, tmp_path, mote=MoTESection([(1, 0)]))
    doc["version"] = 7
    _rewrite(d, doc)
    with pytest.raises(ConfigError, match=r"version: unknown version 7; this steer reads versions 1"):
        InterventionConfig.load(d)


def test_schema_errors_name_fields(tiny_moe, tmp_path):
    d, doc = _doc(tiny_moe, tmp_path, mote=MoTESection([(1, 0), (2, 1)]))
    doc["mote"]["mode"] = "sideways"
    doc["mote"]["experts"][1]["expert"] = -2
    doc["mote"]["colour"] = "red"
    del doc["model"]["params_hash"]
    _rewrite(d, doc)
    with pytest.raises(ConfigError) as err:
        InterventionConfig.load(d)
    problems = err.value.problems
    assert "mote.mode: 'sideways' is not one of 'off_mask', 'off_zero', 'on'" in problems
    assert "mote.experts[1].expert: -2 is below the minimum 0" in problems
    assert any(p.startswith("mote.colour: unknown field") for p in problems)
    assert "model.params_hash: required field is missing" in problems
    # the hand-written validator agrees with jsonschema on what is invalid
    jsonschema = pytest.importorskip("jsonschema")
    assert len(list(jsonschema.Draft202012Validator(schema()).iter_errors(doc))) == len(problems)


def test_semantic_errors(tiny_moe, tmp_path):
    d, doc = _doc(tiny_moe, tmp_path, mote=MoTESection([(1, 0), (2, 1)]))
    doc["mote"]["experts"].append({"layer": 1, "expert": 0})
    doc["mote"]["renormalize"] = True
    _rewrite(d, doc)
    with pytest.raises(ConfigError) as err:
        InterventionConfig.load(d)
    assert "mote.experts[2]: duplicate of mote.experts[0] (layer 1, expert 0)" in err.value.problems
    assert "mote.renormalize: only applies to mode off_zero (mode is off_mask)" in err.value.problems


def test_missing_and_mismatched_tensors(tiny_moe, tmp_path):
    cfg = InterventionConfig.for_model(tiny_moe, lynx=LynxSection.from_probe(_probe(64, 2)))
    d = cfg.save(tmp_path / "cfg")
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(d / "config.safetensors"))
    del tensors["lynx.mean"]
    tensors["lynx.std"] = tensors["lynx.std"][:10].contiguous()
    save_file(tensors, str(d / "config.safetensors"))
    with pytest.raises(ConfigError) as err:
        InterventionConfig.load(d)
    assert "tensors.lynx.mean: listed in config.json but missing from config.safetensors" in err.value.problems
    assert "tensors.lynx.std: shape [10] in config.safetensors, config.json says [64]" in err.value.problems
    (d / "config.safetensors").unlink()
    with pytest.raises(ConfigError, match="missing from config.safetensors"):
        InterventionConfig.load(d)
    (d / "config.safetensors").write_bytes(b"\x10\x00\x00")
    with pytest.raises(ConfigError, match="truncated or corrupt"):
        InterventionConfig.load(d)


def test_config_tensors_are_checksummed(tiny_moe, tmp_path):
    """config.safetensors is written through steer.io: an altered tensor is an error, not a changed probe."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from steer import io

    d = InterventionConfig.for_model(tiny_moe, lynx=LynxSection.from_probe(_probe(64, 2))).save(tmp_path / "cfg")
    with safe_open(str(d / "config.safetensors"), framework="pt") as f:
        header, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    assert header["format"] == "steer.intervention-config" and header["checksum"] == io.checksum(tensors)
    assert isinstance(io.load(d), InterventionConfig)  # steer.io opens a config directory too
    tensors["lynx.mean"] = tensors["lynx.mean"] + 1.0
    save_file(tensors, str(d / "config.safetensors"), metadata=header)
    with pytest.raises(ConfigError, match="checksum does not match"):
        InterventionConfig.load(d)


def test_out_of_range_ids(tiny_moe):
    cfg = InterventionConfig.for_model(
        tiny_moe, mote=MoTESection([(1, 3), (0, 2), (2, 19)]), act=ACTSection([(5, 0), (1, 4)]),
        lynx=LynxSection.from_probe(_probe(64, 7)),
    )
    problems = cfg.problems(tiny_moe)
    assert "mote.experts[1].layer: 0 is not an MoE layer (MoE layers: 1..2)" in problems
    assert "mote.experts[2].expert: 19 out of range 0..7" in problems
    assert "act.heads[0]: head (layer 5, head 0) is out of range: this model has 3 layers (0..2) x 4 query heads (0..3)" in problems
    assert any(p.startswith("act.heads[1]: head (layer 1, head 4) is out of range") for p in problems)
    assert any(p.startswith("lynx.points[0]:") and "7" in p for p in problems)
    with pytest.raises(ConfigError, match=r"mote.experts\[2\].expert: 19 out of range 0..7"):
        cfg.validate(tiny_moe)


def test_too_many_switched_experts(tiny_moe):
    off = InterventionConfig.for_model(tiny_moe, mote=MoTESection([(1, e) for e in range(7)], "off_mask"))
    assert any("leaving fewer than top_k=2" in p for p in off.problems(tiny_moe))
    on = InterventionConfig.for_model(tiny_moe, mote=MoTESection([(1, e) for e in range(3)], "on"))
    assert any("layer 1: 3 experts forced on but top_k is 2" in p for p in on.problems(tiny_moe))


def test_wrong_model_is_an_error(tiny_moe, tiny_moe_dir, tmp_path):
    other = tiny_model("qwen2_moe", seed=1)
    cfg = InterventionConfig.for_model(other, mote=MoTESection([(1, 0)]))
    problems = cfg.problems(tiny_moe)
    assert any(p.startswith("model.params_hash: config was made for") for p in problems)
    with pytest.raises(ConfigError, match="model.params_hash"):
        cfg.interventions(tiny_moe)
    dense = InterventionConfig.for_model(tiny_model("llama"), act=ACTSection([(0, 0)]))
    assert any(p.startswith("model.family:") for p in dense.problems(tiny_moe))
    # same parameters sampled by params_hash, different weight files: weights_hash catches it
    from transformers import AutoModelForCausalLM

    tweaked = AutoModelForCausalLM.from_pretrained(tiny_moe_dir)
    with torch.no_grad():
        tweaked.model.layers[1].mlp.experts.down_proj[0, 0, 0] += 1.0
    tweaked.save_pretrained(tmp_path / "tweaked")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "tweaked")
    cfg2 = InterventionConfig.for_model(reloaded, mote=MoTESection([(1, 0)]))
    assert cfg2.model.params_hash == InterventionConfig.for_model(tiny_moe).model.params_hash
    assert any(p.startswith("model.weights_hash: config was made for") for p in cfg2.problems(tiny_moe))


def test_apply_mote_in_steer_matches_expert_switch(tiny_moe):
    from steer.mote import ExpertSwitch

    cfg = InterventionConfig.for_model(tiny_moe, mote=MoTESection([(1, 3), (2, 5)], "off_mask"))
    x = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = tiny_moe(x).logits
        with cfg.apply(tiny_moe) as (iv,):
            steered = tiny_moe(x).logits
        with ExpertSwitch([(1, 3), (2, 5)], "off_mask").apply(tiny_moe):
            reference = tiny_moe(x).logits
    assert isinstance(iv, ExpertSwitch) and iv.total_touched > 0
    assert torch.equal(steered, reference) and not torch.equal(steered, plain)


def test_apply_needs_a_forward_section(tiny_moe):
    cfg = InterventionConfig.for_model(tiny_moe, difr=DiFRSection())
    with pytest.raises(ConfigError, match="nothing to apply"):
        cfg.apply(tiny_moe)


def test_schema_problems_is_strict_on_types():
    assert schema_problems([]) == ["(top level): expected object, got list []"]
    problems = schema_problems({"format": "steer.intervention-config", "version": 1, "model": {}, "difr": {"k": True,
                                                                                                        "seed": 0}})
    assert "difr.k: expected integer, got bool True" in problems


def test_act_section_applies_steer_act(tiny_moe):
    from steer.act import ACT, ACTConfig

    act_cfg = ACTConfig(heads=[(1, 0), (2, 3)], beta=0.4, tau=None, alpha=1.0)
    cfg = InterventionConfig.for_model(tiny_moe, act=ACTSection.from_act_config(act_cfg))
    assert cfg.act.act_config() == ACTConfig(heads=[(1, 0), (2, 3)], beta=0.4, tau=None, alpha=1.0)
    x = torch.randint(3, 256, (1, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        with cfg.apply(tiny_moe) as (iv,):
            steered = tiny_moe(x).logits
        with act_cfg.intervention().apply(tiny_moe):
            reference = tiny_moe(x).logits
    assert isinstance(iv, ACT) and iv.total_touched > 0 and torch.equal(steered, reference)


def test_act_params_are_checked(tiny_moe, tmp_path):
    d, doc = _doc(tiny_moe, tmp_path, act=ACTSection([(0, 1)], {"beta": 0.4}))
    doc["act"]["params"] = {"beta": 1.5, "gamma": 2}
    _rewrite(d, doc)
    with pytest.raises(ConfigError) as err:
        InterventionConfig.load(d)
    assert "act.params.gamma: unknown ACT parameter (known: beta, tau, alpha, min_queries, keep_first)" in err.value.problems
    assert any(p.startswith("act.params.beta: beta must be in (0, 1] (got 1.5)") for p in err.value.problems)
    doc["act"]["params"] = {"min_queries": 0}  # checked by ACT itself, as when the intervention is built
    _rewrite(d, doc)
    with pytest.raises(ConfigError) as err:
        InterventionConfig.load(d)
    assert err.value.problems == ["act.params: min_queries must be >= 1 (got 0)"]


def test_methods_own_their_checks(tiny_moe, tiny_moe_dir, tmp_path, monkeypatch):
    """A new rule in steer.mote / steer.act reaches the config, export and every serving check with no
    edit to steer.config: each method's checks have one implementation."""
    import steer.act as act
    import steer.mote as mote
    from steer.config import checkpoint_problems
    from steer.interventions import Problem
    from steer.serving.vllm_plugin import served_problems

    original = mote.fit_problems

    def reserve_expert_7(experts, *args, prefix="", **kw):
        return original(experts, *args, prefix=prefix, **kw) + [
            Problem(f"{prefix}experts[{i}].expert", "expert 7 is reserved") for i, (_, e) in enumerate(experts) if e == 7]

    monkeypatch.setattr(mote, "fit_problems", reserve_expert_7)
    cfg = InterventionConfig.for_model(tiny_moe, mote=MoTESection([(1, 3), (2, 7)]))
    expected = ["mote.experts[1].expert: expert 7 is reserved"]
    assert cfg.problems(tiny_moe) == expected  # steer's HF path
    assert checkpoint_problems(cfg, tiny_moe_dir) == expected  # steer export --target vllm --model DIR
    assert served_problems(cfg, tiny_moe.config, str(tiny_moe_dir), {1: None, 2: None}) == expected  # the vLLM plugin
    with pytest.raises(ValueError, match=r"experts\[1\].expert: expert 7 is reserved"):
        with cfg.mote.switch().apply(tiny_moe):
            pass

    def stricter_beta(beta):
        if beta > 0.5:
            raise ValueError(f"beta {beta} is above 0.5")
        return float(beta)

    monkeypatch.setattr(act, "_check_beta", stricter_beta)
    d, doc = _doc(tiny_moe, tmp_path, act=ACTSection([(0, 1)], {"beta": 0.4}))
    doc["act"]["params"]["beta"] = 0.6
    _rewrite(d, doc)
    with pytest.raises(ConfigError) as err:
        InterventionConfig.load(d)
    assert err.value.problems == ["act.params.beta: beta 0.6 is above 0.5"]


def test_checkpoint_check_is_shared(tiny_moe, tiny_moe_dir, tmp_path):
    """export and the vLLM plugin give the same answer: the one check in steer.config."""
    from steer.config import checkpoint_problems
    from steer.serving.vllm_plugin import served_problems

    cfg = InterventionConfig.for_model(tiny_moe, mote=MoTESection([(1, 3), (2, 19)]))
    assert checkpoint_problems(cfg, tiny_moe_dir) == served_problems(cfg, tiny_moe.config, str(tiny_moe_dir), {1: None, 2: None}) \
        == ["mote.experts[1].expert: 19 out of range 0..7"]
    assert served_problems(cfg, tiny_moe.config, str(tiny_moe_dir), {2: None}) == [
        "model.moe_layers: config was made for [1, 2], this model has [2]"]  # the server's own routers count
    assert checkpoint_problems(cfg, tmp_path / "nowhere") == [f"model: {tmp_path / 'nowhere'} is not a checkpoint directory"]
    no_hash = InterventionConfig.for_model(tiny_model("qwen2_moe"), mote=MoTESection([(1, 3)]))
    assert no_hash.model.weights_hash is None
    assert any(p.startswith("model.weights_hash: missing") for p in checkpoint_problems(no_hash, tiny_moe_dir))
