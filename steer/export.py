"""Export an intervention config to the engines that serve steering: vLLM (steer's plugin),
EasySteer's `moe_router` JSON and SGLang's `forward_hooks` server argument.

    export(config, "vllm", out_dir, model_path=ckpt)      # config dir + vllm_args.json, checked vs ckpt
    export(config, "easysteer", "moe_router.json")
    export(config, "sglang", "forward_hooks.json")

Each exporter validates what it writes against the target's documented format (schemas below,
each citing its source) and returns an `ExportResult` whose `notes` say where the target's
semantics differ from steer's (e.g. EasySteer's deactivate is exact only with norm_topk_prob).
What a target cannot express (off_zero in EasySteer, ACT anywhere but steer) is an error.
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from steer.config import ConfigError, InterventionConfig, checkpoint_problems

TARGETS = ("steer", "vllm", "easysteer", "sglang")
VLLM_PLUGIN_PROCESSOR = "steer.serving.vllm_plugin:FingerprintLogitsProcessor"
SGLANG_HOOK_FACTORY = "steer.serving.sglang_hooks:router_logits_hook"


@dataclass
class ExportResult:
    target: str
    path: Path
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"target": self.target, "path": str(self.path), "notes": self.notes}


def export(config: InterventionConfig, target: str, out: str | Path, *, model_path: str | Path | None = None,
           norm_topk_prob: bool | None = None) -> ExportResult:
    """Write `config` for `target` (one of TARGETS) at `out`."""
    if target not in TARGETS:
        raise ValueError(f"unknown export target {target!r}; choose one of {', '.join(TARGETS)}")
    config.check()
    if target == "steer":
        return ExportResult("steer", config.save(out))
    if target == "vllm":
        return export_vllm(config, out, model_path=model_path)
    if target == "easysteer":
        return export_easysteer(config, out, norm_topk_prob=norm_topk_prob)
    return export_sglang(config, out, norm_topk_prob=norm_topk_prob)


# ---------------------------------------------------------------------------------------------
# vLLM (steer's own plugin: steer.serving.vllm_plugin)


def export_vllm(config: InterventionConfig, out: str | Path, *, model_path: str | Path | None = None) -> ExportResult:
    """A config directory vLLM serves with steer's plugin, plus `vllm_args.json` (engine arguments)."""
    problems = []
    if config.mote is None and config.difr is None:
        problems.append("(top level): nothing for vLLM to do: the config has neither a mote nor a difr section")
    if config.act is not None:
        problems.append("act: ACT cannot run inside vLLM (fused attention kernels expose no attention weights); "
                        "export without the act section")
    if config.lynx is not None:
        problems.append("lynx: LYNX early exit cannot run inside vLLM (an exit rolls the request's KV cache back to "
                        "before the cue, which vLLM's scheduler cannot do); export without the lynx section and run "
                        "early exit with `steer generate`")
    if model_path is not None:
        problems += checkpoint_problems(config, model_path)
    if problems:
        raise ConfigError(problems, "config cannot be exported for vLLM")
    out_dir = config.save(out)
    args: dict[str, Any] = {"hf_overrides": {"steer_config": str(out_dir.resolve())}, "enforce_eager": True}
    if model_path is not None:
        args["model"] = str(Path(model_path).resolve())
    notes = ["serve with: LLM(**json.load(open('vllm_args.json'))) or `vllm serve MODEL --hf-overrides "
             f"'{json.dumps(args['hf_overrides'])}'`; steer must be installed in vLLM's environment"]
    if config.difr is not None:
        args["logits_processors"] = [VLLM_PLUGIN_PROCESSOR]
        notes.append("fingerprints: set STEER_FINGERPRINT_DIR for the server and send "
                     "SamplingParams(extra_args={'steer_fingerprint': KEY}); read them with "
                     "steer.serving.served_fingerprints")
    (out_dir / "vllm_args.json").write_text(json.dumps(args, indent=2) + "\n")
    return ExportResult("vllm", out_dir, notes)


