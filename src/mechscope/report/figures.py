"""Plotly figure specifications (plain dicts: ``{"data": [...], "layout": {...}}``) built from results.json.

Every figure is made from the JSON-ready results alone, so a report can be re-rendered from a saved
results.json. Axes with labels that may repeat (token strings) are numeric with tick text, because a
categorical plotly axis merges equal labels.
"""

from __future__ import annotations

from typing import Any

from mechscope.report.layout import layout as _layout

Fig = dict[str, Any]

_DIVERGING = "RdBu"


def visible(token: str) -> str:
    """A token made visible on an axis or in hover text (newlines and tabs as escapes)."""
    return token.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")


def head_label(layer: int, head: int) -> str:
    return f"L{layer}H{head}"


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def heads_heatmap(values: list, title: str, *, colorscale: str = "Viridis", zmid: float | None = None,
                  zmin: float | None = None, zmax: float | None = None, height: int = 620, unit: str = "") -> Fig:
    """Heatmap of a [n_layers, n_heads] matrix, layer 0 at the bottom."""
    n_layers, n_heads = len(values), len(values[0]) if values else 0
    hover = [[f"{head_label(layer, h)}: {_fmt(values[layer][h])}{unit}" for h in range(n_heads)] for layer in range(n_layers)]
    trace = {
        "type": "heatmap", "z": values, "x": list(range(n_heads)), "y": list(range(n_layers)),
        "colorscale": colorscale, "text": hover, "hoverinfo": "text", "colorbar": {"thickness": 12},
    }
    if zmid is not None:
        trace["zmid"] = zmid
    if zmin is not None:
        trace["zmin"] = zmin
    if zmax is not None:
        trace["zmax"] = zmax
    return {"data": [trace], "layout": _layout(
        title, height=height,
        xaxis={"title": {"text": "head"}, "dtick": 1},
        yaxis={"title": {"text": "layer"}, "dtick": 2},
    )}


def lens_figure(lens: dict) -> Fig:
    """Target probability (left axis) and rank (right axis, log) by layer."""
    x = list(range(len(lens["labels"])))
    target = visible(str(lens.get("target_token")))
    data = [
        {"type": "scatter", "mode": "lines+markers", "name": f"p({target!r})", "x": x, "y": lens["target_prob"],
         "hovertemplate": "%{text}: p=%{y:.3f}<extra></extra>", "text": lens["labels"]},
        {"type": "scatter", "mode": "lines+markers", "name": "rank (right, log)", "x": x,
         "y": [r + 1 for r in lens["target_rank"]], "yaxis": "y2", "line": {"dash": "dot"},
         "hovertemplate": "%{text}: rank %{customdata}<extra></extra>", "text": lens["labels"],
         "customdata": lens["target_rank"]},
    ]
    return {"data": data, "layout": _layout(
        f"p({target!r}) and its rank by layer", height=380,
        xaxis={"title": {"text": "layer (residual stream after the block)"}, "dtick": 2},
        yaxis={"title": {"text": "probability"}, "range": [0, 1.02]},
        yaxis2={"title": {"text": "rank (log scale)"}, "overlaying": "y", "side": "right", "type": "log",
                "tickvals": [1, 2, 11, 101, 1001, 10001], "ticktext": ["0", "1", "10", "100", "1000", "10000"],
                "showgrid": False},
        legend={"x": 0.01, "y": 0.98, "bgcolor": "rgba(255,255,255,0.7)"},
        margin={"l": 60, "r": 80, "t": 48, "b": 50},
    )}


def repeat_loss_figure(loss: dict) -> Fig:
    y = loss["per_position"]
    return {"data": [{"type": "scatter", "mode": "lines", "x": list(range(len(y))), "y": y, "name": "loss",
                      "hovertemplate": "position %{x}: %{y:.2f} nats<extra></extra>"}],
            "layout": _layout("Loss per position on repeated random tokens", height=300,
                              xaxis={"title": {"text": "position"}}, yaxis={"title": {"text": "loss (nats)"}},
                              shapes=[{"type": "line", "x0": loss["repeat_start"], "x1": loss["repeat_start"],
                                       "yref": "paper", "y0": 0, "y1": 1, "line": {"dash": "dash", "color": "#888"}}])}


def ioi_distribution_figure(ioi: dict) -> Fig:
    """Per-prompt logit difference, clean and corrupted, as box plots with every point."""
    prompts = [visible(p) for p in ioi["prompts"]]
    corrupt = [visible(p) for p in ioi["corrupt_prompts"]]
    data = [
        {"type": "box", "name": "clean", "y": ioi["logit_diff"], "boxpoints": "all", "jitter": 0.4, "pointpos": 0,
         "text": prompts, "hovertemplate": "%{text}<br>logit diff %{y:.2f}<extra></extra>", "marker": {"size": 5}},
        {"type": "box", "name": "corrupted", "y": ioi["corrupt_logit_diff"], "boxpoints": "all", "jitter": 0.4,
         "pointpos": 0, "text": corrupt, "hovertemplate": "%{text}<br>logit diff %{y:.2f}<extra></extra>",
         "marker": {"size": 5}},
    ]
    return {"data": data, "layout": _layout(
        "Logit difference per prompt", height=420, showlegend=False,
        yaxis={"title": {"text": "logit difference (nats)"}, "zeroline": True},
    )}


def dla_layers_figure(dla: dict) -> Fig:
    x = list(range(len(dla["attn"])))
    data = [
        {"type": "bar", "name": "attention", "x": x, "y": dla["attn"]},
        {"type": "bar", "name": "MLP", "x": x, "y": dla["mlp"]},
    ]
    return {"data": data, "layout": _layout(
        "Direct logit attribution by layer", height=360,
        barmode="group", xaxis={"title": {"text": "layer"}, "dtick": 2},
        yaxis={"title": {"text": "logit difference (nats)"}}, legend={"x": 0.01, "y": 0.98, "bgcolor": "rgba(255,255,255,0.7)"},
    )}


