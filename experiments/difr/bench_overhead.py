"""Fingerprinting overhead during generation: steer.difr.generate vs a bare model.generate.

Both decode the same prompt greedily for exactly --tokens new tokens on one thread, in one process.
Each round runs three generations, bare A, fingerprinted, bare B, in an order that rotates every
round, so machine load hits all three alike; the ratio fingerprinted / bare A is the measurement
and bare B / bare A (an A/A control: no difference by construction) shows how large a ratio the
noise alone makes. Reported per round and as medians with a bootstrap 95% interval of the median,
for wall-clock time and for the CPU time of the generating thread (with one torch thread all
compute runs there; on a shared, overloaded machine it is the steadier of the two).

The fingerprinted run includes everything a provider pays: the final-norm hook, h @ P per step,
the fp16 rows, stacking them after generation and building the Fingerprints value. The script also
attributes the added CPU time directly, inside one fingerprinted run: the work in the fingerprint
hook, and everything steer.difr.generate does outside model.generate (setup, post-processing).

    .venv/bin/python experiments/difr/bench_overhead.py                    # SmolLM2-135M
    .venv/bin/python experiments/difr/bench_overhead.py --model tiny --tokens 32
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time

import torch


def median_ci(values: list[float], n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Median and a percentile-bootstrap 95% interval of the median."""
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(n_boot))
    return statistics.median(values), meds[int(0.025 * n_boot)], meds[int(0.975 * n_boot) - 1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="packaged name / path, or 'tiny'")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=24, help="rounds of (bare A, fingerprinted, bare B)")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--json", type=str, default=None, help="also write the result to this file")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    from steer.batching import left_pad
    from steer.difr import DiFRConfig, generate
    from steer.difr.fingerprint import FingerprintRecorder, encode_prompts

    if args.model == "tiny":
        from steer.tiny import tiny_model, tiny_tokenizer

        model, tok, chat = tiny_model("llama"), tiny_tokenizer(), False
    else:
        from steer.models import load

        lm = load(args.model, progress=False)
        model, tok, chat = lm.model, lm.tokenizer, True
    prompts = ["Explain how photosynthesis works to a ten year old."] * args.batch
    ids, mask = left_pad(encode_prompts(tok, prompts, chat), tok.pad_token_id or 0)
    gen_kw = dict(max_new_tokens=args.tokens, min_new_tokens=args.tokens, pad_token_id=tok.pad_token_id or 0)
    config = DiFRConfig(k=args.k)

    def bare():
        with torch.no_grad():
            return model.generate(input_ids=ids, attention_mask=mask, do_sample=False, num_beams=1,
                                  temperature=None, top_p=None, top_k=None, **gen_kw)

    def fingerprinted():
        return generate(model, ids, mask, config=config, **gen_kw)

    out_bare, fp = bare(), fingerprinted()  # warm-up (allocator, first-call paths)
    assert torch.equal(out_bare[0, ids.shape[1]:], fp.output_ids[: args.tokens]), "both must decode the same tokens"

    # Direct attribution, in one fingerprinted run: CPU time inside the hook, and outside model.generate
    inner = {"hook": 0.0, "calls": 0, "generate": 0.0}
    original_record, original_generate = FingerprintRecorder._record, model.generate

    def timed_record(self, h, m):
        start = time.thread_time()
        original_record(self, h, m)
        inner["hook"] += time.thread_time() - start
        inner["calls"] += 1

    def timed_generate(*a, **kw):
        start = time.thread_time()
        try:
            return original_generate(*a, **kw)
        finally:
            inner["generate"] += time.thread_time() - start

    FingerprintRecorder._record, model.generate = timed_record, timed_generate
    try:
        cpu0 = time.thread_time()
        fingerprinted()
        run_cpu = time.thread_time() - cpu0
    finally:
        FingerprintRecorder._record = original_record
        del model.generate  # back to the class attribute
    outside = run_cpu - inner["generate"]
    print(f"direct attribution: hook {inner['hook'] * 1e3:.2f} ms CPU in {inner['calls']} calls "
          f"({inner['hook'] / run_cpu:.3%}), steer.difr.generate outside model.generate {outside * 1e3:.2f} ms "
          f"({outside / run_cpu:.3%}), of a {run_cpu:.3f} s fingerprinted run", flush=True)

    load0 = os.getloadavg()
    runs = {"A": bare, "fp": fingerprinted, "B": bare}
    orders = [("A", "fp", "B"), ("fp", "B", "A"), ("B", "A", "fp"), ("A", "B", "fp"), ("fp", "A", "B"), ("B", "fp", "A")]
    rounds = []
    for r in range(args.rounds):
        t = {}
        for name in orders[r % len(orders)]:
            start, cpu = time.perf_counter(), time.thread_time()
            runs[name]()
            t[name] = time.perf_counter() - start
            t[name + "_cpu"] = time.thread_time() - cpu
        rounds.append(t)
        print(f"round {r:2d}: wall A {t['A']:.3f} fp {t['fp']:.3f} B {t['B']:.3f} s (fp/A {t['fp'] / t['A']:.4f}, "
              f"B/A {t['B'] / t['A']:.4f}); cpu A {t['A_cpu']:.3f} fp {t['fp_cpu']:.3f} B {t['B_cpu']:.3f} s "
              f"(fp/A {t['fp_cpu'] / t['A_cpu']:.4f}, B/A {t['B_cpu'] / t['A_cpu']:.4f})", flush=True)
    load1 = os.getloadavg()

    def ratios(num: str, den: str, suffix: str = "") -> list[float]:
        return [x[num + suffix] / x[den + suffix] for x in rounds]

    result = {
        "model": args.model, "tokens": args.tokens, "batch": args.batch, "k": args.k, "threads": 1,
        "rounds": len(rounds), "load_average_start_end": [round(load0[0], 2), round(load1[0], 2)],
        "wall_fp_over_bare": median_ci(ratios("fp", "A")), "wall_aa_control": median_ci(ratios("B", "A")),
        "cpu_fp_over_bare": median_ci(ratios("fp", "A", "_cpu")), "cpu_aa_control": median_ci(ratios("B", "A", "_cpu")),
        "median_bare_s": statistics.median(x["A"] for x in rounds),
        "median_fp_s": statistics.median(x["fp"] for x in rounds),
        "hook_cpu_fraction": inner["hook"] / run_cpu, "outside_generate_cpu_fraction": outside / run_cpu,
        "direct_added_cpu_fraction": (inner["hook"] + outside) / run_cpu,
    }
    fmt = lambda m: f"{m[0]:.4f} [95% CI {m[1]:.4f}, {m[2]:.4f}]"
    print(f"fingerprinting overhead ({args.model}, {args.tokens} tokens, batch {args.batch}, k={args.k}, 1 thread, "
          f"{len(rounds)} rounds, load average {load0[0]:.1f} -> {load1[0]:.1f}):\n"
          f"  wall-clock  fingerprinted / bare  median {fmt(result['wall_fp_over_bare'])};  "
          f"A/A control {fmt(result['wall_aa_control'])}\n"
          f"  thread CPU  fingerprinted / bare  median {fmt(result['cpu_fp_over_bare'])};  "
          f"A/A control {fmt(result['cpu_aa_control'])}\n"
          f"  added work measured directly: {result['direct_added_cpu_fraction']:.3%} of generation CPU time "
          f"(hook {result['hook_cpu_fraction']:.3%}, outside model.generate {result['outside_generate_cpu_fraction']:.3%})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
