"""Profiled tokens/s: fTRI through a vLLM engine (steer.serving.vllm_profile) vs steer's HF path.

    VLLM_CPU_OMP_THREADS_BIND=nobind .venv-vllm/bin/python experiments/mote/bench_vllm_profile.py \
        --per-class 16 --rounds 2 --out experiments/mote/bench_vllm_profile.json

Runs in the vLLM venv (.ci/vllm.sh). One process: the HF model (torch.set_num_threads(1)) and an
in-process vLLM engine (VLLM_ENABLE_V1_MULTIPROCESSING=0, OMP_NUM_THREADS=1, eager, fp32) profile
the same prompts (builtin questions-fr vs questions-en, chat template, 200 bootstrap replicates),
interleaved HF, vLLM, HF, vLLM, ... so load spikes on a shared machine hit both. Reported: median
counted tokens/s per path, their ratio, the engine's start-up time, and whether the two profiles'
class sums agree (token counts exactly; expert counts up to near-tied routings).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-moe")
    ap.add_argument("--per-class", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    from steer.cli.profile import checkpoint_dir
    from steer.ftri import ProfileConfig, profile
    from steer.models import load
    from steer.prompts import parse_class_spec
    from steer.serving.vllm_profile import profile_vllm, profiling_engine

    torch.set_num_threads(1)
    classes = [
        parse_class_spec(s).sample(args.per_class, seed=0)
        for s in ("french=builtin:questions-fr", "english=builtin:questions-en")
    ]
    ckpt = checkpoint_dir(args.model)
    lm = load(str(ckpt), progress=False)
    cfg = ProfileConfig()  # defaults: prompt tokens, mote, 200 bootstrap replicates, batch 8
    t0 = time.perf_counter()
    llm = profiling_engine(ckpt)
    startup = time.perf_counter() - t0
    rows = {"hf": [], "vllm": []}
    profs = {}
    for r in range(args.rounds):
        for path in ("hf", "vllm"):
            if path == "hf":
                prof = profile(
                    lm.model, lm.tokenizer, classes, cfg, progress=False, weights_hash=lm.weights_hash
                )
            else:
                prof = profile_vllm(llm, classes, cfg, tokenizer=lm.tokenizer, progress=False)
            rows[path].append(
                {
                    "round": r,
                    "seconds": prof.stats["seconds"],
                    "tokens": prof.stats["tokens"],
                    "tokens_per_s": prof.stats["tokens"] / prof.stats["seconds"],
                }
            )
            profs[path] = prof
            print(path, rows[path][-1], flush=True)
    hf, vl = profs["hf"], profs["vllm"]
    gap = float((vl.sums["count"] - hf.sums["count"]).abs().sum() / (2 * hf.sums["count"].sum()))
    med = {k: statistics.median(x["tokens_per_s"] for x in v) for k, v in rows.items()}
    result = {
        "model": args.model,
        "checkpoint": str(ckpt),
        "prompts": sum(len(c) for c in classes),
        "counted_tokens": hf.stats["tokens"],
        "rounds": rows,
        "median_tokens_per_s": med,
        "ratio_vllm_over_hf": med["vllm"] / med["hf"],
        "vllm_startup_s": round(startup, 1),
        "same_token_counts": bool(torch.equal(vl.sums["tokens"], hf.sums["tokens"])),
        "expert_assignments_moved": gap,
        "top10_overlap": len(
            {(t.layer, t.expert) for t in vl.top(10)} & {(t.layer, t.expert) for t in hf.top(10)}
        ),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores shared, load {os.getloadavg()}",
        "torch": torch.__version__,
    }
    import vllm

    result["vllm"] = vllm.__version__
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
