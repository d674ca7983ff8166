"""Verifier side of DiFR: teacher-force the claim, recompute, compare, decide at a calibrated FPR.

The verifier runs the reference model (with the claimed intervention applied, if any: wrap the call
in that intervention's context) on prompt + output, recomputes each generated token's fingerprint
and scores it: Activation-DiFR by the L2 distance ||f_provider - f_verifier||, Token-DiFR by the
clipped Gumbel margin. The decision statistic is the mean score over the file's n tokens; the
threshold for that n comes from benign runs (same model, different batch composition, padding,
attention kernel, threads) so that at most `target_fpr` of benign n-token means exceed it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from steer.difr.fingerprint import (
    DiFRConfig,
    Fingerprints,
    _on_lm_head_input,
    config_hash,
    projection_matrix,
    read_safetensors,
)
from steer.difr.sampling import SamplingParams, token_margins

CALIBRATION_FORMAT = "steer.difr.calibration/2"
# version 1 files named the unfloored distance "ulp" (see activation_distances); they still load
_CALIBRATION_FORMAT_V1 = "steer.difr.calibration/1"
METHODS = ("activation", "token")
STATISTICS = ("ulp", "l2", "ulp_unfloored")  # Activation-DiFR per-token distance, see activation_distances
# The most that fp16 storage rounding alone adds to a per-token distance: half a step per component.
# A mean at or below it is explained by rounding whatever the content, so no threshold goes lower.
ROUNDING_BOUND = {"ulp": 0.5}


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
    mine = config_hash(model)
    if fp.config_hash != mine:
        raise ValueError(f"the fingerprints were made with a different model configuration (config hash "
                         f"{fp.config_hash}, this model {mine}); verify with the claimed model")
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


def activation_distances(fp: Fingerprints, hidden: Tensor, statistic: str = "ulp") -> Tensor:
    """Per-token fingerprint distance (fp32 [N]) between the provider's fp16 f and the verifier's fp32 f.

    "ulp" (default): the RMS over components of (f_provider - f_verifier) in fp16 steps, where each
    component's step is floored at the step of the fingerprint's RMS: max(ulp(f_j), ulp(rms(f))).
    Storage rounding then contributes at most half a step per component whatever the content, so a
    threshold calibrated on some prompts transfers to others; with plain L2 the rounding term scales
    with |h| and the threshold drifts with content. The floor matters: a component near 0 has a tiny
    fp16 step, so benign fp32 noise (batching, kernels) is many of its steps, and the unfloored form
    gets a heavy benign tail that a few hundred calibration tokens do not sample (held-out FPR above
    target on SmolLM2, experiments/difr/RESULTS.md).
    "ulp_unfloored": the same without the floor (each component in its own fp16 steps).
    "l2": ||f_provider - f_verifier||_2, the paper's statistic.
    """
    if statistic not in STATISTICS:
        raise ValueError(f"statistic must be one of {STATISTICS}, got {statistic!r}")
    if hidden.shape[0] != fp.n_tokens:
        raise ValueError(f"{hidden.shape[0]} recomputed positions for {fp.n_tokens} fingerprints")
    mine = hidden.float() @ projection_matrix(fp.config, hidden.shape[1]).to(hidden.device)
    diff = fp.values.float().to(mine.device) - mine
    if statistic == "l2":
        return diff.norm(dim=-1).cpu()
    step = fp16_ulp(mine)
    if statistic == "ulp":
        rms = mine.pow(2).mean(-1, keepdim=True).sqrt()
        step = torch.maximum(step, fp16_ulp(rms))
    return (diff / step).pow(2).mean(-1).sqrt().cpu()


def clip_margins(margins: Tensor, clip: float | None) -> Tensor:
    return margins if clip is None else margins.clamp(max=clip)


def window_means(scores: Tensor, lengths: Tensor, n: int) -> Tensor:
    """Means over every non-overlapping n-token window inside each sequence (the unit a decision sees)."""
    out = []
    for seq in torch.split(scores, lengths.tolist()):
        m = seq.numel() // n
        if m:
            out.append(seq[: m * n].reshape(m, n).mean(1))
    return torch.cat(out) if out else torch.zeros(0)


# ---------------------------------------------------------------------------------------------
# Step 3: calibration on benign runs


@dataclass
class Calibration:
    """Benign per-token scores and the false-positive rate the threshold must hold."""

    method: str
    target_fpr: float
    benign: Tensor  # fp32 [N] per-token benign scores (margins already clipped)
    lengths: Tensor  # Int64[B] benign sequence lengths
    config: DiFRConfig
    config_hash: str
    model_id: str
    clip: float | None = None  # Token-DiFR: max(clip_percentile of benign margins, min_clip)
    clip_percentile: float = 99.9
    n_resamples: int = 4000  # benign n-token means drawn per threshold
    seed: int = 0
    statistic: str = "ulp"  # Activation-DiFR distance the benign scores were measured with
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

    def null_means(self, n: int) -> Tensor:
        """Benign means of n tokens: contiguous windows of benign sequences (joined if too short)."""
        if n not in self._cache:
            gen = torch.Generator().manual_seed(self.seed)
            seqs = torch.split(self.benign, self.lengths.tolist())
            long = [s for s in seqs if s.numel() >= n]
            means = torch.empty(self.n_resamples)
            for r in range(self.n_resamples):
                if long:
                    s = long[int(torch.randint(len(long), (1,), generator=gen))]
                    o = int(torch.randint(s.numel() - n + 1, (1,), generator=gen))
                    means[r] = s[o:o + n].mean()
                else:  # files longer than any benign sequence: join random benign sequences
                    parts, total = [], 0
                    while total < n:
                        s = seqs[int(torch.randint(len(seqs), (1,), generator=gen))]
                        parts.append(s)
                        total += s.numel()
                    means[r] = torch.cat(parts)[:n].mean()
            self._cache[n] = means.sort().values
        return self._cache[n]

    def threshold(self, n: int) -> float:
        """Smallest t with at most target_fpr of benign n-token means above it (conformal rank),
        never below `min_threshold`: a few hundred calibration tokens can sit lower than what storage
        rounding gives other prompts, and thresholds under that bound caused held-out false positives."""
        null = self.null_means(n)
        rank = min(math.ceil((null.numel() + 1) * (1 - self.target_fpr)), null.numel()) - 1
        t = float(null[rank])
        return t if self.min_threshold is None else max(t, float(self.min_threshold))

    def p_value(self, score: float, n: int) -> float:
        """Share of benign n-token means at least as large as `score` (+1 smoothed)."""
        null = self.null_means(n)
        return float(((null >= score).sum() + 1) / (null.numel() + 1))

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
        if self.config_hash != fp.config_hash or self.model_id != fp.model_id:
            raise ValueError(f"calibration is for model {self.model_id!r} ({self.config_hash}) but the "
                             f"fingerprints claim {fp.model_id!r} ({fp.config_hash})")

    def to_safetensors(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        from steer.difr.fingerprint import _checksum

        tensors = {"benign": self.benign.float().contiguous(), "lengths": self.lengths.to(torch.int64).contiguous()}
        meta = {
            "format": CALIBRATION_FORMAT, "method": self.method, "target_fpr": repr(self.target_fpr),
            "k": str(self.config.k), "seed": str(self.config.seed), "projection": self.config.projection,
            "config_hash": self.config_hash, "model_id": self.model_id, "clip": repr(self.clip),
            "clip_percentile": repr(self.clip_percentile), "n_resamples": str(self.n_resamples),
            "resample_seed": str(self.seed), "statistic": self.statistic,
            "intervention": self.intervention or "", "min_threshold": repr(self.min_threshold),
            "checksum": _checksum(tensors),
        }
        save_file(tensors, str(path), metadata=meta)
        return Path(path)

    @classmethod
    def from_safetensors(cls, path: str | Path) -> Calibration:
        t, m = read_safetensors(path, (CALIBRATION_FORMAT, _CALIBRATION_FORMAT_V1), "calibration")
        if m["format"] == _CALIBRATION_FORMAT_V1 and m.get("statistic") == "ulp":
            m["statistic"] = "ulp_unfloored"  # what "ulp" meant when the file was written
        try:
            return cls(
                m["method"], float(m["target_fpr"]), t["benign"], t["lengths"],
                DiFRConfig(int(m["k"]), int(m["seed"]), m["projection"]), m["config_hash"], m["model_id"],
                None if m["clip"] == "None" else float(m["clip"]), float(m["clip_percentile"]),
                int(m["n_resamples"]), int(m["resample_seed"]), m["statistic"], m["intervention"] or None,
                None if m.get("min_threshold", "None") == "None" else float(m["min_threshold"]),
            )
        except KeyError as exc:
            raise ValueError(f"{path}: calibration file lacks {exc}") from None

    save = to_safetensors
    load = from_safetensors

    def to_dataframe(self):
        import pandas as pd

        ns = sorted({1, 2, 4, 8, 16, 32, 64, 128, 256, int(self.lengths.max())})
        return pd.DataFrame({"n_tokens": ns, "threshold": [self.threshold(n) for n in ns],
                             "target_fpr": self.target_fpr})

    def figure(self):
        import plotly.graph_objects as go

        df = self.to_dataframe()
        fig = go.Figure(go.Scatter(x=df.n_tokens, y=df.threshold, mode="lines+markers", name="threshold"))
        fig.update_layout(title=f"{self.method} threshold at FPR {self.target_fpr:g} ({self.n_benign} benign sequences)",
                          xaxis_title="tokens averaged", yaxis_title="threshold", xaxis_type="log")
        return fig


def benign_scores(model: nn.Module, fp: Fingerprints, method: str, batch_size: int = 8,
                  reference: Reference | None = None, statistic: str = "ulp") -> Tensor:
    """Per-token raw scores of one claim (distances, or unclipped margins)."""
    ref = reference or teacher_force(model, fp, batch_size)
    if method == "activation":
        return activation_distances(fp, ref.hidden, statistic)
    if ref.margins is None:
        raise ValueError("Token-DiFR needs a sampled claim (generated with `sampling=`), this one is greedy")
    return ref.margins


def calibrate(model: nn.Module, benign: list[Fingerprints], *, target_fpr: float = 0.01,
              method: str = "activation", batch_size: int = 8, model_id: str | None = None,
              clip_percentile: float = 99.9, min_clip: float = 1.0, statistic: str = "ulp",
              references: list[Reference] | None = None, intervention: str | None = None) -> Calibration:
    """Calibrate a threshold from benign claims (honest runs under benign numerical noise).

    Token-DiFR clips margins at the `clip_percentile` of benign margins, but never below `min_clip`
    logits: in fp32 almost every honest margin is exactly 0, and a clip at 0 would erase every signal.
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
        if (fp.config, fp.model_id, fp.config_hash) != (first.config, first.model_id, first.config_hash):
            raise ValueError("benign fingerprint sets disagree on k/seed/projection/model; calibrate one setting at a time")
        scores.append(benign_scores(model, fp, method, batch_size, references[i] if references else None,
                                    statistic))
        lengths.append(fp.output_lengths)
    s = torch.cat(scores)
    clip = None
    if method == "token":
        finite = s[torch.isfinite(s)]
        pct = float(torch.quantile(finite, clip_percentile / 100)) if finite.numel() else 0.0
        clip = max(pct, float(min_clip))
        s = clip_margins(s, clip)
    floor = ROUNDING_BOUND.get(statistic) if method == "activation" else None
    return Calibration(method, target_fpr, s.float(), torch.cat(lengths), first.config, first.config_hash,
                       first.model_id, clip, clip_percentile, statistic=statistic, intervention=intervention,
                       min_threshold=floor)


