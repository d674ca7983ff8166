"""Every family's adapter finds every canonical point, with the right shapes."""

import pytest
import torch

from steer.adapters import ADAPTERS, UnknownPointError, UnsupportedModelError, adapter_for, model_map
from steer.hooks import capture
from steer.tiny import FAMILIES, tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def batch():
    tok = tiny_tokenizer()
    return tok(["hello world", "hi"], return_tensors="pt", padding=True)


def test_every_family_has_an_adapter():
    for family in FAMILIES:
        assert adapter_for(tiny_model(family)).family in ADAPTERS


@pytest.mark.parametrize("family", FAMILIES)
def test_every_point_found_with_shape(family, batch):
    model = tiny_model(family)
    mm = model_map(model)
    c = model.config
    B, T = batch.input_ids.shape
    D, H, Hkv = c.hidden_size, c.num_attention_heads, mm.n_kv_heads
    points = mm.all_points()
    with capture(model, points) as cap:
        model(**batch)
    assert set(cap) == set(points)
    head_dim = getattr(c, "head_dim", D // H)
    for name in points:
        value = cap[name][0]
        kind = name.split(".", 2)[-1] if name.startswith("blocks.") else name
        expected = {
            "embed.out": (B, T, D), "final_norm.out": (B, T, D), "lm_head.out": (B, T, c.vocab_size),
            "resid_pre": (B, T, D), "resid_post": (B, T, D), "attn.in": (B, T, D), "attn.out": (B, T, D),
            "mlp.in": (B, T, D), "mlp.out": (B, T, D), "attn.pattern": (B, H, T, T),
            "attn.q": (B, T, H * head_dim), "attn.k": (B, T, Hkv * head_dim), "attn.v": (B, T, Hkv * head_dim),
            "mlp.router.logits": (B * T, mm.num_experts), "mlp.router.weights": (B * T, mm.top_k),
            "mlp.router.indices": (B * T, mm.top_k),
        }.get(kind)
        if kind == "mlp.router":
            assert [tuple(v.shape) for v in value] == [(B * T, mm.num_experts), (B * T, mm.top_k), (B * T, mm.top_k)]
        else:
            assert tuple(value.shape) == expected, (name, tuple(value.shape), expected)
    # the final-norm point is exactly what feeds lm_head
    logits = model.lm_head(cap["final_norm.out"][0])
    torch.testing.assert_close(logits, cap["lm_head.out"][0])


def test_moe_layers_skip_dense_layers():
    assert model_map(tiny_model("qwen2_moe")).moe_layers == [1, 2]  # mlp_only_layers=[0]
    assert model_map(tiny_model("deepseek_v3")).moe_layers == [1, 2]  # first_k_dense_replace=1
    assert model_map(tiny_model("mixtral")).moe_layers == [0, 1, 2]
    assert model_map(tiny_model("llama")).moe_layers == []


def test_unsupported_family_error_lists_families_and_fix():
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("gpt2", n_layer=1, n_embd=32, n_head=2, vocab_size=64)
    with pytest.raises(UnsupportedModelError) as err:
        adapter_for(AutoModelForCausalLM.from_config(cfg))
    msg = str(err.value)
    assert "'gpt2'" in msg and "llama" in msg and "ADAPTERS" in msg


def test_bad_points_and_layers_are_clear_errors():
    mm = model_map(tiny_model("llama"))
    with pytest.raises(IndexError, match="out of range.*3 layers"):
        mm.resolve("blocks.7.resid_post")
    with pytest.raises(UnknownPointError, match="unknown point 'blocks.0.resid_middle'"):
        mm.resolve("blocks.0.resid_middle")
    with pytest.raises(UnknownPointError, match="no router.*dense"):
        mm.resolve("blocks.0.mlp.router.indices")
    with pytest.raises(UnknownPointError, match="no plain q"):
        model_map(tiny_model("deepseek_v3")).resolve("blocks.1.attn.q")
    with pytest.raises(UnknownPointError):
        mm.expand("blocks.*.nothing")


def test_routing_rules_follow_configs():
    assert model_map(tiny_model("mixtral")).routing_rule().norm_topk_prob is True
    assert model_map(tiny_model("qwen3_moe")).routing_rule().norm_topk_prob is False
    r = model_map(tiny_model("deepseek_v3")).routing_rule()
    assert (r.kind, r.n_group, r.topk_group, r.routed_scaling_factor) == ("sigmoid_group", 4, 2, 2.5)
    assert model_map(tiny_model("gpt_oss")).routing_rule().kind == "topk_softmax"
