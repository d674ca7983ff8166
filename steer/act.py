"""ACT: attention calibration at inference time (Yu et al., ICML 2024), for selected heads only.

Per selected head and query row (ALGORITHMS.md section 2):
1. detect the row's sinks: keys with sink score s_k > tau (or alpha / N) that at least `min_queries`
   queries observe (steer.sinks); keep the first real token (BOS/initial sink) untouched;
2. scale the other sink columns by beta;
3. give the freed mass (1 - beta) * P_S to the remaining keys in proportion to their attention, so
   every row still sums to 1.
The math runs in `steer.kernels.act` (fp32 softmax, no N x N map on the fused path); this module decides
which keys are sinks, per sequence and per head, and keeps them for decode steps.

Fixed here, unlike the released code: every row of a batch is calibrated (not only map[0]); left
padding is ignored (the kept initial sink is each row's first REAL token, never a pad); on decode
steps the prefill's per-head sink sets are reused at their absolute key positions (rows keep summing
to 1, A[0, 0] is never forced); late keys need `min_queries` observers; if the first token is not a
sink nothing is dropped from the sink set for it; GQA query heads are selected individually.
tests/test_act_parity.py checks this against the released code's outputs on SmolLM2's maps: equal
where that code is right, and both behaviours where steer deliberately differs (late keys, first token).

Head selection (which heads to calibrate) lives in steer.act_search; its result is an `ACTConfig`.

    cfg = ACTConfig(heads=[(26, 1), (11, 1)])  # or steer.act_search.calibrate_heads(...)
    with ACTConfig.load("act.json").intervention().apply(model) as act:
        model.generate(...)
    act.touched   # rows rescaled per layer
"""

from __future__ import annotations

import json
import numbers
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from steer.adapters import ModelMap, plain_attention_families
from steer.hooks import HookContext, HookFn
from steer.identity import check_model
from steer.interventions import Intervention, OnNoEffect
from steer.io import ACT_CONFIG, json_doc, read_doc
from steer.sinks import MIN_QUERIES, TAU, exact_path_reason, sink_threshold

BETA = 0.4  # the ACT code's default scale for non-initial sinks


def _n_heads(mm: ModelMap) -> int:
    cfg = getattr(mm.config, "text_config", None) or mm.config
    return cfg.num_attention_heads


def check_heads(mm: ModelMap, heads: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Validated (layer, head) pairs, or an error naming the model's ranges."""
    n_layers, n_heads = mm.n_layers, _n_heads(mm)
    out = []
    for pair in heads:
        if len(pair) != 2:
            raise ValueError(f"heads must be (layer, head) pairs, got {pair!r}")
        layer, head = int(pair[0]), int(pair[1])
        if not (0 <= layer < n_layers and 0 <= head < n_heads):
            raise ValueError(
                f"head (layer {layer}, head {head}) is out of range: this model has {n_layers} layers "
                f"(0..{n_layers - 1}) x {n_heads} query heads (0..{n_heads - 1})"
            )
        out.append((layer, head))
    return sorted(set(out))


class UnsupportedAttentionError(ValueError):
    """ACT asked of a model whose attention is not plain softmax(q k^T * scale)."""


def _refuse_unsupported(model) -> None:
    reason = exact_path_reason(model)
    if reason is not None:
        raise UnsupportedAttentionError(
            f"ACT does not support this model: {reason}, while ACT (steer.kernels.act) calibrates plain softmax(q k^T) "
            f"attention and would compute something else here. Fix: run ACT on a model with plain softmax "
            f"attention (families without an attention quirk: {plain_attention_families()}); for this model, study its sinks with "
            f"steer.sinks.detect_sinks, which reads the exact probabilities"
        )


def _check_beta(beta: float) -> float:
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real):
        raise ValueError(f"beta must be a number in (0, 1], got {beta!r}")
    beta = float(beta)
    if not 0 < beta <= 1:
        raise ValueError(f"beta must be in (0, 1] (got {beta}): it scales the sink columns; 1 leaves "
                         f"attention unchanged, the ACT code uses {BETA}")
    return beta


