"""Attention sinks: per-head sink scores, streaming, and the sink-rate metric.

Sink score of key k in one head (ALGORITHMS.md section 2), A the causal post-softmax map:
    s_k = sum_{i observes k} A[i, k] / n_obs(k)
i.e. the mean attention k receives from the queries that may see it (causal, padding, sliding
window). A key is a sink if s_k > tau (fixed tau, the ACT code's rule) or s_k > alpha / N (the
paper's rule, N = real tokens of the input), and only if at least `min_queries` queries observe it:
the last keys of an input are seen by one or two queries, and their score is then just the recency
of those few rows, not a sink. Sinks other than the first real token are "hidden sinks".

Sink rate ("When Attention Sink Emerges"): the fraction of (layer, head) whose first-token score
exceeds eps = 0.3, averaged over 64-token inputs.

Statistics stream: for each layer, an `attn.impl` override computes the attention output with SDPA's
fused kernel together with each row's log-sum-exp (`steer.kernels.lse.attention_lse`; is_causal when
the batch has no padding and no sliding window reaches back), and the column sums from that lse
(`sink_stats_lse`: one q k^T pass over each query block's visible keys, no softmax; no N x N map,
memory O(B H N) per layer). Two cheaper options: `candidates` (scores of known key positions only,
e.g. the first tokens or delimiters: O(N |C| d)) and `sample_rows` (every key's score estimated from a
uniform sample of query rows, unbiased, with its standard error in `SinkResult.stderr`). Families whose attention is not
plain softmax(q k^T) -- logit soft-capping (Gemma 2 style) or GPT-OSS's learned sink logits -- go
through the exact eager path instead (`attn.pattern`), one layer's map alive at a time, reduced
immediately.

    res = detect_sinks(model, tok, book_inputs(tok, n=100))
    res.sink_rate(), res.hidden_sinks(), res.figure("heatmap").show()
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from steer.adapters import attention_quirk, model_map
from steer.batching import left_pad
from steer.hooks import HookContext, attach, unwrap_model
from steer.identity import check_model, model_identity
from steer.io import SINKS, FormatError, load_tensors, save_tensors

TAU = 0.1  # fixed threshold of the ACT code
EPS = 0.3  # sink-rate threshold ("When Attention Sink Emerges")
SINK_RATE_LENGTH = 64  # tokens per input in the sink-rate protocol
MIN_QUERIES = 8  # observers a key needs before its score can call it a sink (excludes tail tokens)
KEEP_MAPS_UP_TO = 128  # per-head maps of the first input are kept (for figures) up to this length
PUBLISHED_SINK_RATES = {"Llama-2-7B": 0.925, "Mistral-7B": 0.975, "Llama-3-8B": 0.990}
STRIP_CELL_TEXT_UP_TO = 24  # token strip: tokens written inside the cells up to this length
STRIP_MAX_LABELS = 48  # longer strips get rotated axis labels, at most this many (hover names all)
STRIP_LABEL_CHARS = 12  # a label longer than this is cut with an ellipsis


def token_label(token: str) -> str:
    """A short, visible label for a token (whitespace shown, long tokens cut)."""
    t = token.replace("\n", "\\n").replace("\t", "\\t").strip() or repr(token)[1:-1].replace(" ", "\u2423") or "\u2205"
    return t if len(t) <= STRIP_LABEL_CHARS else t[: STRIP_LABEL_CHARS - 1] + "\u2026"


def _strip_ticks(frac, step: int) -> list[int]:
    """Positions to label: the strongest sinks first (sink in >= 25% of heads), then every step-th
    position, never two labels closer than `step` (rotated labels a step apart do not overlap)."""
    n = len(frac)
    if step == 1:
        return list(range(n))
    salient = sorted((p for p in range(n) if frac[p] >= 0.25), key=lambda p: -frac[p])
    chosen: list[int] = []
    for p in salient + list(range(0, n, step)):
        if all(abs(p - q) >= step for q in chosen):
            chosen.append(p)
    return sorted(chosen)


def _ordinal(n: int) -> str:
    return "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")


def sink_threshold(tau: float | None, alpha: float | None, n_tokens: torch.Tensor | int) -> torch.Tensor:
    """tau, or alpha / N per input when alpha is given."""
    n = torch.as_tensor(n_tokens, dtype=torch.float32)
    if alpha is not None:
        if alpha <= 0:
            raise ValueError(f"alpha must be > 0 (got {alpha}); the rule is s_k > alpha / N")
        return alpha / n.clamp_min(1)
    if tau is None or not 0 < tau < 1:
        raise ValueError(f"tau must be in (0, 1) (got {tau}); ACT's code uses {TAU}")
    return torch.full_like(n, float(tau))


def exact_path_reason(model) -> str | None:
    """Why this model's attention is not plain softmax(q k^T * scale) (None if it is): the adapter
    entry's `attention_quirk`, or soft-capped logits (steer.adapters.attention_quirk)."""
    return attention_quirk(unwrap_model(model).config)


