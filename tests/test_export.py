"""Exporters: vLLM dir, EasySteer moe_router, SGLang forward_hooks; formats, semantics, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from steer.config import ACTSection, ConfigError, DiFRSection, InterventionConfig, LynxSection, MoTESection
from steer.export import (
    EASYSTEER_SCHEMA,
    easysteer_problems,
    export,
    sglang_problems,
    to_easysteer,
    to_sglang,
)
from steer.tiny import save_tiny, tiny_model


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("moe"), "qwen2_moe")  # norm_topk_prob=True in the tiny config


@pytest.fixture(scope="module")
def model(ckpt):
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    return AutoModelForCausalLM.from_pretrained(ckpt).eval()


def test_easysteer_format(model, tmp_path):
    cfg = InterventionConfig.for_model(model, mote=MoTESection([(2, 5), (1, 3), (1, 0)], "off_mask"))
    res = export(cfg, "easysteer", tmp_path / "moe_router.json", norm_topk_prob=True)
    doc = json.loads(res.path.read_text())
    # the shape EasySteer's steermoe README documents: layer key -> {mode, expert_ids}
    assert doc == {"layer_configs": {"1": {"mode": "deactivate", "expert_ids": [0, 3]},
                                     "2": {"mode": "deactivate", "expert_ids": [5]}}}
    assert easysteer_problems(doc) == [] and res.notes == []
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(doc, EASYSTEER_SCHEMA)
    on = InterventionConfig.for_model(model, mote=MoTESection([(1, 3)], "on"))
    doc_on, notes = to_easysteer(on)
    assert doc_on["layer_configs"]["1"]["mode"] == "activate" and "max + epsilon" in notes[0]
    _, notes = to_easysteer(cfg, norm_topk_prob=False)
    assert "norm_topk_prob=False" in notes[0]


def test_easysteer_validator_catches_bad_documents():
    assert easysteer_problems({"layers": {}})[0].startswith("(top level)")
    bad = {"layer_configs": {"x": {"mode": "off", "expert_ids": [1, -1]}, "3": {"mode": "deactivate"}}}
    problems = easysteer_problems(bad)
    assert "layer_configs.x: layer keys must be decimal layer indices (0, 1, ...)" in problems
    assert any(p.startswith("layer_configs.x.mode: 'off' is not one of") for p in problems)
    assert "layer_configs.x.expert_ids: must be a list of non-negative integers" in problems
    assert any(p.startswith("layer_configs.3: deactivate needs expert ids") for p in problems)


EASYSTEER_VERDICTS = Path(__file__).parent / "fixtures" / "easysteer_moe_router" / "verdicts.json"
# documents EasySteer's loader accepts and then ignores in part (a silent no-op): steer reports them
STEER_STRICTER = {"unknown_layer_field", "negative_layer_key", "soft_empty_expert_ids"}


def test_easysteer_validator_agrees_with_easysteer_loader():
    """steer accepts what EasySteer's MoERouterAlgorithm.load_from_path accepts (topk, mode aliases, a
    missing mode, extra top-level keys) and rejects what it rejects (verdicts recorded from its code)."""
    docs = json.loads(EASYSTEER_VERDICTS.read_text())["documents"]
    assert {"missing_mode", "alias_suppress", "alias_steermoe", "soft_topk_topk", "topk_on_deactivate"} <= set(docs)
    for name, rec in docs.items():
        problems = easysteer_problems(rec["doc"])
        if name in STEER_STRICTER:
            assert rec["accepted"] and problems, name
        else:
            assert (problems == []) == rec["accepted"], (name, problems, rec.get("error"))
    assert "unknown fields ['expert_id']" in easysteer_problems(docs["unknown_layer_field"]["doc"])[0]
    jsonschema = pytest.importorskip("jsonschema")
    for name in ("missing_mode", "alias_boost", "soft_topk_topk", "extra_top_level_key"):
        jsonschema.validate(docs[name]["doc"], EASYSTEER_SCHEMA)


def test_easysteer_export_selects_what_easysteer_selects():
    """steer's exported deactivate/activate documents, run through EasySteer's own transform (recorded),
    select the experts steer's off_mask/on select on the same logits."""
    from steer.kernels.router import RouterEdit, RoutingRule, route_reference

    rec = json.loads(EASYSTEER_VERDICTS.read_text())
    logits = torch.tensor(rec["logits_seed0_randn_6x8"])
    rule = RoutingRule("softmax_topk", 2, norm_topk_prob=True)
    for name, mask_key in (("steer_export_deactivate", "off_mask"), ("steer_export_activate", "force_on")):
        doc = rec["documents"][name]
        for layer, selected in doc["top2_selection"].items():
            mask = torch.zeros(8, dtype=torch.bool)
            mask[doc["doc"]["layer_configs"][layer]["expert_ids"]] = True
            ours = route_reference(logits, rule, RouterEdit(**{mask_key: mask})).indices.sort(-1).values
            assert ours.tolist() == selected, (name, layer)


