"""How robust a built MoE's routing is to what a served copy sees (noise, bf16, top-k on logits).

A built MoE (steer.moebuild) has near-tied router logits by construction (`router_spread`), so
another engine's kernels can route some tokens differently from the fp32 model. These measurements
are what experiments/moe_build reports and what the vLLM round-trip test's tolerances rest on.
"""

from __future__ import annotations

import torch


def _moe_layers(model) -> list[int]:
    return [i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")]


def _rank_logits(value, _ctx):
    """Router output with top-k taken on the logits (an engine that never rounds to probabilities)."""
    logits, weights, indices = value
    idx = logits.topk(indices.shape[-1], dim=-1).indices
    w = torch.softmax(logits, dim=-1, dtype=torch.float32).gather(-1, idx).to(weights.dtype)
    return (logits, w, idx)


def _routing(model, input_ids: torch.Tensor, noise: float = 0.0, seed: int = 0, rank_logits: bool = False):
    """Per MoE layer: the sorted top-k sets [N, k], the MLP inputs [N, D] and router logits [N, E]."""
    from steer.hooks import attach

    sets: dict[int, torch.Tensor] = {}
    xs: dict[int, torch.Tensor] = {}
    logits: dict[int, torch.Tensor] = {}
    gen = torch.Generator().manual_seed(seed)

    def perturb(x, _ctx, i):
        if noise:
            x = x * (1 + noise * torch.randn(x.shape, generator=gen, dtype=torch.float32).to(x.dtype))
        xs[i] = x.detach().reshape(-1, x.shape[-1])
        return x if noise else None

    hooks = {}
    for i in _moe_layers(model):
        hooks[f"blocks.{i}.mlp.in"] = lambda x, ctx, i=i: perturb(x, ctx, i)
        if rank_logits:  # registered first: hooks on one module run in this order, readers see the edit
            hooks[f"blocks.{i}.mlp.router"] = _rank_logits
        hooks[f"blocks.{i}.mlp.router.indices"] = lambda v, _ctx, i=i: sets.__setitem__(i, v.sort(-1).values)
        hooks[f"blocks.{i}.mlp.router.logits"] = lambda v, _ctx, i=i: logits.__setitem__(i, v.detach().float())
    with attach(model, hooks), torch.no_grad():
        model.model(input_ids=input_ids, use_cache=False)
    return sets, xs, logits


def _changed(a: dict[int, torch.Tensor], b: dict[int, torch.Tensor]) -> float:
    """Fraction of (token, layer) pairs whose top-k expert sets differ."""
    diff = sum(int((a[i] != b[i]).any(-1).sum()) for i in a)
    return diff / sum(a[i].shape[0] for i in a)


def routing_robustness(model, input_ids: torch.Tensor, *, noise: float = 1e-6, seed: int = 0,
                       bf16: bool = True) -> dict:
    """How often a token-layer's top-k expert set changes under perturbations a served copy sees.

    A built MoE has near-tied router logits by construction (`router_spread`), so another engine's
    kernels (other GEMM order, bf16) can route some tokens differently from this fp32 model. Each
    number is the fraction of (token, MoE layer) pairs whose selected set differs from the fp32 run:
    - noise_local: each router re-applied to its own input times (1 + noise * N(0, 1)): tie
      fragility alone, nothing propagates;
    - noise_end_to_end: that noise on every MoE layer's input in one forward (changes propagate);
    - bf16_local: each router in bf16 on its bf16-rounded input;
    - bf16_end_to_end: the whole model in bf16.
    - topk_of_logits: top-k taken on the fp32 logits instead of on the softmax probabilities (as HF
      does): engines that rank logits disagree wherever near-equal logits round to equal
      probabilities near 1/E and HF breaks the tie by expert index (`fp32_prob_ties`);
      topk_of_logits_end_to_end: a whole forward routed that way (each changed choice moves the
      hidden state by a whole expert's output, so later layers and tokens can change too).
    Also the k-th vs (k+1)-th logit gap relative to the token's logit range (median, and the share of
    token-layers under 1e-3 of it) and the fp32 logit range itself.
    """
    import copy

    model = model.eval()
    ref, xs, logits = _routing(model, input_ids)
    k = next(iter(ref.values())).shape[-1]
    out: dict = {"tokens": int(input_ids.numel()), "moe_layers": len(ref), "k": k, "noise": noise}
    local, local_bf16, by_logit = _local_routings(model, xs, logits, k, noise, torch.Generator().manual_seed(seed))
    out["noise_local"] = _changed(ref, local)
    out["topk_of_logits"] = _changed(ref, by_logit)
    out["bf16_local"] = _changed(ref, local_bf16)
    out["noise_end_to_end"] = _changed(ref, _routing(model, input_ids, noise=noise, seed=seed + 1)[0])
    out["topk_of_logits_end_to_end"] = _changed(ref, _routing(model, input_ids, rank_logits=True)[0])
    if bf16:
        m16 = copy.deepcopy(model).to(torch.bfloat16)
        out["bf16_end_to_end"] = _changed(ref, _routing(m16, input_ids)[0])
        del m16
    out.update(_logit_gaps(logits, k))
    return out


def _local_routings(model, xs: dict, logits: dict, k: int, noise: float, gen: torch.Generator) -> tuple[dict, dict, dict]:
    """Each router re-applied to its own recorded input: noised, in bf16, and top-k of the logits
    ({layer: sorted expert ids} each)."""
    import copy

    local, local_bf16, by_logit = {}, {}, {}
    with torch.no_grad():
        for i, x in xs.items():
            gate = model.model.layers[i].mlp.gate
            xn = x * (1 + noise * torch.randn(x.shape, generator=gen, dtype=x.dtype))
            local[i] = gate(xn)[2].sort(-1).values
            g16 = copy.deepcopy(gate).to(torch.bfloat16)
            local_bf16[i] = g16(x.to(torch.bfloat16))[2].sort(-1).values
            by_logit[i] = logits[i].topk(k, dim=-1).indices.sort(-1).values
    return local, local_bf16, by_logit


def _logit_gaps(logits: dict, k: int) -> dict:
    """The k-th vs (k+1)-th logit gap relative to each token's logit range, and fp32 probability ties."""
    gaps, ranges, ties = [], [], 0
    with torch.no_grad():
        for lg in logits.values():
            top = lg.topk(min(k + 1, lg.shape[-1]), dim=-1).values
            rng = lg.max(-1).values - lg.min(-1).values
            if k < lg.shape[-1]:
                gaps.append((top[:, k - 1] - top[:, k]) / rng.clamp_min(1e-30))
                probs = torch.softmax(lg, -1).topk(k + 1, dim=-1).values
                ties += int((probs[:, k - 1] == probs[:, k]).sum())
            ranges.append(rng)
    out = {"logit_range_median": float(torch.cat(ranges).median())}
    if gaps:
        g = torch.cat(gaps)
        out["boundary_gap_rel_median"] = float(g.median())
        out["boundary_gap_rel_below_1e-3"] = float((g < 1e-3).double().mean())
        out["fp32_prob_ties"] = ties / int(g.numel())
    return out
