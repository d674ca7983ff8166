"""Quick check that a built MoE checkpoint loads, unchanged, in stock transformers, TransformerLens and nnsight.

Run: .venv/bin/python experiments/moe_build/interop_check.py [CHECKPOINT_DIR]   (default: the cached default build)
Each library gets its own freshly loaded model object (TransformerLens' bridge rewrites the model it boots).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main(path: Path) -> int:
    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
    E, k = hf.config.num_experts, hf.config.num_experts_per_tok
    moe_layer = next(i for i, layer in enumerate(hf.model.layers) if hasattr(layer.mlp, "experts"))
    print(f"transformers: {type(hf).__name__}, {E} experts, top-{k}, last-token argmax "
          f"{tok.decode(ref[0, -1].argmax())!r}")

    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(
        "qwen2-moe-built", hf_model=AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(),
        tokenizer=tok)
    logits, cache = bridge.run_with_cache(ids)
    idx = cache[f"blocks.{moe_layer}.mlp.hook_expert_indices"]
    tl_diff = float((logits - ref).abs().max())
    print(f"TransformerLens: booted, max |logit - HF| = {tl_diff:.2e}, expert indices shape {tuple(idx.shape)}")

    import nnsight

    nn_model = nnsight.TransformersModel(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(),
                                         tokenizer=tok)
    with nn_model.trace(ids):
        router = nn_model.model.layers[moe_layer].mlp.gate.output.save()
        out = nn_model.output.save()
    router_logits, weights, indices = router if isinstance(router, tuple) else router.value
    logits_nn = out.logits if hasattr(out, "logits") else out.value.logits
    nn_diff = float((logits_nn - ref).abs().max())
    print(f"nnsight: traced, max |logit - HF| = {nn_diff:.2e}, router logits {tuple(router_logits.shape)}, "
          f"weights {tuple(weights.shape)}")
    ok = tl_diff < 1e-3 and nn_diff < 1e-4 and tuple(indices.shape)[-1] == k
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    if len(sys.argv) > 1:
        target = Path(sys.argv[1])
    else:
        from steer.moebuild import ensure_moe

        target = ensure_moe()
    sys.exit(main(target))
