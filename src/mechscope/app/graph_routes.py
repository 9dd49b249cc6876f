"""The attribution-graph page's API (``/graph``; ``mechscope serve --graph DIR [--transcoders DIR]``).

- ``GET /api/graph`` -> ``{view, features, steering}``: the page's view drawn from the graph JSON
  (:func:`mechscope.report.graph_view.graph_view`), and whether feature details and steering are available
  (with the reason when not);
- ``GET /api/graph/node/{node_id}`` -> ``{node_id, layer, latent, pos, activation, feature}``: a feature node's
  entry in its layer's feature database (``<transcoders>/features/Lnn.duckdb``, ``mechscope transcoders
  features``): density, max activation, best label with its score and provenance, top contexts (tokens and
  per-token activations), promoted/suppressed tokens; ``feature`` is null with ``why`` when the layer has no
  database;
- ``POST /api/graph/steer`` ``{nodes: [id], scale, max_new_tokens}`` ->
  :func:`mechscope.graphs.steer.steer_graph_features` (the real model, each node's activation times ``scale``;
  several nodes together form a hand-made supernode);
- ``POST /api/graph/export`` ``{pinned: [id], supernodes: [[name, id, ...]]}`` -> the graph JSON with those pins and
  hand-made supernodes in its ``qParams`` (a download: Neuronpedia's viewer and ``mechscope serve --graph`` read it);
- ``GET /api/graph/edge?source=ID&target=ID`` -> :func:`mechscope.graphs.edge_heads.json_edge_heads`'s
  ``to_dict()``: the attention heads that carry the edge, their strongest (query, key) moves, and the split of
  the top head's attention score into query- and key-side components.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

N_CONTEXTS = 5  # top contexts shown per clicked feature
MAX_STEERED = 64


class GraphSteerBody(BaseModel):
    """POST /api/graph/steer: feature node ids (each once), the activation multiplier, greedy tokens."""

    nodes: list[str] = Field(..., min_length=1, max_length=MAX_STEERED)
    scale: float = Field(0.0, ge=-100.0, le=100.0, allow_inf_nan=False, strict=False)
    max_new_tokens: int = Field(8, ge=0, le=32, strict=True)


class GraphExportBody(BaseModel):
    """POST /api/graph/export: node ids to pin, and supernodes as ``[name, node id, node id, ...]``."""

    pinned: list[str] = Field(default_factory=list, max_length=10_000)
    supernodes: list[list[str]] = Field(default_factory=list, max_length=1_000)


def feature_entry(db, latent: int) -> dict:
    """What the page shows of one latent of a feature database (JSON-able)."""
    from mechscope.app.web import best_label

    f = db.feature(latent)
    tops = [{"tokens": e["tokens"], "acts": [round(a, 4) for a in e["acts"]], "max_pos": e["max_pos"],
             "max_act": e["max_act"]} for e in f["top"][:N_CONTEXTS]]
    return {"id": f["id"], "density": f["density"], "max_act": f["max_act"], "mean_act": f["mean_act"],
            **best_label(f), "top": tops, "logits": f["logits"], "n_tokens": db.meta.get("n_tokens")}


def add_graph_routes(app, state) -> None:
    """Add the routes of the module docstring to ``app``; the model runs under ``state.lock``."""
    from fastapi import HTTPException

    from mechscope.core.errors import InputError

    def need_graph() -> dict:
        if state.graph is None:
            raise HTTPException(status_code=404, detail="this server was started without an attribution graph "
                                                        "(--graph DIR of mechscope graph).")
        return state.graph

    def no_steering() -> str | None:
        if state.graph_transcoders is None:
            return ("start the server with --transcoders DIR (the graph's transcoder set) to steer its features.")
        return None

    def no_features() -> str | None:
        if not state.graph_features:
            return ("the transcoder set has no feature databases; build them with `mechscope transcoders features "
                    "DIR` and restart the server." if state.graph_transcoders is not None else no_steering())
        return None

    @app.get("/api/graph")
    def graph():
        """The attribution-graph page's view (figure, node details, tables), drawn from the graph JSON."""
        from mechscope.report.graph_view import graph_view

        return {"view": graph_view(need_graph()),
                "features": {"available": sorted(state.graph_features), "why": no_features()},
                "steering": {"available": no_steering() is None, "why": no_steering()}}

    @app.get("/api/graph/node/{node_id}")
    def node(node_id: str):
        """A feature node with its feature-database entry (contexts, label, logit effects)."""
        from mechscope.graphs.steer import parse_feature_node

        g = need_graph()
        try:
            layer, latent, pos, act = parse_feature_node(node_id, {n["node_id"]: n for n in g["nodes"]})
        except InputError as e:
            raise HTTPException(status_code=404, detail=str(e)) from None
        out = {"node_id": node_id, "layer": layer, "latent": latent, "pos": pos, "activation": act, "feature": None}
        db = state.graph_features.get(layer)
        if db is None:
            out["why"] = no_features() or f"layer {layer} has no feature database (build it with --layers {layer})."
            return out
        if latent >= db.n_latents:
            raise HTTPException(status_code=404, detail=f"latent {latent} is not in {db.path} (0..{db.n_latents - 1}).")
        out["feature"] = feature_entry(db, latent)  # a cursor of its own: no lock
        return out

    @app.post("/api/graph/export")
    def export(body: GraphExportBody):
        """The graph JSON with the page's pins and hand-made supernodes, as a file to download."""
        from fastapi.responses import JSONResponse

        g = need_graph()
        ids = {n["node_id"] for n in g["nodes"]}
        for group in body.supernodes:
            if len(group) < 3 or not group[0].strip():
                raise InputError("a supernode is [name, node id, node id, ...]: a name and at least two nodes.")
        unknown = [i for i in body.pinned + [i for grp in body.supernodes for i in grp[1:]] if i not in ids]
        if unknown:
            raise InputError(f"node {unknown[0]!r} is not in this graph ({len(unknown)} unknown ids).")
        out = {**g, "qParams": {**g["qParams"], "pinnedIds": list(body.pinned),
                                "supernodes": [list(grp) for grp in body.supernodes]}}
        slug = "".join(c if c.isalnum() or c in "-_" else "-" for c in str(g["metadata"].get("slug", "graph")))[:64]
        return JSONResponse(out, headers={"Content-Disposition": f'attachment; filename="{slug or "graph"}.json"'})

    @app.get("/api/graph/edge")
    def edge(source: str, target: str):
        """The heads that carry an edge (exact split in the frozen replacement model) and why the top one attended."""
        from mechscope.graphs.edge_heads import json_edge_heads

        g = need_graph()
        why = no_steering()
        if why is not None:
            raise HTTPException(status_code=404, detail=why.replace("steer its features", "split its edges"))
        with state.lock:
            if "replacement" not in state.graph_cache:  # the prompt's replacement state, once per server
                from mechscope.graphs.edge_heads import json_first_zeroed, json_tokens
                from mechscope.graphs.replacement import replacement_state

                if "tokens" in (g["metadata"].get("mechscope") or {}):
                    state.graph_cache["replacement"] = replacement_state(
                        state.model, state.graph_transcoders, json_tokens(g), zero_first=json_first_zeroed(g))
            return json_edge_heads(state.model, state.graph_transcoders, g, source, target,
                                   state=state.graph_cache.get("replacement")).to_dict()

    @app.post("/api/graph/steer")
    def steer(body: GraphSteerBody):
        """Steer feature nodes in the real model; next-token distribution and greedy continuation before and after."""
        from mechscope.graphs.steer import steer_graph_features

        g = need_graph()
        why = no_steering()
        if why is not None:
            raise HTTPException(status_code=404, detail=why)
        with state.lock:
            return steer_graph_features(state.model, state.graph_transcoders, g, body.nodes, scale=body.scale,
                                        max_new_tokens=body.max_new_tokens)
