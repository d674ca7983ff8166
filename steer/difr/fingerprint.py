"""Provider side of Activation-DiFR: record f = h P for every generated token while generating.

h is the final post-norm hidden state (the input of lm_head), one vector per generated token: the
vector whose logits produced that token (the last prompt position for the first token, then each
decode step). The last generated token is never fed back, so N generated tokens give N vectors.
Prompt positions are not fingerprinted (as in the paper); the prompt ids travel in the file so the
verifier can teacher-force the same sequence.

P (D x k) comes from a public seed; f is computed in fp32 and stored as fp16 in a steer.io file
whose metadata names the model, seed, k, projection kind, dtype and the model's identity
(steer.identity; files of format version 1 carry only a config hash, scheme "steer.difr/1").
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from steer import options
from steer.batching import left_pad
from steer.identity import LEGACY_DIFR, model_identity
from steer.io import FINGERPRINTS, FormatError, load_tensors, save_tensors
from steer.kernels._triton import backend_for
from steer.kernels.fingerprint import fingerprint as _kernel_fingerprint
from steer.kernels.fingerprint import projection_matrix as _kernel_projection_matrix

PROJECTIONS = options.PROJECTIONS


@dataclass
class DiFRConfig:
    """Activation-DiFR parameters (names as in the paper; defaults as its plots)."""

    k: int = 8  # fingerprint width; the paper sweeps 2..128, plots default 8
    seed: int = 0  # public seed of the projection P, shared by provider and verifier
    projection: str = "gaussian"  # "gaussian" (N(0,1)/sqrt(k), as the released code) or "orthonormal" (QR)

    def __post_init__(self):
        if not 1 <= int(self.k) <= 4096:
            raise ValueError(f"k must be between 1 and 4096 (the paper uses 2..128), got {self.k}")
        if self.projection not in PROJECTIONS:
            raise ValueError(f"projection must be one of {PROJECTIONS}, got {self.projection!r}")


# ---------------------------------------------------------------------------------------------
# Projection and fingerprint: steer.kernels.fingerprint (fused Triton on GPU, torch on CPU)


def projection_matrix(config: DiFRConfig, d: int) -> Tensor:
    """The public projection P (fp32, [d, k]) for `config`."""
    return _kernel_projection_matrix(int(config.seed), int(d), int(config.k), kind=config.projection)


def project(h: Tensor, p: Tensor) -> Tensor:
    """Fingerprints fp16 [T, k] of hidden states h [T, D] (fp32 accumulation)."""
    return _kernel_fingerprint(h.reshape(-1, h.shape[-1]), p)


# ---------------------------------------------------------------------------------------------
# Identity of the model a fingerprint claims


def intervention_digest(path: str | Path) -> str:
    """Short digest of an intervention config (its config.json and tensors): what a claim names."""
    path = Path(path)
    root = path if path.is_dir() else path.parent
    files = [root / "config.json", root / "config.safetensors"]
    if not files[0].is_file():
        raise FileNotFoundError(f"no intervention config at {path} (expected a directory with config.json)")
    h = hashlib.sha256()
    for f in files:
        if f.is_file():
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def default_model_id(model: nn.Module) -> str:
    return getattr(model.config, "_steer_model_id", None) or model.config.model_type


def _dtype_name(model: nn.Module) -> str:
    return str(next(model.parameters()).dtype).removeprefix("torch.")


# ---------------------------------------------------------------------------------------------
# The result value


@dataclass
class Fingerprints:
    """Per-token fingerprints of a batch of generations plus the claim (prompt + output ids).

    `values` holds every sequence's generated tokens concatenated (row i of `values` belongs to
    output token i of the concatenation of `output_ids`); `*_lengths` split them per sequence.
    `sampling` is set when steer itself sampled (Token-DiFR can then re-derive the noise).
    """

    values: Tensor  # Float16[N, k]
    prompt_ids: Tensor  # Int64[sum prompt lengths]
    prompt_lengths: Tensor  # Int64[B]
    output_ids: Tensor  # Int64[N]
    output_lengths: Tensor  # Int64[B]
    model_id: str
    identity: dict  # steer.identity of the claimed model (steer.identity.model_identity(..., any_family=True))
    config: DiFRConfig = field(default_factory=DiFRConfig)
    dtype: str = "float32"  # the provider's model dtype
    sampling: dict | None = None  # SamplingParams as a dict, None for greedy
    sample_seeds: Tensor | None = None  # Int64[B], the per-sequence sampling seeds
    hidden: Tensor | None = field(default=None, repr=False)  # fp32 [N, D]; experiments only, never saved
    intervention: str | None = None  # digest of the intervention config applied (verifiable steering)

    def __post_init__(self):
        self.check()

    def __setstate__(self, state: dict) -> None:
        """Unpickle; objects pickled before claims carried an identity (experiments' raw caches) held a bare
        DiFR config hash: it reads as that legacy scheme, as saved fingerprint files of format 1 do."""
        if "identity" not in state and "config_hash" in state:
            state = {**state, "identity": {"scheme": LEGACY_DIFR, "config_hash": state["config_hash"]}}
            del state["config_hash"]
        self.__dict__.update(state)

    @property
    def n_sequences(self) -> int:
        return int(self.output_lengths.numel())

    @property
    def config_hash(self) -> str:
        """The claimed model's config hash (in the identity's scheme)."""
        return str(self.identity.get("config_hash"))

    @property
    def n_tokens(self) -> int:
        return int(self.values.shape[0])

    @property
    def bytes_per_token(self) -> int:
        return int(self.values.shape[1]) * self.values.element_size()

    def check(self) -> None:
        """Raise ValueError if the parts disagree (token counts, widths, dtypes)."""
        n_out, n_prompt = int(self.output_lengths.sum()), int(self.prompt_lengths.sum())
        if self.values.dim() != 2 or self.values.shape[1] != self.config.k:
            raise ValueError(f"fingerprint values have shape {tuple(self.values.shape)} but k={self.config.k}")
        if self.values.shape[0] != n_out or self.output_ids.numel() != n_out:
            raise ValueError(
                f"token counts disagree: {self.values.shape[0]} fingerprints, {self.output_ids.numel()} "
                f"output ids, output lengths sum to {n_out}; the file is inconsistent (re-run `steer fingerprint`)"
            )
        if self.prompt_ids.numel() != n_prompt or self.prompt_lengths.numel() != self.output_lengths.numel():
            raise ValueError("prompt ids and prompt lengths disagree; the file is inconsistent")
        if (self.prompt_lengths < 1).any():
            raise ValueError("every sequence needs a non-empty prompt")
        if self.sample_seeds is not None and self.sample_seeds.numel() != self.n_sequences:
            raise ValueError("one sampling seed per sequence is required")

    def sequences(self) -> list[tuple[Tensor, Tensor]]:
        """(prompt ids, output ids) per sequence."""
        prompts = torch.split(self.prompt_ids, self.prompt_lengths.tolist())
        outputs = torch.split(self.output_ids, self.output_lengths.tolist())
        return list(zip(prompts, outputs))

    def with_config(self, values: Tensor, config: DiFRConfig) -> Fingerprints:
        """The same claim with other fingerprint values (e.g. another k from the kept hidden states)."""
        return Fingerprints(values, self.prompt_ids, self.prompt_lengths, self.output_ids, self.output_lengths,
                            self.model_id, self.identity, config, self.dtype, self.sampling, self.sample_seeds,
                            intervention=self.intervention)

    def reproject(self, config: DiFRConfig) -> Fingerprints:
        """Fingerprints for another k/seed from the kept hidden states (experiments record them once)."""
        if self.hidden is None:
            raise ValueError("reproject needs the hidden states: record with keep_hidden=True")
        return self.with_config(project(self.hidden, projection_matrix(config, self.hidden.shape[1])), config)

    # -- files ----------------------------------------------------------------------------------

    def _tensors(self) -> dict[str, Tensor]:
        t = {
            "values": self.values.to(torch.float16).contiguous(),
            "prompt_ids": self.prompt_ids.to(torch.int64).contiguous(),
            "prompt_lengths": self.prompt_lengths.to(torch.int64).contiguous(),
            "output_ids": self.output_ids.to(torch.int64).contiguous(),
            "output_lengths": self.output_lengths.to(torch.int64).contiguous(),
        }
        if self.sample_seeds is not None:
            t["sample_seeds"] = self.sample_seeds.to(torch.int64).contiguous()
        return t

    def to_safetensors(self, path: str | Path) -> Path:
        meta = {"model_id": self.model_id, "seed": self.config.seed, "k": self.config.k,
                "projection": self.config.projection, "dtype": self.dtype, "fingerprint_dtype": "float16",
                "sampling": self.sampling, "intervention": self.intervention}
        return save_tensors(path, FINGERPRINTS, self._tensors(), meta, identity=self.identity)

    @classmethod
    def from_safetensors(cls, path: str | Path) -> Fingerprints:
        stored = load_tensors(path, FINGERPRINTS)
        meta, t = stored.meta, stored.tensors
        try:
            identity = stored.identity
            if stored.version == 1:  # header strings; the config hash of DiFR's own rule
                identity = {"scheme": LEGACY_DIFR, "config_hash": meta["config_hash"]}
                meta = {**meta, "sampling": json.loads(meta["sampling"])}
            config = DiFRConfig(k=int(meta["k"]), seed=int(meta["seed"]), projection=meta["projection"])
            return cls(
                t["values"], t["prompt_ids"], t["prompt_lengths"], t["output_ids"], t["output_lengths"],
                meta["model_id"], identity, config, meta["dtype"], meta["sampling"], t.get("sample_seeds"),
                intervention=meta["intervention"] or None,
            )
        except KeyError as exc:
            raise FormatError(f"{path}: fingerprint file lacks {exc}; it was not written by `steer fingerprint`") from None
        except ValueError as exc:
            raise FormatError(f"{path}: invalid fingerprint file: {exc}") from None

    save = to_safetensors
    load = from_safetensors

    @classmethod
    def concat(cls, parts: list[Fingerprints]) -> Fingerprints:
        """One claim from several batches (same model, config and sampling)."""
        if not parts:
            raise ValueError("nothing to concatenate")
        a = parts[0]
        for b in parts[1:]:
            if (b.model_id, b.identity, b.config, b.dtype, b.sampling, b.intervention) != (
                    a.model_id, a.identity, a.config, a.dtype, a.sampling, a.intervention):
                raise ValueError("cannot concatenate fingerprints of different models/configs/sampling")
        cat = lambda name: torch.cat([getattr(p, name) for p in parts])
        seeds = cat("sample_seeds") if a.sample_seeds is not None else None
        out = cls(cat("values"), cat("prompt_ids"), cat("prompt_lengths"), cat("output_ids"), cat("output_lengths"),
                  a.model_id, a.identity, a.config, a.dtype, a.sampling, seeds, intervention=a.intervention)
        if all(p.hidden is not None for p in parts):
            out.hidden = cat("hidden")
        return out

    def to_dataframe(self):
        import pandas as pd

        seq = torch.repeat_interleave(torch.arange(self.n_sequences), self.output_lengths)
        pos = torch.cat([torch.arange(int(n)) for n in self.output_lengths]) if self.n_tokens else seq
        df = pd.DataFrame({"sequence": seq.numpy(), "position": pos.numpy(), "token_id": self.output_ids.numpy()})
        for j in range(self.config.k):
            df[f"f{j}"] = self.values[:, j].float().numpy()
        return df


# ---------------------------------------------------------------------------------------------
# Capture: the lm_head input during generation


@contextmanager
def _on_lm_head_input(model: nn.Module, fn: Callable[[Tensor, Tensor | None], None]):
    """Call fn(hidden [B, T, D], token_mask) on each final post-norm state (the lm_head input)."""
    from steer.hooks import attach

    with attach(model, {"final_norm.out": lambda value, ctx: fn(value, ctx.token_mask)}):
        yield


class FingerprintRecorder:
    """Records the fingerprint of every generated position during `model.generate` (one call).

    Each forward call contributes the last position of every row: the prompt's last token on the
    prefill call, then the single new token of each decode step (generation must left-pad).

    The per-token work stays on the model's device and never waits for it: P is copied there once,
    the left-padding check accumulates on the device and is read once on exit, and the fp16 rows
    are only stacked (and moved to the host) after generation.
    """

    def __init__(self, model: nn.Module, config: DiFRConfig, keep_hidden: bool = False):
        self.model, self.config, self.keep_hidden = model, config, keep_hidden
        self.p = projection_matrix(config, model.config.hidden_size)
        self._p_on: dict[torch.device, tuple[Tensor, str]] = {}  # (P, kernel backend) per device
        self._last_real: Tensor | None = None  # Bool on the device: every row's last position was real
        self.steps: list[Tensor] = []  # fp16 [B, k] per forward call
        self.hidden: list[Tensor] = []  # fp32 [B, D] per forward call, if keep_hidden

    def _record(self, h: Tensor, token_mask: Tensor | None) -> None:
        last = h[:, -1, :].detach()
        if token_mask is not None:
            real = token_mask[:, -1].all()
            self._last_real = real if self._last_real is None else self._last_real & real
        on = self._p_on.get(last.device)
        if on is None:  # once per device: P there, and which kernel path its tensors take
            on = self._p_on[last.device] = (self.p.to(last.device), backend_for(last))
        self.steps.append(_kernel_fingerprint(last, on[0], backend=on[1]))
        if self.keep_hidden:
            self.hidden.append(last.float().cpu())

    def check_padding(self) -> None:
        """Raise if any recorded call had a padded last position (right padding: wrong positions)."""
        if self._last_real is not None and not bool(self._last_real):
            raise ValueError("fingerprinting needs left padding (the last position of every row must be a "
                             "real token); set tokenizer.padding_side = 'left'")

    def __enter__(self):
        self._cm = _on_lm_head_input(self.model, self._record)
        self._cm.__enter__()
        return self

    def __exit__(self, *exc):
        suppress = self._cm.__exit__(*exc)
        if exc[0] is None:
            self.check_padding()
        return suppress


# ---------------------------------------------------------------------------------------------
# Generation with fingerprints


def output_lengths(sequences: Tensor, eos_token_id: int | list[int] | None) -> Tensor:
    """Length of each generated row up to and including its first EOS (the rest is padding)."""
    b, n = sequences.shape
    lengths = torch.full((b,), n, dtype=torch.int64)
    if eos_token_id is None:
        return lengths
    eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
    hit = torch.isin(sequences.cpu(), eos)
    for i in range(b):
        idx = hit[i].nonzero()
        if idx.numel():
            lengths[i] = int(idx[0]) + 1
    return lengths


@torch.no_grad()
def generate(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    config: DiFRConfig | None = None,
    sampling=None,
    sample_seeds: Tensor | list[int] | None = None,
    max_new_tokens: int = 64,
    model_id: str | None = None,
    keep_hidden: bool = False,
    logits_processor=None,
    intervention: str | None = None,
    **generate_kwargs,
) -> Fingerprints:
    """Generate from a left-padded batch and fingerprint every generated token.

    `sampling` (a `SamplingParams`) makes steer sample with a shared seed (Gumbel-max), so the
    verifier can also run Token-DiFR; None decodes greedily. `logits_processor` replaces steer's
    sampler (experiments use it to simulate a buggy sampler while claiming `sampling`).
    """
    config = config or DiFRConfig()
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if not bool(attention_mask[:, -1].all()):
        raise ValueError("generation batches must be left-padded (tokenizer.padding_side = 'left')")
    seeds, processor = _sampler(sampling, sample_seeds, input_ids, logits_processor)
    eos, pad = _eos_and_pad(model, generate_kwargs)
    with FingerprintRecorder(model, config, keep_hidden=keep_hidden) as rec:
        gen = _decode(model, input_ids, attention_mask, max_new_tokens, processor, eos, pad, generate_kwargs)
    if len(rec.steps) != gen.shape[1]:
        raise RuntimeError(f"recorded {len(rec.steps)} forward calls for {gen.shape[1]} generated tokens; "
                           "was generation run with a non-standard decoding loop?")
    lengths = output_lengths(gen, eos)
    keep = torch.arange(gen.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)
    mask = attention_mask.bool().cpu()
    fp = Fingerprints(
        values=torch.stack(rec.steps, dim=1).cpu()[keep],  # [B, N, k] -> the generated tokens' rows
        prompt_ids=input_ids.cpu()[mask],
        prompt_lengths=mask.sum(1).to(torch.int64),
        output_ids=gen[keep].to(torch.int64),
        output_lengths=lengths,
        model_id=model_id or default_model_id(model),
        identity=model_identity(model, any_family=True),
        config=config,
        dtype=_dtype_name(model),
        sampling=sampling.to_dict() if sampling is not None else None,
        sample_seeds=seeds,
        intervention=intervention,
    )
    if keep_hidden:
        fp.hidden = torch.stack(rec.hidden, dim=1)[keep]
    return fp


def _decode(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, max_new_tokens: int, processor, eos, pad,
            generate_kwargs: dict) -> Tensor:
    """Greedy decoding (sampling, when wanted, is the processor's Gumbel-max): the generated ids, on the CPU."""
    from transformers import LogitsProcessorList

    device = next(model.parameters()).device
    out = model.generate(
        input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), max_new_tokens=max_new_tokens,
        do_sample=False, num_beams=1, temperature=None, top_p=None, top_k=None, repetition_penalty=None,
        logits_processor=LogitsProcessorList([processor]) if processor is not None else None,
        eos_token_id=eos, pad_token_id=pad, **generate_kwargs,
    )
    return out[:, input_ids.shape[1]:].cpu()


