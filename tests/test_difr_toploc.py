"""TOPLOC baseline (polynomial commitments to top-k activations) and RTN weight quantisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from steer.difr import quantize_dequantize, quantize_rtn, toploc
from steer.tiny import tiny_model


def test_interpolation_passes_through_the_points():
    rng = np.random.default_rng(0)
    x = rng.choice(60000, 128, replace=False)
    y = rng.integers(0, 65000, 128)
    coeffs = toploc.interpolate(x, y)
    assert coeffs.size == 128 and coeffs.max() < toploc.PRIME
    assert np.array_equal(toploc.evaluate(coeffs, x), y % toploc.PRIME)


def test_proofs_are_258_bytes_and_accept_the_same_states():
    h = torch.randn(70, 64, generator=torch.Generator().manual_seed(1)) * 3
    params = toploc.TopLocParams()
    proofs = toploc.build_proofs(h, params)
    assert proofs.shape == (3, 129) and params.bytes_per_chunk == 258  # chunks of 32, 32, 6 tokens
    results = toploc.verify_proofs(h, proofs, params)
    assert all(r.exp_mismatches == 0 and r.mant_err_mean == 0 and r.accepted(params) for r in results)
    noisy = h * (1 + 1e-3 * torch.randn(h.shape, generator=torch.Generator().manual_seed(2)))
    assert all(r.accepted(params) for r in toploc.verify_proofs(noisy, proofs, params))  # bf16-level noise
    # ~30% relative noise (another model's states); 10% still passes TOPLOC's published thresholds
    other = h + 1.0 * torch.randn(h.shape, generator=torch.Generator().manual_seed(3))
    bad = toploc.verify_proofs(other, proofs, params)
    assert not any(r.accepted(params) for r in bad)
    assert min(r.score for r in bad) > max(r.score for r in results)


def test_quantize_dequantize_is_grouped_symmetric_rtn():
    w = torch.randn(8, 256, generator=torch.Generator().manual_seed(0))
    q4 = quantize_dequantize(w, 4, 32)
    for g in q4.reshape(-1, 32):  # each group: at most 15 symmetric levels of one scale
        scale = g.abs().max() / 7
        assert torch.allclose(g / scale, torch.round(g / scale), atol=1e-4)
    err4 = (q4 - w).abs().max()
    err8 = (quantize_dequantize(w, 8, 32) - w).abs().max()
    assert err8 < err4 / 8 and err4 <= w.abs().max() / 14 + 1e-6
    assert quantize_dequantize(torch.randn(3, 40), 4, 32).shape == (3, 40)  # ragged last group


def test_quantize_rtn_copies_and_skips_the_head():
    model = tiny_model("mixtral")
    before = {n: p.clone() for n, p in model.named_parameters()}
    q = quantize_rtn(model, 4, 32)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # original untouched
    changed = {n for n, p in q.named_parameters() if not torch.equal(p, before[n])}
    assert "lm_head.weight" not in changed and "model.embed_tokens.weight" not in changed
    assert any("experts" in n for n in changed) and any("q_proj" in n for n in changed)
    assert q.steer_quantized["tensors"] > 0


def test_proofs_round_trip_through_toplocs_wire_format():
    h = torch.randn(40, 64, generator=torch.Generator().manual_seed(4))
    proofs = toploc.build_proofs(h)
    raw = toploc.to_bytes(proofs)
    assert len(raw) == 2 and all(len(b) == 258 for b in raw)
    assert int.from_bytes(raw[0][:2], "big") == int(proofs[0, 0])  # modulus first, big-endian uint16
    assert int.from_bytes(raw[0][2:4], "big") == int(proofs[0, 1])
    assert torch.equal(toploc.from_bytes(raw), proofs)
    assert torch.equal(toploc.from_base64(toploc.to_base64(proofs)), proofs)
    with pytest.raises(ValueError, match="2 \\+ 2\\*topk"):
        toploc.from_bytes([raw[0], raw[1][:-1]])
    with pytest.raises(ValueError, match="not toploc base64"):
        toploc.from_base64(["not base64!"])


def test_median_conventions():
    """toploc's Python path averages the two middle errors, its C++ path takes the upper one."""
    h = torch.randn(32, 64, generator=torch.Generator().manual_seed(5)) * 3
    proofs = toploc.build_proofs(h)
    noisy = h * (1 + 2e-2 * torch.randn(h.shape, generator=torch.Generator().manual_seed(6)))
    avg = toploc.verify_proofs(noisy, proofs)[0]
    upper = toploc.verify_proofs(noisy, proofs, toploc.TopLocParams(median="upper"))[0]
    assert avg.mant_err_mean == upper.mant_err_mean and upper.mant_err_median >= avg.mant_err_median
    with pytest.raises(ValueError, match="median"):
        toploc.TopLocParams(median="lower")
