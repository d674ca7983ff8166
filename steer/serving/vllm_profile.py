"""fTRI expert profiling inside vLLM: count the routing decisions the engine made, per request class.

`steer.ftri.profile` runs the prompt classes through a Hugging Face forward; this module runs them
through a vLLM engine instead (tensor parallel included) and folds the counts into the same
`ProfileAccumulator`, so the result is the same `steer.ftri.Profile` that `steer switch`, the app
and the exports read. Two halves:

Engine side (inside every vLLM worker; installed by steer's vLLM plugin when profiling is on):
  - `install_recorder` wraps each MoE layer's `router._compute_routing` (the place the plugin edits
    routing; the wrapper sits after any edit) and keeps the expert ids of the current forward, with
    the step's token positions and per-request token offsets (`query_start_loc`);
  - `ProfileLogitsProcessor` knows which request sits in which batch row (`update_state`). After
    every forward it splits the step's ids by request, keeps the tokens whose positions the request
    selected, and appends one line of per-(layer, expert) counts to `DIR/KEY.jsonl`. Only tensor
    parallel rank 0 writes: every rank routes every token, so each decision is counted once.

Driver side: `profile_vllm` tokenises exactly as `steer.ftri.prompt_batches` does, sends each prompt
as token ids with `max_tokens=1` and `extra_args={"steer_profile": {"key", "class", "select"}}`
(the class label and the selected token range travel with the request), reads back each request's
counts, checks that the engine counted exactly the selected tokens (a double count under tensor
parallel, a prefix served from cache, a chunk never seen, would all fail here) and folds them.

Profiling is on when the engine gets a directory: `hf_overrides={"steer_profile_dir": DIR}` or env
STEER_PROFILE_DIR, plus `logits_processors=[PROCESSOR]`. `profiling_engine` builds such an engine
(eager mode, prefix caching off: a cached prefix is never routed again, so it could not be counted).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

ENV_PROFILE_DIR = "STEER_PROFILE_DIR"
HF_OVERRIDE_KEY = "steer_profile_dir"
REQUEST_KEY = "steer_profile"  # SamplingParams.extra_args / vllm_xargs key
PROCESSOR = "steer.serving.vllm_profile:ProfileLogitsProcessor"


def profile_dir(vllm_config) -> str | None:
    """Where this engine's workers write per-request counts (None: profiling is off)."""
    hf_config = vllm_config.model_config.hf_config
    return getattr(hf_config, HF_OVERRIDE_KEY, None) or os.environ.get(ENV_PROFILE_DIR) or None


# ---------------------------------------------------------------------------------------------
# Engine side


class _Step:
    """The routing of the engine's current forward (one per worker process)."""

    def __init__(self) -> None:
        self.layers: list[int] = []
        self.ids: dict[int, torch.Tensor] = {}  # layer -> Long[tokens, k] expert ids
        self.positions: torch.Tensor | None = None  # Long[tokens]
        self.query_start_loc: torch.Tensor | None = None  # Long[requests + 1]
        self.num_experts = 0

    def start(self, positions: torch.Tensor | None) -> None:
        self.ids = {}
        self.positions = positions.detach().reshape(-1).cpu() if positions is not None else None
        self.query_start_loc = _query_start_loc()


STEP = _Step()


def _query_start_loc() -> torch.Tensor | None:
    from vllm.forward_context import get_forward_context, is_forward_context_available

    if not is_forward_context_available():
        return None
    meta = get_forward_context().attn_metadata
    if isinstance(meta, list):  # micro-batches (DBO): not used on the CPU backend
        return None
    for m in (meta or {}).values():
        qsl = getattr(m, "query_start_loc", None)
        if qsl is not None:
            return qsl.detach().cpu().long()
    return None