def _layer_window(cfg, layer: int) -> int | None:
    types = getattr(cfg, "layer_types", None)
    if types and types[layer] == "sliding_attention":
        return cfg.sliding_window
    return None


def _observers(token_mask: torch.Tensor, window: int | None) -> torch.Tensor:
    """Int[B, T]: real queries that may see each key (causal, padding, sliding window)."""
    t = token_mask.shape[1]
    i = torch.arange(t).view(t, 1)
    k = torch.arange(t).view(1, t)
    allowed = k <= i
    if window is not None:
        allowed &= (i - k) < window
    m = token_mask.bool().cpu()
    obs = allowed.unsqueeze(0) & m.unsqueeze(2) & m.unsqueeze(1)  # [B, Tq, Tk]
    return obs.sum(1)


class _Collector:
    """Per layer: column sums [B, H, T] and observer counts [B, T] of the current batch."""

    def __init__(self, n_layers: int, keep_maps: bool):
        self.col: dict[int, torch.Tensor] = {}
        self.obs: dict[int, torch.Tensor] = {}
        self.maps: dict[int, torch.Tensor] = {}
        self.keep_maps = keep_maps
        self.n_layers = n_layers
        self.unpadded = False  # the current batch has no padding: plain causal attention suffices
        self.causal_calls = 0  # layer calls that took the is_causal path (for tests and benchmarks)
        self.candidates: torch.Tensor | None = None  # Long[B, C] key columns of this batch, or None = all
        self.no_candidates: list[int] = []  # batch rows with no candidate inside the input
        self.sample_rows: int | None = None
        self.generator: torch.Generator | None = None
        self.se: dict[int, torch.Tensor] = {}

    def reset(self) -> None:
        self.col, self.obs, self.se = {}, {}, {}


def _streaming_hook(coll: _Collector):
    def fn(call, ctx: HookContext):
        from steer.kernels.lse import (
            attention_lse,
            observers,
            sink_stats_columns,
            sink_stats_lse,
            sink_stats_sampled,
        )

        q, k = call.query, call.key
        b, h, t, _ = q.shape
        if t != k.shape[2]:
            raise ValueError("detect_sinks analyses whole inputs; run it without a KV cache")
        window = call.sliding_window
        # No padding and no window in reach: the mask is plain causal, and the fused kernel runs with
        # is_causal (an explicit mask costs a [T, T] mask and, on CPU, a slower kernel); observers are
        # counted in closed form. A window in reach without padding (`window_causal`): no mask either, the
        # kernels apply the window per query block. steer's mask already holds the sliding window otherwise.
        causal = call.causal or (coll.unpadded and (window is None or t <= window))
        mask, win = call.kernel_mask(causal)
        coll.causal_calls += causal
        out, lse = attention_lse(q, k, call.value, scale=call.scaling, mask=mask, sliding_window=win)
        result = (out.transpose(1, 2).contiguous(), None)
        if coll.candidates is not None:
            cols = coll.candidates.to(q.device)
            got, _ = sink_stats_columns(q, k, lse, scale=call.scaling, cols=cols, mask=mask, sliding_window=win)
            col = torch.full((b, h, t), float("nan"), device=q.device)
            col.scatter_(2, cols.unsqueeze(1).expand(b, h, -1), got)
            col[coll.no_candidates] = float("nan")
            n_obs = observers(b, t, t, mask, win, device=q.device)
        elif coll.sample_rows is not None and coll.sample_rows < t:
            col, se, n_obs = sink_stats_sampled(q, k, lse, scale=call.scaling, n_rows=coll.sample_rows, mask=mask,
                                                sliding_window=win, generator=coll.generator)
            coll.se[ctx.layer] = se.cpu()
        else:
            col, n_obs = sink_stats_lse(q, k, lse, scale=call.scaling, mask=mask, sliding_window=win)
            if coll.sample_rows is not None:  # every row "sampled": the exact sums, standard error 0
                coll.se[ctx.layer] = torch.zeros_like(col).cpu()
        coll.col[ctx.layer] = col.float().cpu()
        coll.obs[ctx.layer] = n_obs[:, 0].cpu()
        if coll.keep_maps:
            from steer.attention import attention_probs_reference

            m = None if call.mask is None else call.mask[:1]
            coll.maps[ctx.layer] = attention_probs_reference(call.query[:1], call.key[:1], m, call.scaling)[0].cpu()
        return result

    return fn


