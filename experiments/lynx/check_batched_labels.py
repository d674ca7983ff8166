"""Re-label the first N test problems with today's loop (trial answers decoded as one batch, model-layout
cache) and compare every cue event's trial answer with the saved labelling run's (out*/rows_test.json).

    .venv/bin/python experiments/lynx/check_batched_labels.py --model smollm2 --out experiments/lynx/out --n 10
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from steer.probes.data import chat_prompts, load_model
from steer.probes.generate import generate_with_exit

sys.path.insert(0, str(Path(__file__).parent))
import run_lynx  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--out", default=str(run_lynx.OUT))
    ap.add_argument("--n", type=int, default=10)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    saved = json.loads((Path(args.out) / "rows_test.json").read_text())[: args.n]
    if args.model == "moe":
        from steer.moebuild import ensure_moe

        model, tok, _ = load_model(str(ensure_moe()))
    else:
        model, tok, _ = load_model(args.model)
    t0 = time.time()
    res = generate_with_exit(model, tok, chat_prompts(tok, [r["question"] for r in saved]), cues=run_lynx.CUES,
                             config=run_lynx.CONFIG, record_trials=True)
    same_rows = same_events = events = 0
    for r, row in zip(saved, res.rows):
        same_rows += row.reasoning_text == r["text"] and row.stop == r["stop"]
        for e, ev in zip(r["events"], row.events):
            events += 1
            same_events += (e["cut"], e["answer"]) == (ev.cut, ev.trial.answer_text)
        events += abs(len(r["events"]) - len(row.events))
    out = {"model": args.model, "problems": len(saved), "same_generation": same_rows, "events": events,
           "same_trial_answer": same_events, "seconds": round(time.time() - t0, 1)}
    print(json.dumps(out))
    (Path(args.out) / "check_batched_labels.json").write_text(json.dumps(out, indent=1))
    return 0 if same_rows == len(saved) and same_events == events else 1


if __name__ == "__main__":
    sys.exit(main())
