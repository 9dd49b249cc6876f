"""What an attribution-graph page draws, from the graph JSON alone (:func:`mechscope.graphs.to_neuronpedia`'s
layout, so imported files draw too): the figure, each node's details and edges, summary cards and tables.

The graph: x = token position (the prompt's tokens along the axis), y = layer (token embeddings at the bottom,
the target logits at the top); features are circles, error nodes grey squares, tokens and logits diamonds. Nodes
of one (layer, position) cell are spread side by side. Edges are drawn with a width that grows with |weight|,
orange when positive and blue when negative, the strongest ``MAX_DRAWN_EDGES``. Hover shows a node's numbers;
clicking lists its incoming and outgoing edges and lets the reader pin it.

Hover text goes through :func:`html.escape` (plotly reads a little HTML in labels), so every token shows as itself.
"""

from __future__ import annotations

import html
import math
from collections import defaultdict

MAX_DRAWN_EDGES = 1500
WIDTH_BINS = 6
COLOURS = {"cross layer transcoder": "#4c78a8", "mlp reconstruction error": "#9e9e9e", "embedding": "#2f2f2f",
           "logit": "#1b7f3b"}
KIND_NAMES = {"cross layer transcoder": "feature", "mlp reconstruction error": "error node", "embedding": "token",
              "logit": "logit"}
SYMBOLS = {"cross layer transcoder": "circle", "mlp reconstruction error": "square", "embedding": "diamond",
           "logit": "diamond"}


def _esc(s) -> str:
    return html.escape(str(s), quote=False).replace("\n", "\\n")


def _y(node: dict) -> float:
    layer = node["layer"]
    if layer == "E":
        return -1.0
    return float(int(layer)) + (0.3 if node["feature_type"] == "mlp reconstruction error" else 0.0)


def node_name(node: dict, tokens: list[str]) -> str:
    """A short name: ``L12 #3456 @ ' Paris'``, ``error L3 @ 'is'``, ``token ' France'``, ``logit ' Paris'``."""
    t = node["feature_type"]
    pos = node["ctx_idx"]
    tok = repr(tokens[pos]) if 0 <= pos < len(tokens) else str(pos)
    if t == "cross layer transcoder":
        latent = node["node_id"].split("_")[1]
        return f"L{node['layer']} #{latent} @ {tok}"
    if t == "mlp reconstruction error":
        return f"error L{node['layer']} @ {tok}"
    if t == "embedding":
        return f"token {tok}"
    return node.get("clerp") or f"logit {node['feature']}"


