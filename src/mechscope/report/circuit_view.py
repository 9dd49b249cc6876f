"""What a circuit page draws, from an ``evaluation.json`` alone: figures, node details and tables as JSON.

The page (:mod:`mechscope.report.circuit`) and the web app's ``/circuit`` (:mod:`mechscope.app`) draw this same
view. What it shows: the circuit as a layered graph (x = layer, the input on the left, the logits on the right;
a layer's heads stacked by index, its MLP below them; a key/value head of a grouped-query model is a small
diamond left of its layer, which its query heads read). Edges are drawn with a width that grows with
|score|, coloured by the score's sign, dashed by the edge's type (into a query, key, value, MLP or the
logits). Hovering a node or an edge's midpoint shows its numbers; clicking a node lists its edges with their
scores and, when head roles were computed, its IOI class and the evidence for it. Then the faithfulness
with its interval and the ablation that gave it, MIB's faithfulness curves with their interval bands and
CPR / CMD, the robustness table and the role table.

Hover text goes through :func:`html.escape` (plotly reads a little HTML in labels), so every string shows as
itself.
"""

from __future__ import annotations

import html
import math
from pathlib import Path

from mechscope.report.layout import layout as _layout

#: Edges drawn at most (the strongest by |score|); the rest are counted in a note.
MAX_DRAWN_EDGES = 2000
#: Nodes labelled on the graph (the largest sums of |score| over their edges; the input and logits always).
MAX_LABELS = 16
KINDS = {"q": ("solid", "into a query"), "k": ("dash", "into a key"), "v": ("dot", "into a value"),
         "mlp": ("dashdot", "into an MLP"), "logits": ("longdash", "into the logits")}
SIGN_COLOURS = {"neg": "#2b5cab", "pos": "#d9480f", "none": "#8a94a6"}
TYPE_COLOURS = {"input": "#4d4d4d", "head": "#4c78a8", "mlp": "#f58518", "logits": "#1d2330", "kv": "#9ecae9"}
TYPE_NAMES = {"head": "attention head", "mlp": "MLP", "kv": "key/value head (read by a group of query heads)",
              "input": "token embeddings", "logits": "final residual stream"}
ROLE_COLOURS = {"name mover": "#1b7f3b", "negative name mover": "#b3261e", "s suppression": "#8e44ad",
                "s-inhibition": "#e67e22", "induction": "#2980b9", "duplicate token": "#16a085",
                "previous token": "#7f8c8d", "unclassified": "#bdc3c7"}


def _esc(s) -> str:
    """Text for plotly hover labels (which read a little HTML): every character shown as itself."""
    return html.escape(str(s), quote=False).replace("\n", "\\n")


def _num(x, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:+.{digits}f}"


def _ci(d: dict | None, digits: int = 3) -> str:
    if not d or d.get("estimate") is None:
        return "n/a"
    if d.get("low") is None:
        return f"{d['estimate']:.{digits}f}"
    return f"{d['estimate']:.{digits}f} [{d['low']:.{digits}f}, {d['high']:.{digits}f}]"


# -- positions ----------------------------------------------------------------------------------------------------
def receiver_node(receiver: str, kind: str) -> str:
    """The node an edge into ``receiver`` is drawn into: a key/value head ``a{L}.kv{G}`` (grouped-query models),
    else the reading node (a head for its query, key and value, an MLP, the logits)."""
    return receiver.split("<")[0]  # a{L}.kv{G}<k> -> a{L}.kv{G}; a{L}.h{H}<q|k|v> -> a{L}.h{H}


def group_heads(kv: str, shape: dict) -> list[str]:
    """The query heads that read a key/value head ``a{L}.kv{G}``."""
    rep = shape["n_heads"] // shape["n_kv_heads"]
    layer, g = kv[1:].split(".kv")
    return [f"a{layer}.h{h}" for h in range(int(g) * rep, (int(g) + 1) * rep)]


