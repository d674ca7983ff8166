"""Export an intervention config to the engines that serve steering: vLLM (steer's plugin),
EasySteer's `moe_router` JSON and SGLang's `forward_hooks` server argument.

    export(config, "vllm", out_dir, model_path=ckpt)      # config dir + vllm_args.json, checked vs ckpt
    export(config, "easysteer", "moe_router.json")
    export(config, "sglang", "forward_hooks.json")    # or .yaml (an SGLang --config), or a dir (both)

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
from steer.hooks import module_hook
from steer.options import EXPORT_TARGETS

TARGETS = EXPORT_TARGETS
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
    from steer.serving.vllm_plugin import unservable_problems

    problems = []
    if config.mote is None and config.difr is None and config.lynx is None:
        problems.append("(top level): nothing for vLLM to do: the config has no mote, difr or lynx section")
    problems += unservable_problems(config)  # the plugin's own refusal, never dropped silently
    if config.lynx is not None and config.lynx.calibration is None:
        problems.append("lynx.calibration: the probe is not calibrated; run `steer probe calibrate` first (the served "
                        "exit needs its conformal thresholds)")
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
        notes.append("fingerprints: set STEER_FINGERPRINT_DIR for the engine. Offline (LLM in your process): "
                     "SamplingParams(extra_args={'steer_fingerprint': KEY}), read with "
                     "steer.serving.served_fingerprints. Over HTTP (--middleware steer.serving.fingerprint_route): "
                     "send vllm_xargs={'steer_fingerprint': true}, the server issues a key and read token in the "
                     "response headers; read with steer.serving.fetch_fingerprints(url, "
                     "FingerprintTicket.from_headers(resp.headers), ...) (docs/serving-security.md)")
    if config.lynx is not None:  # served without rollback (steer.serving.vllm_lynx, docs/serving-lynx.md)
        from steer.serving.vllm_lynx import PROCESSOR

        args.setdefault("logits_processors", []).append(PROCESSOR)
        notes.append("LYNX exit (no rollback: the exit string follows the cue): each request opts in with "
                     "vllm_xargs={'steer_lynx': true, 'steer_lynx_budget': N, ...} (docs/serving-lynx.md)")
    (out_dir / "vllm_args.json").write_text(json.dumps(args, indent=2) + "\n")
    return ExportResult("vllm", out_dir, notes)


# ---------------------------------------------------------------------------------------------
# EasySteer `moe_router`
#
# Format read by MoERouterAlgorithm.load_from_path (ZJU-REAL/EasySteer-vllm-v1,
# vllm/steer_vectors/algorithms/moe_router.py; verdicts of that loader on fixed documents are recorded in
# tests/fixtures/easysteer_moe_router): {"layer_configs": {"7": {"mode": "deactivate", "expert_ids": [30]},
# "9": {"activate_ids": [12], "deactivate_ids": [35]}}}. Per layer: mode optional (default "activate"), one of
# activate | deactivate | soft | soft_topk | soft_random or a deprecated alias (boost, soft_hard, steermoe ->
# activate; suppress -> deactivate); expert_ids / activate_ids / deactivate_ids lists of ints (activate and
# deactivate need one non-empty, soft modes need expert_ids); optional epsilon (tie margin, default 0.01),
# lambda (soft strength), topk (soft_topk's k, default 8). Other top-level keys are ignored by the loader.
# Its activate/deactivate log-softmax the logits and set experts to the per-token max + eps / min - eps.
# The PyPI package named `easysteer` is an unrelated empty placeholder.

EASYSTEER_MODES = ("activate", "deactivate", "soft", "soft_topk", "soft_random")
EASYSTEER_MODE_ALIASES = {"boost": "activate", "soft_hard": "activate", "steermoe": "activate", "suppress": "deactivate"}
EASYSTEER_FIELDS = ("mode", "expert_ids", "activate_ids", "deactivate_ids", "epsilon", "lambda", "topk")
_IDS = {"type": "array", "items": {"type": "integer", "minimum": 0}}
EASYSTEER_SCHEMA = {
    "type": "object", "required": ["layer_configs"],
    "properties": {"layer_configs": {
        "type": "object", "minProperties": 1, "patternProperties": {"^[0-9]+$": {
            "type": "object", "additionalProperties": False,
            "properties": {
                "mode": {"enum": list(EASYSTEER_MODES) + list(EASYSTEER_MODE_ALIASES)},
                "expert_ids": _IDS, "activate_ids": _IDS, "deactivate_ids": _IDS,
                "epsilon": {"type": "number", "exclusiveMinimum": 0},
                "lambda": {"type": "number"},
                "topk": {"type": "integer", "minimum": 1},
            },
        }},
        "additionalProperties": False,
    }},
}


def easysteer_problems(doc: Any) -> list[str]:
    """Problems of an EasySteer moe_router document: what EasySteer's loader rejects, plus what it loads but
    then ignores (an unknown field, a negative layer, a soft mode without experts), which would be a
    silent no-op."""
    if not isinstance(doc, dict) or not isinstance(doc.get("layer_configs"), dict):
        return ["(top level): must be an object with a layer_configs object ({\"layer_configs\": {\"7\": {...}}})"]
    if not doc["layer_configs"]:
        return ["layer_configs: is empty (EasySteer refuses a file with no layer configurations)"]
    problems = []
    for layer, payload in doc["layer_configs"].items():
        where = f"layer_configs.{layer}"
        if not layer.isdigit():
            problems.append(f"{where}: layer keys must be decimal layer indices (0, 1, ...)")
        if not isinstance(payload, dict):
            problems.append(f"{where}: must be an object")
            continue
        extra = set(payload) - set(EASYSTEER_FIELDS)
        if extra:
            problems.append(f"{where}: unknown fields {sorted(extra)} (EasySteer would ignore them; known: "
                            f"{', '.join(EASYSTEER_FIELDS)})")
        mode = payload.get("mode", "activate")
        canonical = EASYSTEER_MODE_ALIASES.get(mode, mode) if isinstance(mode, str) else None
        if canonical not in EASYSTEER_MODES:
            problems.append(f"{where}.mode: {mode!r} is not one of {', '.join(EASYSTEER_MODES)} (or an alias: "
                            f"{', '.join(EASYSTEER_MODE_ALIASES)})")
        for key in ("expert_ids", "activate_ids", "deactivate_ids"):
            ids = payload.get(key, [])
            if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                                    for i in ids):
                problems.append(f"{where}.{key}: must be a list of non-negative integers")
        if canonical in ("activate", "deactivate") and not any(
                payload.get(k) for k in ("expert_ids", "activate_ids", "deactivate_ids")):
            problems.append(f"{where}: {mode} needs expert ids (expert_ids, activate_ids or deactivate_ids)")
        if canonical in ("soft", "soft_topk", "soft_random") and not payload.get("expert_ids"):
            problems.append(f"{where}.expert_ids: {mode} needs a non-empty expert_ids")
        eps = payload.get("epsilon", 0.01)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or eps <= 0:
            problems.append(f"{where}.epsilon: must be a positive number")
        lam = payload.get("lambda", 0.5)
        if isinstance(lam, bool) or not isinstance(lam, (int, float)):
            problems.append(f"{where}.lambda: must be a number")
        topk = payload.get("topk", 8)
        if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
            problems.append(f"{where}.topk: must be a positive integer")
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
                         "model does not renormalise top-k weights (norm_topk_prob=False) and EasySteer sets a "
                         "switched-off expert's log-probability to the per-token min - epsilon, where steer's "
                         "off_mask sets its logit to -inf (its residual share stays in EasySteer's denominator)")
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
# Checked against the sglang 0.5.23 wheel (PyPI):
# - `--forward-hooks` takes a JSON *list* (ServerArgs.forward_hooks, parsed by utils.common.json_list_type)
#   of {"name": str, "target_modules": [fnmatch patterns over model.named_modules()], "hook_factory":
#   "pkg.module:factory" (or dotted), "config": object passed to the factory}; srt/model_executor/
#   hook_manager.py:register_forward_hooks calls factory(config) once and registers the returned
#   (module, inputs, output) -> output hook on every module whose name matches. A spec whose patterns
#   match nothing is skipped with a warning ("No modules matched hook spec ..."): the server runs unsteered.
# - `--config FILE.yaml` (utils/server_args_config_parser.py) turns each key into `--key value`; a list value
#   becomes several arguments, so forward-hooks must be written there as one JSON string.
# - The module names are SGLang's own, not Hugging Face's: the router-logits module is a ReplicatedLinear
#   (returns (logits, bias)) at `model.layers.N.<Adapter.sglang_gate>` (Mixtral/GraniteMoE
#   block_sparse_moe.gate, GPT-OSS mlp.router, Qwen2/3-MoE and OLMoE mlp.gate).
# - Hooks are registered after CUDA-graph capture (model_runner_components/cuda_graph_setup.py:
#   finalize_cuda_graph_capture) and graph replay runs no Python hook: with CUDA graphs on (the default),
#   every step that replays a graph (decode, and prefill where a prefill graph is captured) is
#   unsteered. The server must run without CUDA graphs: `--disable-cuda-graph` (deprecated in 0.5.23 but
#   accepted; it disables both phases) or `--cuda-graph-backend-decode disabled
#   --cuda-graph-backend-prefill disabled` (the 0.5.23 spelling, and the only one its --config accepts).

SGLANG_VERSION_CHECKED = "0.5.23"
SGLANG_NO_CUDA_GRAPH_FLAG = "--disable-cuda-graph"
SGLANG_NO_CUDA_GRAPH_YAML = {"cuda-graph-backend-decode": "disabled", "cuda-graph-backend-prefill": "disabled"}
SGLANG_CUDA_GRAPH_NOTE = (
    "CUDA graphs: SGLang registers forward hooks after CUDA-graph capture and graph replay runs no hook, so "
    "with CUDA graphs on (SGLang's default) decode is served UNSTEERED. Launch with --disable-cuda-graph "
    "(or, in a --config YAML, cuda-graph-backend-decode/prefill: disabled, as the .yaml export writes)")
# Routing kinds whose experts a logits hook cannot switch exactly (keyed by the adapter's routing kind).
_SGLANG_REFUSED = {
    "sigmoid_group": "its routing adds e_score_correction_bias after a sigmoid and picks groups first, so a -inf "
                     "logit does not exclude an expert (a hook on the gate cannot switch experts exactly)",
}


def sglang_problems(specs: Any, resolve: bool = True) -> list[str]:
    """Problems of a `--forward-hooks` value (a list of hook specs) against SGLang's hook manager."""
    if isinstance(specs, dict) and "forward_hooks" in specs:
        return ["(top level): --forward-hooks takes the JSON list itself, not an object {\"forward_hooks\": [...]}; "
                "write the list (re-export with `steer export --target sglang`)"]
    if not isinstance(specs, list):
        return ["forward_hooks: must be a list of hook specs"]
    problems = []
    for i, spec in enumerate(specs):
        where = f"forward_hooks[{i}]"
        if not isinstance(spec, dict):
            problems.append(f"{where}: must be an object")
            continue
        extra = set(spec) - {"name", "target_modules", "hook_factory", "config"}
        if extra:
            problems.append(f"{where}: unknown fields {sorted(extra)} (SGLang {SGLANG_VERSION_CHECKED} reads name, "
                            "target_modules, hook_factory, config)")
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


