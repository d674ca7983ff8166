"""LYNX probe score at a cue token, fused: gather, standardise, MLP, sigmoid (ALGORITHMS.md section 3).

`probe_score(hidden, positions, mean, std, layers)`:
- hidden: list of [B, T, D_l] tensors (one per probed layer, e.g. ~30/50/75% depth and the final
  post-norm state; D_l may differ, dtypes may differ) or one stacked [L, B, T, D] tensor;
- positions: Long[B], the cue token's index in each row (0 <= p < T);
- features `x[b] = concat_l hidden[l][b, positions[b]]` (F = sum D_l), standardised `(x - mean) / std`;
- layers: [(W1 [H1, F], b1), (W2 [H2, H1], b2), (W3 [1, H2], b3)] with ReLU between (LYNX: 256, 64);
- returns Float32[B] = sigmoid(MLP(x)), computed in fp32.

Triton path: kernel 1 gathers, standardises and runs the first (large, F x 256) layer split over
feature chunks (enough programs to stream W1 at full bandwidth; deterministic: per-chunk partial
sums, no atomics); kernel 2 sums the chunks and runs ReLU, layer 2, ReLU, layer 3 and the sigmoid.
Rows whose position is out of range come out NaN on the Triton path (no host check: CUDA-graph
safe); the torch path raises. Up to 8 hidden tensors on the Triton path.
"""

from __future__ import annotations

import torch

from steer.kernels._triton import backend_for, load

MAX_LAYERS = 8


def _as_list(hidden) -> list[torch.Tensor]:
    if isinstance(hidden, torch.Tensor):
        if hidden.dim() != 4:
            raise ValueError(f"stacked hidden states must be [L, B, T, D], got {tuple(hidden.shape)}")
        return list(hidden.unbind(0))
    return list(hidden)


def _check(hidden: list[torch.Tensor], positions, mean, std, layers) -> None:
    if not hidden:
        raise ValueError("probe_score needs at least one hidden-state tensor")
    B, T = hidden[0].shape[:2]
    for i, h in enumerate(hidden):
        if h.dim() != 3 or h.shape[:2] != (B, T):
            raise ValueError(f"hidden[{i}] must be [B={B}, T={T}, D], got {tuple(h.shape)}")
    if positions.shape != (B,) or positions.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"positions must be Long[{B}] (cue token index per row), got {positions.dtype} {tuple(positions.shape)}")
    F = sum(h.shape[2] for h in hidden)
    if mean.shape != (F,) or std.shape != (F,):
        raise ValueError(f"mean and std must be [F={F}] (sum of hidden sizes), got {tuple(mean.shape)}, {tuple(std.shape)}")
    dev = hidden[0].device
    tensors = [("positions", positions), ("mean", mean), ("std", std), *((f"hidden[{i}]", h) for i, h in enumerate(hidden)),
               *((f"layers[{i}]", t) for i, wb in enumerate(layers) for t in wb)]
    for name, t in tensors:
        if t.device != dev:
            raise ValueError(f"{name} is on {t.device} but hidden[0] on {dev}; move the probe with .to(device) once")
    if len(layers) != 3:
        raise ValueError(f"the probe MLP must have 3 linear layers (F -> H1 -> H2 -> 1), got {len(layers)}")
    (w1, b1), (w2, b2), (w3, b3) = layers
    if w1.shape[1] != F or w2.shape[1] != w1.shape[0] or w3.shape != (1, w2.shape[0]):
        raise ValueError(f"MLP shapes {tuple(w1.shape)}, {tuple(w2.shape)}, {tuple(w3.shape)} do not chain "
                         f"F={F} -> H1 -> H2 -> 1")
    if b1.shape != (w1.shape[0],) or b2.shape != (w2.shape[0],) or b3.numel() != 1:
        raise ValueError("MLP biases must be [H1], [H2] and [1]")


def probe_score(hidden, positions, mean, std, layers, *, backend: str | None = None) -> torch.Tensor:
    """Float32[B] probability that exiting at this cue is correct. See the module docstring."""
    hidden = _as_list(hidden)
    _check(hidden, positions, mean, std, layers)
    if backend_for(hidden[0], backend) == "triton":
        if len(hidden) > MAX_LAYERS:
            raise ValueError(f"the Triton probe kernel takes up to {MAX_LAYERS} hidden tensors, got {len(hidden)}")
        return load("_probe_triton").probe_score_triton(hidden, positions, mean, std, layers)
    return probe_score_reference(hidden, positions, mean, std, layers)


def probe_score_reference(hidden, positions, mean, std, layers) -> torch.Tensor:
    """PyTorch reference (also the CPU path)."""
    hidden = _as_list(hidden)
    _check(hidden, positions, mean, std, layers)
    B, T = hidden[0].shape[:2]
    if positions.device.type == "cpu" and B and not bool(((positions >= 0) & (positions < T)).all()):
        raise ValueError(f"positions {positions.tolist()} out of range for {T} tokens")
    rows = torch.arange(B, device=positions.device)
    x = torch.cat([h[rows, positions].float() for h in hidden], dim=-1)
    x = (x - mean.float()) / std.float()
    for i, (w, b) in enumerate(layers):
        x = torch.nn.functional.linear(x, w.float(), b.float())
        if i < len(layers) - 1:
            x = torch.relu(x)
    return torch.sigmoid(x.squeeze(-1))
