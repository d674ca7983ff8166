"""fTRI expert profiling (MoTE, arXiv 2502.11096; SteerMoE, arXiv 2509.09660; RICE, arXiv 2505.14681).

Which routed experts does a behaviour use? Run prompts of two or more classes through the model,
count per (MoE layer, expert) how many tokens the router sent there, and score each expert by how
much more the target class uses it than the rest. Steps, as functions:

1. `prompt_batches`   tokenise prompts (optionally + teacher-forced responses), left-padded, with the
                      token selection (prompt / response / both) as a Bool mask.
2. `ProfileAccumulator.update` one forward per batch; a hook on `blocks.*.mlp.router.indices` reads
                      the indices the router *produced* (group limits and correction bias included:
                      nothing is re-derived) and folds per-prompt counts into per-class sums.
3. `scores`           `mote` (mean map difference), `risk_diff` (SteerMoE), `npmi` (RICE).
4. `Profile.top`      global or per-layer ranking, with bootstrap CIs over prompts.

`expert_tokens` (and `Profile.expert_tokens`) then answers "which tokens went to this expert?":
every token the router sent to one (layer, expert), with its slot, weight and surrounding text.

Memory never grows with the number of prompts: only per-class sums [C, L, E] and the bootstrap sums
[R, C, L, E] are kept. CIs use the Poisson bootstrap (Hanley & MacGibbon 2006; Chamandy et al. 2012):
each prompt gets R independent Poisson(1) weights, drawn when it is seen, and replicate r accumulates
the weighted sums. A Poisson(1) weight approximates how often the prompt would be drawn in a
multinomial resample of N prompts, without knowing N in advance or storing any per-prompt map.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import torch

from steer.adapters import family_list, model_map
from steer.batching import left_pad
from steer.hooks import HookContext, attach, unwrap_model
from steer.identity import check_model, model_identity
from steer.io import PROFILE, load_tensors, save_tensors
from steer.options import PROFILE_SCORES, PROFILE_TOKENS
from steer.progress import Progress, Steps
from steer.prompts import (
    EmptyPromptSetError,
    PromptSet,
    format_prompt,
    generate_responses,
    get_labeller,
    uses_chat_template,
)

Tokens = Literal["prompt", "response", "both"]
Score = Literal["mote", "risk_diff", "npmi"]
SCORES = PROFILE_SCORES


class DenseModelError(ValueError):
    """Expert profiling or switching asked of a model without routed experts."""


class ProfileCancelled(RuntimeError):
    """`profile` was cancelled before every class had a counted prompt: there is nothing to score yet."""

    def __init__(self, message: str, done: int, total: int):
        super().__init__(message)
        self.done, self.total = done, total


CancelFlag = Callable[[], bool]  # or anything with .is_set() (threading.Event)


@dataclass
class ProfileConfig:
    """Profiling parameters (defaults: MoTE's prompt-token counting and mean difference)."""

    tokens: Tokens = "prompt"  # which tokens count: prompt (MoTE), response (SteerMoE), both
    score: Score = "mote"  # ranking score; the others can be recomputed with Profile.rescore
    target: str | None = None  # the behaviour class (default: the first class)
    normalize: bool = True  # mote: per-prompt counts / the prompt's token count (a routing fraction)
    n_bootstrap: int = 200  # Poisson bootstrap replicates over prompts (0: no CIs)
    ci: float = 0.95  # CI level (percentile bootstrap)
    batch_size: int = 8
    chat_template: bool | None = None  # wrap prompts in the tokenizer's chat template (None: if it has one)
    max_length: int = 512  # tokens per sequence (longer prompts are cut from the left)
    max_new_tokens: int = 48  # response generation (labelling / response tokens)
    count_template_prefix: bool = False  # count the chat template's shared prefix (system turn): it is the
    # same text before every prompt, so it only dilutes the per-prompt fractions
    seed: int = 0  # bootstrap weights

    def validate(self) -> None:
        if self.tokens not in PROFILE_TOKENS:
            raise ValueError(f"tokens must be one of {', '.join(PROFILE_TOKENS)}, got {self.tokens!r}")
        if self.score not in SCORES:
            raise ValueError(f"score must be one of {', '.join(SCORES)}, got {self.score!r}")
        if self.n_bootstrap < 0 or self.batch_size < 1 or self.max_length < 2:
            raise ValueError("n_bootstrap must be >= 0, batch_size >= 1 and max_length >= 2")
        if not 0 < self.ci < 1:
            raise ValueError(f"ci must be in (0, 1), got {self.ci}")


# ---- step 1: batches ---------------------------------------------------------------------------

@dataclass
class Batch:
    input_ids: torch.Tensor  # Long[B, T], left padded
    attention_mask: torch.Tensor  # Long[B, T]
    selection: torch.Tensor  # Bool[B, T]: tokens that count
    classes: torch.Tensor  # Long[B]


def prompt_batches(tokenizer, prompts: Sequence[str], classes: Sequence[int], config: ProfileConfig,
                   responses: Sequence[str] | None = None):
    """Yield left-padded batches; with responses, prompt + response ids with the chosen selection."""
    chat = config.chat_template
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    prefix: list[int] = []
    if uses_chat_template(tokenizer, chat) and not config.count_template_prefix:
        prefix = list(tokenizer(format_prompt(tokenizer, "", chat), add_special_tokens=False)["input_ids"])
    for start in range(0, len(prompts), config.batch_size):
        rows, sels = [], []
        for i in range(start, min(start + config.batch_size, len(prompts))):
            text = format_prompt(tokenizer, prompts[i], chat)
            p_ids = tokenizer(text, add_special_tokens=not uses_chat_template(tokenizer, chat))["input_ids"]
            r_ids = []
            if responses is not None:
                r_ids = tokenizer(responses[i], add_special_tokens=False)["input_ids"]
            ids = (list(p_ids) + list(r_ids))[-config.max_length:]
            n_resp = min(len(r_ids), len(ids))
            n_prompt = len(ids) - n_resp
            if config.tokens == "prompt":
                sel = [True] * n_prompt + [False] * n_resp
            elif config.tokens == "response":
                sel = [False] * n_prompt + [True] * n_resp
            else:
                sel = [True] * len(ids)
            if prefix and config.tokens != "response" and len(ids) == len(p_ids) + len(r_ids):
                shared = 0
                while shared < min(len(prefix), n_prompt) and ids[shared] == prefix[shared]:
                    shared += 1
                sel[:shared] = [False] * shared
            rows.append(ids)
            sels.append(sel)
        ids_t, mask = left_pad(rows, pad_id)
        sel_t = left_pad([[int(x) for x in s] for s in sels], 0)[0].bool()
        yield Batch(ids_t, mask, sel_t, torch.tensor(list(classes[start:start + len(rows)]), dtype=torch.long))


# ---- step 2: streaming accumulation -------------------------------------------------------------

class ProfileAccumulator:
    """Per-class sums over prompts, plus Poisson-bootstrap replicate sums; memory O(R x C x L x E).

    The router hook writes the current batch's per-row counts into `batch_counts` [B, L, E]; `fold`
    adds the batch to the class sums after the forward. Per class c:
      n[c]            prompts (with >= 1 selected token)
      frac[c, l, e]   sum over prompts of count / tokens   (the normalised per-prompt map)
      count[c, l, e]  sum of counts                         (pooled activations, a in SteerMoE)
      tokens[c]       selected tokens                       (a + d in SteerMoE)
    """

    def __init__(self, n_classes: int, layers: list[int], num_experts: int, n_bootstrap: int = 0, seed: int = 0):
        self.C, self.layers, self.E, self.R = n_classes, list(layers), num_experts, n_bootstrap
        self.slot = {layer: i for i, layer in enumerate(self.layers)}
        L = len(self.layers)
        dd = torch.float64
        self.n = torch.zeros(n_classes, dtype=dd)
        self.frac = torch.zeros(n_classes, L, num_experts, dtype=dd)
        self.count = torch.zeros(n_classes, L, num_experts, dtype=dd)
        self.tokens = torch.zeros(n_classes, dtype=dd)
        self.boot = {
            "n": torch.zeros(n_bootstrap, n_classes, dtype=dd),
            "frac": torch.zeros(n_bootstrap, n_classes, L, num_experts, dtype=dd),
            "count": torch.zeros(n_bootstrap, n_classes, L, num_experts, dtype=dd),
            "tokens": torch.zeros(n_bootstrap, n_classes, dtype=dd),
        }
        self.gen = torch.Generator().manual_seed(seed)
        self.batch_counts: torch.Tensor | None = None
        self.batch_tokens: torch.Tensor | None = None
        self.skipped_prompts = 0

    def hook(self, indices: torch.Tensor, ctx: HookContext):
        """Router-indices hook: per-row expert counts of the selected real tokens in this call."""
        b, t = ctx.batch_shape
        if self.batch_counts is None or self.batch_counts.shape[0] != b:
            self.batch_counts = torch.zeros(b, len(self.layers), self.E, dtype=torch.float64)
        idx = indices.detach().reshape(b * t, -1)
        mask = ctx.flat_token_mask
        rows = torch.arange(b, device=idx.device).repeat_interleave(t)
        if mask is not None:
            keep = mask.to(idx.device)
            idx, rows = idx[keep], rows[keep]
        flat = (rows.unsqueeze(1) * self.E + idx).reshape(-1)
        counts = torch.bincount(flat.cpu(), minlength=b * self.E)[: b * self.E].view(b, self.E)
        self.batch_counts[:, self.slot[ctx.layer]] += counts.double()
        return None

    def start(self, batch: Batch) -> None:
        self.batch_counts = torch.zeros(batch.input_ids.shape[0], len(self.layers), self.E, dtype=torch.float64)
        self.batch_tokens = (batch.selection & batch.attention_mask.bool()).sum(1).double()

    def fold(self, classes: torch.Tensor) -> None:
        """Add the batch's per-prompt counts to the class sums (and to every bootstrap replicate)."""
        counts, toks = self.batch_counts, self.batch_tokens
        has = toks > 0
        self.skipped_prompts += int((~has).sum())
        counts, toks, classes = counts[has], toks[has], classes[has]
        if not len(toks):
            return
        frac = counts / toks[:, None, None]
        onehot = torch.nn.functional.one_hot(classes, self.C).double()  # [B, C]
        self.n += onehot.sum(0)
        self.tokens += onehot.T @ toks
        self.frac += torch.einsum("bc,ble->cle", onehot, frac)
        self.count += torch.einsum("bc,ble->cle", onehot, counts)
        if self.R:
            w = torch.poisson(torch.ones(self.R, len(toks), dtype=torch.float64), generator=self.gen)  # [R, B]
            wc = w[:, :, None] * onehot[None]  # [R, B, C]
            self.boot["n"] += wc.sum(1)
            self.boot["tokens"] += torch.einsum("rbc,b->rc", wc, toks)
            self.boot["frac"] += torch.einsum("rbc,ble->rcle", wc, frac)
            self.boot["count"] += torch.einsum("rbc,ble->rcle", wc, counts)

    def nbytes(self) -> int:
        ts = [self.n, self.frac, self.count, self.tokens, *self.boot.values()]
        return sum(t.numel() * t.element_size() for t in ts)


# ---- step 3: scores ------------------------------------------------------------------------------

def scores(sums: Mapping[str, torch.Tensor], method: Score, target: int, normalize: bool = True) -> torch.Tensor:
    """Score [.., L, E] from class sums (n [.., C], frac/count [.., C, L, E], tokens [.., C])."""
    n, tok = sums["n"], sums["tokens"]
    cdim = n.dim() - 1  # class dim in n/tokens; in maps it is the same position
    nt, nr = n.select(cdim, target), n.sum(cdim) - n.select(cdim, target)
    tt, tr = tok.select(cdim, target), tok.sum(cdim) - tok.select(cdim, target)
    if method == "mote":
        maps = sums["frac"] if normalize else sums["count"]
        mt = maps.select(cdim, target)
        mr = maps.sum(cdim) - mt
        return mt / _safe(nt)[..., None, None] - mr / _safe(nr)[..., None, None]
    at = sums["count"].select(cdim, target)
    ar = sums["count"].sum(cdim) - at
    if method == "risk_diff":
        return at / _safe(tt)[..., None, None] - ar / _safe(tr)[..., None, None]
    if method == "npmi":
        total = _safe(tt + tr)[..., None, None]
        p_ec = at / total
        p_e = (at + ar) / total
        p_c = tt[..., None, None] / total
        pmi = torch.log(p_ec / (p_e * p_c))
        denom = -torch.log(p_ec)
        out = pmi / denom
        out = torch.where(p_ec <= 0, torch.full_like(out, -1.0), out)
        return torch.where(p_ec >= 1, torch.ones_like(out), out).nan_to_num(0.0)
    raise ValueError(f"unknown score {method!r}; use one of {', '.join(SCORES)}")


def _safe(x: torch.Tensor) -> torch.Tensor:
    return x.clamp_min(1e-12)


# ---- step 4: the result --------------------------------------------------------------------------

@dataclass
class ExpertScore:
    rank: int
    layer: int
    expert: int
    score: float
    ci_low: float | None
    ci_high: float | None


@dataclass
class Profile:
    """Expert scores [L_moe, E] for one target class vs the rest, with everything to recompute them."""

    scores: torch.Tensor  # Float[L, E] under `config.score`
    ci_low: torch.Tensor | None  # Float[L, E]
    ci_high: torch.Tensor | None
    sums: dict[str, torch.Tensor]  # n [C], frac/count [C, L, E], tokens [C]
    boot: dict[str, torch.Tensor] | None  # same with a leading replicate dim R
    classes: list[str]
    layers: list[int]  # MoE layer index of each row
    model: dict  # steer.identity.model_identity
    config: ProfileConfig = field(default_factory=ProfileConfig)
    stats: dict = field(default_factory=dict)  # run facts: prompts, tokens, seconds, memory

    @property
    def target(self) -> str:
        return self.config.target or self.classes[0]

    @property
    def num_experts(self) -> int:
        return int(self.scores.shape[1])

    @property
    def cancelled(self) -> bool:
        """True for a partial profile (the run was cancelled; stats say how many prompts were counted)."""
        return bool(self.stats.get("cancelled", False))

    def expert_tokens(self, model: Any, tokenizer, prompts: str | Sequence[str], layer: int, expert: int,
                      **kw):
        """`expert_tokens` with this profile's token settings, on the model it was made on (checked)."""
        self.check_model(model)
        if layer not in self.layers:
            raise ValueError(f"layer {layer} is not an MoE layer of this profile; its layers are {self.layers}")
        return expert_tokens(model, tokenizer, prompts, layer, expert, self.config, **kw)

    def class_maps(self) -> torch.Tensor:
        """Mean per-prompt map per class, Float[C, L, E] (fractions if normalised, else counts)."""
        maps = self.sums["frac"] if self.config.normalize else self.sums["count"]
        return (maps / _safe(self.sums["n"])[:, None, None]).float()

    def rescore(self, method: Score | None = None, target: str | None = None, normalize: bool | None = None) -> Profile:
        """The same profile under another score/target (no model run: the sums are kept)."""
        cfg = ProfileConfig(**{**asdict(self.config), **{k: v for k, v in
                               dict(score=method, target=target, normalize=normalize).items() if v is not None}})
        cfg.validate()
        if cfg.target is not None and cfg.target not in self.classes:
            raise ValueError(f"target class {cfg.target!r} is not one of {self.classes}")
        return _finish(self.sums, self.boot, self.classes, self.layers, self.model, cfg, dict(self.stats))

    def top(self, k: int = 10, per_layer: bool = False) -> list[ExpertScore]:
        """The k highest-scoring (layer, expert) pairs overall, or the k best in each layer."""
        L, E = self.scores.shape
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        flat = self.scores.reshape(-1)
        if per_layer:
            order = []
            for li in range(L):
                row = torch.argsort(self.scores[li], descending=True, stable=True)[: min(k, E)]
                order += [li * E + int(e) for e in row]
        else:
            order = torch.argsort(flat, descending=True, stable=True)[: min(k, L * E)].tolist()
        out = []
        for rank, pos in enumerate(order, 1):
            li, e = divmod(int(pos), E)
            lo = float(self.ci_low[li, e]) if self.ci_low is not None else None
            hi = float(self.ci_high[li, e]) if self.ci_high is not None else None
            out.append(ExpertScore(rank, self.layers[li], e, float(flat[pos]), lo, hi))
        return out

    def to_dataframe(self):
        import pandas as pd

        maps = self.class_maps()
        L, E = self.scores.shape
        ranks = torch.empty(L * E, dtype=torch.long)
        ranks[torch.argsort(self.scores.reshape(-1), descending=True, stable=True)] = torch.arange(1, L * E + 1)
        rows = []
        for li in range(L):
            for e in range(E):
                r = {"layer": self.layers[li], "expert": e, "score": float(self.scores[li, e]),
                     "rank": int(ranks[li * E + e])}
                if self.ci_low is not None:
                    r["ci_low"], r["ci_high"] = float(self.ci_low[li, e]), float(self.ci_high[li, e])
                for c, name in enumerate(self.classes):
                    r[f"mean_{name}"] = float(maps[c, li, e])
                rows.append(r)
        return pd.DataFrame(rows)

    def figure(self):
        """Plotly heatmap: MoE layer (rows) x expert (columns), colour = score."""
        import plotly.graph_objects as go

        z = self.scores.float().numpy()
        lim = float(abs(z).max()) or 1.0
        fig = go.Figure(go.Heatmap(
            z=z, x=list(range(self.num_experts)), y=[str(i) for i in self.layers], colorscale="RdBu_r",
            zmin=-lim, zmax=lim, colorbar=dict(title=self.config.score),
            hovertemplate="layer %{y}, expert %{x}<br>score %{z:.4f}<extra></extra>"))
        fig.update_layout(
            title=f"fTRI {self.config.score}: {self.target} vs {', '.join(c for c in self.classes if c != self.target)}"
                  f" ({self.config.tokens} tokens)",
            xaxis_title="expert", yaxis_title="MoE layer", yaxis=dict(type="category", autorange="reversed"))
        return fig

    def bar_figure(self, k: int = 20):
        """Plotly bar chart of the global top-k experts with bootstrap CIs."""
        import plotly.graph_objects as go

        top = self.top(k)
        err = None
        if self.ci_low is not None:
            err = dict(type="data", symmetric=False, array=[t.ci_high - t.score for t in top],
                       arrayminus=[t.score - t.ci_low for t in top])
        fig = go.Figure(go.Bar(x=[f"L{t.layer}.E{t.expert}" for t in top], y=[t.score for t in top], error_y=err))
        ci = f", {round(self.config.ci * 100)}% bootstrap CI" if err else ""
        fig.update_layout(title=f"top {k} experts for {self.target!r} ({self.config.score}{ci})",
                          xaxis_title="layer.expert", yaxis_title=self.config.score)
        return fig

    # ---- persistence ----------------------------------------------------------------------
    def metadata(self) -> dict:
        return {"format": PROFILE.name, "version": PROFILE.version, "classes": self.classes,
                "layers": self.layers, "model": self.model, "config": asdict(self.config), "stats": self.stats,
                "top": [asdict(t) for t in self.top(min(20, self.scores.numel()))]}

    def to_safetensors(self, path: str | Path) -> Path:
        tensors = {"scores": self.scores.float()}
        if self.ci_low is not None:
            tensors["ci_low"], tensors["ci_high"] = self.ci_low.float(), self.ci_high.float()
        tensors.update({f"sums.{k}": v for k, v in self.sums.items()})
        if self.boot:
            tensors.update({f"boot.{k}": v for k, v in self.boot.items()})
        meta = {k: v for k, v in self.metadata().items() if k not in ("format", "version", "model")}
        return save_tensors(path, PROFILE, tensors, meta, identity=self.model)

    def save(self, path: str | Path) -> tuple[Path, Path]:
        """Write `path` (.safetensors, tensors + metadata) and a readable JSON beside it."""
        path = Path(path)
        if path.suffix != ".safetensors":
            path = path / "profile.safetensors" if path.suffix == "" else path.with_suffix(".safetensors")
        self.to_safetensors(path)
        js = path.with_suffix(".json")
        js.write_text(json.dumps(self.metadata(), indent=2, default=str) + "\n")
        return path, js

    @classmethod
    def from_safetensors(cls, path: str | Path) -> Profile:
        """Read a profile (a .safetensors file or the directory `steer profile --out` wrote)."""
        path = Path(path)
        if path.is_dir():
            path = path / "profile.safetensors"
        stored = load_tensors(path, PROFILE)
        meta, t = stored.meta, stored.tensors
        model = stored.identity if stored.version >= 2 else meta["model"]  # version 1: inside the fields
        known = {f.name for f in fields(ProfileConfig)}
        cfg = ProfileConfig(**{k: v for k, v in meta["config"].items() if k in known})
        sums = {k.split(".", 1)[1]: v for k, v in t.items() if k.startswith("sums.")}
        boot = {k.split(".", 1)[1]: v for k, v in t.items() if k.startswith("boot.")} or None
        return cls(t["scores"], t.get("ci_low"), t.get("ci_high"), sums, boot, list(meta["classes"]),
                   [int(x) for x in meta["layers"]], model, cfg, meta.get("stats", {}))

    load = from_safetensors

    def check_model(self, model: Any) -> None:
        """Raise steer.identity.ModelMismatchError if `model` is not the model this profile was made on."""
        check_model(self.model, model, what="this expert profile")


def _finish(sums, boot, classes, layers, ident, cfg: ProfileConfig, stats) -> Profile:
    t = classes.index(cfg.target) if cfg.target else 0
    s = scores(sums, cfg.score, t, cfg.normalize).float()
    lo = hi = None
    if boot and boot["n"].shape[0] > 1:
        sb = scores(boot, cfg.score, t, cfg.normalize)  # [R, L, E]
        a = (1 - cfg.ci) / 2
        q = torch.quantile(sb.reshape(sb.shape[0], -1), torch.tensor([a, 1 - a], dtype=sb.dtype), dim=0)
        lo, hi = q[0].reshape(s.shape).float(), q[1].reshape(s.shape).float()
    return Profile(s, lo, hi, sums, boot, list(classes), list(layers), ident, cfg, stats)


# ---- the whole run ---------------------------------------------------------------------------------

def _require_moe(model) -> Any:
    mm = model_map(unwrap_model(model))
    if not mm.moe_layers:
        raise DenseModelError(
            f"the model is a dense {mm.adapter.family} model: it has no routed experts to profile or switch. "
            f"Use an MoE checkpoint (families: {family_list(moe=True)}), e.g. `steer profile --model smollm2-moe`.")
    return mm


def _as_classes(classes) -> tuple[list[str], list[str], list[int]]:
    if isinstance(classes, PromptSet):
        classes = list(classes.by_label().values()) if classes.labels is not None else [classes]
    if isinstance(classes, Mapping):
        classes = [PromptSet(list(v), str(k)) if not isinstance(v, PromptSet) else PromptSet(v.prompts, str(k))
                   for k, v in classes.items()]
    sets = list(classes)
    names, prompts, ids = [], [], []
    for ci, ps in enumerate(sets):
        ps = ps if isinstance(ps, PromptSet) else PromptSet(list(ps), f"class{ci}")
        ps.check_nonempty()
        if ps.name in names:
            raise ValueError(f"two prompt classes are named {ps.name!r}; give each class its own name")
        names.append(ps.name)
        prompts += ps.prompts
        ids += [ci] * len(ps)
    return names, prompts, ids


def _is_cancelled(cancel: CancelFlag | Any | None) -> bool:
    if cancel is None:
        return False
    return bool(cancel.is_set() if hasattr(cancel, "is_set") else cancel())


def _interleave(ids: Sequence[int]) -> list[int]:
    """Prompt order that spreads every class evenly over the run, so that a run cancelled halfway has
    counted about half of each class (class order would leave the later classes empty)."""
    size: dict[int, int] = {}
    rank = []
    for c in ids:
        rank.append(size.get(c, 0))
        size[c] = rank[-1] + 1
    return sorted(range(len(ids)), key=lambda i: ((rank[i] + 0.5) / size[ids[i]], ids[i]))


class HFCounter:
    """The counting engine of `profile`: one forward per batch of an HF model, a hook on each router.

    An engine for `profile_with` has `layers`, `num_experts`, `batches_per_call`, `answer(tokenizer,
    prompts, config) -> responses` and `count(batches, acc, class_names)`, a generator that leaves
    each batch's per-row counts in `acc.batch_counts` (after `acc.start(batch)`) and yields the batch.
    steer.serving.vllm_profile.VLLMCounter is the other one (the routing a vLLM engine made).
    """

    batches_per_call = 1

    def __init__(self, model: Any):
        self.hf = unwrap_model(model)
        mm = _require_moe(self.hf)
        self.layers, self.num_experts = list(mm.moe_layers), mm.num_experts

    def answer(self, tokenizer, prompts: Sequence[str], config: ProfileConfig) -> list[str]:
        return generate_responses(self.hf, tokenizer, prompts, max_new_tokens=config.max_new_tokens,
                                  batch_size=config.batch_size, chat_template=config.chat_template)

    def count(self, batches: list[Batch], acc: ProfileAccumulator, class_names: Sequence[str]):
        device = next(self.hf.parameters()).device
        with torch.no_grad(), attach(self.hf, {"blocks.*.mlp.router.indices": acc.hook}) as session:
            for batch in batches:
                acc.start(batch)
                session.set_token_selection(batch.selection.to(device))
                # only the routers are read: logits_to_keep=1 skips the lm_head over every position
                self.hf(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                        use_cache=False, logits_to_keep=1)
                yield batch


def profile(
    model: Any,
    tokenizer,
    classes: Mapping[str, Sequence[str] | PromptSet] | Sequence[PromptSet] | PromptSet,
    config: ProfileConfig | None = None,
    *,
    responses: Sequence[str] | None = None,
    labeller=None,
    progress: Progress | None = None,
    cancel: CancelFlag | Any | None = None,
    weights_hash: str | None = None,
) -> Profile:
    """Profile which experts the target class uses more than the others.

    classes: {name: prompts} or PromptSets (the first is the target unless config.target says).
      With `labeller` (name or callable), all prompts are pooled, the model answers them (greedy,
      `config.max_new_tokens`) and each answer's label becomes its class.
    responses: one response per prompt (in class order) to teacher-force for tokens="response"/"both";
      generated greedily if None and needed.
    progress: a steer.progress.Progress, called (done, total, note) after every batch (None: silent;
      the CLI passes a tqdm bar, the app its progress bar). Units are prompt passes: when responses
      are generated, total is twice the prompts (answering, then counting).
    cancel: a threading.Event or a callable returning True to stop; checked between batches. Prompts
      are counted with the classes interleaved, so a run cancelled while counting returns the partial
      profile of the prompts counted so far (`Profile.cancelled`, stats["prompts"] says how many);
      cancelled before every class has a counted prompt, it raises ProfileCancelled.
    The same profile through a vLLM engine: steer.serving.vllm_profile.profile_vllm.
    """
    counter = HFCounter(model)
    return profile_with(counter, tokenizer, classes, config, lambda: model_identity(counter.hf, weights_hash=weights_hash),
                        responses=responses, labeller=labeller, progress=progress, cancel=cancel)


def profile_with(
    counter: Any,
    tokenizer,
    classes: Mapping[str, Sequence[str] | PromptSet] | Sequence[PromptSet] | PromptSet,
    config: ProfileConfig | None,
    identity: dict | Callable[[], dict],
    *,
    responses: Sequence[str] | None = None,
    labeller=None,
    progress: Progress | None = None,
    cancel: CancelFlag | Any | None = None,
) -> Profile:
    """`profile` with another counting engine (see HFCounter); `identity` is the model's identity."""
    import time

    config = config or ProfileConfig()
    config.validate()
    names, prompts, ids = _as_classes(classes)
    _check_profile_inputs(names, prompts, responses, config, labeller)
    t0 = time.perf_counter()
    generate = (labeller is not None or config.tokens != "prompt") and responses is None
    bar = Steps(progress, len(prompts) * (2 if generate else 1))
    if generate:
        responses = _answer_prompts(counter, tokenizer, prompts, config, bar, cancel)
    if labeller is not None:
        names, ids = _label_classes(labeller, responses, config.target)
    acc, n_tok, done = _count_routing(counter, tokenizer, names, prompts, ids, responses, config, bar, cancel)
    stats = _profile_stats(acc, names, len(prompts), done, n_tok, config, time.perf_counter() - t0)
    ident = identity() if callable(identity) else identity
    sums = {"n": acc.n, "frac": acc.frac, "count": acc.count, "tokens": acc.tokens}
    return _finish(sums, acc.boot if acc.R else None, names, counter.layers, ident, config, stats)


def _check_profile_inputs(names: list[str], prompts: list[str], responses: Sequence[str] | None,
                          config: ProfileConfig, labeller) -> None:
    if not prompts:
        raise EmptyPromptSetError("no prompts to profile: every class is empty")
    if responses is not None and len(responses) != len(prompts):
        raise ValueError(f"{len(responses)} responses for {len(prompts)} prompts; give one per prompt")
    if config.target is not None and labeller is None and config.target not in names:
        raise ValueError(f"target class {config.target!r} is not one of the classes {names}")
    if labeller is None and len(names) < 2:
        raise ValueError(f"profiling needs at least two classes (a behaviour and a baseline), got {names}")


def _answer_prompts(counter, tokenizer, prompts: list[str], config: ProfileConfig, bar: Steps,
                    cancel) -> list[str]:
    """The model's greedy answers, chunk by chunk (a cancel here leaves nothing counted: an error)."""
    chunk_size = config.batch_size * counter.batches_per_call
    responses: list[str] = []
    for start in range(0, len(prompts), chunk_size):
        chunk = prompts[start:start + chunk_size]
        responses += counter.answer(tokenizer, chunk, config)
        bar.advance(len(chunk), "answering")
        if _is_cancelled(cancel) and len(responses) < len(prompts):
            raise ProfileCancelled(
                f"profiling was cancelled while answering the prompts ({len(responses)} of {len(prompts)}): "
                f"no token was counted yet, so there is no partial profile", 0, len(prompts))
    return responses


def _label_classes(labeller, responses: list[str], target: str | None) -> tuple[list[str], list[int]]:
    """Classes from the labels of the answers: (sorted label names, each prompt's class index)."""
    lab = get_labeller(labeller)
    labels = [lab(r) for r in responses]
    names = sorted(set(labels))
    if target is not None and target not in names:
        raise ValueError(f"no response was labelled {target!r} (labels seen: {names}); "
                         f"pick a target among them or change the prompts")
    if len(names) < 2:
        raise ValueError(f"every response got the label {names[0]!r}: profiling needs at least two classes. "
                         f"Use prompts that elicit both behaviours, or give the classes as prompt sets.")
    return names, [names.index(x) for x in labels]


def _count_routing(counter, tokenizer, names: list[str], prompts: list[str], ids: list[int],
                   responses: list[str] | None, config: ProfileConfig, bar: Steps, cancel):
    """Count the experts each class routes to through `counter`, classes interleaved so a cancelled run
    stays balanced; returns (accumulator, selected tokens, prompts counted)."""
    order = _interleave(ids)
    run_prompts, run_ids = [prompts[i] for i in order], [ids[i] for i in order]
    run_resp = [responses[i] for i in order] if responses is not None else None
    acc = ProfileAccumulator(len(names), counter.layers, counter.num_experts, config.n_bootstrap, config.seed)
    n_tok = done = 0
    batches = prompt_batches(tokenizer, run_prompts, run_ids, config, run_resp)
    while group := [b for _, b in zip(range(counter.batches_per_call), batches)]:
        counted = counter.count(group, acc, names)
        try:
            for batch in counted:
                acc.fold(batch.classes)
                n_tok += int(acc.batch_tokens.sum())
                done += len(batch.classes)
                bar.advance(len(batch.classes), "counting")
                if _is_cancelled(cancel) and done < len(prompts):
                    return acc, n_tok, done
        finally:
            counted.close()  # a generator left mid-group still holds its hooks
    return acc, n_tok, done


def _profile_stats(acc: ProfileAccumulator, names: list[str], n_prompts: int, done: int, n_tok: int,
                   config: ProfileConfig, seconds: float) -> dict:
    """The run's statistics, or an error when a class ended up with no counted token."""
    cancelled = done < n_prompts
    empty = [names[c] for c in range(len(names)) if acc.n[c] == 0]
    if empty and cancelled:
        raise ProfileCancelled(f"profiling was cancelled after {done} of {n_prompts} prompts, before class(es) "
                               f"{empty} had a counted prompt: no partial profile", done, n_prompts)
    if empty:
        raise EmptyPromptSetError(f"classes {empty} have no selected tokens (tokens={config.tokens!r}); "
                                  f"check the prompts/responses are non-empty")
    stats = {"prompts": done, "prompts_per_class": {n: int(acc.n[i]) for i, n in enumerate(names)},
             "tokens": n_tok, "skipped_prompts": acc.skipped_prompts,
             "seconds": round(seconds, 2), "accumulator_bytes": acc.nbytes()}
    if cancelled:
        stats.update(cancelled=True, prompts_requested=n_prompts)
    return stats


def expert_tokens(
    model: Any,
    tokenizer,
    prompts: str | Sequence[str],
    layer: int,
    expert: int,
    config: ProfileConfig | None = None,
    *,
    responses: Sequence[str] | None = None,
    context: int = 6,
    routed_only: bool = True,
):
    """The tokens the router sent to `expert` of MoE layer `layer`, one DataFrame row per token.

    What a heatmap cell of a profile is made of. Read, like `profile`, from the indices the router
    produced, on the sequences `profile` runs with `config` (chat template; responses teacher-forced,
    and generated greedily when config.tokens needs them and none are given). Columns: prompt (index),
    position (in that sequence's real tokens), token, routed, slot (place in the router's top-k
    output), weight (the router's weight for this expert), counted (whether `profile` counts this token
    under config.tokens and the template-prefix rule), context (the text around it, token in [brackets]).
    routed_only=False keeps every token (slot and weight empty where not routed), to show whole prompts.
    """
    import pandas as pd

    config = config or ProfileConfig()
    config.validate()
    hf = unwrap_model(model)
    mm = _require_moe(hf)
    prompts = _expert_tokens_inputs(mm, prompts, layer, expert, context, responses)
    if config.tokens != "prompt" and responses is None:
        responses = generate_responses(hf, tokenizer, prompts, max_new_tokens=config.max_new_tokens,
                                       batch_size=config.batch_size, chat_template=config.chat_template)
    seen: dict[str, torch.Tensor] = {}
    point = f"blocks.{layer}.mlp.router"
    columns = ["prompt", "position", "token", "routed", "slot", "weight", "counted", "context"]
    rows = []
    device = next(hf.parameters()).device
    with torch.no_grad(), attach(hf, {f"{point}.indices": _grab(seen, "indices"), f"{point}.weights": _grab(seen, "weights")}):
        for start, batch in zip(range(0, len(prompts), config.batch_size),
                                prompt_batches(tokenizer, prompts, [0] * len(prompts), config, responses)):
            hf(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device), use_cache=False,
               logits_to_keep=1)
            rows += _expert_rows(batch, start, seen, expert, tokenizer, routed_only, context)
    return pd.DataFrame(rows, columns=columns)


