"""Check every fused kernel against its PyTorch reference, then time Triton vs eager vs torch.compile.

On the GPU machine (one call, a few minutes):
    python experiments/bench_kernels.py --out $OUT
prints (and writes to $OUT/bench_kernels.md + .json):
  1. the device, torch/triton versions, and the measured device-to-device copy bandwidth (1 GiB copy);
  2. correctness: Triton vs the torch reference on CUDA for every kernel (max error, tolerance, ok);
  3. timings (median ms, triton.testing.do_bench) of the Triton kernel, the eager torch reference and
     torch.compile of the reference on realistic shapes (router 8k tokens x 64-256 experts; ACT and
     sink statistics 8-32 heads x 2-8k tokens; fingerprint 8k x 4096 -> 8; LYNX probe 64 cues x 4
     layers x 4096), achieved GB/s (memory-bound kernels) or TFLOP/s (attention), % of copy bandwidth,
     and the targets: >= 3x the eager reference; >= 70% of copy bandwidth for memory-bound kernels;
  4. a small launch-config sweep for the router and fingerprint (to confirm the fixed configs).
Exit code 1 if any correctness check fails (missed speed targets are reported, not fatal).

Without a GPU: `python experiments/bench_kernels.py --cpu-smoke` runs the same code on tiny shapes
with Triton under the CPU interpreter (timings there are meaningless; it shows the script works).
"""

from __future__ import annotations

import os
import sys

if "--cpu-smoke" in sys.argv:  # must precede any import of triton (see kernels/_triton.py)
    os.environ["TRITON_INTERPRET"] = "1"

import argparse  # noqa: E402
import datetime as dt  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import steer.kernels._triton as kt  # noqa: E402
from steer.kernels.act import act_attention, act_attention_reference, sink_stats, sink_stats_reference  # noqa: E402
from steer.kernels.fingerprint import (  # noqa: E402
    fingerprint,
    fingerprint_reference,
    projection_matrix,  # noqa: E402
)
from steer.kernels.probe_score import probe_score, probe_score_reference  # noqa: E402
from steer.kernels.router import RouterEdit, RoutingRule, route, route_reference  # noqa: E402  # noqa: E402

SPEEDUP_TARGET = 3.0  # x the eager torch reference
BW_TARGET = 0.70  # fraction of measured copy bandwidth, memory-bound kernels


# ----------------------------------------------------------------------------------------------
# timing helpers
# ----------------------------------------------------------------------------------------------


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timed_ms(fn, device, smoke: bool) -> float:
    if device == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=10, rep=40, return_mode="median"))
    reps = 2 if smoke else 5
    fn()
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1e3)
    return statistics.median(out)


def copy_bandwidth_gbs(device, smoke: bool) -> float:
    n = (8 << 20) if smoke else (1 << 30)
    x = torch.empty(n, dtype=torch.uint8, device=device).fill_(1)
    y = torch.empty_like(x)
    ms = timed_ms(lambda: y.copy_(x), device, smoke)
    return 2 * n / (ms * 1e-3) / 1e9  # read + write


def free_memory_bytes(device) -> int:
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    return 8 << 30


# ----------------------------------------------------------------------------------------------
# cases: (name, shape text, triton fn, reference fn, bytes moved or None, flops or None, ref_bytes)
# ----------------------------------------------------------------------------------------------


def _mask(E, ids, device):
    m = torch.zeros(E, dtype=torch.bool, device=device)
    m[list(ids)] = True
    return m


