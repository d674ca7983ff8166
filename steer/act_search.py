"""ACT head search: which heads to calibrate (steer.act runs the calibration at inference).

Head selection (`calibrate_heads`), one of two named procedures (`PROCEDURES`), both on a
calibration split that the held-out evaluation never sees:

procedure="paper" (the default; the rule of the paper's released code, ALGORITHMS.md section 2):
  1. candidates: every head with a hidden (non-initial) sink on the calibration prompts -- ACT is the
     identity on every other head, so this drops no result (`candidate_heads`);
  2. exact one-head sweep: each candidate alone on every calibration item (`sweep_heads`);
  3. keep every head whose gain alone (items right - baseline) is >= `min_gain` (`keep_alone`);
  4. apply all kept heads together (`select_paper`); their joint calibration score is recorded, not used.

procedure="shortlist" (cheaper, not the paper's; what steer did before):
  1. candidates as above;
  2. screen every candidate by the change of mean log P(right option) with ACT on it alone, estimated
     to first order for all heads at once (`attribution_screen`, ~3 forwards) or exactly on
     `screen_items` items per task (screen="exact"); the best `shortlist` (SHORTLIST = 16) with a
     positive score go on (`screen_heads`);
  3. exact sweep and keep rule of the shortlist on the whole calibration set, as paper steps 2-3;
  4. greedy combination: add kept heads by gain, each accepted only if the combination gets strictly
     more items right than the best set so far (`combine_greedy`).

`sweep_heads` reruns only the layers from the head's layer on (the earlier layers are the baseline's):
about half the compute of whole forwards, same numbers (tested). The search log (`ACTConfig.search`)
records the procedure, every swept head's gain, and the combinations tried.

    cfg = calibrate_heads(model, tok, task_suite("calibration", n=70))  # procedure="paper"
    cfg.save("act.json")   # steer.act.ACTConfig; apply with cfg.intervention().apply(model)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from steer.act import (
    ACT,
    BETA,
    ACTConfig,
    _check_beta,
    _n_heads,
    _refuse_unsupported,
    check_heads,
)
from steer.adapters import ModelMap, model_map
from steer.hooks import attach, unwrap_model
from steer.identity import model_identity
from steer.progress import Progress, as_progress
from steer.sinks import MIN_QUERIES, TAU, sink_threshold

MIN_GAIN = 1  # calibration items a head must add over baseline to be kept
MIN_CALIBRATION_ITEMS = 20  # below this, one item is > 5% accuracy: the search is noise
SHORTLIST = 16  # heads the screening pass sends on to the keep rule on the whole calibration set
SCREEN_ITEMS = 8  # calibration items per task in the screening pass (every candidate head)


def _items_of(calibration) -> list:
    from steer.tasks import TaskSplit

    splits = [calibration] if isinstance(calibration, TaskSplit) else list(calibration)
    for s in splits:
        if s.split != "calibration":
            raise ValueError(
                f"calibrate_heads got the {s.split!r} split of {s.task!r}: calibrate on "
                f"'calibration' items only, keep 'heldout' for the evaluation"
            )
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
        return EvalResult(
            [it.task for it in its],
            [it.uid for it in its],
            torch.tensor([it.answer for it in its]),
            lps,
            [it.chance for it in its],
        )

    def delta_logp(self, head: tuple[int, int]) -> float:
        """Mean change of log P(right option | options): a continuous screening score (an item count
        on a few items moves in steps of several percent; this moves with every item's margin)."""

        def lp(scores):
            return torch.stack(
                [torch.log_softmax(torch.tensor(sc), 0)[it.answer] for sc, it in zip(scores, self.items)]
            )

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
def sweep_heads(
    model,
    tok,
    items: Sequence,
    heads: Sequence[tuple[int, int]],
    *,
    batch_size: int = 16,
    fast: bool = True,
    progress: Progress | None = None,
    **params,
) -> HeadSweep:
    """Score `items` without ACT and with ACT on each head of `heads` alone (ACT(**params)).

    fast: per batch, run the model once (ACT-free, through steer's attention function, as every ACT
    run) capturing each decoder layer's inputs; a head in layer l then reruns only layers l..L-1 from
    the captured input of layer l -- the layers before l are exactly those of the baseline, since ACT
    changes nothing there. About half the compute of whole forwards, same numbers (tested). The first
    batch is checked: replaying all layers must reproduce the captured forward's logits, or this
    raises (pass fast=False for whole forwards on such a model)."""
    from steer.tasks import batches, read_scores

    hf = unwrap_model(model)
    mm = model_map(hf)
    heads = check_heads(mm, heads)
    report = as_progress(progress)
    items = list(items)
    if not fast:
        return _sweep_whole_forwards(hf, tok, items, heads, batch_size, report, params)
    layers, run = _layer_runner(hf, mm)
    base = [[0.0] * len(it.options) for it in items]
    per_head = {hd: [[0.0] * len(it.options) for it in items] for hd in heads}
    acts = {hd: ACT([hd], on_no_effect="ignore", **params) for hd in heads}
    touched = dict.fromkeys(heads, 0)
    all_batches = batches(tok, items, batch_size)
    for n, batch in enumerate(all_batches):
        logits, captured = _capture_layer_inputs(hf, layers, batch)
        if n == 0:
            _check_replay(hf, run(captured, 0, batch.keep), logits)
        read_scores(batch, logits, base)
        for hd in heads:
            with acts[hd].apply(hf):  # apply() restarts the counts: add them up per batch
                read_scores(batch, run(captured, hd[0], batch.keep), per_head[hd])
            touched[hd] += acts[hd].total_touched
        report(n + 1, len(all_batches), f"{len(heads)} heads per batch")
    return HeadSweep(items, base, per_head, touched, "suffix")


def _sweep_whole_forwards(hf, tok, items: list, heads: list, batch_size: int, report: Progress,
                          params: dict) -> HeadSweep:
    """sweep_heads(fast=False): one whole forward per head (for models the layer replay cannot reproduce)."""
    from steer.tasks import TaskSplit, evaluate

    split = [TaskSplit("sweep", "calibration", 0, items)]
    base = evaluate(hf, tok, split, batch_size=batch_size).logprobs
    per_head, touched = {}, {}
    for n, hd in enumerate(heads):
        act = ACT([hd], on_no_effect="ignore", **params)
        per_head[hd] = evaluate(hf, tok, split, batch_size=batch_size, interventions=[act]).logprobs
        touched[hd] = act.total_touched
        report(n + 1, len(heads), f"head {hd}")
    return HeadSweep(items, base, per_head, touched, "full")


def _capture_layer_inputs(hf, layers: list, batch) -> tuple[torch.Tensor, list]:
    """One ACT-free forward through steer's attention function (as every ACT run), keeping each decoder
    layer's input hidden states and keyword arguments: the baseline logits and the replay points."""
    captured: list = [None] * len(layers)

    def grab(h, ctx):
        captured[ctx.layer] = (h, {k: v for k, v in ctx.kwargs.items() if k != "hidden_states"})

    with attach(hf, {"blocks.*.resid_pre": grab}, steer_attention=True):
        logits = batch.logits(hf)
    return logits, captured


def _check_replay(hf, replay: torch.Tensor, logits: torch.Tensor) -> None:
    if not torch.allclose(replay.float(), logits.float(), atol=1e-4, rtol=1e-4):
        raise RuntimeError(
            f"replaying the decoder layers of this {hf.config.model_type} model does not reproduce "
            f"its forward (max diff {float((replay - logits).abs().max()):.2e}); the layer-suffix "
            f"shortcut does not apply: call with fast=False"
        )


def attribution_screen(model, tok, items: Sequence, *, batch_size: int = 16, **params) -> dict:
    """First-order estimate of every head's ACT effect on mean log P(right option), all heads at once.

    Attribution patching (Nanda 2023; Syed et al. 2023): with o_h the attention output of head h
    (before o_proj) and d_h = o_h(ACT on h) - o_h, the change of the objective J when ACT is applied to
    head h alone is about sum(dJ/do_h * d_h) -- exact to first order, since ACT on one head changes
    only that head's output in its layer. One forward without gradients (baseline scores, which fix
    dJ/dscores), then one forward + backward per batch give all heads' estimates: about three
    forwards in all instead of one per head. Returns {(layer, head): estimate}."""
    from steer.tasks import batches

    hf = unwrap_model(model)
    mm = model_map(hf)
    _refuse_unsupported(hf)
    n_layers, n_heads = mm.n_layers, _n_heads(mm)
    items = list(items)
    device = next(hf.parameters()).device
    all_batches = batches(tok, items, batch_size)
    weights = _objective_weights(hf, items, all_batches)
    act = ACT(
        [(layer, h) for layer in range(n_layers) for h in range(n_heads)], on_no_effect="ignore", **params
    )
    est = torch.zeros(n_layers, n_heads, dtype=torch.float64)
    saved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    fn = _attribution_hook(act, saved, n_heads, device)
    with _activation_gradients_only(hf), attach(hf, {"blocks.*.attn.impl": fn}), torch.enable_grad():
        for batch in all_batches:
            saved.clear()
            logits = batch.logits(hf)
            _objective(batch, logits, weights).backward()
            for layer, (out, delta) in saved.items():
                if out.grad is not None:  # None: this layer's output cannot reach the read positions
                    est[layer] += (out.grad.double() * delta.double()).sum((0, 2, 3)).cpu()
    return {(layer, h): float(est[layer, h]) for layer in range(n_layers) for h in range(n_heads)}


@torch.no_grad()
def _objective_weights(hf, items: list, all_batches: list) -> list[list[float]]:
    """dJ/dscore per item and option at the baseline, J = mean_i log softmax(scores_i)[answer_i]:
    (1[j = answer] - softmax(scores_i)_j) / n."""
    from steer.tasks import read_scores

    base = [[0.0] * len(it.options) for it in items]
    for batch in all_batches:
        logits = batch.logits(hf)
        read_scores(batch, logits, base)
    weights = []
    for sc, it in zip(base, items):
        w = -torch.softmax(torch.tensor(sc, dtype=torch.float64), 0)
        w[it.answer] += 1
        weights.append((w / len(items)).tolist())
    return weights


def _objective(batch, logits: torch.Tensor, weights: list) -> torch.Tensor:
    """The linearised objective of one batch: sum of weights x option log-probabilities (as read_scores)."""
    logp = torch.log_softmax(logits.float(), -1)
    objective = logits.new_zeros((), dtype=torch.float32)
    for b, i, j, t, pos in batch.reads():
        objective = objective + weights[i][j] * logp[b, pos, t].sum()
    return objective


def _attribution_hook(act: ACT, saved: dict, n_heads: int, device) -> Callable:
    """attn.impl override: plain attention, differentiable, with its output kept for the gradient and
    the difference ACT on every head would make (each head's own difference, computed at once)."""
    from steer.kernels.act import act_attention

    every = torch.ones(n_heads, dtype=torch.bool, device=device)
    none = torch.zeros(n_heads, dtype=torch.bool, device=device)

    def fn(call, ctx):
        q, k, v = call.query, call.key, call.value
        mask, window = call.kernel_mask()  # causal: no N x N mask read
        with torch.no_grad():
            sinks = act.prefill_sinks(q, k, call.scaling, mask, window)
            calibrated, _ = act_attention(
                q,
                k,
                v,
                scale=call.scaling,
                sink_mask=sinks,
                head_mask=every,
                beta=act.beta,
                mask=mask,
                sliding_window=window,
            )
        out, _ = act_attention(
            q,
            k,
            v,
            scale=call.scaling,
            sink_mask=sinks,
            head_mask=none,
            beta=act.beta,
            mask=mask,
            sliding_window=window,
            backend="torch",
        )  # plain attention, differentiable
        if out.requires_grad:
            out.retain_grad()
        else:  # the first layers see no tensor that needs a gradient: start the graph here
            out.requires_grad_(True)
        saved[ctx.layer] = (out, (calibrated - out).detach())
        return out.transpose(1, 2).contiguous(), None

    return fn


@contextmanager
def _activation_gradients_only(hf):
    """eval mode and frozen parameters for the duration (gradients w.r.t. activations only), restored after."""
    was_training = hf.training
    frozen = [(prm, prm.requires_grad) for prm in hf.parameters()]
    hf.eval()
    for prm, _ in frozen:
        prm.requires_grad_(False)
    try:
        yield
    finally:
        hf.train(was_training)
        for prm, req in frozen:
            prm.requires_grad_(req)


PROCEDURES = {
    "paper": "the released code's rule: every candidate head swept alone on the whole calibration set; "
    "keep every head that alone gains >= min_gain items over baseline; apply all kept heads together",
    "shortlist": "screen every candidate (attribution or exact on screen_items items per task); the best "
    "`shortlist` heads with a positive score are swept alone on the whole calibration set; keep a "
    "head if alone it gains >= min_gain items; combine kept heads greedily by gain, accepting a "
    "head only if the combination gains strictly",
}
PROCEDURE = "paper"  # the default: the procedure of the paper's released code
SCREENS = ("attribution", "exact")


def _check_search(
    items: list, procedure: str, shortlist: int, screen: str, screen_items: int, min_items: int
) -> None:
    if len(items) < min_items:
        raise ValueError(
            f"calibration set too small: {len(items)} items, need at least {min_items} (one item "
            f"would be worth {100 / max(len(items), 1):.0f}% accuracy); load more calibration items"
        )
    if procedure not in PROCEDURES:
        raise ValueError(f"procedure must be one of {', '.join(PROCEDURES)} (got {procedure!r})")
    if shortlist < 1:
        raise ValueError(f"shortlist must be >= 1 head (got {shortlist})")
    if screen_items < 1:
        raise ValueError(f"screen_items must be >= 1 item per task (got {screen_items})")
    if screen not in SCREENS:
        raise ValueError(f"screen must be one of {', '.join(SCREENS)} (got {screen!r})")


def candidate_heads(
    hf, tok, items: list, candidates, max_candidates: int | None, batch_size: int, params: dict
) -> tuple[list[tuple[int, int]], dict[tuple[int, int], float]]:
    """Step 1: the heads to search and each head's hidden-sink frequency on the calibration prompts.

    Default candidates are the heads with a hidden sink on some calibration prompt: ACT (keep_first=True)
    is the identity on every other head (no sink column to scale), so leaving them out changes no
    result; with keep_first=False every head is a candidate."""
    from steer.sinks import detect_sinks

    sinks = detect_sinks(
        hf,
        tok,
        [it.prompt for it in items],
        tau=params["tau"],
        alpha=params["alpha"],
        min_queries=params["min_queries"],
        batch_size=batch_size,
        keep_maps=False,
    )
    freq = {(layer, h): f for layer, h, f in sinks.heads_with_hidden_sinks()}
    mm = model_map(hf)
    if candidates is None and not params["keep_first"]:  # ACT then acts on a first-token sink too
        candidates = [(layer, h) for layer in range(mm.n_layers) for h in range(_n_heads(mm))]
    cands = list(freq) if candidates is None else check_heads(mm, candidates)
    if max_candidates is not None:
        cands = cands[:max_candidates]
    return cands, freq


def screen_heads(
    hf,
    tok,
    splits: list,
    cands: list,
    *,
    screen: str,
    screen_items: int,
    shortlist: int,
    batch_size: int,
    fast: bool,
    params: dict,
    progress: Progress | None = None,
) -> tuple[list[tuple[int, int]], list[dict]]:
    """Step 2 of the shortlist procedure: score every candidate, keep the best `shortlist` with a positive
    score. The score is the change of mean log P(right option) with ACT on the head alone: continuous,
    so it ranks heads where an item count on few items would be ties."""
    say = _notes(progress)
    items = [it for s in splits for it in s.items]
    if len(cands) <= shortlist:
        return list(cands), []
    rows: list[dict] = []
    if screen == "attribution":
        say(f"screening {len(cands)} heads by attribution on {len(items)} items")
        est = attribution_screen(hf, tok, items, batch_size=batch_size, **params)
        rows = [{"layer": hd[0], "head": hd[1], "screen_score": est[hd]} for hd in cands]
    else:
        sub = [it for s in splits for it in s.items[:screen_items]]
        say(f"screening {len(cands)} heads exactly on {len(sub)} items")
        sw = sweep_heads(hf, tok, sub, cands, batch_size=batch_size, fast=fast, progress=progress, **params)
        base = sw.result().n_correct()
        for hd in cands:
            k = sw.result(hd).n_correct()
            rows.append(
                {
                    "layer": hd[0],
                    "head": hd[1],
                    "screen_score": sw.delta_logp(hd),
                    "correct": k,
                    "gain": k - base,
                    "rows_touched": sw.touched[hd],
                }
            )
    ranked = sorted(rows, key=lambda r: -r["screen_score"])
    short = [(r["layer"], r["head"]) for r in ranked if r["screen_score"] > 0][:shortlist]
    for r in rows:
        r["shortlisted"] = (r["layer"], r["head"]) in short
    say(f"shortlist {short}")
    return short, rows


def keep_alone(
    sweep: HeadSweep, heads: Sequence[tuple[int, int]], min_gain: int, freq: dict | None = None
) -> tuple[int, list[dict]]:
    """Step 3, both procedures: baseline items right, and per head its items right with ACT on it alone,
    gain over baseline, and kept = gain >= min_gain. Pure function of the sweep (re-scorable)."""
    base = sweep.result().n_correct()
    rows = []
    for layer, h in heads:
        k = sweep.result((layer, h)).n_correct()
        rows.append(
            {
                "layer": layer,
                "head": h,
                "hidden_sink_fraction": (freq or {}).get((layer, h), 0.0),
                "correct": k,
                "gain": k - base,
                "kept": k - base >= min_gain,
                "chosen": False,
                "rows_touched": sweep.touched[(layer, h)],
            }
        )
    return base, rows


def select_paper(rows: list[dict]) -> list[tuple[int, int]]:
    """Step 4, paper: every head kept alone is applied, all together (no combination check)."""
    chosen = []
    for r in rows:
        r["chosen"] = bool(r["kept"])
        if r["kept"]:
            chosen.append((r["layer"], r["head"]))
    return chosen


def combine_greedy(
    rows: list[dict], base_k: int, score: Callable[[list], int], progress: Progress | None = None
) -> tuple[list[tuple[int, int]], int, list[dict]]:
    """Step 4, shortlist: add kept heads in order of gain, each accepted only if the combination gets
    strictly more items right than the best set so far (baseline included). score(heads) -> items right
    on the calibration set with ACT on those heads."""
    report = as_progress(progress)
    kept = sorted((r for r in rows if r["kept"]), key=lambda r: -r["gain"])
    chosen: list[tuple[int, int]] = []
    best, combos = base_k, []
    for n, r in enumerate(kept):
        trial = [*chosen, (r["layer"], r["head"])]
        if chosen:
            k = score(trial)
            combos.append({"heads": [list(hd) for hd in trial], "correct": k})
            report(n + 1, len(kept), f"combination {trial}: {k}")
        else:
            k = r["correct"]
        if k > best:
            chosen, best, r["chosen"] = trial, k, True
    return chosen, best, combos


def _notes(progress: Progress | None) -> Callable[[str], None]:
    """Status lines (nothing to count) through a Progress."""
    report = as_progress(progress)
    return lambda note: report(0, 0, note)


def _scorer(hf, tok, splits, batch_size: int, params: dict) -> Callable[[list], int]:
    from steer.tasks import evaluate

    def score(heads: list) -> int:
        act = ACT(heads, on_no_effect="ignore", **params)
        return evaluate(hf, tok, splits, batch_size=batch_size, interventions=[act]).n_correct()

    return score


def _select(procedure: str, rows: list[dict], base_k: int, score, progress: Progress) -> tuple[list, int, list[dict]]:
    """(heads applied, their calibration score, greedy combination log) by the procedure's keep rule."""
    if procedure == "shortlist":
        return combine_greedy(rows, base_k, score, progress)
    chosen = select_paper(rows)
    alone = {(r["layer"], r["head"]): r["correct"] for r in rows}
    best = score(chosen) if len(chosen) > 1 else alone[chosen[0]] if chosen else base_k
    return chosen, best, []


def calibrate_heads(
    model,
    tok,
    calibration,
    *,
    procedure: str = PROCEDURE,
    candidates: Sequence[tuple[int, int]] | None = None,
    max_candidates: int | None = None,
    shortlist: int = SHORTLIST,
    screen: str = "attribution",
    screen_items: int = SCREEN_ITEMS,
    beta: float = BETA,
    tau: float | None = TAU,
    alpha: float | None = None,
    min_queries: int = MIN_QUERIES,
    keep_first: bool = True,
    min_gain: int = MIN_GAIN,
    min_items: int = MIN_CALIBRATION_ITEMS,
    batch_size: int = 16,
    fast: bool = True,
    progress: Progress | None = None,
) -> ACTConfig:
    """ACT head search on a calibration split by `procedure` (PROCEDURES; module docstring).

    candidates: None = every head with a hidden sink on the calibration prompts (ACT is the identity on
    the others). procedure="paper": every candidate alone, keep all that gain (the default);
    "shortlist": screen (`screen`, `screen_items`), sweep the best `shortlist`, combine greedily."""
    _check_beta(beta)
    sink_threshold(tau, alpha, 1)
    hf = unwrap_model(model)
    splits = _items_of(calibration)
    items = [it for s in splits for it in s.items]
    _check_search(items, procedure, shortlist, screen, screen_items, min_items)
    _refuse_unsupported(hf)
    progress = as_progress(progress)
    say = _notes(progress)
    params = dict(beta=beta, tau=tau, alpha=alpha, min_queries=min_queries, keep_first=keep_first)
    cands, freq = candidate_heads(hf, tok, items, candidates, max_candidates, batch_size, params)
    n_total = model_map(hf).n_layers * _n_heads(model_map(hf))
    say(f"{len(cands)} candidate heads of {n_total} ({len(freq)} show a hidden sink on the calibration prompts)")
    swept, screening = cands, []
    if procedure == "shortlist":
        swept, screening = screen_heads(hf, tok, splits, cands, screen=screen, screen_items=screen_items,
                                        shortlist=shortlist, batch_size=batch_size, fast=fast, params=params,
                                        progress=progress)
    sw = sweep_heads(hf, tok, items, swept, batch_size=batch_size, fast=fast, progress=progress, **params)
    base_k, rows = keep_alone(sw, swept, min_gain, freq)
    say(f"baseline {base_k}/{len(items)}; {sum(r['kept'] for r in rows)} of {len(rows)} heads gain alone")
    chosen, best, combos = _select(procedure, rows, base_k, _scorer(hf, tok, splits, batch_size, params), progress)
    search = dict(
        procedure=procedure, rule=PROCEDURES[procedure], min_gain=min_gain, screen=screen if screening else None,
        screen_items_per_task=screen_items if screening and screen == "exact" else None,
        shortlist_size=shortlist if procedure == "shortlist" else None, max_candidates=max_candidates,
        n_items=len(items), tasks=[s.task for s in splits], seeds=[s.seed for s in splits], n_heads_total=n_total,
        n_candidates=len(cands), swept=[list(hd) for hd in swept], screening=screening, baseline_correct=base_k,
        final_correct=best, candidates=rows, combinations=combos, path=sw.path,
    )
    name = getattr(hf.config, "_name_or_path", "") or hf.config.model_type
    return ACTConfig(heads=chosen, model=str(name), search=search, identity=model_identity(hf), **params)