def sglang_gate_module(family: str) -> str:
    """SGLang's router-logits module path (relative to a decoder layer) for `family`, or a ConfigError."""
    from steer.adapters import ADAPTERS

    adapter = ADAPTERS.get(family)
    if adapter is not None and adapter.sglang_gate:
        return adapter.sglang_gate
    known = sorted(f for f, a in ADAPTERS.items() if a.sglang_gate)
    if adapter is None:
        why = "it has no steer adapter"
    elif not adapter.is_moe:
        why = "it is a dense family (no router)"
    else:
        why = _SGLANG_REFUSED.get(adapter.routing, "no SGLang module name is known for its router")
    raise ConfigError([f"model.family: {family!r} cannot be exported for SGLang: {why}. SGLang export knows "
                       f"{', '.join(known)}; serve {family} with steer's vLLM plugin (--target vllm), or add the "
                       f"family's SGLang gate path as Adapter.sglang_gate in steer.adapters"],
                      "config cannot be exported for SGLang")


def to_sglang(config: InterventionConfig, *, norm_topk_prob: bool | None = None) -> tuple[list[dict], list[str]]:
    """(the `--forward-hooks` list, notes). Module names come from the family's Adapter.sglang_gate."""
    mote = config.mote
    if mote is None:
        raise ConfigError(["mote: the SGLang export holds router hooks; the config has no mote section"],
                          "config cannot be exported for SGLang")
    if mote.mode == "off_zero":
        raise ConfigError(["mote.mode: off_zero keeps the selection and zeroes a weight, which a hook on the router "
                           "logits cannot express; use off_mask or serve with steer's vLLM plugin"],
                          "config cannot be exported for SGLang")
    gate = sglang_gate_module(config.model.family)
    specs = [{
        "name": f"steer-mote-layer-{layer}",
        "target_modules": [f"model.layers.{layer}.{gate}"],
        "hook_factory": SGLANG_HOOK_FACTORY,
        "config": {"mode": mote.mode, "experts": experts, "num_experts": config.model.num_experts},
    } for layer, experts in mote.by_layer().items()]
    notes = [SGLANG_CUDA_GRAPH_NOTE]
    # off_mask: the hook's -inf logit IS steer's off_mask (a logit-level mask) for the softmax families
    if mote.mode == "on":
        notes.append("the hook raises forced logits to the per-token max + 1e-3: the expert is selected and its "
                     "weight is close to force_weight='max'")
    return specs, notes