def _exact_hook(coll: _Collector, cfg):
    def fn(weights: torch.Tensor, ctx: HookContext):
        b, _, tq, tk = weights.shape
        if tq != tk:
            raise ValueError("detect_sinks analyses whole inputs; run it without a KV cache")
        tmask = ctx.token_mask
        tmask = torch.ones(b, tq, dtype=torch.bool) if tmask is None else tmask.cpu()
        q = tmask.to(weights.device, weights.dtype).view(b, 1, tq, 1)
        coll.col[ctx.layer] = (weights * q).float().sum(2).cpu()
        coll.obs[ctx.layer] = _observers(tmask, _layer_window(cfg, ctx.layer))
        if coll.keep_maps:
            coll.maps[ctx.layer] = weights[0].float().cpu()

    return fn


@dataclass
class SinkResult:
    """Sink scores of every (input, layer, head, key), keys left-aligned at each input's first real token.

    scores: Float[n, L, H, T] (NaN beyond an input's length, and at positions not scored when
    `candidates` were given); n_obs: Int[n, L, T] observing queries; stderr: Float[n, L, H, T], the
    standard error of each score when it was estimated from sampled query rows (None when exact).
    """

    scores: torch.Tensor
    n_obs: torch.Tensor
    lengths: torch.Tensor
    tokens: list[list[str]]
    tau: float | None = TAU
    alpha: float | None = None
    eps: float = EPS
    min_queries: int = MIN_QUERIES
    model: str = ""
    path: str = "streaming"
    maps: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> Float[H, T, T] of input 0
    stderr: torch.Tensor | None = None
    identity: dict | None = None  # steer.identity.model_identity of the model scored (`model` is its name)

    @property
    def n_inputs(self) -> int:
        return self.scores.shape[0]

    @property
    def n_layers(self) -> int:
        return self.scores.shape[1]

    @property
    def n_heads(self) -> int:
        return self.scores.shape[2]

    @property
    def first(self) -> torch.Tensor:
        """Float[n, L, H]: each input's first-token score s_1 (observed by every query)."""
        return self.scores[..., 0]

    def thresholds(self) -> torch.Tensor:
        return sink_threshold(self.tau, self.alpha, self.lengths)

    def sink_mask(self) -> torch.Tensor:
        """Bool[n, L, H, T]: sinks under this result's rule (tau or alpha/N, min_queries)."""
        thr = self.thresholds().view(-1, 1, 1, 1)
        eligible = (self.n_obs >= self.min_queries).unsqueeze(2)
        return (self.scores > thr) & eligible & ~self.scores.isnan()

    def hidden_sink_mask(self) -> torch.Tensor:
        mask = self.sink_mask().clone()
        mask[..., 0] = False
        return mask

    def head_sink_rate(self, eps: float | None = None) -> torch.Tensor:
        """Float[L, H]: fraction of inputs where this head's first-token score exceeds eps."""
        eps = self.eps if eps is None else eps
        return (self.first > eps).float().mean(0)

    def sink_rate(self, eps: float | None = None) -> float:
        """Fraction of (layer, head) with s_1 > eps, averaged over inputs (the published metric)."""
        return float(self.head_sink_rate(eps).mean())

    def hidden_sinks(self):
        """DataFrame of every hidden (non-initial) sink: input, layer, head, position, token, score."""
        import pandas as pd

        idx = self.hidden_sink_mask().nonzero().tolist()
        rows = [{"input": i, "layer": layer, "head": h, "position": p, "token": self.tokens[i][p],
                 "score": float(self.scores[i, layer, h, p]), "n_obs": int(self.n_obs[i, layer, p])}
                for i, layer, h, p in idx]
        return pd.DataFrame(rows, columns=["input", "layer", "head", "position", "token", "score", "n_obs"])

    def heads_with_hidden_sinks(self, min_fraction: float = 0.0) -> list[tuple[int, int, float]]:
        """(layer, head, fraction of inputs with a hidden sink), most frequent first."""
        frac = self.hidden_sink_mask().any(-1).float().mean(0)
        out = [(layer, h, float(frac[layer, h])) for layer in range(self.n_layers) for h in range(self.n_heads)
               if frac[layer, h] > min_fraction]
        return sorted(out, key=lambda r: -r[2])

    def to_dataframe(self):
        """One row per (layer, head): sink rate, mean s_1, hidden sinks per input, commonest hidden token."""
        import pandas as pd

        hidden = self.hidden_sink_mask()
        rate = self.head_sink_rate()
        rows = []
        for layer in range(self.n_layers):
            for h in range(self.n_heads):
                toks: dict[str, int] = {}
                for i, p in hidden[:, layer, h].nonzero().tolist():
                    toks[self.tokens[i][p]] = toks.get(self.tokens[i][p], 0) + 1
                rows.append({
                    "layer": layer, "head": h, "sink_rate": float(rate[layer, h]),
                    "first_score": float(self.first[:, layer, h].mean()),
                    "hidden_per_input": float(hidden[:, layer, h].sum(-1).float().mean()),
                    "top_hidden_token": max(toks, key=toks.get) if toks else None,
                })
        return pd.DataFrame(rows)

    def summary(self) -> dict:
        hidden = self.hidden_sinks()
        top = hidden["token"].value_counts().head(10).to_dict() if len(hidden) else {}
        return {
            "model": self.model, "inputs": self.n_inputs, "layers": self.n_layers, "heads": self.n_heads,
            "mean_length": float(self.lengths.float().mean()), "eps": self.eps,
            "rule": f"alpha/N, alpha={self.alpha}" if self.alpha is not None else f"tau={self.tau}",
            "min_queries": self.min_queries, "sink_rate": self.sink_rate(),
            "heads_with_hidden_sinks": len(self.heads_with_hidden_sinks()),
            "hidden_sinks_per_input": len(hidden) / max(self.n_inputs, 1),
            "top_hidden_sink_tokens": top, "published_sink_rates_7b": PUBLISHED_SINK_RATES, "path": self.path,
        }

    # ---- figures ----------------------------------------------------------------------------
    def figure(self, kind: Literal["heatmap", "map", "tokens"] = "heatmap", *, layer: int | None = None,
               head: int | None = None, input: int = 0):
        """heatmap: layer x head sink rate; map: one head's attention map of input 0 with its sinks
        marked; tokens: a strip of input `input` coloured by the fraction of heads it is a sink in."""
        if kind == "heatmap":
            return self._heatmap_figure()
        if kind == "map":
            return self._map_figure(layer, head)
        if kind == "tokens":
            return self._tokens_figure(input)
        raise ValueError(f"kind must be 'heatmap', 'map' or 'tokens' (got {kind!r})")

    def _heatmap_figure(self):
        import plotly.graph_objects as go

        z = self.head_sink_rate().numpy()
        fig = go.Figure(go.Heatmap(z=z, x=list(range(self.n_heads)), y=list(range(self.n_layers)),
                                   zmin=0, zmax=1, colorscale="Viridis", colorbar={"title": "sink rate"}))
        fig.update_layout(title=f"Sink rate per head (s_1 > {self.eps}): {self.sink_rate():.1%} overall",
                          xaxis_title="head", yaxis_title="layer")
        return fig

    def _map_figure(self, layer: int | None, head: int | None):
        import plotly.graph_objects as go

        if layer is None or head is None:
            layer, head = self._default_map_head()
        self._check_head(layer, head)
        if layer not in self.maps:
            raise ValueError(
                f"no attention map kept for layer {layer}: maps are kept for the first input when it has "
                f"at most keep_maps tokens; rerun detect_sinks(..., keep_maps=True) on a short input"
            )
        n = int(self.lengths[0])
        a = self.maps[layer][head].numpy()
        toks = [f"{p}:{t}" for p, t in enumerate(self.tokens[0][:n])]
        fig = go.Figure(go.Heatmap(z=a, x=toks, y=toks, colorscale="Blues", colorbar={"title": "A[i,k]"}))
        sinks = self.sink_mask()[0, layer, head, :n].nonzero().flatten().tolist()
        for p in sinks:
            fig.add_vline(x=p, line={"color": "red", "dash": "dot"})
        fig.add_trace(go.Scatter(x=[toks[p] for p in sinks], y=[toks[-1]] * len(sinks), mode="markers",
                                 marker={"color": "red", "symbol": "triangle-down", "size": 10},
                                 name="sink"))
        fig.update_layout(title=f"Layer {layer} head {head}: sinks {[self.tokens[0][p] for p in sinks]}",
                          yaxis={"autorange": "reversed", "title": "query"}, xaxis_title="key")
        return fig

    def _tokens_figure(self, input: int):
        import plotly.graph_objects as go

        if not 0 <= input < self.n_inputs:
            raise ValueError(f"input {input} out of range 0..{self.n_inputs - 1}")
        n = int(self.lengths[input])
        frac = self.sink_mask()[input, ..., :n].float().mean((0, 1)).numpy()
        toks = self.tokens[input][:n]
        labels = [token_label(t) for t in toks]
        # Long inputs: labels go on the axis, rotated, at most STRIP_MAX_LABELS of them (every step-th);
        # text inside the cells only while it fits. Hover always names every token.
        step = max(1, math.ceil(n / STRIP_MAX_LABELS))
        ticks = _strip_ticks(frac, step)
        in_cells = n <= STRIP_CELL_TEXT_UP_TO
        hover = [f"position {p}: {t!r}" for p, t in enumerate(toks)]
        fig = go.Figure(go.Heatmap(
            z=[frac], x=list(range(n)), text=[labels], customdata=[hover], colorscale="Reds", zmin=0, zmax=1,
            colorbar={"title": "heads"}, texttemplate="%{text}" if in_cells else None, xgap=1,
            hovertemplate="%{customdata}<br>sink in %{z:.0%} of heads<extra></extra>"))
        longest = max((len(labels[p]) for p in ticks), default=1)
        fig.update_xaxes(tickmode="array", tickvals=ticks, ticktext=[labels[p] for p in ticks],
                         tickangle=0 if in_cells else -90, tickfont={"size": 11}, showticklabels=not in_cells,
                         title=f"token (about every {step}{_ordinal(step)} labelled, and the strongest sinks; hover for all)" if step > 1
                         else "token")
        fig.update_layout(title=f"Input {input}: fraction of heads in which each token is a sink",
                          yaxis={"visible": False}, height=230 + (0 if in_cells else 7 * longest),
                          margin={"b": 40 if in_cells else 40 + 7 * longest})
        return fig

    def _default_map_head(self) -> tuple[int, int]:
        heads = self.heads_with_hidden_sinks()
        heads = [(layer, h) for layer, h, _ in heads if layer in self.maps]
        return heads[0] if heads else (min(self.maps) if self.maps else 0, 0)

    def _check_head(self, layer: int, head: int) -> None:
        if not (0 <= layer < self.n_layers and 0 <= head < self.n_heads):
            raise ValueError(f"(layer {layer}, head {head}) out of range: the model has {self.n_layers} "
                             f"layers x {self.n_heads} heads")

    # ---- save / load ------------------------------------------------------------------------
    def to_safetensors(self, path: str | Path) -> Path:
        tensors = {"scores": self.scores, "n_obs": self.n_obs, "lengths": self.lengths}
        tensors.update({f"map.{layer}": m for layer, m in self.maps.items()})
        if self.stderr is not None:
            tensors["stderr"] = self.stderr
        meta = {"tokens": self.tokens, "params": {"tau": self.tau, "alpha": self.alpha, "eps": self.eps,
                                                  "min_queries": self.min_queries, "model": self.model,
                                                  "path": self.path}}
        return save_tensors(path, SINKS, tensors, meta, identity=self.identity)

    @classmethod
    def from_safetensors(cls, path: str | Path) -> SinkResult:
        """Read a sink result (a .safetensors file, or the directory `steer sinks --out` wrote)."""
        path = Path(path)
        if path.is_dir():
            path = path / "sinks.safetensors"
        stored = load_tensors(path, SINKS, untagged=1)
        meta, t = stored.meta, stored.tensors
        if stored.version == 1:  # before steer.io: the fields as JSON strings, no identity
            if not {"tokens", "params"} <= set(meta):
                raise FormatError(f"{path} is not a sink result (no steer format tag, no sink fields); create one "
                                  f"with {SINKS.make}")
            meta = {"tokens": json.loads(meta["tokens"]), "params": json.loads(meta["params"])}
        maps = {int(k.split(".")[1]): v for k, v in t.items() if k.startswith("map.")}
        return cls(t["scores"], t["n_obs"], t["lengths"], meta["tokens"], maps=maps, stderr=t.get("stderr"),
                   identity=stored.identity, **meta["params"])

    save = to_safetensors
    load = from_safetensors

    def check_model(self, model) -> None:
        """Raise steer.identity.ModelMismatchError unless `model` is the model these sinks were scored on
        (results saved before they carried an identity cannot be checked and pass)."""
        if self.identity is not None:
            check_model(self.identity, model, what="this sink result")


