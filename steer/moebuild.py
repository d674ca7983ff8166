"""Build a Mixture-of-Experts from a dense Llama-style model, saved as a stock Qwen2-MoE checkpoint.

No trained MoE can be downloaded here, so we make one the way Qwen1.5-MoE was made from a dense
model ("upcycling" without retraining): every SwiGLU MLP's neurons are split into an always-on
shared expert (the neurons that carry most activation mass) plus E routed experts (balanced
co-activation clusters of the rest), and a router is fitted to predict which experts matter.
Qwen2-MoE is the target because its attention is Llama's (plus q/k/v biases, set to zero), it has a
native shared expert and `mlp_only_layers`, and stock transformers, TransformerLens, nnsight and
vLLM load it unchanged.

How the weights keep the dense function (so that k = E reproduces the dense logits):
- the shared expert is multiplied by sigmoid(shared_expert_gate(x)); its gate weights are zero, so
  the factor is exactly 0.5 and its down-projection is scaled by 2 (exact in floating point);
- routed outputs are sum_k w_k * expert_k(x) with w = softmax over all E logits (norm_topk_prob is
  False). The router logits are centred and scaled so that their spread over experts is at most
  `router_spread` on the calibration tokens: every w is then 1/E within a relative `router_spread`,
  and each expert's down-projection is scaled by E. Top-k only depends on the logits' order, which
  the scaling keeps. The price is a relative error of at most ~`router_spread` in each routed
  expert's contribution (zero if all experts tie), measured in tests as the k = E logit error.

Steps (functions named after them): `load_dense`, `calibration_texts`, `collect_mlp_inputs` (one
dense forward; each layer is built from its own MLP inputs as they pass), `neuron_mass` /
`select_shared`, `cluster_neurons`, `fit_router`, optional `refit_layer`, `assemble_qwen2_moe`,
optional `distill`, then `evaluate_moe` (held-out perplexity ratio, key-answer agreement on 20 chat
prompts, compute skipped).

The optional refit (config.refit) trades k = E exactness for quality at the build's top_k: with the
routing fixed, the MoE layer's output is linear in its down-projections, y = W z(x) with
z = [h_shared, E w_e h_e for the selected experts, 0 for the others], so W is re-fitted in closed form
(ridge towards the dense W) to the dense MLP's output on calibration tokens, layer by layer on the
inputs the MoE's earlier layers produce. What holds instead of k = E exactness: at top_k = E (and
refit_ridge = 0) the refit returns the dense down-projections; at the build's top_k each layer's
calibration reconstruction error is the least-squares minimum for its routing (reported per layer).
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import math
import os
import random
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from steer.checkpoints import fetch_packaged, load_gguf, packaged_models, resolve_name, sha256_file
from steer.progress import Progress, as_progress
from steer.prompts import book_passages

# Bump when the build algorithm changes, so cached builds of the same config are not reused.
BUILD_VERSION = 1

BUILD_FILE = "steer_moe_build.json"

# Simple factual / chat questions and the key answer a correct reply contains (any alternative).
PROMPTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("What is the capital of France?", ("Paris",)),
    ("What is 2 + 2?", ("4", "four")),
    ("What color is the sky on a clear day?", ("blue",)),
    ("What is the capital of Japan?", ("Tokyo",)),
    ("How many days are there in a week?", ("7", "seven")),
    ("What is the largest planet in our solar system?", ("Jupiter",)),
    ("Who wrote Romeo and Juliet?", ("Shakespeare",)),
    ("What is the chemical formula of water?", ("H2O", "H₂O")),
    ("What is the opposite of hot?", ("cold",)),
    ("How many legs does a spider have?", ("8", "eight")),
    ("What is the capital of Italy?", ("Rome",)),
    ("Which gas do plants absorb from the air for photosynthesis?", ("carbon dioxide", "CO2", "CO₂")),
    ("At what temperature in Celsius does water freeze?", ("0", "zero")),
    ("Which planet is known as the Red Planet?", ("Mars",)),
    ("Which animal says moo?", ("cow", "cows")),
    ("What is 10 times 10?", ("100", "one hundred")),
    ("What language is spoken in Spain?", ("Spanish",)),
    ("What is the capital of Germany?", ("Berlin",)),
    ("What do bees make?", ("honey",)),
    ("What color is grass?", ("green",)),
)

# User turns for chat-formatted calibration: a passage becomes the assistant's reply, so the router also
# sees the chat template's tokens (system prompt, role markers) that every chat prompt starts with.
CHAT_REQUESTS = (
    "Write a short passage from a novel.",
    "Continue the story, please.",
    "Tell me a scene from a book.",
    "Write a paragraph of literary prose.",
)

CalibFormat = Literal["prose", "chat", "mix"]
CALIB_FORMATS = ("prose", "chat", "mix")
Router = Literal["ridge", "ridge-log"]
Clustering = Literal["coactivation", "random"]
ROUTERS = ("ridge", "ridge-log")
CLUSTERINGS = ("coactivation", "random")
RefitInputs = Literal["moe", "dense"]
REFIT_INPUTS = ("moe", "dense")
# Refit fields left out of a config's key while refit is off, so builds without it keep their cache dirs.
_REFIT_FIELDS = ("refit", "refit_ridge", "refit_inputs")

# Each expert's stored width is rounded up to a multiple of this many neurons, the extra ones all zero
# (exact: silu(0) * 0 = 0 and a zero down column). transformers runs Qwen2-MoE experts through
# torch's grouped_mm, which on CPU needs every row stride to be a multiple of 16 bytes: an expert of 25
# fp32 neurons (100-byte rows) fails there with "strides should be multiple of 16 bytes". 8 covers
# fp32 and half precision.
EXPERT_ALIGN = 8


def expert_width(routed: int, num_experts: int) -> int:
    """The stored (padded) width of each routed expert for `routed` neurons split into num_experts."""
    return -(-(routed // num_experts) // EXPERT_ALIGN) * EXPERT_ALIGN


@dataclass(frozen=True)
class MoEBuildConfig:
    """The levers of the build; defaults are the shipped default build (see experiments/moe_build)."""

    num_experts: int = 16  # E routed experts per MoE layer
    top_k: int = 12  # experts used per token (config.num_experts_per_tok; changeable after the build)
    shared_neurons: int = 1024  # S neurons of each MLP in the always-on shared expert (0: none)
    router: Router = "ridge"  # ridge: MLP input -> expert output norm; ridge-log: -> log norm
    clustering: Clustering = "coactivation"  # how routed neurons are grouped into experts
    router_spread: float = 1e-3  # max logit spread over experts on calibration tokens (weights ~ 1/E)
    ridge: float = 1e-3  # ridge penalty, relative to the mean diagonal of X^T X
    dense_layers: tuple[int, ...] = ()  # layers kept as plain MLPs (Qwen2-MoE mlp_only_layers)
    calib_passages: int = 256  # book_cloze passages for calibration (disjoint from held-out)
    calib_format: CalibFormat = "prose"  # chat: passages as assistant replies; mix: every other one
    calib_tokens: int = 16384  # cap on calibration tokens (sequences of seq_len)
    heldout_passages: int = 128  # book_cloze passages for held-out perplexity
    heldout_tokens: int = 8192
    seq_len: int = 128
    kmeans_iters: int = 30
    distill_steps: int = 0  # KL distillation steps of norms + routers (0: none, keeps k=E exactness)
    distill_lr: float = 1e-4  # Adam step relative to each trained tensor's RMS (see `distill`)
    distill_batch: int = 8
    refit: bool = False  # re-fit each layer's down-projections by ridge least squares (see `refit_down`)
    refit_ridge: float = 1e-3  # its penalty towards the dense down-projection, relative to mean diag(Z^T Z)
    refit_inputs: RefitInputs = "moe"  # moe: layer l sees the inputs of the model whose layers < l are built
    seed: int = 0

    def validate(self, intermediate_size: int | None = None, num_layers: int | None = None) -> None:
        """Raise ValueError naming the bad option and how to fix it."""
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k must be in 1..num_experts ({self.num_experts}), got {self.top_k}")
        if self.shared_neurons < 0:
            raise ValueError(f"shared_neurons must be >= 0, got {self.shared_neurons}")
        if self.router not in ROUTERS:
            raise ValueError(f"router must be one of {', '.join(ROUTERS)}; got {self.router!r}")
        if self.clustering not in CLUSTERINGS:
            raise ValueError(f"clustering must be one of {', '.join(CLUSTERINGS)}; got {self.clustering!r}")
        if self.calib_format not in CALIB_FORMATS:
            raise ValueError(f"calib_format must be one of {', '.join(CALIB_FORMATS)}; got {self.calib_format!r}")
        if not 0 < self.router_spread <= 1:
            raise ValueError(f"router_spread must be in (0, 1], got {self.router_spread}")
        if self.ridge < 0:
            raise ValueError(f"ridge must be >= 0, got {self.ridge}")
        for name in ("calib_passages", "calib_tokens", "heldout_passages", "heldout_tokens", "seq_len",
                     "distill_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.distill_steps < 0:
            raise ValueError(f"distill_steps must be >= 0, got {self.distill_steps}")
        if not self.distill_lr > 0:
            raise ValueError(f"distill_lr must be > 0 (a step relative to each tensor's RMS), got {self.distill_lr}")
        if self.refit_ridge < 0:
            raise ValueError(f"refit_ridge must be >= 0, got {self.refit_ridge}")
        if self.refit_inputs not in REFIT_INPUTS:
            raise ValueError(f"refit_inputs must be one of {', '.join(REFIT_INPUTS)}; got {self.refit_inputs!r}")
        if not self.refit and (self.refit_ridge, self.refit_inputs) != (1e-3, "moe"):
            raise ValueError("refit_ridge and refit_inputs only apply to a refit build: set refit=True "
                             "(CLI: --refit) or leave them at their defaults")
        if intermediate_size is not None:
            routed = intermediate_size - self.shared_neurons
            if routed < self.num_experts:
                raise ValueError(
                    f"shared_neurons={self.shared_neurons} leaves {routed} of {intermediate_size} neurons for "
                    f"{self.num_experts} experts; lower shared_neurons or num_experts")
            if routed % self.num_experts:
                raise ValueError(
                    f"the {routed} routed neurons ({intermediate_size} - shared_neurons {self.shared_neurons}) "
                    f"do not split evenly into {self.num_experts} experts; pick shared_neurons so that "
                    f"{intermediate_size} - shared_neurons is a multiple of num_experts")
        if num_layers is not None:
            bad = [i for i in self.dense_layers if not 0 <= i < num_layers]
            if bad:
                raise ValueError(f"dense_layers {bad} out of range: the model has layers 0..{num_layers - 1}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["dense_layers"] = list(self.dense_layers)
        return d

    def key(self) -> str:
        """Short hash of everything that changes the weights (cache directory name)."""
        d = self.to_dict()
        if d["calib_format"] == "prose":  # builds made before this lever existed were prose: same key
            del d["calib_format"]
        if not d["refit"]:  # likewise for builds without a refit
            for name in _REFIT_FIELDS:
                del d[name]
        if d["distill_steps"]:  # distillation's step is relative to each tensor's scale since 2026-12-08
            d["distill_update"] = "relative"
        blob = json.dumps({"build_version": BUILD_VERSION, **d}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


@dataclass
class RefitResult:
    """One layer's re-fitted down-projections, in the dense model's scale (y = W z, see `refit_features`),
    and the relative reconstruction error ||y_dense - y_moe||^2 / ||y_dense||^2 of the MoE layer at the
    build's top_k on held-out calibration tokens, with the dense down-projection (before) and the refit
    (after)."""

    shared_down: torch.Tensor  # [D, S]
    expert_down: torch.Tensor  # [E, D, n]
    error_before: float
    error_after: float


@dataclass
class LayerBuild:
    """What the build decided for one MLP layer."""

    layer: int
    shared: torch.Tensor  # [S] neuron indices
    experts: torch.Tensor  # [E, n] neuron indices
    router: torch.Tensor  # [E, D] router weight (already scaled)
    shared_mass: float  # fraction of activation mass in the shared neurons
    router_recall: float  # fraction of the oracle's top-k that the router picks (held-out calib tokens)
    cluster_cohesion: float  # mean within-expert cosine of neuron activation patterns
    refit: RefitResult | None = None  # re-fitted down-projections (config.refit), else the dense ones


@dataclass
class MoEBuildReport:
    config: MoEBuildConfig
    out_dir: Path
    build_seconds: float
    layers: list[LayerBuild] = field(default_factory=list)
    evaluation: dict = field(default_factory=dict)
    safetensors_sha256: str = ""
    distill_losses: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        refits = [lb.refit for lb in self.layers if lb.refit is not None]
        refit = {}
        if refits:
            refit = {"refit_error_before": [round(r.error_before, 5) for r in refits],
                     "refit_error_after": [round(r.error_after, 5) for r in refits],
                     "mean_refit_error_before": round(sum(r.error_before for r in refits) / len(refits), 5),
                     "mean_refit_error_after": round(sum(r.error_after for r in refits) / len(refits), 5)}
        return {
            "build_version": BUILD_VERSION,
            "config": self.config.to_dict(),
            "config_key": self.config.key(),
            "build_seconds": round(self.build_seconds, 1),
            "safetensors_sha256": self.safetensors_sha256,
            "layers": [
                {"layer": lb.layer, "shared_mass": round(lb.shared_mass, 4),
                 "router_recall": round(lb.router_recall, 4), "cluster_cohesion": round(lb.cluster_cohesion, 4)}
                for lb in self.layers
            ],
            "mean_router_recall": round(sum(lb.router_recall for lb in self.layers) / max(1, len(self.layers)), 4),
            "mean_shared_mass": round(sum(lb.shared_mass for lb in self.layers) / max(1, len(self.layers)), 4),
            "distill_losses": [round(x, 5) for x in self.distill_losses],
            **refit,
            "evaluation": self.evaluation,
        }

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame(self.to_dict()["layers"])


# ----------------------------------------------------------------------------------------------
# Step 1: the dense model and the text


def load_dense(dense="smollm2", tokenizer=None):
    """(model, tokenizer) in fp32 eval mode from a packaged dense model's name ("smollm2",
    "qwen2.5-coder"), a checkpoint dir, a .gguf file or a model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

    if isinstance(dense, PreTrainedModel):
        return dense.eval(), tokenizer
    if isinstance(dense, str) and not Path(dense).exists():
        dense = _packaged_path(dense)
    path = Path(dense)
    if path.suffix == ".gguf":
        if not path.exists():
            raise FileNotFoundError(f"no GGUF file at {path}")
        model, tok = load_gguf(path, dtype=torch.float32, attn_implementation=None, progress=False)
        return model, tokenizer or tok
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"{path} is not a checkpoint directory (no config.json); pass a packaged dense model's name "
            f"(smollm2, qwen2.5-coder), a checkpoint directory or a .gguf file")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tok = tokenizer or AutoTokenizer.from_pretrained(path)
    return model.eval(), tok