def install_recorder(model: torch.nn.Module, vllm_config) -> bool:
    """Record every MoE layer's routed expert ids when profiling is on (True if installed)."""
    if not profile_dir(vllm_config):
        return False
    from steer.config import ConfigError
    from steer.serving.vllm_moe import moe_runners

    par = vllm_config.parallel_config
    problems = []
    if par.pipeline_parallel_size > 1:
        problems.append(
            f"profiling: pipeline_parallel_size={par.pipeline_parallel_size} splits the layers over "
            f"ranks; profile with tensor parallelism only"
        )
    if par.data_parallel_size > 1:
        problems.append(
            f"profiling: data_parallel_size={par.data_parallel_size} routes other ranks' tokens in "
            f"this rank's MoE layers; profile with tensor parallelism only"
        )
    if not vllm_config.model_config.enforce_eager:
        problems.append(
            "profiling: the recorder runs Python in each MoE layer, which a compiled or captured "
            "graph skips; start the engine with enforce_eager=True (profiling_engine does)"
        )
    if vllm_config.cache_config.enable_prefix_caching:
        problems.append(
            "profiling: prefix caching serves shared prompt prefixes from cache without routing them "
            "again, so they could not be counted; start the engine with enable_prefix_caching=False"
        )
    runners = moe_runners(model)
    if not runners:
        problems.append("profiling: the model has no MoE layer with a router to read")
    if problems:
        raise ConfigError(problems, "this vLLM engine cannot profile expert routing")
    STEP.layers = sorted(runners)
    STEP.num_experts = int(vllm_config.model_config.get_num_experts())
    for layer, runner in runners.items():
        router = runner.router
        router._compute_routing = _recording(layer, router._compute_routing)
    from steer.hooks import module_hook

    module_hook(model, _start_step, pre=True, with_kwargs=True)  # for the engine's lifetime
    return True


def _start_step(_module, args, kwargs):
    positions = kwargs.get("positions", args[1] if len(args) > 1 else None)
    STEP.start(positions)


def _recording(layer: int, compute_routing):
    """Wrap a `_compute_routing` (vLLM's, or the plugin's steered one) to keep the ids it returns."""

    def compute(hidden_states, router_logits, indices_type=None, *, input_ids=None):
        weights, ids = compute_routing(hidden_states, router_logits, indices_type, input_ids=input_ids)
        STEP.ids[layer] = ids.detach().long().cpu()
        return weights, ids

    return compute


try:  # subclass vLLM's interface when vLLM is installed (it checks the type of custom processors)
    from vllm.v1.sample.logits_processor import LogitsProcessor as _LogitsProcessorBase
except ImportError:  # steer without vLLM: the class stays importable for documentation
    _LogitsProcessorBase = object


class ProfileLogitsProcessor(_LogitsProcessorBase):
    """Files each profiled request's routing counts under its key (logits are never changed).

    A request opts in with `extra_args={"steer_profile": {"key": K, "class": NAME, "select": [lo, hi]}}`:
    the tokens at positions lo..hi-1 of its sequence count ("ids": true also files their expert sets). Each step appends to DIR/K.jsonl one line
    {"class", "tokens", "counts": {layer: [per-expert counts]}} for the request's tokens in that step.
    """

    def __init__(self, vllm_config, device, is_pin_memory: bool):
        self.directory = profile_dir(vllm_config)
        self.rows: dict[int, dict] = {}  # batch index -> the request's steer_profile args
        self._rank0: bool | None = None

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        spec = (sampling_params.extra_args or {}).get(REQUEST_KEY)
        if spec is not None:
            _check_spec(spec)

    def is_argmax_invariant(self) -> bool:
        return False  # must see greedy requests too: it records every step

    def update_state(self, batch_update) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self.rows.pop(index, None)
        for index, params, _prompt_ids, _output_ids in batch_update.added:
            spec = (params.extra_args or {}).get(REQUEST_KEY) if params is not None else None
            if spec is None:
                self.rows.pop(index, None)
                continue
            if not self.directory:
                raise RuntimeError(
                    f"request {spec.get('key')!r} asks for routing counts but the engine was "
                    f"started without a profile directory (hf_overrides {HF_OVERRIDE_KEY!r} or "
                    f"{ENV_PROFILE_DIR})"
                )
            self.rows[index] = spec
        for a, b, direction in batch_update.moved:
            ra, rb = self.rows.pop(a, None), self.rows.pop(b, None)
            if ra is not None:
                self.rows[b] = ra
            if rb is not None and direction.name == "SWAP":
                self.rows[a] = rb

    def _is_rank0(self) -> bool:
        if self._rank0 is None:
            from vllm.distributed import get_tensor_model_parallel_rank

            self._rank0 = get_tensor_model_parallel_rank() == 0
        return self._rank0

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.rows or not self._is_rank0():
            return logits
        qsl, positions = STEP.query_start_loc, STEP.positions
        if qsl is None or positions is None or not STEP.ids:
            raise RuntimeError(
                "steer profiling: the step's routing was not recorded (the engine was started "
                "without steer's vLLM plugin, or its model class is not one the plugin wraps)"
            )
        n_tokens = int(qsl[-1])
        for layer, ids in STEP.ids.items():
            if ids.shape[0] < n_tokens:
                raise RuntimeError(
                    f"steer profiling: layer {layer} routed {ids.shape[0]} rows for {n_tokens} "
                    f"scheduled tokens (sequence-parallel MoE?); profile with tensor parallelism"
                )
        for index, spec in self.rows.items():
            start, end = int(qsl[index]), int(qsl[index + 1])
            if end <= start:
                continue
            lo, hi = spec["select"]
            pos = positions[start:end]
            keep = (pos >= lo) & (pos < hi)
            n = int(keep.sum())
            counts, per_token = {}, {}
            if n:
                for layer in STEP.layers:
                    ids = STEP.ids[layer][start:end][keep]
                    counts[str(layer)] = torch.bincount(ids.reshape(-1), minlength=STEP.num_experts).tolist()
                    if spec.get("ids"):  # the selected tokens' expert sets too (for comparisons)
                        per_token[str(layer)] = ids.sort(dim=-1).values.tolist()
            line = {
                "class": spec.get("class"),
                "tokens": n,
                "counts": counts,
                "positions": [int(pos[0]), int(pos[-1]) + 1],
            }
            if spec.get("ids"):
                line["ids"] = per_token
            with open(Path(self.directory) / f"{spec['key']}.jsonl", "a") as fh:
                fh.write(json.dumps(line) + "\n")
        return logits


