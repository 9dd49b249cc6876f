"""Figures of the safety report (:mod:`mechscope.report.safety`), as plotly dicts built from JSON-ready inputs.

A probe run (``ProbeRun.to_dict()`` plus the best probes' ``scores``) gives: AUROC and recall at the FPR by layer
with their bootstrap interval bands, the random-direction band and the shuffled-label markers; ROC curves of each
method's selected probe on the test split and on each transfer dataset, with the operating point at the probe's
threshold; and score histograms on each part with the threshold line. A monitored generation gives its score and
rule value by position. The token strips of the generations are HTML, not plotly (:func:`token_strip`).

Decision rule, as in :mod:`mechscope.safety.metrics`: positive iff score > threshold (strictly above).
Strings that plotly draws (site, method and dataset names, tokens) go through :func:`html.escape`, because
plotly reads a little HTML in names and hover text.
"""

from __future__ import annotations

import html
import math
import re
from typing import Any

from mechscope.core.errors import InputError
from mechscope.report.figures import visible
from mechscope.report.layout import layout as _layout

Fig = dict[str, Any]

#: Line colours of the methods, in the order they first appear in the sweep.
COLOURS = ("#2b5cab", "#d9480f", "#1b7f3b", "#8e44ad", "#b8860b", "#16a085", "#c2185b", "#5f6b7a")
#: Most bins of a score histogram (shared by every set of one figure; fewer for small sets, see histogram_figure).
N_BINS = 40
_GREY_BAND = "rgba(120,120,120,0.16)"
_LEGEND = {"orientation": "h", "y": -0.3, "yanchor": "top"}
_BELOW = {"l": 60, "r": 20, "t": 48, "b": 150}  # room for the x-axis title and a legend of up to 3 rows under it


def esc(s) -> str:
    """Text for plotly names and hover labels (which read a little HTML): every character shown as itself."""
    return html.escape(visible(str(s)), quote=False)


def natural_key(site: str) -> list:
    """Sort key of a site name with its numbers compared as numbers (``blocks.2`` before ``blocks.10``)."""
    return [int(t) if i % 2 else t for i, t in enumerate(re.split(r"(\d+)", site))]


def _rgba(hex_colour: str, alpha: float) -> str:
    r, g, b = (int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{alpha})"


def _r(x, digits: int = 6):
    """A float to ``digits`` significant digits (smaller files); None and non-finite values to None."""
    if x is None or not isinstance(x, (int, float)) or isinstance(x, bool):
        return None
    return float(f"{x:.{digits}g}") if math.isfinite(x) else None


# -- ROC ----------------------------------------------------------------------------------------------------------
def roc_points(scores, labels, *, drop_intermediate: bool = False) -> dict[str, list]:
    """The ROC curve of "positive iff score >= t" at every distinct score t, from the highest down.

    Tied scores move together (one point per distinct score), so the curve's trapezoid area equals the AUROC
    with ties counted 1/2 (:func:`mechscope.safety.metrics.auroc`). Same points as
    ``sklearn.metrics.roc_curve`` (whose ``drop_intermediate`` this mirrors).

    Args:
        scores: floats [n] (higher = positive class); labels: ints [n] in {0, 1}, both present.
        drop_intermediate: drop points on a straight segment between their neighbours (the curve is unchanged).

    Returns:
        ``{"fpr": [...], "tpr": [...], "thresholds": [...]}``, starting at (0, 0) with threshold None
        (nothing flagged) and ending at (1, 1); rates in [0, 1].

    Raises:
        InputError: lengths differ, labels not 0/1 or of one class, non-finite scores.
    """
    s = [float(x) for x in scores]
    y = list(labels)
    if len(s) != len(y):
        raise InputError(f"{len(s)} scores but {len(y)} labels; give one label per score.")
    if any(v not in (0, 1) or isinstance(v, float) and not v.is_integer() for v in y):
        raise InputError("labels must be 0 or 1 (1 = the positive class).")
    if not all(math.isfinite(v) for v in s):
        raise InputError("the scores hold NaN or infinite values; score finite activations.")
    n_pos = sum(1 for v in y if v == 1)
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise InputError(f"a ROC curve needs both classes, got {n_pos} positives and {n_neg} negatives.")
    order = sorted(range(len(s)), key=lambda i: -s[i])
    tps, fps, thr = [], [], []
    tp = fp = 0
    for k, i in enumerate(order):
        tp += y[i] == 1
        fp += y[i] == 0
        if k == len(order) - 1 or s[order[k + 1]] != s[i]:
            tps.append(tp)
            fps.append(fp)
            thr.append(s[i])
    keep = range(len(tps))
    if drop_intermediate and len(tps) > 2:  # sklearn's rule (before the origin is added): a second difference != 0
        keep = [0] + [j for j in range(1, len(tps) - 1)
                      if fps[j + 1] - 2 * fps[j] + fps[j - 1] or tps[j + 1] - 2 * tps[j] + tps[j - 1]] + [len(tps) - 1]
    return {"fpr": [0.0] + [fps[j] / n_neg for j in keep], "tpr": [0.0] + [tps[j] / n_pos for j in keep],
            "thresholds": [None] + [thr[j] for j in keep]}


