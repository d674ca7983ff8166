"""MoTE expert switching: parity with a by-hand router edit, generation, controls, bad inputs."""

import copy
import functools
import types

import pytest
import torch
import torch.nn.functional as F

from steer.adapters import model_map
from steer.ftri import DenseModelError, ProfileConfig, profile
from steer.identity import ModelMismatchError
from steer.interventions import NoEffectError
from steer.mote import ExpertSwitch
from steer.mote_eval import evaluate, perplexity
from steer.stats import wilson_ci
from steer.tiny import tiny_model as _build_tiny
from steer.tiny import tiny_tokenizer


@functools.cache
def tiny_model(family, seed=0):
    """Tiny models are built once per test module: nothing here mutates them (hooks are removed)."""
    return _build_tiny(family, seed=seed)


MOE = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss", "granitemoe")


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def batch(tok):
    return tok(["the quick brown fox jumps", "hi there", "MoE!"], return_tensors="pt", padding=True)


# ---- an independent reference: each router's forward rewritten by hand with the edit inside -------

def _hand_route(router, family, hidden, off=(), zero=(), on=(), renorm=False, force_max=False):
    """Router forward of `family` (transcribed from transformers 5) with the switch written in."""
    cfg = router._cfg
    x = hidden.reshape(-1, hidden.shape[-1])
    k = cfg.num_experts_per_tok
    neg = float("-inf")
    if family == "deepseek_v3":
        logits = F.linear(x.float(), router.weight.float())
        value = logits.sigmoid()  # the per-expert gate value
        choice = value + router.e_score_correction_bias
        choice[:, list(off)] = neg
        G = cfg.n_group
        grouped = choice.view(-1, G, choice.shape[1] // G)
        top2 = grouped.topk(2, dim=-1)[0]
        gscore = torch.where(torch.isinf(top2[..., 1]), top2[..., 0], top2.sum(-1))  # a removed expert is absent
        gidx = torch.topk(gscore, cfg.topk_group, dim=-1)[1]
        gmask = torch.zeros_like(gscore).scatter_(1, gidx, 1).bool()
        choice = choice.masked_fill(~gmask.repeat_interleave(choice.shape[1] // G, 1), neg)
    elif family in ("gpt_oss", "granitemoe"):
        logits = F.linear(x, router.weight, getattr(router, "bias", None)).float()
        value = logits.clone()
        choice = logits.clone()
        choice[:, list(off)] = neg
    else:  # softmax_topk: a switched-off expert's logit is -inf before the softmax (SteerMoE, the spec)
        logits = F.linear(x, router.weight)
        masked_logits = logits.clone()
        masked_logits[:, list(off)] = neg
        value = F.softmax(masked_logits, dim=-1, dtype=torch.float)
        choice = value.clone()
        choice[:, list(off)] = neg
    idx = torch.topk(choice, k, dim=-1)[1]  # descending
    for e in on:  # force: replace the lowest-ranked selected non-forced expert
        for t in range(idx.shape[0]):
            row = idx[t].tolist()
            if e in row:
                continue
            for j in range(k - 1, -1, -1):
                if row[j] not in on:
                    row[j] = e
                    break
            idx[t] = torch.tensor(row)
    val = value.gather(1, idx)
    if force_max and on:
        forced = torch.isin(idx, torch.tensor(list(on)))
        best = val.masked_fill(forced, neg).amax(-1, keepdim=True)
        val = torch.where(forced, best, val)
    if family == "deepseek_v3":
        w = val / (val.sum(-1, keepdim=True) + 1e-20) if cfg.norm_topk_prob else val
        w = w * cfg.routed_scaling_factor
    elif family in ("gpt_oss", "granitemoe"):
        w = torch.softmax(val, dim=-1)
    else:
        norm = family == "mixtral" or cfg.norm_topk_prob
        w = val / val.sum(-1, keepdim=True) if norm else val
    if zero:
        z = torch.isin(idx, torch.tensor(list(zero)))
        w0 = w.masked_fill(z, 0.0)
        if renorm:
            kept = w0.sum(-1, keepdim=True)
            w0 = torch.where(kept > 0, w0 * (w.sum(-1, keepdim=True) / kept), torch.zeros_like(w0))
        w = w0
    return logits, w.to(hidden.dtype if family not in ("mixtral", "deepseek_v3") else torch.float32), idx


def _hand_edited_copy(model, family, layers, **edit):
    """A deep copy whose router modules at `layers` run `_hand_route` (the model itself untouched)."""
    ref = copy.deepcopy(model)
    mm = model_map(ref)
    for layer in layers:
        router = mm.module(f"{mm.adapter.layers}.{layer}.{mm.adapter.router}")
        router._cfg = ref.config
        router.forward = types.MethodType(lambda self, h: _hand_route(self, family, h, **edit), router)
    return ref


CASES = [
    ("off_mask", {}, lambda e: dict(off=e)),
    ("off_zero", {}, lambda e: dict(zero=e)),
    ("off_zero", {"renormalize": True}, lambda e: dict(zero=e, renorm=True)),
    ("on", {}, lambda e: dict(on=e)),
    ("on", {"force_weight": "max"}, lambda e: dict(on=e, force_max=True)),
]


# Every family under off_mask and on; every mode on one family per routing rule (+ qwen3: no renorm).
_IDS = ["off_mask", "off_zero", "off_zero_renorm", "on_gate", "on_max"]
PARITY = sorted({(f, i) for f in MOE for i in (0, 3)} | {(f, i) for f in ("mixtral", "qwen3_moe", "deepseek_v3",
                                                                          "gpt_oss") for i in range(5)})


@pytest.mark.parametrize("family,case", PARITY, ids=[f"{f}-{_IDS[i]}" for f, i in PARITY])
def test_switch_matches_hand_edited_router(family, case, batch):
    mode, kw, hand = CASES[case]
    model = tiny_model(family)
    mm = model_map(model)
    layer = mm.moe_layers[-1]
    experts = [3] if mode == "on" else [1, 6]
    switch = ExpertSwitch([(layer, e) for e in experts], mode, **kw)
    with switch.apply(model):
        got = model(**batch).logits
    want = _hand_edited_copy(model, family, [layer], **hand(experts))(**batch).logits
    real = batch.attention_mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=2e-5, rtol=1e-4)
    base = model(**batch).logits
    assert not torch.allclose(got[real], base[real])  # the edit did something
    # touched = real tokens whose routing changed at that layer, never more than the real tokens
    assert 0 < switch.touched[f"blocks.{layer}.mlp.router"] <= int(real.sum())


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3", "gpt_oss"])
def test_switch_in_batched_left_padded_generation_with_kv_cache(family, tok, batch):
    model = tiny_model(family)
    mm = model_map(model)
    experts = [(layer, e) for layer in mm.moe_layers for e in (0, 5)]
    switch = ExpertSwitch(experts, "off_mask")
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    with switch.apply(model):
        got = model.generate(**batch, **kw)
    ref = _hand_edited_copy(model, family, mm.moe_layers, off=(0, 5))
    want = ref.generate(**batch, **kw)
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.logits, want.logits):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    # every decode step's real tokens were routed through the switch; padding never counted
    real_prompt = int(batch.attention_mask.sum())
    steps = got.sequences.shape[1] - batch.input_ids.shape[1]
    max_tokens = (real_prompt + 3 * (steps - 1)) * len(mm.moe_layers)
    assert 0 < switch.total_touched <= max_tokens
    assert sum(switch.seen.values()) == max_tokens


def test_padding_tokens_keep_their_routing(batch):
    """The hook passes token_mask: padded rows route as the model would, and are never counted."""
    model = tiny_model("mixtral")
    seen = {}

    from steer.hooks import capture

    switch = ExpertSwitch([(0, e) for e in range(3)], "off_mask")
    with switch.apply(model), capture(model, "blocks.0.mlp.router.indices") as cap:
        model(**batch)
    seen["edited"] = cap["blocks.0.mlp.router.indices"][0]
    with capture(model, "blocks.0.mlp.router.indices") as cap:
        model(**batch)
    seen["plain"] = cap["blocks.0.mlp.router.indices"][0]
    pad = ~batch.attention_mask.bool().reshape(-1)
    assert torch.equal(seen["edited"][pad].sort(-1)[0], seen["plain"][pad].sort(-1)[0])
    assert not (seen["edited"][~pad] < 3).any()  # real tokens never reach a masked expert


def test_random_like_same_per_layer_counts_and_disjoint():
    model = tiny_model("olmoe")
    s = ExpertSwitch([(0, 1), (0, 2), (2, 7)], "off_zero")
    r1, r2 = ExpertSwitch.random_like(s, 1, model), ExpertSwitch.random_like(s, 1, model)
    assert r1.experts == r2.experts  # seeded
    assert {k: len(v) for k, v in r1.by_layer().items()} == {0: 2, 2: 1}
    assert not set(r1.experts) & set(s.experts)
    assert r1.mode == "off_zero"
    seeds = {tuple(ExpertSwitch.random_like(s, seed, model).experts) for seed in range(8)}
    assert len(seeds) > 1


def test_from_profile_top_k_cap_and_identity(tok):
    model = tiny_model("qwen3_moe")
    a = [f"alpha {i} beta" for i in range(6)]
    b = [f"ZZ{i}QQ!!" for i in range(6)]
    prof = profile(model, tok, {"a": a, "b": b}, ProfileConfig(n_bootstrap=0), progress=False)
    sw = ExpertSwitch.from_profile(prof, k=4, mode="off_mask", model=model)
    top = [(t.layer, t.expert) for t in prof.top(4)]
    assert sw.experts == sorted(top)
    capped = ExpertSwitch.from_profile(prof, k=6, per_layer_cap=1)
    assert max(len(v) for v in capped.by_layer().values()) == 1
    assert len(capped.experts) == 3  # only 3 MoE layers: the cap limits k
    per = ExpertSwitch.from_profile(prof, k=2, per_layer=True)
    assert {k: len(v) for k, v in per.by_layer().items()} == {0: 2, 1: 2, 2: 2}
    other = tiny_model("qwen3_moe", seed=1)
    with pytest.raises(ModelMismatchError, match="different model"):
        ExpertSwitch.from_profile(prof, k=2, model=other)
    with pytest.raises(ModelMismatchError, match="params_hash"):
        with sw.apply(other):
            pass


def test_bad_inputs_give_clear_errors(batch):
    model = tiny_model("qwen2_moe")  # layer 0 is dense (mlp_only_layers)
    with pytest.raises(IndexError, match=r"experts\[0\].expert: 8 out of range 0..7"):
        with ExpertSwitch([(1, 8)]).apply(model):
            pass
    with pytest.raises(IndexError, match="layer 7 is out of range"):
        with ExpertSwitch([(7, 0)]).apply(model):
            pass
    with pytest.raises(IndexError, match=r"experts\[0\].layer: 0 is not an MoE layer \(MoE layers: 1..2\)"):
        with ExpertSwitch([(0, 0)]).apply(model):
            pass
    with pytest.raises(DenseModelError, match="dense"):
        with ExpertSwitch([(0, 0)]).apply(tiny_model("llama")):
            pass
    with pytest.raises(ValueError, match="fewer than top_k"):
        with ExpertSwitch([(1, e) for e in range(7)], "off_mask").apply(model):
            pass
    with pytest.raises(ValueError, match="force at most top_k"):
        with ExpertSwitch([(1, e) for e in range(3)], "on").apply(model):
            pass
    with pytest.raises(ValueError, match="mode: must be one of"):
        ExpertSwitch([(1, 0)], "sideways")
    with pytest.raises(ValueError, match="per_layer_cap"):
        ExpertSwitch([(1, 0), (1, 1)], per_layer_cap=1)
    with pytest.raises(NoEffectError):
        with ExpertSwitch([(1, 0)]).apply(model):
            pass  # applied, nothing ran


def test_evaluate_and_perplexity_on_tiny(tok):
    model = tiny_model("mixtral")
    texts = ["some neutral text here", "and another line of prose"]
    ppl, (lo, hi), n = perplexity(model, tok, texts)
    assert lo <= ppl <= hi and n == sum(len(t) - 1 for t in texts)
    switch = ExpertSwitch([(L, 0) for L in range(3)], "off_mask")
    ev = evaluate(model, tok, ["ab", "cd", "ef"], lambda r: "X" if "a" in r else "Y", "X", texts,
                  switch=switch, name="off", max_new_tokens=3)
    assert ev.n_prompts == 3 and 0 <= ev.behaviour_rate <= 1 and ev.touched > 0
    assert ev.perplexity != ppl  # switching changed the model
    lo, hi = wilson_ci(5, 10)
    assert lo < 0.5 < hi and wilson_ci(0, 10)[0] == 0.0
