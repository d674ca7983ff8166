"""The one hook mechanism: capture, write, cleanup, padding, generation, reducers, interventions."""

import pytest
import torch

from steer.hooks import attach, capture
from steer.interventions import AddVector, NoEffectError, apply
from steer.reducers import Count, ExpertCounts, Histogram, Mean, TopK
from steer.tiny import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def batch(tok):
    return tok(["hello world", "hi"], return_tensors="pt", padding=True)


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_capture_matches_hf_hidden_states(batch):
    model = tiny_model("llama")
    with capture(model, ["blocks.*.resid_post", "embed.out", "final_norm.out"]) as cap:
        out = model(**batch, output_hidden_states=True)
    hs = out.hidden_states
    torch.testing.assert_close(cap["embed.out"][0], hs[0])
    for i in range(2):  # HF: hidden_states[i + 1] is layer i's output (last one is post-norm)
        torch.testing.assert_close(cap[f"blocks.{i}.resid_post"][0], hs[i + 1])
    torch.testing.assert_close(cap["final_norm.out"][0], hs[-1])


def test_hooks_removed_and_attention_restored_after_exception(batch):
    model = tiny_model("qwen2_moe")
    before, impl = _hook_count(model), model.config._attn_implementation
    with pytest.raises(RuntimeError, match="boom"):
        with capture(model, ["blocks.*.resid_post", "blocks.1.attn.pattern", "blocks.*.mlp.router.indices"]):
            model(**batch)
            assert model.config._attn_implementation == "steer"
            raise RuntimeError("boom")
    assert _hook_count(model) == before
    assert model.config._attn_implementation == impl
    ref = tiny_model("qwen2_moe")(**batch).logits
    torch.testing.assert_close(model(**batch).logits, ref)


def test_write_hook_changes_output_and_nested_contexts(batch):
    model = tiny_model("llama")
    base = model(**batch).logits
    with attach(model, {"blocks.1.resid_post": lambda x, ctx: x * 0}):
        zeroed = model(**batch).logits
        with capture(model, "blocks.1.resid_post") as cap:
            model(**batch)
        assert cap["blocks.1.resid_post"][0].abs().max() == 0  # readers after writers see the edit
    assert not torch.allclose(zeroed, base)
    torch.testing.assert_close(model(**batch).logits, base)


def test_token_mask_excludes_left_padding_in_generation(tok, batch):
    model = tiny_model("mixtral")
    counter, experts = Count(), ExpertCounts(num_experts=8)
    with capture(model, reducers={"blocks.0.resid_post": counter, "blocks.0.mlp.router.indices": experts}) as cap:
        out = model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=0)
    real_prompt = int(batch.attention_mask.sum())
    n_new = out.shape[1] - batch.input_ids.shape[1]
    expected = real_prompt + 2 * (n_new - 1)  # the last sampled token is never fed back
    assert counter.result()["blocks.0.resid_post"] == expected
    assert int(experts.result()[0].sum()) == expected * 2  # top-2 routing
    assert cap.session.calls == n_new


def test_token_selection_restricts_counts(batch):
    model = tiny_model("llama")
    counter = Count()
    sel = torch.zeros_like(batch.attention_mask, dtype=torch.bool)
    sel[:, -1] = True  # only the last position of each row
    with capture(model, reducers={"blocks.0.resid_post": counter}) as cap:
        cap.session.set_token_selection(sel)
        model(**batch)
    assert counter.result()["blocks.0.resid_post"] == 2


def test_selection_follows_positions_through_generation(batch):
    """A response-only selection must count only generated tokens, call after call (KV cache)."""
    model = tiny_model("llama")
    counter, pasts = Count(), []
    prompt_len = batch.input_ids.shape[1]
    sel = torch.zeros(2, prompt_len + 8, dtype=torch.bool)
    sel[:, prompt_len:] = True  # response tokens only
    with capture(model, reducers={"blocks.0.resid_post": [counter, lambda x, ctx: pasts.append(ctx.session.past_length)]}) as cap:
        cap.session.set_token_selection(sel)
        out = model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=0)
    n_new = out.shape[1] - prompt_len
    assert pasts == [0] + [prompt_len + i for i in range(n_new - 1)]
    assert counter.result()["blocks.0.resid_post"] == 2 * (n_new - 1)


