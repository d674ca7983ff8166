"""steer.attention's masks: the plain causal pattern travels as a one-byte `CausalMask` stand-in (no N x N
tensor), every other pattern densely, and every consumer reads the same values transformers would build."""

import pytest
import torch
from transformers.masking_utils import sdpa_mask

from steer import attention
from steer.act import ACT
from steer.attention import CausalMask, attention_probs_reference, dense_mask
from steer.hooks import attach
from steer.sinks import detect_sinks
from steer.tiny import tiny_model, tiny_tokenizer


def _ids(n: int, b: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randint(5, 200, (b, n), generator=torch.Generator().manual_seed(seed))


def _left_padded(n: int, pads=(0, 5)) -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask = _ids(n, len(pads)), torch.ones(len(pads), n, dtype=torch.long)
    for row, p in enumerate(pads):
        ids[row, :p], mask[row, :p] = 0, 0
    return ids, mask


# case -> (family, input_ids, attention_mask or None, position_ids or None, decode steps)
def _case(name):
    window = 8  # tiny gemma3_text's sliding window
    if name == "llama-causal":
        return "llama", _ids(24), None, None, 3
    if name == "llama-padded":
        return ("llama", *_left_padded(24), None, 3)
    if name == "llama-packed":  # two sequences in one row: transformers' mask is not causal (no skip)
        return "llama", _ids(20), None, torch.cat([torch.arange(12), torch.arange(8)])[None], 0
    if name == "gemma-window-causal":  # the window cuts: sliding layers dense + marked, full layers causal
        return "gemma3_text", _ids(3 * window + 5), None, None, 3
    if name == "gemma-window-padded":
        return ("gemma3_text", *_left_padded(3 * window + 5), None, 3)
    raise KeyError(name)


CASES = ["llama-causal", "llama-padded", "llama-packed", "gemma-window-causal", "gemma-window-padded"]


def _run(model, ids, mask, pos, steps, hooks=None):
    """Logits of a prefill and `steps` cached decode steps (concatenated over positions)."""
    new = _ids(steps, ids.shape[0], seed=1)
    with attach(model, hooks or {}):
        kw = {"input_ids": ids, "use_cache": bool(steps)}
        if mask is not None:
            kw["attention_mask"] = mask
        if pos is not None:
            kw["position_ids"] = pos
        out = model(**kw)
        logits, cache = [out.logits], out.past_key_values
        for j in range(steps):
            if mask is not None:
                mask = torch.cat([mask, torch.ones(ids.shape[0], 1, dtype=mask.dtype)], 1)
            o = model(input_ids=new[:, j : j + 1], attention_mask=mask, cache=cache, use_cache=True)
            logits.append(o.logits)
            cache = o.past_key_values
    return torch.cat(logits, 1)


def _from_mask_values(call, ctx):
    """Attention computed from the values of `call.mask` (materialised where the call is causal)."""
    q, v = call.query, call.value
    p = attention_probs_reference(q, call.key, call.mask, call.scaling)
    v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1).float()
    return (p @ v).to(q.dtype).transpose(1, 2).contiguous(), None


def _eager(model, *args):
    prev = model.config._attn_implementation
    model.config._attn_implementation = "eager"
    try:
        return _run(model, *args)
    finally:
        model.config._attn_implementation = prev


