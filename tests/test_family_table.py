"""The adapter table is the one place that knows model families.

A family added in one `Adapter` entry (here two families transformers ships that steer's table does
not carry: FlexOlmo, an MoE, and Mistral, a dense model) is picked up by the tiny models, attach, the
routing rule, profiling, switching, sinks, ACT, export and the vLLM plugin's table; and no other module
names a family.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch

from steer.act import ACT
from steer.adapters import (
    ADAPTERS,
    Adapter,
    UnsupportedModelError,
    model_map,
    register,
    routing_rule,
    supported_families,
    vllm_architectures,
)
from steer.config import InterventionConfig, MoTESection
from steer.export import export
from steer.ftri import ProfileConfig, profile
from steer.hooks import capture
from steer.kernels.router import route
from steer.mote import ExpertSwitch
from steer.sinks import detect_sinks
from steer.tiny import tiny_families, tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]

FLEX_OLMO = Adapter(
    "flex_olmo", ("flex_olmo",), "FlexOlmoForCausalLM", routing="softmax_topk",
    rule_options=lambda config, dtype: dict(norm_topk_prob=bool(config.norm_topk_prob)),
    router="mlp.gate", experts="mlp.experts", vllm="vllm.model_executor.models.flex_olmo",
    tiny=dict(num_experts=8, num_experts_per_tok=2, norm_topk_prob=False),
)
MISTRAL = Adapter("mistral", ("mistral",), "MistralForCausalLM")

TEXTS = ["the quick brown fox jumps over the lazy dog", "a b c d e f g h i j k l m n", "hello there, world"]


def test_unknown_family_error_lists_the_table():
    with pytest.raises(ValueError, match="no tiny config for family 'flex_olmo'"):
        tiny_model("flex_olmo")
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("mistral", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=2, num_key_value_heads=1, vocab_size=64)
    with pytest.raises(UnsupportedModelError, match=", ".join(supported_families())):
        model_map(AutoModelForCausalLM.from_config(cfg))


def test_moe_family_added_in_one_entry(tmp_path):
    tok = tiny_tokenizer()
    with register(FLEX_OLMO):
        assert "flex_olmo" in tiny_families()
        model = tiny_model("flex_olmo")
        mm = model_map(model)
        assert mm.adapter is FLEX_OLMO and mm.moe_layers == [0, 1, 2] and mm.num_experts == 8

        # the table's routing rule reproduces the model's own router, bit for bit
        batch = tok(TEXTS, return_tensors="pt", padding=True)
        with capture(model, ["blocks.1.mlp.router"]) as cap:
            model(**batch)
        logits, weights, indices = cap["blocks.1.mlp.router"][0]
        res = route(logits, routing_rule(model.config, hidden_dtype=torch.float32))
        assert torch.equal(res.indices, indices) and torch.equal(res.weights, weights)

        # fTRI profiling and MoTE switching
        prof = profile(model, tok, {"a": [f"alpha {i} beta" for i in range(6)], "b": [f"ZZ{i}QQ!!" for i in range(6)]},
                       ProfileConfig(n_bootstrap=0), progress=False)
        switch = ExpertSwitch.from_profile(prof, k=3, mode="off_mask", model=model)
        with switch.apply(model) as applied:
            model(**batch)
        assert applied.total_touched > 0

        # export (EasySteer, and vLLM with the checkpoint check) and the vLLM plugin's table
        from transformers import AutoModelForCausalLM

        model.save_pretrained(tmp_path / "ckpt")
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")  # configs carry the weights' hash
        cfg = InterventionConfig.for_model(loaded, mote=MoTESection(switch.experts, "off_mask"))
        doc = json.loads(export(cfg, "easysteer", tmp_path / "moe_router.json", norm_topk_prob=False).path.read_text())
        assert sorted(int(layer) for layer in doc["layer_configs"]) == sorted({layer for layer, _ in switch.experts})
        served = export(cfg, "vllm", tmp_path / "served", model_path=tmp_path / "ckpt")
        assert (served.path / "vllm_args.json").exists()
        assert vllm_architectures()["FlexOlmoForCausalLM"] == "vllm.model_executor.models.flex_olmo"
    assert "flex_olmo" not in ADAPTERS and "FlexOlmoForCausalLM" not in vllm_architectures()


def test_dense_family_added_in_one_entry():
    tok = tiny_tokenizer()
    with register(MISTRAL):
        model = tiny_model("mistral")
        assert model_map(model).adapter is MISTRAL and model_map(model).moe_layers == []
        batch = tok(TEXTS, return_tensors="pt", padding=True)
        result = detect_sinks(model, tok, TEXTS, alpha=1.0)
        assert result.path == "streaming"  # the table names no attention quirk: the fast path runs
        assert tuple(result.scores.shape[:3]) == (3, model.config.num_hidden_layers, model.config.num_attention_heads)
        base = model(**batch).logits
        with ACT([(0, 1), (1, 0)], on_no_effect="ignore").apply(model):
            steered = model(**batch).logits
        assert not torch.allclose(base, steered)


def test_register_refuses_to_shadow_a_family():
    with pytest.raises(ValueError, match="already has an adapter; pass replace=True"):
        with register(Adapter("llama", ("llama",), "LlamaForCausalLM")):
            pass
    assert ADAPTERS["llama"].architecture == "LlamaForCausalLM"


# Modules allowed to name a family, and why: the MoE builder converts one concrete format into
# another (Llama/Qwen2 dense -> a Qwen2-MoE checkpoint), and the GGUF loader maps llama.cpp's spellings
# of architecture names onto transformers' (they are file-format names, not steer's family knowledge).
ALLOWED = {"steer/adapters.py", "steer/moebuild.py", "steer/checkpoints.py"}


def _family_names() -> set[str]:
    names = set()
    for a in ADAPTERS.values():
        names |= {a.family, a.architecture, *a.model_types}
    return names


@pytest.mark.skipif(not (ROOT / "steer" / "adapters.py").is_file(),
                    reason="reads the source checkout (tests run from an installed wheel)")
def test_no_other_module_names_a_family():
    names, found = _family_names(), []
    for folder in ("steer", "kernels", "probes", "apps"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel in ALLOWED:
                continue
            tree = ast.parse(path.read_text())
            docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                          if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef)) and n.body
                          and isinstance(n.body[0], ast.Expr)}  # prose may give examples; code may not
            for node in ast.walk(tree):
                if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                    words = {w.strip(".,;:()'\"`") for w in node.value.split()} | {node.value}
                    found += [f"{rel}:{node.lineno}: {w!r}" for w in words & names]
    assert not found, "family names outside steer/adapters.py (ask the adapter table instead):\n" + "\n".join(found)