def test_unexpressible_configs_are_errors(model):
    zero = InterventionConfig.for_model(model, mote=MoTESection([(1, 3)], "off_zero"))
    with pytest.raises(ConfigError, match="mote.mode: off_zero .* no EasySteer"):
        to_easysteer(zero)
    with pytest.raises(ConfigError, match="mote.mode: off_zero"):
        to_sglang(zero)
    difr_only = InterventionConfig.for_model(model, difr=DiFRSection())
    with pytest.raises(ConfigError, match="mote: EasySteer"):
        to_easysteer(difr_only)
    with pytest.raises(ValueError, match="unknown export target 'tgi'"):
        export(difr_only, "tgi", "x")


def test_sglang_spec(model, tmp_path):
    """The list SGLang's --forward-hooks takes; SGLang's own hook manager loads it in tests/test_sglang.py,
    and the hooks reproduce steer's routing inside a real engine (vLLM) in tests/test_vllm.py."""
    cfg = InterventionConfig.for_model(model, mote=MoTESection([(1, 3), (2, 5), (2, 1)], "off_mask"))
    res = export(cfg, "sglang", tmp_path / "hooks.json", norm_topk_prob=True)
    specs = json.loads(res.path.read_text())
    assert any("--disable-cuda-graph" in n for n in res.notes)
    assert sglang_problems(specs) == []
    assert specs == [
        {"name": "steer-mote-layer-1", "target_modules": ["model.layers.1.mlp.gate"],
         "hook_factory": "steer.serving.sglang_hooks:router_logits_hook",
         "config": {"mode": "off_mask", "experts": [3], "num_experts": 8}},
        {"name": "steer-mote-layer-2", "target_modules": ["model.layers.2.mlp.gate"],
         "hook_factory": "steer.serving.sglang_hooks:router_logits_hook",
         "config": {"mode": "off_mask", "experts": [1, 5], "num_experts": 8}},
    ]
    from steer.serving.sglang_hooks import router_logits_hook

    hook = router_logits_hook(specs[1]["config"])
    logits = torch.randn(4, 8)
    out, bias = hook(None, (), (logits, None))  # SGLang's ReplicatedLinear returns (out, bias)
    assert torch.isinf(out[:, [1, 5]]).all() and torch.equal(out[:, [0, 2, 3, 4, 6, 7]], logits[:, [0, 2, 3, 4, 6, 7]])
    with pytest.raises(ValueError, match="router logits have 6 experts"):
        hook(None, (), torch.randn(2, 6))
    # the -inf hook followed by the family's own router is steer's off_mask, with or without renormalisation
    from steer.kernels.router import RouterEdit, RoutingRule, route

    off = torch.zeros(8, dtype=torch.bool)
    off[[1, 5]] = True
    for norm in (False, True):
        rule = RoutingRule("softmax_topk", 3, norm_topk_prob=norm)
        got, want = route(out, rule), route(logits, rule, RouterEdit(off_mask=off))
        assert torch.equal(got.indices.sort(-1).values, want.indices.sort(-1).values)
        torch.testing.assert_close(got.weights.sort(-1).values, want.weights.sort(-1).values)


