"""Truly online early exit: LYNX (and baselines) inside a batched generation loop.

The released LYNX code replays finished rollouts. Here exit happens during generation: at each cue
event the policy scores the state; to exit, the row's KV cache is rolled back to just before the cue
(its keys/values are sliced out of the batch cache: nothing is recomputed), the exit string is fed
and the answer is decoded greedily. The row then leaves the batch; other rows go on independently.

The same rollback serves forced-exit labelling (a *trial* exit at every cue, whose answer is the
label) and the DEER baseline (exit when the trial answer's confidence exceeds a threshold), so the
labels the probe is trained on are exactly the answers an online exit would produce. The trials of
one step are decoded as one batch: the rolled-back rows are right-aligned to a common length with
extra left padding (tested to give the same greedy tokens as one row at a time).

The cache has the layout model.generate uses, so sliding-window layers (gemma3) stay bounded. A
sliding layer keeps only the last window-1 positions, so the loop keeps a margin: every position a
later cue's cut could need (CueTracker.earliest_cut) plus SLIDING_SLACK; a rollback that still finds
a position gone recomputes that row instead. Cache kinds that cannot be rolled back (linear attention,
chunked attention) are refused with UnsupportedCacheError.

Loop invariant: when token t+1 has just been sampled for a row, the last forward call computed the
hidden states of token t, and cue detection (steer.probes.cues) reports cues whose last token is t.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

from steer.hooks import attach
from steer.probes.conformal import ConformalCalibration, check_delta
from steer.probes.cues import CueSet, CueTracker
from steer.probes.features import HookRecorder, hidden_state_index, validate_points
from steer.probes.probe import LynxProbe

LYNX_EXIT_STRING = "</think> Final Answer: \\boxed{"  # released code's exit string (reasoning models)


@dataclass
class ExitConfig:
    """Generation and forced-exit parameters (LYNX code: greedy answer of up to 64 tokens)."""

    exit_string: str = LYNX_EXIT_STRING
    answer_max_tokens: int = 64
    answer_stop: tuple[str, ...] = ()  # stop the answer once one of these appears after some text
    max_new_tokens: int = 512  # reasoning budget; a row reaching it is force-exited (a budget cut)
    do_sample: bool = False
    temperature: float = 1.0
    seed: int = 0
    ignore_eos: bool = False  # for benchmarks: every row runs to max_new_tokens
    batch_trials: bool = True  # False decodes trial answers one row at a time (the tested reference)
    # True: an exit cuts the reasoning before its cue (the KV cache is rolled back: the exact LYNX exit).
    # False: nothing is rolled back; the exit string follows everything generated so far, i.e. the cue
    # and the one look-ahead token that confirmed it (what a server that cannot roll back, vLLM, serves:
    # steer.serving.vllm_lynx). The cue, its features and the decision are the same in both modes.
    rollback: bool = True


# ---- policies ------------------------------------------------------------------------------------

class NeverExit:
    """Plain generation (optionally with trial exits recorded at every cue, for labelling)."""

    needs_score = False
    needs_trial = False

    def decide(self, score: float | None, trial: Trial | None) -> bool:
        return False


@dataclass
class LynxPolicy:
    """Exit at the first cue whose conformal prediction set is exactly {1}."""

    probe: LynxProbe
    calibration: ConformalCalibration
    needs_score = True
    needs_trial = False

    def __post_init__(self):
        check_delta(self.calibration.delta)

    def decide(self, score, trial) -> bool:
        return bool(self.calibration.should_exit(torch.tensor([score]))[0])


@dataclass
class DeerPolicy:
    """DEER-style baseline: at each cue, run a trial answer; exit when its confidence (mean of the
    answer tokens' greedy probabilities) exceeds `threshold` (DEER: 0.95)."""

    threshold: float = 0.95
    needs_score = False
    needs_trial = True

    def decide(self, score, trial) -> bool:
        return trial is not None and trial.confidence > self.threshold


# ---- results -------------------------------------------------------------------------------------

@dataclass
class Trial:
    """An exit before a cue (or at the budget): exit string fed, answer decoded greedily."""

    answer_ids: list[int]
    answer_text: str
    confidence: float  # mean over answer tokens of the chosen token's probability
    forward_tokens: int  # token positions run through the model for this trial


@dataclass
class CueEvent:
    row: int
    cue: str
    cue_token: int  # index in generated tokens of the cue's last token (features are read here)
    cut: int  # generated tokens kept when exiting before this cue
    score: float | None = None  # probe p, when a probe was scoring
    trial: Trial | None = None
    exited: bool = False
    feature_index: int | None = None  # row of GenerationResult.features


@dataclass
class RowResult:
    prompt: str
    generated_ids: list[int]  # everything sampled in the reasoning phase (up to the exit point)
    kept: int  # reasoning tokens kept (== len(generated_ids) unless exited before a cue)
    stop: str  # "eos" | "exit" | "budget"
    reasoning_text: str
    answer: Trial | None  # the exit's answer (stop in {"exit", "budget"})
    events: list[CueEvent] = field(default_factory=list)
    forward_tokens: int = 0  # all token positions this row ran through the model after the prompt

    @property
    def forced(self) -> bool:
        return self.stop != "eos"

    @property
    def final_text(self) -> str:
        """Where the answer is read: the forced answer, or the natural generation's text."""
        return self.answer.answer_text if self.answer is not None else self.reasoning_text

    def n_tokens(self, exit_len: int) -> int:
        """Output tokens: kept reasoning, plus exit string and answer after a forced exit."""
        if self.answer is None:
            return self.kept
        return self.kept + exit_len + len(self.answer.answer_ids)


@dataclass
class GenerationResult:
    rows: list[RowResult]
    exit_ids: list[int]
    features: torch.Tensor | None = None  # [E, F] at cue events (record_features=True)
    seconds: float = 0.0
    config: ExitConfig | None = None
    calibration: ConformalCalibration | None = None  # the LYNX policy's thresholds, when one ran
    reprefills: int = 0  # rollbacks that recomputed a row because a sliding layer had dropped positions

    @property
    def events(self) -> list[CueEvent]:
        return [e for r in self.rows for e in r.events]

    def scores(self, row: int = 0, probe: LynxProbe | None = None) -> list[float]:
        """Probe p at each cue event of `row`: scored online (LYNX policy), else by `probe` on the
        recorded features (record_features=True), so a plain run can be replayed at any delta."""
        events = self._row(row).events
        if all(e.score is not None for e in events):
            return [float(e.score) for e in events]
        if probe is None or self.features is None or any(e.feature_index is None for e in events):
            raise ValueError("this result has no probe scores: generate with a LynxPolicy, or with "
                             "record_features=True and pass probe=")
        if not events:
            return []
        with torch.no_grad():
            p = probe(self.features[[e.feature_index for e in events]])
        return p.flatten().double().tolist()

    def figure(self, row: int = 0, *, probe: LynxProbe | None = None,
               calibration: ConformalCalibration | None = None, title: str | None = None):
        """Plotly figure of one row: confidence at each cue event over the generated tokens, the cue
        markers, the first cue where `calibration` (default: the probe's, else the policy's) exits,
        and where the row really stopped. Shared by the app, the CLI and notebooks.

        The probe's p is drawn when there is one (see `scores`); trial-answer confidence (DEER's
        signal) is drawn too when trials were run, so a DEER or labelling run plots without a probe.
        """
        import plotly.graph_objects as go

        r = self._row(row)
        events = r.events
        has_trials = any(e.trial is not None for e in events)
        try:
            scores = self.scores(row, probe)
        except ValueError:
            if not has_trials:
                raise
            scores = None
        cal = calibration or (probe.calibration if probe is not None else None) or self.calibration
        x = [e.cue_token for e in events]
        fig = go.Figure()
        _add_confidence_traces(fig, events, x, scores, has_trials)
        sub = f"{len(events)} cue events, stop: {r.stop}"
        if cal is not None and scores is not None:
            sub += _mark_calibrated_exit(fig, cal, x, scores)
        _mark_stop(fig, r)
        right = max([r.kept, len(r.generated_ids)] + [c + 1 for c in x])
        fig.update_layout(title=title or f"LYNX confidence over the generation ({sub})",
                          xaxis_title="generated token", yaxis_title="confidence", yaxis_range=[-0.02, 1.02],
                          xaxis_range=[-0.5, right - 0.5])
        return fig

    def _row(self, row: int) -> RowResult:
        if not -len(self.rows) <= row < len(self.rows):
            raise IndexError(f"row {row} out of range: this result has {len(self.rows)} rows")
        return self.rows[row]

    def n_tokens(self) -> list[int]:
        return [r.n_tokens(len(self.exit_ids)) for r in self.rows]

    def correct(self, golds: Sequence, checker) -> list[bool]:
        return [checker.check(r.final_text, g, forced=r.forced) for r, g in zip(self.rows, golds)]

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame([
            {"row": i, "stop": r.stop, "kept": r.kept, "n_tokens": r.n_tokens(len(self.exit_ids)),
             "forward_tokens": r.forward_tokens, "n_cues": len(r.events),
             "exit_cue": next((e.cue_token for e in r.events if e.exited), None),
             "answer": r.final_text[:80]}
            for i, r in enumerate(self.rows)
        ])


# ---- the loop ------------------------------------------------------------------------------------

def _cache_kwarg(model) -> str:
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    for src in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if src is None:
            continue
        ids.update(src if isinstance(src, (list, tuple)) else [src])
    return ids


class UnsupportedCacheError(ValueError):
    """The model's KV cache has a layer kind whose rows cannot be rolled back to an earlier position."""


# A sliding-window cache layer normally keeps only its last window-1 positions, so a rollback to
# just before a cue could need positions it already dropped. The loop keeps, in sliding layers,
# every position a future cue's cut could need (CueTracker.earliest_cut) plus this many tokens of
# slack; if a rollback still finds a position missing (decoders whose text can shrink when a byte
# sequence completes), that row's cache is recomputed by a fresh forward pass instead (exact).
SLIDING_SLACK = 8


def _cache_for(model) -> DynamicCache:
    """The cache layout model.generate uses (sliding layers bounded to their window), recording past
    positions in sliding layers so they can be rolled back; refused for layers that cannot be."""
    text = model.config.get_text_config(decoder=True)
    chunked = [i for i, t in enumerate(getattr(text, "layer_types", None) or []) if t == "chunked_attention"]
    if chunked:
        raise UnsupportedCacheError(
            f"layers {chunked} use chunked attention, whose chunks start at absolute cache positions: left "
            f"padding and rollback alignment would move them, so early exit could not be exact. Generate one "
            f"prompt at a time with model.generate, or use a model without chunked attention")
    cache = DynamicCache(config=model.config)
    for li, layer in enumerate(cache.layers):
        if type(layer) is DynamicSlidingWindowLayer:
            layer.activate_past_recording()  # we trim it ourselves (_Runner.trim), keeping a margin
        elif type(layer) is not DynamicLayer:
            raise UnsupportedCacheError(
                f"early exit rolls the KV cache back, which is implemented for full-attention (DynamicLayer) "
                f"and sliding-window (DynamicSlidingWindowLayer) cache layers; layer {li} of this model uses "
                f"{type(layer).__name__}. Use a model with standard attention layers, or run without exits "
                f"(model.generate) for this architecture")
    return cache



def _add_confidence_traces(fig, events: list, x: list[int], scores: list[float] | None, has_trials: bool) -> None:
    """The probe's p and the trial answers' confidence at each cue event, and the cue markers."""
    import plotly.graph_objects as go

    cues = [e.cue for e in events]
    if scores is not None:
        fig.add_trace(go.Scatter(
            x=x, y=scores, mode="lines+markers", name="probe p(correct if exiting here)",
            customdata=[[c, e.cut] for c, e in zip(cues, events)],
            hovertemplate="cue token %{x} (%{customdata[0]}, cut at %{customdata[1]}): p=%{y:.3f}<extra></extra>"))
    if has_trials:
        conf = [e.trial.confidence if e.trial is not None else None for e in events]
        fig.add_trace(go.Scatter(
            x=x, y=conf, mode="markers", name="trial answer confidence (DEER)",
            marker={"symbol": "diamond-open", "size": 9},
            text=[e.trial.answer_text if e.trial is not None else "" for e in events],
            hovertemplate="cue token %{x}: confidence %{y:.3f}, answer %{text}<extra></extra>"))
    # cue markers along the bottom: one tick per cue event, named by its cue
    fig.add_trace(go.Scatter(x=x, y=[0.0] * len(x), mode="markers", name="cue events",
                             marker={"symbol": "line-ns-open", "size": 12, "color": "grey"},
                             text=cues, hovertemplate="cue %{text} at token %{x}<extra></extra>"))


def _mark_calibrated_exit(fig, cal: ConformalCalibration, x: list[int], scores: list[float]) -> str:
    """The q0 line and the first cue where `cal` exits; returns the title's words for it."""
    fig.add_hline(y=cal.q0, line={"color": "grey", "dash": "dot"},
                  annotation_text=f"q0 = {cal.q0:.3f} (exit needs p > q0)")
    ex = cal.should_exit(torch.tensor(scores, dtype=torch.float64)).tolist() if scores else []
    first = next((i for i, e in enumerate(ex) if e), None)
    if first is None:
        return f", delta={cal.delta:g} never exits"
    fig.add_vline(x=x[first], line={"color": "red", "dash": "dash"},
                  annotation_text=f"exit at delta={cal.delta:g} (cue token {x[first]})")
    return f", delta={cal.delta:g} exits at cue token {x[first]}"


def _mark_stop(fig, r: RowResult) -> None:
    """Where the row really stopped: its online exit (if any) and the last kept reasoning token."""
    import plotly.graph_objects as go

    done = next((e for e in r.events if e.exited), None)
    if done is not None:
        y = done.score if done.score is not None else (done.trial.confidence if done.trial else 1.0)
        fig.add_trace(go.Scatter(x=[done.cue_token], y=[y], mode="markers", name="online exit (this run)",
                                 marker={"symbol": "star", "size": 16, "color": "red"}))
    # the boundary after the last kept reasoning token (an exit keeps the tokens before its cue)
    fig.add_vline(x=r.kept - 0.5, line={"color": "black", "width": 1},
                  annotation_text=f"stop: {r.stop}, {r.kept} tokens kept", annotation_position="bottom left")


@dataclass
class _TrialRequest:
    """Roll row `row` (index in the live batch) back to `keep` cache positions, then feed `extra`."""

    row: int
    keep: int
    extra: list[int]
    tokens: torch.Tensor  # the row's token ids at cache positions [0, keep) (for a re-prefill)
    mask: torch.Tensor  # the row's attention mask over [0, keep)


class _MissingPositions(Exception):
    pass


def _fork_rows(cache: DynamicCache, reqs: Sequence[_TrialRequest], config) -> tuple[DynamicCache, int]:
    """A batch cache, one row per request, holding request j's first keep_j positions right-aligned
    to a common length K (extra left padding is zeros, masked by the caller): the rollback.

    Full layers copy positions [0, keep_j). Sliding layers hold only the window before keep_j, so
    sliding distances are unchanged by the alignment (every position of a row shifts by K - keep_j).
    """
    K = max(r.keep for r in reqs)
    rows = torch.tensor([r.row for r in reqs])
    fork = DynamicCache(config=config)
    while len(fork.layers) < len(cache.layers):  # config-less layouts grow lazily
        fork.layers.append(DynamicLayer())
    for li, layer in enumerate(cache.layers):
        src_k, src_v = layer.keys[rows], layer.values[rows]
        R, H, _, D = src_k.shape
        sliding = type(layer) is DynamicSlidingWindowLayer
        width = min(layer.sliding_window - 1, K) if sliding else K
        held_from = (layer.cumulative_length - layer.keys.shape[-2]) if sliding else 0
        k = src_k.new_zeros(R, H, width, D)
        v = src_v.new_zeros(R, H, width, src_v.shape[-1])
        for j, r in enumerate(reqs):
            lo = max(0, r.keep - width)  # first real position request j needs in this layer
            if lo < held_from:
                raise _MissingPositions
            n = r.keep - lo
            k[j, :, width - n:] = src_k[j, :, lo - held_from: r.keep - held_from]
            v[j, :, width - n:] = src_v[j, :, lo - held_from: r.keep - held_from]
        target = fork.layers[li]
        target.update(k, v)
        if type(target) is DynamicSlidingWindowLayer:
            target.cumulative_length = K  # positions seen, not positions held
    return fork, K


class _Runner:
    def __init__(self, model, tokenizer, config: ExitConfig, points, feature_backend):
        self.model, self.tok, self.cfg = model, tokenizer, config
        self.ckw = _cache_kwarg(model)
        self.eos = set() if config.ignore_eos else _eos_ids(model, tokenizer)
        self.exit_ids = tokenizer(config.exit_string, add_special_tokens=False)["input_ids"] if config.exit_string else []
        self.points, self.backend = points, feature_backend
        self.device = next(model.parameters()).device
        self.gen = torch.Generator(device="cpu").manual_seed(config.seed)
        self.reprefills = 0  # rollbacks that had to recompute a row (see SLIDING_SLACK)

    def forward(self, ids, mask, pos, cache, hidden: bool = False):
        kw = {self.ckw: cache}
        return self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                          output_hidden_states=hidden, logits_to_keep=1, **kw)

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.cfg.do_sample:
            return logits.argmax(-1)
        probs = torch.softmax(logits.float() / self.cfg.temperature, -1).cpu()
        return torch.multinomial(probs, 1, generator=self.gen).squeeze(-1).to(logits.device)

    @staticmethod
    def trim(cache: DynamicCache, keep_from: int) -> None:
        """Drop sliding-layer positions before `keep_from` (never the window itself)."""
        for layer in cache.layers:
            if type(layer) is DynamicSlidingWindowLayer and layer.is_initialized:
                n = max(layer.sliding_window - 1, layer.cumulative_length - keep_from)
                if layer.keys.shape[-2] > n:
                    layer.keys, layer.values = layer.keys[:, :, -n:], layer.values[:, :, -n:]

    @torch.no_grad()
    def trials(self, cache, reqs: Sequence[_TrialRequest]) -> list[Trial]:
        """Forced-exit trials: each request's row rolled back, `extra` + exit string fed, answer decoded
        greedily. Batched (cfg.batch_trials) in groups of equal feed length; else one row at a time."""
        out: list[Trial | None] = [None] * len(reqs)
        groups: dict[int, list[int]] = {}
        for j, r in enumerate(reqs):
            groups.setdefault(len(r.extra) if self.cfg.batch_trials else -1 - j, []).append(j)
        for idx in groups.values():
            try:
                fork, K = _fork_rows(cache, [reqs[j] for j in idx], self.model.config)
                prefix = [0] * len(idx)
            except _MissingPositions:  # recompute: one fresh forward per request
                for j in idx:
                    out[j] = self._decode([reqs[j]], *self._prefill_fork(reqs[j]))[0]
                continue
            for j, t in zip(idx, self._decode([reqs[j] for j in idx], fork, K, prefix)):
                out[j] = t
        return out

    def _prefill_fork(self, req: _TrialRequest) -> tuple[DynamicCache, int, list[int]]:
        self.reprefills += 1
        fork = DynamicCache(config=self.model.config)
        mask = req.mask[None]
        pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
        self.forward(req.tokens[None], mask, pos, fork)
        return fork, req.keep, [int(mask.sum())]

    def _decode(self, reqs, fork, K: int, prefix: list[int]) -> list[Trial]:
        R = len(reqs)
        mask = torch.zeros(R, K, dtype=reqs[0].mask.dtype, device=self.device)
        for j, r in enumerate(reqs):
            mask[j, K - r.keep:] = r.mask[: r.keep]
        n_real = mask.long().sum(-1)
        ids = torch.tensor([list(r.extra) + list(self.exit_ids) for r in reqs], device=self.device)
        fwd = list(prefix)
        answers: list[list[int]] = [[] for _ in reqs]
        probs: list[list[float]] = [[] for _ in reqs]
        live = list(range(R))  # request index of each row of the fork
        for _ in range(self.cfg.answer_max_tokens):
            m = ids.shape[1]
            mask = torch.cat([mask, torch.ones(len(live), m, dtype=mask.dtype, device=mask.device)], 1)
            pos = n_real[:, None] + torch.arange(m, device=self.device)[None]
            out = self.forward(ids, mask, pos, fork)
            n_real = n_real + m
            p = torch.softmax(out.logits[:, -1].float(), -1)
            tids = p.argmax(-1)
            ptop = p.gather(-1, tids[:, None]).squeeze(-1).tolist()
            keep = []
            for k, j in enumerate(live):
                fwd[j] += m
                tid = int(tids[k])
                if tid in self.eos:
                    continue
                answers[j].append(tid)
                probs[j].append(float(ptop[k]))
                if self.cfg.answer_stop:
                    text = self.tok.decode(answers[j], skip_special_tokens=True)
                    if text.strip() and any(s in text.lstrip() for s in self.cfg.answer_stop):
                        continue
                keep.append(k)
            if not keep:
                break
            if len(keep) < len(live):
                sel = torch.tensor(keep, device=self.device)
                fork.batch_select_indices(sel)
                mask, n_real, tids = mask[sel], n_real[sel], tids[sel]
                live = [live[k] for k in keep]
            ids = tids[:, None]
        trials = []
        for j in range(R):
            text = self.tok.decode(answers[j], skip_special_tokens=True)
            conf = sum(probs[j]) / len(probs[j]) if probs[j] else 0.0
            trials.append(Trial(answers[j], text, conf, fwd[j]))
        return trials


