"""Files of a report: JSON-ready values, strict JSON and text written atomically (temporary file + rename)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch


def jsonable(x: Any, digits: int = 6) -> Any:
    """Tensors, numpy values, dataclasses and paths to plain JSON types; floats to ``digits`` significant
    digits; NaN and infinities to None (JSON has no such numbers)."""
    if isinstance(x, torch.Tensor):
        return jsonable(x.detach().float().cpu().tolist() if x.is_floating_point() else x.cpu().tolist(), digits)
    if hasattr(x, "tolist") and not isinstance(x, (str, bytes)):  # numpy
        return jsonable(x.tolist(), digits)
    if isinstance(x, bool) or x is None or isinstance(x, (int, str)):
        return x
    if isinstance(x, float):
        return float(f"{x:.{digits}g}") if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): jsonable(v, digits) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v, digits) for v in x]
    if isinstance(x, Path):
        return str(x)
    if hasattr(x, "__dataclass_fields__"):
        return jsonable(asdict(x), digits)
    return str(x)


def _write_atomic(path: Path, write) -> None:
    """Write through a temporary file in the same folder, then rename: readers see the old or the new file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json_atomic(obj: Any, path: Path) -> None:
    """Write strict JSON (no NaN) to ``path`` atomically (temporary file + rename).

    Raises:
        ValueError: a NaN or infinity in ``obj`` (pass it through :func:`jsonable` first); the old
            file, if any, is left as it was.
    """
    text = json.dumps(obj, indent=1, ensure_ascii=False, allow_nan=False)
    _write_atomic(path, lambda f: f.write(text))


def write_text_atomic(text: str, path: Path) -> None:
    _write_atomic(path, lambda f: f.write(text))


def pearson(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """Pearson correlation of two tensors' flattened values; None when either is constant."""
    a, b = a.detach().double().flatten(), b.detach().double().flatten()
    a, b = a - a.mean(), b - b.mean()
    den = float(a.norm() * b.norm())
    return float((a * b).sum()) / den if den > 0 else None