def _packaged_path(name: str, progress: bool = False) -> Path:
    """A packaged dense model (e.g. SmolLM2-135M-Instruct) as an fp32 checkpoint dir in steer's cache."""
    entry = resolve_name(name)
    if entry is None or entry.built_by:
        dense = sorted(n for n, e in packaged_models().items() if not e.built_by)
        raise ValueError(f"{name!r} is neither a path nor a packaged dense model; pass one of {', '.join(dense)}, "
                         "a checkpoint directory or a .gguf file")
    return Path(fetch_packaged(entry.name, progress=progress))


def calibration_texts(config: MoEBuildConfig) -> tuple[list[str], list[str]]:
    """Disjoint (calibration, held-out) passages of book_cloze prose, fixed by the seed."""
    passages = book_passages()
    order = list(range(len(passages)))
    random.Random(config.seed).shuffle(order)
    n_cal, n_held = config.calib_passages, config.heldout_passages
    if n_cal + n_held > len(passages):
        raise ValueError(f"calib_passages + heldout_passages = {n_cal + n_held} exceeds the "
                         f"{len(passages)} book_cloze passages")
    return [passages[i] for i in order[:n_cal]], [passages[i] for i in order[n_cal:n_cal + n_held]]


def chat_format(tokenizer, texts: list[str], fmt: CalibFormat) -> list[str]:
    """Calibration passages as chat turns (all, every other one for "mix", none for "prose")."""
    if fmt == "prose" or not getattr(tokenizer, "chat_template", None):
        return list(texts)
    out = []
    for i, text in enumerate(texts):
        if fmt == "chat" or i % 2 == 1:
            messages = [{"role": "user", "content": CHAT_REQUESTS[i % len(CHAT_REQUESTS)]},
                        {"role": "assistant", "content": text}]
            text = tokenizer.apply_chat_template(messages, tokenize=False)
        out.append(text)
    return out