# ---------------------------------------------------------------------------------------------
# EasySteer `moe_router`
#
# Format documented in ZJU-REAL/EasySteer replications/steermoe/README.md ("A steering config is a JSON
# file mapping layers to expert lists": {"layer_configs": {"7": {"mode": "deactivate", "expert_ids":
# [30, 25]}, "9": {"mode": "activate", "activate_ids": [12], "deactivate_ids": [35]}}}) and in the
# payload docstring of its MoERouterAlgorithm (`@register_algorithm("moe_router")`): mode one of
# activate | deactivate | soft | soft_topk | soft_random; expert_ids, activate_ids, deactivate_ids
# lists of ints; optional epsilon (tie margin, default 0.01) and lambda (soft strength).
# Its activate/deactivate log-softmax the logits and set experts to the per-token max + eps / min - eps.

EASYSTEER_MODES = ("activate", "deactivate", "soft", "soft_topk", "soft_random")
EASYSTEER_SCHEMA = {
    "type": "object", "required": ["layer_configs"], "additionalProperties": False,
    "properties": {"layer_configs": {
        "type": "object", "patternProperties": {"^[0-9]+$": {
            "type": "object", "required": ["mode"], "additionalProperties": False,
            "properties": {
                "mode": {"enum": list(EASYSTEER_MODES)},
                "expert_ids": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                "activate_ids": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                "deactivate_ids": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                "epsilon": {"type": "number", "exclusiveMinimum": 0},
                "lambda": {"type": "number"},
            },
        }},
        "additionalProperties": False,
    }},
}


def easysteer_problems(doc: Any) -> list[str]:
    """Problems of an EasySteer moe_router document against its documented format."""
    if not isinstance(doc, dict) or set(doc) != {"layer_configs"} or not isinstance(doc["layer_configs"], dict):
        return ["(top level): must be an object with exactly one field, layer_configs (an object)"]
    problems = []
    for layer, payload in doc["layer_configs"].items():
        where = f"layer_configs.{layer}"
        if not layer.isdigit():
            problems.append(f"{where}: layer keys must be decimal layer indices")
        if not isinstance(payload, dict):
            problems.append(f"{where}: must be an object")
            continue
        extra = set(payload) - {"mode", "expert_ids", "activate_ids", "deactivate_ids", "epsilon", "lambda"}
        if extra:
            problems.append(f"{where}: unknown fields {sorted(extra)}")
        if payload.get("mode") not in EASYSTEER_MODES:
            problems.append(f"{where}.mode: {payload.get('mode')!r} is not one of {', '.join(EASYSTEER_MODES)}")
        for key in ("expert_ids", "activate_ids", "deactivate_ids"):
            ids = payload.get(key, [])
            if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                                    for i in ids):
                problems.append(f"{where}.{key}: must be a list of non-negative integers")
        if payload.get("mode") in ("activate", "deactivate") and not any(
                payload.get(k) for k in ("expert_ids", "activate_ids", "deactivate_ids")):
            problems.append(f"{where}: activate/deactivate needs expert ids (EasySteer treats it as invalid)")
        eps = payload.get("epsilon", 0.01)
        if not isinstance(eps, (int, float)) or eps <= 0:
            problems.append(f"{where}.epsilon: must be a positive number")
    return problems