def resid_patching_figure(p: dict) -> Fig:
    values = p["values"]
    rows, cols = p["row_labels"], [visible(c) for c in p["col_labels"]]
    hover = [[f"{rows[i]}, position {j} {cols[j]!r}: {_fmt(values[i][j])}" for j in range(len(cols))] for i in range(len(rows))]
    return {"data": [{
        "type": "heatmap", "z": values, "x": list(range(len(cols))), "y": list(range(len(rows))),
        "colorscale": _DIVERGING, "zmid": 0, "text": hover, "hoverinfo": "text",
        "colorbar": {"thickness": 12, "title": {"text": "restored"}},
    }], "layout": _layout(
        "Residual stream (resid_pre) by layer and position", height=640,
        xaxis={"title": {"text": "position"}, "tickvals": list(range(len(cols))), "ticktext": cols, "tickangle": -45},
        yaxis={"title": {"text": "layer (resid_pre)"}, "dtick": 2},
        margin={"l": 60, "r": 20, "t": 48, "b": 110},
    )}


def layer_patching_figure(attn: dict, mlp: dict) -> Fig:
    x = list(range(len(attn["values"])))
    data = [
        {"type": "scatter", "mode": "lines+markers", "name": "attn_out", "x": x, "y": attn["values"]},
        {"type": "scatter", "mode": "lines+markers", "name": "mlp_out", "x": x, "y": mlp["values"]},
    ]
    return {"data": data, "layout": _layout(
        "Attention and MLP outputs by layer (all positions)",
        height=360, xaxis={"title": {"text": "layer"}, "dtick": 2}, yaxis={"title": {"text": "restored"}},
        legend={"x": 1.0, "xanchor": "right", "y": 1.0, "bgcolor": "rgba(255,255,255,0.7)"},
    )}


def attribution_scatter_figure(act: list, attr: list, r: float | None) -> Fig:
    """Attribution patching (x) against activation patching (y), one point per head."""
    xs, ys, labels = [], [], []
    for layer, (row_a, row_b) in enumerate(zip(act, attr)):
        for h, (a, b) in enumerate(zip(row_a, row_b)):
            if a is not None and b is not None:
                xs.append(b)
                ys.append(a)
                labels.append(head_label(layer, h))
    lo = min(xs + ys + [0.0])
    hi = max(xs + ys + [0.0])
    r_txt = "n/a" if r is None else f"{r:.3f}"
    return {"data": [
        {"type": "scatter", "mode": "markers", "x": xs, "y": ys, "text": labels, "name": "heads",
         "hovertemplate": "%{text}<br>attribution %{x:.3f}<br>activation %{y:.3f}<extra></extra>",
         "marker": {"size": 6, "opacity": 0.75}},
        {"type": "scatter", "mode": "lines", "x": [lo, hi], "y": [lo, hi], "name": "y = x",
         "line": {"dash": "dot", "color": "#999"}, "hoverinfo": "skip"},
    ], "layout": _layout(
        f"Heads: attribution vs activation (r = {r_txt})", height=460,
        xaxis={"title": {"text": "attribution patching (linear estimate)"}},
        yaxis={"title": {"text": "activation patching"}}, showlegend=False,
    )}


def build_figures(results: dict) -> dict[str, Fig]:
    """All figures of the report, keyed by the id of the element each is drawn into."""
    figs: dict[str, Fig] = {}
    lens = results.get("logit_lens")
    if lens and lens.get("target_prob") is not None:
        figs["fig-lens"] = lens_figure(lens)
    hs = results.get("head_scores")
    if hs:
        titles = {"induction": "Induction score", "previous_token": "Previous-token score",
                  "duplicate_token": "Duplicate-token score"}
        for kind, values in hs["scores"].items():
            figs[f"fig-heads-{kind}"] = heads_heatmap(values, titles.get(kind, kind), zmin=0.0, zmax=1.0)
        if hs.get("repeat_loss"):
            figs["fig-repeat-loss"] = repeat_loss_figure(hs["repeat_loss"])
    ioi = results.get("ioi")
    if ioi:
        figs["fig-ioi-dist"] = ioi_distribution_figure(ioi)
        dla = ioi.get("dla")
        if dla:
            figs["fig-dla-heads"] = heads_heatmap(dla["heads"], "Direct logit attribution per head (nats)",
                                                  colorscale=_DIVERGING, zmid=0.0, unit=" nats")
            figs["fig-dla-layers"] = dla_layers_figure(dla)
    pt = results.get("patching")
    if pt:
        act = pt["activation"]
        if "resid_pre" in act:
            figs["fig-patch-resid"] = resid_patching_figure(act["resid_pre"])
        if "attn_out" in act and "mlp_out" in act:
            figs["fig-patch-layers"] = layer_patching_figure(act["attn_out"], act["mlp_out"])
        if "heads" in act:
            figs["fig-patch-heads"] = heads_heatmap(act["heads"]["values"], "Heads (hook_z, all positions)",
                                                    colorscale=_DIVERGING, zmid=0.0)
            attr = pt.get("attribution", {}).get("heads")
            if attr:
                figs["fig-attr-scatter"] = attribution_scatter_figure(
                    act["heads"]["values"], attr["values"], pt.get("correlation", {}).get("heads"))
    if results.get("sae"):
        from mechscope.report.sae import sae_figures

        figs.update(sae_figures(results["sae"]))
    if results.get("circuits"):
        from mechscope.report.circuit_section import circuit_figures

        figs.update(circuit_figures(results["circuits"]))
    return figs