def graph_view(d: dict) -> dict:
    """The page's content from a graph JSON dict: ``figure`` (plotly data/layout), ``nodes`` (id -> details:
    name, rows, edges in/out, the incoming edges' source ids), ``summary`` cards, ``tables`` (strongest edges),
    ``title``, ``pinned``, ``tokens`` (the prompt's token strings), ``supernodes`` (``[name, id, ...]`` each)."""
    meta = d["metadata"]
    ms = meta.get("mechscope", {})
    tokens = list(meta.get("prompt_tokens", []))
    n_layers = int(ms.get("n_layers") or max([int(n["layer"]) for n in d["nodes"] if n["layer"] != "E"] + [1]) - 1)
    nodes = {n["node_id"]: n for n in d["nodes"]}
    # positions: spread the nodes of one (y, pos) cell side by side
    cells = defaultdict(list)
    for n in d["nodes"]:
        cells[(_y(n), n["ctx_idx"])].append(n["node_id"])
    xy = {}
    for (y, pos), ids in cells.items():
        k = len(ids)
        for i, nid in enumerate(sorted(ids)):
            xy[nid] = (pos + (0 if k == 1 else 0.7 * (i / (k - 1) - 0.5)), y)
    links = sorted(d["links"], key=lambda e: -abs(e["weight"]))
    drawn = links[:MAX_DRAWN_EDGES]
    wmax = max([abs(e["weight"]) for e in drawn] + [1e-12])
    traces = []
    for sign, colour in (("pos", "#d9480f"), ("neg", "#2b5cab")):
        bins = defaultdict(lambda: ([], []))
        for e in drawn:
            if (e["weight"] > 0) != (sign == "pos") or e["source"] not in xy or e["target"] not in xy:
                continue
            b = min(WIDTH_BINS - 1, int(WIDTH_BINS * math.sqrt(abs(e["weight"]) / wmax)))
            xs, ys = bins[b]
            (x0, y0), (x1, y1) = xy[e["source"]], xy[e["target"]]
            xs += [x0, x1, None]
            ys += [y0, y1, None]
        for b, (xs, ys) in sorted(bins.items()):
            traces.append({"type": "scatter", "mode": "lines", "x": xs, "y": ys, "hoverinfo": "skip",
                           "line": {"color": colour, "width": 0.5 + 1.2 * b}, "opacity": 0.25 + 0.1 * b,
                           "showlegend": False})
    by_kind = defaultdict(list)
    for n in d["nodes"]:
        by_kind[n["feature_type"]].append(n)
    for kind, ns in by_kind.items():
        hover = []
        for n in ns:
            parts = [f"<b>{_esc(node_name(n, tokens))}</b>"]
            if n.get("activation") is not None:
                parts.append(f"activation {n['activation']:.3f}")
            if n.get("influence") is not None:
                parts.append(f"cumulative influence rank {n['influence']:.3f}")
            if kind == "logit":
                parts.append(f"p = {n.get('token_prob', 0):.3f}")
            if n.get("clerp") and kind == "cross layer transcoder":
                parts.append(_esc(n["clerp"]))
            hover.append("<br>".join(parts))
        traces.append({"type": "scatter", "mode": "markers", "name": KIND_NAMES[kind],
                       "x": [xy[n["node_id"]][0] for n in ns], "y": [xy[n["node_id"]][1] for n in ns],
                       "customdata": [n["node_id"] for n in ns], "hovertext": hover, "hoverinfo": "text",
                       "marker": {"color": COLOURS[kind], "symbol": SYMBOLS[kind],
                                  "size": 11 if kind != "logit" else 14, "line": {"width": 1, "color": "white"}}})
    layout = {"height": 640, "margin": {"l": 60, "r": 20, "t": 20, "b": 120}, "hovermode": "closest",
              "xaxis": {"tickmode": "array", "tickvals": list(range(len(tokens))),
                        "ticktext": [_esc(t) for t in tokens], "tickangle": -45, "title": {"text": "token position"},
                        "zeroline": False},
              "yaxis": {"tickmode": "array", "tickvals": [-1] + list(range(n_layers)) + [n_layers + 1],
                        "ticktext": ["emb"] + [str(L) for L in range(n_layers)] + ["logits"],
                        "title": {"text": "layer"}, "zeroline": False},
              "legend": {"orientation": "h", "y": 1.02, "x": 0}}
    details = {}
    incoming, outgoing = defaultdict(list), defaultdict(list)
    for e in links:
        incoming[e["target"]].append(e)
        outgoing[e["source"]].append(e)
    for nid, n in nodes.items():
        rows = [["kind", KIND_NAMES[n["feature_type"]]], ["node id", nid], ["layer", n["layer"]],
                ["position", n["ctx_idx"]]]
        if n.get("activation") is not None:
            rows.append(["activation", round(n["activation"], 4)])
        if n.get("influence") is not None:
            rows.append(["cumulative influence rank", round(n["influence"], 4)])
        if n["feature_type"] == "logit":
            rows.append(["probability", round(n.get("token_prob", 0.0), 4)])
        if n.get("clerp"):
            rows.append(["label", n["clerp"]])
        details[nid] = {"name": node_name(n, tokens), "rows": rows,
                        "edges_in": [[node_name(nodes[e["source"]], tokens), e["weight"]] for e in incoming[nid][:25]],
                        "edges_out": [[node_name(nodes[e["target"]], tokens), e["weight"]] for e in outgoing[nid][:25]],
                        "edges_in_ids": [e["source"] for e in incoming[nid][:25]]}
    n_feat = sum(1 for n in d["nodes"] if n["feature_type"] == "cross layer transcoder")
    targets = [n for n in d["nodes"] if n["feature_type"] == "logit"]
    summary = [("prompt", meta.get("prompt") or "".join(tokens), f"{len(tokens)} tokens"),
               ("top target", targets[0].get("clerp", "") if targets else "n/a", f"{len(targets)} target logits"),
               ("nodes / edges kept", f"{len(d['nodes'])} / {len(d['links'])}",
                f"{n_feat} features; node threshold {meta.get('node_threshold')}, edge {ms.get('edge_threshold')}")]
    for key, label in (("replacement_score", "replacement score"), ("completeness_score", "completeness score")):
        if ms.get(key) is not None:
            summary.append((label, f"{ms[key]:.3f}", f"pruned: {ms.get('pruned_' + key, float('nan')):.3f}"))
    edge_rows = [[node_name(nodes[e["source"]], tokens), node_name(nodes[e["target"]], tokens), round(e["weight"], 4)]
                 for e in links[:50]]
    groups = [[g[0], ", ".join(node_name(nodes[i], tokens) for i in g[1:] if i in nodes)]
              for g in d.get("qParams", {}).get("supernodes", []) if g]
    notes = []
    if len(links) > MAX_DRAWN_EDGES:
        notes.append(f"{MAX_DRAWN_EDGES} of {len(links)} edges drawn (the strongest by |weight|).")
    return {"title": f"attribution graph: {meta.get('prompt') or meta.get('slug')}", "figure": {"data": traces,
            "layout": layout}, "nodes": details, "summary": summary, "notes": notes,
            "tables": {"edges": {"columns": ["source", "target", "weight"], "rows": edge_rows},
                       "supernodes": {"columns": ["supernode", "features"], "rows": groups}},
            "pinned": list(d.get("qParams", {}).get("pinnedIds", [])), "model": ms.get("model", ""), "tokens": tokens,
            "supernodes": [list(g) for g in d.get("qParams", {}).get("supernodes", []) if len(g) >= 3],
            "scan": meta.get("scan", "")}
