"""MoE build: exactness at k = E, determinism, a valid stock Qwen2-MoE checkpoint, clear errors.

Fast tests use a tiny random Llama as the dense model (its neurons still have real structure to
split); the slow test builds the shipped default from SmolLM2-135M-Instruct and checks the quality bar.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import time

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from steer.cli.models import add_build_moe_arguments, config_from_args
from steer.moebuild import (
    BUILD_FILE,
    PROMPTS,
    MoEBuildConfig,
    build_moe,
    cluster_neurons,
    contains_key,
    load_dense,
    neuron_acts,
    prompt_agreement,
    set_top_k,
)
from steer.tiny import tiny_model, tiny_tokenizer

WORDS = "the cat sat on a mat and a dog ran far away while birds sang in old green trees by the river".split()
TINY = MoEBuildConfig(num_experts=8, top_k=4, shared_neurons=32, calib_passages=48, heldout_passages=16,
                      calib_tokens=2048, heldout_tokens=512, seq_len=64)


def _texts(seed: int = 0) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    texts = [" ".join(rng.choice(WORDS) for _ in range(50)) for _ in range(64)]
    return texts[:48], texts[48:]


def _build(tmp_path, config=TINY, name="moe", **kw):
    torch.manual_seed(0)
    kw.setdefault("evaluate", False)
    report, moe = build_moe(tiny_model("llama"), config, tmp_path / name, tokenizer=tiny_tokenizer(),
                            texts=_texts(), progress=False, num_threads=1, **kw)
    return report, moe


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return _build(tmp_path_factory.mktemp("moe"), evaluate=True)


def test_k_equals_E_reproduces_dense_logits(built, tmp_path):
    report, moe = built
    dense = tiny_model("llama")
    ids = torch.randint(3, 256, (2, 40), generator=torch.Generator().manual_seed(1))
    reloaded = AutoModelForCausalLM.from_pretrained(report.out_dir).eval()
    set_top_k(reloaded, TINY.num_experts)
    with torch.no_grad():
        ref = dense(input_ids=ids).logits
        got = reloaded(input_ids=ids).logits
    # Not 0: each routed weight is 1/E within a relative router_spread (1e-3), and the split sums
    # neurons in another order than the dense matmul. The bound scales with router_spread.
    assert (got - ref).abs().max() < 1e-3 * ref.abs().max()
    # A tighter spread gives a tighter match: the error comes from the router weights, as designed.
    _, tight = _build(tmp_path, dataclasses.replace(TINY, router_spread=1e-5), "tight")
    set_top_k(tight, TINY.num_experts)
    with torch.no_grad():
        tight_err = (tight(input_ids=ids).logits - ref).abs().max()
    assert tight_err < (got - ref).abs().max()
    assert tight_err < 1e-5 * ref.abs().max() + 1e-5


def test_fewer_experts_changes_output_and_k_is_runtime_knob(built):
    _, moe = built
    ids = torch.randint(3, 256, (1, 30), generator=torch.Generator().manual_seed(2))
    outs = {}
    for k in (8, 4, 1):
        set_top_k(moe, k)
        with torch.no_grad():
            outs[k] = moe(input_ids=ids).logits
    set_top_k(moe, TINY.top_k)
    assert not torch.allclose(outs[8], outs[4])
    assert (outs[8] - outs[4]).abs().max() < (outs[8] - outs[1]).abs().max()


def test_checkpoint_is_stock_qwen2_moe(built):
    report, moe = built
    out = report.out_dir
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "qwen2_moe" and cfg["architectures"] == ["Qwen2MoeForCausalLM"]
    assert cfg["num_experts"] == 8 and cfg["num_experts_per_tok"] == 4
    # 12 neurons per expert, stored zero-padded to 16 (EXPERT_ALIGN)
    assert cfg["moe_intermediate_size"] == 16 and cfg["shared_expert_intermediate_size"] == 32
    assert cfg["norm_topk_prob"] is False
    info = json.loads((out / BUILD_FILE).read_text())
    assert info["config"]["num_experts"] == 8 and info["safetensors_sha256"] == report.safetensors_sha256
    assert "by_k" in info["evaluation"]
    with safe_open(out / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        # per-expert tensor names, as vLLM and older transformers expect
        assert "model.layers.1.mlp.experts.7.down_proj.weight" in keys
        assert not f.get_tensor("model.layers.1.mlp.shared_expert_gate.weight").any()
        assert not f.get_tensor("model.layers.0.self_attn.q_proj.bias").any()
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert type(reloaded).__name__ == "Qwen2MoeForCausalLM"
    # every neuron of every layer lands in exactly one place: shared or one routed expert
    for lb in report.layers:
        idx = torch.cat([lb.shared, lb.experts.flatten()]).sort().values
        assert torch.equal(idx, torch.arange(128))
        assert lb.experts.shape == (8, 12)


def test_same_config_same_bytes(built, tmp_path):
    report, _ = built
    again, _ = _build(tmp_path, name="again")
    assert again.safetensors_sha256 == report.safetensors_sha256
    other, _ = _build(tmp_path, dataclasses.replace(TINY, seed=1), "seed1")
    assert other.safetensors_sha256 != report.safetensors_sha256


def test_dense_layers_and_no_shared_expert(tmp_path):
    config = dataclasses.replace(TINY, shared_neurons=0, dense_layers=(0,), top_k=8)
    report, moe = _build(tmp_path, config)
    assert moe.config.mlp_only_layers == [0]
    assert not hasattr(moe.model.layers[0].mlp, "experts") and hasattr(moe.model.layers[1].mlp, "experts")
    assert [lb.layer for lb in report.layers] == [1, 2]
    ids = torch.randint(3, 256, (1, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = tiny_model("llama")(input_ids=ids).logits
        got = moe(input_ids=ids).logits
    assert (got - ref).abs().max() < 1e-3 * ref.abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_odd_expert_width_is_padded_and_runs_in_stock_transformers(tmp_path, dtype):
    """25 neurons per expert (100-byte fp32 rows) used to make a checkpoint that transformers' default
    experts path (torch grouped_mm) refuses on CPU: "strides should be multiple of 16 bytes". Stored
    padded to 32 with zero neurons, it runs there in fp32 and bf16 and is still exact at k = E."""
    config = dataclasses.replace(TINY, num_experts=4, top_k=4, shared_neurons=28, router_spread=1e-5)
    report, _ = _build(tmp_path, config)
    assert report.layers[0].experts.shape == (4, 25)
    reloaded = AutoModelForCausalLM.from_pretrained(report.out_dir, dtype=dtype).eval()
    assert reloaded.config.moe_intermediate_size == 32
    experts = reloaded.model.layers[1].mlp.experts
    assert not experts.gate_up_proj[:, 25:32].any() and not experts.gate_up_proj[:, 57:].any()
    assert not experts.down_proj[..., 25:].any()
    ids = torch.randint(3, 256, (2, 30), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = tiny_model("llama").to(dtype)(input_ids=ids).logits.float()
        got = reloaded(input_ids=ids).logits.float()
    tol = 1e-4 if dtype == torch.float32 else 0.1
    assert (got - ref).abs().max() < tol * ref.abs().max()


def test_coactivation_clusters_tighter_than_random():
    model = tiny_model("llama")
    x = torch.randn(2000, 64, generator=torch.Generator().manual_seed(0))
    mlp = model.model.layers[1].mlp
    acts = neuron_acts(x, mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach())
    routed = torch.arange(128)
    co, co_cohesion = cluster_neurons(acts, routed, 8, "coactivation", seed=0)
    rnd, rnd_cohesion = cluster_neurons(acts, routed, 8, "random", seed=0)
    assert co.shape == rnd.shape == (8, 16)
    assert co_cohesion > rnd_cohesion


@pytest.mark.parametrize("bad, match", [
    (dict(top_k=9), "top_k"),
    (dict(top_k=0), "top_k"),
    (dict(shared_neurons=30), "evenly"),
    (dict(shared_neurons=128), "leaves 0"),
    (dict(router="lstsq"), "router must be one of"),
    (dict(clustering="kmeans"), "clustering must be one of"),
    (dict(router_spread=0.0), "router_spread"),
    (dict(calib_format="html"), "calib_format must be one of"),
    (dict(dense_layers=(5,)), "out of range"),
    (dict(refit=True, refit_ridge=-1.0), "refit_ridge must be >= 0"),
    (dict(refit=True, refit_inputs="oracle"), "refit_inputs must be one of"),
    (dict(refit_ridge=0.1), "only apply to a refit build"),
    (dict(distill_steps=2, distill_lr=0.0), "distill_lr must be > 0"),
])
def test_bad_options_name_the_problem(tmp_path, bad, match):
    with pytest.raises(ValueError, match=match):
        _build(tmp_path, dataclasses.replace(TINY, **bad))


def test_qwen2_dense_with_attention_biases_and_tied_embeddings(tmp_path):
    """Qwen2 sources (Qwen2.5-Coder) keep their q/k/v biases and tied embeddings: k = E still
    reproduces the dense logits."""
    torch.manual_seed(0)
    dense = tiny_model("qwen2", tie_word_embeddings=True)
    with torch.no_grad():
        for layer in dense.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)  # non-zero, so a dropped bias would show
    ids = torch.randint(3, 256, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = dense(input_ids=ids).logits
    report, moe = build_moe(dense, dataclasses.replace(TINY, router_spread=1e-5), tmp_path / "q",
                            tokenizer=tiny_tokenizer(), texts=_texts(), progress=False, num_threads=1,
                            evaluate=False)
    reloaded = AutoModelForCausalLM.from_pretrained(report.out_dir).eval()
    assert reloaded.config.tie_word_embeddings and reloaded.config.model_type == "qwen2_moe"
    set_top_k(reloaded, TINY.num_experts)
    with torch.no_grad():
        assert (reloaded(input_ids=ids).logits - ref).abs().max() < 1e-4 * ref.abs().max() + 1e-5


def test_unknown_dense_source_names_the_choices(tmp_path, capsys):
    with pytest.raises(ValueError, match="neither a path nor a packaged dense model; pass one of .*smollm2"):
        load_dense("no-such-model")
    from steer.cli import main

    assert main(["models", "build-moe", "--dense", "smollm2-moe", "--quiet"]) == 2
    assert "not a packaged dense model" in capsys.readouterr().err


def test_non_llama_dense_rejected(tmp_path):
    with pytest.raises(ValueError, match="Llama or Qwen2"):
        build_moe(tiny_model("gemma3_text"), TINY, tmp_path / "x", tokenizer=tiny_tokenizer(), texts=_texts(),
                  progress=False)


def test_key_answer_matching_and_agreement():
    assert contains_key("The capital of France is Paris.", ("Paris",))
    assert not contains_key("It has 14 legs", ("4", "four"))
    assert contains_key("2 + 2 = 4.", ("4", "four"))
    assert contains_key("Spiders have EIGHT legs", ("8", "eight"))
    prompts = PROMPTS[:3]
    dense = ["Paris", "5", "blue"]  # dense got 2 of 3
    moe = ["Paris", "4", "green"]  # keeps 1 of those 2; the extra right answer does not count
    agg = prompt_agreement(dense, moe, prompts)
    assert (agg["dense_correct"], agg["moe_correct"], agg["kept"]) == (2, 2, 1)
    assert agg["agreement"] == 0.5 and agg["identical"] == 1


def test_cli_arguments_map_to_config():
    p = argparse.ArgumentParser()
    add_build_moe_arguments(p)
    args = p.parse_args(["--experts", "8", "--top-k", "6", "--shared-neurons", "512", "--router", "ridge-log",
                         "--dense-layers", "0", "1"])
    cfg = config_from_args(args)
    assert (cfg.num_experts, cfg.top_k, cfg.shared_neurons, cfg.router, cfg.dense_layers) == (8, 6, 512, "ridge-log", (0, 1))
    assert config_from_args(p.parse_args([])) == MoEBuildConfig()
    with pytest.raises(SystemExit):
        p.parse_args(["--router", "nope"])


@pytest.mark.slow
def test_default_build_on_smollm2_meets_quality_bar(smollm2):
    """The shipped default (cached by ensure_moe; built here on first use) meets the issue's bar."""
    from steer.moebuild import ensure_moe

    t0 = time.time()
    path = ensure_moe()
    info = json.loads((path / BUILD_FILE).read_text())
    config = MoEBuildConfig()
    assert info["config_key"] == config.key() and path.name.endswith(config.key())
    row = info["evaluation"]["by_k"][str(config.top_k)]
    assert row["ppl_ratio"] <= 1.25, row
    assert row["agreement"] >= 0.8, row
    assert row["routed_skipped"] >= 0.25
    reloaded = AutoModelForCausalLM.from_pretrained(path).eval()
    assert type(reloaded).__name__ == "Qwen2MoeForCausalLM"
    assert reloaded.config.num_experts_per_tok == config.top_k
    ids = smollm2.tokenizer("The quick brown fox jumps over the lazy dog because", return_tensors="pt")["input_ids"]
    set_top_k(reloaded, config.num_experts)
    with torch.no_grad():
        ref = smollm2.model(input_ids=ids).logits
        diff = float((reloaded(input_ids=ids).logits - ref).abs().max())
    # k = E: routed weights are 1/E within router_spread (1e-3), so logits agree to ~1e-3 of their scale
    assert diff < 2e-3 * float(ref.abs().max()), diff
    print(f"default build {info['build_seconds']}s (this call {time.time() - t0:.0f}s), ppl ratio "
          f"{row['ppl_ratio']:.3f}, agreement {row['agreement']:.2f}, k=E max logit diff {diff:.2e}")



