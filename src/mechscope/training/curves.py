"""Training curves from ``metrics.jsonl``: one self-contained HTML page (plotly inlined, no network)."""

from __future__ import annotations

import json
from pathlib import Path

PANELS = (("mse", "reconstruction loss (MSE, normalised units)"), ("fvu", "FVU"), ("l0", "L0 (latents per token)"),
          ("dead_fraction", "dead latents (fraction)"))


def read_metrics(path: str | Path) -> list[dict]:
    """The lines of a metrics.jsonl file as dicts (an empty list if it does not exist)."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(ln) for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]


def curves_figure(rows: list[dict]):
    """A plotly figure: MSE, FVU, L0 and dead fraction against training tokens, one line per dictionary."""
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=2, cols=2, subplot_titles=[t for _, t in PANELS])
    names = sorted({r["name"] for r in rows})
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
    for i, (key, _) in enumerate(PANELS):
        for j, name in enumerate(names):
            pts = [(r["tokens"], r[key]) for r in rows if r["name"] == name and r.get(key) is not None]
            fig.add_scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], mode="lines", name=name,
                            legendgroup=name, showlegend=i == 0, line=dict(color=colors[j % len(colors)]),
                            row=i // 2 + 1, col=i % 2 + 1)
        fig.update_xaxes(title_text="training tokens", row=i // 2 + 1, col=i % 2 + 1)
    fig.update_yaxes(type="log", row=1, col=1)
    fig.update_layout(height=620, margin=dict(l=50, r=20, t=40, b=40), template="plotly_white")
    return fig


def write_training_curves(metrics_path: str | Path) -> str:
    """HTML text of the training-curves page for a run's metrics.jsonl."""
    fig = curves_figure(read_metrics(metrics_path))
    return fig.to_html(include_plotlyjs=True, full_html=True)
