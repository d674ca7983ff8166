"""LYNX early exit inside vLLM, without rolling anything back.

steer's exact exit (`steer.probes.generate`, `ExitConfig(rollback=True)`) cuts the reasoning before
the cue: it rolls the request's KV cache back, which vLLM's scheduler cannot do. The served exit is
the no-rollback variant, `ExitConfig(rollback=False)`, which steer's HF loop also runs (the reference
the tests compare with, token for token):

- the cues, the scored point and the decision are the exact exit's: a cue is reported once the
  token after it has been sampled (its right word boundary), the probe scores the hidden states of
  the cue's LAST token (the config's feature points: decoder-layer outputs `blocks.L.resid_post`,
  read by forward hooks on vLLM's decoder layers, and `final_norm.out`, the `compute_logits` input),
  and the request exits at the first cue whose conformal prediction set is exactly {1};
- nothing is cut: the exit string is forced after everything generated so far, i.e. after the cue
  and its one look-ahead token, then the answer is decoded (the request's own sampling; greedy in
  the comparisons) for up to `steer_lynx_answer_tokens` tokens, stopping after a
  `steer_lynx_answer_stop` string, then EOS is forced.

What the conformal guarantee means here. The probe's thresholds bound P(exit at a cue | y = 0) by
delta, where y is the label of the calibration cue events. Calibrated on rollback labels (the
answer after cutting before the cue: `steer probe label` by default), the served exit takes exactly
the same decisions as the exact exit on the same trajectory, but its answer is not the labelled one,
so the bound is about the exact exit's answers, not the served ones. Calibrated on no-rollback
labels (`label_cue_events` with `ExitConfig(rollback=False)`: each trial answer is the one this
server would give), the bound is about the served answers. experiments/lynx/RESULTS.md measures both.

Use (the engine needs the config and the processor; each request opts in):

    python -m vllm.entrypoints.openai.api_server --model CKPT --enforce-eager \\
        --hf-overrides '{"steer_config": "cfg_dir"}' --logits-processors steer.serving.vllm_lynx:LynxLogitsProcessor
    # request: "vllm_xargs": {"steer_lynx": true, "steer_lynx_budget": 64, "steer_lynx_answer_tokens": 8,
    #                         "steer_lynx_answer_stop": [".", "\\n"]}

Requests without `steer_lynx` are never changed. Bad values are refused at admission (HTTP 400).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch

REQUEST_KEY = "steer_lynx"  # vllm_xargs / SamplingParams.extra_args: true opts a request in
OPTION_KEYS = {  # the other per-request keys: name -> (meaning, default)
    "steer_lynx_budget": ("reasoning tokens before a forced exit (a budget cut), an int >= 1", None),
    "steer_lynx_answer_tokens": ("answer tokens decoded after the exit string, an int >= 1", 64),
    "steer_lynx_answer_stop": ("strings that end the answer once it has some text, a list of strings", ()),
}
PROCESSOR = "steer.serving.vllm_lynx:LynxLogitsProcessor"
_BLOCK = re.compile(r"^blocks\.(\d+)\.resid_post$")


# ---------------------------------------------------------------------------------------------
# Engine side: features of each request's last scheduled token in the current step


@dataclass
class _Capture:
    """The probe and this step's feature-point states (one per worker process)."""

    probe: Any = None
    points: list[str] = field(default_factory=list)
    exit_string: str = ""
    cues: Any = None
    active: bool = False  # some request in the batch opted in (set by the logits processor)
    last_rows: torch.Tensor | None = None  # Long[requests]: each request's last token in the flat batch
    parts: dict[str, torch.Tensor] = field(default_factory=dict)  # point -> [requests, d]

    def features(self) -> torch.Tensor | None:
        """[requests, F]: the feature points of each request's last scheduled token, in point order."""
        if any(p not in self.parts for p in self.points):
            return None
        return torch.cat([self.parts[p].float() for p in self.points], dim=-1)