def router_cases(device, smoke):
    T = 64 if smoke else 8192
    specs = [
        ("olmoe", RoutingRule("softmax_topk", 8 if not smoke else 2, norm_topk_prob=False), 64 if not smoke else 16,
         torch.bfloat16),
        ("qwen3-moe", RoutingRule("softmax_topk", 8 if not smoke else 2, norm_topk_prob=True), 128 if not smoke else 16,
         torch.bfloat16),
        ("gpt-oss", RoutingRule("topk_softmax", 4 if not smoke else 2), 128 if not smoke else 16, torch.bfloat16),
        ("deepseek-v3", RoutingRule("sigmoid_group", 8 if not smoke else 2, norm_topk_prob=True, n_group=8 if not smoke else 4,
                                    topk_group=4 if not smoke else 2, routed_scaling_factor=2.5, weights_dtype=torch.float32),
         256 if not smoke else 16, torch.float32),
    ]
    out = []
    g = torch.Generator(device="cpu").manual_seed(0)
    for name, rule, E, dtype in specs:
        logits = torch.randn(T, E, generator=g).to(device=device, dtype=dtype)
        bias = (torch.randn(E, generator=g) * 0.1).to(device) if rule.kind == "sigmoid_group" else None
        tm = torch.rand(T, generator=g).to(device) > 0.1
        for edit_name, edit in (("none", None), ("mask+zero+force", RouterEdit(
                off_mask=_mask(E, range(0, E, 9), device), off_zero=_mask(E, [1], device),
                force_on=_mask(E, [E - 1], device), renormalize=True))):
            tri = (lambda lg=logits, r=rule, e=edit, b=bias, m=tm: route(lg, r, e, bias=b, token_mask=m, backend="triton"))
            ref = (lambda lg=logits, r=rule, e=edit, b=bias, m=tm: route_reference(lg, r, e, bias=b, token_mask=m))
            w_el = torch.empty((), dtype=rule.weights_dtype or dtype).element_size()
            nbytes = logits.numel() * logits.element_size() + T * rule.top_k * (w_el + 8) + T
            out.append(dict(kernel="router", case=f"{name} E={E} k={rule.top_k} edit={edit_name}", shape=f"{T}x{E}",
                            tri=tri, ref=ref, bytes=nbytes, flops=None, ref_bytes=8 * logits.numel() * 4,
                            check=_check_route, headline=edit_name != "none" and name == "deepseek-v3"))
    return out


def _check_route(a, b):
    ai, ao = a.indices.sort(-1)
    bi, bo = b.indices.sort(-1)
    same = (ai == bi).all(-1)
    err = (a.weights.float().gather(1, ao) - b.weights.float().gather(1, bo)).abs()[same].max().item() if same.any() else 0.0
    frac = same.float().mean().item()  # rows whose expert sets agree (ties may differ)
    dt_ = abs(int(a.touched) - int(b.touched))
    tol = 1e-2 if a.weights.dtype != torch.float32 else 1e-5
    ok = frac >= 0.999 and err <= tol and dt_ <= max(2, int(0.001 * a.indices.shape[0]))
    return err, tol, ok, f"sets agree {frac:.4%}, touched {int(a.touched)} vs {int(b.touched)}"


