"""The report's plot style: one plotly layout shared by the report's figures and its sparse-dictionary section."""

from __future__ import annotations

from typing import Any

FONT = {"family": "system-ui, -apple-system, Segoe UI, Roboto, sans-serif", "size": 12}


def layout(title: str, **kw) -> dict[str, Any]:
    """A plotly layout with the report's title, font, margins and white background; ``kw`` overrides keys."""
    base = {
        "title": {"text": title, "x": 0.01, "xanchor": "left", "font": {"size": 14}},
        "font": FONT,
        "margin": {"l": 60, "r": 20, "t": 48, "b": 50},
        "paper_bgcolor": "#ffffff",
        "plot_bgcolor": "#ffffff",
        "hoverlabel": {"font": {"family": "ui-monospace, SFMono-Regular, Menlo, monospace"}},
    }
    base.update(kw)
    return base
