"""steer.kernels.probe_score: reference == an independent nn.Sequential probe; Triton (interpreter) == reference."""

from __future__ import annotations

import pytest
import torch

from steer.kernels._triton import interpreter, interpreter_ready
from steer.kernels.probe_score import probe_score, probe_score_reference

triton_interpreter = pytest.mark.skipif(
    not interpreter_ready(), reason="needs TRITON_INTERPRET=1 before triton import; run by test_kernels_interpreter.py")


def _probe(dims, B=3, T=11, dtype=torch.float32, H1=256, H2=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = [(torch.randn(B, T, d, generator=g) * 2 + 0.5).to(dtype) for d in dims]
    positions = torch.randint(0, T, (B,), generator=g)
    F = sum(dims)
    mean = torch.randn(F, generator=g) * 0.3 + 0.5
    std = torch.rand(F, generator=g) + 1.5
    mlp = torch.nn.Sequential(torch.nn.Linear(F, H1), torch.nn.ReLU(), torch.nn.Linear(H1, H2), torch.nn.ReLU(),
                              torch.nn.Linear(H2, 1))
    torch.manual_seed(seed)
    for m in mlp:
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, std=m.in_features ** -0.5)
            torch.nn.init.normal_(m.bias, std=0.1)
    layers = [(m.weight.detach(), m.bias.detach()) for m in mlp if isinstance(m, torch.nn.Linear)]
    return hidden, positions, mean, std, layers, mlp


def test_reference_matches_sequential_probe():
    hidden, positions, mean, std, layers, mlp = _probe([16, 24, 16])
    feats = torch.cat([h[torch.arange(3), positions] for h in hidden], -1)
    want = torch.sigmoid(mlp((feats - mean) / std)).squeeze(-1)
    got = probe_score(hidden, positions, mean, std, layers)
    assert got.dtype == torch.float32 and got.shape == (3,)
    torch.testing.assert_close(got, want.detach())
    assert ((got > 0.02) & (got < 0.98)).all()  # not saturated, so a wrong feature would show
    stacked = probe_score(torch.stack(hidden[::2]), positions, mean[:32], std[:32],
                          [(layers[0][0][:, :32], layers[0][1]), *layers[1:]])
    assert stacked.shape == (3,)


def test_errors_are_clear():
    hidden, positions, mean, std, layers, _ = _probe([8, 8])
    with pytest.raises(ValueError, match="out of range"):
        probe_score(hidden, torch.tensor([0, 11, 2]), mean, std, layers)
    with pytest.raises(ValueError, match="mean and std"):
        probe_score(hidden, positions, mean[:-1], std, layers)
    with pytest.raises(ValueError, match="3 linear layers"):
        probe_score(hidden, positions, mean, std, layers[:2])


@triton_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("dims,B", [([40, 40, 40], 3), ([130, 64], 19), ([200], 1)])
def test_triton_probe_matches_reference(dims, B, dtype):
    hidden, positions, mean, std, layers, _ = _probe(dims, B=B, dtype=dtype, seed=B + len(dims))
    with interpreter():
        got = probe_score(hidden, positions, mean, std, layers, backend="triton")
    want = probe_score_reference(hidden, positions, mean, std, layers)
    assert got.dtype == torch.float32 and not got.isnan().any()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@triton_interpreter
def test_triton_probe_bad_position_is_nan_row_and_small_mlp():
    hidden, positions, mean, std, layers, _ = _probe([33, 20], B=4, H1=24, H2=10)
    bad = positions.clone()
    bad[2] = 99
    with interpreter():
        got = probe_score(hidden, bad, mean, std, layers, backend="triton")
        ok = probe_score(hidden, positions, mean, std, layers, backend="triton")
    assert got[2].isnan() and not got[[0, 1, 3]].isnan().any()
    torch.testing.assert_close(ok, probe_score_reference(hidden, positions, mean, std, layers), atol=1e-5, rtol=1e-5)
