"""Step 2 of LYNX: the probe's input is the hidden state at the cue token from several layers,
concatenated in a fixed order.

Points use steer's canonical names: "blocks.{L}.resid_post" (output of decoder layer L) and
"final_norm.out" (the post-final-norm state that feeds lm_head).

Which layers (`default_points`): the released code (farukakgul/LYNX @ e62c6c2, `feature_layers` in
lynx/early_exit_eval.py and the dataset builders) picks HF hidden-state indices from a table keyed by
model id or depth, always adding the last entry (post-final-norm): 64 layers (QwQ-32B) 16/32/48,
36 layers (Qwen3-8B) 12/18/24, 32 layers (Nemotron-8B) 8/16/24, and otherwise 9/16, its original
DeepSeek-R1-Distill-Qwen-1.5B setup (28 layers). steer follows that table for the depths it covers
(`LYNX_LAYERS`, keyed by num_hidden_layers; 28 = R1-1.5B) and converts hidden-state index i to
"blocks.{i-1}.resid_post". For any other depth the reference's fallback (9, 16) is not depth-aware
(meaningless under 17 layers), so steer uses its own fallback instead: blocks at about 30/50/75% of
the depth (`DEFAULT_DEPTHS`) plus the final post-norm state. That fallback is steer's choice, not the
reference's; the packaged models (smollm2: 30 layers, qwen2.5-coder: 24, gemma3-270m: 18) all use it.

How this maps onto Hugging Face `output_hidden_states=True` (checked in transformers 5.24): the
tuple has num_layers + 1 tensors; index 0 is the embedding output, index i (1 <= i < n) is the
output of layer i-1, and the LAST entry is overwritten with `last_hidden_state`, which is already
post-final-norm (`capture_outputs(tie_last_hidden_states=True)`). So "blocks.{L}.resid_post" is
hidden_states[L+1] for L < n-1, "final_norm.out" is hidden_states[n], and the pre-norm output of
the last layer is not in that tuple at all (only the hook backend can read it).
Two backends give identical features (tested): steer.hooks ("hooks") and that tuple ("hidden_states").
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

# The reference's table: num_hidden_layers -> HF hidden-state indices (1-based: i = output of block i-1),
# always followed by the last (post-final-norm) entry. 28 layers = its default, DeepSeek-R1-Distill-Qwen-1.5B.
LYNX_LAYERS: dict[int, tuple[int, ...]] = {64: (16, 32, 48), 36: (12, 18, 24), 32: (8, 16, 24), 28: (9, 16)}
DEFAULT_DEPTHS: tuple[float, ...] = (0.30, 0.50, 0.75)  # steer's fallback for depths the table does not cover
FINAL = "final_norm.out"
_BLOCK = re.compile(r"^blocks\.(\d+)\.resid_post$")


def num_layers(model) -> int:
    return int(model.config.get_text_config(decoder=True).num_hidden_layers)


def default_points(model_or_layers, depths: Sequence[float] | None = None, final: bool = True) -> list[str]:
    """The probe's feature points: the reference's layers for the depths in `LYNX_LAYERS`, otherwise
    blocks at `depths` (fractions of depth, default `DEFAULT_DEPTHS`), plus the final post-norm state.

    Passing `depths` always uses them. Depth f means hidden_states index k = floor(f * n + 0.5), i.e.
    block k-1."""
    n = model_or_layers if isinstance(model_or_layers, int) else num_layers(model_or_layers)
    if depths is None and n in LYNX_LAYERS:
        return [f"blocks.{i - 1}.resid_post" for i in LYNX_LAYERS[n]] + ([FINAL] if final else [])
    depths = DEFAULT_DEPTHS if depths is None else depths
    blocks = []
    for f in depths:
        if not 0 < f <= 1:
            raise ValueError(f"depth fraction {f} is outside (0, 1]")
        b = max(0, min(n - 1, int(f * n + 0.5) - 1))
        if b not in blocks:
            blocks.append(b)
    return [f"blocks.{b}.resid_post" for b in blocks] + ([FINAL] if final else [])


def hidden_state_index(point: str, n_layers: int) -> int:
    """Index into HF's output_hidden_states tuple for `point` (see module docstring)."""
    if point == FINAL:
        return n_layers
    m = _BLOCK.match(point)
    if not m:
        raise ValueError(f"feature point {point!r} is not 'blocks.L.resid_post' or '{FINAL}'")
    layer = int(m.group(1))
    if not 0 <= layer < n_layers:
        raise ValueError(f"{point!r}: layer {layer} does not exist (model has {n_layers} layers)")
    if layer == n_layers - 1:
        raise ValueError(
            f"{point!r} is the pre-norm output of the last layer, which HF's hidden_states tuple does not "
            f"hold (its last entry is post-norm): use backend='hooks', or '{FINAL}'"
        )
    return layer + 1


def validate_points(points: Sequence[str], model) -> None:
    n = num_layers(model)
    for p in points:
        if p == FINAL:
            continue
        m = _BLOCK.match(p)
        if not m or not 0 <= int(m.group(1)) < n:
            raise ValueError(f"feature point {p!r} is not valid for this {n}-layer model "
                             f"(use 'blocks.L.resid_post' with 0 <= L < {n}, or '{FINAL}')")


def from_hidden_states(hidden_states: Sequence[torch.Tensor], points: Sequence[str],
                       positions: torch.Tensor | None = None) -> torch.Tensor:
    """Features [B, F] (positions given, one per row) or [B, T, F] from HF's hidden_states tuple."""
    n = len(hidden_states) - 1
    parts = [hidden_states[hidden_state_index(p, n)] for p in points]
    return _gather(parts, positions)


def _gather(parts: list[torch.Tensor], positions: torch.Tensor | None) -> torch.Tensor:
    if positions is not None:
        rows = torch.arange(parts[0].shape[0], device=parts[0].device)
        parts = [h[rows, positions.to(h.device)] for h in parts]
    return torch.cat([p.float() for p in parts], dim=-1)


class HookRecorder:
    """Keeps the last forward call's tensors at `points` through steer.hooks (no copy of earlier
    calls): `features(positions)` concatenates them in point order."""

    def __init__(self, points: Sequence[str]):
        self.points = list(points)
        self.last: dict[str, torch.Tensor] = {}

    def hooks(self) -> dict:
        def make(point):
            def fn(value, ctx):
                self.last[point] = value.detach()
            return fn
        return {p: make(p) for p in self.points}

    def features(self, positions: torch.Tensor | None = None) -> torch.Tensor:
        missing = [p for p in self.points if p not in self.last]
        if missing:
            raise RuntimeError(f"no forward call recorded {missing}")
        return _gather([self.last[p] for p in self.points], positions)


@torch.no_grad()
def capture_features(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                     points: Sequence[str], positions: torch.Tensor | None = None,
                     backend: str = "hooks") -> torch.Tensor:
    """Features of one full forward pass ([B, F] at `positions`, else [B, T, F])."""
    validate_points(points, model)
    if attention_mask is not None:
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    else:
        position_ids = None
    if backend == "hidden_states":
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    output_hidden_states=True, use_cache=False)
        return from_hidden_states(out.hidden_states, points, positions)
    if backend != "hooks":
        raise ValueError(f"backend must be 'hooks' or 'hidden_states', not {backend!r}")
    from steer.hooks import attach

    rec = HookRecorder(points)
    with attach(model, rec.hooks()):
        model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    return rec.features(positions)
