"""router_spread sensitivity of the default SmolLM2 MoE: quality and routing robustness.

The build scales router logits so their spread over experts is <= router_spread (1e-3 by default), so
every routed weight is ~1/E and k = E reproduces the dense model. The price is near-tied logits: a
served copy whose numerics differ slightly can pick other experts. This script takes the cached
default build, rescales its routers to each spread (`set_router_spread`: exactly what a build with that
spread gives, since the scaling is linear) and measures, per spread:
- quality: held-out perplexity ratio and key answers kept at the build's k (steer.moebuild.evaluate_moe),
  k = E max abs logit difference to the dense model;
- robustness (`routing_robustness`): share of token-layers whose top-k set changes in bf16 and under
  relative 1e-6 input noise, locally (router only) and end to end.

Run: .venv/bin/python experiments/moe_build/router_spread.py [--prompts-for 0.1] [--robust-chunks 8]
Writes experiments/moe_build/router_spread.json (resumable per spread).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from steer.moe_routing import routing_robustness
from steer.moebuild import (
    BUILD_FILE,
    MoEBuildConfig,
    calibration_texts,
    ensure_moe,
    evaluate_moe,
    load_dense,
    set_router_spread,
    set_top_k,
    token_chunks,
)
from steer.progress import bar

HERE = Path(__file__).parent
OUT = HERE / "router_spread.json"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--spreads", type=float, nargs="*", default=[1e-3, 1e-2, 1e-1])
    ap.add_argument("--robust-chunks", type=int, default=8, help="held-out chunks of 128 tokens for robustness")
    ap.add_argument("--prompts-for", type=float, nargs="*", default=None,
                    help="spreads that also get the 20 greedy chat prompts (slow; default: all)")
    ap.add_argument("--robustness-only", action="store_true",
                    help="recompute only the robustness numbers of spreads already measured")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = json.loads(OUT.read_text()) if OUT.exists() else {}
    base = MoEBuildConfig()
    moe_dir = ensure_moe(base, progress=bar("build"))
    built = json.loads((moe_dir / BUILD_FILE).read_text())
    current = built["config"]["router_spread"]
    dense, tok = load_dense("smollm2")
    moe = AutoModelForCausalLM.from_pretrained(moe_dir, dtype=torch.float32).eval()
    heldout = token_chunks(tok, calibration_texts(base)[1], base.seq_len, base.heldout_tokens)
    probe = heldout[:4]
    with torch.no_grad():
        dense_logits = dense(input_ids=probe).logits
    dense_cache: dict = {}
    table = HERE / "results.json"  # the dense model's greedy answers, measured by quality_table.py
    if table.exists():
        rows = [r for r in json.loads(table.read_text()).values() if "dense_answers" in r]
        if rows:
            dense_cache["answers"] = rows[0]["dense_answers"]
    for spread in args.spreads:
        key = f"{spread:g}"
        set_router_spread(moe, spread, current)
        current = spread
        if args.robustness_only:
            if key in results:
                results[key]["robustness"] = routing_robustness(moe, heldout[: args.robust_chunks])
                results[key]["robustness_load_average"] = os.getloadavg()
                OUT.write_text(json.dumps(results, indent=1) + "\n")
                print(f"spread {key}: {results[key]['robustness']}", flush=True)
            continue
        want_prompts = args.prompts_for is None or any(abs(spread - p) < 1e-12 for p in args.prompts_for)
        if key in results and ("agreement" in results[key]["eval"] or not want_prompts):
            continue
        t0 = time.time()
        if key in results:  # measured without prompts earlier: add them
            row = results[key]
            ev = evaluate_moe(moe, dense, tok, heldout=heldout, config=base, top_ks=[base.top_k], prompts=True,
                              dense_cache=dense_cache, progress=bar("evaluate"))
            row["eval"] = ev["by_k"][base.top_k]
            row["prompt_seconds"] = round(time.time() - t0, 1)
            row["prompt_load_average"] = os.getloadavg()
            results[key] = row
            OUT.write_text(json.dumps(results, indent=1) + "\n")
            continue
        row: dict = {"router_spread": spread, "cache_dir": moe_dir.name}
        set_top_k(moe, moe.config.num_experts)
        with torch.no_grad():
            row["max_abs_logit_diff_at_k_eq_E"] = float((moe(input_ids=probe).logits - dense_logits).abs().max())
        set_top_k(moe, base.top_k)
        row["robustness"] = routing_robustness(moe, heldout[: args.robust_chunks])
        print(f"spread {key}: {row['robustness']}", flush=True)
        ev = evaluate_moe(moe, dense, tok, heldout=heldout, config=base, top_ks=[base.top_k],
                          prompts=want_prompts, dense_cache=dense_cache, progress=bar("evaluate"))
        row["eval"] = ev["by_k"][base.top_k]
        row["dense_ppl"] = ev["dense_ppl"]
        row["seconds"] = round(time.time() - t0, 1)
        row["load_average"] = os.getloadavg()
        row["machine"] = f"{platform.machine()}, {os.cpu_count()} CPUs, {args.threads} thread(s)"
        results[key] = row
        OUT.write_text(json.dumps(results, indent=1) + "\n")
        print(f"spread {key}: ppl ratio {row['eval']['ppl_ratio']:.4f} in {row['seconds']}s", flush=True)


if __name__ == "__main__":
    main()
