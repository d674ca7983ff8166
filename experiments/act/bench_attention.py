"""ACT and sink statistics from SDPA's log-sum-exp vs a plain SDPA forward (issue 16's target table).

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python experiments/act/bench_attention.py --model smollm2 \\
        --lengths 512 2048 8192 --repeats 5 5 2

Prefill modes (batch 1, the decoder stack only: no lm_head), ratios to `sdpa` of the same run:
  sdpa               model.model(ids) with SDPA
  act_lse            ACT on 10 heads (one in each of layers 2-11), path "lse": fused attention + lse, exact sink
                     scores of the calibrated heads from lse, o' = beta o_S + c (o - o_S)
  act_kernel         the same ACT, path "kernel" (on CPU the exact fp32 reference: what ACT cost before)
  sinks_candidates   detect_sinks(candidates=first 4 positions): exact scores of 4 columns, O(N |C| d)
  sinks_full         detect_sinks(): exact scores of every column from lse (full discovery)
  sinks_sampled      detect_sinks(sample_rows=--sample-rows): every column estimated, with standard errors
  sinks_previous     the previous streaming path: SDPA + steer.kernels.act.sink_stats (softmax per query block)
  eager              the model with eager attention (what output_attentions-based tools pay)
Modes marked slow in SLOW_MODES run only up to --slow-max tokens.
Decode (--decode-cache tokens of cache): `decode_plain` (the decoder stack, one new token, SDPA) and
`decode_act_lse` (ACT path "lse", the prefill's sink columns reused), per step, interleaved step by
step over --decode-steps steps on two caches of the same length.
Timings are interleaved: each repeat runs every mode once, in an order rotated by the repeat, so load
from other jobs hits all modes alike; medians over repeats. Each call records wall time, process CPU
time (time.process_time: on a shared machine it leaves out the time the process waits for a core,
though not the slowdown from sharing caches and memory bandwidth) and peak extra resident memory
(`measure`). Ratios of both times are to `sdpa` (decode: `decode_plain`) of the same run. One JSON line
per length and mode is appended to --out as soon as that length is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

SLOW_MODES = {"act_kernel", "sinks_previous", "eager"}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def measure(fn) -> tuple[float, float, float]:
    """(wall s, process CPU s, peak extra RSS MiB) of one call of fn.

    Peak extra RSS = the process's peak resident set during the call (VmHWM, reset before the call by
    writing 5 to /proc/self/clear_refs) minus its resident set before the call: every byte the call
    touched beyond what was already resident (torch's CPU tensors come from malloc/mmap and are returned
    on free, so this follows the live tensors; -1 where the kernel does not offer the reset)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        rss0 = _status_kib("VmRSS")
    except OSError:
        rss0 = None
    w, c = time.perf_counter(), time.process_time()
    fn()
    c, w = time.process_time() - c, time.perf_counter() - w
    peak = (_status_kib("VmHWM") - rss0) / 1024 if rss0 is not None else -1.0
    return w, c, peak