def test_distillation_option_trains_norms_and_routers(tmp_path):
    config = dataclasses.replace(TINY, distill_steps=3, distill_lr=1e-2, distill_batch=2)
    report, moe = _build(tmp_path, config)
    _, plain = _build(tmp_path, TINY, "plain")
    assert len(report.distill_losses) == 3
    changed = [n for n, p in moe.named_parameters() if not torch.equal(p, plain.get_parameter(n))]
    assert changed and all(n.endswith(("norm.weight", "mlp.gate.weight")) for n in changed)
    # each tensor moves by about distill_lr of its own scale per step (Adam), routers included, though
    # they sit at router_spread's scale: an absolute rate of 1e-2 would replace them outright
    routers = [n for n in changed if n.endswith("mlp.gate.weight")]
    assert routers
    for name in changed:
        before = plain.get_parameter(name).detach()
        rel = float((moe.get_parameter(name) - before).norm() / before.norm())
        assert 0 < rel < 2 * config.distill_steps * config.distill_lr, (name, rel)


def test_distillation_calls_back_after_every_step(tmp_path):
    from steer.moebuild import distill

    config = dataclasses.replace(TINY, distill_steps=2, distill_lr=1e-2, distill_batch=2)
    _, moe = _build(tmp_path)
    torch.manual_seed(0)
    dense = tiny_model("llama")
    chunks = torch.randint(0, dense.config.vocab_size, (4, 16))
    seen = []
    losses = distill(moe, dense, chunks, config, on_step=lambda step, loss: seen.append((step, loss)))
    assert seen == list(zip([1, 2], losses))