# ---- inputs ------------------------------------------------------------------------------------

def book_inputs(tok, n: int = 100, length: int = SINK_RATE_LENGTH, seed: int = 0) -> list[list[int]]:
    """`n` token sequences of exactly `length` tokens of book prose (consecutive book_cloze passages,
    joined), starting with the tokenizer's special prefix (BOS) when it adds one."""
    import random

    from steer.prompts import book_passages

    if n < 1 or length < 2:
        raise ValueError(f"need n >= 1 inputs of length >= 2 tokens (got n={n}, length={length})")
    passages = list(book_passages())
    random.Random(seed).shuffle(passages)
    prefix = tok("").input_ids  # BOS if the tokenizer adds one
    out, i = [], 0
    while len(out) < n:
        ids = list(prefix)
        while len(ids) < length:
            ids += tok(" " + passages[i % len(passages)], add_special_tokens=False).input_ids
            i += 1
        out.append(ids[:length])
    return out


def _tokenize(tok, inputs) -> list[list[int]]:
    if isinstance(inputs, torch.Tensor):
        return [row.tolist() for row in inputs]
    if not inputs:
        raise ValueError("no inputs given")
    if isinstance(inputs[0], str):
        if tok is None:
            raise ValueError("text inputs need a tokenizer")
        return [tok(t).input_ids for t in inputs]
    return [list(x) for x in inputs]