CAPTURE = _Capture()


def lynx_problems(cfg, vllm_config) -> list[str]:
    """Why this engine cannot serve the config's lynx section ([] if it can)."""
    lynx, problems = cfg.lynx, []
    if lynx.calibration is None:
        problems.append("lynx.calibration: the probe is not calibrated; run `steer probe calibrate` and save the "
                        "config again (the served exit needs its conformal thresholds)")
    par = vllm_config.parallel_config
    if par.pipeline_parallel_size > 1:
        problems.append(f"lynx: pipeline_parallel_size={par.pipeline_parallel_size} puts the probe's layers on "
                        f"other ranks; serve LYNX with tensor parallelism only")
    if not vllm_config.model_config.enforce_eager:
        problems.append("lynx: the probe reads decoder-layer outputs with forward hooks, which a compiled or "
                        "captured graph skips; start the engine with enforce_eager=True (--enforce-eager)")
    if getattr(vllm_config.scheduler_config, "async_scheduling", False):
        problems.append("lynx: async scheduling samples a step before the previous one is known to the logits "
                        "processor, so forced exit tokens would land late; start with --no-async-scheduling")
    if getattr(vllm_config, "speculative_config", None) is not None:
        problems.append("lynx: speculative decoding scores several tokens per step; serve LYNX without it")
    for i, point in enumerate(lynx.points):
        m = _BLOCK.match(point)
        if point != "final_norm.out" and not m:
            problems.append(f"lynx.points[{i}]: {point!r} is not 'blocks.L.resid_post' or 'final_norm.out'")
    return problems


def install_lynx(model: torch.nn.Module, section) -> bool:
    """Hook the probe's decoder layers; the final point is read in `compute_logits` (`record_final`)."""
    from steer.hooks import module_hook
    from steer.probes.cues import CueSet

    probe = section.probe()
    CAPTURE.probe, CAPTURE.points = probe, list(section.points)
    CAPTURE.exit_string = (section.info or {}).get("exit_string") or ""
    cues = (section.info or {}).get("cues")
    CAPTURE.cues = CueSet.from_json(cues) if cues else CueSet()
    layers = decoder_layers(model)
    module_hook(model, _start_step, pre=True)  # vLLM's modules have no canonical points: no `attach`
    for point in CAPTURE.points:
        m = _BLOCK.match(point)
        if m:
            module_hook(layers[int(m.group(1))], _recording(point))
    return True


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The vLLM model's decoder layers (`model.layers`, as in the Hugging Face module tree)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        from steer.config import ConfigError

        raise ConfigError([f"lynx: {type(model).__name__} has no model.layers to read the probe's points from"])
    return layers


def _start_step(_module, _args) -> None:
    CAPTURE.parts, CAPTURE.last_rows = {}, None
    if not CAPTURE.active:
        return
    from steer.serving.vllm_profile import _query_start_loc

    qsl = _query_start_loc()
    if qsl is not None and qsl.numel() > 1:
        CAPTURE.last_rows = qsl[1:] - 1  # the rows compute_logits samples from (no speculative decoding)


def _recording(point: str):
    def hook(_module, _args, output) -> None:
        if CAPTURE.last_rows is None:
            return
        if isinstance(output, tuple):  # vLLM's decoder layers return (hidden, residual): the stream is their sum
            hidden, residual = output[0], output[1] if len(output) > 1 else None
            state = hidden if residual is None else hidden + residual
        else:
            state = output
        CAPTURE.parts[point] = state[CAPTURE.last_rows.to(state.device)].detach()

    return hook


def record_final(hidden_states: torch.Tensor) -> None:
    """`compute_logits`'s input rows (post final norm), one per request: the `final_norm.out` point."""
    if CAPTURE.last_rows is not None and "final_norm.out" in CAPTURE.points:
        CAPTURE.parts["final_norm.out"] = hidden_states.detach()


# ---------------------------------------------------------------------------------------------
# Admission: per-request options