def token_chunks(tokenizer, texts: list[str], seq_len: int, max_tokens: int) -> torch.Tensor:
    """Texts joined by blank lines, tokenised as one stream, cut into [N, seq_len] (no padding)."""
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text + "\n\n", add_special_tokens=False)["input_ids"])
        if len(ids) >= max_tokens:
            break
    n = min(len(ids), max_tokens) // seq_len
    if n == 0:
        raise ValueError(f"only {len(ids)} tokens of text: need at least seq_len={seq_len}")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


# ----------------------------------------------------------------------------------------------
# Steps 2-4: per layer, from the dense MLP's inputs


def _mlp_weights(mlp) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach(), mlp.down_proj.weight.detach()


def neuron_acts(x: torch.Tensor, wg: torch.Tensor, wu: torch.Tensor) -> torch.Tensor:
    """SwiGLU neuron activations [T, I] for MLP inputs x [T, D]."""
    return F.silu(x @ wg.T) * (x @ wu.T)


def neuron_mass(acts: torch.Tensor, wd: torch.Tensor) -> torch.Tensor:
    """Mean |activation| times the norm of the neuron's down-projection column: its share of output."""
    return acts.abs().mean(0) * wd.norm(dim=0)


def select_shared(mass: torch.Tensor, n_shared: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(shared, routed) neuron indices, each sorted: the top-`n_shared` by mass are shared."""
    order = torch.argsort(mass, descending=True, stable=True)
    return order[:n_shared].sort().values, order[n_shared:].sort().values


def _balanced_assign(dist: torch.Tensor, capacity: int) -> torch.Tensor:
    """Greedy balanced assignment: cheapest (neuron, cluster) pairs first, each cluster takes `capacity`."""
    n, k = dist.shape
    order = torch.argsort(dist.flatten(), stable=True).tolist()
    assign = [-1] * n
    room = [capacity] * k
    left = n
    for flat in order:
        i, c = divmod(flat, k)
        if assign[i] < 0 and room[c] > 0:
            assign[i] = c
            room[c] -= 1
            left -= 1
            if left == 0:
                break
    return torch.tensor(assign)


def cluster_neurons(acts: torch.Tensor, routed: torch.Tensor, num_experts: int, method: Clustering,
                    seed: int, iters: int = 30) -> tuple[torch.Tensor, float]:
    """Split `routed` neurons into equal experts [E, n]; also the mean within-expert cosine.

    coactivation: balanced kernel k-means on the cosine similarity of neurons' |activation| over
    calibration tokens (neurons that fire together share an expert, so a selected expert carries
    its mass); random: a seeded random split (the baseline).
    """
    r = routed.numel()
    n = r // num_experts
    gen = torch.Generator().manual_seed(seed)
    a = acts[:, routed].abs()
    a = a / a.norm(dim=0).clamp_min(1e-12)
    sim = a.T @ a  # [R, R] cosine of activation patterns
    others = sim - torch.diag(sim.diagonal())  # a neuron's own pattern must not pull it to its cluster
    assign = torch.randperm(r, generator=gen) % num_experts
    if method == "coactivation":
        best, best_obj = assign, -math.inf
        for _ in range(iters):
            onehot = F.one_hot(assign, num_experts).float()  # [R, E]
            member = onehot / n
            to_cluster = (others @ onehot) / (n - onehot).clamp_min(1)  # mean similarity to the other members
            centroid_sq = (member * (sim @ member)).sum(0)  # |centroid|^2 per cluster
            dist = centroid_sq[None, :] - 2 * to_cluster  # + 1 (|a_i|^2), a constant
            new = _balanced_assign(dist, n)
            new_member = F.one_hot(new, num_experts).float() / n
            obj = float((new_member * (sim @ new_member)).sum())  # sum of |centroid|^2: higher is tighter
            if obj > best_obj:
                best, best_obj = new, obj
            if torch.equal(new, assign):
                break
            assign = new
        assign = best
    experts = torch.stack([routed[assign == e] for e in range(num_experts)])  # each sorted by index
    member = F.one_hot(assign, num_experts).float()
    within = (member * (sim @ member)).sum(0) - n  # exclude self-similarity
    cohesion = float(within.sum() / (num_experts * n * max(n - 1, 1)))
    return experts, cohesion


def expert_output_norms(acts: torch.Tensor, wd: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """||expert_e(x)|| for every token and expert: [T, E]. The oracle routes by these."""
    return torch.stack([(acts[:, idx] @ wd[:, idx].T).norm(dim=-1) for idx in experts], dim=-1)


def fit_router(x: torch.Tensor, target: torch.Tensor, ridge: float) -> torch.Tensor:
    """Ridge regression without intercept (Qwen2-MoE routers have no bias): W [E, D], logits = x W^T.

    Rows are centred over experts afterwards: softmax ignores a shared offset, and small logits keep
    their order better in low precision.
    """
    xd = x.double()
    gram = xd.T @ xd
    lam = ridge * gram.diagonal().mean()
    w = torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype), xd.T @ target.double())
    w = w.T  # [E, D]
    return (w - w.mean(0, keepdim=True)).float()


def topk_recall(scores: torch.Tensor, oracle: torch.Tensor, k: int) -> float:
    """Fraction of the oracle's top-k experts that top-k of `scores` also picks."""
    if k >= scores.shape[-1]:
        return 1.0
    pick = F.one_hot(scores.topk(k, dim=-1).indices, scores.shape[-1]).sum(1)
    want = F.one_hot(oracle.topk(k, dim=-1).indices, scores.shape[-1]).sum(1)
    return float((pick * want).sum() / want.sum())


def scale_router(w: torch.Tensor, x: torch.Tensor, spread: float) -> torch.Tensor:
    """Scale router rows so the logit spread (max - min over experts) is <= `spread` on x."""
    logits = x @ w.T
    widest = float((logits.max(-1).values - logits.min(-1).values).max())
    return w * (spread / widest) if widest > 0 else w


def routing_gates(x: torch.Tensor, router: torch.Tensor, top_k: int) -> torch.Tensor:
    """E * routing weight of each selected expert, 0 for the others: [T, E].

    As Qwen2-MoE routes with norm_topk_prob = False: softmax over all E logits, top-k of those
    probabilities (the same ops, so the same choices and ties). E * weight is ~1 at the build's
    router_spread, the scale at which the dense down-projection is the unrefitted fit.
    """
    probs = F.softmax(F.linear(x, router), dtype=torch.float, dim=-1)
    top = probs.topk(top_k, dim=-1)
    return torch.zeros_like(probs).scatter(1, top.indices, top.values) * probs.shape[-1]


def refit_features(acts: torch.Tensor, shared: torch.Tensor, experts: torch.Tensor,
                   gates: torch.Tensor) -> torch.Tensor:
    """`z(x) = [h_shared(x), gate_e(x) * h_e(x) for each routed e]`, shape `(T, S + E*n)`, zero for
    unselected experts, so that the MoE layer's output is exactly y = W z for the stacked
    down-projections W."""
    routed = acts[:, experts.flatten()].view(acts.shape[0], *experts.shape) * gates[:, :, None]
    return torch.cat([acts[:, shared], routed.flatten(1)], dim=1)


def sparse_normal_equations(z: torch.Tensor, y: torch.Tensor, gates: torch.Tensor, n_shared: int,
                            chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """(Z^T Z, Z^T Y) in float64, skipping the zeros of unselected experts.

    A routed expert's rows of both products only get contributions from the tokens that select it,
    so the cost is about (S + k n) / (S + E n) of the dense products; tokens go in chunks.
    """
    N, n = z.shape[1], (z.shape[1] - n_shared) // max(1, gates.shape[1])
    gram = torch.zeros(N, N, dtype=torch.float64)
    zty = torch.zeros(N, y.shape[1], dtype=torch.float64)
    for i in range(0, z.shape[0], chunk):
        zc, yc, sel = z[i:i + chunk].double(), y[i:i + chunk].double(), gates[i:i + chunk] != 0
        gram[:n_shared] += zc[:, :n_shared].T @ zc
        zty[:n_shared] += zc[:, :n_shared].T @ yc
        for e in range(gates.shape[1]):
            cols, rows = slice(n_shared + e * n, n_shared + (e + 1) * n), sel[:, e]
            if rows.any():
                ze = zc[rows]
                gram[cols] += ze[:, cols].T @ ze
                zty[cols] += ze[:, cols].T @ yc[rows]
    return (gram + gram.T) / 2, zty


def refit_down(z: torch.Tensor, y: torch.Tensor, gates: torch.Tensor, w0: torch.Tensor, n_shared: int,
               ridge: float) -> torch.Tensor:
    """argmin_W ||Y - Z W^T||^2 + lam ||W - W0||^2 with lam = ridge * mean diag(Z^T Z): W [D, N].

    The penalty pulls towards the dense down-projection W0 (not towards 0): an expert that the
    calibration tokens rarely select keeps its dense weights, and ridge -> inf is no refit.
    """
    gram, zty = sparse_normal_equations(z, y, gates, n_shared)
    lam = ridge * float(gram.diagonal().mean())
    rhs = zty + lam * w0.double().T
    w = torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype), rhs)
    return w.T.float()