def test_chat_formatted_calibration():
    from steer.moebuild import chat_format

    tok = tiny_tokenizer()
    texts = ["first passage", "second passage", "third passage"]
    assert chat_format(tok, texts, "mix") == texts  # no chat template: prose stays prose
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    assert chat_format(tok, texts, "prose") == texts
    mixed = chat_format(tok, texts, "mix")
    assert mixed[0] == "first passage" and mixed[2] == "third passage"
    assert mixed[1].startswith("<user>") and mixed[1].endswith("<assistant>second passage")
    assert all(t.startswith("<user>") for t in chat_format(tok, texts, "chat"))


# ----------------------------------------------------------------------------------------------
# refit: ridge re-fit of the down-projections to the dense MLP output under the build's routing

REFIT = dataclasses.replace(TINY, refit=True)


def _layer0_inputs(config=TINY) -> torch.Tensor:
    """Layer 0's MLP inputs on the build's calibration tokens (the same in the dense model and the MoE)."""
    from steer.moebuild import collect_mlp_inputs, token_chunks

    chunks = token_chunks(tiny_tokenizer(), _texts()[0], config.seq_len, config.calib_tokens)
    return collect_mlp_inputs(tiny_model("llama"), chunks, [0])[0]


@pytest.fixture(scope="module")
def refit_built(tmp_path_factory):
    return _build(tmp_path_factory.mktemp("refit"), REFIT)


