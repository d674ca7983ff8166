"""Perturbations a verifier must catch: cheaper weights served under the reference model's name.

`quantize_rtn` is round-to-nearest grouped symmetric weight quantisation, quantise-dequantise, on a
copy of the model: each group of `group_size` consecutive input weights shares one scale
max|w| / (2**(bits-1) - 1). It covers every nn.Linear of the decoder (not lm_head or embeddings,
which servers usually keep in high precision) and fused 3-D expert tensors of MoE layers.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn


def quantize_dequantize(w: Tensor, bits: int, group_size: int) -> Tensor:
    """RTN symmetric per-group quantise-dequantise along the last dimension (padded if ragged)."""
    if bits < 2 or bits > 16:
        raise ValueError(f"bits must be in 2..16, got {bits}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    shape, n = w.shape, w.shape[-1]
    pad = (-n) % group_size
    x = torch.nn.functional.pad(w.float(), (0, pad)).reshape(-1, group_size)
    qmax = 2 ** (bits - 1) - 1
    scale = x.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny) / qmax
    q = torch.round(x / scale).clamp(-qmax, qmax)
    out = (q * scale).reshape(*shape[:-1], n + pad)[..., :n]
    return out.to(w.dtype)


@torch.no_grad()
def quantize_rtn(model: nn.Module, bits: int = 4, group_size: int = 128) -> nn.Module:
    """A quantise-dequantised copy of `model` (the original is untouched); counts in `.steer_quantized`."""
    qmodel = copy.deepcopy(model)
    head = qmodel.get_output_embeddings()
    n = 0
    for name, module in qmodel.named_modules():
        if isinstance(module, nn.Linear) and module is not head:
            module.weight.copy_(quantize_dequantize(module.weight, bits, group_size))
            n += 1
        elif "experts" in name.rsplit(".", 1)[-1]:
            for p in module.parameters(recurse=False):
                if p.dim() == 3:
                    # fused experts store [E, out, in]: group along the input (last) dimension
                    p.copy_(quantize_dequantize(p, bits, group_size))
                    n += 1
    qmodel.steer_quantized = {"bits": bits, "group_size": group_size, "tensors": n}
    return qmodel