def request_options(extra_args: dict | None) -> dict | None:
    """The request's LYNX options ({} keys filled with defaults), None when it does not opt in;
    ValueError naming the key, the problem and the fix for anything else."""
    args = extra_args or {}
    flag = args.get(REQUEST_KEY)
    given = {k: v for k, v in args.items() if k.startswith(REQUEST_KEY + "_")}
    unknown = sorted(set(given) - set(OPTION_KEYS))
    if unknown:
        raise ValueError(f"vllm_xargs.{unknown[0]}: unknown LYNX option; known: {', '.join(sorted(OPTION_KEYS))}")
    if flag is None or flag is False or flag == 0:
        if given:
            raise ValueError(f"vllm_xargs.{sorted(given)[0]} needs vllm_xargs.{REQUEST_KEY} = true (the request "
                             f"does not opt in to the LYNX exit)")
        return None
    if flag is not True and flag != 1:
        raise ValueError(f"vllm_xargs.{REQUEST_KEY}: {flag!r} is not true; send true to opt in to the LYNX exit")
    opts = {k: given.get(k, default) for k, (_, default) in OPTION_KEYS.items()}
    for key in ("steer_lynx_budget", "steer_lynx_answer_tokens"):
        v = opts[key]
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"vllm_xargs.{key}: {v!r} is not {OPTION_KEYS[key][0]}")
    stop = opts["steer_lynx_answer_stop"]
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and 0 < len(s) <= 64 for s in stop) \
            or len(stop) > 16:
        raise ValueError(f"vllm_xargs.steer_lynx_answer_stop: {stop!r} is not a list of at most 16 non-empty "
                         f"strings of at most 64 characters")
    opts["steer_lynx_answer_stop"] = tuple(stop)
    return opts


def _sampling_problem(params) -> str | None:
    if getattr(params, "ignore_eos", False):
        return "ignore_eos: the exit ends the answer with EOS; send the request without ignore_eos"
    if (getattr(params, "min_tokens", 0) or 0) > 0:
        return "min_tokens: it can mask the EOS the exit forces; send the request without min_tokens"
    if getattr(params, "prompt_logprobs", None) is not None:
        return "prompt_logprobs: the engine would score extra rows; send the request without prompt_logprobs"
    return None


# ---------------------------------------------------------------------------------------------
# The logits processor


try:  # subclass vLLM's interface when vLLM is installed (it checks the type of custom processors)
    from vllm.v1.sample.logits_processor import LogitsProcessor as _LogitsProcessorBase
except ImportError:  # steer without vLLM: the class stays importable for documentation and tests
    _LogitsProcessorBase = object


@dataclass
class _Row:
    """One opted-in request: its live output list, cue tracker, and where its exit stands."""

    out: list  # vLLM's live output-token list for the request
    tracker: Any
    budget: int | None
    answer_tokens: int
    answer_stop: tuple[str, ...]
    eos: int
    pushed: int = 0  # output tokens fed to the tracker
    feats: dict[int, torch.Tensor] = field(default_factory=dict)  # len(out) at a step -> features of out[-1]
    exit_at: int | None = None  # len(out) when the exit was decided
    cue_token: int | None = None  # the exiting cue's token index (None: a budget cut)