def to_easysteer(config: InterventionConfig, *, norm_topk_prob: bool | None = None) -> tuple[dict, list[str]]:
    """(moe_router document, notes on semantic differences)."""
    mote = config.mote
    if mote is None:
        raise ConfigError(["mote: EasySteer's moe_router holds expert switches; the config has no mote section"],
                          "config cannot be exported for EasySteer")
    if mote.mode == "off_zero":
        raise ConfigError(["mote.mode: off_zero (keep the selection, zero the weight) has no EasySteer moe_router "
                           "equivalent; use off_mask (-> deactivate) or serve with steer's vLLM plugin"],
                          "config cannot be exported for EasySteer")
    mode = "deactivate" if mote.mode == "off_mask" else "activate"
    doc = {"layer_configs": {str(layer): {"mode": mode, "expert_ids": experts}
                             for layer, experts in mote.by_layer().items()}}
    notes = []
    if mote.mode == "off_mask":
        if norm_topk_prob is False:
            notes.append("deactivate equals steer's off_mask in selection; the weights differ slightly because this "
                         "model does not renormalise top-k weights (norm_topk_prob=False) and EasySteer replaces the "
                         "switched-off experts' scores instead of keeping them in the softmax denominator")
        elif norm_topk_prob is None:
            notes.append("deactivate equals off_mask exactly only for models with norm_topk_prob=True (selection is "
                         "always the same); pass the model to check")
    else:
        notes.append("activate sets a forced expert's score to the per-token max + epsilon: its weight is close to "
                     f"steer's force_weight='max', not 'gate' (this config uses {mote.force_weight!r})")
    return doc, notes


def export_easysteer(config: InterventionConfig, out: str | Path, *, norm_topk_prob: bool | None = None) -> ExportResult:
    doc, notes = to_easysteer(config, norm_topk_prob=norm_topk_prob)
    path = _write_checked("EasySteer", doc, easysteer_problems(doc), out, "moe_router.json")
    return ExportResult("easysteer", path, notes)


def _write_checked(target: str, doc: Any, problems: list[str], out: str | Path, default_name: str) -> Path:
    """Write an export document that passed its target's validator (our own output must satisfy it)."""
    if problems:  # pragma: no cover
        raise AssertionError(f"internal error: {target} export is invalid: {problems}")
    path = _json_out(out, default_name)
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


# ---------------------------------------------------------------------------------------------
# SGLang `forward_hooks`
#
# Format documented in sgl-project/sglang docs/advanced_features/forward_hooks.md and implemented by
# python/sglang/srt/model_executor/hook_manager.py (register_forward_hooks): ServerArgs.forward_hooks is a
# list of {"name": optional str, "target_modules": [fnmatch patterns over model.named_modules()],
# "hook_factory": "pkg.module:factory" (or dotted), "config": JSON object passed to the factory,
# "hook_type": "forward" | "forward_pre" (newer versions), "with_kwargs": bool}; the factory returns a
# torch forward hook (module, inputs, output) -> output. SGLang's MoE layers keep the HF module names
# (model.layers.N.mlp.gate returns the router logits), so a hook on the gate edits logits before top-k.


def sglang_problems(specs: Any, resolve: bool = True) -> list[str]:
    """Problems of a forward_hooks list against SGLang's documented hook spec."""
    if not isinstance(specs, list):
        return ["forward_hooks: must be a list of hook specs"]
    problems = []
    for i, spec in enumerate(specs):
        where = f"forward_hooks[{i}]"
        if not isinstance(spec, dict):
            problems.append(f"{where}: must be an object")
            continue
        extra = set(spec) - {"name", "target_modules", "hook_factory", "config", "hook_type", "with_kwargs"}
        if extra:
            problems.append(f"{where}: unknown fields {sorted(extra)}")
        if "name" in spec and not isinstance(spec["name"], str):
            problems.append(f"{where}.name: must be a string")
        tm = spec.get("target_modules")
        if not isinstance(tm, list) or not tm or not all(isinstance(p, str) and p for p in tm):
            problems.append(f"{where}.target_modules: must be a non-empty list of module name patterns")
        factory = spec.get("hook_factory")
        if not isinstance(factory, str) or not (":" in factory or factory.count(".") >= 1):
            problems.append(f"{where}.hook_factory: must be 'module.sub:factory' or 'module.sub.factory'")
        elif resolve:
            try:
                fn = resolve_callable(factory)
                if not callable(fn):
                    problems.append(f"{where}.hook_factory: {factory} is not callable")
            except (ImportError, AttributeError, ValueError) as exc:
                problems.append(f"{where}.hook_factory: cannot import {factory}: {exc}")
        if "config" in spec and not isinstance(spec["config"], dict):
            problems.append(f"{where}.config: must be a JSON object")
        if spec.get("hook_type", "forward") not in ("forward", "forward_pre"):
            problems.append(f"{where}.hook_type: must be 'forward' or 'forward_pre'")
    return problems