def act_cases(device, smoke):
    shapes = [(1, 2, 80)] if smoke else [(1, 8, 2048), (1, 32, 2048), (1, 8, 8192), (1, 32, 8192)]
    D = 16 if smoke else 128
    out = []
    g = torch.Generator(device="cpu").manual_seed(1)
    for B, H, T in shapes:
        Hkv = max(1, H // 4)
        q = torch.randn(B, H, T, D, generator=g).to(device=device, dtype=torch.bfloat16)
        k = torch.randn(B, Hkv, T, D, generator=g).to(device=device, dtype=torch.bfloat16)
        v = torch.randn(B, Hkv, T, D, generator=g).to(device=device, dtype=torch.bfloat16)
        sinks = torch.zeros(1, H, T, dtype=torch.bool)
        sinks[..., 1:3] = True  # calibrated sinks; the initial sink (0) is kept
        sinks[..., torch.randperm(T, generator=g)[: max(1, T // 100)]] = True
        sinks[..., 0] = False
        sinks = sinks.to(device)
        heads = (torch.arange(H) % 2 == 0).to(device)
        scale = D ** -0.5
        causal_flops = 4 * B * H * T * T * D / 2
        ref_bytes = 10 * B * H * T * T * 4
        out.append(dict(
            kernel="act_attention", case=f"B={B} H={H} Hkv={Hkv} T={T} D={D} bf16", shape=f"{H}x{T}",
            tri=lambda q=q, k=k, v=v, s=sinks, h=heads, sc=scale: act_attention(
                q, k, v, scale=sc, sink_mask=s, head_mask=h, beta=0.4, backend="triton"),
            ref=lambda q=q, k=k, v=v, s=sinks, h=heads, sc=scale: act_attention_reference(
                q, k, v, scale=sc, sink_mask=s, head_mask=h, beta=0.4),
            sdpa=lambda q=q, k=k, v=v, sc=scale: torch.nn.functional.scaled_dot_product_attention(
                q, k.repeat_interleave(q.shape[1] // k.shape[1], 1), v.repeat_interleave(q.shape[1] // k.shape[1], 1),
                is_causal=True, scale=sc),
            bytes=None, flops=causal_flops, ref_bytes=ref_bytes, check=_check_pair(2e-2),
            headline=(H, T) == ((2, 80) if smoke else (32, 2048))))
        out.append(dict(
            kernel="sink_stats", case=f"B={B} H={H} Hkv={Hkv} T={T} D={D} bf16", shape=f"{H}x{T}",
            tri=lambda q=q, k=k, sc=scale: sink_stats(q, k, scale=sc, backend="triton"),
            ref=lambda q=q, k=k, sc=scale: sink_stats_reference(q, k, scale=sc),
            bytes=None, flops=causal_flops, ref_bytes=4 * B * H * 256 * T * 4,
            check=_check_pair(3e-2, rel=True), headline=(H, T) == ((2, 80) if smoke else (32, 2048))))
    return out


def _check_pair(tol, rel=False):
    def check(a, b):
        a0, b0 = a[0].float(), b[0].float()
        err = (a0 - b0).abs().max().item()
        scale = b0.abs().max().item() if rel else 1.0
        extra_ok = torch.equal(a[1], b[1]) if a[1].dtype == torch.int64 and a[1].dim() else int(a[1]) == int(b[1])
        ok = err <= tol * max(scale, 1.0) and bool(extra_ok) and not a0.isnan().any().item()
        return err, tol * max(scale, 1.0), ok, "touched/n_obs equal" if extra_ok else "touched/n_obs DIFFER"
    return check


def fingerprint_cases(device, smoke):
    out = []
    g = torch.Generator(device="cpu").manual_seed(2)
    for T, D, k, dtype in ([(64, 96, 8, torch.bfloat16)] if smoke else
                           [(8192, 4096, 8, torch.bfloat16), (8192, 4096, 64, torch.bfloat16), (8192, 4096, 8, torch.float32)]):
        h = torch.randn(T, D, generator=g).to(device=device, dtype=dtype)
        P = projection_matrix(0, D, k).to(device)
        nbytes = h.numel() * h.element_size() + P.numel() * 4 + T * k * 2
        out.append(dict(kernel="fingerprint", case=f"{T}x{D} -> {k} {str(dtype)[6:]}", shape=f"{T}x{D}",
                        tri=lambda h=h, P=P: fingerprint(h, P, backend="triton"),
                        ref=lambda h=h, P=P: fingerprint_reference(h, P),
                        bytes=nbytes, flops=None, ref_bytes=h.numel() * 4,
                        check=lambda a, b: _check_half(a, b), headline=k == 8 and dtype == torch.bfloat16))
    return out


def _check_half(a, b):
    err = (a.float() - b.float()).abs().max().item()
    tol = 2e-3 * max(1.0, b.float().abs().max().item())
    return err, tol, err <= tol and not a.isnan().any().item(), ""


def probe_cases(device, smoke):
    B, T, L, D = (4, 8, 2, 32) if smoke else (64, 1024, 4, 4096)
    H1, H2 = (32, 16) if smoke else (256, 64)
    g = torch.Generator(device="cpu").manual_seed(3)
    hidden = [torch.randn(B, T, D, generator=g).to(device=device, dtype=torch.bfloat16) for _ in range(L)]
    pos = torch.randint(0, T, (B,), generator=g).to(device)
    F = L * D
    mean = (torch.randn(F, generator=g) * 0.1).to(device)
    std = (torch.rand(F, generator=g) + 0.5).to(device)
    layers = [((torch.randn(o, i, generator=g) * i ** -0.5).to(device), (torch.randn(o, generator=g) * 0.1).to(device))
              for i, o in ((F, H1), (H1, H2), (H2, 1))]
    nbytes = F * H1 * 4 + H1 * H2 * 4 + B * F * 2 + 2 * F * 4
    return [dict(kernel="probe_score", case=f"B={B} L={L} D={D} MLP {F}->{H1}->{H2}->1", shape=f"{B}x{F}",
                 tri=lambda: probe_score(hidden, pos, mean, std, layers, backend="triton"),
                 ref=lambda: probe_score_reference(hidden, pos, mean, std, layers),
                 bytes=nbytes, flops=None, ref_bytes=B * F * 8,
                 check=lambda a, b: ((a - b).abs().max().item(), 1e-4, bool(((a - b).abs() <= 1e-4).all()), ""),
                 headline=True)]


# ----------------------------------------------------------------------------------------------


def sweep(device, smoke, copy_bw):
    """Timings of a few alternative launch configs for the memory-bound kernels."""
    rows = []
    r_mod = kt.load("_router_triton")
    f_mod = kt.load("_fingerprint_triton")
    T, E = (64, 16) if smoke else (8192, 256)
    logits = torch.randn(T, E, device=device)
    rule = RoutingRule("sigmoid_group", 2 if smoke else 8, norm_topk_prob=True, n_group=4 if smoke else 8,
                       topk_group=2 if smoke else 4)
    old = r_mod._TILE, r_mod.NUM_WARPS
    for tile, warps in ((256, 4), (512, 4), (1024, 4), (1024, 8), (2048, 8)):
        r_mod._TILE, r_mod.NUM_WARPS = tile, warps
        ms = timed_ms(lambda: route(logits, rule, backend="triton"), device, smoke)
        rows.append(("router", f"E={E} tile={tile} warps={warps}{' (default)' if (tile, warps) == old else ''}", ms,
                     logits.numel() * 4 / (ms * 1e-3) / 1e9))
    r_mod._TILE, r_mod.NUM_WARPS = old
    h = torch.randn(64 if smoke else 8192, 96 if smoke else 4096, device=device, dtype=torch.bfloat16)
    P = projection_matrix(0, h.shape[1], 8).to(device)
    old_bt, old_bd = f_mod.BT, f_mod.BD
    for bt, bd in ((16, 64), (32, 64), (64, 64), (32, 128)):
        f_mod.BT, f_mod.BD = bt, bd
        ms = timed_ms(lambda: fingerprint(h, P, backend="triton"), device, smoke)
        rows.append(("fingerprint", f"BT={bt} BD={bd}{' (default)' if (bt, bd) == (old_bt, old_bd) else ''}", ms,
                     h.numel() * 2 / (ms * 1e-3) / 1e9))
    f_mod.BT, f_mod.BD = old_bt, old_bd
    return [(k, c, ms, gbs, gbs / copy_bw) for k, c, ms, gbs in rows]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU under the Triton interpreter")
    ap.add_argument("--out", type=Path, default=None, help="directory for bench_kernels.md / .json")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile timings")
    ap.add_argument("--budget-s", type=float, default=290.0,
                    help="wall-clock budget: torch.compile and the sweep are skipped (and said so) when it runs short")
    args = ap.parse_args(argv)
    smoke = args.cpu_smoke
    t_start = time.perf_counter()
    elapsed = lambda: time.perf_counter() - t_start
    if smoke:
        torch.set_num_threads(1)
        device = "cpu"
        if not kt.interpreter_ready():
            print("interpreter not active (TRITON_INTERPRET must be set before triton is imported)")
            return 2
        kt.POISON = True
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: GPU results pending. Run with --cpu-smoke to check the script on CPU.")
            return 2
        device = "cuda"
    lines: list[str] = []

    def say(s=""):
        print(s, flush=True)
        lines.append(s)

    import triton

    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (Triton interpreter: timings meaningless)"
    say(f"# bench_kernels: {name}")
    say(f"torch {torch.__version__}, triton {triton.__version__}, {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC"
        + (" -- SMOKE RUN, GPU results pending" if smoke else ""))
    copy_bw = copy_bandwidth_gbs(device, smoke)
    say(f"device-to-device copy bandwidth: {copy_bw:.0f} GB/s (read+write of a {'8 MiB' if smoke else '1 GiB'} buffer)")

    cases = router_cases(device, smoke) + act_cases(device, smoke) + fingerprint_cases(device, smoke) + probe_cases(device, smoke)
    say("\n## correctness: Triton vs torch reference on " + device)
    say("| kernel | case | max abs err | tol | ok | note |")
    say("|---|---|---|---|---|---|")
    all_ok = True
    mem = free_memory_bytes(device)
    for c in cases:
        if c["ref_bytes"] > 0.4 * mem:
            say(f"| {c['kernel']} | {c['case']} | - | - | skipped | reference needs ~{c['ref_bytes'] / 2**30:.0f} GiB |")
            c["ref_ok"] = False
            continue
        try:
            a, b = c["tri"](), c["ref"]()
            _sync(device)
            err, tol, ok, note = c["check"](a, b)
        except Exception as e:  # report, keep going: one broken kernel must not hide the others
            err, tol, ok, note = float("nan"), float("nan"), False, f"{type(e).__name__}: {str(e)[:200]}"
        c["ref_ok"] = True
        all_ok &= bool(ok)
        say(f"| {c['kernel']} | {c['case']} | {err:.3g} | {tol:.3g} | {'ok' if ok else 'FAIL'} | {note} |")
        if device == "cuda":
            torch.cuda.empty_cache()

    say("\n## timings (median ms)")
    say("| kernel | case | triton | eager ref | compiled ref | x eager | x compiled | GB/s | % copy BW | TFLOP/s | targets |")
    say("|---|---|---|---|---|---|---|---|---|---|---|")
    results = []
    for c in cases:
        row = dict(kernel=c["kernel"], case=c["case"])
        try:
            row["triton_ms"] = timed_ms(c["tri"], device, smoke)
        except Exception as e:
            say(f"| {c['kernel']} | {c['case']} | ERROR {type(e).__name__}: {str(e)[:120]} |")
            all_ok = False
            continue
        slow_ref = c["ref_bytes"] > (4 << 30) and elapsed() > 0.75 * args.budget_s
        row["eager_ms"] = timed_ms(c["ref"], device, smoke) if c.get("ref_ok") and not slow_ref else None
        row["compiled_ms"] = None
        if c["headline"] and c.get("ref_ok") and not smoke and not args.no_compile and elapsed() > 0.5 * args.budget_s:
            row["compile_error"] = f"skipped: {elapsed():.0f} s of the {args.budget_s:.0f} s budget used"
        elif c["headline"] and c.get("ref_ok") and not smoke and not args.no_compile:
            try:
                cfn = torch.compile(c["ref"])
                t0 = time.perf_counter()
                cfn()
                _sync(device)
                row["compile_s"] = time.perf_counter() - t0
                row["compiled_ms"] = timed_ms(cfn, device, smoke)
            except Exception as e:
                row["compile_error"] = f"{type(e).__name__}: {str(e)[:120]}"
        if "sdpa" in c:
            row["sdpa_ms"] = timed_ms(c["sdpa"], device, smoke)
        ms = row["triton_ms"]
        gbs = c["bytes"] / (ms * 1e-3) / 1e9 if c["bytes"] else None
        tflops = c["flops"] / (ms * 1e-3) / 1e12 if c["flops"] else None
        x_eager = row["eager_ms"] / ms if row["eager_ms"] else None
        x_comp = row["compiled_ms"] / ms if row["compiled_ms"] else None
        row.update(gbs=gbs, tflops=tflops, x_eager=x_eager, x_compiled=x_comp, pct_copy=(gbs / copy_bw if gbs else None))
        targets = []
        if smoke:
            targets.append("n/a (interpreter)")
        elif x_eager is not None:
            targets.append(f"{'met' if x_eager >= SPEEDUP_TARGET else 'MISSED'} >={SPEEDUP_TARGET:.0f}x eager")
        if gbs is not None and not smoke:
            targets.append(f"{'met' if gbs >= BW_TARGET * copy_bw else 'MISSED'} >={BW_TARGET:.0%} BW")
        if "sdpa_ms" in row:
            targets.append(f"{row['sdpa_ms'] / ms:.2f}x SDPA speed (plain attention {row['sdpa_ms']:.3f} ms)")
        f = lambda x, p=".3f": "-" if x is None else format(x, p)
        say(f"| {c['kernel']} | {c['case']} | {f(ms)} | {f(row['eager_ms'])} | {f(row['compiled_ms'])} | "
            f"{f(x_eager, '.1f')} | {f(x_comp, '.1f')} | {f(gbs, '.0f')} | {f(row['pct_copy'], '.0%')} | "
            f"{f(tflops, '.1f')} | {'; '.join(targets)} |")
        results.append(row)
        if device == "cuda":
            torch.cuda.empty_cache()
    for r in results:
        if "compile_error" in r:
            say(f"torch.compile failed for {r['kernel']} {r['case']}: {r['compile_error']}")
        elif r.get("compile_s"):
            say(f"torch.compile of the {r['kernel']} reference took {r['compile_s']:.1f} s to compile ({r['case']})")

    say("\n## launch-config sweep (fixed configs are the defaults)")
    say("| kernel | config | ms | GB/s | % copy BW |")
    say("|---|---|---|---|---|")
    try:
        if elapsed() > 0.85 * args.budget_s:
            say(f"sweep skipped: {elapsed():.0f} s of the {args.budget_s:.0f} s budget used")
        else:
            for k, cfg, ms, gbs, pct in sweep(device, smoke, copy_bw):
                say(f"| {k} | {cfg} | {ms:.4f} | {gbs:.0f} | {pct:.0%} |")
    except Exception as e:
        say(f"sweep failed: {type(e).__name__}: {e}")
    say(f"\ncorrectness: {'ALL OK' if all_ok else 'FAILURES (see above)'}; wall time {elapsed():.0f} s")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_kernels.md").write_text("\n".join(lines) + "\n")
        (args.out / "bench_kernels.json").write_text(json.dumps(
            dict(device=name, copy_gbs=copy_bw, smoke=smoke, results=results, correctness_ok=all_ok), indent=1, default=str))
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
