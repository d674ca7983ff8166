"""A Qwen2.5-Coder MoE build in two separable steps, for a machine too loaded to build and evaluate in
one process (`steer models build-moe` does both): build + save without evaluation, then the quality
table (held-out perplexity ratio, key answers kept, per k) on the saved checkpoint, reusing the dense
model's greedy answers from an earlier build report of the same dense model (same fixed prompts), and
its held-out NLL when that report used the same held-out split (seed, heldout_passages, heldout_tokens,
seq_len; otherwise the NLL is computed here).

    python experiments/moe_build/qwen_build.py build --out /root/qwen-moe-build/e16k12s3264c6k \
        --experts 16 --top-k 12 --shared-neurons 3264 --calib-tokens 6144
    python experiments/moe_build/qwen_build.py eval --out /root/qwen-moe-build/e16k12s3264c6k --ks 12 4 \
        --dense-report experiments/moe_build/qwen_e64k8s512.json --report experiments/moe_build/qwen_e16k12s3264c6k.json
    python experiments/moe_build/qwen_build.py build --out /root/qwen-moe-build/e64k8s512-refit \
        --experts 64 --top-k 8 --shared-neurons 512 --refit

A third step distils a saved build (steer.moebuild.distill: KL to the dense model on the build's own
calibration chunks, norms and routers trained), saving a checkpoint every --save-every steps under
--dest/step<N> so a run cut short keeps what it did; each is evaluated like a build:

    python experiments/moe_build/qwen_build.py distill --out /root/qwen-moe-build/e64k8s1536-refit \
        --dest /root/qwen-moe-build/e64k8s1536-refit-distill --steps 80 --lr 1e-3 --save-every 20
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

from steer.checkpoints import sha256_file  # noqa: E402
from steer.moebuild import (  # noqa: E402
    BUILD_FILE,
    MoEBuildConfig,
    build_moe,
    calibration_texts,
    chat_format,
    distill,
    evaluate_moe,
    load_dense,
    token_chunks,
)
from steer.progress import bar  # noqa: E402


def build(args) -> None:
    config = MoEBuildConfig(num_experts=args.experts, top_k=args.top_k, shared_neurons=args.shared_neurons,
                            calib_tokens=args.calib_tokens, refit=args.refit, seed=args.seed,
                            **({"refit_ridge": args.refit_ridge, "refit_inputs": args.refit_inputs} if args.refit else {}))
    report, _ = build_moe("qwen2.5-coder", config, args.out, evaluate=False, num_threads=args.threads,
                          progress=bar("qwen build"))
    print(json.dumps({k: v for k, v in report.to_dict().items() if k != "layers"}, indent=1, default=str))


def _dense_cache(path: Path | None, config: MoEBuildConfig) -> dict:
    """The dense numbers an earlier report holds that apply to this build: the greedy answers to the
    fixed chat prompts always, the held-out NLL only for the same held-out split (else recomputed)."""
    if path is None:
        return {}
    saved = json.loads(path.read_text())
    ev = saved["evaluation"]
    cache = {"answers": ev["dense_answers"]}
    if all(saved["config"][key] == getattr(config, key) for key in ("seed", "heldout_passages", "heldout_tokens",
                                                                    "seq_len")):
        cache["nll"] = math.log(ev["dense_ppl"])
    return cache


def _saved_config(path: Path) -> tuple[dict, MoEBuildConfig]:
    saved = json.loads((path / BUILD_FILE).read_text())
    known = {f.name for f in dataclasses.fields(MoEBuildConfig)}
    return saved, MoEBuildConfig(**{k: v for k, v in saved["config"].items() if k in known})


def distill_build(args) -> None:
    """Distil the build at --out into --dest/step<N> checkpoints (the build itself is not changed)."""
    if args.dest is None or args.steps is None:
        raise SystemExit("distill needs --dest DIR and --steps N")
    saved, config = _saved_config(args.out)
    config = dataclasses.replace(config, distill_steps=args.steps, distill_lr=args.lr)
    config.validate()
    torch.set_num_threads(args.threads)
    dense, tok = load_dense("qwen2.5-coder")
    moe, _ = load_dense(str(args.out), tok)
    calib = token_chunks(tok, chat_format(tok, calibration_texts(config)[0], config.calib_format), config.seq_len,
                         config.calib_tokens)
    losses: list[float] = []
    t0, c0 = time.time(), time.process_time()

    def save(step: int, loss: float) -> None:
        losses.append(loss)
        if step % args.save_every and step != args.steps:
            return
        out = args.dest / f"step{step}"
        moe.save_pretrained(out)
        tok.save_pretrained(out)
        info = {**saved, "config": {**saved["config"], "distill_steps": step, "distill_lr": args.lr},
                "distill_losses": [round(x, 5) for x in losses], "distilled_from": str(args.out),
                "distilled_from_sha256": saved.get("safetensors_sha256"),
                "distill_seconds": round(time.time() - t0, 1), "distill_cpu_seconds": round(time.process_time() - c0, 1),
                "distill_threads": args.threads, "load_average": [round(x, 1) for x in os.getloadavg()],
                "safetensors_sha256": sha256_file(out / "model.safetensors")}
        (out / BUILD_FILE).write_text(json.dumps(info, indent=1, default=str) + "\n")
        print(f"saved {out} (step {step}, KL {loss:.4f}, {time.time() - t0:.0f}s)", flush=True)

    distill(moe, dense, calib, config, progress=bar("qwen distill"), on_step=save)


def evaluate(args) -> None:
    saved, config = _saved_config(args.out)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    cache = _dense_cache(args.dense_report, config)
    reused = sorted(cache)
    ev = evaluate_moe(str(args.out), "qwen2.5-coder", config=config, top_ks=args.ks, dense_cache=cache,
                      progress=bar("qwen eval"))
    report = {**saved, "path": str(args.out), "evaluation": ev, "eval_seconds": round(time.time() - t0, 1),
              "dense_numbers_from": {name: str(args.dense_report) if name in reused else "computed here"
                                     for name in ("nll", "answers")},
              "load_average": [round(x, 1) for x in os.getloadavg()]}
    args.report.write_text(json.dumps(report, indent=1, default=str) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("step", choices=("build", "eval", "distill"))
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
    p.add_argument("--dest", type=Path, default=None, help="distill: where the step<N> checkpoints go")
    p.add_argument("--steps", type=int, default=None, help="distill: number of steps")
    p.add_argument("--lr", type=float, default=1e-3, help="distill: step size relative to each tensor's RMS")
    p.add_argument("--save-every", type=int, default=50, help="distill: checkpoint interval in steps")
    args = p.parse_args()
    {"build": build, "eval": evaluate, "distill": distill_build}[args.step](args)


if __name__ == "__main__":
    main()