def resolve_callable(path: str):
    """The callable a hook_factory path names, resolved the way SGLang's hook_manager does."""
    import importlib

    if ":" in path:
        module_name, fn_name = path.split(":", 1)
    else:
        *parts, fn_name = path.split(".")
        if not parts:
            raise ValueError(f"invalid hook callable path {path!r}")
        module_name = ".".join(parts)
    return getattr(importlib.import_module(module_name), fn_name)


def to_sglang(config: InterventionConfig, *, norm_topk_prob: bool | None = None) -> tuple[list[dict], list[str]]:
    mote = config.mote
    if mote is None:
        raise ConfigError(["mote: the SGLang export holds router hooks; the config has no mote section"],
                          "config cannot be exported for SGLang")
    if mote.mode == "off_zero":
        raise ConfigError(["mote.mode: off_zero keeps the selection and zeroes a weight, which a hook on the router "
                           "logits cannot express; use off_mask or serve with steer's vLLM plugin"],
                          "config cannot be exported for SGLang")
    specs = [{
        "name": f"steer-mote-layer-{layer}",
        "target_modules": [f"model.layers.{layer}.mlp.gate"],
        "hook_factory": SGLANG_HOOK_FACTORY,
        "config": {"mode": mote.mode, "experts": experts, "num_experts": config.model.num_experts},
    } for layer, experts in mote.by_layer().items()]
    notes = []
    if mote.mode == "off_mask" and norm_topk_prob is not True:
        notes.append("the hook sets switched-off logits to -inf: selection equals off_mask; weights are exact only "
                     "for models that renormalise top-k weights (norm_topk_prob=True)")
    if mote.mode == "on":
        notes.append("the hook raises forced logits to the per-token max + 1e-3: the expert is selected and its "
                     "weight is close to force_weight='max'")
    return specs, notes


def export_sglang(config: InterventionConfig, out: str | Path, *, norm_topk_prob: bool | None = None) -> ExportResult:
    specs, notes = to_sglang(config, norm_topk_prob=norm_topk_prob)
    path = _write_checked("SGLang", {"forward_hooks": specs}, sglang_problems(specs), out, "forward_hooks.json")
    notes.insert(0, f"launch with: python -m sglang.launch_server --model-path MODEL --forward-hooks "
                    f"\"$(jq -c .forward_hooks {path.name})\" (steer must be importable by the server)")
    return ExportResult("sglang", path, notes)


def register_forward_hooks(model, specs: list[dict]) -> list:
    """Attach `specs` to a torch model exactly as SGLang's hook_manager does (fnmatch over
    named_modules, forward hooks); returns the handles. Lets tests run the SGLang export on a real
    engine's modules (vLLM's share SGLang's names)."""
    problems = sglang_problems(specs)
    if problems:
        raise ConfigError(problems, "forward_hooks")
    handles = []
    modules = dict(model.named_modules())
    for spec in specs:
        hook = resolve_callable(spec["hook_factory"])(spec.get("config") or {})
        for name, module in modules.items():
            if any(fnmatch.fnmatch(name, p) for p in spec["target_modules"]):
                handles.append(module.register_forward_hook(hook))
    return handles


def _json_out(out: str | Path, default_name: str) -> Path:
    path = Path(out)
    if path.suffix != ".json":
        path = path / default_name
    path.parent.mkdir(parents=True, exist_ok=True)
    return path
