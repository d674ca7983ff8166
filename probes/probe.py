"""Step 4 of LYNX: the confidence probe, P(correct if we exit now | hidden states at the cue).

standardise -> Linear(F, 256) -> ReLU -> Linear(256, 64) -> ReLU -> Linear(64, 1) -> sigmoid,
trained with class-balanced BCE, Adam, 20% validation split and early stopping on validation loss
(the released code uses sklearn's MLPClassifier with these sizes; we keep it in torch so probes
save as safetensors + JSON, never pickles, and so the same forward can run fused on GPU through
steer.kernels.probe_score).

The forward is the released code's (StandardScaler then MLPClassifier.predict_proba): with its fitted
weights loaded, a LynxProbe gives its scores to fp32 rounding (tests/test_lynx_parity.py). Training is
not the same procedure, and a probe trained on the same events differs: the released train_probe.py
holds out a stratified 20% for its report and MLPClassifier holds out another 20% of the rest for early
stopping (so it fits on 64%), stops when validation ACCURACY has not improved by 1e-4 for 10 epochs (up
to 500), uses batches of min(200, n) and an L2 penalty alpha=1e-4 on the weights only, divided by the
batch's weight sum; steer fits on 80%, stops on the validation loss (up to 200 epochs), uses batches of
64 and Adam's coupled weight_decay (ProbeConfig says how the two penalties compare).

A probe remembers what it was trained on (model name, layer count, hidden size, feature points);
applying it to anything else is an error, not a silent wrong answer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from steer.identity import COMPUTATION, check_model
from steer.io import LYNX_PROBE, load_json, load_tensors, save_json, save_tensors
from steer.probes.conformal import ConformalCalibration
from steer.probes.cues import CueSet


@dataclass
class ProbeConfig:
    """Training parameters (LYNX code defaults: hidden (256, 64), 20% validation, early stopping)."""

    hidden: tuple[int, ...] = (256, 64)
    validation_fraction: float = 0.2
    lr: float = 1e-3
    # Adam's coupled L2 (torch.optim.Adam weight_decay): weight_decay * theta is added to the gradient of
    # every parameter, biases included, i.e. a penalty 0.5 * weight_decay * ||theta||^2 on the mean batch
    # loss. It is NOT sklearn's alpha: the reference's MLPClassifier (alpha=1e-4, its default) penalises
    # 0.5 * alpha * ||W||^2 / batch_size on the weight matrices only (batch_size = min(200, n) there), an
    # effective coefficient of alpha / batch_size ~ 5e-7, so this default regularises ~200x more strongly.
    weight_decay: float = 1e-4
    batch_size: int = 64
    max_epochs: int = 200
    patience: int = 10  # epochs without validation-loss improvement before stopping
    class_balanced: bool = True
    seed: int = 0


@dataclass
class ProbeInfo:
    """What the probe was trained on; checked whenever it is applied."""

    model: str  # model name or path (informational)
    n_layers: int
    d_model: int
    points: list[str]
    cues: dict = field(default_factory=dict)
    exit_string: str = ""
    n_train: int = 0
    n_val: int = 0
    best_epoch: int = 0
    val_loss: float = math.nan
    val_auc: float = math.nan


class LynxProbe(nn.Module):
    """MLP probe with its standardisation built in; `forward(features) -> p` in [0, 1]."""

    def __init__(self, n_features: int, hidden: Sequence[int] = (256, 64), info: ProbeInfo | None = None):
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_features))
        self.register_buffer("std", torch.ones(n_features))
        sizes = [n_features, *hidden, 1]
        self.linears = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.info = info
        self.calibration: ConformalCalibration | None = None
        self.identity: dict | None = None  # steer.identity of the model trained on (None: saved without one)

    @property
    def n_features(self) -> int:
        return self.mean.numel()

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        h = (x.float() - self.mean) / self.std
        for i, lin in enumerate(self.linears):
            h = lin(h)
            if i < len(self.linears) - 1:
                h = torch.relu(h)
        return h.squeeze(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.n_features:
            raise ValueError(f"probe expects {self.n_features} features, got {x.shape[-1]}: it was trained on "
                             f"points {self.info.points if self.info else '?'}")
        return torch.sigmoid(self.logits(x))

    def score_hidden(self, hidden: Sequence[torch.Tensor], positions: torch.Tensor) -> torch.Tensor:
        """p for each row from per-point hidden states [B, T, D_l] at `positions` [B].

        On CUDA uses the fused kernel steer.kernels.probe_score when it is installed (one launch, no
        concatenated feature tensor); elsewhere the torch path. Both compute the same function."""
        if hidden[0].is_cuda:
            try:
                from steer.kernels.probe_score import probe_score
            except ImportError:
                probe_score = None
            if probe_score is not None:
                layers = [(lin.weight, lin.bias) for lin in self.linears]
                return probe_score(list(hidden), positions, self.mean, self.std, layers)
        rows = torch.arange(hidden[0].shape[0], device=hidden[0].device)
        feats = torch.cat([h[rows, positions].float() for h in hidden], dim=-1)
        return self(feats)

    # ---- compatibility --------------------------------------------------------------------------
    def check_compatible(self, model, points: Sequence[str] | None = None) -> None:
        """Raise if this probe was trained for another model (identity, shape) or feature points."""
        if self.info is not None:
            self._check_shape(model, points)
        if self.identity is not None:  # same shape: is it the same model (config, family, experts)?
            check_model(self.identity, model, "this probe", COMPUTATION, any_family=True,
                        fix="train a probe for this model (steer probe label + train)")

    def _check_shape(self, model, points: Sequence[str] | None) -> None:
        cfg = model.config.get_text_config(decoder=True)
        n, d = int(cfg.num_hidden_layers), int(cfg.hidden_size)
        if (n, d) != (self.info.n_layers, self.info.d_model):
            raise ValueError(
                f"probe was trained on {self.info.model!r} ({self.info.n_layers} layers, d_model "
                f"{self.info.d_model}) but this model has {n} layers, d_model {d}: train a probe for this model"
            )
        if points is not None and list(points) != list(self.info.points):
            raise ValueError(f"probe was trained on feature points {self.info.points}, not {list(points)}: "
                             f"use the probe's own points (probe.info.points)")

    # ---- persistence ----------------------------------------------------------------------------
    def save(self, directory) -> Path:
        """probe.safetensors (weights + standardisation) and probe.json (what it was trained on,
        and the conformal calibration if any), both steer.io LYNX_PROBE files."""
        d = Path(directory)
        save_tensors(d / "probe.safetensors", LYNX_PROBE, self.state_dict(), identity=self.identity)
        meta = {"n_features": self.n_features, "hidden": [lin.out_features for lin in self.linears[:-1]],
                "info": asdict(self.info) if self.info else None,
                "calibration": self.calibration.to_json() if self.calibration else None}
        save_json(d / "probe.json", LYNX_PROBE, meta, identity=self.identity)
        return d

    @classmethod
    def load(cls, directory) -> LynxProbe:
        """Read a saved probe (its directory, or its probe.json)."""
        d = Path(directory)
        d = d.parent if d.suffix == ".json" else d
        meta_path, weights = d / "probe.json", d / "probe.safetensors"
        if not meta_path.exists() or not weights.exists():
            raise FileNotFoundError(f"{d} is not a saved probe (needs probe.json and probe.safetensors; "
                                    f"create one with `steer probe train`)")
        stored = load_json(meta_path, LYNX_PROBE)
        meta = stored.meta
        info = ProbeInfo(**meta["info"]) if meta.get("info") else None
        probe = cls(meta["n_features"], meta["hidden"], info)
        probe.load_state_dict(load_tensors(weights, LYNX_PROBE, untagged=1).tensors)  # version 1: untagged weights
        probe.identity = stored.identity
        if meta.get("calibration"):
            probe.calibration = ConformalCalibration.from_json(meta["calibration"])
        return probe.eval()

    @property
    def cue_set(self) -> CueSet | None:
        return CueSet.from_json(self.info.cues) if self.info and self.info.cues else None


def auc(p: torch.Tensor, y: torch.Tensor) -> float:
    """ROC AUC by the rank-sum formula (ties count one half); nan if one class is absent."""
    p, y = p.double().flatten(), y.flatten().bool()
    n1, n0 = int(y.sum()), int((~y).sum())
    if n1 == 0 or n0 == 0:
        return math.nan
    diff = p[y][:, None] - p[~y][None, :]
    return float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean())


def train_probe(features: torch.Tensor, labels: torch.Tensor, config: ProbeConfig | None = None,
                info: ProbeInfo | None = None, groups: torch.Tensor | None = None) -> LynxProbe:
    """Fit a LynxProbe. `groups` (e.g. trajectory ids) keeps all cue events of one trajectory on
    the same side of the validation split, so early stopping is not fooled by near-duplicates."""
    cfg = config or ProbeConfig()
    x, y = features.float(), labels.float().flatten()
    _check_training_data(x, y)
    gen = torch.Generator().manual_seed(cfg.seed)
    val_mask = _validation_split(torch.arange(x.shape[0]) if groups is None else groups, cfg, gen)
    xt, yt, xv, yv = x[~val_mask], y[~val_mask], x[val_mask], y[val_mask]

    torch.manual_seed(cfg.seed)
    probe = LynxProbe(x.shape[1], cfg.hidden, info)
    probe.mean.copy_(xt.mean(0))
    probe.std.copy_(xt.std(0, unbiased=False).clamp_min(1e-6))
    weights = _class_weights(yt, cfg.class_balanced)
    best, best_epoch = _fit(probe, xt, yt, xv, yv, weights, cfg, gen)
    if probe.info is not None:
        with torch.no_grad():
            probe.info.val_auc = auc(probe(xv), yv)
        probe.info.n_train, probe.info.n_val = int(len(yt)), int(len(yv))
        probe.info.best_epoch, probe.info.val_loss = best_epoch, best
    return probe


def _check_training_data(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.ndim != 2 or x.shape[0] != y.numel():
        raise ValueError(f"features must be [N, F] with one label each; got {tuple(x.shape)} and {y.numel()} labels")
    if x.shape[0] < 4:
        raise ValueError(f"need at least 4 labelled cue events to train a probe, got {x.shape[0]}")
    if not bool(((y == 0) | (y == 1)).all()):
        raise ValueError("labels must be 0 or 1")


def _validation_split(groups: torch.Tensor, cfg: ProbeConfig, gen: torch.Generator) -> torch.Tensor:
    """Bool[N]: the validation events, whole groups at a time (a random fifth if groups cannot split)."""
    n = groups.shape[0]
    uniq = torch.unique(groups)
    perm = uniq[torch.randperm(len(uniq), generator=gen)]
    n_val_groups = max(1, int(round(cfg.validation_fraction * len(uniq))))
    val_mask = torch.isin(groups, perm[:n_val_groups])
    if val_mask.all() or not val_mask.any():
        val_mask = torch.zeros(n, dtype=torch.bool)
        val_mask[torch.randperm(n, generator=gen)[: max(1, n // 5)]] = True
    return val_mask


def _class_weights(y: torch.Tensor, balanced: bool) -> tuple[float, float]:
    """(weight of label 1, weight of label 0): sklearn's "balanced" n / (2 n_c), or 1 each."""
    pos = float(y.sum())
    neg = float(len(y) - pos)
    if balanced and pos > 0 and neg > 0:
        return len(y) / (2 * pos), len(y) / (2 * neg)
    return 1.0, 1.0