def sglang_yaml(specs: list[dict]) -> str:
    """An SGLang `--config` YAML holding the hooks (as the JSON string its parser needs) and CUDA graphs off."""
    import yaml

    doc = {"forward-hooks": json.dumps(specs), **SGLANG_NO_CUDA_GRAPH_YAML}
    head = (f"# steer export --target sglang (checked against SGLang {SGLANG_VERSION_CHECKED}).\n"
            "# python -m sglang.launch_server --model-path MODEL --config THIS_FILE\n"
            "# CUDA graphs stay off: SGLang's graph replay runs no forward hook (decode would be unsteered).\n")
    return head + yaml.safe_dump(doc, sort_keys=False, width=1 << 20)


def export_sglang(config: InterventionConfig, out: str | Path, *, norm_topk_prob: bool | None = None) -> ExportResult:
    """`out` .json: the `--forward-hooks` list; .yaml/.yml: an SGLang `--config` file (hooks + CUDA graphs off);
    a directory: both (forward_hooks.json, sglang.yaml)."""
    specs, notes = to_sglang(config, norm_topk_prob=norm_topk_prob)
    problems = sglang_problems(specs)
    if problems:  # pragma: no cover
        raise AssertionError(f"internal error: SGLang export is invalid: {problems}")
    path = Path(out)
    json_path = yaml_path = None
    if path.suffix == ".json":
        json_path = path
    elif path.suffix in (".yaml", ".yml"):
        yaml_path = path
    else:
        json_path, yaml_path = path / "forward_hooks.json", path / "sglang.yaml"
    launch = []
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(specs, indent=2) + "\n")
        launch.append(f"python -m sglang.launch_server --model-path MODEL {SGLANG_NO_CUDA_GRAPH_FLAG} "
                      f"--forward-hooks \"$(cat {json_path})\"")
    if yaml_path is not None:
        yaml_path.parent.mkdir(parents=True, exist_ok=True)
        yaml_path.write_text(sglang_yaml(specs))
        launch.append(f"python -m sglang.launch_server --model-path MODEL --config {yaml_path}")
    notes.insert(0, "launch with: " + "  or  ".join(launch) + " (steer must be importable by the server)")
    return ExportResult("sglang", yaml_path if json_path is None else json_path, notes)


def register_forward_hooks(model, specs: list[dict]) -> list:
    """Attach `specs` to a torch model as SGLang's hook_manager does (fnmatch over named_modules,
    forward hooks), returning the handles so they can be removed. Lets the vLLM tests run the SGLang
    export on a real engine's modules (vLLM's Qwen2-MoE shares SGLang's names); tests/test_sglang.py
    loads the export with SGLang's own hook_manager instead."""
    problems = sglang_problems(specs)
    if problems:
        raise ConfigError(problems, "forward_hooks")
    handles = []
    modules = dict(model.named_modules())
    for spec in specs:
        hook = resolve_callable(spec["hook_factory"])(spec.get("config") or {})
        for name, module in modules.items():
            if any(fnmatch.fnmatch(name, p) for p in spec["target_modules"]):
                handles.append(module_hook(module, hook))
    return handles


def _json_out(out: str | Path, default_name: str) -> Path:
    path = Path(out)
    if path.suffix != ".json":
        path = path / default_name
    path.parent.mkdir(parents=True, exist_ok=True)
    return path