def roc_area(fpr: list[float], tpr: list[float]) -> float:
    """Trapezoid area under a ROC curve given by its points in order."""
    return sum((fpr[i] - fpr[i - 1]) * (tpr[i] + tpr[i - 1]) / 2 for i in range(1, len(fpr)))


def operating_point(scores, labels, threshold: float) -> tuple[float, float]:
    """(FPR, TPR) of "positive iff score > threshold" (strictly above, the probes' rule)."""
    pos = [s for s, v in zip(scores, labels) if v == 1]
    neg = [s for s, v in zip(scores, labels) if v == 0]
    return sum(s > threshold for s in neg) / len(neg), sum(s > threshold for s in pos) / len(pos)


# -- the layer sweep ----------------------------------------------------------------------------------------------
def site_axis(sites: list[str]) -> tuple[list, dict]:
    """x values of the sites and the axis settings: layer numbers when every site is ``blocks.{L}.<one hook>``,
    else positions labelled with the site names."""
    m = [re.fullmatch(r"blocks\.(\d+)\.(.+)", s) for s in sites]
    if all(m) and len({x.group(2) for x in m}) == 1:
        layers = [int(x.group(1)) for x in m]
        ticks = {"tickvals": layers} if len(layers) <= 16 else {"tickformat": "d"}  # never a fractional layer
        return layers, {"title": {"text": f"layer ({esc(m[0].group(2))})"}, **ticks}
    xs = list(range(len(sites)))
    return xs, {"tickvals": xs, "ticktext": [esc(s) for s in sites], "tickangle": -30, "title": {"text": "site"}}


def _band(x, low, high, colour: str, name: str, group: str, show: bool) -> list[dict]:
    """An interval band: the upper edge (invisible), then the lower edge filled up to it ('tonexty')."""
    return [{"type": "scatter", "mode": "lines", "x": x, "y": high, "line": {"width": 0}, "hoverinfo": "skip",
             "showlegend": False, "legendgroup": group, "name": f"{name} (upper)"},
            {"type": "scatter", "mode": "lines", "x": x, "y": low, "line": {"width": 0}, "fill": "tonexty",
             "fillcolor": colour, "hoverinfo": "skip", "showlegend": show, "legendgroup": group, "name": name}]


def _ci_part(row: dict, metric: str, key: str):
    v = row.get(metric)
    return v.get(key) if isinstance(v, dict) else None


