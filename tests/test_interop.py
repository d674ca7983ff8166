"""The same capture and intervention on a plain HF model, a TransformerLens 4 bridge, and an nnsight 0.8 trace.

TransformerLens mutates the model it boots (eager attention, swapped layer classes), so each engine
gets its own copy of the weights (ENVIRONMENT.md: never share one HF object with the bridge).
"""

import copy

import pytest
import torch

from steer.hooks import capture
from steer.interventions import AddVector
from steer.tiny import tiny_model, tiny_tokenizer

nnsight = pytest.importorskip("nnsight")
tl_bridge = pytest.importorskip("transformer_lens.model_bridge")


def _points(model):
    from steer.adapters import model_map

    mm = model_map(model)
    pts = ["blocks.1.resid_post", "final_norm.out"]
    if mm.moe_layers:
        pts.append(f"blocks.{mm.moe_layers[-1]}.mlp.router.indices")
    return pts


def _run_three(model, tok, prompts, tmp_path):
    """Capture + steer through each engine; returns {engine: (captures, steered logits, touched)}."""
    tok_dir = tmp_path / "tok"
    tok.save_pretrained(tok_dir)  # TransformerLens needs a tokenizer with a name_or_path
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    enc = tok(prompts, return_tensors="pt", padding=True)
    d = model.config.hidden_size
    vec = torch.randn(d, generator=torch.Generator().manual_seed(0))
    pts = _points(model)
    results = {}

    def go(engine, target, forward):
        iv = AddVector("blocks.0.resid_post", vec, scale=2.0)
        with capture(target, pts) as cap, iv.apply(target):
            logits = forward()
        results[engine] = ({p: cap[p][0] for p in pts}, logits.detach(), iv.total_touched)

    hf = copy.deepcopy(model)
    go("hf", hf, lambda: hf(**enc).logits)

    nn_model = nnsight.TransformersModel(copy.deepcopy(model), tokenizer=tok)

    def nn_forward():
        with nn_model.trace(enc.input_ids, attention_mask=enc.attention_mask):
            out = nn_model.output.logits.save()
        return out

    go("nnsight", nn_model, nn_forward)

    bridge_model = copy.deepcopy(model)
    bridge_model.config.architectures = bridge_model.config.architectures or [type(model).__name__]
    bridge = tl_bridge.TransformerBridge.boot_transformers(str(tok_dir), hf_model=bridge_model, tokenizer=tok)
    go("transformer_lens", bridge, lambda: bridge(enc.input_ids, attention_mask=enc.attention_mask))
    return results, enc.attention_mask.bool()


def _assert_same(results, mask, atol):
    hf_caps, hf_logits, hf_touched = results["hf"]
    for engine in ("nnsight", "transformer_lens"):
        caps, logits, touched = results[engine]
        assert touched == hf_touched == int(mask.sum()), engine
        torch.testing.assert_close(logits[mask], hf_logits[mask], atol=atol, rtol=1e-4)
        for point, ref in hf_caps.items():
            got = caps[point]
            if point.endswith("router.indices"):  # flattened tokens; compare real ones as sets
                flat = mask.reshape(-1)
                assert torch.equal(got[flat].sort(-1).values, ref[flat].sort(-1).values), (engine, point)
            else:
                torch.testing.assert_close(got[mask], ref[mask], atol=atol, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "qwen2_moe"])
def test_three_engines_agree_on_tiny_models(family, tmp_path):
    results, mask = _run_three(tiny_model(family), tiny_tokenizer(), ["hello world", "hi"], tmp_path)
    _assert_same(results, mask, atol=1e-5)


@pytest.mark.slow
def test_three_engines_agree_on_smollm2(tmp_path):
    from steer.models import load

    lm = load("smollm2", progress=False)
    results, mask = _run_three(lm.model, lm.tokenizer, ["The capital of France is", "Hi"], tmp_path)
    _assert_same(results, mask, atol=2e-4)