def relative_error(y: torch.Tensor, pred: torch.Tensor) -> float:
    return float((y - pred).double().pow(2).sum() / y.double().pow(2).sum().clamp_min(1e-30))


def refit_layer(x: torch.Tensor, acts: torch.Tensor, wd: torch.Tensor, shared: torch.Tensor,
                experts: torch.Tensor, router: torch.Tensor, config: MoEBuildConfig) -> RefitResult:
    """Re-fit one layer's down-projections so that the MoE output, with the routing it will use at
    top_k, matches the dense MLP output on the first 90% of the calibration tokens (OBC/SparseGPT-style
    local reconstruction); the error is measured on the other 10% (all tokens if there are too few)."""
    gates = routing_gates(x, router, config.top_k)
    z = refit_features(acts, shared, experts, gates)
    y = acts @ wd.T
    w0 = torch.cat([wd[:, shared], wd[:, experts.flatten()]], dim=1)
    n_fit = max(1, int(0.9 * x.shape[0]))
    held = slice(n_fit, None) if n_fit < x.shape[0] else slice(None)
    w = refit_down(z[:n_fit], y[:n_fit], gates[:n_fit], w0, shared.numel(), config.refit_ridge)
    E, n = experts.shape
    S = shared.numel()
    return RefitResult(w[:, :S].contiguous(), w[:, S:].reshape(-1, E, n).permute(1, 0, 2).contiguous(),
                       relative_error(y[held], z[held] @ w0.T), relative_error(y[held], z[held] @ w.T))


