"""Overhead of steer's hooks vs a bare forward, and vs nnsight and TransformerLens, in one run.

    python experiments/bench_overhead.py [--model smollm2] [--tokens 128] [--repeats 30]

Prints a table of median forward times and their ratio to the bare HF forward measured in the same
run (CPU timing is erratic on shared machines: one thread, interleaved repeats, medians).
Target (issue #2): steer's reducers <= 1.05x a bare forward.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import tempfile
import time

import torch

from steer.hooks import capture
from steer.models import load
from steer.reducers import ExpertCounts, Mean


def _time(fn, warmup=3):
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--moe-model", default=None, help="also time router reducers on this MoE (e.g. smollm2-moe)")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)

    lm = load(args.model, progress=False)
    model, tok = lm.model, lm.tokenizer
    ids = torch.randint(100, 20000, (1, args.tokens))
    mask = torch.ones_like(ids)
    n_layers = model.config.num_hidden_layers

    def bare():
        with torch.inference_mode():
            model(input_ids=ids, attention_mask=mask)

    def steer_resid_capture():
        with torch.inference_mode(), capture(model, "blocks.*.resid_post"):
            model(input_ids=ids, attention_mask=mask)

    mean = Mean()

    def steer_resid_reducer():
        with torch.inference_mode(), capture(model, reducers={"blocks.*.resid_post": mean}):
            model(input_ids=ids, attention_mask=mask)

    cases = {
        "bare HF forward": bare,
        f"steer capture resid_post x{n_layers}": steer_resid_capture,
        f"steer Mean reducer resid_post x{n_layers}": steer_resid_reducer,
    }

    try:
        import nnsight

        nn_model = nnsight.TransformersModel(copy.deepcopy(model), tokenizer=tok)

        def nnsight_trace():
            with torch.inference_mode(), nn_model.trace(ids, attention_mask=mask):
                for i in range(n_layers):
                    nn_model.model.layers[i].output.save()

        cases[f"nnsight trace, save resid x{n_layers}"] = nnsight_trace
    except Exception as exc:  # noqa: BLE001 - report and go on
        print(f"(nnsight skipped: {exc})")

    try:
        from transformer_lens.model_bridge import TransformerBridge

        tok_dir = tempfile.mkdtemp()
        tok.save_pretrained(tok_dir)
        bridge_model = copy.deepcopy(model)
        bridge = TransformerBridge.boot_transformers(tok_dir, hf_model=bridge_model, tokenizer=tok)

        def tl_cache():
            with torch.inference_mode():
                bridge.run_with_cache(ids)

        cases["TransformerLens bridge run_with_cache"] = tl_cache
    except Exception as exc:  # noqa: BLE001
        print(f"(TransformerLens skipped: {exc})")

    if args.moe_model:
        moe = load(args.moe_model, progress=False).model
        counts = ExpertCounts(moe.config.num_experts)

        def moe_bare():
            with torch.inference_mode():
                moe(input_ids=ids, attention_mask=mask)

        def moe_router_reducer():
            with torch.inference_mode(), capture(moe, reducers={"blocks.*.mlp.router.indices": counts}):
                moe(input_ids=ids, attention_mask=mask)

        cases["MoE bare forward"] = moe_bare
        cases["MoE steer ExpertCounts reducer (all MoE layers)"] = moe_router_reducer

    for fn in cases.values():
        _time(fn, warmup=2)
    times = {name: [] for name in cases}
    for _ in range(args.repeats):  # interleave so drifts hit every case alike
        for name, fn in cases.items():
            times[name].append(_time(fn, warmup=0))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\nmachine: {platform.machine()} {platform.processor() or ''}, torch {torch.__version__}, 1 thread; "
          f"model {lm.name}, {args.tokens} tokens, {args.repeats} interleaved repeats, medians\n")
    print(f"| {'case':52s} | ms     | ratio |")
    print(f"|{'-' * 54}|--------|-------|")
    for name, t in med.items():
        base = med["MoE bare forward"] if name.startswith("MoE") else med["bare HF forward"]
        print(f"| {name:52s} | {t * 1e3:6.1f} | {t / base:5.2f}x |")


if __name__ == "__main__":
    main()