# ---------------------------------------------------------------------------------------------
# Step 4: the decision


@dataclass
class VerificationReport:
    """Per-token scores of a claim, their mean over n tokens, and the decision at the calibrated FPR."""

    method: str
    scores: Tensor  # fp32 [N] per token (distance, or clipped margin)
    lengths: Tensor  # Int64[B]
    output_ids: Tensor  # Int64[N]
    score: float  # mean over the n tokens
    threshold: float | None
    p_value: float | None
    target_fpr: float | None
    decision: str  # "verified" | "rejected" | "uncalibrated"
    model_id: str = ""
    k: int = 0
    distances: Tensor | None = None  # Activation-DiFR distances, always computed
    margins: Tensor | None = None  # raw Token-DiFR margins when the claim was sampled
    statistic: str = "ulp"

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
                "k": self.k, "statistic": self.statistic}

    def to_dataframe(self):
        import pandas as pd

        seq = torch.repeat_interleave(torch.arange(self.lengths.numel()), self.lengths)
        pos = torch.cat([torch.arange(int(n)) for n in self.lengths])
        df = pd.DataFrame({"sequence": seq.numpy(), "position": pos.numpy(),
                           "token_id": self.output_ids.numpy(), "score": self.scores.numpy()})
        if self.distances is not None:
            df["distance"] = self.distances.numpy()
        if self.margins is not None:
            df["margin"] = self.margins.numpy()
        return df

    def figure(self):
        import plotly.graph_objects as go

        df = self.to_dataframe()
        fig = go.Figure()
        for s, part in df.groupby("sequence"):
            fig.add_trace(go.Scatter(x=part.position, y=part.score, mode="markers", name=f"sequence {s}"))
        if self.threshold is not None:
            fig.add_hline(y=self.threshold, line_dash="dash",
                          annotation_text=f"threshold for the mean of {self.n_tokens} tokens")
        fig.add_hline(y=self.score, line_dash="dot", annotation_text=f"mean {self.score:.3g}")
        what = f"{self.statistic} fingerprint distance" if self.method == "activation" else "clipped Gumbel margin"
        fig.update_layout(title=f"{self.decision.upper()}: {self.method}-DiFR, {self.n_tokens} tokens"
                          + (f", p = {self.p_value:.3g}" if self.p_value is not None else ""),
                          xaxis_title="generated token", yaxis_title=what)
        return fig


