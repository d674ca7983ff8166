"""`steer fingerprint`: generate and record Activation-DiFR fingerprints (steer.difr)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from steer.cli import CLIError, print_json
from steer.options import ATTN_IMPLEMENTATIONS, DTYPES, PROJECTIONS

EXAMPLES = """\
examples:
  steer fingerprint --prompt "What is the capital of France?" -o fp.safetensors
  steer fingerprint --prompts prompts.txt --temperature 1.0 --top-p 0.95 --sample-seed 7 -o fp.safetensors
      seeded sampling: the verifier can also run Token-DiFR (steer verify --method token)
  steer fingerprint --prompts prompts.txt --k 16 --seed 3 --projection orthonormal -o fp.safetensors
  steer fingerprint --model ./my_ckpt --config steering/ --prompts p.txt -o fp.safetensors
      generate with an exported intervention config applied (verifiable steering)
  steer fingerprint --prompts calib.txt --attn eager --batch-size 2 --threads 2 -o benign1.safetensors
      an honest run under other numerics, for `steer verify --calibrate`

The file holds per generated token f = h P (h: the final post-norm state, P: [D, k] from the
public seed) in fp16, the prompt and output token ids, and metadata: model id, model identity, seed,
k, projection, dtype, sampling parameters and a checksum.
"""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "fingerprint", help="generate and record DiFR fingerprints (provider side of inference verification)",
        description="Generate answers and record an Activation-DiFR fingerprint for every generated token, "
                    "saved with the claim (prompt + output ids) to a safetensors file for `steer verify`.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="packaged name, checkpoint dir or .gguf (default %(default)s)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for several)")
    p.add_argument("--prompts", type=Path, help="a text file with one prompt per line")
    p.add_argument("-o", "--out", type=Path, required=True, help="output .safetensors file")
    p.add_argument("--k", type=int, default=8, help="fingerprint width (default %(default)s; paper 2..128)")
    p.add_argument("--seed", type=int, default=0, help="public projection seed (default %(default)s)")
    p.add_argument("--projection", choices=PROJECTIONS, default="gaussian")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--temperature", type=float, help="sample with a shared seed at this temperature (default: greedy)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--sample-seed", type=int, default=0, help="sequence i samples with seed*1000003+i")
    p.add_argument("--config", help="intervention config (dir or config.json) to apply while generating")
    p.add_argument("--attn", choices=ATTN_IMPLEMENTATIONS, help="attention implementation")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--no-chat-template", action="store_true", help="feed prompts raw")
    p.add_argument("--json", action="store_true", help="machine-readable summary on stdout")
    p.set_defaults(func=run)


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts is not None:
        if not args.prompts.is_file():
            raise CLIError(f"prompt file {args.prompts} does not exist")
        prompts += [line.strip() for line in args.prompts.read_text().splitlines() if line.strip()]
    if not prompts:
        raise CLIError("no prompts: give --prompt TEXT (repeatable) or --prompts FILE")
    return prompts


def load_model(args):
    import torch

    from steer.models import load

    if args.threads:
        torch.set_num_threads(args.threads)
    return load(args.model, dtype=getattr(torch, args.dtype), attn_implementation=args.attn, progress=False)


def intervention_context(config_path, model):
    import contextlib

    if not config_path:
        return contextlib.nullcontext()
    from steer.config import InterventionConfig

    return InterventionConfig.load(config_path).apply(model)


def run(args) -> int:
    from steer.difr import DiFRConfig, SamplingParams, fingerprint_prompts, intervention_digest

    prompts = read_prompts(args)
    config = DiFRConfig(k=args.k, seed=args.seed, projection=args.projection)
    sampling = None
    if args.temperature is not None:
        sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    elif args.top_p != 1.0 or args.top_k:
        raise CLIError("--top-p/--top-k need --temperature (without it steer decodes greedily)")
    lm = load_model(args)
    # the claim names the config it ran (its digest), so `steer verify --config` checks the same one
    digest = intervention_digest(args.config) if args.config else None
    with intervention_context(args.config, lm.model):
        fp = fingerprint_prompts(lm.model, lm.tokenizer, prompts, config=config, sampling=sampling,
                                 seed=args.sample_seed, max_new_tokens=args.max_new_tokens,
                                 batch_size=args.batch_size, chat=not args.no_chat_template, model_id=lm.name,
                                 intervention=digest)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fp.save(args.out)
    summary = {"file": str(args.out), "model_id": fp.model_id, "identity": fp.identity,
               "sequences": fp.n_sequences, "tokens": fp.n_tokens, "k": config.k, "seed": config.seed,
               "projection": config.projection, "bytes_per_token": fp.bytes_per_token, "sampling": fp.sampling,
               "intervention_config": args.config, "intervention": digest}
    if args.json:
        print_json(summary)
        return 0
    for i, (_, out) in enumerate(fp.sequences()):
        text = lm.tokenizer.decode(out, skip_special_tokens=True).replace("\n", " ")
        print(f"[{i}] {text[:100]}{'...' if len(text) > 100 else ''}")
    print(f"wrote {args.out}: {fp.n_tokens} tokens in {fp.n_sequences} sequences, k={config.k}, "
          f"{fp.bytes_per_token} bytes/token, model {fp.model_id} ({fp.config_hash})", file=sys.stderr)
    return 0
