"""Hook factories named by steer's SGLang export (`--forward-hooks`, see steer.export.to_sglang).

SGLang calls `router_logits_hook(config)` once per hook spec at startup and registers the returned
forward hook on each MoE layer's router-logits module (SGLang's name for the family, from
steer.adapters: `model.layers.N.mlp.gate`, `...block_sparse_moe.gate`, `...mlp.router`), whose output
is the router logits (a (logits, bias) tuple from SGLang's ReplicatedLinear, or a tensor). Editing
logits before top-k is all a module hook can do, so:

- off_mask: switched-off experts get -inf, which is exactly steer's off_mask (a logit-level mask) for
  the softmax families, renormalised top-k weights or not (DeepSeek-V3's sigmoid + bias selection can
  still pick a -inf expert, with weight 0, where steer removes it from the selection);
- on: forced experts get the token's max logit + 1e-3, so they are always selected (weight close to
  steer's force_weight="max").

SGLang registers these hooks after CUDA-graph capture and graph replay runs no Python hook: the
server must run with `--disable-cuda-graph` (see steer.export), or decode is unsteered. The factory
logs that once, so it is in the server log next to SGLang's "Registered forward hook" lines.
"""

from __future__ import annotations

import logging

import torch

FORCE_MARGIN = 1e-3
log = logging.getLogger(__name__)
_warned = False


def router_logits_hook(config: dict):
    mode, experts = config.get("mode"), list(config.get("experts") or [])
    if mode not in ("off_mask", "on"):
        raise ValueError(f"router_logits_hook: mode must be 'off_mask' or 'on', got {mode!r}")
    if not experts:
        raise ValueError("router_logits_hook: config.experts is empty; nothing to switch")
    n = config.get("num_experts")
    global _warned
    if not _warned:
        _warned = True
        log.warning("steer router hooks do not run inside CUDA-graph replay: serve with --disable-cuda-graph, "
                    "or decode steps are unsteered")

    def edit(logits: torch.Tensor) -> torch.Tensor:
        if n is not None and logits.shape[-1] != n:
            raise ValueError(f"router logits have {logits.shape[-1]} experts, the steer config {n}")
        out = logits.clone()
        if mode == "off_mask":
            out[..., experts] = float("-inf")
        else:
            out[..., experts] = logits.max(dim=-1, keepdim=True).values + FORCE_MARGIN
        return out

    def hook(module, inputs, output):
        if isinstance(output, tuple):
            return (edit(output[0]), *output[1:])
        return edit(output)

    return hook
