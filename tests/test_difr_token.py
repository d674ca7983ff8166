"""Token-DiFR: seeded Gumbel-max sampling and the verifier's margins."""

from __future__ import annotations

import pytest
import torch

from steer.difr import (
    GumbelSampler,
    SamplingParams,
    fingerprint_prompts,
    gumbel_noise,
    teacher_force,
    token_margins,
)
from steer.difr.sampling import perturbed_scores, support_mask
from steer.tiny import tiny_model, tiny_tokenizer


def test_noise_is_a_function_of_seed_and_step():
    a = gumbel_noise(3, 5, 100)
    assert torch.equal(a, gumbel_noise(3, 5, 100))
    assert not torch.equal(a, gumbel_noise(3, 6, 100)) and not torch.equal(a, gumbel_noise(4, 5, 100))


def test_gumbel_max_samples_the_softmax():
    """argmax(logits + T*G) over many seeds follows softmax(logits / T)."""
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5])
    params = SamplingParams(temperature=0.7)
    draws = torch.stack([perturbed_scores(logits, params, gumbel_noise(s, 0, 5)).argmax() for s in range(6000)])
    freq = torch.bincount(draws, minlength=5).float() / len(draws)
    torch.testing.assert_close(freq, (logits / 0.7).softmax(-1), atol=0.02, rtol=0)


def test_support_mask_top_k_and_top_p():
    scores = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert support_mask(scores, SamplingParams(top_k=2)).tolist() == [True, True, False, False]
    assert support_mask(scores, SamplingParams(top_p=0.8)).tolist() == [True, True, False, False]
    assert support_mask(scores, SamplingParams(top_p=0.81)).tolist() == [True, True, True, False]
    assert support_mask(scores, SamplingParams(top_p=0.1)).tolist() == [True, False, False, False]
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=0)


def test_margins_are_zero_for_honest_tokens_and_inf_outside_the_support():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0)) * 3
    params = SamplingParams(temperature=1.0, top_k=5)
    gold = torch.stack([perturbed_scores(logits[t], params, gumbel_noise(9, t, 50)).argmax() for t in range(6)])
    assert token_margins(logits, gold, 9, params).abs().max() == 0
    outside = logits.argmin(-1)
    assert torch.isinf(token_margins(logits, outside, 9, params)).all()
    assert (token_margins(logits, gold, 10, params) >= 0).all()  # wrong seed: non-negative, mostly > 0


def test_wrong_sampler_shows_up_in_margins():
    model, tok = tiny_model("qwen2"), tiny_tokenizer()
    prompts = ["hello there", "the quick brown fox", "abc", "a longer prompt here"]
    claim = SamplingParams(temperature=1.0, top_p=0.95)
    honest = fingerprint_prompts(model, tok, prompts, sampling=claim, max_new_tokens=12, chat=False)
    cold = fingerprint_prompts(model, tok, prompts, sampling=claim, max_new_tokens=12, chat=False,
                               sampler_factory=lambda s, seeds, pl: GumbelSampler(SamplingParams(0.5, 0.95), seeds, pl))
    reseeded = fingerprint_prompts(model, tok, prompts, sampling=claim, max_new_tokens=12, chat=False,
                                   sampler_factory=lambda s, seeds, pl: GumbelSampler(claim, seeds + 1, pl))
    m_honest = teacher_force(model, honest).margins
    assert m_honest.abs().max() < 1e-3
    assert (teacher_force(model, cold).margins > 1e-3).float().mean() > 0.05  # flat tiny logits: few flips
    assert (teacher_force(model, reseeded).margins > 1e-3).float().mean() > 0.5


def test_margins_are_clipped_at_the_papers_fixed_half_logit():
    """The paper's code scores min(margin, 0.5), and 0.5 for a token outside the support (margin inf)."""
    from steer.difr.verify import TOKEN_CLIP, clip_margins

    m = torch.tensor([0.0, 0.25, 0.5, 3.0, float("inf")])
    assert TOKEN_CLIP == 0.5 and clip_margins(m, TOKEN_CLIP).tolist() == [0.0, 0.25, 0.5, 0.5, 0.5]
    assert torch.equal(clip_margins(m, None), m)
