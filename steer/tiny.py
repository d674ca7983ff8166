"""Tiny models of every supported family, built from configs with random weights.

They exist for fast tests: same module tree, router rules and attention code as the real models,
a few hundred thousand parameters. Weights are seeded, so two builds are identical.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

_COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=256,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    tie_word_embeddings=False,
)

# Per-family overrides: expert counts, top-k, and each family's routing switches.
TINY_CONFIGS: dict[str, dict] = {
    "llama": {},
    "qwen2": {},
    "gemma3_text": dict(sliding_window=8, layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2),
    "qwen2_moe": dict(
        num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
        shared_expert_intermediate_size=64, norm_topk_prob=True, mlp_only_layers=[0],
    ),
    "qwen3_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=False),
    "olmoe": dict(num_experts=8, num_experts_per_tok=2, norm_topk_prob=False),
    "deepseek_v3": dict(
        n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2, moe_intermediate_size=32,
        first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8,
        v_head_dim=16, num_key_value_heads=4, head_dim=8, routed_scaling_factor=2.5, norm_topk_prob=True,
    ),
    "gpt_oss": dict(num_local_experts=8, num_experts_per_tok=2, sliding_window=8,
                    layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    "granitemoe": dict(num_local_experts=8, num_experts_per_tok=2),
}

# What `config.architectures` should say, so TransformerLens can boot a model built from a config.
_ARCHITECTURES = {
    "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM",
    "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
    "olmoe": "OlmoeForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM", "gpt_oss": "GptOssForCausalLM",
    "granitemoe": "GraniteMoeForCausalLM",
}


def tiny_config(family: str, **overrides):
    """The config of a tiny `family` model; `overrides` win over the defaults."""
    if family not in TINY_CONFIGS:
        raise ValueError(f"no tiny config for family {family!r}; known: {', '.join(sorted(TINY_CONFIGS))}")
    kwargs = {**_COMMON, **TINY_CONFIGS[family], **overrides}
    config = AutoConfig.for_model(family, **kwargs)
    config.architectures = [_ARCHITECTURES[family]]
    return config


def tiny_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> PreTrainedModel:
    """A randomly initialised tiny `family` model in eval mode, identical for the same seed.

    Router and correction-bias weights are re-drawn so routing is not degenerate (several
    families initialise routers to zeros, which would make every top-k a tie).
    """
    config = tiny_config(family, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith((".gate.weight", ".router.weight", ".router.bias")) and param.dim() <= 2:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
            elif "experts" in name and param.dim() == 3:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn(buf.shape, generator=gen) * 0.1)
    return model.eval()


def tiny_tokenizer():
    """A small byte-level tokenizer (256 ids, matching the tiny models' vocab) with a pad token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"<{i}>": i for i in range(3)}
    for b in range(3, 256):
        vocab[chr(b) if 32 <= b < 127 else f"<0x{b:02X}>"] = b
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<0>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<0>", bos_token="<1>", eos_token="<2>", unk_token="<0>",
        padding_side="left",
    )
    return fast


FAMILIES = tuple(TINY_CONFIGS)