def _expert_tokens_inputs(mm, prompts: str | Sequence[str], layer: int, expert: int, context: int,
                          responses: Sequence[str] | None) -> list[str]:
    """The prompts as a list, or a clear error for a bad layer, expert, context or prompt list."""
    if layer not in mm.moe_layers:
        raise ValueError(f"layer {layer} has no router; the MoE layers of this model are {mm.moe_layers}")
    if not 0 <= expert < mm.num_experts:
        raise ValueError(f"expert {expert} is out of range: each MoE layer has experts 0..{mm.num_experts - 1}")
    if context < 0:
        raise ValueError(f"context must be >= 0 tokens on each side, got {context}")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise EmptyPromptSetError("expert_tokens needs at least one non-empty prompt (a string or a list of them)")
    if responses is not None and len(responses) != len(prompts):
        raise ValueError(f"{len(responses)} responses for {len(prompts)} prompts; give one per prompt")
    return prompts


def _grab(seen: dict[str, torch.Tensor], name: str):
    """A hook keeping the router's `name` output ([B, T, k], on the CPU) in `seen[name]`."""
    def fn(t: torch.Tensor, ctx: HookContext):
        b, n = ctx.batch_shape
        seen[name] = t.detach().reshape(b, n, -1).float().cpu() if name == "weights" else \
            t.detach().reshape(b, n, -1).cpu()
    return fn


