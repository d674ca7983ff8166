"""steer.attention: the causal-mask fast path keeps unhooked layers on SDPA's own kernels."""

import torch

from steer import attention
from steer.adapters import model_map
from steer.hooks import attach
from steer.tiny import tiny_model, tiny_tokenizer


def _modules(model):
    mm = model_map(model)
    return {i: mm.module(f"{mm.adapter.layers}.{i}.{mm.adapter.attn}") for i in range(mm.n_layers)}


def test_unpadded_batches_are_marked_causal_and_unhooked_layers_match_sdpa_exactly():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    ids = tok(["the quick brown fox jumps over the lazy dog"], return_tensors="pt").input_ids
    plain = model(input_ids=ids).logits
    with attention.activate(model, _modules(model), {}, {}):
        routed = model(input_ids=ids).logits
    assert torch.equal(routed, plain)  # not merely close: the same SDPA call as without steer
    seen = []
    with attach(model, {"blocks.0.attn.impl": lambda call, ctx: seen.append(call.causal)}):
        model(input_ids=ids)
        out = model(input_ids=ids, use_cache=True)
        model(input_ids=ids[:, :1], cache=out.past_key_values, use_cache=True)  # decode row: causal
        enc = tok(["a b", "a much longer text here"], return_tensors="pt", padding=True)
        model(**enc)  # left padding: not causal
    assert seen == [True, True, True, False]


def test_windowed_layers_are_not_marked_causal_once_the_window_cuts():
    model = tiny_model("gemma3_text")
    window = model.config.sliding_window
    ids = torch.randint(5, 200, (1, window + 3))
    seen = {}
    layers = {i: t for i, t in enumerate(model.config.layer_types)}

    def record(call, ctx):
        seen.setdefault(ctx.layer, call.causal)  # returns None: the layer runs its own attention

    hooks = {f"blocks.{i}.attn.impl": record for i in layers}
    with attach(model, hooks):
        model(input_ids=ids)
    for i, t in layers.items():
        assert seen[i] == (t != "sliding_attention"), (i, t)


def test_unpadded_windowed_masks_are_marked_window_causal_and_padded_ones_are_not():
    """Once the window cuts, an unpadded sliding layer's mask is checked equal to causal + window and marked
    (handlers may apply the window per query block); a padded batch's is not, nor are full layers'."""
    model, tok = tiny_model("gemma3_text"), tiny_tokenizer()
    window = model.config.sliding_window
    ids = torch.randint(5, 200, (1, 3 * window + 5))
    sliding = {i for i, t in enumerate(model.config.layer_types) if t == "sliding_attention"}
    seen = []

    def record(call, ctx):
        if call.window_causal:  # the mask really is that pattern
            t = call.query.shape[2]
            i = torch.arange(t)
            band = (i[None] <= i[:, None]) & (i[:, None] - i[None] < call.sliding_window)
            assert torch.equal(call.mask[:, 0], band.expand(call.mask.shape[0], t, t))
        seen.append((ctx.layer, call.causal, call.window_causal))

    hooks = {f"blocks.{i}.attn.impl": record for i in range(model.config.num_hidden_layers)}
    with attach(model, hooks):
        model(input_ids=ids)
        assert seen == [(i, i not in sliding, i in sliding) for i in range(model.config.num_hidden_layers)]
        seen.clear()
        enc = tok(["a b", "a much longer text here, longer than the window"], return_tensors="pt", padding=True)
        model(**enc)
        assert seen == [(i, False, False) for i in range(model.config.num_hidden_layers)]


def test_a_decode_row_that_sees_its_whole_sliding_cache_is_causal_for_handlers():
    """A sliding cache as long as its window: transformers builds an all-True one-row mask (it skips only
    shorter caches); handlers see it as causal, and unhooked layers still get it, with the same logits."""
    model = tiny_model("gemma3_text")
    window = model.config.sliding_window
    ids = torch.randint(5, 200, (1, 2 * window))
    plain = model(input_ids=ids[:, :-1], use_cache=True)
    plain_step = model(input_ids=ids[:, -1:], cache=plain.past_key_values, use_cache=True).logits
    seen = []

    def record(call, ctx):
        if call.query.shape[2] == 1:
            seen.append((ctx.layer, call.causal, call.mask is not None and bool(call.mask.all())))

    with attach(model, {"blocks.0.attn.impl": record}):
        out = model(input_ids=ids[:, :-1], use_cache=True)
        step = model(input_ids=ids[:, -1:], cache=out.past_key_values, use_cache=True).logits
    assert model.config.layer_types[0] == "sliding_attention" and seen == [(0, True, True)]
    assert torch.equal(step, plain_step)