def _check_detect_options(tau, alpha, min_queries: int, candidates, sample_rows) -> list[int] | None:
    """Validate detect_sinks' options; the candidate positions sorted and deduplicated."""
    sink_threshold(tau, alpha, 1)  # validates the rule
    if min_queries < 1:
        raise ValueError(f"min_queries must be >= 1 (got {min_queries})")
    if candidates is not None and sample_rows is not None:
        raise ValueError("pass candidates (exact scores of a few positions) or sample_rows (estimates of every "
                         "position), not both")
    if candidates is not None:
        candidates = sorted({int(c) for c in candidates})
        if not candidates or candidates[0] < 0:
            raise ValueError(f"candidates must be a non-empty list of key positions >= 0 (got {candidates})")
    if sample_rows is not None and sample_rows < 2:
        raise ValueError(f"sample_rows must be >= 2 query rows (got {sample_rows}): a standard error needs two")
    return candidates


def _inputs(tok, inputs, pad_token_id: int | None) -> tuple[list[list[int]], int]:
    """(token id lists, the pad id: given, else the tokenizer's, else 0); an empty input is an error."""
    seqs = _tokenize(tok, inputs)
    if any(len(s) == 0 for s in seqs):
        raise ValueError("an input has no tokens")
    if pad_token_id is None:
        pad_token_id = getattr(tok, "pad_token_id", None) if tok is not None else None
    return seqs, 0 if pad_token_id is None else pad_token_id