@pytest.mark.parametrize("name", CASES)
def test_steer_routing_equals_sdpa_and_eager(name):
    """Prefill (causal, left-padded, packed, Gemma-style sliding window) and cached decode steps: steer's
    routing with handlers that run the model's own attention is SDPA exactly; handlers that read the mask's
    values and the eager pattern path give SDPA's and eager's logits."""
    family, ids, mask, pos, steps = _case(name)
    model = tiny_model(family)
    n = model.config.num_hidden_layers
    args = (ids, mask, pos, steps)
    sdpa, eager = _run(model, *args), _eager(model, *args)
    real = torch.ones(ids.shape[0], sdpa.shape[1], dtype=torch.bool)
    if mask is not None:
        real[:, : ids.shape[1]] = mask.bool()  # padded query rows: no real output to compare
    passthrough = _run(model, *args, hooks={f"blocks.{i}.attn.impl": lambda call, ctx: None for i in range(n)})
    assert torch.equal(passthrough, sdpa)  # the same SDPA calls as without steer
    values = _run(model, *args, hooks={f"blocks.{i}.attn.impl": _from_mask_values for i in range(n)})
    torch.testing.assert_close(values[real], sdpa[real], atol=1e-5, rtol=1e-5)
    pattern = _run(model, *args, hooks={f"blocks.{i}.attn.pattern": lambda p, ctx: None for i in range(n)})
    torch.testing.assert_close(pattern[real], eager[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(eager[real], sdpa[real], atol=1e-5, rtol=1e-5)


def test_the_stand_in_reads_as_the_mask_transformers_builds():
    """Only shape, dtype and device are answered without materialising; any operation sees the dense mask
    sdpa_mask builds without the causal skip (prefill: lower triangle; a decode row: every key)."""
    for b, tq, tk in ((2, 6, 6), (3, 1, 9)):
        kw = {"batch_size": b, "q_length": tq, "kv_length": tk, "q_offset": tk - tq}  # as a cache passes them
        m = attention._bool_mask(**kw, allow_is_causal_skip=True)
        assert isinstance(m, CausalMask) and attention.is_causal_mask(m)
        assert (m.shape, m.dtype, m.device, m.dim(), m.ndim, m.size(-1)) == ((b, 1, tq, tk), torch.bool,
                                                                              torch.device("cpu"), 4, 4, tk)
        assert m._dense is None  # metadata did not materialise it
        with torch._C.DisableTorchFunctionSubclass():
            assert m.untyped_storage().nbytes() == 1 and m.stride() == (0, 0, 0, 0)
        want = sdpa_mask(**kw, allow_is_causal_skip=False)
        assert torch.equal(want[0, 0], torch.ones(tq, tk, dtype=torch.bool).tril(tk - tq))
        assert type(dense_mask(m)) is torch.Tensor and torch.equal(dense_mask(m), want)
        assert torch.equal(~m, ~want) and torch.equal(m[:, :, -1:], want[:, :, -1:])
        assert torch.equal(m.float(), want.float()) and torch.equal(torch.where(m, 1, 0), want.long())
        assert torch.equal(torch.ops.aten.logical_not(m), ~want)
        q, k, v = torch.randn(3, b, 2, tq, 4).unbind(0) if tq == tk else (torch.randn(b, 2, tq, 4),
                                                                          *torch.randn(2, b, 2, tk, 4).unbind(0))
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=m)
        torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=want))
        assert m._dense is not None and dense_mask(m) is m._dense  # built once, then shared
    # no skip allowed (packed sequences, custom patterns): transformers' dense mask, as before
    m = attention._bool_mask(batch_size=1, q_length=5, kv_length=5, allow_is_causal_skip=False)
    assert type(m) is torch.Tensor and not attention.is_causal_mask(m)
    # padding: dense, not causal
    pad = torch.tensor([[0, 1, 1, 1, 1]], dtype=torch.bool)
    m = attention._bool_mask(batch_size=1, q_length=5, kv_length=5, attention_mask=pad)
    assert type(m) is torch.Tensor and not m[0, 0, :, 0].any()


@pytest.fixture
def built_masks(monkeypatch):
    """(shape, local_size) of every mask steer's mask function materialises, and of every stand-in read
    (local_size "causal")."""
    built = []

    def spy(*args, **kwargs):
        mask = sdpa_mask(*args, **kwargs)
        if mask is not None:
            built.append((tuple(mask.shape), kwargs.get("local_size")))
        return mask

    def spy_dense(b, tq, tk, device):
        built.append(((b, 1, tq, tk), "causal"))
        return causal_dense(b, tq, tk, device)

    causal_dense = attention._causal_dense
    monkeypatch.setattr(attention, "sdpa_mask", spy)
    monkeypatch.setattr(attention, "_causal_dense", spy_dense)
    return built


def test_a_causal_prefill_and_decode_materialise_no_mask(built_masks):
    """ACT (prefill and decode), sink discovery (all keys, candidates, sampled rows) and unhooked layers on
    unpadded inputs: handlers get the stand-in and never read it, so no Bool[.., N, N] mask is built."""
    model, tok = tiny_model("llama"), tiny_tokenizer()
    ids = _ids(40)
    seen = []

    def spy(call, ctx):
        seen.append((call.causal, type(call.attention_mask), tuple(call.attention_mask.shape)))

    heads = [(0, 1), (2, 3)]  # layer 1: the spy sees what handlers get
    with ACT(heads, tau=0.05, min_queries=2, on_no_effect="ignore").apply(model) as act:
        _run(model, ids, None, None, 3, hooks={"blocks.1.attn.impl": spy})
    assert act.total_touched > 0
    assert seen == [(True, CausalMask, (1, 1, 40, 40))] + [(True, CausalMask, (1, 1, 1, 41 + j)) for j in range(3)]
    for kw in ({}, {"candidates": [0, 3]}, {"sample_rows": 8}):
        detect_sinks(model, tok, [ids[0].tolist()], min_queries=1, keep_maps=False, **kw)  # maps: N x N
    assert built_masks == []
    # a padded batch builds its mask, as transformers does for SDPA
    detect_sinks(model, tok, [ids[0, :30].tolist(), ids[0].tolist()], min_queries=1, keep_maps=False)
    assert built_masks == [((2, 1, 40, 40), None)]


