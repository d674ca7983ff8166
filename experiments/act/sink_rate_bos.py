"""Sink rate with and without a document-start token in front of the same 64-token book inputs.

SmolLM2's tokenizer adds no BOS, and it has no real BOS token: the GGUF metadata names
`<|im_start|>` (id 1) as `bos_token`, but that is the chat template's turn opener. The token that
separates documents in SmolLM2's pretraining is `<|endoftext|>` (id 0), the nearest thing to the BOS
the published 7B figures' Llama/Mistral inputs start with. Both are measured, each named by its token:
  none          the 64 book tokens;
  endoftext     `<|endoftext|>` + the first 63 book tokens (document start as in pretraining);
  im_start      `<|im_start|>` + the first 63 book tokens (what this script called "bos" before
                2026-12-06; it is not a BOS).
For a model whose tokenizer has a real BOS (Gemma-3: `<bos>`) pass --start-token.

    .venv/bin/python experiments/act/sink_rate_bos.py --n 20 --out experiments/act/out/smollm2/sink_rate_start.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from steer.models import load
from steer.sinks import book_inputs, detect_sinks, sink_rate_interval


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument(
        "--start-token",
        action="append",
        help="token to prepend (repeatable); default for SmolLM2: <|endoftext|> and <|im_start|>",
    )
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)
    lm = load(args.model, progress=False)
    tok = lm.tokenizer
    plain = book_inputs(tok, n=args.n, length=64)
    starts = args.start_token or ["<|endoftext|>", "<|im_start|>"]
    conditions = {"none": plain}
    for token in starts:
        tid = tok.convert_tokens_to_ids(token)
        if tid is None or tid == tok.unk_token_id and token != tok.unk_token:
            raise SystemExit(f"{token!r} is not a token of {args.model}'s vocabulary")
        conditions[f"{token} (id {tid})"] = [[tid, *s[:63]] for s in plain]
    out = {
        "model": args.model,
        "weights_hash": lm.weights_hash,
        "inputs": args.n,
        "length": 64,
        "tokenizer_bos_token": tok.bos_token,
        "tokenizer_adds_bos": tok("x").input_ids[0] == tok.bos_token_id,
        "conditions": {},
    }
    for name, inputs in conditions.items():
        r = detect_sinks(lm.model, tok, inputs, batch_size=10, keep_maps=False)
        out["conditions"][name] = {
            "sink_rate": r.sink_rate(),
            "ci95": sink_rate_interval(r),
            "mean_first_score": float(r.first.mean()),
            "inputs": r.n_inputs,
        }
        print(name, json.dumps(out["conditions"][name]), flush=True)
    if args.out:
        args.out.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