def _collector(n_layers: int, keep_maps: bool, sample_rows: int | None, seed: int) -> _Collector:
    coll = _Collector(n_layers, keep_maps)
    coll.sample_rows = sample_rows
    coll.generator = torch.Generator().manual_seed(seed) if sample_rows is not None else None
    return coll


def _token_strings(tok, seqs) -> list[list[str]]:
    return [[tok.decode([t]) if tok is not None else str(t) for t in s] for s in seqs]


def _model_name(hf) -> str:
    cfg = getattr(hf.config, "text_config", None) or hf.config
    return str(getattr(hf.config, "_name_or_path", "") or cfg.model_type)


def _result_tensors(seqs, n_layers: int, n_heads: int, sampled: bool):
    """NaN-filled scores [n, L, H, T], zero observer counts [n, L, T], and standard errors if sampled."""
    t_max = max(len(s) for s in seqs)
    scores = torch.full((len(seqs), n_layers, n_heads, t_max), float("nan"))
    n_obs = torch.zeros((len(seqs), n_layers, t_max), dtype=torch.long)
    return scores, n_obs, torch.full_like(scores, float("nan")) if sampled else None


def _takes_exact_path(hf, force_exact: bool, fast_options: bool) -> bool:
    """Whether the eager-map path runs (forced, or the attention is not plain softmax); refuses the
    streaming-only options (candidates, sample_rows) there."""
    exact = force_exact or exact_path_reason(hf) is not None
    if exact and fast_options:
        why = "force_exact=True" if force_exact else exact_path_reason(hf)
        raise ValueError(f"candidates and sample_rows need the streaming path, but this call takes the exact path "
                         f"({why}), which reads whole maps anyway; drop them (the exact scores cost the same)")
    return exact