def _check_spec(spec: Any) -> None:
    if not isinstance(spec, dict) or "key" not in spec or "select" not in spec:
        raise ValueError(
            f"{REQUEST_KEY} must be {{'key': str, 'class': str, 'select': [lo, hi]}}, got {spec!r}"
        )
    key = str(spec["key"])
    if not key or "/" in key or key.startswith(".") or len(key) > 200:
        raise ValueError(f"{REQUEST_KEY} key {key!r} is not a safe file name")
    sel = spec["select"]
    if not (
        isinstance(sel, list | tuple)
        and len(sel) == 2
        and all(isinstance(x, int) for x in sel)
        and 0 <= sel[0] <= sel[1]
    ):
        raise ValueError(
            f"{REQUEST_KEY} select must be [lo, hi] token positions with 0 <= lo <= hi, got {sel!r}"
        )


# ---------------------------------------------------------------------------------------------
# Driver side


def profiling_engine(
    model: str | os.PathLike,
    *,
    tensor_parallel_size: int = 1,
    directory: str | None = None,
    max_model_len: int | None = None,
    **kwargs,
):
    """A `vllm.LLM` that records routing for `profile_vllm` (eager, no prefix caching, the processor).

    `directory` receives the per-request count files (default: a fresh temporary directory).
    Other keyword arguments go to `vllm.LLM` (e.g. dtype, max_num_seqs, hf_overrides with a steer_config).
    """
    from vllm import LLM

    directory = directory or tempfile.mkdtemp(prefix="steer-vllm-profile-")
    overrides = {**(kwargs.pop("hf_overrides", None) or {}), HF_OVERRIDE_KEY: str(directory)}
    procs = list(kwargs.pop("logits_processors", None) or [])
    if PROCESSOR not in procs:
        procs.append(PROCESSOR)
    kwargs.setdefault("dtype", "float32")
    kwargs.setdefault("seed", 0)
    return LLM(
        model=str(model),
        tensor_parallel_size=tensor_parallel_size,
        enforce_eager=True,
        enable_prefix_caching=False,
        max_model_len=max_model_len,
        hf_overrides=overrides,
        logits_processors=procs,
        **kwargs,
    )


def engine_profile_dir(llm) -> Path:
    """The count directory of an engine from `profiling_engine` (or started with the override)."""
    hf_config = llm.llm_engine.model_config.hf_config
    d = getattr(hf_config, HF_OVERRIDE_KEY, None) or os.environ.get(ENV_PROFILE_DIR)
    if not d:
        raise ValueError(
            f"this vLLM engine does not record routing: build it with steer.serving.vllm_profile."
            f"profiling_engine(...), or pass hf_overrides={{{HF_OVERRIDE_KEY!r}: DIR}} and "
            f"logits_processors=[{PROCESSOR!r}]"
        )
    return Path(d)