def test_sliding_models_build_only_their_window_masks(built_masks):
    """Gemma-3 style: the sliding layers' mask (causal + window, which transformers builds for SDPA too) is
    the only one built; the full-attention layers' causal mask is not."""
    model = tiny_model("gemma3_text")
    window = model.config.sliding_window
    n = 3 * window + 5
    with ACT([(0, 1), (1, 0), (2, 2)], tau=0.05, min_queries=2, on_no_effect="ignore").apply(model):
        _run(model, _ids(n), None, None, 2)
    # the prefill's sliding mask, then each decode step's one-row sliding mask (the cache holds `window` keys)
    assert built_masks == [((1, 1, n, n), window)] + [((1, 1, 1, window), window)] * 2


def test_handlers_that_read_the_mask_share_one_dense_mask(built_masks):
    """A handler on every layer that reads `call.mask` of a causal call: the dense mask is built once per
    forward and shared by the layers, and equals the plain causal pattern."""
    model = tiny_model("llama")
    masks = []

    def read(call, ctx):
        masks.append(call.mask)

    with attach(model, {f"blocks.{i}.attn.impl": read for i in range(model.config.num_hidden_layers)}):
        model(input_ids=_ids(12))
    assert built_masks == [((1, 1, 12, 12), "causal")]
    assert all(m is masks[0] for m in masks) and type(masks[0]) is torch.Tensor
    assert torch.equal(masks[0][0, 0], torch.ones(12, 12, dtype=torch.bool).tril())


def test_act_and_sinks_on_the_stand_in_equal_an_explicit_dense_mask():
    """The causal fast paths (stand-in, no mask read) against the masked paths given the same causal
    pattern as an explicit 4-D boolean mask (used as is by transformers): ACT's outputs and rows touched,
    prefill and decode."""
    model = tiny_model("llama")
    n, steps = 32, 3
    ids, new = _ids(n), _ids(steps, seed=1)
    heads = [(0, 1), (1, 0), (1, 3), (2, 2)]

    def act_run(path, dense):
        act = ACT(heads, tau=0.05, min_queries=2)
        act.path = path
        with act.apply(model):
            full = torch.ones(n + steps, n + steps, dtype=torch.bool).tril()
            m = full[None, None, :n, :n] if dense else None
            out = model(input_ids=ids, attention_mask=m, use_cache=True)
            logits, cache = [out.logits], out.past_key_values
            for j in range(steps):
                m = full[None, None, n + j : n + j + 1, : n + j + 1] if dense else None
                o = model(input_ids=new[:, j : j + 1], attention_mask=m, cache=cache, use_cache=True)
                logits.append(o.logits)
                cache = o.past_key_values
        return torch.cat(logits, 1), act.total_touched

    for path in ("lse", "kernel"):
        fast, touched_fast = act_run(path, dense=False)
        ref, touched_ref = act_run("kernel", dense=True)
        torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
        assert touched_fast == touched_ref > 0


def test_smollm2_act_and_sinks_build_no_mask(smollm2, built_masks):
    """The real model, 10 calibrated heads and sink discovery on one 256-token input: no N x N mask, and
    ACT's hidden states equal the exact path given an explicit dense causal mask."""
    from steer.sinks import book_inputs

    model, tok = smollm2.model, smollm2.tokenizer
    ids = torch.tensor(book_inputs(tok, n=1, length=256))
    heads = [(layer, (3 * layer) % model.config.num_attention_heads) for layer in range(2, 12)]
    states = {}
    for path, m in (("lse", None), ("kernel", torch.ones(1, 1, 256, 256, dtype=torch.bool).tril())):
        act = ACT(heads)
        act.path = path
        with torch.no_grad(), act.apply(model):
            states[path] = (model.model(input_ids=ids, attention_mask=m, use_cache=False).last_hidden_state,
                            act.total_touched)
    torch.testing.assert_close(states["lse"][0], states["kernel"][0], atol=2e-4, rtol=1e-4)
    assert states["lse"][1] == states["kernel"][1] > 0
    detect_sinks(model, tok, ids, candidates=[0, 1, 2, 3])
    assert built_masks == []
