"""Held-out check of one ACT head set on another model: the MoE's chosen heads applied to SmolLM2.

The embedded MoE keeps SmolLM2's attention weights (only MLPs differ), so heads the MoE's search
chose are meaningful on SmolLM2; SmolLM2's own search kept none.

    .venv/bin/python experiments/act/transfer_heads.py --config out/smollm2-moe/act_config.json --model smollm2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import torch

from steer.act import ACTConfig
from steer.models import load
from steer.tasks import evaluate, task_suite


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", type=Path, required=True)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--heldout", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    cfg = ACTConfig.load(Path(__file__).parent / args.config if not args.config.is_absolute() else args.config)
    lm = load(args.model, progress=False)
    held = task_suite("heldout", n=args.heldout, seed=args.seed)
    base = evaluate(lm.model, lm.tokenizer, held)
    # deliberately on another model than the heads were calibrated on: drop the identity that ACT checks
    act = dataclasses.replace(cfg, identity=None).intervention(on_no_effect="warn")
    res = evaluate(lm.model, lm.tokenizer, held, interventions=[act])
    out = {"model": args.model, "heads": cfg.heads, "from_config": str(args.config), "load_average": os.getloadavg(),
           "baseline": base.to_dataframe().to_dict("records"), "act": res.to_dataframe().to_dict("records"),
           "delta": base.compare(res).to_dict("records"), "rows_touched": act.total_touched,
           "seconds": time.time() - t0}
    dest = Path(__file__).parent / "out" / args.model / "transfer_results.json"
    dest.write_text(json.dumps(out, indent=2, default=str))
    print(base.compare(res).to_string())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
