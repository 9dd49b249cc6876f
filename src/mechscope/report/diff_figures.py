"""Figures of the model-diff report (:mod:`mechscope.report.diff`), as plotly dicts built from ``DiffResult.to_dict()``.

Every figure is drawn from the JSON-ready result alone, so the report re-renders from a saved diff.json:

- weights: ``||W_t - W_b||_F / ||W_b||_F`` per (layer, module kind) as a heatmap, and per layer as bars;
- activations: norm ratio, cosine and relative difference per layer at each vector site (``first_k`` and
  ``all`` windows as two lines), and the relative difference per head at each per-head site as heatmaps;
- logit lens: KL(P_tuned^L || P_base^L) per layer (nats per token);
- cross-model patching: the recovered share of the base-tuned metric gap per layer (one line per kind) or
  per head (a heatmap).

Strings that plotly draws (site and kind names) go through :func:`~mechscope.report.safety_figures.esc`.
"""

from __future__ import annotations

import re
from typing import Any

from mechscope.report.figures import heads_heatmap
from mechscope.report.layout import layout as _layout
from mechscope.report.safety_figures import COLOURS, esc

Fig = dict[str, Any]

#: What each activation metric is, for axis titles: (title, unit note, value of "no change").
METRIC_INFO: dict[str, tuple[str, str, float]] = {
    "norm_ratio": ("norm ratio ||a_t|| / ||a_b||", "ratio", 1.0),
    "cosine": ("cosine(a_t, a_b)", "1 = same direction", 1.0),
    "rel_diff": ("relative difference ||a_t - a_b|| / ||a_b||", "ratio", 0.0),
}
_LEGEND = {"orientation": "h", "y": -0.25, "yanchor": "top"}


def window_names(first_k: int, skip_first: bool) -> dict[str, str]:
    """Legend names of the ``first_k`` and ``all`` windows, saying which positions each holds."""
    lo = 1 if skip_first else 0
    return {"first_k": f"first {first_k} positions ({lo}..{lo + first_k - 1})",
            "all": "all positions" + (" but 0" if skip_first else "")}


def _layer_axis(n_layers: int) -> dict:
    ticks = {"dtick": 1} if n_layers <= 16 else {"dtick": 2}
    return {"title": {"text": "layer"}, "tickformat": "d", "range": [-0.5, max(n_layers, 1) - 0.5], **ticks}


def _value_axis(title: str, **kw) -> dict:
    """A y axis whose title moves clear of long tick labels (automargin)."""
    return {"title": {"text": title}, "automargin": True, "exponentformat": "e", **kw}


def _no_change_line(y: float) -> dict:
    return {"type": "line", "xref": "paper", "x0": 0, "x1": 1, "y0": y, "y1": y,
            "line": {"dash": "dot", "color": "#999", "width": 1}}


# -- weights ----------------------------------------------------------------------------------------------------
def layer_kinds(by_layer_kind: list[dict]) -> list[str]:
    """The module kinds present in some layer, in :data:`mechscope.diff.weights.KINDS` order (first seen order else)."""
    from mechscope.diff.weights import KINDS

    seen = list(dict.fromkeys(k for row in by_layer_kind for k in row))
    return [k for k in KINDS if k in seen] + [k for k in seen if k not in KINDS]


