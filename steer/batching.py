"""Left-padded batches of token ids: the one padding routine of every method that batches prompts.

steer pads on the left so that the last position of every row is a real token (generation appends
there, and fingerprints and probes read it); hooks see which tokens are real through `token_mask`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids Long[B, T], attention mask Long[B, T]) with each row right-aligned, T = the longest row."""
    if not rows:
        raise ValueError("left_pad needs at least one row of token ids")
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if len(row):
            ids[i, width - len(row):] = torch.as_tensor(row, dtype=torch.long)
            mask[i, width - len(row):] = 1
    return ids, mask