def _sampler(sampling, sample_seeds, input_ids: Tensor, logits_processor):
    """(per-row sampling seeds or None, the logits processor generation runs with or None)."""
    from steer.difr.sampling import GumbelSampler

    if sampling is None:
        return None, logits_processor
    b = input_ids.shape[0]
    seeds = torch.as_tensor(sample_seeds if sample_seeds is not None else range(b), dtype=torch.int64)
    if seeds.numel() != b:
        raise ValueError(f"need one sampling seed per row: {seeds.numel()} seeds for {b} rows")
    return seeds, logits_processor or GumbelSampler(sampling, seeds, prompt_length=input_ids.shape[1])


def _eos_and_pad(model: nn.Module, generate_kwargs: dict):
    """The eos and pad token ids generation uses (taken out of generate_kwargs when given there)."""
    eos = generate_kwargs.pop("eos_token_id", getattr(model.generation_config, "eos_token_id", None))
    pad = generate_kwargs.pop("pad_token_id", getattr(model.generation_config, "pad_token_id", None))
    if pad is None:
        pad = eos if isinstance(eos, int) else (eos[0] if eos else 0)
    return eos, pad


def encode_prompts(tokenizer, prompts: list[str], chat: bool = True) -> list[list[int]]:
    """Token ids of each prompt, through the chat template when the tokenizer has one and chat=True."""
    if chat and getattr(tokenizer, "chat_template", None):
        out = []
        for p in prompts:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                tokenize=True)
            out.append(list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids))
        return out
    return [tokenizer(p)["input_ids"] for p in prompts]