class LynxLogitsProcessor(_LogitsProcessorBase):
    """vLLM v1 logits processor serving steer's no-rollback LYNX exit (see the module docstring).

    vLLM calls `apply(logits)` right after `compute_logits`, rows in the persistent batch's order,
    which is the order of the per-request rows the layer hooks kept. Nothing a client sends can raise
    here: requests are checked at admission (`validate_params`).
    """

    def __init__(self, vllm_config, device, is_pin_memory: bool):
        from steer.config import ConfigError, InterventionConfig

        path = _config_path(vllm_config)
        cfg = InterventionConfig.load(path) if path else None
        if cfg is None or cfg.lynx is None:
            raise ConfigError([f"{PROCESSOR} needs a steer config with a lynx section (hf_overrides "
                               f"{{'steer_config': DIR}} or env STEER_CONFIG); got {path or 'no config'}"],
                              "this vLLM engine cannot serve the LYNX exit")
        import os

        plugins = os.environ.get("VLLM_PLUGINS")
        if plugins is not None and "steer" not in plugins.split(","):
            raise ConfigError([f"VLLM_PLUGINS={plugins!r} leaves steer's plugin out, so no probe is installed"],
                              "this vLLM engine cannot serve the LYNX exit")
        if os.environ.get("STEER_VLLM_SKIP_LYNX") == "1":
            raise ConfigError(["STEER_VLLM_SKIP_LYNX=1 serves the config without its lynx section; drop the "
                               "processor or the variable"], "this vLLM engine cannot serve the LYNX exit")
        from steer.adapters import vllm_architectures

        mc = vllm_config.model_config
        archs = list(getattr(mc.hf_config, "architectures", None) or [])
        served = vllm_architectures()
        if not any(a in served for a in archs):
            raise ConfigError([f"lynx: architecture {archs} is not one steer's vLLM plugin wraps ({', '.join(served)}), "
                               f"so the probe's hidden states cannot be read"], "this vLLM engine cannot serve the LYNX exit")
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(mc.tokenizer, revision=getattr(mc, "tokenizer_revision", None))
        self.exit_ids = self.tok((cfg.lynx.info or {}).get("exit_string") or "", add_special_tokens=False)["input_ids"]
        self.rows: dict[int, _Row] = {}
        self.parked: dict[int, _Row] = {}  # id(output list) -> row of a request that left the batch (preempted)

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        """Admission (API server process): ValueError (HTTP 400) for a bad LYNX request."""
        if request_options(sampling_params.extra_args) is None:
            return
        problem = _sampling_problem(sampling_params)
        if problem:
            raise ValueError(f"vllm_xargs.{REQUEST_KEY} with {problem}")

    def is_argmax_invariant(self) -> bool:
        return False  # forced tokens change greedy requests too

    def update_state(self, batch_update) -> None:
        if batch_update is not None:
            self._update(batch_update)
        CAPTURE.active = bool(self.rows)

    def _update(self, batch_update) -> None:
        for index in batch_update.removed:
            self._park(self.rows.pop(index, None))
        for index, params, _prompt_ids, output_ids in batch_update.added:
            self._park(self.rows.pop(index, None))
            try:
                opts = request_options(params.extra_args) if params is not None else None
            except ValueError:  # admission refuses these; a request that got here anyway runs unchanged
                opts = None
            if opts is None or output_ids is None:
                continue
            row = self.parked.pop(id(output_ids), None) or self._new_row(params, output_ids, opts)
            self.rows[index] = row
        for a, b, direction in batch_update.moved:
            ra, rb = self.rows.pop(a, None), self.rows.pop(b, None)
            if ra is not None:
                self.rows[b] = ra
            if direction.name == "SWAP":
                if rb is not None:
                    self.rows[a] = rb
            else:
                self._park(rb)

    def _new_row(self, params, output_ids: list, opts: dict) -> _Row:
        from steer.probes.cues import CueTracker

        eos = params.eos_token_id if params.eos_token_id is not None else self.tok.eos_token_id
        return _Row(output_ids, CueTracker(CAPTURE.cues, self.tok), opts["steer_lynx_budget"],
                    opts["steer_lynx_answer_tokens"], opts["steer_lynx_answer_stop"], int(eos))

    def _park(self, row: _Row | None) -> None:
        if row is None:
            return
        self.parked[id(row.out)] = row
        while len(self.parked) > 1024:
            self.parked.pop(next(iter(self.parked)))

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.rows:
            return logits
        if CAPTURE.probe is None:  # startup checks make this unreachable; never crash the engine over it
            import logging

            logging.getLogger("steer.serving").error("LYNX requests are served unchanged: no probe was installed")
            self.rows.clear()
            return logits
        feats = CAPTURE.features()
        for index, row in self.rows.items():
            if index >= logits.shape[0]:
                continue
            n = len(row.out)
            if feats is not None and index < feats.shape[0] and row.exit_at is None:
                row.feats[n] = feats[index]
                for old in [k for k in row.feats if k < n - 1]:
                    del row.feats[old]
            forced = self._step(row, n)
            if forced is not None:
                logits[index] = float("-inf")
                logits[index, forced] = 0.0
        return logits

    def _step(self, row: _Row, n: int) -> int | None:
        """The token to force for `row` this step (None: the model chooses)."""
        if row.exit_at is None:
            self._reasoning(row, n)
        if row.exit_at is None:
            return None
        k = n - row.exit_at
        if k < len(self.exit_ids):
            return self.exit_ids[k]
        answer = row.out[row.exit_at + len(self.exit_ids):]
        if len(answer) >= row.answer_tokens:
            return row.eos
        if answer and row.answer_stop:
            text = self.tok.decode(answer, skip_special_tokens=True)
            if text.strip() and any(s in text.lstrip() for s in row.answer_stop):
                return row.eos
        return None

    def _reasoning(self, row: _Row, n: int) -> None:
        """Feed new tokens to the cue tracker; decide an exit at a cue (or at the budget)."""
        while row.pushed < n:
            events = row.tracker.push(row.out[row.pushed])
            row.pushed += 1
            if not events or row.pushed != n:
                continue  # only the newest token's cue can be scored: its features are the last step's
            feat = row.feats.get(n - 1)
            if feat is None:
                continue
            with torch.no_grad():
                p = CAPTURE.probe(feat[None].to(next(CAPTURE.probe.parameters()).device))
            if bool(CAPTURE.probe.calibration.should_exit(p.double().cpu())[0]):
                row.exit_at, row.cue_token = n, events[0].cue_token
                return
        if row.budget is not None and n >= row.budget:
            row.exit_at = n


