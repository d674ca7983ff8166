"""`steer export`: validate an intervention config and write it for an engine (steer.export)."""

from __future__ import annotations

import argparse

from steer.cli import CLIError, print_json
from steer.options import EXPORT_TARGETS

EXAMPLES = """\
examples:
  steer export --target vllm cfg/ -o served/ --model ./smollm2-moe
      checks cfg/ against the checkpoint (weights hash, layers, experts) and writes served/ with
      config.json and vllm_args.json: LLM(model, hf_overrides={"steer_config": "served/"})
  steer export --target easysteer cfg/ -o moe_router.json --model ./smollm2-moe
      EasySteer `moe_router` steer-vector file ({"layer_configs": {...}})
  steer export --target sglang cfg/ -o forward_hooks.json
      the JSON list SGLang's `--forward-hooks` takes (hooks on each MoE layer's gate, by SGLang's
      module name for the family); serve with --disable-cuda-graph (graph replay runs no hook)
  steer export --target sglang cfg/ -o sglang.yaml
      an SGLang `--config` file: the hooks plus CUDA graphs disabled
  steer export --target steer cfg/config.json -o copy/ --json
      validate (schema, tensors, version) and rewrite in canonical form

Exit codes: 0 written, 2 bad config (every problem is listed with its field path).
"""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "export", help="validate an intervention config and export it (vllm, easysteer, sglang)",
        description="Load an intervention config (config.json + config.safetensors), validate it, optionally "
                    "against a checkpoint directory, and write it in a serving engine's format.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", help="intervention config directory or its config.json")
    p.add_argument("--target", required=True, choices=EXPORT_TARGETS,
                   help="output format")
    p.add_argument("-o", "--out", required=True, help="output directory (steer, vllm; sglang: both files) or .json file (sglang: or .yaml)")
    p.add_argument("--model", help="checkpoint directory the config will be served on: checked before writing")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def run(args) -> int:
    from steer.config import ConfigError, InterventionConfig
    from steer.export import checkpoint_problems, export

    cfg = InterventionConfig.load(args.config)
    norm = None
    if args.model:
        problems = checkpoint_problems(cfg, args.model)
        if problems:
            raise ConfigError(problems, f"{args.config} does not fit {args.model}")
        from transformers import AutoConfig

        norm = getattr(AutoConfig.from_pretrained(args.model), "norm_topk_prob", None)
    try:
        result = export(cfg, args.target, args.out, model_path=args.model, norm_topk_prob=norm)
    except ConfigError:
        raise
    except OSError as exc:
        raise CLIError(f"cannot write {args.out}: {exc}") from None
    if args.json:
        print_json(result.to_dict())
    else:
        print(f"wrote {result.target} export: {result.path}")
        for note in result.notes:
            print(f"  note: {note}")
    return 0