@dataclass
class _LayerState:
    sinks: torch.Tensor  # Bool[B, H, P]: calibrated sink columns of the prefill (absolute key columns)
    batch: int
    seen: int  # key columns this layer has seen so far (prefill + decoded tokens)
    cols: torch.Tensor | None = None  # lse path: Long[B, Hs, S] sink columns of the calibrated heads
    valid: torch.Tensor | None = None  # Bool[B, Hs, S]
    sink_kv: tuple | None = None  # lse path: (scaled sink keys, sink values) fp32 [B, Hs, S, D], for decode steps
    end: int = 0  # lse path: 1 + the last sink column (0: no sinks); a cache starting at or past it holds none
    start: int = 0  # lse path: the first sink column still valid; a cache starting past it dropped a sink
    all_valid: bool = False  # lse path: every entry of `valid` is True (a decode row may take the one-row path)


class ACT(Intervention):
    """Attention calibration on `heads` [(layer, head)]; `touched` counts the rows rescaled.

    path: "lse" computes attention with SDPA's fused kernel plus its row log-sum-exp, the sink scores
    of the calibrated heads from that lse, and ACT as o' = beta o_S + c (o - o_S) (steer.kernels.lse:
    O(N |S| d) on top of SDPA, decode steps O(|S| d)); "kernel" runs steer.kernels.act.act_attention
    (the Triton flash kernel on CUDA, the exact fp32 reference on CPU); "auto" = "lse" on CPU, "kernel"
    on CUDA. Both give the same numbers within fp32 tolerance (tests/test_act.py)."""

    path = "auto"

    def __init__(self, heads: Sequence[tuple[int, int]], beta: float = BETA, tau: float | None = TAU,
                 alpha: float | None = None, min_queries: int = MIN_QUERIES, keep_first: bool = True,
                 on_no_effect: OnNoEffect = "raise", identity: dict | None = None):
        super().__init__(on_no_effect)
        self.identity = identity  # the model the heads were calibrated on (ACTConfig's); checked in validate
        if not heads:
            raise ValueError("ACT needs at least one (layer, head); a calibration that kept no head "
                             "means ACT did not help on that calibration set -- run the model without it")
        self.heads = [(int(a), int(b)) for a, b in heads]
        self.beta = _check_beta(beta)
        sink_threshold(tau, alpha, 1)
        if min_queries < 1:
            raise ValueError(f"min_queries must be >= 1 (got {min_queries})")
        self.tau, self.alpha, self.min_queries, self.keep_first = tau, alpha, int(min_queries), keep_first
        self._state: dict[int, _LayerState] = {}

    def validate(self, mm: ModelMap) -> None:
        if self.identity is not None:  # heads calibrated on one model mean nothing on another of the same shape
            check_model(self.identity, mm.model, what="this ACT config")
        self.heads = check_heads(mm, self.heads)
        _refuse_unsupported(mm.model)

    def reset(self) -> None:
        super().reset()
        self._state = {}

    # -- sink sets ---------------------------------------------------------------------------
    def prefill_sinks(self, q, k, scale: float, mask, window) -> torch.Tensor:
        """Bool[B, H, Tk]: calibrated sink columns (the kept first real token excluded)."""
        from steer.kernels.act import sink_stats

        col, n_obs = sink_stats(q, k, scale=scale, mask=mask, sliding_window=window)
        return self.sink_sets(col, n_obs)

    def sink_sets(self, col: torch.Tensor, n_obs: torch.Tensor) -> torch.Tensor:
        """Sinks from column sums [B, H, Tk] and observer counts [B, 1, Tk] (the detection rule)."""
        real = n_obs[:, 0] > 0  # [B, Tk]: a real key is observed at least by itself
        score = col / n_obs.clamp_min(1)
        thr = sink_threshold(self.tau, self.alpha, real.sum(-1).cpu()).to(score.device)
        sinks = (score > thr.view(-1, 1, 1)) & (n_obs >= self.min_queries) & real.unsqueeze(1)
        if self.keep_first:
            first = real.int().argmax(-1)  # first real key of each row (left padding skipped)
            sinks[torch.arange(sinks.shape[0], device=sinks.device), :, first] = False
        return sinks

    # -- the probability path (TransformerLens hook_pattern, other eager engines) -------------
    def calibrate_probs(self, layer: int, probs: torch.Tensor, token_mask: torch.Tensor | None = None,
                        sliding_window: int | None = None) -> torch.Tensor:
        """ACT on a whole-input probability map [B, H, T, T] of `layer` (prefill, causal).

        For engines that expose attention probabilities but do not call steer's attention function
        (TransformerLens bridges compute attention in their own classes). token_mask: Bool[B, T] real
        tokens (None = no padding). Costs an N x N map per layer; steer's attn.impl path does not."""
        b, n_heads, t, tk = probs.shape
        if t != tk:
            raise ValueError("calibrate_probs handles whole inputs (no KV cache); use ACT.apply() for generation")
        heads = [h for layer_, h in self.heads if layer_ == layer]
        if not heads:
            return probs
        tm = torch.ones(b, t, dtype=torch.bool, device=probs.device) if token_mask is None else \
            token_mask.bool().to(probs.device)
        i = torch.arange(t, device=probs.device)
        vis = (i[None, :] <= i[:, None])
        if sliding_window is not None:
            vis = vis & ((i[:, None] - i[None, :]) < sliding_window)
        vis = vis[None] & tm[:, None, :] & tm[:, :, None]  # [B, Tq, Tk]
        p = probs.float() * vis[:, None]
        n_obs = vis.sum(1, dtype=torch.int64)[:, None]  # [B, 1, Tk]
        sinks = self.sink_sets(p.sum(2), n_obs)
        head_mask = torch.zeros(n_heads, dtype=torch.bool, device=probs.device)
        head_mask[heads] = True
        s = (sinks & head_mask[None, :, None])[:, :, None, :]  # [B, H, 1, Tk]
        p_s = torch.where(s, p, 0.0).sum(-1, keepdim=True)
        p_r = torch.where(s, 0.0, p).sum(-1, keepdim=True)
        rescale = head_mask[None, :, None, None] & (p_s > 0) & (p_r > 0)
        c = (p_r + (1 - self.beta) * p_s) / torch.where(rescale, p_r, 1.0)
        out = torch.where(rescale, torch.where(s, self.beta * p, c * p), p)
        self.count(f"blocks.{layer}.attn.pattern", rescale.sum())
        return torch.where(vis[:, None].any(-1, keepdim=True), out, probs.float()).to(probs.dtype)

    def transformer_lens_hooks(self, token_mask: torch.Tensor | None = None) -> list[tuple[str, Callable]]:
        """`fwd_hooks` for `bridge.run_with_hooks(...)` on a TransformerLens bridge: ACT on hook_pattern.
        Pass the batch's attention mask as token_mask when it is padded; `touched` counts as usual."""
        layers = sorted({layer for layer, _ in self.heads})
        return [(f"blocks.{layer}.attn.hook_pattern",
                 lambda pattern, hook, layer=layer: self.calibrate_probs(layer, pattern, token_mask))
                for layer in layers]

    def _decode_sinks(self, layer: int, b: int, tq: int, tk: int, device) -> torch.Tensor:
        state, offset = self._decode_state(layer, b, tq, tk)
        p = state.sinks.shape[-1]
        sinks = torch.zeros(b, state.sinks.shape[1], tk, dtype=torch.bool, device=device)
        n = max(0, min(tk, p - offset))
        if n:
            sinks[:, :, :n] = state.sinks[:, :, offset : offset + n].to(device)
        return sinks

    def _decode_state(self, layer: int, b: int, tq: int, tk: int) -> tuple[_LayerState, int]:
        """This layer's prefill state and the absolute column of key 0 in this decode step."""
        state = self._state.get(layer)
        if state is None:
            raise RuntimeError(
                "ACT saw a decode step (KV cache not empty) without the prefill of this sequence; apply ACT "
                "before the prompt is processed (wrap the whole generate() call)"
            )
        if state.batch != b:
            raise RuntimeError(f"ACT's prefill had batch {state.batch}, this decode step has {b} rows "
                               f"(beam search / reordered caches are not supported)")
        state.seen += tq
        offset = state.seen - tk  # absolute column of key 0 (> 0 when a sliding cache dropped old keys)
        if offset < 0:
            raise RuntimeError(f"the cache holds {tk} keys but ACT saw only {state.seen} positions of this "
                               f"sequence; apply ACT before the prompt is processed")
        return state, offset

    # -- hooks -------------------------------------------------------------------------------
    def hooks(self, mm: ModelMap) -> dict[str, HookFn]:
        by_layer: dict[int, list[int]] = {}
        for layer, head in self.heads:
            by_layer.setdefault(layer, []).append(head)
        n_heads = _n_heads(mm)
        return {f"blocks.{layer}.attn.impl": self._layer_fn(layer, heads, n_heads)
                for layer, heads in by_layer.items()}

    def _layer_fn(self, layer: int, heads: list[int], n_heads: int) -> Callable:
        head_mask = torch.zeros(n_heads, dtype=torch.bool)
        head_mask[heads] = True
        on_device: dict[torch.device, torch.Tensor] = {}  # one host-to-device copy per device, not per call
        head_idx: dict[torch.device, torch.Tensor] = {}

        def fn(call, ctx: HookContext):
            from steer.kernels.act import act_attention

            q, k, v = call.query, call.key, call.value
            mask, window = call.kernel_mask()  # plain causal or causal + window: the kernels' mask=None paths
            b, _, tq, _ = q.shape
            tk = k.shape[2]
            path = self.path if self.path != "auto" else ("kernel" if q.is_cuda else "lse")
            if path == "lse":
                idx = head_idx.get(q.device)
                if idx is None:
                    idx = head_idx[q.device] = torch.tensor(heads, dtype=torch.long, device=q.device)
                out, touched = self._lse_call(layer, idx, n_heads, q, k, v, call.scaling, mask, window,
                                              head=heads[0] if len(heads) == 1 else None)
                self.count(ctx.point, touched)
                if out is None:  # ACT changes nothing here: the model's own attention, same numbers as without it
                    return call.base()
                return out.transpose(1, 2).contiguous(), None
            if path != "kernel":
                raise ValueError(f"ACT.path must be 'auto', 'lse' or 'kernel' (got {path!r})")
            if tq == tk:  # prefill: no cached keys (a decode step always has more keys than queries)
                sinks = self.prefill_sinks(q, k, call.scaling, mask, window)
                self._state[layer] = _LayerState(sinks.detach(), b, tk)
            else:
                sinks = self._decode_sinks(layer, b, tq, tk, q.device)
            dev_mask = on_device.get(q.device)
            if dev_mask is None:
                dev_mask = on_device[q.device] = head_mask.to(q.device)
            out, touched = act_attention(q, k, v, scale=call.scaling, sink_mask=sinks,
                                         head_mask=dev_mask, beta=self.beta, mask=mask,
                                         sliding_window=window)
            self.count(ctx.point, touched)
            return out.transpose(1, 2).contiguous(), None

        return fn

    def _lse_call(self, layer, heads, n_heads, q, k, v, scale, mask, window, head=None):
        """ACT on `heads` (Long) of one attention call through steer.kernels.lse: (out [B, H, Tq, Dv], touched);
        out None on decode steps whose cache holds none of this layer's sinks (ACT changes nothing there).
        head: the one head as a Python int when the layer has one (the one-row decode path uses it)."""
        from steer.kernels.lse import (
            act_decode_from_lse,
            act_from_lse,
            attention_head_lse,
            attention_lse,
            gather_sinks,
            sink_index,
            sink_stats_lse,
        )

        b, _, tq, _ = q.shape
        tk = k.shape[2]
        if tq == tk:  # prefill: exact sink scores of the calibrated heads only, from the lse just computed
            out, lse = attention_lse(q, k, v, scale=scale, mask=mask, sliding_window=window)
            col, n_obs = sink_stats_lse(q, k, lse, scale=scale, mask=mask, sliding_window=window, heads=heads)
            sinks = self.sink_sets(col, n_obs)  # [B, Hs, Tk]
            _, cols, valid = sink_index(sinks, torch.ones(sinks.shape[1], dtype=torch.bool, device=q.device))
            full = torch.zeros(b, n_heads, tk, dtype=torch.bool, device=q.device)
            full[:, heads] = sinks
            sink_kv = gather_sinks(k, v, heads=heads, cols=cols, scale=scale, n_heads=n_heads)
            self._state[layer] = _LayerState(full, b, tk, cols, valid, sink_kv, *_sink_range(cols, valid),
                                             all_valid=bool(valid.all()))
        else:  # decode: the prefill's sink columns at their absolute positions, O(|S| d) per row
            state, offset = self._decode_state(layer, b, tq, tk)
            if state.cols is None:
                raise RuntimeError("ACT's prefill of this sequence ran on another path; keep ACT.path fixed "
                                   "for a whole generate() call")
            if state.end <= offset:  # no sink of this layer in the cache (none found, or slid out): no change
                return None, 0
            if mask is not None and tq == 1 and mask.device.type == "cpu" and bool(mask.all()):
                mask = None  # one row that sees every key (a sliding cache no longer than its window)
            out, lse = attention_head_lse(q, k, v, scale=scale, heads=heads, mask=mask, sliding_window=window)
            if offset > state.start:  # a sliding cache dropped sinks (offset only grows: they stay dropped)
                state.valid = state.valid & (state.cols >= offset)
                state.end, state.start = _sink_range(state.cols, state.valid)
                state.all_valid = bool(state.valid.all())
            if window is None or tk <= window:  # steer's mask (if any) holds padding and window
                return act_decode_from_lse(q, out, lse, heads=heads, ks=state.sink_kv[0], vs=state.sink_kv[1],
                                           valid=state.valid, beta=self.beta, n_keys=tk, cols=state.cols, k=k, v=v,
                                           scale=scale, mask=mask, offset=offset, head=head,
                                           all_valid=state.all_valid)
            cols, valid = (state.cols - offset).clamp_min(0), state.valid
        return act_from_lse(q, k, v, out, lse, scale=scale, heads=heads, cols=cols, valid=valid, beta=self.beta,
                            mask=mask, sliding_window=window)


