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

Head selection (`calibrate_heads`) is a one-head-at-a-time search on a calibration split with this
keep rule (the paper leaves it implicit):
  a. candidates: every head that shows a hidden (non-initial) sink on the calibration prompts -- ACT
     is the identity elsewhere;
  b. screening, when there are more than `shortlist` candidates: every candidate is scored by the
     change of mean log P(right option) that ACT on it alone makes -- by default estimated to first
     order for all heads at once (`attribution_screen`: attribution patching, one forward + backward
     per batch on the whole calibration set), or exactly, each head alone on `screen_items` items
     per task (screen="exact"); the best `shortlist` heads with a positive score go on. The score is
     continuous, so it ranks heads where an item count on few items would be ties;
  c. baseline: items right without ACT on the whole calibration set; each shortlisted head alone:
     gain = items right - baseline; keep a head if gain >= `min_gain` items (default 1);
  d. combine greedily: add kept heads in order of gain, accepting one only if the combination gets
     strictly more items right than the best set so far (baseline included).
Steps b (exact) and c use `sweep_heads`, which reruns only the layers from the head's layer on (the
earlier layers are the baseline's): half the compute of whole forwards, same numbers.
The result is an `ACTConfig` (JSON) naming the heads; `config.intervention()` applies it.

    cfg = calibrate_heads(model, tok, task_suite("calibration", n=30))  # all heads, screened
    cfg.save("act.json")
    with ACTConfig.load("act.json").intervention().apply(model) as act:
        model.generate(...)
    act.touched   # rows rescaled per layer
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from steer.adapters import ModelMap, model_map
from steer.hooks import HookContext, HookFn, unwrap_model
from steer.interventions import Intervention, OnNoEffect
from steer.sinks import MIN_QUERIES, TAU, exact_path_reason, sink_threshold

BETA = 0.4  # the ACT code's default scale for non-initial sinks
MIN_GAIN = 1  # calibration items a head must add over baseline to be kept
MIN_CALIBRATION_ITEMS = 20  # below this, one item is > 5% accuracy: the search is noise
SHORTLIST = 16  # heads the screening pass sends on to the keep rule on the whole calibration set
SCREEN_ITEMS = 8  # calibration items per task in the screening pass (every candidate head)


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
            f"attention (llama, qwen2, gemma3, mistral, the MoE families); for this model, study its sinks with "
            f"steer.sinks.detect_sinks, which reads the exact probabilities"
        )


def _check_beta(beta: float) -> float:
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
                 on_no_effect: OnNoEffect = "raise"):
        super().__init__(on_no_effect)
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
            mask = None if call.causal else call.mask  # plain causal: the kernels' mask=None fast path
            window = call.sliding_window if mask is None else None  # steer's mask holds the window
            b, _, tq, _ = q.shape
            tk = k.shape[2]
            path = self.path if self.path != "auto" else ("kernel" if q.is_cuda else "lse")
            if path == "lse":
                idx = head_idx.get(q.device)
                if idx is None:
                    idx = head_idx[q.device] = torch.tensor(heads, dtype=torch.long, device=q.device)
                out, touched = self._lse_call(layer, idx, n_heads, q, k, v, call.scaling, mask, window)
                self.count(ctx.point, touched)
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

    def _lse_call(self, layer, heads, n_heads, q, k, v, scale, mask, window):
        """ACT on `heads` (Long) of one attention call through steer.kernels.lse: (out [B, H, Tq, Dv], touched)."""
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
            self._state[layer] = _LayerState(full, b, tk, cols, valid, sink_kv)
        else:  # decode: the prefill's sink columns at their absolute positions, O(|S| d) per row
            state, offset = self._decode_state(layer, b, tq, tk)
            if state.cols is None:
                raise RuntimeError("ACT's prefill of this sequence ran on another path; keep ACT.path fixed "
                                   "for a whole generate() call")
            out, lse = attention_head_lse(q, k, v, scale=scale, heads=heads, mask=mask, sliding_window=window)
            cols, valid = state.cols, state.valid
            if offset:  # a sliding cache dropped the oldest keys: shift, and drop the sinks that left
                cols = cols - offset
                valid = valid & (cols >= 0)
                cols = cols.clamp_min(0)
            if window is None or tk <= window:  # steer's mask (if any) holds padding and window
                return act_decode_from_lse(q, out, lse, heads=heads, ks=state.sink_kv[0], vs=state.sink_kv[1],
                                           valid=valid, beta=self.beta, n_keys=tk, cols=cols, k=k, v=v, scale=scale,
                                           mask=mask)
        return act_from_lse(q, k, v, out, lse, scale=scale, heads=heads, cols=cols, valid=valid, beta=self.beta,
                            mask=mask, sliding_window=window)