def sweep_figure(rows_by_method: dict[str, list[dict]], selected: dict[str, str], metric: str, title: str,
                 ytitle: str) -> Fig:
    """``metric`` (``auroc`` or ``recall``) by site for every method: the estimate, its interval as a band and the
    selected site starred; for AUROC also the random-direction mean ± 2 std (grey band), the shuffled-label
    AUROC (dotted markers), the validation AUROC when recorded and the chance line at 0.5.

    Args:
        rows_by_method: method -> its sweep rows in site order.
        selected: method -> the site whose probe the report reads (starred).
    """
    data: list[dict] = []
    sites = sorted({r["site"] for rows in rows_by_method.values() for r in rows}, key=natural_key)
    x, xaxis = site_axis(sites)
    at = dict(zip(sites, x))
    for k, (method, rows) in enumerate(rows_by_method.items()):
        colour, name = COLOURS[k % len(COLOURS)], esc(method)
        xs = [at[r["site"]] for r in rows]
        if metric == "auroc":
            mean = [r.get("random_auroc_mean") for r in rows]
            std = [r.get("random_auroc_std") for r in rows]
            ok = [m is not None and s is not None for m, s in zip(mean, std)]
            data += _band(xs, [m - 2 * s if o else None for m, s, o in zip(mean, std, ok)],
                          [m + 2 * s if o else None for m, s, o in zip(mean, std, ok)], _GREY_BAND,
                          "random directions, mean ± 2 std", "random", k == 0)
        data += _band(xs, [_ci_part(r, metric, "low") for r in rows], [_ci_part(r, metric, "high") for r in rows],
                      _rgba(colour, 0.18), f"{name} 95% interval", f"m{k}", False)
        est = [_ci_part(r, metric, "estimate") for r in rows]
        data.append({"type": "scatter", "mode": "lines+markers", "x": xs, "y": est, "name": name,
                     "legendgroup": f"m{k}", "line": {"color": colour}, "marker": {"size": 5},
                     "customdata": [[esc(r["site"]), _ci_part(r, metric, "low"), _ci_part(r, metric, "high")]
                                    for r in rows],
                     "hovertemplate": "%{customdata[0]}: %{y:.3f} [%{customdata[1]:.3f}, %{customdata[2]:.3f}]"
                                      f"<extra>{name}</extra>"})
        if metric == "auroc":
            shuf = [r.get("shuffled_auroc") for r in rows]
            if any(v is not None for v in shuf):
                data.append({"type": "scatter", "mode": "markers", "x": xs, "y": shuf, "legendgroup": f"m{k}",
                             "name": f"{name}: shuffled labels", "marker": {"color": colour, "symbol": "circle-open-dot",
                                                                            "size": 6, "opacity": 0.8},
                             "hovertemplate": "shuffled labels: %{y:.3f}<extra>" + name + "</extra>"})
            val = [r.get("validation_auroc") for r in rows]
            if any(v is not None for v in val):
                data.append({"type": "scatter", "mode": "lines", "x": xs, "y": val, "legendgroup": f"m{k}",
                             "name": f"{name}: validation", "line": {"color": colour, "dash": "dot", "width": 1},
                             "hovertemplate": "validation AUROC: %{y:.3f}<extra>" + name + "</extra>"})
        site = selected.get(method)
        if site in at:
            row = next(r for r in rows if r["site"] == site)
            data.append({"type": "scatter", "mode": "markers", "x": [at[site]], "y": [_ci_part(row, metric, "estimate")],
                         "name": f"{name}: selected ({esc(site)})", "legendgroup": f"m{k}", "showlegend": False,
                         "marker": {"symbol": "star", "size": 14, "color": colour, "line": {"color": "#1d2330", "width": 1}},
                         "hovertemplate": f"selected: {esc(site)}<br>%{{y:.3f}}<extra>{name}</extra>"})
    shapes = []
    if metric == "auroc":
        shapes.append({"type": "line", "xref": "paper", "x0": 0, "x1": 1, "y0": 0.5, "y1": 0.5,
                       "line": {"color": "#5f6b7a", "dash": "dash", "width": 1}})
    return {"data": data, "layout": _layout(title, height=470, hovermode="closest", xaxis=xaxis, shapes=shapes,
                                            yaxis={"title": {"text": ytitle}, "range": [-0.02, 1.02]},
                                            legend=_LEGEND, margin=_BELOW)}