def weight_heatmap(by_layer_kind: list[dict]) -> Fig:
    """Heatmap of ``||dW||_F / ||W||_F`` per layer (rows, layer 0 at the bottom) and module kind (columns)."""
    kinds = layer_kinds(by_layer_kind)
    z, hover = [], []
    for L, row in enumerate(by_layer_kind):
        z.append([(row.get(k) or {}).get("relative") for k in kinds])
        hover.append([f"layer {L}, {esc(k)}<br>||dW||/||W|| = {_g(row[k].get('relative'))}<br>||dW|| = "
                      f"{_g(row[k].get('delta'))}, ||W|| = {_g(row[k].get('base'))}" if k in row else
                      f"layer {L}, {esc(k)}: absent" for k in kinds])
    n = len(by_layer_kind)
    return {"data": [{"type": "heatmap", "z": z, "x": list(range(len(kinds))), "y": list(range(n)),
                      "colorscale": "Viridis", "zmin": 0, "text": hover, "hoverinfo": "text",
                      "colorbar": {"thickness": 12, "title": {"text": "||dW||/||W||"}}}],
            "layout": _layout("Relative weight change by layer and module kind", height=max(320, 16 * n + 140),
                              xaxis={"title": {"text": "module kind"}, "tickvals": list(range(len(kinds))),
                                     "ticktext": [esc(k) for k in kinds], "tickangle": -30},
                              yaxis=_layer_axis(n), margin={"l": 60, "r": 20, "t": 48, "b": 90})}


def weight_bars(by_layer: list[dict]) -> Fig:
    """Bars of ``||dW||_F / ||W||_F`` per layer (all of a layer's parameters as one vector)."""
    x = list(range(len(by_layer)))
    y = [row.get("relative") for row in by_layer]
    text = [f"layer {L}: ||dW||/||W|| = {_g(r.get('relative'))} (||dW|| = {_g(r.get('delta'))}, "
            f"{r.get('n_params', '?')} tensors)" for L, r in enumerate(by_layer)]
    return {"data": [{"type": "bar", "x": x, "y": y, "text": text, "hoverinfo": "text", "textposition": "none",
                      "marker": {"color": COLOURS[0]}, "name": "||dW||/||W||"}],
            "layout": _layout("Relative weight change per layer", height=340, xaxis=_layer_axis(len(x)),
                              yaxis=_value_axis("||dW||_F / ||W||_F (ratio)", rangemode="tozero"))}


# -- activations ------------------------------------------------------------------------------------------------
def split_sites(windows: dict) -> tuple[dict[str, dict], dict[str, dict]]:
    """Group the activation stats by site kind: ``(vector, per_head)``, each {suffix: {window: {metric: per-layer}}}.

    ``windows`` is ``ActivationDiff.to_dict()["windows"]``: window -> site -> metric -> a float (vector site) or
    a list of floats (one per head). Per layer, the suffix's values are lists indexed by layer (None where
    the layer was not compared); sites outside ``blocks.{L}.`` are left out.
    """
    vector: dict[str, dict] = {}
    heads: dict[str, dict] = {}
    for w, sites in windows.items():
        for site, metrics in sites.items():
            m = re.fullmatch(r"blocks\.(\d+)\.(.+)", site)
            if not m:
                continue
            L, suffix = int(m.group(1)), m.group(2)
            for metric, v in metrics.items():
                target = heads if isinstance(v, list) else vector
                col = target.setdefault(suffix, {}).setdefault(w, {}).setdefault(metric, {})
                col[L] = v
    for group in (vector, heads):
        for per_w in group.values():
            for per_m in per_w.values():
                for metric, col in per_m.items():
                    n = max(col) + 1 if col else 0
                    per_m[metric] = [col.get(L) for L in range(n)]
    return vector, heads


def activation_lines(suffix: str, metric: str, per_window: dict[str, dict], names: dict[str, str]) -> Fig:
    """One metric at one vector site per layer, a line per window."""
    title, unit, neutral = METRIC_INFO.get(metric, (metric, "", 0.0))
    data = []
    for i, (w, per_m) in enumerate(per_window.items()):
        y = per_m.get(metric)
        if y is None:
            continue
        data.append({"type": "scatter", "mode": "lines+markers", "x": list(range(len(y))), "y": y,
                     "name": esc(names.get(w, w)), "line": {"color": COLOURS[i % len(COLOURS)],
                                                            "dash": "solid" if w == "all" else "dash"},
                     "hovertemplate": f"layer %{{x}}: %{{y:.4g}}<extra>{esc(names.get(w, w))}</extra>"})
    n = max((len(t["x"]) for t in data), default=0)
    return {"data": data, "layout": _layout(
        f"{esc(title)} at {esc(suffix)}", height=360, xaxis=_layer_axis(n),
        yaxis=_value_axis(f"{esc(metric)} ({esc(unit)})"), legend=_LEGEND,
        shapes=[_no_change_line(neutral)], margin={"l": 60, "r": 20, "t": 48, "b": 110})}