def node_position(name: str, shape: dict) -> tuple[float, float]:
    """(x, y) of a node: x the layer (input -1, logits n_layers, an MLP right of its heads, a key/value head left
    of them); y the head index from the top, MLPs at -1.5."""
    H = shape["n_heads"]
    if name == "input":
        return -1.0, (H - 1) / 2
    if name == "logits":
        return float(shape["n_layers"]), (H - 1) / 2
    if name.startswith("m"):
        return int(name[1:]) + 0.45, -1.5
    if ".kv" in name:
        ys = [node_position(h, shape)[1] for h in group_heads(name, shape)]
        return int(name[1:].split(".")[0]) - 0.3, sum(ys) / len(ys)
    layer, h = name[1:].split(".h")
    return float(layer), float(H - 1 - int(h))


def _curve(x0, y0, x1, y1, n: int = 9):
    """Points of a gentle arc from (x0, y0) to (x1, y1), so edges along one row do not hide each other."""
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2 + 0.12 * abs(x1 - x0) ** 0.8
    ts = [i / (n - 1) for i in range(n)]
    return ([(1 - t) ** 2 * x0 + 2 * (1 - t) * t * cx + t ** 2 * x1 for t in ts],
            [(1 - t) ** 2 * y0 + 2 * (1 - t) * t * cy + t ** 2 * y1 for t in ts])


# -- node details -----------------------------------------------------------------------------------------------
def node_details(ev: dict) -> dict:
    """Per node of the circuit (and per key/value receiver it uses): its edges in and out with their scores,
    and its IOI class with the evidence when roles were computed. JSON: ``{name: {"name", "type", "rows":
    [[label, value]], "edges_in": [[edge, kind, score]], "edges_out": [...]}}``, edges strongest first."""
    shape = ev["model"]
    roles = {h["head"]: h for h in ((ev.get("roles") or {}).get("heads") or [])}
    out: dict[str, dict] = {}

    def entry(name: str, typ: str) -> dict:
        return out.setdefault(name, {"name": name, "type": typ, "rows": [], "edges_in": [], "edges_out": []})

    def typ(name: str) -> str:
        return ("input" if name == "input" else "logits" if name == "logits" else "mlp" if name.startswith("m")
                else "kv" if ".kv" in name else "head")

    for e in ev["circuit"]["edges"]:
        row = [e["name"], e["kind"], e["score"]]
        entry(e["source"], typ(e["source"]))["edges_out"].append(row)
        dst = receiver_node(e["receiver"], e["kind"])
        entry(dst, typ(dst))["edges_in"].append(row)
    for kv in [n for n, d in out.items() if d["type"] == "kv"]:
        for h in group_heads(kv, shape):  # a head also reads through its group's key/value head
            entry(h, "head")["edges_in"] += out[kv]["edges_in"]
    for name, d in out.items():
        for key in ("edges_in", "edges_out"):
            d[key].sort(key=lambda r: -abs(r[2]) if r[2] is not None else 0)
        total = lambda rows: sum(r[2] for r in rows if r[2] is not None)  # noqa: E731
        d["score_out"] = total(d["edges_out"])
        d["weight"] = sum(abs(r[2]) for r in d["edges_in"] + d["edges_out"] if r[2] is not None)  # size, labels
        d["rows"] = [["type", TYPE_NAMES[d["type"]]],
                     ["edges out (in the circuit)", str(len(d["edges_out"]))],
                     ["edges in (in the circuit)", str(len(d["edges_in"]))],
                     ["sum of scores out", _num(d["score_out"] if d["edges_out"] else None, 4)],
                     ["sum of scores in", _num(total(d["edges_in"]) if d["edges_in"] else None, 4)]]
        r = roles.get(name)
        if r is not None:
            d["role"] = r["role"]
            d["rows"] += [["IOI class", r["role"]], ["why", r["why"] or "no rule met"],
                          ["direct effect on logit(IO) - logit(S)", _ci(r["dla"])],
                          *[[f"attention {k}", _ci(v)] for k, v in r["attention"].items()],
                          ["copy score", f"{r['copy_score']:.2f}"],
                          ["negative copy score", f"{r['negative_copy_score']:.2f}"],
                          *[[f"{k.replace('_', ' ')} score", f"{v:.2f}"] for k, v in r["head_scores"].items()]]
            if r.get("s_inhibition"):
                d["rows"].append(["path patching into the name movers' queries", _ci(r["s_inhibition"])])
    return out