def moe_mlp_output(x: torch.Tensor, mlp, build: LayerBuild, top_k: int) -> torch.Tensor:
    """The built MoE layer's output [T, D] on MLP inputs x [T, D] (what the checkpoint computes, fp32)."""
    wg, wu, wd = _mlp_weights(mlp)
    acts = neuron_acts(x, wg, wu)
    z = refit_features(acts, build.shared, build.experts, routing_gates(x, build.router, top_k))
    if build.refit is None:
        w = torch.cat([wd[:, build.shared], wd[:, build.experts.flatten()]], dim=1)
    else:
        w = torch.cat([build.refit.shared_down, build.refit.expert_down.permute(1, 0, 2).flatten(1)], dim=1)
    return z @ w.T


def build_layer(layer: int, x: torch.Tensor, mlp, config: MoEBuildConfig) -> LayerBuild:
    """Shared neurons, experts and router of one layer from its dense MLP inputs x [T, D]."""
    wg, wu, wd = _mlp_weights(mlp)
    x = x.reshape(-1, x.shape[-1]).float()
    acts = neuron_acts(x, wg, wu)
    mass = neuron_mass(acts, wd)
    shared, routed = select_shared(mass, config.shared_neurons)
    shared_mass = float(mass[shared].sum() / mass.sum()) if shared.numel() else 0.0
    experts, cohesion = cluster_neurons(acts, routed, config.num_experts, config.clustering,
                                        seed=config.seed * 1000 + layer, iters=config.kmeans_iters)
    norms = expert_output_norms(acts, wd, experts)
    target = norms.clamp_min(1e-6).log() if config.router == "ridge-log" else norms
    n_fit = max(1, int(0.9 * x.shape[0]))
    w = fit_router(x[:n_fit], target[:n_fit], config.ridge)
    held = slice(n_fit, None) if n_fit < x.shape[0] else slice(None)
    recall = topk_recall(x[held] @ w.T, norms[held], config.top_k)
    w = scale_router(w, x, config.router_spread)
    refit = refit_layer(x, acts, wd, shared, experts, w, config) if config.refit else None
    return LayerBuild(layer, shared, experts, w, shared_mass, recall, cohesion, refit)


def collect_mlp_inputs(model, chunks: torch.Tensor, layers: list[int]) -> dict[int, torch.Tensor]:
    """The dense MLP inputs [T, D] of `layers` on `chunks` (for building several configs from one pass)."""
    xs: dict[int, torch.Tensor] = {}
    _dense_pass(model, chunks, {
        f"blocks.{i}.mlp.in": lambda x, _ctx, i=i: xs.__setitem__(i, x.detach().reshape(-1, x.shape[-1]).clone())
        for i in layers})
    return xs


def _dense_pass(model, chunks: torch.Tensor, hooks: dict) -> None:
    """One forward of the decoder stack over the calibration chunks with steer hooks attached."""
    from steer.hooks import attach

    with attach(model, hooks), torch.no_grad():
        model.model(input_ids=chunks, use_cache=False)


def collect_layer_builds(model, chunks: torch.Tensor, config: MoEBuildConfig, layers: list[int],
                         progress: Progress | None = None) -> dict[int, LayerBuild]:
    """One forward over the calibration chunks; each MoE layer is built from its MLP input.

    The forward is the dense model's, except with a refit on the inputs of the MoE itself
    (refit_inputs="moe"): then each built layer's output replaces the dense MLP's as it passes, so
    layer l is built (and re-fitted) on what the MoE's layers < l hand it, SparseGPT/OBC-style.
    """
    report = as_progress(progress)
    builds: dict[int, LayerBuild] = {}
    inputs: dict[int, torch.Tensor] = {}  # layer -> MLP input, until the replacing hook takes it
    sequential = config.refit and config.refit_inputs == "moe"
    t0 = time.time()

    def make_hook(i: int, mlp):
        def hook(x, _ctx):
            x = x.detach().reshape(-1, x.shape[-1]).float()
            builds[i] = build_layer(i, x, mlp, config)
            if sequential:
                inputs[i] = x
            refit = builds[i].refit
            report(len(builds), len(layers), f"layer {i + 1}/{len(model.model.layers)}: shared mass "
                   f"{builds[i].shared_mass:.2f}, router recall@{config.top_k} {builds[i].router_recall:.2f}"
                   + (f", refit error {refit.error_before:.3f} -> {refit.error_after:.3f}" if refit else "")
                   + f" ({time.time() - t0:.0f}s)")
        return hook

    def make_replace(i: int, mlp):
        def hook(out, _ctx):
            y = moe_mlp_output(inputs.pop(i), mlp, builds[i], config.top_k)
            return y.to(out.dtype).view_as(out)
        return hook

    hooks: dict = {}
    for i in layers:
        mlp = model.model.layers[i].mlp
        hooks[f"blocks.{i}.mlp.in"] = make_hook(i, mlp)
        if sequential:
            hooks[f"blocks.{i}.mlp.out"] = make_replace(i, mlp)
    _dense_pass(model, chunks, hooks)
    return builds


