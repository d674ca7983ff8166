"""Step 2 of LYNX: the probe's input is the hidden state at the cue token from several layers,
concatenated in a fixed order.

Points use steer's canonical names: "blocks.{L}.resid_post" (output of decoder layer L) and
"final_norm.out" (the post-final-norm state that feeds lm_head). The released code takes layers at
about 30/50/75% depth plus the final post-norm state; `default_points` does the same.

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

DEFAULT_DEPTHS: tuple[float, ...] = (0.30, 0.50, 0.75)  # LYNX code: ~30/50/75% depth + final norm
FINAL = "final_norm.out"
_BLOCK = re.compile(r"^blocks\.(\d+)\.resid_post$")


def num_layers(model) -> int:
    return int(model.config.get_text_config(decoder=True).num_hidden_layers)


def default_points(model_or_layers, depths: Sequence[float] = DEFAULT_DEPTHS, final: bool = True) -> list[str]:
    """Canonical points at `depths` (fractions of depth) plus the final post-norm state.

    Depth f means hidden_states index k = floor(f * n + 0.5), i.e. block k-1."""
    n = model_or_layers if isinstance(model_or_layers, int) else num_layers(model_or_layers)
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
