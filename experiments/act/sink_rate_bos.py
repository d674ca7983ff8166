"""Sink rate with and without a BOS-like first token (SmolLM2's tokenizer adds none; the published
7B figures are on Llama/Mistral inputs that start with BOS). Same 64-token book inputs otherwise.

    .venv/bin/python experiments/act/sink_rate_bos.py --n 20
"""

from __future__ import annotations

import argparse
import json

import torch

from steer.models import load
from steer.sinks import book_inputs, detect_sinks, sink_rate_interval


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--n", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(1)
    lm = load(args.model, progress=False)
    tok = lm.tokenizer
    plain = book_inputs(tok, n=args.n, length=64)
    bos_id = tok.bos_token_id
    with_bos = [[bos_id, *s[:63]] for s in plain]
    out = {}
    for name, inputs in (("no_bos", plain), (f"bos={tok.bos_token}", with_bos)):
        r = detect_sinks(lm.model, tok, inputs, batch_size=10, keep_maps=False)
        out[name] = {"sink_rate": r.sink_rate(), "ci95": sink_rate_interval(r),
                     "mean_first_score": float(r.first.mean()), "inputs": r.n_inputs}
        print(name, json.dumps(out[name]), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