@dataclass
class ACTConfig:
    """The calibrated heads plus the ACT parameters; `search` records how the heads were chosen."""

    heads: list[tuple[int, int]]
    beta: float = BETA
    tau: float | None = TAU
    alpha: float | None = None
    min_queries: int = MIN_QUERIES
    keep_first: bool = True
    model: str = ""
    search: dict = field(default_factory=dict)

    def __post_init__(self):
        self.heads = [(int(a), int(b)) for a, b in self.heads]
        _check_beta(self.beta)
        sink_threshold(self.tau, self.alpha, 1)

    def intervention(self, on_no_effect: OnNoEffect = "raise") -> ACT:
        return ACT(self.heads, beta=self.beta, tau=self.tau, alpha=self.alpha, min_queries=self.min_queries,
                   keep_first=self.keep_first, on_no_effect=on_no_effect)

    def to_json(self) -> str:
        return json.dumps({"method": "act", **asdict(self)}, indent=2)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def from_json(cls, text: str) -> ACTConfig:
        d = json.loads(text)
        if d.pop("method", "act") != "act":
            raise ValueError("not an ACT config (its 'method' field is not 'act')")
        return cls(**d)

    @classmethod
    def load(cls, path: str | Path) -> ACTConfig:
        return cls.from_json(Path(path).read_text())

    def to_dataframe(self):
        """The search: one row per candidate head (gain alone, kept, chosen)."""
        import pandas as pd

        rows = self.search.get("candidates", [])
        return pd.DataFrame(rows, columns=["layer", "head", "hidden_sink_fraction", "correct", "gain", "kept",
                                           "chosen", "rows_touched"])


def _items_of(calibration) -> list:
    from steer.tasks import TaskSplit

    splits = [calibration] if isinstance(calibration, TaskSplit) else list(calibration)
    for s in splits:
        if s.split != "calibration":
            raise ValueError(f"calibrate_heads got the {s.split!r} split of {s.task!r}: calibrate on "
                             f"'calibration' items only, keep 'heldout' for the evaluation")
    return splits


# ---- one-head-at-a-time sweeps -----------------------------------------------------------------

@dataclass
class HeadSweep:
    """Option scores of the same items without ACT and with ACT on each head alone."""

    items: list
    baseline: list[list[float]]  # [item][option] summed log-probabilities
    per_head: dict[tuple[int, int], list[list[float]]]
    touched: dict[tuple[int, int], int]
    path: str  # "suffix": layers before the head's layer reused from the baseline; "full": whole forwards

    def result(self, head: tuple[int, int] | None = None):
        """EvalResult of the baseline (head None) or of ACT on one head."""
        from steer.tasks import EvalResult

        lps = self.baseline if head is None else self.per_head[head]
        its = self.items
        return EvalResult([it.task for it in its], [it.uid for it in its],
                          torch.tensor([it.answer for it in its]), lps, [it.chance for it in its])

    def delta_logp(self, head: tuple[int, int]) -> float:
        """Mean change of log P(right option | options): a continuous screening score (an item count
        on a few items moves in steps of several percent; this moves with every item's margin)."""
        def lp(scores):
            return torch.stack([torch.log_softmax(torch.tensor(sc), 0)[it.answer]
                                for sc, it in zip(scores, self.items)])
        return float((lp(self.per_head[head]) - lp(self.baseline)).mean())