# -- ROC curves and histograms of the selected probes ---------------------------------------------------------------
def part_name(part: str) -> str:
    """A scores part as the report names it: ``transfer:deception`` -> ``deception (transfer)``."""
    return f"{part.split(':', 1)[1]} (transfer)" if part.startswith("transfer:") else part


def roc_figure(curves: list[dict], part: str) -> Fig:
    """ROC curves on one part, one per method: ``curves`` = [{"method", "colour", "roc", "auroc", "point",
    "threshold"}] with ``point`` the (FPR, TPR) at the threshold (or None)."""
    data = [{"type": "scatter", "mode": "lines", "x": [0, 1], "y": [0, 1], "name": "chance",
             "line": {"color": "#8a94a6", "dash": "dash", "width": 1}, "hoverinfo": "skip"}]
    for c in curves:
        name = esc(c["method"])
        data.append({"type": "scatter", "mode": "lines", "x": [_r(v) for v in c["roc"]["fpr"]],
                     "y": [_r(v) for v in c["roc"]["tpr"]], "line": {"color": c["colour"], "shape": "linear"},
                     "name": f"{name} (AUROC {c['auroc']:.3f})", "legendgroup": name,
                     "hovertemplate": "FPR %{x:.3f}, TPR %{y:.3f}<extra>" + name + "</extra>"})
        if c["point"] is not None:
            fx, ty = c["point"]
            data.append({"type": "scatter", "mode": "markers", "x": [fx], "y": [ty], "legendgroup": name,
                         "name": f"{name}: threshold {c['threshold']:.3g}", "showlegend": False,
                         "marker": {"symbol": "x", "size": 11, "color": c["colour"], "line": {"width": 1}},
                         "hovertemplate": f"threshold {c['threshold']:.4g} (score above it flagged)<br>"
                                          "FPR %{x:.3f}, recall %{y:.3f}<extra>" + name + "</extra>"})
    return {"data": data, "layout": _layout(
        f"ROC on {esc(part_name(part))} (× = the threshold)", height=400, hovermode="closest",
        xaxis={"title": {"text": "false-positive rate"}, "range": [-0.01, 1.01], "constrain": "domain"},
        yaxis={"title": {"text": "true-positive rate (recall)"}, "range": [-0.01, 1.01], "scaleanchor": "x"},
        legend={"x": 0.98, "xanchor": "right", "y": 0.02, "yanchor": "bottom", "bgcolor": "rgba(255,255,255,0.8)"})}


def _histogram(values: list[float], edges: list[float]) -> list[float]:
    """Share of ``values`` in each bin [e_i, e_i+1) (the last bin closed)."""
    n_bins, lo, width = len(edges) - 1, edges[0], (edges[-1] - edges[0]) / (len(edges) - 1)
    counts = [0] * n_bins
    for v in values:
        counts[min(n_bins - 1, max(0, int((v - lo) / width)))] += 1
    return [c / len(values) for c in counts] if values else counts


def histogram_figure(method: str, site: str, sets: list[tuple[str, list[float], str, str]],
                     threshold: float | None) -> Fig:
    """Score histograms of one probe, one step line per set (the share of the set in each bin, so sets of any
    size compare), on bins shared by every set (2 sqrt(n) of the smallest set, 10 to :data:`N_BINS`); the
    threshold as a vertical line.

    Args:
        sets: [(name, scores, colour, dash)].
    """
    every = [v for _, vals, _, _ in sets for v in vals] + ([threshold] if threshold is not None else [])
    lo, hi = min(every), max(every)
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    pad = (hi - lo) * 1e-9
    n_bins = max(10, min(N_BINS, round(2 * math.sqrt(min(len(vals) for _, vals, _, _ in sets)))))
    edges = [lo + (hi + pad - lo) * i / n_bins for i in range(n_bins + 1)]
    data = []
    for name, vals, colour, dash in sets:
        share = _histogram(vals, edges)
        data.append({"type": "scatter", "mode": "lines", "x": [_r(e) for e in edges], "y": [_r(v) for v in share + share[-1:]],
                     "line": {"shape": "hv", "color": colour, "dash": dash, "width": 2},
                     "name": f"{esc(name)} (n = {len(vals)})",
                     "hovertemplate": "score ≥ %{x:.3g}: %{y:.3f} of the set<extra>" + esc(name) + "</extra>"})
    shapes, notes = [], []
    if threshold is not None:
        shapes.append({"type": "line", "yref": "paper", "x0": threshold, "x1": threshold, "y0": 0, "y1": 1,
                       "line": {"color": "#b3261e", "dash": "dash", "width": 2}})
        notes.append({"x": threshold, "y": 1, "yref": "paper", "text": f"threshold {threshold:.3g}", "showarrow": False,
                      "xanchor": "left", "yanchor": "bottom", "font": {"color": "#b3261e"}})
    return {"data": data, "layout": _layout(
        f"{esc(method)} at {esc(site)}: scores by set", height=440, hovermode="closest", shapes=shapes,
        annotations=notes, xaxis={"title": {"text": "probe score (logit units)"}},
        yaxis={"title": {"text": "share of the set per bin"}}, legend=_LEGEND, margin=_BELOW)}


