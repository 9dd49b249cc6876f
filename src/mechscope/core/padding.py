"""Right padding of token rows into one batch: the one helper behind every padded forward of teacher-forced
scores, fine-tuning batches and paired activations."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def right_pad(rows: Sequence[Sequence[int] | Tensor], pad_id: int = 0) -> tuple[Tensor, Tensor]:
    """Stack 1-D token rows of unequal length, right-padded.

    Args:
        rows: token ids per row (tensors or int sequences), at least one.
        pad_id: the value of padded positions.

    Returns:
        ``(ids, mask)``: int64 ``[len(rows), longest]`` each; ``mask`` is 1 on real tokens, 0 on padding.
    """
    rows = [r if isinstance(r, Tensor) else torch.as_tensor(list(r), dtype=torch.long) for r in rows]
    longest = max(r.numel() for r in rows)
    ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), longest, dtype=torch.long)
    for j, r in enumerate(rows):
        ids[j, : r.numel()] = r
        mask[j, : r.numel()] = 1
    return ids, mask


__all__ = ["right_pad"]
