"""GPU timings of ACT and sink statistics: SDPA with lse (steer.kernels.lse) vs our Triton kernel vs eager.

    python experiments/act/bench_attention_gpu.py --out device_out        # on the GPU machine
    python experiments/act/bench_attention_gpu.py --cpu-smoke --out /tmp/x  # tiny shapes on CPU: runs the code

Per case (batch 1, causal, bf16 unless said), times in ms (CUDA events, median of repeats after warm-up):
  sdpa          F.scaled_dot_product_attention(is_causal=True, enable_gqa): the baseline every ratio uses
  lse           the lse path (prefill: attention_lse + sink_stats_lse on the calibrated heads + act_from_lse,
                as ACT runs it; sinks: attention_lse + sink_stats_lse / sink_stats_columns; decode:
                attention_head_lse + act_from_lse)
  triton        steer.kernels.act (act_attention / sink_stats), the Triton flash kernels
  eager         the fp32 references that materialise the map (act_attention_reference, sink_stats_reference)
The device-to-device copy bandwidth (1 GiB buffer) is measured first; decode cases are memory-bound
(reading K and V once), and report GB/s and % of copy bandwidth. Targets (issue 16): >= 3x eager;
>= 70% of copy bandwidth for the memory-bound cases. Correctness: max |lse path - fp32 reference| per
case. Writes bench_attention_gpu.json and .md under --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from steer.kernels._triton import HAVE_TRITON, interpreting  # noqa: E402
from steer.kernels.act import (  # noqa: E402
    act_attention,
    act_attention_reference,
    sink_stats,
    sink_stats_reference,
)
from steer.kernels.lse import (  # noqa: E402
    act_from_lse,
    attention_head_lse,
    attention_lse,
    sink_index,
    sink_stats_columns,
    sink_stats_lse,
)

BW_TARGET, EAGER_TARGET = 0.70, 3.0


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_ms(fn, device, repeats: int) -> float:
    fn()
    _sync(device)
    ts = []
    for _ in range(repeats):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            ts.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t) * 1e3)
    return statistics.median(ts)


def copy_bandwidth_gbs(device, smoke: bool) -> float:
    n = (8 << 20) if smoke else (1 << 30)
    x = torch.empty(n, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    ms = timed_ms(lambda: y.copy_(x), device, 5 if smoke else 20)
    return 2 * n / (ms * 1e-3) / 1e9


def _qkv(B, H, Hkv, Tq, Tk, D, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(B, H, Tq, D, generator=g).to(device, dtype)
    k = torch.randn(B, Hkv, Tk, D, generator=g)
    k[:, :, 0] *= 4
    k = k.to(device, dtype)
    v = torch.randn(B, Hkv, Tk, D, generator=g).to(device, dtype)
    sinks = torch.zeros(B, H, Tk, dtype=torch.bool)
    sinks[..., [3, 17, Tk // 3]] = True  # three calibrated hidden sinks per head
    heads = torch.zeros(H, dtype=torch.bool)
    heads[:: max(1, H // 4)] = True  # a quarter of the heads calibrated
    return q, k, v, sinks.to(device), heads.to(device)


def shapes(smoke: bool):
    if smoke:
        return [dict(B=1, H=4, Hkv=2, T=64, D=16)]
    return [
        dict(B=1, H=9, Hkv=3, T=2048, D=64),
        dict(B=1, H=9, Hkv=3, T=8192, D=64),
        dict(B=1, H=32, Hkv=8, T=8192, D=128),
    ]


def cases(device, smoke: bool, dtype):
    """(name, case, {variant: fn}, (lse_fn, ref_fn) for the correctness column, bytes moved or None)."""
    use_triton = HAVE_TRITON and (device.type == "cuda" or interpreting())
    out = []
    for s in shapes(smoke):
        B, H, Hkv, T, D = s["B"], s["H"], s["Hkv"], s["T"], s["D"]
        q, k, v, sinks, heads = _qkv(B, H, Hkv, T, T, D, dtype, device)
        scale = D**-0.5
        hidx, cols, valid = sink_index(sinks, heads)
        label = f"B={B} H={H} Hkv={Hkv} T={T} D={D} {str(dtype).split('.')[-1]}"

        def sdpa(q=q, k=k, v=v, scale=scale):
            return torch.nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
            )

        def act_lse(q=q, k=k, v=v, scale=scale, hidx=hidx, cols=cols, valid=valid):
            o, lse = attention_lse(q, k, v, scale=scale)
            sink_stats_lse(
                q, k, lse, scale=scale, heads=hidx
            )  # the prefill's sink detection (calibrated heads)
            return act_from_lse(q, k, v, o, lse, scale=scale, heads=hidx, cols=cols, valid=valid, beta=0.4)[0]

        variants = {"sdpa": sdpa, "lse": act_lse}
        if use_triton:
            variants["triton"] = lambda q=q, k=k, v=v, s=sinks, h=heads, sc=scale: act_attention(
                q, k, v, scale=sc, sink_mask=s, head_mask=h, beta=0.4, backend="triton"
            )[0]
        ref = lambda q=q, k=k, v=v, s=sinks, h=heads, sc=scale: act_attention_reference(  # noqa: E731
            q, k, v, scale=sc, sink_mask=s, head_mask=h, beta=0.4
        )[0]
        if H * T * T * 4 * 3 < _free(device) // 2:
            variants["eager"] = ref
        out.append(("act_prefill", label, variants, (act_lse, ref), None))

        def sinks_full(q=q, k=k, v=v, scale=scale):
            o, lse = attention_lse(q, k, v, scale=scale)
            return sink_stats_lse(q, k, lse, scale=scale)[0]

        cand = torch.arange(4, device=device).view(1, 4)

        def sinks_cand(q=q, k=k, v=v, scale=scale, cand=cand):
            o, lse = attention_lse(q, k, v, scale=scale)
            return sink_stats_columns(q, k, lse, scale=scale, cols=cand)[0]

        sref = lambda q=q, k=k, sc=scale: sink_stats_reference(q, k, scale=sc)[0]  # noqa: E731
        variants = {"sdpa": sdpa, "lse": sinks_full, "lse_candidates": sinks_cand}
        if use_triton:
            variants["triton"] = lambda q=q, k=k, sc=scale: sink_stats(q, k, scale=sc, backend="triton")[0]
        variants["eager"] = sref
        out.append(("sink_stats", label, variants, (sinks_full, sref), None))

        # decode: one query row against a T-token cache; memory-bound on reading K and V
        qd = q[:, :, -1:].contiguous()
        bytes_kv = 2 * k.numel() * k.element_size()

        def dec_sdpa(qd=qd, k=k, v=v, scale=scale):
            return torch.nn.functional.scaled_dot_product_attention(
                qd, k, v, scale=scale, enable_gqa=qd.shape[1] != k.shape[1]
            )

        def dec_lse(qd=qd, k=k, v=v, scale=scale, hidx=hidx, cols=cols, valid=valid):
            o, lse = attention_head_lse(qd, k, v, scale=scale, heads=hidx)
            return act_from_lse(qd, k, v, o, lse, scale=scale, heads=hidx, cols=cols, valid=valid, beta=0.4)[
                0
            ]

        dref = lambda qd=qd, k=k, v=v, s=sinks, h=heads, sc=scale: act_attention_reference(  # noqa: E731
            qd, k, v, scale=sc, sink_mask=s, head_mask=h, beta=0.4
        )[0]
        variants = {"sdpa": dec_sdpa, "lse": dec_lse, "eager": dref}
        if use_triton:
            variants["triton"] = lambda qd=qd, k=k, v=v, s=sinks, h=heads, sc=scale: act_attention(
                qd, k, v, scale=sc, sink_mask=s, head_mask=h, beta=0.4, backend="triton"
            )[0]
        out.append(("act_decode", label, variants, (dec_lse, dref), bytes_kv))
    return out


def _free(device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return 8 << 30


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU (checks the code runs)")
    ap.add_argument("--out", default="device_out")
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args(argv)
    smoke = args.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        print("no CUDA device: run with --cpu-smoke to check the code on CPU")
        return 2
    device = torch.device("cpu" if smoke else "cuda")
    repeats = 3 if smoke else args.repeats
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = []

    def say(s=""):
        print(s, flush=True)
        lines.append(s)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (smoke)"
    bw = copy_bandwidth_gbs(device, smoke)
    say(f"device: {name}; device-to-device copy bandwidth {bw:.0f} GB/s")
    say("")
    say(
        "| kernel | case | variant | ms | x sdpa | x eager | GB/s | % copy BW | max abs err vs fp32 ref | targets |"
    )
    say("|---|---|---|---|---|---|---|---|---|---|")
    rows, ok = [], True
    dtypes = [torch.float32] if smoke else [torch.bfloat16, torch.float32]
    for dtype in dtypes:
        for kernel, case, variants, (lse_fn, ref_fn), nbytes in cases(device, smoke, dtype):
            err = float((lse_fn().float() - ref_fn().float()).abs().max())
            tol = 2e-2 if dtype == torch.bfloat16 else 2e-4
            ok &= err <= tol
            ms = {v: timed_ms(fn, device, repeats) for v, fn in variants.items()}
            for v, t in ms.items():
                x_sdpa = t / ms["sdpa"]
                x_eager = ms["eager"] / t if "eager" in ms else None
                gbs = nbytes / (t * 1e-3) / 1e9 if nbytes else None
                targets = []
                if v in ("lse", "triton") and x_eager is not None:
                    targets.append(
                        f"{'met' if x_eager >= EAGER_TARGET else 'MISSED'} >={EAGER_TARGET:.0f}x eager"
                    )
                if v in ("lse", "triton") and gbs is not None:
                    targets.append(f"{'met' if gbs >= BW_TARGET * bw else 'MISSED'} >={BW_TARGET:.0%} BW")
                row = dict(
                    kernel=kernel,
                    case=case,
                    variant=v,
                    ms=t,
                    x_sdpa=x_sdpa,
                    x_eager=x_eager,
                    gbs=gbs,
                    pct_copy=gbs / bw if gbs else None,
                    err=err if v == "lse" else None,
                    targets=targets,
                )
                rows.append(row)
                f = lambda x, p: "" if x is None else format(x, p)  # noqa: E731
                say(
                    f"| {kernel} | {case} | {v} | {t:.3f} | {x_sdpa:.2f} | {f(x_eager, '.1f')} | {f(gbs, '.0f')} | "
                    f"{f(row['pct_copy'], '.0%')} | {f(row['err'], '.1e')} | {', '.join(targets)} |"
                )
    say("")
    say(
        f"correctness: {'all within tolerance' if ok else 'SOME CASE OUT OF TOLERANCE'} (bf16 2e-2, fp32 2e-4)"
    )
    (out / "bench_attention_gpu.md").write_text("\n".join(lines) + "\n")
    (out / "bench_attention_gpu.json").write_text(
        json.dumps(dict(device=name, copy_gbs=bw, rows=rows, correctness_ok=ok), indent=1)
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