def _layer_runner(hf, mm: ModelMap):
    """Run decoder layers from `start` on captured inputs, then final norm + lm_head on the last positions."""
    layers = [mm.layer(i) for i in range(mm.n_layers)]
    norm = mm.module(mm.adapter.final_norm)
    head = mm.module(mm.adapter.lm_head)
    cfg = getattr(hf.config, "text_config", None) or hf.config
    cap = getattr(cfg, "final_logit_softcapping", None)

    def run(captured: list, start: int, keep: int) -> torch.Tensor:
        h = captured[start][0]
        for i in range(start, len(layers)):
            out = layers[i](h, **captured[i][1])
            h = out[0] if isinstance(out, tuple) else out
        logits = head(norm(h)[:, -keep:])
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    return layers, run


@torch.no_grad()
def sweep_heads(model, tok, items: Sequence, heads: Sequence[tuple[int, int]], *, batch_size: int = 16,
                fast: bool = True, progress: Callable[[str], None] | None = None, **params) -> HeadSweep:
    """Score `items` without ACT and with ACT on each head of `heads` alone (ACT(**params)).

    fast: per batch, run the model once (ACT-free, through steer's attention function, as every ACT
    run) capturing each decoder layer's inputs; a head in layer l then reruns only layers l..L-1 from
    the captured input of layer l -- the layers before l are exactly those of the baseline, since ACT
    changes nothing there. About half the compute of whole forwards, same numbers (tested). The first
    batch is checked: replaying all layers must reproduce the captured forward's logits, or this
    raises (pass fast=False for whole forwards on such a model)."""
    from steer import attention
    from steer.tasks import batches, evaluate, read_scores

    hf = unwrap_model(model)
    mm = model_map(hf)
    heads = check_heads(mm, heads)
    say = progress or (lambda msg: None)
    items = list(items)
    if not fast:
        from steer.tasks import TaskSplit

        split = [TaskSplit("sweep", "calibration", 0, items)]
        base = evaluate(hf, tok, split, batch_size=batch_size).logprobs
        per_head, touched = {}, {}
        for n, hd in enumerate(heads):
            act = ACT([hd], on_no_effect="ignore", **params)
            per_head[hd] = evaluate(hf, tok, split, batch_size=batch_size, interventions=[act]).logprobs
            touched[hd] = act.total_touched
            say(f"head {hd} ({n + 1}/{len(heads)})")
        return HeadSweep(items, base, per_head, touched, "full")

    layers, run = _layer_runner(hf, mm)
    attn_modules = {i: mm.module(f"{mm.adapter.layers}.{i}.{mm.adapter.attn}") for i in range(mm.n_layers)}
    device = next(hf.parameters()).device
    base = [[0.0] * len(it.options) for it in items]
    per_head = {hd: [[0.0] * len(it.options) for it in items] for hd in heads}
    acts = {hd: ACT([hd], on_no_effect="ignore", **params) for hd in heads}
    touched = dict.fromkeys(heads, 0)
    all_batches = batches(tok, items, batch_size)
    for n, batch in enumerate(all_batches):
        captured: list = [None] * len(layers)

        def grab(i, captured=captured):
            def hook(module, args, kwargs):
                h = args[0] if args else kwargs["hidden_states"]
                captured[i] = (h, {k: v for k, v in kwargs.items() if k != "hidden_states"})
            return hook

        handles = [layer.register_forward_pre_hook(grab(i), with_kwargs=True) for i, layer in enumerate(layers)]
        try:
            with attention.activate(hf, attn_modules, {}, {}):
                logits = hf(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                            use_cache=False, logits_to_keep=batch.keep).logits
                if n == 0:
                    replay = run(captured, 0, batch.keep)
                    if not torch.allclose(replay.float(), logits.float(), atol=1e-4, rtol=1e-4):
                        raise RuntimeError(
                            f"replaying the decoder layers of this {hf.config.model_type} model does not reproduce "
                            f"its forward (max diff {float((replay - logits).abs().max()):.2e}); the layer-suffix "
                            f"shortcut does not apply: call with fast=False")
        finally:
            for h in handles:
                h.remove()
        read_scores(batch, logits, base)
        for hd in heads:
            with acts[hd].apply(hf):  # apply() restarts the counts: add them up per batch
                read_scores(batch, run(captured, hd[0], batch.keep), per_head[hd])
            touched[hd] += acts[hd].total_touched
        say(f"batch {n + 1}/{len(all_batches)}: {len(heads)} heads")
    return HeadSweep(items, base, per_head, touched, "suffix")


