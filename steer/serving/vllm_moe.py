"""Where a constructed vLLM model keeps its MoE routing: the layer each MoE runner and router sits in.

Shared by steer's two engine-side installers, the config plugin (`steer.serving.vllm_plugin`, which
edits routing) and the profiler (`steer.serving.vllm_profile`, which records it), so that neither
imports the other for it. Needs no vLLM import: it reads the module tree of the model it is given.
"""

from __future__ import annotations

import re
from typing import Any

import torch


def moe_runners(model: torch.nn.Module) -> dict[int, Any]:
    """{layer: vLLM MoE runner} (the module holding `.router`, whose `_compute_routing` picks experts)."""
    found = {}
    for name, module in model.named_modules():
        router = getattr(module, "router", None)
        m = re.search(r"(?:^|\.)layers\.(\d+)\.", name + ".")
        if m and router is not None and hasattr(router, "_compute_routing") and hasattr(router, "top_k"):
            found.setdefault(int(m.group(1)), module)
    return found


def moe_routers(model: torch.nn.Module) -> dict[int, Any]:
    """{layer: FusedMoE router} of a vLLM model."""
    return {layer: runner.router for layer, runner in moe_runners(model).items()}


def monolithic(runner) -> bool:
    """True when the expert kernel does its own top-k from the logits (the router is bypassed)."""
    quant = getattr(getattr(runner, "routed_experts", None), "quant_method", None)
    return bool(getattr(quant, "is_monolithic", False))