def head_heatmap(suffix: str, window_name: str, values: list, metric: str = "rel_diff") -> Fig:
    """A per-head metric at one per-head site as a [layer, head] heatmap (layer 0 at the bottom)."""
    title, unit, _ = METRIC_INFO.get(metric, (metric, "", 0.0))
    rows = [v if v is not None else [] for v in values]
    width = max((len(r) for r in rows), default=0)
    rows = [r + [None] * (width - len(r)) for r in rows]
    short = {"rel_diff": "Relative difference", "norm_ratio": "Norm ratio", "cosine": "Cosine"}.get(metric, title)
    fig = heads_heatmap(rows, f"{esc(short)} per head at {esc(suffix)}<br><sub>{esc(window_name)}</sub>",
                        height=max(320, 16 * len(rows) + 140))
    fig["data"][0]["colorbar"]["title"] = {"text": f"{esc(metric)} ({esc(unit)})"}
    fig["layout"]["yaxis"] = _layer_axis(len(rows))
    return fig


# -- logit lens and patching ------------------------------------------------------------------------------------
def lens_kl_figure(kl: list) -> Fig:
    """KL(P_tuned^L || P_base^L) of the logit lens per layer, in nats per token."""
    x = list(range(len(kl)))
    return {"data": [{"type": "scatter", "mode": "lines+markers", "x": x, "y": kl, "name": "KL",
                      "line": {"color": COLOURS[1]},
                      "hovertemplate": "layer %{x}: %{y:.4g} nats/token<extra></extra>"}],
            "layout": _layout("Logit-lens KL(P_tuned || P_base) per layer", height=340, xaxis=_layer_axis(len(x)),
                              yaxis=_value_axis("mean KL (nats/token)", rangemode="tozero"))}


def patching_lines(kinds: dict[str, dict]) -> Fig:
    """Recovered share of the base-tuned gap per layer, one line per patched kind."""
    data, n = [], 0
    for i, (k, v) in enumerate(kinds.items()):
        y = v.get("recovered") or []
        n = max(n, len(y))
        data.append({"type": "scatter", "mode": "lines+markers", "x": list(range(len(y))), "y": y, "name": esc(k),
                     "line": {"color": COLOURS[i % len(COLOURS)]},
                     "hovertemplate": f"{esc(k)}, layer %{{x}}: recovered %{{y:.3f}} of the gap<extra></extra>"})
    return {"data": data, "layout": _layout(
        "Cross-model patching: share of the gap recovered per layer", height=360, xaxis=_layer_axis(n),
        yaxis=_value_axis("recovered (fraction of m_b - m_t)"), legend=_LEGEND,
        shapes=[_no_change_line(0.0), _no_change_line(1.0)], margin={"l": 60, "r": 20, "t": 48, "b": 110})}


def patching_heads(kind: str, values: list) -> Fig:
    """Recovered share per head (one kind, e.g. z) as a diverging [layer, head] heatmap centred at 0."""
    fig = heads_heatmap(values, f"Patching {esc(kind)} per head<br><sub>share of the gap recovered</sub>",
                        colorscale="RdBu", zmid=0.0, height=max(320, 16 * len(values) + 140))
    fig["data"][0]["colorbar"]["title"] = {"text": "recovered (fraction)"}
    fig["layout"]["yaxis"] = _layer_axis(len(values))
    return fig


def _g(x, digits: int = 4) -> str:
    return "n/a" if not isinstance(x, (int, float)) or isinstance(x, bool) else f"{x:.{digits}g}"


__all__ = ["METRIC_INFO", "activation_lines", "head_heatmap", "layer_kinds", "lens_kl_figure", "patching_heads",
           "patching_lines", "split_sites", "weight_bars", "weight_heatmap", "window_names"]
