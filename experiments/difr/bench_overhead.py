"""Fingerprinting overhead during generation: steer.difr.generate vs a bare model.generate.

Both decode the same prompt greedily for exactly --tokens new tokens, on one thread, interleaved
(ABAB... with the order flipped every pair) in one process, so machine load hits both alike.
Wall-clock and process CPU time are both recorded: on a shared, overloaded machine the CPU time
of the process is the steadier measure of what the work itself costs. The
fingerprinted run includes everything a provider pays: the final-norm hook, the h @ P projection
per step, the fp16 pack, and assembling the Fingerprints value. Prints per-pair times and the
median and best-of ratios.

    .venv/bin/python experiments/difr/bench_overhead.py                    # SmolLM2-135M
    .venv/bin/python experiments/difr/bench_overhead.py --model tiny --tokens 32
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="packaged name / path, or 'tiny'")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=6, help="pairs of runs")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    from steer.difr import DiFRConfig, generate
    from steer.difr.fingerprint import encode_prompts, left_pad

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

    bare(), fingerprinted()  # warm-up (allocator, first-call paths)

    # the provider's added work itself, timed inside the hook (immune to how busy the machine is)
    from steer.difr.fingerprint import FingerprintRecorder

    inner = {"cpu": 0.0, "calls": 0}
    original = FingerprintRecorder._record

    def timed(self, h, mask):
        start = time.process_time()
        original(self, h, mask)
        inner["cpu"] += time.process_time() - start
        inner["calls"] += 1

    FingerprintRecorder._record = timed
    cpu0 = time.process_time()
    fingerprinted()
    run_cpu = time.process_time() - cpu0
    FingerprintRecorder._record = original
    print(f"hook work: {inner['cpu'] * 1e3:.1f} ms CPU in {inner['calls']} calls, "
          f"{inner['cpu'] / run_cpu:.4%} of the fingerprinted run's {run_cpu:.2f} s CPU", flush=True)
    pairs = []
    for r in range(args.repeats):
        order = (("bare", bare), ("fp", fingerprinted)) if r % 2 == 0 else (("fp", fingerprinted), ("bare", bare))
        t = {}
        for name, fn in order:
            start, cpu = time.perf_counter(), time.process_time()
            fn()
            t[name] = time.perf_counter() - start
            t[name + "_cpu"] = time.process_time() - cpu
        pairs.append(t)
        print(f"pair {r}: wall bare {t['bare']:.3f} s, fingerprinted {t['fp']:.3f} s, ratio {t['fp'] / t['bare']:.4f}; "
              f"cpu bare {t['bare_cpu']:.3f} s, fingerprinted {t['fp_cpu']:.3f} s, ratio "
              f"{t['fp_cpu'] / t['bare_cpu']:.4f}", flush=True)
    ratios = [p["fp"] / p["bare"] for p in pairs]
    result = {
        "model": args.model, "tokens": args.tokens, "batch": args.batch, "k": args.k, "threads": 1,
        "pairs": len(pairs), "median_ratio": statistics.median(ratios),
        "best_of_ratio": min(p["fp"] for p in pairs) / min(p["bare"] for p in pairs),
        "median_cpu_ratio": statistics.median(p["fp_cpu"] / p["bare_cpu"] for p in pairs),
        "best_of_cpu_ratio": min(p["fp_cpu"] for p in pairs) / min(p["bare_cpu"] for p in pairs),
        "hook_cpu_fraction": inner["cpu"] / run_cpu,
        "median_bare_s": statistics.median(p["bare"] for p in pairs),
        "median_fp_s": statistics.median(p["fp"] for p in pairs),
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"fingerprinting overhead ({args.model}, {args.tokens} tokens, batch {args.batch}, k={args.k}, 1 thread): "
              f"wall: median ratio {result['median_ratio']:.4f}, best-of {result['best_of_ratio']:.4f}; "
              f"process CPU time: median ratio {result['median_cpu_ratio']:.4f}, best-of {result['best_of_cpu_ratio']:.4f}; "
              f"work inside the hook: {result['hook_cpu_fraction']:.3%} of generation CPU time")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