def attribution_screen(model, tok, items: Sequence, *, batch_size: int = 16, **params) -> dict:
    """First-order estimate of every head's ACT effect on mean log P(right option), all heads at once.

    Attribution patching (Nanda 2023; Syed et al. 2023): with o_h the attention output of head h
    (before o_proj) and d_h = o_h(ACT on h) - o_h, the change of the objective J when ACT is applied to
    head h alone is about sum(dJ/do_h * d_h) -- exact to first order, since ACT on one head changes
    only that head's output in its layer. One forward without gradients (baseline scores, which fix
    dJ/dscores), then one forward + backward per batch give all heads' estimates: about three
    forwards in all instead of one per head. Returns {(layer, head): estimate}."""
    from steer.hooks import attach
    from steer.kernels.act import act_attention
    from steer.tasks import batches, read_scores

    hf = unwrap_model(model)
    mm = model_map(hf)
    _refuse_unsupported(hf)
    n_layers, n_heads = mm.n_layers, _n_heads(mm)
    items = list(items)
    device = next(hf.parameters()).device
    all_batches = batches(tok, items, batch_size)
    base = [[0.0] * len(it.options) for it in items]
    with torch.no_grad():
        for batch in all_batches:
            logits = hf(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                        use_cache=False, logits_to_keep=batch.keep).logits
            read_scores(batch, logits, base)
    # J = mean_i log softmax(scores_i)[answer_i]; dJ/dscore_ij = (1[j = answer] - softmax(scores_i)_j) / n
    weights = []
    for sc, it in zip(base, items):
        w = -torch.softmax(torch.tensor(sc, dtype=torch.float64), 0)
        w[it.answer] += 1
        weights.append((w / len(items)).tolist())
    act = ACT([(layer, h) for layer in range(n_layers) for h in range(n_heads)], on_no_effect="ignore", **params)
    every = torch.ones(n_heads, dtype=torch.bool, device=device)
    none = torch.zeros(n_heads, dtype=torch.bool, device=device)
    est = torch.zeros(n_layers, n_heads, dtype=torch.float64)
    saved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def fn(call, ctx):
        q, k, v, mask = call.query, call.key, call.value, call.mask
        window = call.sliding_window if mask is None else None
        with torch.no_grad():
            sinks = act.prefill_sinks(q, k, call.scaling, mask, window)
            calibrated, _ = act_attention(q, k, v, scale=call.scaling, sink_mask=sinks, head_mask=every,
                                          beta=act.beta, mask=mask, sliding_window=window)
        out, _ = act_attention(q, k, v, scale=call.scaling, sink_mask=sinks, head_mask=none, beta=act.beta,
                               mask=mask, sliding_window=window, backend="torch")  # plain attention, differentiable
        if out.requires_grad:
            out.retain_grad()
        else:  # the first layers see no tensor that needs a gradient: start the graph here
            out.requires_grad_(True)
        saved[ctx.layer] = (out, (calibrated - out).detach())
        return out.transpose(1, 2).contiguous(), None

    was_training = hf.training
    frozen = [(prm, prm.requires_grad) for prm in hf.parameters()]
    hf.eval()
    for prm, _ in frozen:  # gradients w.r.t. activations only
        prm.requires_grad_(False)
    try:
        with attach(hf, {"blocks.*.attn.impl": fn}), torch.enable_grad():
            for batch in all_batches:
                saved.clear()
                logits = hf(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                            use_cache=False, logits_to_keep=batch.keep).logits
                logp = torch.log_softmax(logits.float(), -1)
                objective = logits.new_zeros((), dtype=torch.float32)
                for b, (i, j, _seq, targets) in enumerate(batch.requests):
                    if j == -1:
                        for jj, t in enumerate(targets):
                            objective = objective + weights[i][jj] * logp[b, -1, t[0]]
                    else:
                        t = targets[0]
                        pos = torch.arange(batch.keep - len(t) - 1, batch.keep - 1, device=logp.device)
                        objective = objective + weights[i][j] * logp[b, pos, torch.tensor(t, device=logp.device)].sum()
                objective.backward()
                for layer, (out, delta) in saved.items():
                    if out.grad is not None:  # None: this layer's output cannot reach the read positions
                        est[layer] += (out.grad.double() * delta.double()).sum((0, 2, 3)).cpu()
    finally:
        hf.train(was_training)
        for prm, req in frozen:
            prm.requires_grad_(req)
    return {(layer, h): float(est[layer, h]) for layer in range(n_layers) for h in range(n_heads)}


