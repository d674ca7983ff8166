"""Quality table of MoE builds from SmolLM2-135M-Instruct: one dense calibration pass, many settings.

Run: .venv/bin/python experiments/moe_build/quality_table.py [--only NAME ...]
Writes experiments/moe_build/results.json (resumable: finished settings are skipped) and RESULTS.md.
Every number is measured by this script on this machine; nothing is typed in by hand.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import time
from pathlib import Path

import torch

from steer.moebuild import (
    MoEBuildConfig,
    assemble_qwen2_moe,
    build_layer,
    calibration_texts,
    chat_format,
    collect_mlp_inputs,
    distill,
    evaluate_moe,
    load_dense,
    set_top_k,
    token_chunks,
)
from steer.packages import cache_dir
from steer.progress import bar

HERE = Path(__file__).parent
RESULTS = HERE / "results.json"

# name -> (config overrides, k with prompt evaluation, k with perplexity only)
SETTINGS: dict[str, tuple[dict, list[int], list[int]]] = {
    "S1024-coact-ridge": (dict(shared_neurons=1024), [12], [8]),
    # levers measured against the default (S=1024, prompts where the lever aims at chat answers)
    "S1024-coact-ridgelog": (dict(shared_neurons=1024, router="ridge-log"), [12], []),
    "S1024-coact-ridge-mix": (dict(shared_neurons=1024, calib_format="mix"), [12], []),
    "S1024-random-ridge": (dict(shared_neurons=1024, clustering="random"), [], [12]),
    "S0-coact-ridge": (dict(shared_neurons=0), [], [12]),
    "S0-random-ridge": (dict(shared_neurons=0, clustering="random"), [], [12]),
    # earlier candidates, kept runnable
    "S768-coact-ridge": (dict(shared_neurons=768), [12, 8], [16, 4]),
    "S768-coact-ridge-mix": (dict(shared_neurons=768, calib_format="mix"), [12], [8]),
    "S768-random-ridge": (dict(shared_neurons=768, clustering="random"), [], [12, 8]),
    "S768-coact-ridgelog": (dict(shared_neurons=768, router="ridge-log"), [], [12, 8]),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--inputs-cache", default=None, help="file to keep the dense MLP inputs in between runs")
    ap.add_argument("--markdown-only", action="store_true", help="rewrite RESULTS.md from results.json")
    ap.add_argument("--results", type=Path, default=RESULTS,
                    help="results file (a second process running other settings must use its own)")
    ap.add_argument("--merge", type=Path, nargs="*", default=[],
                    help="add the settings of these results files to results.json, then rewrite RESULTS.md")
    args = ap.parse_args()
    if args.merge:
        results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
        for f in args.merge:
            results.update(json.loads(f.read_text()))
        RESULTS.write_text(json.dumps(results, indent=1) + "\n")
        write_markdown(results)
        return
    if args.markdown_only:
        write_markdown(json.loads(RESULTS.read_text()) if RESULTS.exists() else {})
        return
    torch.set_num_threads(args.threads)
    out = args.results
    results = json.loads(out.read_text()) if out.exists() else {}
    if out != RESULTS and RESULTS.exists():  # the dense answers measured there
        results = {k: v for k, v in json.loads(RESULTS.read_text()).items() if "dense_answers" in v} | results
    base = MoEBuildConfig()
    t0 = time.time()
    dense, tok = load_dense("smollm2")
    calib_texts, held_texts = calibration_texts(base)
    heldout = token_chunks(tok, held_texts, base.seq_len, base.heldout_tokens)
    layers = list(range(dense.config.num_hidden_layers))
    inputs: dict[str, dict[int, torch.Tensor]] = {}
    chunks: dict[str, torch.Tensor] = {}

    def mlp_inputs(fmt: str) -> dict[int, torch.Tensor]:
        """Dense MLP inputs on the calibration text in format `fmt` (kept in memory and on disk)."""
        if fmt not in inputs:
            inputs.clear()
            chunks[fmt] = token_chunks(tok, chat_format(tok, calib_texts, fmt), base.seq_len, base.calib_tokens)
            cache = Path(f"{args.inputs_cache}.{fmt}") if args.inputs_cache else None
            if cache and cache.exists():
                inputs[fmt] = torch.load(cache)
            else:
                inputs[fmt] = collect_mlp_inputs(dense, chunks[fmt], layers)
                if cache:
                    torch.save(inputs[fmt], cache)
        return inputs[fmt]

    print(f"dense load: {time.time() - t0:.0f}s", flush=True)
    dense_cache: dict = {}
    done = [r for r in results.values() if "dense_answers" in r]
    if done:  # the dense model's greedy answers do not depend on the setting: measured once
        dense_cache["answers"] = done[0]["dense_answers"]
    probe = heldout[:4]
    with torch.no_grad():
        dense_logits = dense(input_ids=probe).logits
    for name, (over, prompt_ks, ppl_ks) in SETTINGS.items():
        if (args.only and name not in args.only) or name in results:
            continue
        config = dataclasses.replace(base, **over)
        t1 = time.time()
        xs = mlp_inputs(config.calib_format)
        calib = chunks[config.calib_format]
        builds = {i: build_layer(i, xs[i], dense.model.layers[i].mlp, config)
                  for i in layers if i not in config.dense_layers}
        moe = assemble_qwen2_moe(dense, builds, config)
        if config.distill_steps:
            distill(moe, dense, calib, config, progress=bar("distill"))
        build_s = time.time() - t1
        row = {"config": config.to_dict(), "build_seconds_from_cached_inputs": round(build_s, 1),
               "mean_router_recall_at_build_k": sum(b.router_recall for b in builds.values()) / len(builds),
               "mean_shared_mass": sum(b.shared_mass for b in builds.values()) / len(builds),
               "mean_cluster_cohesion": sum(b.cluster_cohesion for b in builds.values()) / len(builds)}
        set_top_k(moe, config.num_experts)
        with torch.no_grad():
            row["max_abs_logit_diff_at_k_eq_E"] = float((moe(input_ids=probe).logits - dense_logits).abs().max())
        row["eval"] = {}
        for ks, prompts in ((prompt_ks, True), (ppl_ks, False)):
            if ks:
                ev = evaluate_moe(moe, dense, tok, heldout=heldout, config=config, top_ks=ks, prompts=prompts,
                                  dense_cache=dense_cache, progress=bar("evaluate"))
                row["dense_ppl"] = ev["dense_ppl"]
                row["heldout_tokens"] = ev["heldout_tokens"]
                if "dense_answers" in ev:
                    row["dense_answers"] = ev["dense_answers"]
                row["eval"].update({str(k): v for k, v in ev["by_k"].items()})
        row["total_seconds"] = round(time.time() - t1, 1)
        row["load_average_at_end"] = [round(x, 1) for x in os.getloadavg()]
        row["finished"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        results[name] = row
        out.write_text(json.dumps(results, indent=1) + "\n")
        print(f"{name}: done in {row['total_seconds']}s", flush=True)
    if out == RESULTS:
        write_markdown(results)


def write_markdown(results: dict) -> None:
    lines = [
        "# MoE builds from SmolLM2-135M-Instruct: measured quality",
        "",
        f"Measured by `experiments/moe_build/quality_table.py` on this machine ({platform.machine()}, "
        f"2 shared CPU cores, torch {torch.__version__}, fp32) with SmolLM2-135M-Instruct (GGUF Q4_1 dequantised).",
        "Held-out perplexity: book_cloze prose, passages disjoint from calibration, ratio to the dense model.",
        "Key answers kept: of the 20 chat prompts whose dense greedy answer contains the key answer, the share",
        "whose MoE greedy answer also does (32 new tokens). Routed skipped = 1 - k/E; MLP skipped = share of all",
        "MLP neurons not computed per token. Calibration: 256 passages, capped at 16,384 tokens; one seed (0). Differences under ~5%",
        "in perplexity are within noise of a single split.",
        "",
        "| setting | shared S | experts | clustering | router | k | routed skipped | MLP skipped | ppl ratio | key answers kept | identical answers |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in results.items():
        c = row["config"]
        n = (1536 - c["shared_neurons"]) // c["num_experts"]
        extra = []
        if c["dense_layers"]:
            extra.append(f"dense layers {c['dense_layers']}")
        if c["distill_steps"]:
            extra.append(f"+{c['distill_steps']} distill steps")
        label = name + (f" ({', '.join(extra)})" if extra else "")
        for k, ev in sorted(row["eval"].items(), key=lambda kv: -int(kv[0])):
            kept = (f"{ev['kept']}/{ev['dense_correct']} ({ev['agreement']:.0%})" if "agreement" in ev else "")
            ident = f"{ev['identical']}/{ev['n_prompts']}" if "identical" in ev else ""
            lines.append(
                f"| {label} | {c['shared_neurons']} | {c['num_experts']} x {n} | {c['clustering']} | {c['router']} "
                f"| {k} | {ev['routed_skipped']:.0%} | {ev['mlp_neurons_skipped']:.1%} | {ev['ppl_ratio']:.3f} "
                f"| {kept} | {ident} |")
    lines += ["", "Per setting: router recall of the oracle's top-k (held-out 10% of calibration tokens, at the "
              "build's k), shared mass, build time from cached calibration inputs, k = E exactness.", "",
              "| setting | router recall | shared mass | cluster cohesion | build s | max abs logit diff, k = E |",
              "|---|---|---|---|---|---|"]
    for name, row in results.items():
        lines.append(f"| {name} | {row['mean_router_recall_at_build_k']:.3f} | {row['mean_shared_mass']:.3f} | "
                     f"{row['mean_cluster_cohesion']:.3f} | {row['build_seconds_from_cached_inputs']} | "
                     f"{row['max_abs_logit_diff_at_k_eq_E']:.2e} |")
    builds = sorted((cache_dir() / "models").glob("smollm2-moe-*/steer_moe_build.json"))
    if builds:
        lines += ["", "Full builds in the cache (`ensure_moe` / `steer models build-moe`: calibration pass, build, "
                  "evaluation and save in one process, while the machine was shared):", "",
                  "| cache dir | config (non-default) | k | ppl ratio | key answers kept | build s (wall) |",
                  "|---|---|---|---|---|---|"]
        default = MoEBuildConfig().to_dict()
        for f in builds:
            info = json.loads(f.read_text())
            diff = {k: v for k, v in info["config"].items() if default.get(k) != v}
            for k, ev in info["evaluation"].get("by_k", {}).items():
                kept = f"{ev['kept']}/{ev['dense_correct']} ({ev['agreement']:.0%})" if "agreement" in ev else ""
                lines.append(f"| {f.parent.name} | {diff or 'default'} | {k} | {ev['ppl_ratio']:.3f} | {kept} | "
                             f"{info['build_seconds']} |")
    spread_file = HERE / "router_spread.json"  # written by router_spread.py
    if spread_file.exists():
        lines += _spread_table(json.loads(spread_file.read_text()), results.get("S1024-coact-ridge"))
    first = next(iter(results.values()), None)
    if first and "dense_answers" in first:
        lines += ["", f"Dense held-out perplexity: {first['dense_ppl']:.2f} on {first['heldout_tokens']} tokens.", ""]
    notes = HERE / "notes.md"  # hand-written reading of the numbers above
    if notes.exists():
        lines += ["", notes.read_text().strip()]
    (HERE / "RESULTS.md").write_text("\n".join(lines) + "\n")
    _ = math


def _spread_table(rows: dict, default_row: dict | None) -> list[str]:
    """router_spread sensitivity of the default build (experiments/moe_build/router_spread.py).

    The unscaled spread is the default build itself: its key answers come from the quality table's
    row when router_spread.py skipped them (same weights: the same perplexity to the last digit).
    """
    pct = lambda x: f"{100 * x:.2f}%" if x is not None else ""  # noqa: E731
    out = ["", "router_spread sensitivity of the default build (its routers rescaled, which is exactly a build "
           "with that spread): quality at k = 12 and the share of token-layers whose top-12 set changes "
           "(1,024 held-out tokens x 30 MoE layers; `steer.moe_routing.routing_robustness`).", "",
           "| router_spread | ppl ratio | key answers kept | max abs logit diff, k = E | fp32 prob ties at the k-th expert "
           "| top-k of logits vs HF (local / end to end) | 1e-6 input noise (local / end to end) "
           "| bf16 (local / end to end) | median logit range |",
           "|---|---|---|---|---|---|---|---|---|"]
    for key, r in sorted(rows.items(), key=lambda kv: float(kv[0])):
        ev, rb = r["eval"], r["robustness"]
        same = default_row and abs(default_row["config"]["router_spread"] - float(key)) < 1e-12 \
            and abs(default_row["eval"]["12"]["ppl"] - ev["ppl"]) < 1e-9
        if "agreement" not in ev and same:
            ev = {**ev, **{k: default_row["eval"]["12"][k] for k in ("kept", "dense_correct", "agreement")}}
        kept = f"{ev['kept']}/{ev['dense_correct']} ({ev['agreement']:.0%})" if "agreement" in ev else "not run"
        out.append(
            f"| {key} | {ev['ppl_ratio']:.3f} | {kept} | {r['max_abs_logit_diff_at_k_eq_E']:.2e} | "
            f"{pct(rb.get('fp32_prob_ties'))} | {pct(rb.get('topk_of_logits'))} / "
            f"{pct(rb.get('topk_of_logits_end_to_end')) or 'not run'} | {pct(rb['noise_local'])} / "
            f"{pct(rb['noise_end_to_end'])} | {pct(rb['bf16_local'])} / {pct(rb.get('bf16_end_to_end'))} | "
            f"{rb['logit_range_median']:.2e} |")
    return out


if __name__ == "__main__":
    main()
