"""The graph JSON that Neuronpedia's attribution-graph viewer reads (the format circuit-tracer writes), and
reading it back. The schema is written down in ``neuronpedia.schema.json`` beside this module (JSON Schema
draft 2020-12) and documented in ``docs/graphs.md``.

A file holds the *pruned* graph: ``metadata`` (slug, scan, transcoder_list, prompt, prompt_tokens,
node_threshold, schema_version 1, and mechscope's ``mechscope`` block: model, n_layers, thresholds, scores),
``qParams`` (pinnedIds, supernodes, linkType, clickedId, sg_pos), ``nodes`` and ``links`` (source, target,
weight = the direct effect of source on target, an entry of the graph's edges).

Node ids never collide (circuit-tracer issue #78 reports error ids that could equal feature ids):

======================  ==========================  ============================
node                    ``node_id``                 ``feature_type``
======================  ==========================  ============================
feature                 ``{layer}_{feature}_{pos}`` ``cross layer transcoder``
error node              ``{layer}_-1_{pos}``        ``mlp reconstruction error``
token                   ``E_{token id}_{pos}``      ``embedding``
logit                   ``{L + 1}_{token id}_{pos}`` ``logit``
======================  ==========================  ============================

A feature index is never negative and a logit's layer ``L + 1`` is past every feature's, so no two kinds
share an id. ``influence`` is the node's cumulative influence rank (the share of total influence held by
nodes at least as influential), as circuit-tracer writes it.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from mechscope.core.errors import CorruptFileError, InputError
from mechscope.core.io import write_text_atomic
from mechscope.graphs.graph import AttributionGraph
from mechscope.graphs.prune import Pruned, graph_scores, prune

SCHEMA_VERSION = 1
FEATURE, ERROR, EMBEDDING, LOGIT = "cross layer transcoder", "mlp reconstruction error", "embedding", "logit"


def schema() -> dict[str, Any]:
    """The JSON Schema of the files :func:`to_neuronpedia` writes."""
    return json.loads(resources.files("mechscope.graphs").joinpath("neuronpedia.schema.json").read_text("utf-8"))


def _cantor(x: int, y: int) -> int:
    return (x + y) * (x + y + 1) // 2 + y


def node_id(graph: AttributionGraph, i: int) -> str:
    """The Neuronpedia node id of node ``i`` (see the module docstring)."""
    n = graph.node(i)
    k = n["kind"]
    if k == "feature":
        return f"{n['layer']}_{n['feature']}_{n['pos']}"
    if k == "error":
        return f"{n['layer']}_-1_{n['pos']}"
    if k == "token":
        return f"E_{n['token']}_{n['pos']}"
    return f"{graph.n_layers + 1}_{n['token']}_{n['pos']}"


def _cumulative_rank(infl: torch.Tensor) -> torch.Tensor:
    v, order = infl.sort(descending=True)
    cum = v.cumsum(0) / v.sum().clamp_min(1e-30)
    out = torch.empty_like(cum)
    out[order] = cum
    return out


def to_neuronpedia(graph: AttributionGraph, *, slug: str = "graph", scan: str | None = None,
                   pruned: Pruned | None = None, node_threshold: float = 0.8, edge_threshold: float = 0.98,
                   labels: dict[tuple[int, int], str] | None = None, supernodes=None) -> dict[str, Any]:
    """The pruned graph as the dict Neuronpedia's viewer reads.

    Args:
        slug: the graph's name in the viewer.
        scan: the transcoder set's name (default: its folder's name).
        pruned: a :func:`~mechscope.graphs.prune.prune` result; default: pruned here with the thresholds.
        labels: ``(layer, feature) -> label`` written as each feature's ``clerp`` (e.g. from a feature database).
        supernodes: :class:`~mechscope.graphs.supernodes.Supernode` groups written to ``qParams.supernodes`` as
            ``[label, node_id, ...]`` (members pruned away are left out).

    Raises:
        InputError: a slug that is empty or not a plain name.
    """
    if not slug or any(c in slug for c in "/\\\0"):
        raise InputError(f"slug must be a non-empty plain name (no slashes), got {slug!r}.")
    pr = pruned or prune(graph, node_threshold, edge_threshold)
    rank = _cumulative_rank(pr.influence)
    rep, comp = graph_scores(graph)
    rep_p, comp_p = graph_scores(graph, pr)
    labels = labels or {}
    nodes, ids = [], {}
    for i in pr.node_mask.nonzero().flatten().tolist():
        n = graph.node(i)
        nid = node_id(graph, i)
        ids[i] = nid
        k = n["kind"]
        base = {"node_id": nid, "ctx_idx": n["pos"], "run_idx": 0, "reverse_ctx_idx": 0, "token_prob": 0.0,
                "is_target_logit": False, "clerp": "", "influence": float(rank[i]), "activation": None}
        if k == "feature":
            base.update(feature=_cantor(n["layer"], n["feature"]), layer=str(n["layer"]), feature_type=FEATURE,
                        jsNodeId=f"{n['layer']}_{n['feature']}-0", activation=n["activation"],
                        clerp=labels.get((n["layer"], n["feature"]), ""))
        elif k == "error":
            base.update(feature=-1, layer=str(n["layer"]), feature_type=ERROR, jsNodeId=f"{n['layer']}_-1-{n['pos']}")
        elif k == "token":
            base.update(feature=n["pos"], layer="E", feature_type=EMBEDDING, jsNodeId=f"E_{n['token']}-{n['pos']}")
        else:
            j = i - graph.logit_start
            base.update(feature=n["token"], layer=str(graph.n_layers + 1), feature_type=LOGIT,
                        jsNodeId=f"L_{n['token']}-{n['pos']}", token_prob=n["prob"], is_target_logit=j == 0,
                        clerp=f'Output "{n["str"]}" (p={n["prob"]:.3f})', influence=None)
        nodes.append(base)
    rows, src = pr.edge_mask.nonzero(as_tuple=True)
    weights = graph.edges[rows, src].tolist()
    tgt = [graph.row_node(r) for r in rows.tolist()]
    links = [{"source": ids[s], "target": ids[t], "weight": w}
             for t, s, w in zip(tgt, src.tolist(), weights) if s in ids and t in ids]
    name = scan or (Path(graph.transcoders).name if graph.transcoders else "mechscope-transcoders")
    meta = {"slug": slug, "scan": name, "transcoder_list": [], "prompt_tokens": graph.str_tokens,
            "prompt": graph.prompt, "node_threshold": pr.node_threshold, "schema_version": SCHEMA_VERSION,
            "mechscope": {"model": graph.model_name, "n_layers": graph.n_layers, "n_pos": graph.n_pos,
                          "tokens": graph.tokens.tolist(), "edge_threshold": pr.edge_threshold,
                          "replacement_score": rep, "completeness_score": comp,
                          "pruned_replacement_score": rep_p, "pruned_completeness_score": comp_p,
                          "transcoders": graph.transcoders,
                          "first_zeroed": bool(graph.info.get("first_zeroed", True))}}
    groups = []
    for sn in supernodes or ():
        members = [ids[i] for i in sn.nodes if i in ids]
        if len(members) >= 2:
            groups.append([sn.label, *members])
    qparams = {"pinnedIds": [], "supernodes": groups, "linkType": "both", "clickedId": "", "sg_pos": ""}
    return {"metadata": meta, "qParams": qparams, "nodes": nodes, "links": links}


def save_neuronpedia(graph: AttributionGraph, path: str | Path, **kwargs) -> Path:
    """Write :func:`to_neuronpedia`'s dict to ``path`` (atomically); kwargs as for it."""
    path = Path(path)
    write_text_atomic(json.dumps(to_neuronpedia(graph, **kwargs), indent=1), path)
    return path


