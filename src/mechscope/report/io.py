"""Files of a report: JSON-ready values, strict JSON and text written atomically (temporary file + rename)."""

from __future__ import annotations

import torch

from mechscope.core.io import jsonable, write_json_atomic, write_text_atomic  # noqa: F401 (re-exported)


def pearson(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """Pearson correlation of two tensors' flattened values; None when either is constant."""
    a, b = a.detach().double().flatten(), b.detach().double().flatten()
    a, b = a - a.mean(), b - b.mean()
    den = float(a.norm() * b.norm())
    return float((a * b).sum()) / den if den > 0 else None