def _config_path(vllm_config) -> str | None:
    """The engine's steer config, read as steer.serving.vllm_plugin.config_path reads it (that module
    imports this one, so it is not imported back)."""
    import os

    hf_config = vllm_config.model_config.hf_config
    return getattr(hf_config, "steer_config", None) or os.environ.get("STEER_CONFIG") or None


# ---------------------------------------------------------------------------------------------
# Driver side (the experiment and the tests): an in-process engine and one batch of requests


def lynx_engine(model: str, config: str, *, max_model_len: int = 512, max_num_seqs: int = 64, **kwargs):
    """A vLLM engine serving `config`'s LYNX exit (eager, float32 unless `dtype` is given)."""
    from vllm import LLM

    kw = dict(model=str(model), enforce_eager=True, max_model_len=max_model_len, dtype="float32", seed=0,
              max_num_seqs=max_num_seqs, hf_overrides={"steer_config": str(config)}, logits_processors=[PROCESSOR])
    return LLM(**{**kw, **kwargs})


def generate_lynx(llm, prompt_ids: list[list[int]], max_tokens: int, *, opt_in: bool | list[bool] = True,
                  budget: int | None = None, answer_tokens: int = 64, answer_stop: tuple[str, ...] = ()) -> list[list[int]]:
    """Greedy output token ids per prompt (EOS included); `opt_in` per prompt or for all."""
    from vllm import SamplingParams

    flags = opt_in if isinstance(opt_in, list) else [opt_in] * len(prompt_ids)
    lynx = {REQUEST_KEY: True, "steer_lynx_answer_tokens": answer_tokens, "steer_lynx_answer_stop": list(answer_stop)}
    if budget is not None:
        lynx["steer_lynx_budget"] = budget
    params = [SamplingParams(temperature=0.0, max_tokens=max_tokens, extra_args=lynx if f else None) for f in flags]
    outs = llm.generate([{"prompt_token_ids": list(p)} for p in prompt_ids], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]