# ----------------------------------------------------------------------------------------------
# Step 5: the Qwen2-MoE checkpoint


def _check_dense(model) -> None:
    cfg = model.config
    if cfg.model_type not in ("llama", "qwen2"):
        raise ValueError(f"build-moe needs a Llama or Qwen2 dense model, got model_type={cfg.model_type!r}")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise ValueError(f"build-moe needs SwiGLU MLPs (hidden_act='silu'), got {cfg.hidden_act!r}")
    if getattr(cfg, "mlp_bias", False) or getattr(cfg, "attention_bias", False) and cfg.model_type == "llama":
        raise ValueError("build-moe needs a model without MLP/attention biases (Qwen2-MoE has none there)")
    if getattr(cfg, "use_sliding_window", False):
        raise ValueError("build-moe does not convert sliding-window attention")


def qwen2_moe_config(dense_cfg, config: MoEBuildConfig):
    from transformers import Qwen2MoeConfig

    routed = dense_cfg.intermediate_size - config.shared_neurons
    head_dim = getattr(dense_cfg, "head_dim", None) or dense_cfg.hidden_size // dense_cfg.num_attention_heads
    cfg = Qwen2MoeConfig(
        vocab_size=dense_cfg.vocab_size,
        hidden_size=dense_cfg.hidden_size,
        intermediate_size=dense_cfg.intermediate_size,
        num_hidden_layers=dense_cfg.num_hidden_layers,
        num_attention_heads=dense_cfg.num_attention_heads,
        num_key_value_heads=dense_cfg.num_key_value_heads,
        hidden_act="silu",
        max_position_embeddings=dense_cfg.max_position_embeddings,
        rms_norm_eps=dense_cfg.rms_norm_eps,
        tie_word_embeddings=dense_cfg.tie_word_embeddings,
        rope_parameters=dict(dense_cfg.rope_parameters),
        use_sliding_window=False,
        decoder_sparse_step=1,
        moe_intermediate_size=expert_width(routed, config.num_experts),  # zero-padded: see EXPERT_ALIGN
        shared_expert_intermediate_size=config.shared_neurons,
        num_experts=config.num_experts,
        num_experts_per_tok=config.top_k,
        norm_topk_prob=False,
        mlp_only_layers=sorted(config.dense_layers),
        qkv_bias=True,  # zero for Llama: older transformers and vLLM always build q/k/v biases
        bos_token_id=dense_cfg.bos_token_id,
        eos_token_id=dense_cfg.eos_token_id,
        pad_token_id=dense_cfg.pad_token_id,
    )
    cfg.head_dim = head_dim
    cfg.architectures = ["Qwen2MoeForCausalLM"]
    return cfg


def assemble_qwen2_moe(dense, builds: dict[int, LayerBuild], config: MoEBuildConfig):
    """A Qwen2MoeForCausalLM whose weights are the dense model's, split as `builds` says."""
    from transformers import Qwen2MoeForCausalLM

    cfg = qwen2_moe_config(dense.config, config)
    moe = Qwen2MoeForCausalLM(cfg)  # on CPU (not meta): non-persistent buffers such as RoPE's stay valid
    src = dense.state_dict()
    out: dict[str, torch.Tensor] = {}
    E = config.num_experts
    for name, tensor in src.items():
        if ".mlp." in name and name.startswith("model.layers."):
            continue
        out[name] = tensor.detach().clone().float()
    for i, layer in enumerate(moe.model.layers):
        attn = layer.self_attn
        for proj in ("q_proj", "k_proj", "v_proj"):
            key = f"model.layers.{i}.self_attn.{proj}.bias"
            if key not in out:
                out[key] = torch.zeros(getattr(attn, proj).out_features)
        p = f"model.layers.{i}.mlp."
        wg, wu, wd = (src[p + n + ".weight"].float() for n in ("gate_proj", "up_proj", "down_proj"))
        if i not in builds:  # dense layer
            out[p + "gate_proj.weight"], out[p + "up_proj.weight"], out[p + "down_proj.weight"] = (
                wg.clone(), wu.clone(), wd.clone())
            continue
        b = builds[i]
        s = b.shared
        out[p + "shared_expert.gate_proj.weight"] = wg[s].clone()
        out[p + "shared_expert.up_proj.weight"] = wu[s].clone()
        shared_down, expert_down = ((wd[:, s], [wd[:, idx] for idx in b.experts]) if b.refit is None
                                    else (b.refit.shared_down, list(b.refit.expert_down)))
        out[p + "shared_expert.down_proj.weight"] = (shared_down * 2.0).contiguous()  # sigmoid(0) = 0.5
        out[p + "shared_expert_gate.weight"] = torch.zeros(1, wg.shape[1])
        out[p + "gate.weight"] = b.router.clone()
        pad = cfg.moe_intermediate_size - len(b.experts[0])  # zero neurons up to the stored width
        rows, cols = wg.new_zeros(pad, wg.shape[1]), wd.new_zeros(wd.shape[0], pad)
        out[p + "experts.gate_up_proj"] = torch.stack([torch.cat([wg[idx], rows, wu[idx], rows])
                                                       for idx in b.experts])
        out[p + "experts.down_proj"] = torch.stack([torch.cat([d * float(E), cols], 1)
                                                    for d in expert_down])  # w ~ 1/E
    with torch.no_grad():
        moe.load_state_dict(out, strict=True)
    moe.generation_config.bos_token_id = cfg.bos_token_id
    moe.generation_config.eos_token_id = cfg.eos_token_id
    moe.generation_config.pad_token_id = cfg.pad_token_id
    return moe.eval()


