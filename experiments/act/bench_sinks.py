"""Sink-statistics overhead and peak memory vs a plain SDPA forward, on 512- and 2048-token inputs.

    .venv/bin/python experiments/act/bench_sinks.py --model smollm2 --lengths 512 2048 --repeats 2

Modes, all in one process with one thread (ratios are to the SDPA forward of the same run):
  sdpa            model.model(ids): the decoder stack with SDPA (no lm_head: detect_sinks runs none)
  sinks_stream    detect_sinks: SDPA output + kernels.sink_stats column sums per layer (no N x N map)
  sinks_exact     detect_sinks(force_exact=True): eager maps, one layer alive at a time, reduced at once
  eager_all_maps  model(ids, output_attentions=True) with eager attention: every layer's map kept
                  (what TransformerLens-style caching of attention patterns holds); lengths <= --all-maps-max
Peak memory is measured per mode in a fresh subprocess (model loaded, warmed up on 32 tokens, then
Linux VmHWM reset through /proc/self/clear_refs): the peak RSS above the RSS before the call. In one
process the allocator's cached pages from an earlier mode would hide a later mode's peak.
"""

from __future__ import annotations

import argparse
import json
import platform
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


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--repeats", type=int, default=2)
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
        fn = _modes(model, tok, n, args.all_maps_max)[args.memory_of]
        with torch.no_grad():
            model(input_ids=torch.tensor(_inputs(tok, n))[:, :32])
            print(json.dumps({"peak_extra_bytes": measure(fn, 1)[1]}))
        return 0
    rows = []
    for n in args.lengths:
        modes = _modes(model, tok, n, args.all_maps_max)
        with torch.no_grad():
            model(input_ids=torch.tensor(_inputs(tok, n))[:, :32])  # warm-up
            results = {name: measure(fn, args.repeats)[0] for name, fn in modes.items()}
        for name, t in results.items():
            row = {"tokens": n, "mode": name, "seconds": round(t, 3), "ratio_to_sdpa": round(t / results["sdpa"], 3)}
            if not args.no_memory:
                proc = subprocess.run([sys.executable, __file__, "--model", args.model, "--lengths", str(n),
                                       "--all-maps-max", str(args.all_maps_max), "--memory-of", name],
                                      capture_output=True, text=True, check=True)
                peak = json.loads(proc.stdout.strip().splitlines()[-1])["peak_extra_bytes"]
                row["peak_extra_MiB"] = round(peak / 2**20, 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
    cfg = model.config
    full_maps = {n: cfg.num_hidden_layers * cfg.num_attention_heads * n * n * 4 / 2**20 for n in args.lengths}
    out = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "model": args.model,
           "machine": f"{platform.machine()}, torch {torch.__version__}, 1 thread, CPU (shared, loaded)",
           "rows": rows, "all_layers_fp32_maps_MiB": full_maps}
    dest = Path(__file__).parent / "out" / "bench_sinks.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(out, indent=2))
    print(json.dumps({"all_layers_fp32_maps_MiB": full_maps}))
    return 0


def _inputs(tok, n: int) -> list[list[int]]:
    from steer.sinks import book_inputs

    return book_inputs(tok, n=1, length=n)


def _modes(model, tok, n: int, all_maps_max: int) -> dict:
    from steer.sinks import detect_sinks

    ids = torch.tensor(_inputs(tok, n))
    modes = {
            "sdpa": lambda ids=ids: model.model(input_ids=ids, use_cache=False),  # decoder stack, as detect_sinks
            "sinks_stream": lambda ids=ids: detect_sinks(model, tok, ids, keep_maps=False),
            "sinks_exact": lambda ids=ids: detect_sinks(model, tok, ids, keep_maps=False, force_exact=True),
        }
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
