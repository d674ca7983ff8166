"""Overhead of online LYNX scoring per generated token, as ratios measured in one run.

Variants (same prompts, greedy, same number of new tokens; rounds interleaved, medians reported):
  hf_generate    model.generate (reference for our loop's own cost)
  loop_plain     steer.probes.generate.generate_with_exit with no policy (our loop: cue tracking only)
  loop_lynx      + feature capture through steer.hooks + probe scoring at every cue (the probe's
                 calibration is set to never exit, so every variant generates the same tokens)
  loop_lynx_all  worst case: every token is a cue (feature capture + scoring at every token)

    .venv/bin/python experiments/lynx/bench_overhead.py --model smollm2 --batch 8 --tokens 48
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

import torch

from steer.probes.conformal import ConformalCalibration
from steer.probes.cues import CueSet
from steer.probes.data import arithmetic_problems, chat_prompts, load_model
from steer.probes.features import default_points
from steer.probes.generate import ExitConfig, LynxPolicy, NeverExit, generate_with_exit
from steer.probes.probe import LynxProbe, ProbeInfo


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    model, tok, name = load_model(args.model)
    cfg_model = model.config.get_text_config(decoder=True)
    points = default_points(model)
    info = ProbeInfo(name, cfg_model.num_hidden_layers, cfg_model.hidden_size, points)
    torch.manual_seed(0)
    probe = LynxProbe(len(points) * cfg_model.hidden_size, (256, 64), info).eval()
    never = ConformalCalibration(0.1, math.inf, math.inf, 0, 0)  # scores every cue, never exits
    prompts = chat_prompts(tok, [p.question for p in arithmetic_problems(args.batch, seed=5, split="test")])
    # no EOS stop: every variant generates exactly args.tokens tokens per row
    cfg = ExitConfig(exit_string="\n\nThe answer is ", max_new_tokens=args.tokens + 1, answer_max_tokens=1,
                     ignore_eos=True)
    cues = CueSet(structural=("blank_line", "newline", "sentence_end"))
    every = CueSet(words=(), patterns={"token": r"[\s\S]"})

    def hf():
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        model.generate(**enc, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False,
                       pad_token_id=tok.pad_token_id)
        return args.tokens * len(prompts), None

    def loop(policy, cueset):
        res = generate_with_exit(model, tok, prompts, policy, cues=cueset, config=cfg)
        assert all(r.stop == "budget" for r in res.rows)
        return args.tokens * len(prompts), len(res.events)

    variants = {"hf_generate": hf, "loop_plain": lambda: loop(NeverExit(), cues),
                "loop_lynx": lambda: loop(LynxPolicy(probe, never), cues),
                "loop_lynx_all": lambda: loop(LynxPolicy(probe, never), every)}
    times = {k: [] for k in variants}
    events = {}
    with torch.no_grad():
        hf()  # warm-up
        for _ in range(args.rounds):
            for k, fn in variants.items():
                t0 = time.perf_counter()
                n, ev = fn()
                times[k].append((time.perf_counter() - t0) / n)
                events[k] = ev
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {"model": name, "batch": args.batch, "new_tokens": args.tokens, "rounds": args.rounds,
           "ms_per_token": {k: 1e3 * v for k, v in med.items()},
           "ratio_to_loop_plain": {k: v / med["loop_plain"] for k, v in med.items()},
           "ratio_to_hf_generate": {k: v / med["hf_generate"] for k, v in med.items()},
           "cue_events": events, "all_ms_per_token": {k: [1e3 * x for x in v] for k, v in times.items()}}
    print(json.dumps(out, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
