"""Decode step with ACT vs plain decode, in one process (issue 16, RESULTS sections 7-8).

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python experiments/act/bench_decode_ab.py --model gemma3-270m

Modes (--modes), interleaved step by step on one cache of the same prompt per mode, per step: `plain`
(the decoder stack, SDPA), `act` (ACT path "lse" as it is), `route` (steer's attention routing on the same
layers with a handler that runs the model's own attention: what routing costs without ACT's work),
`act_round3` (ACT with round 4's two decode changes switched off: rows decided with tensor operations
(HOST_ROWS = 0) and one-row all-True masks not shown as causal, i.e. checked in every hooked layer as in
round 3), `act_round5` (ACT with round 6's one-row path off: one-row steps of one calibrated head take
the host-rows path of rounds 4-5). Process CPU time per step, medians, ratios to `plain`; one JSON line per mode appended to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from datetime import UTC, datetime
from pathlib import Path

import torch
from bench_attention import act_heads, measure


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--cache", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--modes", nargs="+", default=["plain", "act", "act_round5"],
                    choices=["plain", "act", "route", "act_round3", "act_round5"])
    ap.add_argument("--out", default=str(Path(__file__).parent / "out" / "bench_decode_ab.jsonl"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    import steer.attention as attention
    import steer.kernels.lse as lse
    from steer.act import ACT
    from steer.hooks import attach
    from steer.models import load
    from steer.sinks import book_inputs

    lm = load(args.model, progress=False)
    model, tok = lm.model, lm.tokenizer
    ids = torch.tensor(book_inputs(tok, n=1, length=args.cache + args.steps))
    prompt, new = ids[:, : args.cache], ids[:, args.cache :]
    host_rows, sees_all, one_row = lse.HOST_ROWS, attention._sees_all, lse._decode_one_row

    def configure(name: str):  # the code of an earlier round for act_round3 / act_round5, else as it is
        lse.HOST_ROWS = 0 if name == "act_round3" else host_rows
        attention._sees_all = (lambda mask: False) if name == "act_round3" else sees_all
        lse._decode_one_row = one_row if name == "act" else (lambda *a: None)

    caches, acts = {}, {}
    with torch.no_grad():
        names = ["plain"] + [m for m in args.modes if m != "plain"]
        caches["plain"] = model.model(input_ids=prompt, use_cache=True).past_key_values
        route = {f"blocks.{layer}.attn.impl": lambda call, ctx: None for layer, _ in act_heads(model)}
        if "route" in names:
            with attach(model, route):
                caches["route"] = model.model(input_ids=prompt, use_cache=True).past_key_values
        for name in [m for m in names if m.startswith("act")]:
            acts[name] = ACT(act_heads(model), on_no_effect="ignore")
            acts[name].path = "lse"
            configure(name)
            with acts[name].apply(model):
                caches[name] = model.model(input_ids=prompt, use_cache=True).past_key_values
            acts[name] = (acts[name], acts[name]._state)
        configure("act")
        times = {n: [] for n in names}
        load0 = os.getloadavg()[0]
        for j in range(args.steps):
            t = new[:, j : j + 1]
            for name in names[j % len(names) :] + names[: j % len(names)]:
                step = lambda name=name, t=t: model.model(input_ids=t, cache=caches[name], use_cache=True)  # noqa: E731
                if name == "plain":
                    times[name].append(measure(step))
                    continue
                if name == "route":
                    with attach(model, route):
                        times[name].append(measure(step))
                    continue
                act, state = acts[name]
                configure(name)
                with act.apply(model):
                    act._state = state
                    times[name].append(measure(step))
                configure("act")
    med = {n: statistics.median(c for _, c, _ in ts) for n, ts in times.items()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        for n in names:
            row = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "model": args.model, "cache": args.cache,
                   "mode": n, "steps": args.steps, "median_cpu_ms": round(1e3 * med[n], 2),
                   "ratio_cpu": round(med[n] / med["plain"], 3),
                   "median_wall_ms": round(1e3 * statistics.median(w for w, _, _ in times[n]), 2),
                   "load_avg_1min": [load0, os.getloadavg()[0]], "act_heads": act_heads(model)}
            print(json.dumps(row), flush=True)
            f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