def _set_candidates(coll, batch, width: int, candidates: list[int]) -> None:
    """The absolute key columns of each row's candidates (left padding shifts them). Positions past an
    input's end are dropped; rows are padded with a repeat of their own first candidate (the same value
    written twice), or NaN-ed when none is in range."""
    rows = [[width - len(s) + c for c in candidates if c < len(s)] for s in batch]
    coll.candidates = torch.tensor([r + [r[0] if r else 0] * (len(candidates) - len(r)) for r in rows])
    coll.no_candidates = [b for b, r in enumerate(rows) if not r]


def _store_batch(coll, batch, start: int, width: int, n_layers: int, scores, n_obs, stderr) -> None:
    """Copy one batch's per-layer column sums into the result tensors, keys left-aligned per input."""
    if len(coll.col) != n_layers:
        raise RuntimeError(f"sink statistics came from {len(coll.col)} of {n_layers} layers")
    for layer in range(n_layers):
        col, obs = coll.col[layer], coll.obs[layer]
        for b, s in enumerate(batch):
            off = width - len(s)
            o = obs[b, off:]
            scores[start + b, layer, :, : len(s)] = col[b, :, off:] / o.clamp_min(1)
            n_obs[start + b, layer, : len(s)] = o
            if stderr is not None:
                stderr[start + b, layer, :, : len(s)] = coll.se[layer][b, :, off:] / o.clamp_min(1)