# -- monitored generations ------------------------------------------------------------------------------------------
def _colour(score: float, threshold: float, scale: float) -> str:
    """Diverging colour centred at the threshold: red above, blue below, stronger the farther."""
    d = max(-1.0, min(1.0, (score - threshold) / scale))
    rgb = (178, 24, 43) if d > 0 else (33, 102, 172)
    return f"rgba({rgb[0]},{rgb[1]},{rgb[2]},{0.08 + 0.72 * abs(d):.3f})"


def _robust(values, q: float) -> float:
    """The q-quantile of ``values`` (nearest rank; 0.0 for none)."""
    v = sorted(values)
    return v[int(q * (len(v) - 1))] if v else 0.0


def token_strip(g: dict) -> list[dict]:
    """The tokens of a checked generation (:func:`check_generation`) as spans: ``{"text", "bg", "prompt",
    "alarm", "title"}``; the colour scale is per generation, full from the 95th percentile of
    ``|score - threshold|`` (one outlier, such as a chat's first token at hundreds of logits, would otherwise
    wash out every other token)."""
    thr, scores = g["threshold"], g["scores"]
    scale = _robust([abs(s - thr) for s in scores], 0.95) or 1.0
    alarms = {a["position"] for a in g["alarms"]}
    out = []
    for i, (text, s) in enumerate(zip(g["token_strings"], scores)):
        where = "prompt" if i < g["prompt_len"] else "generated"
        out.append({"text": text, "bg": _colour(s, thr, scale), "prompt": i < g["prompt_len"], "alarm": i in alarms,
                    "title": f"position {i} ({where}) · score {float(s)!r}" + (" · alarm" if i in alarms else "")})
    return out


def check_generation(g: dict, i: int) -> dict:
    """A monitored generation's dict with its lengths checked and ``token_strings`` / ``threshold`` filled in
    (token ids shown as ``#id`` without strings; the alarms' threshold without one).

    Raises:
        InputError: not a dict, missing keys, scores or token strings not one per token, no threshold anywhere.
    """
    fix = "give MonitoredGeneration.to_dict() plus 'token_strings' and 'threshold' (as `mechscope` monitor writes)"
    if not isinstance(g, dict) or any(k not in g for k in ("tokens", "scores", "prompt_len")):
        raise InputError(f"generation {i} is not a monitored generation (needs tokens, scores, prompt_len); {fix}.")
    n = len(g["tokens"])
    strings = g.get("token_strings")
    if strings is None:
        strings = [f"#{t}" for t in g["tokens"]]
    if not all(isinstance(s, (int, float)) and math.isfinite(s) for s in g["scores"]):
        raise InputError(f"generation {i}: its scores hold missing or non-finite values; score finite activations.")
    if len(g["scores"]) != n or len(strings) != n:
        raise InputError(f"generation {i}: {len(g['scores'])} scores and {len(strings)} token strings for {n} tokens; "
                         f"both must cover prompt and continuation, one per token; {fix}.")
    alarms = list(g.get("alarms") or [])
    thr = g.get("threshold", alarms[0].get("threshold") if alarms else None)
    if thr is None:
        raise InputError(f"generation {i} has no threshold; {fix}.")
    return {**g, "token_strings": [str(s) for s in strings], "threshold": float(thr), "alarms": alarms,
            "values": list(g.get("values") or [])}