def fingerprint_prompts(
    model: nn.Module,
    tokenizer,
    prompts: list[str] | list[list[int]],
    *,
    config: DiFRConfig | None = None,
    sampling=None,
    seed: int = 0,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    chat: bool = True,
    model_id: str | None = None,
    keep_hidden: bool = False,
    sampler_factory=None,
    intervention: str | None = None,
) -> Fingerprints:
    """Fingerprinted generations for a list of prompts (text, or token ids), in left-padded batches.

    Sequence i samples with seed `seed * 1_000_003 + i` (stored in the file), so results do not
    depend on `batch_size`. `sampler_factory(sampling, seeds, prompt_length)` swaps the sampler
    (experiments use it to simulate a wrong or buggy sampler while claiming `sampling`).
    """
    if not prompts:
        raise ValueError("no prompts given")
    rows = [list(p) for p in prompts] if not isinstance(prompts[0], str) else encode_prompts(tokenizer, prompts, chat)
    if any(len(r) == 0 for r in rows):
        raise ValueError("empty prompt: every prompt needs at least one token")
    pad = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else 0
    parts = []
    for start in range(0, len(rows), batch_size):
        ids, mask = left_pad(rows[start:start + batch_size], pad)
        seeds = torch.arange(start, start + ids.shape[0], dtype=torch.int64) + int(seed) * 1_000_003
        proc = sampler_factory(sampling, seeds, ids.shape[1]) if sampler_factory and sampling is not None else None
        parts.append(generate(model, ids, mask, config=config, sampling=sampling, sample_seeds=seeds,
                              max_new_tokens=max_new_tokens, model_id=model_id, keep_hidden=keep_hidden,
                              logits_processor=proc, pad_token_id=pad, intervention=intervention))
    return Fingerprints.concat(parts)
