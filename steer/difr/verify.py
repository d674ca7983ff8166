"""Verifier side of DiFR: teacher-force the claim, recompute, compare, decide at a calibrated FPR.

The verifier runs the reference model (with the claimed intervention applied, if any: wrap the call
in that intervention's context) on prompt + output, recomputes each generated token's fingerprint
and scores it: Activation-DiFR by the L2 distance ||f_provider - f_verifier||_2 (the paper's statistic),
Token-DiFR by the Gumbel margin clipped at 0.5 (the paper's code). The decision statistic is the mean
score over a window of n consecutive tokens of one sequence.

The threshold for n tokens is a split-conformal quantile: the benign runs (same model, different
batch composition, padding, attention kernel, threads) are cut into disjoint windows of n
consecutive tokens inside each sequence (never across a sequence boundary), each window's mean is one
calibration unit, and the threshold is the ceil((m + 1)(1 - alpha))-th smallest of the m unit means.
A claim whose score is exchangeable with those units then exceeds it with probability <= alpha. With
fewer than 1/alpha units the rank does not exist (or sits on the maximum); the cell is reported as
"insufficient", never as a pass.

A claim is decided per sequence (CLAIM_RULE): a claim of B sequences (e.g. several requests
concatenated) tests each sequence at alpha / B; a sequence of L tokens is cut into w = ceil(L / n)
windows of n tokens (disjoint, the last one ending at the sequence's end), each tested at
alpha / (B w) against the conformal threshold for n at that level, n the longest window the
calibration has enough units for. The claim is rejected when any window exceeds its threshold
(the failing sequences are named), so an honest claim is rejected with probability <= alpha
(Bonferroni: no independence between windows or sequences needed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from steer import options
from steer.difr.fingerprint import (
    DiFRConfig,
    Fingerprints,
    _on_lm_head_input,
    projection_matrix,
)
from steer.difr.sampling import SamplingParams, token_margins
from steer.identity import COMPUTATION, LEGACY_DIFR, check_model, differences, scheme_of
from steer.io import CALIBRATION, FormatError, load_tensors, save_tensors

# Calibration files (steer.io CALIBRATION): version 1 named the unfloored distance "ulp" (see
# activation_distances); version 2 was thresholded by a quantile of resampled overlapping windows;
# versions 1-3 carry the config hash of DiFR's own rule (identity scheme "steer.difr/1"). All still
# load (the same benign scores).
THRESHOLD_RULE = "split-conformal rank over disjoint within-sequence windows"
METHODS = options.VERIFY_METHODS
STATISTICS = options.VERIFY_STATISTICS  # Activation-DiFR per-token distance, see activation_distances
DEFAULT_STATISTIC = options.DEFAULT_STATISTIC  # the paper's
# The most that fp16 storage rounding alone adds to a per-token "ulp" distance: half a step per
# component. A mean at or below it is explained by rounding whatever the content, so no "ulp"
# threshold goes lower (the paper's L2 has no such content-free bound).
ROUNDING_BOUND = {"ulp": 0.5}
# Token-DiFR margins are clipped here, as the paper's code does (margins above it, and the infinite
# margin of a token outside the claimed support, all score 0.5).
TOKEN_CLIP = 0.5
DECISIONS = ("verified", "rejected", "uncalibrated", "insufficient")
CLAIMED_MODEL = "verify with the model the provider claims"
CLAIM_RULE = ("per sequence, Bonferroni: each of the claim's B sequences at alpha/B, each of its w windows of n "
              "tokens at alpha/(B*w); rejected if any window's mean exceeds its threshold")


# ---------------------------------------------------------------------------------------------
# Step 1: teacher forcing


@dataclass
class Reference:
    """What the verifier recomputed for a claim: hidden states and (if sampled) Token-DiFR margins."""

    hidden: Tensor  # fp32 [N, D], aligned with Fingerprints.values
    margins: Tensor | None  # fp32 [N] raw margins (inf outside the support), None for greedy claims


def check_claim(model: nn.Module, fp: Fingerprints, model_id: str | None = None,
                intervention: str | None = None) -> None:
    """Raise ValueError unless `fp` claims this model (id, architecture, vocabulary) and intervention."""
    if (fp.intervention or None) != (intervention or None):
        raise ValueError(
            f"the fingerprints claim intervention config {fp.intervention or 'none'} but the verifier "
            f"{'applies ' + intervention if intervention else 'applies none'}; verify with the same config "
            f"(steer verify --config DIR) so the reference runs what the provider claims")
    if model_id is not None and fp.model_id != model_id:
        raise ValueError(f"the fingerprints claim model {fp.model_id!r} but the verifier loaded {model_id!r}; "
                         f"verify against the model the provider claims")
    check_model(fp.identity, model, "the fingerprint claim", COMPUTATION, any_family=True, fix=CLAIMED_MODEL)
    vocab = model.get_output_embeddings().weight.shape[0]
    ids = torch.cat([fp.prompt_ids, fp.output_ids])
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise ValueError(f"token ids outside this model's vocabulary (0..{vocab - 1}): not this model's tokens")
    if fp.n_tokens == 0:
        raise ValueError("the fingerprint file holds no generated tokens: nothing to verify")


@torch.no_grad()
def teacher_force(model: nn.Module, fp: Fingerprints, batch_size: int = 8) -> Reference:
    """Run prompt + output[:-1] through `model` in left-padded batches; collect generated positions."""
    device = next(model.parameters()).device
    seqs = fp.sequences()
    params = SamplingParams(**fp.sampling) if fp.sampling else None
    hidden_out: list[Tensor] = [None] * len(seqs)
    margin_out: list[Tensor] = [None] * len(seqs)
    captured: list[Tensor] = []
    for start in range(0, len(seqs), batch_size):
        chunk = seqs[start:start + batch_size]
        rows = [torch.cat([p, o[:-1]]) for p, o in chunk]
        width = max(r.numel() for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - r.numel():] = r
            mask[i, width - r.numel():] = 1
        pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # as generate derives them
        captured.clear()
        with _on_lm_head_input(model, lambda h, _m: captured.append(h.detach())):
            out = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device),
                        use_cache=False)
        h_all = captured[-1]
        for i, (p, o) in enumerate(chunk):
            first = width - rows[i].numel() + p.numel() - 1  # position whose logits gave output token 0
            sel = torch.arange(first, first + o.numel(), device=h_all.device)
            hidden_out[start + i] = h_all[i, sel].float().cpu()
            if params is not None:
                seed = int(fp.sample_seeds[start + i])
                margin_out[start + i] = token_margins(out.logits[i, sel].float().cpu(), o, seed, params)
    return Reference(torch.cat(hidden_out), torch.cat(margin_out) if params is not None else None)


# ---------------------------------------------------------------------------------------------
# Step 2: per-token scores


def fp16_ulp(x: Tensor) -> Tensor:
    """Spacing of fp16 numbers at |x| (2**-24 in the subnormal range)."""
    _, e = torch.frexp(x.float())  # x = m * 2**e, 0.5 <= |m| < 1
    return torch.exp2((e - 11).clamp_min(-24).float())


def activation_distances(fp: Fingerprints, hidden: Tensor, statistic: str = DEFAULT_STATISTIC,
                         projection: Tensor | None = None) -> Tensor:
    """Per-token fingerprint distance (fp32 [N]) between the provider's fp16 f and the verifier's fp32 f.

    "l2" (default): ||f_provider - f_verifier||_2, the paper's statistic (adamkarvonen/difr computes
    torch.norm(f_verifier - f_provider, p=2) per token). Its benign floor is fp16 storage rounding,
    about 2**-12 |f| per component, so it scales with the size of the fingerprint: a threshold
    calibrated on some prompts sits a little low or high for others.
    "ulp": the RMS over components of (f_provider - f_verifier) in fp16 steps, each component's step
    floored at the step of the fingerprint's RMS, max(ulp(f_j), ulp(rms(f))). Storage rounding then
    adds at most half a step per component whatever the content, and calibrated thresholds never go
    below that bound (ROUNDING_BOUND, 0.5). What justifies it as an option: on SmolLM2 and its MoE
    (fp32 CPU, experiments/difr/RESULTS.md) the benign L2 grows with |f| (Spearman 0.59 / 0.60 at
    k = 8) while every benign per-token "ulp" distance stayed below 0.5 (max 0.335 / 0.388). But with
    an fp32 reference the "ulp" thresholds sit on the 0.5 bound itself, so its 0 false positives
    there hold by construction of the bound, not by calibration.
    "ulp_unfloored": each component in its own fp16 steps (a component near 0 has a tiny step, so
    benign fp32 noise is many of its steps: a heavy benign tail).

    `projection` overrides P (fp32 [D, k]; e.g. the reference code's own matrix in a parity test).
    """
    if statistic not in STATISTICS:
        raise ValueError(f"statistic must be one of {STATISTICS}, got {statistic!r}")
    if hidden.shape[0] != fp.n_tokens:
        raise ValueError(f"{hidden.shape[0]} recomputed positions for {fp.n_tokens} fingerprints")
    p = projection_matrix(fp.config, hidden.shape[1]) if projection is None else projection.float()
    if p.shape != (hidden.shape[1], fp.values.shape[1]):
        raise ValueError(f"projection must be [{hidden.shape[1]}, {fp.values.shape[1]}], got {tuple(p.shape)}")
    mine = hidden.float() @ p.to(hidden.device)
    diff = fp.values.float().to(mine.device) - mine
    if statistic == "l2":
        return diff.norm(dim=-1).cpu()
    step = fp16_ulp(mine)
    if statistic == "ulp":
        rms = mine.pow(2).mean(-1, keepdim=True).sqrt()
        step = torch.maximum(step, fp16_ulp(rms))
    return (diff / step).pow(2).mean(-1).sqrt().cpu()


def clip_margins(margins: Tensor, clip: float | None) -> Tensor:
    """Margins clamped at `clip` (inf, a token outside the support, becomes `clip`); None: unclipped."""
    return margins if clip is None else margins.clamp(max=clip)


def window_means(scores: Tensor, lengths: Tensor, n: int) -> Tensor:
    """Means of the disjoint n-token windows inside each sequence, in order; a sequence's last
    len % n tokens are dropped and no window crosses a sequence boundary (the calibration units)."""
    if n < 1:
        raise ValueError(f"window length must be >= 1, got {n}")
    if int(lengths.sum()) != scores.numel():
        raise ValueError(f"{scores.numel()} scores for sequences of {int(lengths.sum())} tokens in all")
    out = []
    for seq in torch.split(scores, lengths.tolist()):
        m = seq.numel() // n
        if m:
            out.append(seq[: m * n].reshape(m, n).mean(1))
    return torch.cat(out) if out else torch.zeros(0)


def conformal_rank(m: int, alpha: float) -> int:
    """1-based rank ceil((m + 1)(1 - alpha)) of the split-conformal quantile of m calibration units.

    Above m the quantile is +inf: no finite threshold holds the FPR with m units.
    """
    return math.ceil((m + 1) * (1 - alpha) - 1e-9)


def min_units(alpha: float) -> int:
    """Calibration units needed before a cell counts as calibrated: 1/alpha (100 at 1%)."""
    return math.ceil(1 / alpha - 1e-9)


# ---------------------------------------------------------------------------------------------
# Step 3: calibration on benign runs


@dataclass
class SequenceDecision:
    """One sequence of a claim under CLAIM_RULE: its windows, their level and threshold, the decision."""

    index: int  # position of the sequence in the claim
    n_tokens: int
    window: int | None  # n, tokens per window (None: no window length is calibrated at this level)
    n_windows: int  # windows tested, w = ceil(n_tokens / n)
    alpha: float  # FPR of each window's test: target_fpr / (sequences * w)
    threshold: float | None
    score: float  # the largest window mean (the mean of all tokens when insufficient)
    p_value: float | None  # min(1, w * the smallest window's conformal p-value)
    decision: str  # "verified" | "rejected" | "insufficient"
    calibration_windows: int  # benign units behind the threshold (at n = 1 when insufficient)
    windows_needed: int  # units the level needs, ceil(1 / alpha)

    def summary(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Calibration:
    """Benign per-token scores, and the split-conformal threshold they give at `target_fpr`.

    The calibration units for a claim of n tokens are the disjoint n-token windows inside each benign
    sequence (`window_means`); `threshold(n)` is their conformal quantile, or None ("insufficient")
    when there are fewer than 1/target_fpr of them.
    """

    method: str
    target_fpr: float
    benign: Tensor  # fp32 [N] per-token benign scores (margins already clipped)
    lengths: Tensor  # Int64[B] benign sequence lengths
    config: DiFRConfig
    identity: dict  # steer.identity of the model the benign claims ran on
    model_id: str
    clip: float | None = None  # Token-DiFR: margins clamped here (TOKEN_CLIP, or a benign percentile)
    clip_percentile: float | None = None  # set when `clip` came from a percentile of benign margins
    statistic: str = DEFAULT_STATISTIC  # Activation-DiFR distance the benign scores were measured with
    intervention: str | None = None  # digest of the intervention config the benign runs applied
    min_threshold: float | None = None  # no threshold below this (ROUNDING_BOUND of the statistic)
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if not 0 < self.target_fpr < 1:
            raise ValueError(f"target_fpr must be in (0, 1), got {self.target_fpr}")
        if self.statistic not in STATISTICS:
            raise ValueError(f"statistic must be one of {STATISTICS}, got {self.statistic!r}")
        if int(self.lengths.sum()) != self.benign.numel() or self.benign.numel() == 0:
            raise ValueError("calibration needs benign scores, one per token of its benign sequences")

    @property
    def n_benign(self) -> int:
        return int(self.lengths.numel())

    def units(self, n: int) -> Tensor:
        """Sorted means of the disjoint within-sequence n-token windows of the benign runs."""
        if n not in self._cache:
            self._cache[n] = window_means(self.benign, self.lengths, n).sort().values
        return self._cache[n]

    def n_units(self, n: int) -> int:
        """Disjoint within-sequence n-token benign windows (without computing their means)."""
        if n < 1:
            raise ValueError(f"window length must be >= 1, got {n}")
        return int((self.lengths // n).sum())

    @property
    def min_units(self) -> int:
        """Units a threshold needs: 1/target_fpr."""
        return min_units(self.target_fpr)

    def sufficient(self, n: int, alpha: float | None = None) -> bool:
        """Enough units for a threshold for n tokens at `alpha` (default target_fpr): 1/alpha of them."""
        return self.n_units(n) >= min_units(self.target_fpr if alpha is None else alpha)

    def max_tokens(self) -> int:
        """The largest n whose threshold is calibrated (0 if none)."""
        n = int(self.lengths.max())
        while n >= 1 and not self.sufficient(n):
            n -= 1
        return n

    def threshold(self, n: int, alpha: float | None = None) -> float | None:
        """Split-conformal threshold for the mean of n tokens at FPR `alpha` (default target_fpr): the
        ceil((m + 1)(1 - alpha))-th smallest of the m benign window means, never below `min_threshold`.
        None ("insufficient") with fewer than 1/alpha windows: no calibrated threshold exists, and no
        claim passes on it."""
        alpha = self.target_fpr if alpha is None else alpha
        if not self.sufficient(n, alpha):
            return None
        units = self.units(n)
        t = float(units[conformal_rank(units.numel(), alpha) - 1])
        return t if self.min_threshold is None else max(t, float(self.min_threshold))

    def p_value(self, score: float, n: int) -> float | None:
        """Conformal p-value (1 + #{benign windows >= score}) / (m + 1); None without any window."""
        units = self.units(n)
        if units.numel() == 0:
            return None
        return float(((units >= score).sum() + 1) / (units.numel() + 1))

    def decide(self, score: float, n: int) -> str:
        """Decision on a mean `score` over n tokens: verified, rejected, or insufficient (no threshold)."""
        t = self.threshold(n)
        if t is None:
            return "insufficient"
        return "verified" if math.isfinite(score) and score <= t else "rejected"

    def window_plan(self, length: int, n_sequences: int = 1) -> tuple[int, int, float] | None:
        """(n, w, alpha_w) for one sequence of `length` tokens in a claim of `n_sequences`: the longest
        window n whose threshold at alpha_w = target_fpr / (n_sequences * w), w = ceil(length / n)
        windows, is calibrated; None when not even n = 1 is (the sequence is "insufficient")."""
        if length < 1 or n_sequences < 1:
            raise ValueError(f"need a sequence of >= 1 token in a claim of >= 1 sequence, got {length}, {n_sequences}")
        for n in range(length, 0, -1):
            w = -(-length // n)
            alpha_w = self.target_fpr / (n_sequences * w)
            if self.sufficient(n, alpha_w):
                return n, w, alpha_w
        return None

    def decide_sequences(self, scores: Tensor, lengths: Tensor) -> list[SequenceDecision]:
        """The per-sequence decisions of CLAIM_RULE for a claim's per-token `scores` (sequences of `lengths`)."""
        if int(lengths.sum()) != scores.numel():
            raise ValueError(f"{scores.numel()} scores for sequences of {int(lengths.sum())} tokens in all")
        n_seq = int(lengths.numel())
        return [self._decide_sequence(i, seq, n_seq) for i, seq in enumerate(torch.split(scores, lengths.tolist()))]

    def _decide_sequence(self, index: int, seq: Tensor, n_seq: int) -> SequenceDecision:
        length = seq.numel()
        plan = self.window_plan(length, n_seq)
        if plan is None:  # report what n = 1 has and would need
            return SequenceDecision(index, length, None, 0, self.target_fpr / (n_seq * length), None,
                                    float(seq.mean()), None, "insufficient", self.n_units(1),
                                    min_units(self.target_fpr / (n_seq * length)))
        n, w, alpha_w = plan
        starts = [i * n for i in range(length // n)] + ([length - n] if length % n else [])
        means = torch.stack([seq[a:a + n].mean() for a in starts])
        threshold = self.threshold(n, alpha_w)
        worst = float(means.max())
        rejected = not bool(torch.isfinite(means).all()) or worst > threshold
        p = min(1.0, w * min(self.p_value(float(m), n) for m in means))
        return SequenceDecision(index, length, n, w, alpha_w, threshold, worst, p,
                                "rejected" if rejected else "verified", self.n_units(n), min_units(alpha_w))

    def check_compatible(self, fp: Fingerprints) -> None:
        if (self.config.k, self.config.seed, self.config.projection) != (fp.config.k, fp.config.seed,
                                                                       fp.config.projection):
            raise ValueError(
                f"calibration was made for k={self.config.k}, seed={self.config.seed}, "
                f"projection={self.config.projection} but the fingerprints use k={fp.config.k}, "
                f"seed={fp.config.seed}, projection={fp.config.projection}; calibrate with the same settings")
        if (self.intervention or None) != (fp.intervention or None):
            raise ValueError(f"calibration was made with intervention config {self.intervention or 'none'} but "
                             f"the fingerprints claim {fp.intervention or 'none'}; calibrate with the claimed config")
        # identities of different schemes (an older calibration file) are each checked against the model
        same = scheme_of(self.identity) == scheme_of(fp.identity)
        diffs = differences(self.identity, fp.identity, COMPUTATION) if same else []
        if diffs or self.model_id != fp.model_id:
            raise ValueError(f"calibration is for model {self.model_id!r} but the fingerprints claim {fp.model_id!r}"
                             + "".join(f"; {k}: calibration {a!r}, claim {b!r}" for k, a, b in diffs))

    def to_safetensors(self, path: str | Path) -> Path:
        tensors = {"benign": self.benign.float(), "lengths": self.lengths.to(torch.int64)}
        meta = {"method": self.method, "target_fpr": self.target_fpr, "k": self.config.k, "seed": self.config.seed,
                "projection": self.config.projection, "model_id": self.model_id, "clip": self.clip,
                "clip_percentile": self.clip_percentile, "threshold_rule": THRESHOLD_RULE,
                "statistic": self.statistic, "intervention": self.intervention, "min_threshold": self.min_threshold}
        return save_tensors(path, CALIBRATION, tensors, meta, identity=self.identity)

    @classmethod
    def from_safetensors(cls, path: str | Path) -> Calibration:
        stored = load_tensors(path, CALIBRATION)
        t, m = stored.tensors, {**stored.meta, "identity": stored.identity}
        if stored.version <= 3:
            m = _older_calibration(m, stored.version)
        try:
            # versions 1-2 hold the same benign scores; their threshold is now the conformal one
            return cls(
                m["method"], float(m["target_fpr"]), t["benign"], t["lengths"],
                DiFRConfig(int(m["k"]), int(m["seed"]), m["projection"]), m["identity"], m["model_id"],
                m["clip"], m["clip_percentile"] if m["method"] == "token" else None,
                m["statistic"], m["intervention"] or None, m["min_threshold"],
            )
        except KeyError as exc:
            raise FormatError(f"{path}: calibration file lacks {exc}") from None

    save = to_safetensors
    load = from_safetensors

    def to_dataframe(self):
        import pandas as pd

        ns = sorted({n for n in (1, 2, 4, 8, 16, 32, 64, 128, 256) if n <= int(self.lengths.max())}
                    | {int(self.lengths.max())})
        return pd.DataFrame({"n_tokens": ns, "threshold": [self.threshold(n) for n in ns],
                             "n_windows": [self.n_units(n) for n in ns],
                             "status": ["calibrated" if self.sufficient(n) else "insufficient" for n in ns],
                             "target_fpr": self.target_fpr})

    def figure(self):
        import plotly.graph_objects as go

        df = self.to_dataframe()
        df = df[df.status == "calibrated"]
        fig = go.Figure(go.Scatter(x=df.n_tokens, y=df.threshold, mode="lines+markers", name="conformal threshold"))
        fig.update_layout(title=f"{self.method} threshold at FPR {self.target_fpr:g} ({self.n_benign} benign sequences; "
                                f"calibrated up to {self.max_tokens()} tokens)",
                          xaxis_title="tokens averaged", yaxis_title="threshold", xaxis_type="log")
        return fig


def _older_calibration(m: dict[str, str], version: int) -> dict:
    """The fields of a calibration file of version 1-3 (header strings) as version 4 holds them."""
    opt = lambda key: None if m.get(key, "None") == "None" else float(m[key])  # noqa: E731
    m = {**m, "clip": opt("clip"), "clip_percentile": opt("clip_percentile"), "min_threshold": opt("min_threshold")}
    if "config_hash" in m:
        m["identity"] = {"scheme": LEGACY_DIFR, "config_hash": m["config_hash"]}
    if version == 1 and m.get("statistic") == "ulp":
        m["statistic"] = "ulp_unfloored"  # what "ulp" meant when the file was written
    return m


def benign_scores(model: nn.Module, fp: Fingerprints, method: str, batch_size: int = 8,
                  reference: Reference | None = None, statistic: str = DEFAULT_STATISTIC) -> Tensor:
    """Per-token raw scores of one claim (distances, or unclipped margins)."""
    ref = reference or teacher_force(model, fp, batch_size)
    if method == "activation":
        return activation_distances(fp, ref.hidden, statistic)
    if ref.margins is None:
        raise ValueError("Token-DiFR needs a sampled claim (generated with `sampling=`), this one is greedy")
    return ref.margins


def calibrate(model: nn.Module, benign: list[Fingerprints], *, target_fpr: float = 0.01,
              method: str = "activation", batch_size: int = 8, model_id: str | None = None,
              clip: float | None = TOKEN_CLIP, clip_percentile: float | None = None, min_clip: float = 1.0,
              statistic: str = DEFAULT_STATISTIC, references: list[Reference] | None = None,
              intervention: str | None = None) -> Calibration:
    """Calibrate a threshold from benign claims (honest runs under benign numerical noise).

    Token-DiFR clips margins at `clip` logits (default 0.5, the paper's code: a token outside the
    claimed support, margin inf, scores 0.5 too). `clip_percentile` instead clips at that percentile
    of the benign margins, never below `min_clip` (steer's earlier rule; in fp32 nearly every honest
    margin is exactly 0, so a percentile alone would clip at 0).
    Activation-DiFR thresholds with the "ulp" statistic never go below ROUNDING_BOUND (0.5 steps).

    `references` (one per claim) reuses teacher-forcing results already computed for them.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not benign:
        raise ValueError("calibration needs at least one benign fingerprint set")
    first = benign[0]
    scores, lengths = [], []
    if references is not None and len(references) != len(benign):
        raise ValueError(f"{len(references)} references for {len(benign)} benign fingerprint sets")
    for i, fp in enumerate(benign):
        check_claim(model, fp, model_id, intervention)
        if (fp.config, fp.model_id, fp.identity) != (first.config, first.model_id, first.identity):
            raise ValueError("benign fingerprint sets disagree on k/seed/projection/model; calibrate one setting at a time")
        scores.append(benign_scores(model, fp, method, batch_size, references[i] if references else None,
                                    statistic))
        lengths.append(fp.output_lengths)
    s = torch.cat(scores)
    if method == "token":
        if clip_percentile is not None:
            if not 0 < clip_percentile <= 100:
                raise ValueError(f"clip_percentile must be in (0, 100], got {clip_percentile}")
            finite = s[torch.isfinite(s)]
            pct = float(torch.quantile(finite, clip_percentile / 100)) if finite.numel() else 0.0
            clip = max(pct, float(min_clip))
        elif clip is None or not clip > 0:
            raise ValueError(f"Token-DiFR needs a clip > 0 (default {TOKEN_CLIP}) or a clip_percentile, got {clip}")
        s = clip_margins(s, float(clip))
    else:
        clip, clip_percentile = None, None
    floor = ROUNDING_BOUND.get(statistic) if method == "activation" else None
    return Calibration(method, target_fpr, s.float(), torch.cat(lengths), first.config, first.identity,
                       first.model_id, None if clip is None else float(clip), clip_percentile, statistic=statistic,
                       intervention=intervention, min_threshold=floor)


# ---------------------------------------------------------------------------------------------
# Step 4: the decision


@dataclass
class VerificationReport:
    """Per-token scores of a claim, the per-sequence decisions (CLAIM_RULE) and the claim's decision.

    `threshold`, `n_windows` and `min_windows` are those of the deciding sequence: the most significant
    rejected one, else the first insufficient one, else the one closest to rejection; `p_value` is the
    claim's Bonferroni p-value, min(1, B * the smallest sequence p-value). `score` is the mean over all
    the claim's tokens (descriptive; decisions are on window means, see `sequences`).
    """

    method: str
    scores: Tensor  # fp32 [N] per token (distance, or clipped margin)
    lengths: Tensor  # Int64[B]
    output_ids: Tensor  # Int64[N]
    score: float  # mean over all n tokens
    threshold: float | None
    p_value: float | None
    target_fpr: float | None
    decision: str  # "verified" | "rejected" | "uncalibrated" | "insufficient" (no calibrated threshold)
    model_id: str = ""
    k: int = 0
    distances: Tensor | None = None  # Activation-DiFR distances in `statistic`, always computed
    margins: Tensor | None = None  # raw Token-DiFR margins when the claim was sampled
    statistic: str = DEFAULT_STATISTIC
    l2: Tensor | None = None  # per-token paper L2 distance, always reported
    ulp: Tensor | None = None  # per-token floored-ulp distance, always reported beside it
    n_windows: int | None = None  # calibration units behind the deciding threshold
    min_windows: int | None = None  # units that threshold's level needs
    sequences: list[SequenceDecision] = field(default_factory=list)  # one per sequence (empty: uncalibrated)

    @property
    def rejected_sequences(self) -> list[int]:
        """Indices of the sequences whose windows exceeded their thresholds."""
        return [d.index for d in self.sequences if d.decision == "rejected"]

    @property
    def n_tokens(self) -> int:
        return int(self.scores.numel())

    @property
    def verified(self) -> bool:
        return self.decision == "verified"

    def summary(self) -> dict:
        return {"decision": self.decision, "method": self.method, "score": self.score,
                "threshold": self.threshold, "p_value": self.p_value, "target_fpr": self.target_fpr,
                "n_tokens": self.n_tokens, "n_sequences": int(self.lengths.numel()), "model_id": self.model_id,
                "k": self.k, "statistic": self.statistic,
                "mean_l2": None if self.l2 is None else float(self.l2.mean()),
                "mean_ulp": None if self.ulp is None else float(self.ulp.mean()),
                "calibration_windows": self.n_windows, "windows_needed": self.min_windows,
                "rule": CLAIM_RULE if self.sequences else None,
                "per_sequence_fpr": None if self.target_fpr is None else self.target_fpr / int(self.lengths.numel()),
                "rejected_sequences": self.rejected_sequences,
                "sequences": [d.summary() for d in self.sequences]}

    def to_dataframe(self):
        import pandas as pd

        seq = torch.repeat_interleave(torch.arange(self.lengths.numel()), self.lengths)
        pos = torch.cat([torch.arange(int(n)) for n in self.lengths])
        df = pd.DataFrame({"sequence": seq.numpy(), "position": pos.numpy(),
                           "token_id": self.output_ids.numpy(), "score": self.scores.numpy()})
        if self.distances is not None:
            df["distance"] = self.distances.numpy()
        if self.l2 is not None:
            df["l2"] = self.l2.numpy()
        if self.ulp is not None:
            df["ulp"] = self.ulp.numpy()
        if self.margins is not None:
            df["margin"] = self.margins.numpy()
        return df

    def _deciding(self) -> SequenceDecision | None:
        """The sequence the headline numbers come from (see the class docstring)."""
        for decision in ("rejected", "insufficient", "verified"):
            these = [d for d in self.sequences if d.decision == decision]
            if these:
                if decision == "insufficient":
                    return these[0]
                return min(these, key=lambda d: d.p_value)
        return None

    def headline(self) -> str:
        """One line: the decision, the rule's levels and the deciding sequence (what the CLI prints)."""
        s, d = self.summary(), self._deciding()
        if d is None:
            return (f"{self.decision.upper()}: mean {self.method} score {self.score:.4g} over {self.n_tokens} tokens; "
                    f"no decision without a calibration")
        head = (f"{self.decision.upper()}: {s['n_sequences']} sequence(s), {s['n_tokens']} tokens, decided per "
                f"sequence at FPR {s['target_fpr']:g}/{s['n_sequences']} each (Bonferroni over sequences and windows)")
        if self.decision == "insufficient":
            return (f"{head}; sequence {d.index} ({d.n_tokens} tokens): the calibration has {d.calibration_windows} "
                    f"disjoint benign 1-token windows, its windows' level {d.alpha:.3g} needs {d.windows_needed}: no "
                    f"decision (calibrate on more benign runs, or raise the target FPR)")
        bad = f"; rejected sequences {self.rejected_sequences}" if self.rejected_sequences else ""
        return (f"{head}{bad}; sequence {d.index}: largest mean of {d.window} tokens {d.score:.4g}, threshold "
                f"{d.threshold:.4g} at {d.alpha:.3g} ({d.n_windows} window(s)); claim p = {s['p_value']:.3g}")

    def sequences_dataframe(self):
        """One row per sequence: its window length, windows, level, threshold, worst window, decision."""
        import pandas as pd

        return pd.DataFrame([d.summary() for d in self.sequences])

    def figure(self):
        import plotly.graph_objects as go

        df = self.to_dataframe()
        fig = go.Figure()
        for s, part in df.groupby("sequence"):
            fig.add_trace(go.Scatter(x=part.position, y=part.score, mode="markers", name=f"sequence {s}"))
        deciding = self._deciding()
        if self.threshold is not None and deciding is not None:
            fig.add_hline(y=self.threshold, line_dash="dash",
                          annotation_text=f"threshold for the mean of {deciding.window} tokens "
                                          f"(sequence {deciding.index}, FPR {deciding.alpha:.2g})")
        fig.add_hline(y=self.score, line_dash="dot", annotation_text=f"mean {self.score:.3g}")
        what = f"{self.statistic} fingerprint distance" if self.method == "activation" else "clipped Gumbel margin"
        bad = f", rejected sequences {self.rejected_sequences}" if self.rejected_sequences else ""
        fig.update_layout(title=f"{self.decision.upper()}: {self.method}-DiFR, {self.n_tokens} tokens{bad}"
                          + (f", p = {self.p_value:.3g}" if self.p_value is not None else ""),
                          xaxis_title="generated token", yaxis_title=what)
        return fig


def verify(model: nn.Module, fingerprints: Fingerprints | str | Path, calibration: Calibration | None = None,
           *, method: str | None = None, model_id: str | None = None, batch_size: int = 8,
           reference: Reference | None = None, statistic: str = DEFAULT_STATISTIC,
           intervention: str | None = None) -> VerificationReport:
    """Check a claim against the reference `model`; decide only with a calibration (else "uncalibrated").

    The claim is decided per sequence (CLAIM_RULE): each sequence's windows against the conformal
    threshold for their length at target_fpr / (sequences * windows); rejected if any window exceeds
    it (`report.rejected_sequences` names them), "insufficient" (not a pass) if some sequence has no
    calibrated window length at its level and none is rejected. A one-sequence claim whose full length
    is calibrated is its mean against the threshold for its n tokens. Both per-token distances, the
    paper's L2 and the floored ulp, are in the report.

    For verifiable steering, call this inside the claimed intervention's context manager and pass
    its digest as `intervention` (steer.difr.fingerprint.intervention_digest).
    """
    fp = fingerprints if isinstance(fingerprints, Fingerprints) else Fingerprints.load(fingerprints)
    method = method or (calibration.method if calibration is not None else "activation")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if calibration is not None:
        if calibration.method != method:
            raise ValueError(f"the calibration is for {calibration.method}-DiFR, not {method}-DiFR")
        calibration.check_compatible(fp)
    check_claim(model, fp, model_id, intervention)
    if calibration is not None:  # after the claim: when both name another model, the claim's error is the one to see
        check_model(calibration.identity, model, "the calibration", COMPUTATION, any_family=True, fix=CLAIMED_MODEL)
    if method == "token" and not fp.sampling:
        raise ValueError("Token-DiFR needs a sampled claim (steer fingerprint --temperature ...), this one is greedy")
    ref = reference or teacher_force(model, fp, batch_size)
    statistic = calibration.statistic if calibration is not None else statistic
    if statistic not in STATISTICS:
        raise ValueError(f"statistic must be one of {STATISTICS}, got {statistic!r}")
    side = {s: activation_distances(fp, ref.hidden, s) for s in ("l2", "ulp", statistic)}
    distances = side[statistic]
    if method == "activation":
        scores = distances
    else:
        scores = clip_margins(ref.margins, calibration.clip if calibration is not None else TOKEN_CLIP)
    report = VerificationReport(method, scores.float(), fp.output_lengths, fp.output_ids, float(scores.mean()),
                                None, None, None, "uncalibrated", fp.model_id, fp.config.k, distances, ref.margins,
                                statistic, side["l2"], side["ulp"])
    if calibration is not None:
        _decide_claim(report, calibration)
    return report


def _decide_claim(report: VerificationReport, calibration: Calibration) -> None:
    """Fill in the per-sequence decisions and the claim's decision (CLAIM_RULE) of `report`."""
    seqs = calibration.decide_sequences(report.scores, report.lengths)
    decisions = {d.decision for d in seqs}
    report.decision = next(d for d in ("rejected", "insufficient", "verified") if d in decisions)
    report.sequences, report.target_fpr = seqs, calibration.target_fpr
    tested = [d.p_value for d in seqs if d.p_value is not None]
    report.p_value = min(1.0, len(seqs) * min(tested)) if tested else None
    deciding = report._deciding()
    report.threshold, report.n_windows, report.min_windows = (deciding.threshold, deciding.calibration_windows,
                                                              deciding.windows_needed)