def test_reducers_agree_with_full_capture(batch):
    model = tiny_model("llama")
    mean, hist, top = Mean(), Histogram(bins=20, lo=-5, hi=5), TopK(k=3)
    with capture(model, "blocks.2.resid_post", reducers={"blocks.2.resid_post": mean}) as cap:
        with capture(model, reducers={"blocks.2.resid_post": hist}), capture(model, reducers={"blocks.*.resid_post": top}):
            model(**batch)
    full = cap["blocks.2.resid_post"][0][batch.attention_mask.bool()]
    torch.testing.assert_close(mean.result()["blocks.2.resid_post"], full.mean(0))
    assert int(hist.result()["blocks.2.resid_post"].sum()) == full.numel()
    scores, where = top.result()["blocks.2.resid_post"]
    torch.testing.assert_close(scores, torch.topk(full.norm(dim=-1), 3).values)
    mask = batch.attention_mask.bool()
    for (_, row, pos) in where.tolist():
        assert mask[row, pos]  # never a padding token


def test_reducer_memory_does_not_grow_with_prompts(tok):
    model = tiny_model("olmoe")
    experts = ExpertCounts(num_experts=8)
    with capture(model, reducers={"blocks.*.mlp.router.indices": experts}):
        for i in range(20):
            model(**tok([f"prompt number {i}"], return_tensors="pt"))
        sizes = {k: v.numel() for k, v in experts.result().items()}
    assert sizes == {0: 8, 1: 8, 2: 8}


def test_add_vector_counts_real_tokens_and_no_effect_raises(batch):
    model = tiny_model("llama")
    base = model(**batch).logits
    iv = AddVector("blocks.1.resid_post", torch.randn(64), scale=3.0)
    with iv.apply(model):
        steered = model(**batch).logits
    assert iv.touched["blocks.1.resid_post"] == int(batch.attention_mask.sum())
    assert not torch.allclose(steered, base)
    with pytest.raises(NoEffectError, match="touched no token"):
        with iv.apply(model):
            pass  # applied, but nothing ran
    with pytest.warns(RuntimeWarning, match="touched no token"):
        with AddVector("blocks.1.resid_post", torch.randn(64), on_no_effect="warn").apply(model):
            pass
    with pytest.raises(ValueError, match="needs \\[64\\]"):
        with apply(model, AddVector("blocks.1.resid_post", torch.randn(10))):
            pass


def test_add_vector_last_position_in_generation(tok, batch):
    model = tiny_model("llama")
    iv = AddVector("blocks.0.resid_post", torch.randn(64), positions="last")
    with iv.apply(model):
        out = model.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=0)
    calls = out.shape[1] - batch.input_ids.shape[1]
    assert iv.total_touched == 2 * calls


def test_attention_pattern_rows_sum_to_one(batch):
    model = tiny_model("gemma3_text")
    with capture(model, "blocks.*.attn.pattern") as cap:
        model(**batch)
    mask = batch.attention_mask.bool()
    for layer in range(3):
        p = cap[f"blocks.{layer}.attn.pattern"][0]
        sums = p.sum(-1).permute(0, 2, 1)[mask]  # real query rows
        torch.testing.assert_close(sums, torch.ones_like(sums))
        # padding keys get no attention from real queries
        assert p[1][:, mask[1]][..., ~mask[1]].abs().max() == 0
    # gemma3 layer 0 is sliding-window (8): a query never sees keys more than 8 back
    p0 = cap["blocks.0.attn.pattern"][0][0]
    assert p0[:, 10, :3].abs().max() == 0


def test_attention_override_sees_call_and_can_replace(batch):
    model = tiny_model("llama")
    seen = []

    def override(call, ctx):
        seen.append((ctx.layer, tuple(call.query.shape), call.mask.dtype))
        out, w = call.base()
        return out * 0, w

    base = model(**batch).logits
    with attach(model, {"blocks.1.attn.impl": override}):
        changed = model(**batch).logits
    assert seen == [(1, (2, 4, 11, 16), torch.bool)]
    assert not torch.allclose(changed, base)
