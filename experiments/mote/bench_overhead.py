"""Overhead of fTRI profiling and MoTE switching vs a bare forward, and memory vs number of prompts.

    .venv/bin/python experiments/mote/bench_overhead.py                    # smollm2-moe, 1 thread
    .venv/bin/python experiments/mote/bench_overhead.py --model tiny:qwen2_moe --repeats 5

Timing: one process, torch.set_num_threads(1), conditions interleaved round-robin so load spikes on
a shared machine hit all of them; we report the median wall and process-CPU time per condition and
their ratios to the bare forward measured in the same rounds (on a loaded machine the CPU-time ratio
is the meaningful one: wall time there is mostly waiting for a core). Conditions:
  bare      model(**batch)
  profile   + the fTRI router-indices hook and the per-batch fold into class sums (200 bootstrap reps)
  switch    + ExpertSwitch(top-10 off_mask) rewriting the router output through steer.kernels.router.route
Memory: `profile` on N = 100 and N = 1,000 prompts in fresh subprocesses; we report the accumulator's
bytes (exact) and the process's peak RSS.
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
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def load_model(name: str):
    if name.startswith("tiny:"):
        from steer.tiny import tiny_model, tiny_tokenizer

        return tiny_model(name.split(":", 1)[1]), tiny_tokenizer(), name
    from steer.models import load

    lm = load(name, progress=False)
    return lm.model, lm.tokenizer, lm.name


def prose(n: int, words: int = 48) -> list[str]:
    from steer.prompts import builtin

    texts = builtin("prose").prompts
    return [" ".join(texts[i % len(texts)].split()[:words]) for i in range(n)]


def bench(args) -> dict:
    from steer.adapters import model_map
    from steer.ftri import ProfileAccumulator, ProfileConfig, prompt_batches
    from steer.hooks import attach
    from steer.mote import ExpertSwitch

    torch.set_num_threads(1)
    model, tok, name = load_model(args.model)
    mm = model_map(model)
    texts = prose(args.batch)
    cfg = ProfileConfig(batch_size=args.batch, max_length=args.tokens, chat_template=False)
    batch = next(prompt_batches(tok, texts, [0] * len(texts), cfg))
    enc = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    acc = ProfileAccumulator(2, mm.moe_layers, mm.num_experts, n_bootstrap=200)
    # top-10 experts by (layer, expert) spread over layers: the size of switch MoTE used
    pairs = [(L, e) for e in range(mm.num_experts) for L in mm.moe_layers]
    experts = pairs[:: max(1, len(pairs) // 10)][:10]
    switch = ExpertSwitch(experts, "off_mask", on_no_effect="ignore")

    def bare():
        model(**enc, use_cache=False)

    def profiled():
        with attach(model, {"blocks.*.mlp.router.indices": acc.hook}) as session:
            acc.start(batch)
            session.set_token_selection(batch.selection)
            model(**enc, use_cache=False)
            acc.fold(batch.classes)

    def switched():
        with switch.apply(model):
            model(**enc, use_cache=False)

    conds = {"bare": bare, "profile": profiled, "switch": switched}
    times = {k: [] for k in conds}
    cpu = {k: [] for k in conds}  # process CPU time: on a loaded machine, wall time mostly measures waiting
    with torch.no_grad():
        for fn in conds.values():  # warm-up
            fn()
        for _ in range(args.repeats):
            for k, fn in conds.items():
                t, c = time.perf_counter(), time.process_time()
                fn()
                times[k].append(time.perf_counter() - t)
                cpu[k].append(time.process_time() - c)
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    return {
        "model": name, "batch": list(batch.input_ids.shape), "real_tokens": int(batch.attention_mask.sum()),
        "repeats": args.repeats, "threads": 1,
        "median_s": {k: round(v, 5) for k, v in med.items()},
        "ratio_vs_bare": {k: round(v / med["bare"], 4) for k, v in med.items()},
        "min_ratio_vs_bare": {k: round(min(v) / min(times["bare"]), 4) for k, v in times.items()},
        "median_cpu_s": {k: round(v, 5) for k, v in med_cpu.items()},
        "cpu_ratio_vs_bare": {k: round(v / med_cpu["bare"], 4) for k, v in med_cpu.items()},
        "load_average": [round(x, 1) for x in os.getloadavg()],
        "switch_touched_last_run": switch.total_touched,
    }


def memory_child(args) -> None:
    """Run in a subprocess: profile N prompts, print accumulator bytes and peak RSS."""
    import resource

    from steer.ftri import ProfileConfig, profile

    torch.set_num_threads(1)
    model, tok, _ = load_model(args.model)
    texts = prose(args.n, words=args.words)
    half = args.n // 2
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    prof = profile(model, tok, {"a": texts[:half], "b": texts[half:]},
                   ProfileConfig(n_bootstrap=200, batch_size=16, max_length=args.tokens, chat_template=False),
                   progress=False)
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"n": args.n, "tokens": prof.stats["tokens"], "accumulator_bytes": prof.stats["accumulator_bytes"],
                      "peak_rss_mb_before": round(rss0 / 1024, 1), "peak_rss_mb_after": round(rss1 / 1024, 1),
                      "seconds": round(time.perf_counter() - t, 1)}))


def memory(args) -> list[dict]:
    out = []
    for n in args.memory_n:
        cmd = [sys.executable, __file__, "--model", args.model, "--memory-child", str(n), "--words", str(args.words),
               "--tokens", str(args.mem_tokens)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
        out.append(json.loads(res.stdout.strip().splitlines()[-1]))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-moe")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--memory-n", type=int, nargs="*", default=[100, 1000])
    p.add_argument("--mem-tokens", type=int, default=48)
    p.add_argument("--words", type=int, default=30)
    p.add_argument("--memory-child", type=int, dest="n")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "bench_overhead.json")
    args = p.parse_args()
    if args.n:
        memory_child(args)
        return
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.processor() or
              platform.machine(), "torch": torch.__version__, "timing": bench(args)}
    print(json.dumps(result["timing"], indent=2), flush=True)
    if args.memory_n:
        result["memory"] = memory(args)
        print(json.dumps(result["memory"], indent=2))
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