def _sink_range(cols: torch.Tensor, valid: torch.Tensor) -> tuple[int, int]:
    """(1 + the last valid sink column, the first valid one) of Long cols / Bool valid [B, Hs, S]; (0, 0)
    without valid sinks. Python ints, so a decode step decides without tensor operations whether its cache
    holds a sink and whether one has left it."""
    if not bool(valid.any()):
        return 0, 0
    return int(cols[valid].max()) + 1, int(cols[valid].min())


@dataclass
class ACTConfig:
    """The calibrated heads plus the ACT parameters; `search` records how the heads were chosen."""

    heads: list[tuple[int, int]]
    beta: float = BETA
    tau: float | None = TAU
    alpha: float | None = None
    min_queries: int = MIN_QUERIES
    keep_first: bool = True
    model: str = ""  # the model's name; `identity` is what a check compares
    search: dict = field(default_factory=dict)
    identity: dict | None = None  # steer.identity.model_identity of the model the heads were calibrated on

    def __post_init__(self):
        self.heads = [(int(a), int(b)) for a, b in self.heads]
        _check_beta(self.beta)
        sink_threshold(self.tau, self.alpha, 1)

    def intervention(self, on_no_effect: OnNoEffect = "raise") -> ACT:
        """The ACT intervention; applying it to another model than `identity` names is a ModelMismatchError
        (to transfer heads on purpose, apply `dataclasses.replace(config, identity=None).intervention()`)."""
        return ACT(self.heads, beta=self.beta, tau=self.tau, alpha=self.alpha, min_queries=self.min_queries,
                   keep_first=self.keep_first, on_no_effect=on_no_effect, identity=self.identity)

    def to_json(self) -> str:
        fields_ = {k: v for k, v in asdict(self).items() if k != "identity"}
        return json.dumps(json_doc(ACT_CONFIG, {"method": "act", **fields_}, self.identity), indent=2)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json())
        return path

    @classmethod
    def from_json(cls, text: str, where: str | Path = "<ACT config>") -> ACTConfig:
        stored = read_doc(json.loads(text), ACT_CONFIG, where, untagged=1)  # untagged: saved before steer.io
        d = stored.meta
        if d.pop("method", "act") != "act":
            raise ValueError("not an ACT config (its 'method' field is not 'act')")
        return cls(**d, identity=stored.identity)

    @classmethod
    def load(cls, path: str | Path) -> ACTConfig:
        return cls.from_json(Path(path).read_text(), where=path)

    def check_model(self, model) -> None:
        """Raise steer.identity.ModelMismatchError unless `model` is the model the heads were calibrated
        on (configs saved before they carried an identity cannot be checked and pass)."""
        if self.identity is not None:
            check_model(self.identity, model, what="this ACT config")

    def to_dataframe(self):
        """The search: one row per candidate head (gain alone, kept, chosen)."""
        import pandas as pd

        rows = self.search.get("candidates", [])
        return pd.DataFrame(rows, columns=["layer", "head", "hidden_sink_fraction", "correct", "gain", "kept",
                                           "chosen", "rows_touched"])