class VLLMCounter:
    """`steer.ftri` counting engine backed by a vLLM `LLM` (see `steer.ftri.profile_with`)."""

    def __init__(self, llm, layers: list[int], num_experts: int, prompts_per_call: int = 256):
        self.llm, self.layers, self.num_experts = llm, list(layers), num_experts
        self.directory = engine_profile_dir(llm)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.run = uuid.uuid4().hex[:10]
        self.next_key = 0
        self.prompts_per_call = prompts_per_call

    @property
    def batches_per_call(self) -> int:
        return max(1, self.prompts_per_call)

    def answer(self, tokenizer, prompts: Sequence[str], config) -> list[str]:
        """Greedy answers (as steer.prompts.generate_responses: chat template, decoded without specials)."""
        from vllm import SamplingParams

        from steer.prompts import format_prompt, uses_chat_template

        chat = config.chat_template
        ids = [
            tokenizer(
                format_prompt(tokenizer, p, chat), add_special_tokens=not uses_chat_template(tokenizer, chat)
            )["input_ids"]
            for p in prompts
        ]
        params = SamplingParams(max_tokens=config.max_new_tokens, temperature=0.0)
        outs = self.llm.generate([{"prompt_token_ids": list(i)} for i in ids], params, use_tqdm=False)
        return [tokenizer.decode(o.outputs[0].token_ids, skip_special_tokens=True).strip() for o in outs]

    def count(self, batches: list, acc, class_names: Sequence[str]) -> Iterator:
        """Send every row of `batches` at once; then, batch by batch, leave its counts in `acc` and yield it."""
        from vllm import SamplingParams

        requests, params, keys = [], [], []
        for batch in batches:
            for j in range(batch.input_ids.shape[0]):
                real = batch.attention_mask[j].bool()
                ids = batch.input_ids[j][real].tolist()
                sel = batch.selection[j][real].nonzero().flatten().tolist()
                lo, hi = (sel[0], sel[-1] + 1) if sel else (0, 0)
                if sel and hi - lo != len(sel):
                    raise ValueError(
                        "steer profiling: the selected tokens of a prompt are not one contiguous range"
                    )
                key = f"{self.run}-{self.next_key}"
                self.next_key += 1
                keys.append(key)
                requests.append({"prompt_token_ids": ids})
                spec = {"key": key, "class": class_names[int(batch.classes[j])], "select": [lo, hi]}
                params.append(SamplingParams(max_tokens=1, temperature=0.0, extra_args={REQUEST_KEY: spec}))
        self.llm.generate(requests, params, use_tqdm=False)
        slot = {layer: i for i, layer in enumerate(self.layers)}
        k = 0
        for batch in batches:
            acc.start(batch)
            for j in range(batch.input_ids.shape[0]):
                counts, tokens, cls = self._read(keys[k], slot)
                k += 1
                want = int(acc.batch_tokens[j])
                if tokens != want:
                    raise RuntimeError(
                        f"vLLM counted {tokens} selected tokens for a prompt of {want}: each routing "
                        f"decision must be counted exactly once (prefix caching on? a second "
                        f"recorder on another tensor-parallel rank?)"
                    )
                if cls != class_names[int(batch.classes[j])]:
                    raise RuntimeError(
                        f"request class came back as {cls!r}, sent as {class_names[int(batch.classes[j])]!r}"
                    )
                acc.batch_counts[j] = counts
            yield batch

    def _read(self, key: str, slot: dict[int, int]) -> tuple[torch.Tensor, int, str | None]:
        path = self.directory / f"{key}.jsonl"
        counts = torch.zeros(len(self.layers), self.num_experts, dtype=torch.float64)
        tokens, cls = 0, None
        if path.exists():
            for line in path.read_text().splitlines():
                rec = json.loads(line)
                tokens += int(rec["tokens"])
                cls = rec.get("class")
                for layer, row in rec["counts"].items():
                    counts[slot[int(layer)]] += torch.tensor(row, dtype=torch.float64)
            path.unlink()
        return counts, tokens, cls