def _check_inputs(model, tokenizer, prompts, policy, cues, cfg: ExitConfig, points, need_feats: bool,
                  feature_backend: str) -> tuple[CueSet, Sequence[str] | None]:
    """The cue set and feature points this run uses; a clear error for every bad argument."""
    if isinstance(prompts, str) or not len(prompts):
        raise ValueError("prompts must be a non-empty list of strings (one per row)")
    if isinstance(policy, LynxPolicy):
        cues = cues or policy.probe.cue_set
        points = points or (policy.probe.info.points if policy.probe.info else None)
        policy.probe.check_compatible(model, points)
    if need_feats:
        if not points:
            raise ValueError("feature points are needed to score or record features "
                             "(steer.probes.features.default_points)")
        validate_points(points, model)
    if feature_backend not in ("hooks", "hidden_states"):
        raise ValueError(f"feature_backend must be 'hooks' or 'hidden_states', not {feature_backend!r}")
    if cfg.max_new_tokens < 1 or cfg.answer_max_tokens < 1:
        raise ValueError("max_new_tokens and answer_max_tokens must be >= 1")
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token (e.g. to its eos token)")
    return cues or CueSet(), points


class _Generation:
    """The state of one `generate_with_exit` call. Prompt rows are indexed r; the rows still
    generating are `active`, indexed i in the batch cache. Each decoding step runs the named steps
    `cue_events` -> `trial_exits` -> `decide` -> `retire` -> `advance`."""

    def __init__(self, run: _Runner, prompts: Sequence[str], policy, cues: CueSet, *, record_features: bool,
                 record_trials: bool, add_special_tokens: bool):
        self.run, self.prompts, self.policy = run, list(prompts), policy
        self.record_features = record_features
        self.trials_each_cue = record_trials or policy.needs_trial
        self.need_feats = record_features or policy.needs_score
        self.use_hs = self.need_feats and run.backend == "hidden_states"
        self.recorder = HookRecorder(run.points) if self.need_feats and not self.use_hs else None
        tok = run.tok
        side, tok.padding_side = tok.padding_side, "left"
        try:
            enc = tok(self.prompts, return_tensors="pt", padding=True, add_special_tokens=add_special_tokens)
        finally:
            tok.padding_side = side
        self.ids, self.mask = enc["input_ids"].to(run.device), enc["attention_mask"].to(run.device)
        B, self.T = self.ids.shape
        self.gens: list[list[int]] = [[] for _ in range(B)]
        self.trackers = [CueTracker(cues, tok) for _ in range(B)]
        self.events: list[list[CueEvent]] = [[] for _ in range(B)]
        self.fwd = [0] * B
        self.results: list[RowResult | None] = [None] * B
        self.feats_out: list[torch.Tensor] = []
        self.feats: torch.Tensor | None = None  # features of this step's active rows, when a cue needs them
        self.active = list(range(B))
        self.cache = _cache_for(run.model)
        self.sliding = any(type(layer) is DynamicSlidingWindowLayer for layer in self.cache.layers)
        self.last_pos = (self.mask.long().cumsum(-1) - 1).clamp(min=0)

    def prefill(self):
        out = self.run.forward(self.ids, self.mask, self.last_pos, self.cache, hidden=self.use_hs)
        self.last_pos = self.last_pos[:, -1]
        self.trim()
        return out

    def request(self, i: int, r: int, keep: int, extra: list[int]) -> _TrialRequest:
        toks = torch.cat([self.ids[r], torch.tensor(self.gens[r], dtype=self.ids.dtype, device=self.run.device)])
        toks = toks[:keep]
        if not extra and not self.run.exit_ids:  # nothing to feed: re-feed the last kept token for its logits
            keep, extra = keep - 1, [int(toks[keep - 1])]
            toks = toks[:keep]
        return _TrialRequest(i, keep, extra, toks, self.mask[i, :keep])

    def trim(self) -> None:
        if self.sliding and self.active:
            cut = min(self.T + self.trackers[r].earliest_cut() for r in self.active)
            self.run.trim(self.cache, cut - SLIDING_SLACK)

    def _hidden(self, out) -> list[torch.Tensor]:
        """Feature-point states of the token fed last, read before any trial overwrites them."""
        if self.use_hs:
            hs = out.hidden_states
            return [hs[hidden_state_index(p, len(hs) - 1)] for p in self.run.points]
        return [self.recorder.last[p] for p in self.run.points]

    def cue_events(self, out, nxt: list[int]) -> list[list[CueEvent]]:
        """Append the sampled tokens; the cue events they complete, scored where a probe scores."""
        self.feats, scores, found = None, None, []
        for i, r in enumerate(self.active):
            self.gens[r].append(nxt[i])
            evs = [CueEvent(r, m.cue, m.cue_token, m.cut) for m in self.trackers[r].push(nxt[i])]
            if evs and self.need_feats and self.feats is None:
                hidden = self._hidden(out)
                self.feats = torch.cat([h[:, -1].float() for h in hidden], dim=-1)
                if self.policy.needs_score:  # fused kernel on CUDA (steer.kernels.probe_score), torch elsewhere
                    last = torch.full((len(self.active),), hidden[0].shape[1] - 1, dtype=torch.long,
                                      device=self.run.device)
                    scores = self.policy.probe.score_hidden(hidden, last).float().cpu().tolist()
            for ev in evs:
                if self.policy.needs_score:
                    ev.score = scores[i]
            found.append(evs)
        return found

    def exit_request(self, i: int, r: int, ev: CueEvent) -> _TrialRequest:
        """The forced exit at cue event `ev`: cut before the cue (rollback), else after the look-ahead
        token just sampled (it is not in the cache yet, so it is fed first)."""
        if self.run.cfg.rollback:
            return self.request(i, r, self.T + ev.cut, [])
        return self.request(i, r, self.T + len(self.gens[r]) - 1, [self.gens[r][-1]])

    def trial_exits(self, found: list[list[CueEvent]]) -> None:
        """A forced-exit trial at every cue event (labelling, DEER), batched across rows."""
        reqs = [(ev, self.exit_request(i, r, ev)) for i, r in enumerate(self.active) for ev in found[i]]
        if reqs:
            for (ev, _), trial in zip(reqs, self.run.trials(self.cache, [q for _, q in reqs])):
                ev.trial = trial

    def decide(self, nxt: list[int], found: list[list[CueEvent]]) -> tuple[dict, dict]:
        """Which active rows stop and why ({i: (stop, event)}), in cue order within each row (the
        first accepted cue exits), plus the exit trials still to run for them ({i: Trial})."""
        pending: list[tuple[int, _TrialRequest]] = []
        decided: dict[int, tuple[str, CueEvent | None]] = {}
        for i, r in enumerate(self.active):
            # without rollback an exit follows the look-ahead token: an eos there ended the row already
            exits_ok = self.run.cfg.rollback or nxt[i] not in self.run.eos
            for ev in found[i]:
                if self.record_features:
                    ev.feature_index = len(self.feats_out)
                    self.feats_out.append(self.feats[i].cpu())
                if ev.trial is not None:
                    self.fwd[r] += ev.trial.forward_tokens
                self.events[r].append(ev)
                if exits_ok and self.policy.decide(ev.score, ev.trial):
                    ev.exited = True
                    decided[i] = ("exit", ev)
                    if ev.trial is None:
                        pending.append((i, self.exit_request(i, r, ev)))
                    break
            if i in decided:
                continue
            if nxt[i] in self.run.eos:
                decided[i] = ("eos", None)
            elif len(self.gens[r]) >= self.run.cfg.max_new_tokens:  # budget cut: keep all, feed the last token
                decided[i] = ("budget", None)
                pending.append((i, self.request(i, r, self.T + len(self.gens[r]) - 1, [nxt[i]])))
        trials = self.run.trials(self.cache, [q for _, q in pending]) if pending else []
        return decided, dict(zip([i for i, _ in pending], trials))

    def retire(self, decided: dict, trials: dict) -> None:
        """The result of every row that stops this step."""
        decode = self.run.tok.decode
        for i, (stop, ev) in decided.items():
            r = self.active[i]
            trial = ev.trial if stop == "exit" and ev.trial is not None else trials.get(i)
            if trial is not None and (stop == "budget" or ev.trial is None):
                self.fwd[r] += trial.forward_tokens
            kept = self.gens[r][: ev.cut] if stop == "exit" and self.run.cfg.rollback else self.gens[r]
            self.results[r] = RowResult(self.prompts[r], kept, len(kept), stop,
                                        decode(kept, skip_special_tokens=True), trial, self.events[r])

    def advance(self, decided: dict, nxt: torch.Tensor):
        """Drop the stopped rows from the batch and feed the others' new tokens; None when all stopped."""
        if decided:
            keep_idx = [i for i in range(len(self.active)) if i not in decided]
            self.active = [self.active[i] for i in keep_idx]
            if not self.active:
                return None
            sel = torch.tensor(keep_idx, device=self.run.device)
            self.cache.batch_select_indices(sel)
            self.mask, nxt, self.last_pos = self.mask[sel], nxt[sel], self.last_pos[sel]
        ones = torch.ones(len(self.active), 1, dtype=self.mask.dtype, device=self.mask.device)
        self.mask = torch.cat([self.mask, ones], 1)
        self.last_pos = self.last_pos + 1
        for r in self.active:
            self.fwd[r] += 1
        out = self.run.forward(nxt[:, None], self.mask, self.last_pos[:, None], self.cache, hidden=self.use_hs)
        self.trim()
        return out

    def result(self, seconds: float) -> GenerationResult:
        for r, row in enumerate(self.results):
            row.forward_tokens = self.fwd[r]
        if self.feats_out:
            feats = torch.stack(self.feats_out)
        else:
            feats = torch.empty(0, 0) if self.record_features else None
        calibration = self.policy.calibration if isinstance(self.policy, LynxPolicy) else None
        return GenerationResult(self.results, self.run.exit_ids, feats, seconds, self.run.cfg, calibration,
                                self.run.reprefills)


