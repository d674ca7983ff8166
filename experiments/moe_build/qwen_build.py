"""A Qwen2.5-Coder MoE build in two separable steps, for a machine too loaded to build and evaluate in
one process (`steer models build-moe` does both): build + save without evaluation, then the quality
table (held-out perplexity ratio, key answers kept, per k) on the saved checkpoint, reusing the dense
model's held-out NLL and greedy answers from an earlier build report of the same dense model (same
held-out passages and prompts: the seed, heldout_passages and heldout_tokens must match; checked).

    python experiments/moe_build/qwen_build.py build --out /root/qwen-moe-build/e16k12s3264c6k \
        --experts 16 --top-k 12 --shared-neurons 3264 --calib-tokens 6144
    python experiments/moe_build/qwen_build.py eval --out /root/qwen-moe-build/e16k12s3264c6k --ks 12 4 \
        --dense-report experiments/moe_build/qwen_e64k8s512.json --report experiments/moe_build/qwen_e16k12s3264c6k.json
    python experiments/moe_build/qwen_build.py build --out /root/qwen-moe-build/e64k8s512-refit \
        --experts 64 --top-k 8 --shared-neurons 512 --refit
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from steer.moebuild import BUILD_FILE, MoEBuildConfig, build_moe, evaluate_moe  # noqa: E402
from steer.progress import bar  # noqa: E402


def build(args) -> None:
    config = MoEBuildConfig(num_experts=args.experts, top_k=args.top_k, shared_neurons=args.shared_neurons,
                            calib_tokens=args.calib_tokens, refit=args.refit, seed=args.seed,
                            **({"refit_ridge": args.refit_ridge, "refit_inputs": args.refit_inputs} if args.refit else {}))
    report, _ = build_moe("qwen2.5-coder", config, args.out, evaluate=False, num_threads=args.threads,
                          progress=bar("qwen build"))
    print(json.dumps({k: v for k, v in report.to_dict().items() if k != "layers"}, indent=1, default=str))


def _dense_cache(path: Path, config: MoEBuildConfig) -> dict:
    saved = json.loads(path.read_text())
    for key in ("seed", "heldout_passages", "heldout_tokens", "seq_len"):
        if saved["config"][key] != getattr(config, key):
            raise ValueError(f"--dense-report {path}: {key} differs from the build's; its dense numbers do not apply")
    ev = saved["evaluation"]
    return {"nll": math.log(ev["dense_ppl"]), "answers": ev["dense_answers"]}


def evaluate(args) -> None:
    saved = json.loads((args.out / BUILD_FILE).read_text())
    known = {f.name for f in dataclasses.fields(MoEBuildConfig)}
    config = MoEBuildConfig(**{k: v for k, v in saved["config"].items() if k in known})
    torch.set_num_threads(args.threads)
    t0 = time.time()
    ev = evaluate_moe(str(args.out), "qwen2.5-coder", config=config, top_ks=args.ks,
                      dense_cache=_dense_cache(args.dense_report, config), progress=bar("qwen eval"))
    report = {**saved, "path": str(args.out), "evaluation": ev, "eval_seconds": round(time.time() - t0, 1),
              "dense_numbers_from": str(args.dense_report), "load_average": [round(x, 1) for x in os.getloadavg()]}
    args.report.write_text(json.dumps(report, indent=1, default=str) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("step", choices=("build", "eval"))
    p.add_argument("--out", type=Path, required=True, help="checkpoint dir")
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=12)
    p.add_argument("--shared-neurons", type=int, default=3264)
    p.add_argument("--calib-tokens", type=int, default=16384)
    p.add_argument("--seed", type=int, default=0, help="calibration / held-out passage split and clustering seed")
    p.add_argument("--refit", action="store_true", help="ridge refit of the down-projections (steer.moebuild)")
    p.add_argument("--refit-ridge", type=float, default=1e-3)
    p.add_argument("--refit-inputs", choices=("moe", "dense"), default="moe")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ks", type=int, nargs="+", default=None)
    p.add_argument("--dense-report", type=Path, default=None)
    p.add_argument("--report", type=Path, default=None)
    args = p.parse_args()
    (build if args.step == "build" else evaluate)(args)


if __name__ == "__main__":
    main()
