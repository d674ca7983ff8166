"""One attention layer's cost at 512 / 2,048 / 8,192 tokens: the lse paths vs PyTorch's SDPA call.

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python experiments/act/bench_layer.py --lengths 512 2048 8192

Where a whole forward at 8,192 tokens does not fit the time on a shared machine, this times the part
that grows as N^2: one layer's attention with SmolLM2's shapes (9 query heads, 3 kv heads, d 64) and
Gemma-3-270m's (4 / 1, d 256), causal, fp32, batch 1, one thread. Inputs are random with a strong
first-token key (a sink), so timings do not depend on a model; medians over interleaved repeats of
process CPU time (time.process_time), ratios to `sdpa` of the same run:

  sdpa              F.scaled_dot_product_attention(is_causal, enable_gqa) as transformers calls it
  attention_lse     steer.kernels.lse.attention_lse: the same attention plus each row's lse
  act_extra         what an ACT layer adds: exact sink scores of one calibrated head (sink_stats_lse,
                    heads=[h]) + sink sets + act_from_lse on it
  candidates_extra  sink_stats_columns on 4 candidate columns, all heads
  full_extra        sink_stats_lse on every head (exact full discovery)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

SHAPES = {"smollm2": (9, 3, 64), "gemma3-270m": (4, 1, 256)}


def modes(n: int, H: int, Hkv: int, D: int) -> dict:
    from steer.act import ACT
    from steer.kernels.lse import act_from_lse, attention_lse, sink_index, sink_stats_columns, sink_stats_lse

    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, n, H, D, generator=g).transpose(1, 2)  # transformers' layout: [B, H, T, D] view
    k = torch.randn(1, n, Hkv, D, generator=g).transpose(1, 2)
    v = torch.randn(1, n, Hkv, D, generator=g).transpose(1, 2)
    k[:, :, 0] *= 8
    scale = D**-0.5
    out, lse = attention_lse(q, k, v, scale=scale)
    heads = torch.tensor([1])
    act = ACT([(0, 1)], on_no_effect="ignore")
    cols4 = torch.arange(4).view(1, 4)

    def act_extra():
        col, n_obs = sink_stats_lse(q, k, lse, scale=scale, heads=heads)
        sinks = act.sink_sets(col, n_obs)
        _, cols, valid = sink_index(sinks, torch.ones(1, dtype=torch.bool))
        act_from_lse(q, k, v, out, lse, scale=scale, heads=heads, cols=cols, valid=valid, beta=0.4)

    return {
        "sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=scale, enable_gqa=H != Hkv
        ),
        "attention_lse": lambda: attention_lse(q, k, v, scale=scale),
        "act_extra": act_extra,
        "candidates_extra": lambda: sink_stats_columns(q, k, lse, scale=scale, cols=cols4),
        "full_extra": lambda: sink_stats_lse(q, k, lse, scale=scale),
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(Path(__file__).parent / "out" / "bench_layer.jsonl"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for shape_name, (H, Hkv, D) in SHAPES.items():
        for n in args.lengths:
            ms = modes(n, H, Hkv, D)
            names = list(ms)
            times = {name: [] for name in names}
            load0 = os.getloadavg()[0]
            for r in range(args.repeats):
                for name in names[r % len(names) :] + names[: r % len(names)]:
                    t = time.process_time()
                    ms[name]()
                    times[name].append(time.process_time() - t)
            base = statistics.median(times["sdpa"])
            for name, ts in times.items():
                row = {
                    "shapes": shape_name,
                    "tokens": n,
                    "mode": name,
                    "repeats": len(ts),
                    "median_cpu_ms": round(statistics.median(ts) * 1e3, 2),
                    "ratio_cpu_to_sdpa": round(statistics.median(ts) / base, 3),
                    "load_avg_1min": [load0, os.getloadavg()[0]],
                }
                print(json.dumps(row), flush=True)
                with out.open("a") as f:
                    f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