def interleaved(modes: dict, repeats: int, on_call=None) -> dict[str, list[tuple[float, float, float]]]:
    """Each repeat runs every mode once, in an order rotated by the repeat: (wall, cpu, peak MiB) rows.
    on_call(repeat, mode, row) sees each call as it ends (long runs keep what they measured if stopped)."""
    names = list(modes)
    times: dict[str, list[tuple[float, float, float]]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(measure(modes[name]))
            if on_call is not None:
                on_call(r, name, times[name][-1])
    return times


def act_heads(model) -> list[tuple[int, int]]:
    n_layers, n_heads = model.config.num_hidden_layers, model.config.num_attention_heads
    return [(layer, layer % n_heads) for layer in range(2, min(12, n_layers))]


def prefill_modes(model, tok, n: int, slow_max: int, sample_rows: int) -> dict:
    from steer.act import ACT
    from steer.hooks import attach
    from steer.sinks import book_inputs, detect_sinks

    ids = torch.tensor(book_inputs(tok, n=1, length=n))
    heads = act_heads(model)

    def act(path):
        def run():
            a = ACT(heads, on_no_effect="ignore")
            a.path = path
            with a.apply(model):
                model.model(input_ids=ids, use_cache=False)

        return run

    def previous_hook(call, ctx):
        from steer.kernels.act import sink_stats

        q, k = call.query, call.key
        if call.causal:
            out = torch.nn.functional.scaled_dot_product_attention(
                q, k, call.value, is_causal=True, scale=call.scaling, enable_gqa=q.shape[1] != k.shape[1]
            )
            result = (out.transpose(1, 2).contiguous(), None)
            sink_stats(q, k, scale=call.scaling)
        else:
            result = call.base()
            sink_stats(q, k, scale=call.scaling, mask=call.mask)
        return result

    def previous():
        with attach(model, {"blocks.*.attn.impl": previous_hook}):
            model.model(input_ids=ids, use_cache=False)

    def eager():
        prev = model.config._attn_implementation
        model.config._attn_implementation = "eager"
        try:
            model.model(input_ids=ids, use_cache=False)
        finally:
            model.config._attn_implementation = prev

    modes = {
        "sdpa": lambda: model.model(input_ids=ids, use_cache=False),
        "act_lse": act("lse"),
        "act_kernel": act("kernel"),
        "sinks_candidates": lambda: detect_sinks(model, tok, ids, keep_maps=False, candidates=range(4)),
        "sinks_full": lambda: detect_sinks(model, tok, ids, keep_maps=False),
        "sinks_sampled": lambda: detect_sinks(model, tok, ids, keep_maps=False, sample_rows=sample_rows),
        "sinks_previous": previous,
        "eager": eager,
    }
    return {k: v for k, v in modes.items() if n <= slow_max or k not in SLOW_MODES}


def decode_times(model, tok, n_cache: int, steps: int) -> dict[str, list[float]]:
    from steer.act import ACT
    from steer.sinks import book_inputs

    ids = torch.tensor(book_inputs(tok, n=1, length=n_cache + steps))
    prompt, new = ids[:, :n_cache], ids[:, n_cache:]
    act = ACT(act_heads(model), on_no_effect="ignore")
    act.path = "lse"
    plain_cache = model.model(input_ids=prompt, use_cache=True).past_key_values
    with act.apply(model):
        act_cache = model.model(input_ids=prompt, use_cache=True).past_key_values
    state = act._state  # apply() resets it on entry: restore the prefill's sink sets each step
    times = {"decode_plain": [], "decode_act_lse": []}
    for j in range(steps):
        tok_j = new[:, j : j + 1]
        order = ["plain", "act"] if j % 2 == 0 else ["act", "plain"]
        for which in order:
            if which == "plain":
                times["decode_plain"].append(
                    measure(lambda t=tok_j: model.model(input_ids=t, cache=plain_cache, use_cache=True))
                )
            else:
                with act.apply(model):
                    act._state = state
                    times["decode_act_lse"].append(
                        measure(lambda t=tok_j: model.model(input_ids=t, cache=act_cache, use_cache=True))
                    )
    return times


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--lengths", type=int, nargs="*", default=[512, 2048])
    ap.add_argument("--repeats", type=int, nargs="+", default=[3],
                    help="interleaved repeats per length, in --lengths order (the last one repeats)")
    ap.add_argument(
        "--slow-max", type=int, default=2048, help="time act_kernel/sinks_previous/eager up to this"
    )
    ap.add_argument("--sample-rows", type=int, default=256)
    ap.add_argument("--decode-cache", type=int, default=2048, help="0 = no decode timing")
    ap.add_argument("--decode-steps", type=int, default=16)
    ap.add_argument("--modes", nargs="+",
                    help="prefill modes to time, in this order in the first repeat (default: all; sdpa is always "
                         "timed, first unless listed)")
    ap.add_argument("--each-call", action="store_true",
                    help="also append one 'record': 'call' line per prefill call as it ends (for runs that may be stopped)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "out" / "bench_attention.jsonl"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    from steer.models import load

    lm = load(args.model, progress=False)
    model, tok = lm.model, lm.tokenizer
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": args.model,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, 1 thread, shared CPU",
        "act_heads": act_heads(model),
    }

    def emit(row):
        row = {**meta, **row}
        print(json.dumps(row), flush=True)
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def rows(n, times, base_mode, load):
        med = {name: [statistics.median(t[i] for t in ts) for i in range(3)] for name, ts in times.items()}
        for name, ts in times.items():
            emit(
                {
                    "tokens": n,
                    "mode": name,
                    "repeats": len(ts),
                    "median_wall_s": round(med[name][0], 5),
                    "median_cpu_s": round(med[name][1], 5),
                    "ratio_wall": round(med[name][0] / med[base_mode][0], 3),
                    "ratio_cpu": round(med[name][1] / med[base_mode][1], 3),
                    "ratio_to": base_mode,
                    "peak_extra_rss_mib": round(max(t[2] for t in ts), 1),
                    "wall_s": [round(t[0], 4) for t in ts] if len(ts) <= 8 else None,
                    "cpu_s": [round(t[1], 4) for t in ts] if len(ts) <= 8 else None,
                    "load_avg_1min": [load, os.getloadavg()[0]],
                }
            )

    reps = dict(zip(args.lengths, args.repeats + [args.repeats[-1]] * len(args.lengths), strict=False))
    with torch.no_grad():
        model.model(input_ids=torch.tensor([[1, 2, 3, 4]]))  # warm-up
        if args.decode_cache:
            load0 = os.getloadavg()[0]
            rows(args.decode_cache, decode_times(model, tok, args.decode_cache, args.decode_steps), "decode_plain",
                 load0)
        for n in args.lengths:
            modes = prefill_modes(model, tok, n, args.slow_max, args.sample_rows)
            if args.modes:
                # in the order given (the first repeat runs them so; sdpa first unless listed)
                order = ([] if "sdpa" in args.modes else ["sdpa"]) + [m for m in args.modes if m in modes]
                modes = {k: modes[k] for k in order}
            load0 = os.getloadavg()[0]

            def call_row(r, name, t, n=n):
                emit({"record": "call", "tokens": n, "mode": name, "repeat": r, "wall_s": round(t[0], 4),
                      "cpu_s": round(t[1], 4), "peak_extra_rss_mib": round(t[2], 1), "load_avg_1min": os.getloadavg()[0]})

            rows(n, interleaved(modes, reps[n], call_row if args.each_call else None), "sdpa", load0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