def identity_from_checkpoint(path: str | os.PathLike, weights_hash: str | None = None) -> dict:
    """`steer.identity.model_identity` of a checkpoint without loading it all: the model is built on
    the meta device and only the tensors the identity samples (embeddings, final norm, head, routers)
    are read from its safetensors files."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    from steer.adapters import model_map
    from steer.identity import model_identity

    path = Path(path)
    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    mm = model_map(model)
    a = mm.adapter
    wanted = [a.embed, a.final_norm, a.lm_head] + [f"{a.layers}.{i}.{a.router}" for i in mm.moe_layers]
    if not mm.moe_layers:
        wanted += [f"{a.layers}.0.{a.mlp}", f"{a.layers}.{mm.n_layers - 1}.{a.mlp}"]
    names = {}
    for w in wanted:
        try:
            module = mm.module(w)
        except (AttributeError, IndexError):
            continue
        for pname, _ in module.named_parameters():
            names[f"{w}.{pname}"] = (module, pname)
    loaded: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                if key in names:
                    loaded[key] = f.get_tensor(key)
    if (
        f"{a.lm_head}.weight" in names
        and f"{a.lm_head}.weight" not in loaded
        and f"{a.embed}.weight" in loaded
    ):
        loaded[f"{a.lm_head}.weight"] = loaded[f"{a.embed}.weight"]  # tied embeddings
    missing = sorted(set(names) - set(loaded))
    if missing:
        raise ValueError(f"{path}: the checkpoint lacks {missing[:4]}; cannot compute the model identity")
    for key, (module, pname) in names.items():
        setattr(module, pname, torch.nn.Parameter(loaded[key], requires_grad=False))
    return model_identity(model, weights_hash=weights_hash)


def profile_vllm(
    llm_or_model: Any,
    classes,
    config=None,
    *,
    tokenizer=None,
    responses: Sequence[str] | None = None,
    labeller=None,
    progress=None,
    cancel=None,
    weights_hash: str | None = None,
    tensor_parallel_size: int = 1,
    prompts_per_call: int = 256,
    **engine_kwargs,
):
    """`steer.ftri.profile` through vLLM: the same `Profile`, counted from the engine's own routing.

    llm_or_model: a checkpoint directory (an engine is built with `profiling_engine`, tensor_parallel_size
      and engine_kwargs, and shut down after) or a `vllm.LLM` from `profiling_engine`.
    The other arguments are `steer.ftri.profile`'s. Answers (labeller / response tokens) are generated
    greedily by vLLM. Returns a Profile whose model identity is the checkpoint's (as the HF path's).
    """
    from steer.ftri import profile_with

    own = not hasattr(llm_or_model, "generate")
    llm = (
        profiling_engine(llm_or_model, tensor_parallel_size=tensor_parallel_size, **engine_kwargs)
        if own
        else llm_or_model
    )
    try:
        tokenizer, ident = _served_checkpoint(llm, tokenizer, weights_hash)
        counter = VLLMCounter(llm, ident["moe_layers"], ident["num_experts"], prompts_per_call)
        prof = profile_with(
            counter,
            tokenizer,
            classes,
            config,
            ident,
            responses=responses,
            labeller=labeller,
            progress=progress,
            cancel=cancel,
        )
        tp = llm.llm_engine.vllm_config.parallel_config.tensor_parallel_size
        prof.stats.update(engine="vllm", tensor_parallel_size=tp)
        return prof
    finally:
        if own:
            _close_own_engine(llm, engine_kwargs)


def _served_checkpoint(llm, tokenizer, weights_hash: str | None):
    """(tokenizer, model identity) of the checkpoint the engine serves; the tokenizer is loaded and
    prepared as steer's HF path does when none is given, the weights hashed when no hash is given."""
    from transformers import AutoTokenizer

    from steer.models import _prepare_tokenizer

    ckpt = Path(str(llm.llm_engine.model_config.model))
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(ckpt)
        _prepare_tokenizer(tokenizer)
    if weights_hash is None and ckpt.is_dir():
        from steer.models import weights_hash as _wh

        weights_hash = _wh(ckpt)
    return tokenizer, identity_from_checkpoint(ckpt, weights_hash)


def _close_own_engine(llm, engine_kwargs: dict) -> None:
    """Shut down an engine profile_vllm built, and remove the temporary directory profiling_engine made."""
    directory = engine_profile_dir(llm)
    _shutdown(llm)
    if not engine_kwargs.get("directory"):
        shutil.rmtree(directory, ignore_errors=True)


def _shutdown(llm) -> None:
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:  # noqa: BLE001 - best effort; the process exit cleans up the rest
        pass