def _weighted_loss(probe: LynxProbe, x: torch.Tensor, y: torch.Tensor, weights: tuple[float, float]) -> torch.Tensor:
    w = torch.where(y > 0.5, torch.tensor(weights[0]), torch.tensor(weights[1]))
    return nn.functional.binary_cross_entropy_with_logits(probe.logits(x), y, weight=w)


def _fit(probe: LynxProbe, xt: torch.Tensor, yt: torch.Tensor, xv: torch.Tensor, yv: torch.Tensor,
         weights: tuple[float, float], cfg: ProbeConfig, gen: torch.Generator) -> tuple[float, int]:
    """Adam with early stopping on the validation loss; leaves `probe` at its best epoch (eval mode)
    and returns (best validation loss, best epoch)."""
    opt = torch.optim.Adam(probe.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    best, best_state, best_epoch, bad = math.inf, None, 0, 0
    for epoch in range(cfg.max_epochs):
        probe.train()
        order = torch.randperm(len(yt), generator=gen)
        for i in range(0, len(yt), cfg.batch_size):
            idx = order[i: i + cfg.batch_size]
            opt.zero_grad()
            _weighted_loss(probe, xt[idx], yt[idx], weights).backward()
            opt.step()
        probe.eval()
        with torch.no_grad():
            vl = float(_weighted_loss(probe, xv, yv, weights))
        if vl < best - 1e-6:
            best, best_epoch, bad = vl, epoch, 0
            best_state = {k: v.clone() for k, v in probe.state_dict().items()}
        else:
            bad += 1
            if bad >= cfg.patience:
                break
    probe.load_state_dict(best_state)
    probe.eval()
    return best, best_epoch
