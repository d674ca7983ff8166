"""ACT and sink statistics from SDPA's log-sum-exp vs a plain SDPA forward (issue 16's target table).

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python experiments/act/bench_attention.py --model smollm2 \\
        --lengths 512 2048 8192 --repeats 3

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
from other jobs hits all modes alike; medians over repeats. One JSON line per row is appended to
--out as soon as it is measured (a run cut short keeps what it measured).
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


def interleaved(modes: dict, repeats: int) -> dict[str, list[float]]:
    names = list(modes)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t = time.perf_counter()
            modes[name]()
            times[name].append(time.perf_counter() - t)
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
                t = time.perf_counter()
                model.model(input_ids=tok_j, cache=plain_cache, use_cache=True)
                times["decode_plain"].append(time.perf_counter() - t)
            else:
                with act.apply(model):
                    act._state = state
                    t = time.perf_counter()
                    model.model(input_ids=tok_j, cache=act_cache, use_cache=True)
                    times["decode_act_lse"].append(time.perf_counter() - t)
    return times


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--lengths", type=int, nargs="*", default=[512, 2048])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--slow-max", type=int, default=2048, help="time act_kernel/sinks_previous/eager up to this"
    )
    ap.add_argument("--sample-rows", type=int, default=256)
    ap.add_argument("--decode-cache", type=int, default=2048, help="0 = no decode timing")
    ap.add_argument("--decode-steps", type=int, default=16)
    ap.add_argument("--modes", nargs="+", help="prefill modes to time (default: all; sdpa is always timed)")
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

    with torch.no_grad():
        model.model(input_ids=torch.tensor([[1, 2, 3, 4]]))  # warm-up
        if args.decode_cache:
            load0 = os.getloadavg()[0]
            times = decode_times(model, tok, args.decode_cache, args.decode_steps)
            base = statistics.median(times["decode_plain"])
            for name, ts in times.items():
                emit(
                    {
                        "tokens": args.decode_cache,
                        "mode": name,
                        "repeats": len(ts),
                        "median_s": round(statistics.median(ts), 5),
                        "ratio_to_plain_decode_median": round(statistics.median(ts) / base, 3),
                        "load_avg_1min": [load0, os.getloadavg()[0]],
                    }
                )
        for n in args.lengths:
            modes = prefill_modes(model, tok, n, args.slow_max, args.sample_rows)
            if args.modes:
                modes = {k: v for k, v in modes.items() if k == "sdpa" or k in args.modes}
            load0 = os.getloadavg()[0]
            times = interleaved(modes, args.repeats)
            load1 = os.getloadavg()[0]
            base = statistics.median(times["sdpa"])
            for name, ts in times.items():
                emit(
                    {
                        "tokens": n,
                        "mode": name,
                        "repeats": len(ts),
                        "median_s": round(statistics.median(ts), 3),
                        "ratio_to_sdpa_median": round(statistics.median(ts) / base, 3),
                        "seconds": [round(t, 3) for t in ts],
                        "load_avg_1min": [load0, load1],
                    }
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