@torch.no_grad()
def detect_sinks(
    model,
    tok,
    inputs: Sequence[str] | Sequence[Sequence[int]] | torch.Tensor,
    *,
    tau: float | None = TAU,
    alpha: float | None = None,
    eps: float = EPS,
    min_queries: int = MIN_QUERIES,
    batch_size: int = 8,
    keep_maps: bool | None = None,
    pad_token_id: int | None = None,
    force_exact: bool = False,
    candidates: Sequence[int] | None = None,
    sample_rows: int | None = None,
    seed: int = 0,
) -> SinkResult:
    """Sink scores of every head for `inputs` (texts, or token id lists), batched with left padding.

    keep_maps: keep the per-head attention maps of the first input for `figure("map")` (default:
    when it has at most KEEP_MAPS_UP_TO tokens). force_exact: use the eager map path everywhere.
    candidates: score only these key positions (counted from each input's first token; positions past
    an input's end are skipped), exactly, at O(N |C| d) per head; the other scores are NaN.
    sample_rows: estimate every score from this many query rows per input and layer, drawn uniformly
    without replacement (generator seeded with `seed`): unbiased, standard errors in `result.stderr`.
    """
    candidates = _check_detect_options(tau, alpha, min_queries, candidates, sample_rows)
    hf = unwrap_model(model)
    mm = model_map(hf)
    cfg = getattr(hf.config, "text_config", None) or hf.config
    seqs, pad_token_id = _inputs(tok, inputs, pad_token_id)
    keep_maps = len(seqs[0]) <= KEEP_MAPS_UP_TO if keep_maps is None else keep_maps
    exact = _takes_exact_path(hf, force_exact, candidates is not None or sample_rows is not None)
    n_layers = mm.n_layers
    scores, n_obs, stderr = _result_tensors(seqs, n_layers, cfg.num_attention_heads, sample_rows is not None)
    coll = _collector(n_layers, keep_maps, sample_rows, seed)
    hook = _exact_hook(coll, cfg) if exact else _streaming_hook(coll)
    point = "blocks.*.attn.pattern" if exact else "blocks.*.attn.impl"
    device = next(hf.parameters()).device
    base = mm.module(mm.adapter.base)  # the decoder stack: no lm_head, no [B, T, vocab] logits
    maps: dict[int, torch.Tensor] = {}
    with attach(hf, {point: hook}):
        for start in range(0, len(seqs), batch_size):
            batch = seqs[start : start + batch_size]
            ids, mask = left_pad(batch, pad_token_id)
            width = ids.shape[1]
            coll.reset()
            coll.keep_maps = keep_maps and start == 0
            coll.unpadded = all(len(s) == width for s in batch)
            if candidates is not None:
                _set_candidates(coll, batch, width, candidates)
            base(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
            _store_batch(coll, batch, start, width, n_layers, scores, n_obs, stderr)
            if coll.keep_maps:
                off = width - len(batch[0])
                maps = {layer: m[:, off:, off:].clone() for layer, m in coll.maps.items()}
    path = "exact" if exact else "candidates" if candidates is not None else "sampled" if sample_rows else "streaming"
    return SinkResult(scores, n_obs, torch.tensor([len(s) for s in seqs]), _token_strings(tok, seqs), tau=tau,
                      alpha=alpha, eps=eps, min_queries=min_queries, model=_model_name(hf), path=path, maps=maps,
                      stderr=stderr, identity=model_identity(hf))


def sink_rate_interval(result: SinkResult, eps: float | None = None, z: float = 1.96) -> tuple[float, float]:
    """Normal-approximation 95% interval of the sink rate over inputs (per-input rates vary)."""
    eps = result.eps if eps is None else eps
    per_input = (result.first > eps).float().mean((1, 2))
    m, s = float(per_input.mean()), float(per_input.std()) if result.n_inputs > 1 else 0.0
    half = z * s / math.sqrt(max(result.n_inputs, 1))
    return (max(0.0, m - half), min(1.0, m + half))
