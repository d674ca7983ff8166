"""TOPLOC baseline (polynomial commitments to top-k activations) and RTN weight quantisation."""

from __future__ import annotations

import json
from pathlib import Path

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


# ---- parity with toploc 0.1.6 (recorded fixture; live when the package imports) -------------------

TOPLOC_FIX = Path(__file__).parent / "fixtures" / "toploc"


def _smollm2_states():
    from safetensors.torch import load_file

    inp = load_file(Path(__file__).parent / "fixtures" / "difr_reference" / "inputs.safetensors")
    return inp["hidden_provider_honest"], inp["hidden_verifier_honest"], inp["hidden_provider_cheat"]


def _results(rs):
    return [[r.exp_mismatches, r.mant_err_mean, r.mant_err_median] for r in rs]


def test_proofs_and_checks_match_recorded_toploc_0_1_6():
    """SmolLM2 hidden states: toploc 0.1.6's own proof bytes and verification results (README there)."""
    rec = json.loads((TOPLOC_FIX / "toploc_0.1.6.json").read_text())
    assert rec["toploc_version"] == "0.1.6"
    hp, hv, hc = _smollm2_states()
    for case in rec["cases"]:
        params = toploc.TopLocParams(chunk_size=case["chunk_size"], topk=case["topk"])
        proofs = toploc.build_proofs(hp, params)
        assert [b.hex() for b in toploc.to_bytes(proofs)] == case["proofs_hex"]  # byte-identical
        assert toploc.to_base64(proofs) == case["proofs_base64"]
        for name, h in (("verifier", hv), ("cheat", hc)):
            assert _results(toploc.verify_proofs(h, proofs, params)) == case[f"results_{name}_python"]
            upper = toploc.TopLocParams(chunk_size=case["chunk_size"], topk=case["topk"], median="upper")
            mine = _results(toploc.verify_proofs(h, toploc.from_bytes([bytes.fromhex(x) for x in case["proofs_hex"]]),
                                                 upper))
            theirs = case[f"results_{name}_cpp"]
            # identical except toploc's 2**64 for a chunk without any exponent match (steer: MANTISSA_LEVELS)
            assert [r if r[1] < 2**63 else [r[0], 128.0, 128.0] for r in theirs] == mine


def test_proofs_match_the_live_toploc_package():
    tl = pytest.importorskip("toploc", reason="toploc not importable (0.1.6's wheel fails with torch 2.13)")
    hp, hv, _ = _smollm2_states()
    for chunk in (8, 32):
        params = toploc.TopLocParams(chunk_size=chunk)
        acts = [hp[i:i + 1].to(torch.bfloat16) for i in range(hp.shape[0])]
        theirs = tl.build_proofs_bytes(acts, decode_batching_size=chunk, topk=128, skip_prefill=True)
        assert toploc.to_bytes(toploc.build_proofs(hp, params)) == theirs
        res = tl.verify_proofs_bytes([hv[i:i + 1].to(torch.bfloat16) for i in range(hv.shape[0])], theirs,
                                     decode_batching_size=chunk, topk=128, skip_prefill=True)
        assert _results(toploc.verify_proofs(hv, toploc.from_bytes(theirs), params)) == _results(res)
