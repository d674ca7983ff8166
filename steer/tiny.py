"""Tiny models of every supported family, built from configs with random weights.

They exist for fast tests: same module tree, router rules and attention code as the real models,
a few hundred thousand parameters. Weights are seeded, so two builds are identical.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from steer.adapters import ADAPTERS, Adapter

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

def _tiny_adapters() -> dict[str, Adapter]:
    """model_type -> adapter, for the families whose adapter entry carries a tiny config."""
    return {a.model_type: a for a in ADAPTERS.values() if a.tiny is not None}


def tiny_families() -> tuple[str, ...]:
    """The model types a tiny model can be built for (read from the adapter table when called)."""
    return tuple(_tiny_adapters())


def tiny_config(family: str, **overrides):
    """The config of a tiny model of `family` (a model_type such as gemma3_text, or a family name
    such as gemma3); `overrides` win over the adapter entry's tiny config and the shared sizes."""
    adapters = _tiny_adapters()
    adapter = adapters.get(family) or next((a for a in adapters.values() if a.family == family), None)
    if adapter is None:
        raise ValueError(
            f"no tiny config for family {family!r}; known: {', '.join(sorted(adapters))}. A family gets one "
            f"through the `tiny` field of its steer.adapters.Adapter entry."
        )
    kwargs = {**_COMMON, **adapter.tiny, **overrides}
    config = AutoConfig.for_model(adapter.model_type, **kwargs)
    config.architectures = [adapter.architecture]  # so TransformerLens can boot a model built from a config
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


def save_tiny(path, family: str, seed: int = 0, **overrides):
    """Write a tiny `family` model and the tiny tokenizer as a checkpoint directory at `path` (what
    steer.models.load and the CLI read); returns the path."""
    tiny_model(family, seed=seed, **overrides).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


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


# The built-in tiny families (a snapshot at import; tiny_families() also sees families registered later).
FAMILIES = tiny_families()