def verify(model: nn.Module, fingerprints: Fingerprints | str | Path, calibration: Calibration | None = None,
           *, method: str | None = None, model_id: str | None = None, batch_size: int = 8,
           reference: Reference | None = None, statistic: str = "ulp",
           intervention: str | None = None) -> VerificationReport:
    """Check a claim against the reference `model`; decide only with a calibration (else "uncalibrated").

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
    if method == "token" and not fp.sampling:
        raise ValueError("Token-DiFR needs a sampled claim (steer fingerprint --temperature ...), this one is greedy")
    ref = reference or teacher_force(model, fp, batch_size)
    statistic = calibration.statistic if calibration is not None else statistic
    distances = activation_distances(fp, ref.hidden, statistic)
    if method == "activation":
        scores = distances
    else:
        scores = clip_margins(ref.margins, calibration.clip if calibration is not None else None)
    score, n = float(scores.mean()), int(scores.numel())
    if calibration is None:
        threshold = p = None
        decision = "uncalibrated"
    else:
        threshold, p = calibration.threshold(n), calibration.p_value(score, n)
        decision = "verified" if math.isfinite(score) and score <= threshold else "rejected"
    return VerificationReport(method, scores.float(), fp.output_lengths, fp.output_ids, score, threshold, p,
                              calibration.target_fpr if calibration is not None else None, decision,
                              fp.model_id, fp.config.k, distances, ref.margins, statistic)
