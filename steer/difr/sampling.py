"""Token-DiFR: sampling with a shared seed, and the verifier's per-token margin score.

Steer samples by Gumbel-max: token = argmax(z), z = logits + T * G over the top-k/top-p support,
with G ~ Gumbel(0, 1) drawn from a generator keyed by (sequence seed, generation step). That is an
exact sample from softmax(logits / T) restricted to the support, and anyone holding the seed can
regenerate G. The verifier recomputes the logits by teacher forcing and scores each claimed token
by its margin, max z - z[gold] (0 for an honest token up to numerical noise; infinite when the
token is outside the support), clipped at a high percentile of benign margins.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor

_MASK64 = (1 << 64) - 1


@dataclass
class SamplingParams:
    """What the provider claims it sampled with (all shared with the verifier)."""

    temperature: float = 1.0
    top_p: float = 1.0  # nucleus mass; 1.0 disables
    top_k: int = 0  # 0 disables

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 for seeded sampling (use sampling=None for greedy), "
                             f"got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")

    def to_dict(self) -> dict:
        return asdict(self)


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def gumbel_noise(seed: int, step: int, vocab: int) -> Tensor:
    """The public Gumbel noise for one (sequence seed, step): fp32 [vocab], reproducible anywhere."""
    key = _splitmix64(_splitmix64(int(seed) & _MASK64) ^ int(step)) & ((1 << 63) - 1)
    u = torch.rand(vocab, generator=torch.Generator().manual_seed(key), dtype=torch.float64)
    return (-torch.log(-torch.log(u.clamp(1e-300, 1 - 1e-16)))).float()


def support_mask(scores: Tensor, params: SamplingParams) -> Tensor:
    """Bool [..., V]: tokens inside the top-k / top-p support of scores (= logits / T)."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    if params.top_k and params.top_k < scores.shape[-1]:
        kth = scores.topk(params.top_k, dim=-1).values[..., -1:]
        keep &= scores >= kth
    if params.top_p < 1.0:
        masked = scores.masked_fill(~keep, float("-inf"))
        probs = masked.softmax(-1)
        sorted_p, order = probs.sort(dim=-1, descending=True)
        before = sorted_p.cumsum(-1) - sorted_p  # mass strictly before each token
        keep_sorted = before < params.top_p
        keep_sorted[..., 0] = True
        keep &= torch.zeros_like(keep).scatter(-1, order, keep_sorted)
    return keep


def perturbed_scores(logits: Tensor, params: SamplingParams, noise: Tensor) -> Tensor:
    """z = logits + T * G on the support, -inf elsewhere (argmax of z is the sample)."""
    logits = logits.float()
    keep = support_mask(logits / params.temperature, params)
    return (logits + params.temperature * noise.to(logits.device)).masked_fill(~keep, float("-inf"))


class GumbelSampler:
    """A transformers LogitsProcessor that turns greedy decoding into seeded Gumbel-max sampling."""

    def __init__(self, params: SamplingParams, seeds: Tensor, prompt_length: int):
        self.params, self.seeds, self.prompt_length = params, seeds.tolist(), int(prompt_length)

    def noise(self, row: int, step: int, vocab: int) -> Tensor:
        return gumbel_noise(self.seeds[row], step, vocab)

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        step = input_ids.shape[1] - self.prompt_length
        vocab = scores.shape[-1]
        noise = torch.stack([self.noise(i, step, vocab) for i in range(scores.shape[0])])
        return perturbed_scores(scores, self.params, noise)


def token_margins(logits: Tensor, tokens: Tensor, seed: int, params: SamplingParams) -> Tensor:
    """Token-DiFR margin per generated token of one sequence: fp32 [N], inf outside the support.

    logits [N, V] are the verifier's logits at the positions that produced tokens [N].
    """
    vocab = logits.shape[-1]
    noise = torch.stack([gumbel_noise(seed, t, vocab) for t in range(tokens.numel())])
    z = perturbed_scores(logits, params, noise)
    gold = z.gather(-1, tokens.view(-1, 1).to(z.device)).squeeze(-1)
    return (z.max(-1).values - gold).float().cpu()
