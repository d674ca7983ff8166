"""Sink-statistics overhead and peak memory vs a plain SDPA forward, on 512- and 2048-token inputs.

    .venv/bin/python experiments/act/bench_sinks.py --model smollm2 --lengths 512 2048 --repeats 5

Modes, all in one process with one thread (ratios are to the SDPA forward of the same run):
  sdpa            model.model(ids): the decoder stack with SDPA (no lm_head: detect_sinks runs none)
  sinks_stream    detect_sinks: per layer SDPA is_causal for the output (no padding) + steer.kernels.act.sink_stats
                  column sums (no N x N map)
  sinks_stream_masked  the same statistics with the layer's explicit boolean mask passed to SDPA (the
                  path padded batches take, and every batch took before is_causal was used)
  sinks_exact     detect_sinks(force_exact=True): eager maps, one layer alive at a time, reduced at once;
                  lengths <= --exact-max
  eager_all_maps  model(ids, output_attentions=True) with eager attention: every layer's map kept
                  (what TransformerLens-style caching of attention patterns holds); lengths <= --all-maps-max
Timings are interleaved: each repeat runs every mode once, in a rotated order, so load from other
jobs on a shared machine hits all modes alike; the table reports medians (and the min) over repeats
and the 1-minute load average before and after each length.
Peak memory is measured per mode in a fresh subprocess (model loaded, warmed up on 32 tokens, then
Linux VmHWM reset through /proc/self/clear_refs): the peak RSS above the RSS before the call. In one
process the allocator's cached pages from an earlier mode would hide a later mode's peak.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def measure(fn, repeats: int) -> tuple[float, float]:
    """(best seconds, peak extra bytes over the call)."""
    best, peak = float("inf"), 0
    for _ in range(repeats):
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        before = _status("VmRSS")
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
        peak = max(peak, _status("VmHWM") - before)
    return best, peak


def interleaved(modes: dict, repeats: int) -> dict[str, list[float]]:
    """Seconds per mode per repeat; repeat r runs the modes in an order rotated by r."""
    names = list(modes)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            t = time.perf_counter()
            modes[name]()
            times[name].append(time.perf_counter() - t)
    return times


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--exact-max", type=int, default=2048, help="time sinks_exact on lengths up to this")
    ap.add_argument("--all-maps-max", type=int, default=512,
                    help="also time eager output_attentions on lengths up to this (4.5 GB of maps at 2048)")
    ap.add_argument("--memory-of", help=argparse.SUPPRESS)  # internal: one mode, one length, print peak
    ap.add_argument("--no-memory", action="store_true", help="timings only")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from steer.models import load

    lm = load(args.model, progress=False)
    model, tok = lm.model, lm.tokenizer
    if args.memory_of:
        n = args.lengths[0]
        fn = _modes(model, tok, n, args.all_maps_max, args.exact_max)[args.memory_of]
        with torch.no_grad():
            model(input_ids=torch.tensor(_inputs(tok, n))[:, :32])
            print(json.dumps({"peak_extra_bytes": measure(fn, 1)[1]}))
        return 0
    rows = []
    for n in args.lengths:
        modes = _modes(model, tok, n, args.all_maps_max, args.exact_max)
        load_before = os.getloadavg()[0]
        with torch.no_grad():
            model(input_ids=torch.tensor(_inputs(tok, n))[:, :32])  # warm-up
            times = interleaved(modes, args.repeats)
        load_after = os.getloadavg()[0]
        base = statistics.median(times["sdpa"])
        for name, ts in times.items():
            med = statistics.median(ts)
            row = {"tokens": n, "mode": name, "repeats": len(ts), "median_s": round(med, 3),
                   "min_s": round(min(ts), 3), "ratio_to_sdpa_median": round(med / base, 3),
                   "ratio_to_sdpa_min": round(min(ts) / min(times["sdpa"]), 3),
                   "seconds": [round(t, 3) for t in ts], "load_avg_1min": [load_before, load_after]}
            if not args.no_memory:
                proc = subprocess.run([sys.executable, __file__, "--model", args.model, "--lengths", str(n),
                                       "--all-maps-max", str(args.all_maps_max), "--exact-max", str(args.exact_max),
                                       "--memory-of", name], capture_output=True, text=True, check=True)
                peak = json.loads(proc.stdout.strip().splitlines()[-1])["peak_extra_bytes"]
                row["peak_extra_MiB"] = round(peak / 2**20, 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
    cfg = model.config
    full_maps = {n: cfg.num_hidden_layers * cfg.num_attention_heads * n * n * 4 / 2**20 for n in args.lengths}
    out = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "model": args.model,
           "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, 1 thread, CPU (shared)",
           "rows": rows, "all_layers_fp32_maps_MiB": full_maps}
    dest = Path(__file__).parent / "out" / "bench_sinks.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(out, indent=2))
    print(json.dumps({"all_layers_fp32_maps_MiB": full_maps}))
    return 0


def _inputs(tok, n: int) -> list[list[int]]:
    from steer.sinks import book_inputs

    return book_inputs(tok, n=1, length=n)


def _modes(model, tok, n: int, all_maps_max: int, exact_max: int) -> dict:
    from steer.hooks import attach
    from steer.sinks import _Collector, _streaming_hook, detect_sinks

    ids = torch.tensor(_inputs(tok, n))

    def stream_masked(ids=ids):
        coll = _Collector(model.config.num_hidden_layers, keep_maps=False)  # unpadded stays False: mask path
        with attach(model, {"blocks.*.attn.impl": _streaming_hook(coll)}):
            model.model(input_ids=ids, use_cache=False)
        assert coll.causal_calls == 0 and len(coll.col) == model.config.num_hidden_layers

    modes = {
        "sdpa": lambda ids=ids: model.model(input_ids=ids, use_cache=False),  # decoder stack, as detect_sinks
        "sinks_stream": lambda ids=ids: detect_sinks(model, tok, ids, keep_maps=False),
        "sinks_stream_masked": stream_masked,
    }
    if n <= exact_max:
        modes["sinks_exact"] = lambda ids=ids: detect_sinks(model, tok, ids, keep_maps=False, force_exact=True)
    if n <= all_maps_max:
        def all_maps(ids=ids):
            prev = model.config._attn_implementation
            model.config._attn_implementation = "eager"
            try:
                model.model(input_ids=ids, use_cache=False, output_attentions=True)
            finally:
                model.config._attn_implementation = prev
        modes["eager_all_maps"] = all_maps
    return modes


if __name__ == "__main__":
    raise SystemExit(main())