def _expert_rows(batch: Batch, start: int, seen: dict[str, torch.Tensor], expert: int, tokenizer,
                 routed_only: bool, context: int) -> list[dict]:
    """One row per real token of the batch (routed tokens only if `routed_only`)."""
    rows = []
    hit = seen["indices"] == expert  # [B, T, k]
    for j in range(batch.input_ids.shape[0]):
        real = batch.attention_mask[j].bool()
        ids = batch.input_ids[j][real].tolist()
        toks = [tokenizer.decode([i]) for i in ids]
        h, w, sel = hit[j][real], seen["weights"][j][real], batch.selection[j][real]
        for p, tok in enumerate(toks):
            routed = bool(h[p].any())
            if routed_only and not routed:
                continue
            slot = int(h[p].nonzero()[0]) if routed else None
            rows.append({
                "prompt": start + j, "position": p, "token": tok, "routed": routed, "slot": slot,
                "weight": float(w[p, slot]) if routed else None, "counted": bool(sel[p]),
                "context": _context(toks, p, context)})
    return rows


def _context(toks: list[str], p: int, n: int) -> str:
    text = "".join(toks[max(0, p - n):p]) + f"[{toks[p]}]" + "".join(toks[p + 1:p + 1 + n])
    return text.replace("\n", "\\n")


def load_profile(path: str | Path) -> Profile:
    return Profile.from_safetensors(path)