def test_sglang_validator_catches_bad_specs():
    problems = sglang_problems([{"target_modules": [], "hook_factory": "nodots", "config": 3, "colour": 1},
                                {"target_modules": ["a"], "hook_factory": "steer.nope:factory"}])
    assert "forward_hooks[0].target_modules: must be a non-empty list of module name patterns" in problems
    assert "forward_hooks[0].hook_factory: must be 'module.sub:factory' or 'module.sub.factory'" in problems
    assert "forward_hooks[0].config: must be a JSON object" in problems
    assert any(p.startswith("forward_hooks[0]: unknown fields ['colour']") for p in problems)
    assert any(p.startswith("forward_hooks[1].hook_factory: cannot import steer.nope:factory") for p in problems)


def test_vllm_export_checks_checkpoint(model, ckpt, tmp_path):
    cfg = InterventionConfig.for_model(model, mote=MoTESection([(1, 3)]), difr=DiFRSection(k=4))
    res = export(cfg, "vllm", tmp_path / "served", model_path=ckpt)
    args = json.loads((res.path / "vllm_args.json").read_text())
    assert args["hf_overrides"]["steer_config"] == str(res.path.resolve())
    assert args["logits_processors"] == ["steer.serving.vllm_plugin:FingerprintLogitsProcessor"]
    assert InterventionConfig.load(res.path).to_json() == cfg.to_json()
    other = tmp_path / "other"
    tiny_model("qwen2_moe", seed=3).save_pretrained(other)
    with pytest.raises(ConfigError, match="model.weights_hash: config was made for"):
        export(cfg, "vllm", tmp_path / "x", model_path=other)
    act = InterventionConfig.for_model(model, act=ACTSection([(0, 0)]))
    with pytest.raises(ConfigError, match="act: ACT cannot run inside vLLM"):
        export(act, "vllm", tmp_path / "y")
    from test_config import _probe

    lynx = InterventionConfig.for_model(model, mote=MoTESection([(1, 3)]),
                                        lynx=LynxSection.from_probe(_probe(model.config.hidden_size, 2)))
    # a calibrated LYNX probe is served (no-rollback exit): its processor is in the engine arguments
    res = export(lynx, "vllm", tmp_path / "z")
    assert json.loads((res.path / "vllm_args.json").read_text())["logits_processors"] == [
        "steer.serving.vllm_lynx:LynxLogitsProcessor"]
    lynx.lynx.calibration = None  # an uncalibrated one has nothing to exit on: refused, never dropped
    with pytest.raises(ConfigError, match="lynx.calibration: the probe is not calibrated"):
        export(lynx, "vllm", tmp_path / "w")


def test_cli(model, ckpt, tmp_path, capsys):
    from steer.cli import main

    cfg = InterventionConfig.for_model(model, mote=MoTESection([(1, 3)]))
    src = cfg.save(tmp_path / "cfg")
    assert main(["export", "--target", "easysteer", str(src), "-o", str(tmp_path / "es.json"), "--model", str(ckpt),
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["target"] == "easysteer" and out["notes"] == []  # norm_topk_prob read from the checkpoint
    doc = json.loads((src / "config.json").read_text())
    doc["mote"]["experts"][0]["expert"] = 19
    (src / "config.json").write_text(json.dumps(doc))
    assert main(["export", "--target", "vllm", str(src), "-o", str(tmp_path / "v"), "--model", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert "mote.experts[0].expert: 19 out of range 0..7" in err
    assert main(["export", "--target", "steer", str(tmp_path / "missing"), "-o", str(tmp_path / "z")]) == 2
    assert "no intervention config at" in capsys.readouterr().err