# -- figures ---------------------------------------------------------------------------------------------------
def graph_figure(ev: dict, nodes: dict) -> dict:
    """The layered graph (module docstring); at most :data:`MAX_DRAWN_EDGES` edges, the strongest."""
    shape = ev["model"]
    L, H = shape["n_layers"], shape["n_heads"]
    edges = sorted(ev["circuit"]["edges"], key=lambda e: -abs(e["score"]) if e["score"] is not None else 0)
    drawn = edges[:MAX_DRAWN_EDGES]
    big = max((abs(e["score"]) for e in drawn if e["score"] is not None), default=0.0) or 1.0
    groups: dict[tuple, tuple[list, list]] = {}
    mid_x, mid_y, mid_text = [], [], []
    for e in drawn:
        s = e["score"]
        sign = "none" if s is None else "neg" if s < 0 else "pos"
        width = 1.2 if s is None else 0.8 + round(5 * (abs(s) / big) ** 0.7)  # six widths: few traces
        (x0, y0) = node_position(e["source"], shape)
        (x1, y1) = node_position(receiver_node(e["receiver"], e["kind"]), shape)
        xs, ys = _curve(x0, y0, x1, y1)
        gx, gy = groups.setdefault((e["kind"], sign, width), ([], []))
        gx += xs + [None]
        gy += ys + [None]
        mid_x.append(xs[len(xs) // 2])
        mid_y.append(ys[len(ys) // 2])
        mid_text.append(f"{_esc(e['name'])}<br>{KINDS[e['kind']][1]}<br>score {_num(s, 4)}")
    every = [n for n in ["input", *(f"a{la}.h{h}" for la in range(L) for h in range(H)), *(f"m{la}" for la in range(L))]
             if n not in nodes]  # the circuit's own nodes are drawn (and clicked) below
    data = [{"type": "scatter", "mode": "markers", "name": "not in the circuit", "hoverinfo": "text", "text": every,
             "x": [node_position(n, shape)[0] for n in every], "y": [node_position(n, shape)[1] for n in every],
             "marker": {"size": 5, "color": "#e3e7ee"}, "showlegend": False}]
    link_x, link_y = [], []  # a key/value head to the query heads that read it
    for kv in (n for n, d in nodes.items() if d["type"] == "kv"):
        (x0, y0) = node_position(kv, shape)
        for h in group_heads(kv, shape):
            x1, y1 = node_position(h, shape)
            link_x += [x0, x1, None]
            link_y += [y0, y1, None]
    if link_x:
        data.append({"type": "scatter", "mode": "lines", "x": link_x, "y": link_y, "hoverinfo": "skip",
                     "showlegend": False, "line": {"color": "#c9d3e3", "width": 1}})
    for (kind, sign, width), (xs, ys) in sorted(groups.items(), key=lambda kv: kv[0][2]):
        data.append({"type": "scatter", "mode": "lines", "x": xs, "y": ys, "hoverinfo": "skip", "showlegend": False,
                     "line": {"color": SIGN_COLOURS[sign], "width": width, "dash": KINDS[kind][0]}, "opacity": 0.75})
    data.append({"type": "scatter", "mode": "markers", "x": mid_x, "y": mid_y, "text": mid_text, "hoverinfo": "text",
                 "marker": {"size": 7, "color": "rgba(0,0,0,0)"}, "showlegend": False, "name": "edges"})
    for kind, (dash, label) in KINDS.items():
        if kind in {e["kind"] for e in drawn}:
            data.append({"type": "scatter", "mode": "lines", "x": [None], "y": [None], "name": f"edge {label}",
                         "line": {"color": "#5f6b7a", "dash": dash, "width": 2}})
    for sign, label in (("neg", "score < 0: patching it lowers the metric"),
                        ("pos", "score > 0: patching it raises the metric")):
        data.append({"type": "scatter", "mode": "lines", "x": [None], "y": [None], "name": label,
                     "line": {"color": SIGN_COLOURS[sign], "width": 4}})
    names = [n for n in nodes if n != "logits" or nodes[n]["edges_in"]]
    big_node = max((nodes[n]["weight"] for n in names), default=0.0) or 1.0
    xs, ys, text, colours, sizes, symbols = [], [], [], [], [], []
    for n in names:
        d = nodes[n]
        x, y = node_position(n, shape)
        xs.append(x)
        ys.append(y)
        role = d.get("role")
        colours.append(ROLE_COLOURS.get(role, "#bdc3c7") if role else TYPE_COLOURS[d["type"]])
        sizes.append(8 if d["type"] == "kv" else 9 + 15 * (d["weight"] / big_node) ** 0.5)
        symbols.append("diamond" if d["type"] == "kv" else "square" if d["type"] == "mlp" else "circle")
        text.append(f"<b>{_esc(n)}</b>" + (f" ({_esc(role)})" if role else "")
                    + f"<br>{len(d['edges_out'])} edges out, {len(d['edges_in'])} in<br>sum of scores out "
                    f"{_num(d['score_out'], 4)}<br>click for its edges")
    ranked = sorted((n for n in names if nodes[n]["type"] != "kv"), key=lambda n: -nodes[n]["weight"])
    shown = set(ranked[:MAX_LABELS]) | {"input", "logits"}  # more labels would overlap; hover names every node
    data.append({"type": "scatter", "mode": "markers+text", "x": xs, "y": ys, "hovertext": text, "hoverinfo": "text",
                 "text": [_esc(n) if n in shown else "" for n in names],
                 "textposition": "top center", "textfont": {"size": 10}, "customdata": names, "name": "nodes",
                 "marker": {"size": sizes, "color": colours, "symbol": symbols, "line": {"width": 1, "color": "#fff"}},
                 "showlegend": False})
    if ev.get("roles"):
        for role in sorted({nodes[n].get("role") for n in names if nodes[n].get("role")}):
            data.append({"type": "scatter", "mode": "markers", "x": [None], "y": [None], "name": f"class: {role}",
                         "marker": {"size": 10, "color": ROLE_COLOURS.get(role, "#bdc3c7")}})
    c = ev["circuit"]
    cut = f"; the {len(drawn):,} strongest of {len(edges):,} edges drawn" if len(edges) > len(drawn) else ""
    ticks = [-1] + list(range(0, L, max(1, L // 15))) + [L]
    return {"data": data, "layout": _layout(
        f"{c['n_edges']:,} edges, {c['n_nodes']} nodes ({c['percent_of_edges']:.2g}% of the graph's edges){cut}",
        height=max(420, 120 + 46 * (H + 2)), hovermode="closest", dragmode="pan",
        margin={"l": 40, "r": 20, "t": 48, "b": 40},
        xaxis={"tickvals": ticks, "ticktext": ["input"] + [str(t) for t in ticks[1:-1]] + ["logits"],
               "zeroline": False, "showgrid": False, "range": [-1.6, L + 0.6]},
        yaxis={"tickvals": [H - 1 - h for h in range(H)] + [-1.5], "ticktext": [f"h{h}" for h in range(H)] + ["MLP"],
               "zeroline": False, "showgrid": False, "range": [-2.3, H + 0.2]},
        legend={"orientation": "h", "y": -0.18})}


def curve_figure(ev: dict) -> dict | None:
    """MIB's faithfulness curves (f at each size with its interval band), CPR and CMD in the title."""
    curves = ev.get("curves") or {}
    if not curves:
        return None
    colours = {"cpr": ("#2b5cab", "rgba(43,92,171,0.18)"), "cmd": ("#d9480f", "rgba(217,72,15,0.18)")}
    data, title = [], []
    for kind, c in curves.items():
        f = c["faithfulness"]
        x = c["percents"]
        line, band = colours[kind]
        what = "signed importance" if kind == "cpr" else "|score|"
        data += [{"type": "scatter", "mode": "lines", "x": x, "y": f["high"], "line": {"width": 0}, "hoverinfo": "skip",
                  "showlegend": False},
                 {"type": "scatter", "mode": "lines", "x": x, "y": f["low"], "line": {"width": 0}, "fill": "tonexty",
                  "fillcolor": band, "hoverinfo": "skip", "name": f"{kind.upper()} 95% interval"},
                 {"type": "scatter", "mode": "lines+markers", "x": x, "y": f["estimate"], "line": {"color": line},
                  "name": f"{kind.upper()}: circuits by {what}", "customdata": c["n_kept"],
                  "hovertemplate": "%{x}% of edges (%{customdata} kept): f = %{y:.3f}<extra>" + kind.upper()
                  + "</extra>"}]
        title.append(f"{kind.upper()} {_ci(c['area'])}")
    first = next(iter(curves.values()))
    p = ev["circuit"]["percent_of_edges"]
    return {"data": data, "layout": _layout(
        f"Faithfulness by circuit size: {' · '.join(title)} ({first['ablation']} ablation, {first['level']} level, "
        f"{first['method']} scores)", height=420, hovermode="closest",
        xaxis={"type": "log",
               "title": {"text": "circuit size (% of the graph's edges, log axis; areas on a linear one)"}},
        yaxis={"title": {"text": "normalised faithfulness f"}},
        shapes=[{"type": "line", "xref": "paper", "x0": 0, "x1": 1, "y0": 1, "y1": 1,
                 "line": {"color": "#5f6b7a", "dash": "dot", "width": 1}},
                {"type": "line", "yref": "paper", "x0": p, "x1": p, "y0": 0, "y1": 1,
                 "line": {"color": "#1b7f3b", "dash": "dash", "width": 1}}],
        annotations=[{"x": math.log10(p), "xref": "x", "y": 1, "yref": "paper", "text": "this circuit",
                      "showarrow": False, "yanchor": "bottom", "font": {"color": "#1b7f3b"}}],
        legend={"orientation": "h", "y": -0.25})}


# -- the view ------------------------------------------------------------------------------------------------------
def _tables(ev: dict) -> dict:
    """Generic tables ``{"columns": [...], "rows": [[str, ...]]}`` of the record."""
    f = ev["faithfulness"]
    t = {}
    if ev.get("robustness"):
        t["robustness"] = {"columns": ["ablation", "level", "f [95% CI]", "per-prompt median", "IQR", "m(∅)"],
                           "rows": [[r["ablation"], r["level"], _ci(r["faithfulness"]),
                                     _num(r["per_prompt"].get("median")), _num(r["per_prompt"].get("iqr")),
                                     _num(r["m_empty"]["estimate"])] for r in ev["robustness"]]}
    if ev.get("roles"):
        t["roles"] = {"columns": ["head", "class", "why", "direct effect", "END→IO", "END→S2", "copy", "neg. copy"],
                      "rows": [[h["head"], h["role"], h["why"], _ci(h["dla"], 2),
                                _ci(h["attention"].get("END->IO"), 2), _ci(h["attention"].get("END->S2"), 2),
                                f"{h['copy_score']:.2f}", f"{h['negative_copy_score']:.2f}"]
                               for h in ev["roles"]["heads"]]}
    edges = sorted(ev["circuit"]["edges"], key=lambda e: -abs(e["score"]) if e["score"] is not None else 0)
    t["edges"] = {"columns": ["edge", "type", "score"],
                  "rows": [[e["name"], KINDS[e["kind"]][1], _num(e["score"], 4)] for e in edges[:50]]}
    d = ev.get("discover") or {}
    task = ev["task"]
    settings = [["model", ev["model"]["name"]], ["task", f"{task['name']} ({task['source']}), metric {task['metric']}"],
                ["evaluated on", f"{task['n_prompts']} prompts: {task['split']}"
                 + (f" (test fraction {task['test_fraction']}, seed {task['seed']}, {task['n_train']} train prompts)"
                    if task["split"] == "held-out" else "")],
                ["ablation / level", f"{f['ablation']} / {f['level']}"],
                ["selection", ", ".join(f"{k} {v}" for k, v in ev["circuit"]["selection"].items())],
                ["scores", ", ".join(f"{k} {v}" for k, v in ev["circuit"]["meta"].items())]]
    if d:
        settings.append(["discover", d.get("command", "")])
        settings += [[f"discover: {k} (s)", f"{v:.1f}"] for k, v in (d.get("timings_s") or {}).items()]
    settings.append(["evaluate", ev["run"].get("command", "")])
    settings += [[f"evaluate: {k} (s)", f"{v:.1f}"] for k, v in ev["run"]["timings_s"].items()]
    t["settings"] = {"columns": ["setting", "value"], "rows": [[str(a), str(b)] for a, b in settings]}
    return t


def circuit_view(ev: dict) -> dict:
    """Everything a circuit page draws, as JSON: ``title``, ``summary`` (label, value, detail rows),
    ``figures`` (plotly specs: ``graph``, ``curve`` when computed), ``nodes`` (:func:`node_details`),
    ``tables`` (robustness, roles, edges, settings) and ``notes``."""
    nodes = node_details(ev)
    f = ev["faithfulness"]
    p = f["per_prompt"]
    c, task = ev["circuit"], ev["task"]
    summary = [["faithfulness f(C)", _ci(f["faithfulness"]), f"{f['ablation']} ablation, {f['level']} level, "
                f"{f['n_prompts']} prompts ({task['split']})"],
               ["per prompt", "n/a" if p.get("median") is None else f"median {p['median']:.3f}",
                "n/a" if p.get("iqr") is None else f"IQR {p['iqr']:.3f} over {p['n_defined']} prompts"],
               [f"{f['metric']}: model / circuit",
                f"{_num(f['m_model']['estimate'])} / {_num(f['m_circuit']['estimate'])}",
                f"all ablated {_num(f['m_empty']['estimate'])}"],
               ["circuit", f"{c['n_edges']:,} edges", f"{c['n_nodes']} nodes, {c['percent_of_edges']:.2g}% of the "
                f"graph's edges; {c['meta'].get('method', c['selection'].get('method', ''))}"]]
    for kind, cur in (ev.get("curves") or {}).items():
        summary.append([kind.upper(), _ci(cur["area"]), "area under f (higher is better)" if kind == "cpr" else
                        "area under |1 - f| (lower is better)"])
    figs = {"graph": graph_figure(ev, nodes)}
    curve = curve_figure(ev)
    if curve is not None:
        figs["curve"] = curve
    return {"title": f"{task['name']} circuit of {ev['model']['name']}", "summary": summary, "figures": figs,
            "nodes": nodes, "tables": _tables(ev), "notes": list(ev.get("notes") or [])}


__all__ = ["MAX_DRAWN_EDGES", "MAX_LABELS", "circuit_view", "curve_figure", "graph_figure", "group_heads", "node_details",
           "node_position", "receiver_node"]