def load_neuronpedia(source: str | Path | dict) -> dict[str, Any]:
    """Read a graph JSON (a path or an already parsed dict) and check it against the schema's required parts.

    Returns:
        the dict, with ``nodes`` and ``links`` as written.

    Raises:
        InputError: a missing file. CorruptFileError: not JSON, or a required key or node field missing, a
            duplicate node id, or a link to a node that is not in the file.
    """
    if isinstance(source, dict):
        d, where = source, "the graph"
    else:
        p = Path(source)
        if not p.is_file():
            raise InputError(f"{p} does not exist; export a graph with `mechscope graph ... --out DIR`.")
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CorruptFileError(f"{p} is not valid JSON ({e}).") from e
        where = str(p)
    for key in ("metadata", "qParams", "nodes", "links"):
        if key not in d:
            raise CorruptFileError(f"{where} has no {key!r}; it is not an attribution-graph JSON.")
    seen = set()
    for n in d["nodes"]:
        for f in ("node_id", "feature", "layer", "ctx_idx", "feature_type"):
            if f not in n:
                raise CorruptFileError(f"{where}: a node lacks {f!r}: {json.dumps(n)[:120]}")
        if n["node_id"] in seen:
            raise CorruptFileError(f"{where}: node id {n['node_id']!r} occurs twice.")
        seen.add(n["node_id"])
    for e in d["links"]:
        if e.get("source") not in seen or e.get("target") not in seen:
            raise CorruptFileError(f"{where}: link {e} names a node that is not in the file.")
    return d
