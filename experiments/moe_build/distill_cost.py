"""Cost of one `steer.moebuild.distill` step on a built MoE (before committing to a distillation run).

Runs a few KL-distillation steps (norms + routers, the build's own settings: batch 8 x 128 tokens of the
calibration text) on a saved checkpoint and reports CPU seconds (process time: the number that does not
depend on how loaded the shared machine is) and wall seconds per step, plus one dense forward of the
same batch for scale. The checkpoint on disk is not changed.

    python experiments/moe_build/distill_cost.py /root/qwen-moe-build/e64k8s512 --dense qwen2.5-coder --steps 2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from steer.moebuild import (  # noqa: E402
    BUILD_FILE,
    MoEBuildConfig,
    calibration_texts,
    chat_format,
    distill,
    load_dense,
    token_chunks,
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--dense", default="qwen2.5-coder")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    saved = json.loads((args.checkpoint / BUILD_FILE).read_text())["config"]
    known = {f.name for f in dataclasses.fields(MoEBuildConfig)}
    config = dataclasses.replace(MoEBuildConfig(**{k: v for k, v in saved.items() if k in known}),
                                 distill_steps=args.steps)
    dense, tok = load_dense(args.dense)
    moe, _ = load_dense(str(args.checkpoint), tok)
    calib = token_chunks(tok, chat_format(tok, calibration_texts(config)[0], config.calib_format), config.seq_len,
                         config.calib_tokens)
    batch = calib[: config.distill_batch]
    c0, w0 = time.process_time(), time.time()
    with torch.no_grad():
        dense(input_ids=batch)
    fwd_cpu, fwd_wall = time.process_time() - c0, time.time() - w0
    c0, w0 = time.process_time(), time.time()
    losses = distill(moe, dense, calib, config, progress=True)
    step_cpu, step_wall = (time.process_time() - c0) / args.steps, (time.time() - w0) / args.steps
    result = {"checkpoint": str(args.checkpoint), "steps": args.steps, "threads": args.threads,
              "batch_tokens": int(batch.numel()), "kl_losses": losses,
              "dense_forward_cpu_s": round(fwd_cpu, 1), "dense_forward_wall_s": round(fwd_wall, 1),
              "distill_step_cpu_s": round(step_cpu, 1), "distill_step_wall_s": round(step_wall, 1),
              "load_average": [round(x, 1) for x in os.getloadavg()], "torch": torch.__version__}
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