def set_top_k(model, k: int) -> None:
    """Change the number of routed experts per token of a built (Qwen2-MoE) model in place."""
    cfg = model.config
    if not 1 <= k <= cfg.num_experts:
        raise ValueError(f"top_k must be in 1..{cfg.num_experts}, got {k}")
    cfg.num_experts_per_tok = k
    for layer in model.model.layers:
        gate = getattr(layer.mlp, "gate", None)
        if gate is not None and hasattr(gate, "top_k"):
            gate.top_k = k


def set_router_spread(model, spread: float, current: float) -> None:
    """Rescale every router of a built MoE from logit spread `current` to `spread`, in place.

    `scale_router` is linear in the spread, so this gives the weights a build with
    `router_spread=spread` would have (up to fp32 rounding) without rebuilding.
    """
    if not (0 < spread <= 1 and 0 < current <= 1):
        raise ValueError(f"router spreads must be in (0, 1], got spread={spread}, current={current}")
    with torch.no_grad():
        for layer in model.model.layers:
            gate = getattr(layer.mlp, "gate", None)
            if gate is not None and hasattr(layer.mlp, "experts"):
                gate.weight.mul_(spread / current)


# ----------------------------------------------------------------------------------------------
# Optional step 6: distillation


def distill(moe, dense, chunks: torch.Tensor, config: MoEBuildConfig,
            progress: Progress | None = None, on_step=None) -> list[float]:
    """KL(dense || MoE) on next-token distributions, training RMSNorm weights and routers.

    Each tensor's Adam learning rate is `config.distill_lr` times that tensor's own RMS, so every
    step moves a parameter by about distill_lr of its scale. An absolute rate cannot serve both: the
    norms are O(1) while the routers sit at `router_spread`'s scale (mean |w| 2e-7 to 1.4e-6 per layer
    in a Qwen2.5-Coder build), and Adam moves every element by about the learning rate, so the old
    absolute 1e-4 moved the ridge routers by ~100x their size in the first step (the behaviour before
    2026-12-08; distilled builds are keyed apart).
    Routers move only through the near-uniform gate weights and top-k choices are not
    differentiable, so most of the gain comes from the norms; this breaks exact k = E reproduction.
    on_step(step, loss), if given, is called after each step (step counts from 1): to save
    checkpoints of a long run.
    """
    report = as_progress(progress)
    params = [p for n, p in moe.named_parameters() if n.endswith("norm.weight") or n.endswith("mlp.gate.weight")]
    for p in moe.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    groups = [{"params": [p], "lr": config.distill_lr * max(float(p.detach().float().pow(2).mean().sqrt()), 1e-12)}
              for p in params]
    opt = torch.optim.Adam(groups)
    gen = torch.Generator().manual_seed(config.seed)
    losses = []
    moe.train()
    t0 = time.time()
    for step in range(config.distill_steps):
        idx = torch.randint(0, chunks.shape[0], (min(config.distill_batch, chunks.shape[0]),), generator=gen)
        batch = chunks[idx]
        with torch.no_grad():
            target = F.log_softmax(dense(input_ids=batch).logits.float(), -1)
        logp = F.log_softmax(moe(input_ids=batch).logits.float(), -1)
        loss = F.kl_div(logp, target, log_target=True, reduction="batchmean") / batch.shape[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if step % 10 == 0 or step == config.distill_steps - 1:
            report(step + 1, config.distill_steps, f"distill KL {losses[-1]:.4f} ({time.time() - t0:.0f}s)")
        if on_step is not None:
            on_step(step + 1, losses[-1])
    for p in moe.parameters():
        p.requires_grad_(False)
    moe.eval()
    return losses


# ----------------------------------------------------------------------------------------------
# Evaluation


def _nll(model, chunks: torch.Tensor, batch: int = 16) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, chunks.shape[0], batch):
            ids = chunks[i:i + batch]
            logits = model(input_ids=ids, use_cache=False).logits.float()
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                   reduction="sum")
            total += float(loss)
            count += ids[:, 1:].numel()
    return total / count


def contains_key(answer: str, keys: tuple[str, ...]) -> bool:
    """Whether `answer` contains any key as a whole word (case-insensitive): '4' is not in '14'."""
    return any(re.search(rf"(?<![\w]){re.escape(k)}(?![\w])", answer, flags=re.IGNORECASE) for k in keys)


def greedy_answers(model, tokenizer, prompts=PROMPTS, max_new_tokens: int = 32) -> list[str]:
    """Greedy replies to each prompt, formatted with the tokenizer's chat template."""
    answers = []
    with torch.no_grad():
        for question, _ in prompts:
            text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                                 add_generation_prompt=True)
            ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id or 0)
            answers.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return answers


def prompt_agreement(dense_answers: list[str], moe_answers: list[str], prompts=PROMPTS) -> dict:
    """Agreement = of the prompts whose dense answer contains the key, the share whose MoE answer does."""
    dense_ok = [contains_key(a, keys) for a, (_, keys) in zip(dense_answers, prompts)]
    moe_ok = [contains_key(a, keys) for a, (_, keys) in zip(moe_answers, prompts)]
    kept = sum(d and m for d, m in zip(dense_ok, moe_ok))
    return {
        "dense_correct": sum(dense_ok),
        "moe_correct": sum(moe_ok),
        "kept": kept,
        "agreement": kept / sum(dense_ok) if any(dense_ok) else float("nan"),
        "identical": sum(a == b for a, b in zip(dense_answers, moe_answers)),
        "n_prompts": len(prompts),
    }