def generation_figure(g: dict) -> Fig:
    """Score and rule value of a checked generation by position, the threshold and the prompt's end marked."""
    n, thr = len(g["tokens"]), g["threshold"]
    x = list(range(n))
    toks = [esc(t) for t in g["token_strings"]]
    vals = g["values"]
    vx = list(range(n - len(vals), n))  # the rule considered the last len(values) tokens
    rule = esc(g.get("rule") or "rule")
    data = [{"type": "scatter", "mode": "lines+markers", "x": x, "y": [_r(s) for s in g["scores"]], "name": "score",
             "text": toks, "marker": {"size": 4}, "line": {"color": "#8a94a6", "width": 1},
             "hovertemplate": "%{x}: %{text}<br>score %{y:.3f}<extra></extra>"},
            {"type": "scatter", "mode": "lines", "x": vx, "y": [_r(v) for v in vals], "name": f"{rule} value",
             "line": {"color": "#2b5cab", "width": 2}, "text": toks[n - len(vals):],
             "hovertemplate": "%{x}: %{text}<br>" + rule + " %{y:.3f}<extra></extra>"}]
    if g["alarms"]:
        data.append({"type": "scatter", "mode": "markers", "x": [a["position"] for a in g["alarms"]],
                     "y": [a.get("value") for a in g["alarms"]], "name": "alarm",
                     "marker": {"symbol": "x", "size": 11, "color": "#b3261e"},
                     "hovertemplate": "alarm at %{x}: %{y:.3f}<extra></extra>"})
    shapes = [{"type": "line", "xref": "paper", "x0": 0, "x1": 1, "y0": thr, "y1": thr,
               "line": {"color": "#b3261e", "dash": "dash", "width": 1.5}}]
    if 0 < g["prompt_len"] < n:
        shapes.append({"type": "line", "yref": "paper", "x0": g["prompt_len"] - 0.5, "x1": g["prompt_len"] - 0.5,
                       "y0": 0, "y1": 1, "line": {"color": "#5f6b7a", "dash": "dot", "width": 1}})
    # the y range leaves out scores more than 3 IQR beyond the quartiles (a chat's first token can sit hundreds
    # of logits below the rest and flatten every other point); the rule's values, alarms and threshold always show
    shown = [v for v in vals if math.isfinite(v)] + [thr] + [a["value"] for a in g["alarms"] if a.get("value") is not None]
    q1, q3 = _robust(g["scores"], 0.25), _robust(g["scores"], 0.75)
    lo = min([max(min(g["scores"]), q1 - 3 * (q3 - q1)), *shown])
    hi = max([min(max(g["scores"]), q3 + 3 * (q3 - q1)), *shown])
    pad = 0.05 * (hi - lo) or 1.0
    clipped = sum(s < lo or s > hi for s in g["scores"])
    title = f"Score and {rule} value by position (threshold {thr:.3g}; the prompt ends at the dotted line)"
    if clipped:
        title += f"; {clipped} outlying score(s) off the axis"
    return {"data": data, "layout": _layout(
        title, height=300,
        hovermode="closest", shapes=shapes, xaxis={"title": {"text": "position"}},
        yaxis={"title": {"text": "logit units"}, "range": [lo - pad, hi + pad]}, legend={"orientation": "h", "y": -0.3},
        margin={"l": 60, "r": 20, "t": 48, "b": 80})}


__all__ = ["COLOURS", "N_BINS", "check_generation", "esc", "generation_figure", "histogram_figure", "natural_key",
           "operating_point", "part_name", "roc_area", "roc_figure", "roc_points", "site_axis", "sweep_figure",
           "token_strip"]
