"""What every toy reproduction returns: one JSON-ready result dict, rendered by ``mechscope.report.toys``.

A result holds the paper's numbers beside ours (``comparisons``), plotly figure specifications (plain
dicts), the settings and seed that reproduce it, and the runtime on this machine::

    {"toy", "title", "paper": {"cite", "url"}, "seed", "settings", "metrics", "comparisons":
     [{"quantity", "paper", "ours", "note"}], "figures": [{"id", "title", "caption", "fig"}], "notes",
     "command", "date", "runtime_s", "machine", "version"}
"""

from __future__ import annotations

import datetime as _dt
import os
import random
import time
from typing import Any

import torch

from mechscope.core.io import jsonable
from mechscope.core.machine import cpu_model

REQUIRED = ("toy", "title", "paper", "seed", "settings", "metrics", "comparisons", "figures", "notes", "command")


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python's and torch's global generators; returns a fresh ``torch.Generator`` seeded with ``seed``."""
    random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def machine(device: str = "cpu") -> str:
    """A short description of what a run used: the GPU's name for a CUDA ``device``, else the CPU model,
    its cores and torch's thread count."""
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(dev.index or 0)
    cpu = cpu_model()
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def figure(fig_id: str, title: str, data: list[dict], layout: dict | None = None, caption: str = "") -> dict:
    """One figure entry: a plotly spec with mechscope's layout defaults."""
    base = {"title": {"text": title, "x": 0.01, "xanchor": "left", "font": {"size": 14}},
            "margin": {"l": 60, "r": 20, "t": 48, "b": 50}, "paper_bgcolor": "#ffffff", "plot_bgcolor": "#ffffff",
            "font": {"family": "system-ui, -apple-system, Segoe UI, Roboto, sans-serif", "size": 12}}
    base.update(layout or {})
    return {"id": fig_id, "title": title, "caption": caption, "fig": {"data": data, "layout": base}}


def finish(result: dict[str, Any], t0: float) -> dict[str, Any]:
    """Add date, runtime (seconds since ``t0``, a ``time.perf_counter()`` value), machine and version, and
    return the result as plain JSON types.

    Raises:
        KeyError: a required key (see the module docstring) is missing: a bug in the toy.
    """
    import mechscope

    missing = [k for k in REQUIRED if k not in result]
    if missing:
        raise KeyError(f"toy result lacks {missing}")
    result = dict(result, date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                  runtime_s=time.perf_counter() - t0,
                  machine=machine(str(result["settings"].get("device", "cpu"))), version=mechscope.__version__)
    return jsonable(result)