def calibrate_heads(
    model,
    tok,
    calibration,
    *,
    candidates: Sequence[tuple[int, int]] | None = None,
    max_candidates: int | None = None,
    shortlist: int | None = SHORTLIST,
    screen: str = "attribution",
    screen_items: int = SCREEN_ITEMS,
    beta: float = BETA,
    tau: float | None = TAU,
    alpha: float | None = None,
    min_queries: int = MIN_QUERIES,
    keep_first: bool = True,
    min_gain: int = MIN_GAIN,
    combine: bool = True,
    min_items: int = MIN_CALIBRATION_ITEMS,
    batch_size: int = 16,
    fast: bool = True,
    progress: Callable[[str], None] | None = None,
) -> ACTConfig:
    """One-head-at-a-time ACT head search with the keep rule in the module docstring.

    candidates: None = every head with a hidden sink on the calibration prompts. shortlist: when
    there are more candidates than this, a screening pass scores every candidate and only the best
    `shortlist` heads with a positive score go to the keep rule on the whole calibration set (None =
    no screening: the keep rule on every candidate). screen: "attribution" (`attribution_screen`
    on every calibration item: ~3 forwards for all heads) or "exact" (`sweep_heads` on the first
    `screen_items` items of each task: one partial forward per head, `HeadSweep.delta_logp`)."""
    from steer.sinks import detect_sinks

    _check_beta(beta)
    sink_threshold(tau, alpha, 1)
    hf = unwrap_model(model)
    mm = model_map(hf)
    splits = _items_of(calibration)
    items = [it for s in splits for it in s.items]
    if len(items) < min_items:
        raise ValueError(f"calibration set too small: {len(items)} items, need at least {min_items} (one item "
                         f"would be worth {100 / max(len(items), 1):.0f}% accuracy); load more calibration items")
    if shortlist is not None and shortlist < 1:
        raise ValueError(f"shortlist must be >= 1 head or None (got {shortlist})")
    if screen_items < 1:
        raise ValueError(f"screen_items must be >= 1 item per task (got {screen_items})")
    if screen not in ("attribution", "exact"):
        raise ValueError(f"screen must be 'attribution' or 'exact' (got {screen!r})")
    _refuse_unsupported(hf)
    say = progress or (lambda msg: None)
    params = dict(beta=beta, tau=tau, alpha=alpha, min_queries=min_queries, keep_first=keep_first)

    sinks = detect_sinks(hf, tok, [it.prompt for it in items], tau=tau, alpha=alpha, min_queries=min_queries,
                         batch_size=batch_size, keep_maps=False)
    freq = {(layer, h): f for layer, h, f in sinks.heads_with_hidden_sinks()}
    cands = list(freq) if candidates is None else check_heads(mm, candidates)
    if max_candidates is not None:
        cands = cands[:max_candidates]
    n_heads_total = mm.n_layers * _n_heads(mm)
    say(f"{len(cands)} candidate heads of {n_heads_total} ({len(freq)} show a hidden sink on the calibration prompts)")

    screening: list[dict] = []
    if shortlist is not None and len(cands) > shortlist:
        if screen == "attribution":
            say(f"screening {len(cands)} heads by attribution on {len(items)} items")
            est = attribution_screen(hf, tok, items, batch_size=batch_size, **params)
            screening = [{"layer": hd[0], "head": hd[1], "screen_score": est[hd]} for hd in cands]
        else:
            sub = [it for s in splits for it in s.items[:screen_items]]
            say(f"screening {len(cands)} heads exactly on {len(sub)} items")
            sw = sweep_heads(hf, tok, sub, cands, batch_size=batch_size, fast=fast, progress=say, **params)
            base_screen = sw.result().n_correct()
            for hd in cands:
                k = sw.result(hd).n_correct()
                screening.append({"layer": hd[0], "head": hd[1], "screen_score": sw.delta_logp(hd), "correct": k,
                                  "gain": k - base_screen, "rows_touched": sw.touched[hd]})
        ranked = sorted(screening, key=lambda r: -r["screen_score"])
        short = [(r["layer"], r["head"]) for r in ranked if r["screen_score"] > 0][:shortlist]
        for r in screening:
            r["shortlisted"] = (r["layer"], r["head"]) in short
        say(f"shortlist {short}")
    else:
        short = cands

    rows = []
    if short:
        sw = sweep_heads(hf, tok, items, short, batch_size=batch_size, fast=fast, **params)
        base_k = sw.result().n_correct()
    else:
        sw = None
        from steer.tasks import evaluate

        base_k = evaluate(hf, tok, splits, batch_size=batch_size).n_correct()
    say(f"baseline {base_k}/{len(items)}; keep rule on {len(short)} heads")
    for layer, h in short:
        k = sw.result((layer, h)).n_correct()
        rows.append({"layer": layer, "head": h, "hidden_sink_fraction": freq.get((layer, h), 0.0),
                     "correct": k, "gain": k - base_k, "kept": k - base_k >= min_gain, "chosen": False,
                     "rows_touched": sw.touched[(layer, h)]})
        say(f"head ({layer}, {h}): {k}/{len(items)} ({k - base_k:+d})")
    chosen, best, combos = _combine(hf, tok, splits, rows, base_k, combine, batch_size, params, say, len(items))
    search = {
        "keep_rule": ("candidates = heads with a hidden sink on the calibration prompts"
                      + (f" (max {max_candidates})" if max_candidates is not None else "")
                      + (("; screening: every candidate scored by the mean change of log P(right option) "
                          + ("estimated to first order (attribution patching) on every calibration item"
                             if screen == "attribution" else f"with ACT on it alone on {screen_items} items per task")
                          + f", the best {shortlist} with a positive score go on") if screening else "")
                      + f"; keep a head if alone it gains >= {min_gain} items over baseline on the whole "
                        f"calibration set; "
                      + ("combine greedily by gain, accepting a head only if the combination gains strictly"
                         if combine else "use all kept heads")),
        "n_items": len(items), "tasks": [s.task for s in splits], "seeds": [s.seed for s in splits],
        "n_heads_total": n_heads_total, "n_candidates": len(cands), "screen": screen if screening else None,
        "screen_items_per_task": screen_items if screening and screen == "exact" else None,
        "shortlist": [list(hd) for hd in short], "screening": screening,
        "baseline_correct": base_k, "final_correct": best if combine else None,
        "candidates": rows, "combinations": combos, "path": sw.path if sw is not None else None,
    }
    name = getattr(hf.config, "_name_or_path", "") or hf.config.model_type
    return ACTConfig(heads=chosen, model=str(name), search=search, **params)


def _combine(hf, tok, splits, rows, base_k, combine, batch_size, params, say, n_items):
    """Step d of the keep rule: add kept heads by gain, each only if the combination gains strictly."""
    from steer.tasks import evaluate

    kept = sorted((r for r in rows if r["kept"]), key=lambda r: -r["gain"])
    chosen: list[tuple[int, int]] = []
    best = base_k
    combos = []
    for r in kept:
        trial = [*chosen, (r["layer"], r["head"])]
        if not combine:
            chosen, r["chosen"] = trial, True
            continue
        if chosen:
            k = evaluate(hf, tok, splits, batch_size=batch_size,
                         interventions=[ACT(trial, on_no_effect="ignore", **params)]).n_correct()
            combos.append({"heads": trial, "correct": k})
            say(f"combination {trial}: {k}/{n_items}")
        else:
            k = r["correct"]
        if k > best:
            chosen, best, r["chosen"] = trial, k, True
    return chosen, best, combos