def evaluate_moe(moe, dense, tokenizer=None, *, heldout: torch.Tensor | None = None,
                 config: MoEBuildConfig | None = None, top_ks: list[int] | None = None,
                 prompts: bool = True, dense_cache: dict | None = None,
                 progress: Progress | None = None) -> dict:
    """Held-out perplexity ratio, prompt agreement and routed compute skipped, per top-k.

    `moe`/`dense` are models or checkpoint directories. `dense_cache` (a dict) keeps the dense
    model's NLL and answers between calls.
    """
    from transformers import AutoModelForCausalLM

    if not isinstance(moe, torch.nn.Module):
        moe = AutoModelForCausalLM.from_pretrained(moe, dtype=torch.float32).eval()
    if not isinstance(dense, torch.nn.Module):
        dense, tok = load_dense(dense, tokenizer)
        tokenizer = tokenizer or tok
    if tokenizer is None:
        raise ValueError("evaluate_moe needs a tokenizer when given model objects")
    config = config or MoEBuildConfig()
    if heldout is None:
        heldout = token_chunks(tokenizer, calibration_texts(config)[1], config.seq_len, config.heldout_tokens)
    cache = dense_cache if dense_cache is not None else {}
    if "nll" not in cache:
        cache["nll"] = _nll(dense, heldout)
    use_prompts = prompts and getattr(tokenizer, "chat_template", None)
    if use_prompts and "answers" not in cache:
        cache["answers"] = greedy_answers(dense, tokenizer)
    cfg = moe.config
    E, k0 = cfg.num_experts, cfg.num_experts_per_tok
    n_moe = sum(1 for layer in moe.model.layers if hasattr(layer.mlp, "experts"))
    width = (cfg.intermediate_size - cfg.shared_expert_intermediate_size) // E  # real neurons (stored: padded)
    routed_neurons = E * width
    results = {"dense_ppl": math.exp(cache["nll"]), "heldout_tokens": int(heldout[:, 1:].numel()), "by_k": {}}
    if use_prompts:
        results["dense_answers"] = cache["answers"]
    report, ks = as_progress(progress), top_ks or [k0]
    try:
        for n, k in enumerate(ks):
            set_top_k(moe, k)
            t0 = time.time()
            nll = _nll(moe, heldout)
            row = {
                "ppl": math.exp(nll),
                "ppl_ratio": math.exp(nll - cache["nll"]),
                "routed_skipped": 1 - k / E,
                "mlp_neurons_skipped": (E - k) * width * n_moe
                / (cfg.intermediate_size * cfg.num_hidden_layers),
                "routed_neurons_per_layer": routed_neurons,
            }
            if use_prompts:
                answers = greedy_answers(moe, tokenizer)
                row.update(prompt_agreement(cache["answers"], answers))
                row["answers"] = answers
            row["eval_seconds"] = round(time.time() - t0, 1)
            results["by_k"][k] = row
            report(n + 1, len(ks), f"k={k}: ppl ratio {row['ppl_ratio']:.3f}"
                   + (f", prompt agreement {row['agreement']:.2f}" if use_prompts else ""))
    finally:
        set_top_k(moe, k0)
    return results


# ----------------------------------------------------------------------------------------------
# The build


def build_moe(dense="smollm2", config: MoEBuildConfig | None = None, out_dir: Path | str | None = None, *,
              tokenizer=None, texts: tuple[list[str], list[str]] | None = None, evaluate: bool = True,
              eval_top_ks: list[int] | None = None, progress: Progress | None = None,
              num_threads: int = 2):
    """Build, evaluate and save the MoE; returns (report, moe model).

    `dense`: "smollm2", a checkpoint dir, a .gguf path or a model (then pass `tokenizer`).
    `texts`: (calibration, held-out) passages; default book_cloze split by `config.seed`.
    The result is deterministic for a fixed config, machine and `num_threads`.
    progress (steer.progress): status notes, then each phase's count (layers, distill steps, top-ks).
    """
    progress = as_progress(progress)
    config = config or MoEBuildConfig()
    config.validate()
    t_start = time.time()
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, min(num_threads, threads)))
    try:
        progress(0, 0, "loading the dense model")
        model, tok = load_dense(dense, tokenizer)
        if tok is None:
            raise ValueError("pass tokenizer= together with a model object")
        _check_dense(model)
        cfg = model.config
        config.validate(cfg.intermediate_size, cfg.num_hidden_layers)
        calib_texts, held_texts = texts if texts is not None else calibration_texts(config)
        calib = token_chunks(tok, chat_format(tok, calib_texts, config.calib_format), config.seq_len,
                             config.calib_tokens)
        heldout = token_chunks(tok, held_texts, config.seq_len, config.heldout_tokens)
        moe_layers = [i for i in range(cfg.num_hidden_layers) if i not in set(config.dense_layers)]
        progress(0, 0, f"calibrating on {calib.numel()} tokens; {len(moe_layers)} MoE layers, "
                 f"{config.num_experts} experts x {(cfg.intermediate_size - config.shared_neurons) // config.num_experts}"
                 f" neurons + {config.shared_neurons} shared")
        builds = collect_layer_builds(model, calib, config, moe_layers, progress)
        moe = assemble_qwen2_moe(model, builds, config)
        losses: list[float] = []
        if config.distill_steps:
            losses = distill(moe, model, calib, config, progress)
        evaluation = {}
        if evaluate:
            progress(0, 0, "evaluating: held-out perplexity and prompt agreement")
            evaluation = evaluate_moe(moe, model, tok, heldout=heldout, config=config,
                                      top_ks=eval_top_ks or [config.top_k], progress=progress)
        report = MoEBuildReport(config, Path(out_dir) if out_dir else Path(), time.time() - t_start,
                                [builds[i] for i in moe_layers], evaluation, distill_losses=losses)
        if out_dir is not None:
            save_moe(moe, tok, report, Path(out_dir))
        return report, moe
    finally:
        torch.set_num_threads(threads)


def save_moe(moe, tokenizer, report: MoEBuildReport, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    moe.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    report.out_dir = out_dir
    report.safetensors_sha256 = sha256_file(out_dir / "model.safetensors")
    (out_dir / BUILD_FILE).write_text(json.dumps(report.to_dict(), indent=2, default=str) + "\n")


def moe_cache_dir(config: MoEBuildConfig, dense: str = "smollm2") -> Path:
    """Cache directory of the MoE built from the packaged dense model `dense` with `config`."""
    from steer.packages import cache_dir

    return cache_dir() / "models" / f"{dense}-moe-{config.key()}"


def ensure_moe(config: MoEBuildConfig | None = None, progress: Progress | None = None,
               dense: str = "smollm2") -> Path:
    """The cached MoE built from the packaged dense model `dense` (default SmolLM2) with `config`,
    built on first use (file lock, atomic rename)."""
    config = config or MoEBuildConfig()
    config.validate()
    final = moe_cache_dir(config, dense)
    if (final / BUILD_FILE).exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    lock_path = final.parent / f".{final.name}.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if (final / BUILD_FILE).exists():  # another process built it while we waited
                return final
            tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            build_moe(dense, config, tmp, progress=progress)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return final