def test_refit_lowers_reconstruction_error_of_the_checkpoint(built, refit_built):
    """The saved checkpoint's MoE layer, at the build's top_k, is closer to the dense MLP on the
    calibration tokens with the refit than without, and the report's held-out errors say so too."""
    x = _layer0_inputs()
    dense_mlp = tiny_model("llama").model.layers[0].mlp
    errs = {}
    with torch.no_grad():
        y = dense_mlp(x[None])[0]
        for name, (report, _) in {"plain": built, "refit": refit_built}.items():
            moe = AutoModelForCausalLM.from_pretrained(report.out_dir).eval()
            errs[name] = float((moe.model.layers[0].mlp(x[None])[0] - y).pow(2).sum() / y.pow(2).sum())
    assert errs["refit"] < 0.7 * errs["plain"], errs
    layers = refit_built[0].layers
    assert all(lb.refit.error_after < lb.refit.error_before for lb in layers)
    info = refit_built[0].to_dict()
    assert info["mean_refit_error_after"] < info["mean_refit_error_before"]
    assert info["config"]["refit"] and "refit_error_after" not in built[0].to_dict()


def test_refit_with_all_experts_and_no_ridge_recovers_dense_down(tmp_path):
    """top_k = E routes every token to every expert with weight 1/E (up to router_spread): the least-squares
    down-projection is then the dense one, and the checkpoint reproduces the dense logits at k = E."""
    config = dataclasses.replace(REFIT, top_k=TINY.num_experts, refit_ridge=0.0, router_spread=1e-6)
    report, moe = _build(tmp_path, config)
    dense = tiny_model("llama")
    for lb in report.layers:
        wd = dense.model.layers[lb.layer].mlp.down_proj.weight.detach()
        scale = float(wd.abs().max())
        assert (lb.refit.shared_down - wd[:, lb.shared]).abs().max() < 1e-3 * scale
        for e, idx in enumerate(lb.experts):
            assert (lb.refit.expert_down[e] - wd[:, idx]).abs().max() < 1e-3 * scale
        assert lb.refit.error_after < 1e-6
    ids = torch.randint(3, 256, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = dense(input_ids=ids).logits
        assert (moe(input_ids=ids).logits - ref).abs().max() < 1e-3 * ref.abs().max()


def test_refit_is_sequential_on_the_moe_inputs(refit_built, tmp_path):
    """refit_inputs="moe" builds layer l on what the MoE's layers < l produce; "dense" on the dense
    model's inputs. Layer 0 sees the same inputs either way, later layers do not."""
    dense_inputs, _ = _build(tmp_path, dataclasses.replace(REFIT, refit_inputs="dense"))
    seq = refit_built[0]
    assert torch.equal(seq.layers[0].refit.shared_down, dense_inputs.layers[0].refit.shared_down)
    assert not torch.equal(seq.layers[1].router, dense_inputs.layers[1].router)


def test_sparse_normal_equations_match_dense_products():
    from steer.moebuild import refit_features, routing_gates, sparse_normal_equations

    g = torch.Generator().manual_seed(0)
    T, D, S, E, n = 300, 16, 5, 6, 3
    acts, x, y = torch.randn(T, S + E * n, generator=g), torch.randn(T, D, generator=g), torch.randn(T, 7, generator=g)
    perm = torch.randperm(S + E * n, generator=g)
    shared, experts = perm[:S].sort().values, perm[S:].view(E, n)
    gates = routing_gates(x, torch.randn(E, D, generator=g), 2)
    assert ((gates != 0).sum(1) == 2).all()
    z = refit_features(acts, shared, experts, gates)
    gram, zty = sparse_normal_equations(z, y, gates, S, chunk=128)
    zd = z.double()
    assert torch.allclose(gram, zd.T @ zd, atol=1e-9) and torch.allclose(zty, zd.T @ y.double(), atol=1e-9)


def test_refit_config_key_and_cli():
    # builds without a refit keep their cache keys (the packaged smollm2-moe's is 9bb739324a2c)
    assert MoEBuildConfig().key() == "9bb739324a2c"
    assert REFIT.key() != TINY.key() != dataclasses.replace(REFIT, refit_ridge=1e-2).key()
    p = argparse.ArgumentParser()
    add_build_moe_arguments(p)
    cfg = config_from_args(p.parse_args(["--refit", "--refit-ridge", "0.01", "--refit-inputs", "dense"]))
    assert (cfg.refit, cfg.refit_ridge, cfg.refit_inputs) == (True, 0.01, "dense")
    cfg = config_from_args(p.parse_args(["--distill-steps", "5", "--distill-lr", "0.002"]))
    assert (cfg.distill_steps, cfg.distill_lr) == (5, 0.002)