@torch.no_grad()
def generate_with_exit(
    model,
    tokenizer,
    prompts: Sequence[str],
    policy=None,
    cues: CueSet | None = None,
    config: ExitConfig | None = None,
    *,
    points: Sequence[str] | None = None,
    record_features: bool = False,
    record_trials: bool = False,
    feature_backend: str = "hooks",
    add_special_tokens: bool = False,
) -> GenerationResult:
    """Generate for a batch of prompts, exiting each row early when `policy` says so.

    policy: NeverExit() (default), LynxPolicy(probe, calibration) or DeerPolicy(threshold).
    record_features: keep the probe features at every cue event (GenerationResult.features).
    record_trials: run a forced-exit trial at every cue event (labelling); DEER always does.
    Prompts are tokenised as given (apply the chat template first), left-padded.
    """
    policy = policy or NeverExit()
    cfg = config or ExitConfig()
    cues, points = _check_inputs(model, tokenizer, prompts, policy, cues, cfg, points,
                                 record_features or policy.needs_score, feature_backend)
    t0 = time.perf_counter()
    gen = _Generation(_Runner(model, tokenizer, cfg, points, feature_backend), prompts, policy, cues,
                      record_features=record_features, record_trials=record_trials,
                      add_special_tokens=add_special_tokens)
    with attach(model, gen.recorder.hooks()) if gen.recorder is not None else contextlib.nullcontext():
        out = gen.prefill()
        for _ in range(cfg.max_new_tokens):
            nxt = gen.run.choose(out.logits[:, -1])
            found = gen.cue_events(out, nxt.tolist())
            if gen.trials_each_cue:
                gen.trial_exits(found)
            decided, trials = gen.decide(nxt.tolist(), found)
            gen.retire(decided, trials)
            out = gen.advance(decided, nxt)
            if out is None:
                break
    return gen.result(time.perf_counter() - t0)


def premature_exit_rates(p: torch.Tensor, y: torch.Tensor, traj: torch.Tensor,
                         calibration: ConformalCalibration) -> dict[str, float]:
    """Empirical premature-exit rates on labelled cue events (in trajectory order).

    per_event: P(exit | y=0) over negative cue events (the guaranteed quantity, <= delta).
    per_trajectory: fraction of trajectories whose first exiting cue has y=0 (can exceed delta).
    """
    ex = calibration.should_exit(p)
    neg = y == 0
    per_event = float(ex[neg].double().mean()) if bool(neg.any()) else math.nan
    n_traj, bad, exits = 0, 0, 0
    for t in torch.unique(traj):
        idx = (traj == t).nonzero().flatten()
        n_traj += 1
        first = next((int(i) for i in idx if bool(ex[i])), None)
        if first is not None:
            exits += 1
            bad += int(y[first] == 0)
    return {"per_event": per_event, "per_trajectory": bad / max(n_traj, 1),
            "exit_rate_trajectories": exits / max(n_traj, 1), "n_negative_events": int(neg.sum())}
