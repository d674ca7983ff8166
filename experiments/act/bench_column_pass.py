"""Issue 16: can exact sink discovery's column pass get cheaper than one attention pass on CPU?

One layer at SmolLM2's shapes (9 query heads, 3 kv heads, d = 64, batch 1, plain causal), one thread, process
CPU time, medians, every variant in the same process and interleaved round by round:

- `attention`: steer.kernels.lse.attention_lse (PyTorch's fused CPU flash kernel, with its lse): the baseline;
- `blocked`: steer.kernels.lse.sink_stats_lse, the shipped column pass (q k^T - lse, exp, column sum, in blocks);
- `reversed_dim`: the fused kernel with the roles reversed (keys attend over the reversed queries: i >= j is the
  causal mask on reversed sequences) and -lse_i / scale as an extra query dimension, so no N x N bias is needed;
  its lse is log col_j. Head dimension d + 1, padded to a multiple of 8;
- `reversed_weighted`: the same reversal at head dimension d, with exp(min lse - lse_i) as the values, so
  col_j = out_j * exp(lse'_j - min lse) (valid while the rows' lse span < ~87, fp32's exp range);
- `one_pass`: attention and column sums in one blocked pass in PyTorch operations (no fused kernel).

Every variant is checked equal to `blocked` (relative difference printed) before it is timed.

    OMP_NUM_THREADS=1 python experiments/act/bench_column_pass.py --lengths 2048 8192 --repeats 5 3
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from steer.kernels import lse as L

B, H, HKV, D = 1, 9, 3, 64


def reversed_dim(q, k, lse, scale):
    Dp = (D + 1 + 7) // 8 * 8
    keys = torch.zeros(B, H, q.shape[2], Dp)
    keys[..., :D] = q.flip(2)
    keys[..., D] = lse.flip(2) / -scale
    rows = torch.zeros(B, HKV, k.shape[2], Dp)
    rows[..., :D] = k.flip(2)
    rows[..., D] = 1.0
    _, lse_cols = L._cpu_flash(L._rep(rows, H), keys, torch.zeros_like(keys), True, None, scale)
    return lse_cols.exp().flip(2)


def reversed_weighted(q, k, lse, scale):
    m = lse.amin(-1, keepdim=True)
    vals = torch.zeros(B, H, q.shape[2], D)
    vals[..., 0] = (m - lse).exp().flip(-1)
    out, lse_rev = L._cpu_flash(L._rep(k.flip(2), H), q.flip(2), vals, True, None, scale)
    return (out[..., 0].log() + lse_rev - m).exp().flip(2)


def one_pass(q, k, v, scale, rows=64):
    T, rep = q.shape[2], H // HKV
    qg, kf, vf = q.reshape(B * HKV, rep, T, D), k.reshape(B * HKV, T, D), v.reshape(B * HKV, T, D)
    out, lse, col = (
        torch.empty(B * HKV, rep, T, D),
        torch.empty(B * HKV, rep, T),
        torch.zeros(B * HKV, rep, T),
    )
    for r0 in range(0, T, rows):
        r1 = min(T, r0 + rows)
        n = r1 - r0
        s = torch.bmm(qg[:, :, r0:r1].reshape(B * HKV, rep * n, D), kf[:, :r1].transpose(1, 2))
        s = s.mul_(scale).view(B * HKV, rep, n, r1)
        s[..., r0:r1].masked_fill_(torch.ones(n, n, dtype=torch.bool).triu_(1), float("-inf"))
        row_lse = torch.logsumexp(s, -1)
        s.sub_(row_lse.unsqueeze(-1)).exp_()
        out[:, :, r0:r1] = torch.bmm(s.view(B * HKV, rep * n, r1), vf[:, :r1]).view(B * HKV, rep, n, D)
        lse[:, :, r0:r1] = row_lse
        col[..., :r1] += s.sum(2)
    return col.view(B, H, T)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--repeats", type=int, nargs="+", default=[5, 3])
    ap.add_argument("--out", help="append one JSON line per length")
    args = ap.parse_args()
    torch.set_num_threads(1)
    for T, reps in zip(args.lengths, args.repeats, strict=True):
        row = run_length(T, reps)
        if args.out:
            with open(args.out, "a") as fh:
                fh.write(json.dumps(row) + "\n")


def run_length(T: int, reps: int) -> dict:
    """One length: every variant checked against the shipped pass, then timed in `reps` interleaved rounds."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, h, T, D, generator=g) for h in (H, HKV, HKV))
    k[:, :, 0] *= 4  # a first-token sink
    scale = D**-0.5
    _, lse = L.attention_lse(q, k, v, scale=scale)
    ref = L.sink_stats_lse(q, k, lse, scale=scale)[0]
    modes = {
        "attention": lambda: L.attention_lse(q, k, v, scale=scale),
        "blocked": lambda: L.sink_stats_lse(q, k, lse, scale=scale),
        "reversed_dim": lambda: reversed_dim(q, k, lse, scale),
        "reversed_weighted": lambda: reversed_weighted(q, k, lse, scale),
        "one_pass": lambda: one_pass(q, k, v, scale),
    }
    diff = {
        m: float(((modes[m]() - ref).abs() / ref).max())
        for m in ("reversed_dim", "reversed_weighted", "one_pass")
    }
    times = {m: [] for m in modes}
    for _ in range(reps):
        for m, f in modes.items():
            t0 = time.process_time()
            f()
            times[m].append(time.process_time() - t0)
    med = {m: sorted(ts)[len(ts) // 2] for m, ts in times.items()}
    row = {
        "tokens": T,
        "repeats": reps,
        "cpu_s": med,
        "max_rel_diff_vs_blocked": diff,
        "load_average": os.getloadavg(),
    }
    print(f"{T} tokens ({reps} rounds, load {row['load_average'][0]:.1f}):")
    for m, s in med.items():
        extra = f"  max rel diff {diff[m]:.1e}" if m in diff else ""
        print(f"  {m:18s} {s:7.3f} s  {s / med['attention']:.2f}x attention{extra}")
    return row


if __name__ == "__main__":
    main()
