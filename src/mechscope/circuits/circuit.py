"""A circuit: a set of edges of a model's :class:`~mechscope.circuits.graph.Graph`, how to choose one from edge
scores, and its file formats (mechscope's own JSON, and the EAP-IG / MIB graph JSON).

Sign convention. mechscope's edge scores are the predicted change of the task metric when the edge carries
the corrupted value (:mod:`mechscope.circuits.attribution`): **negative** for an edge the behaviour needs
when the metric is higher on the clean run (logit difference, probability). An edge's *importance* (what
signed selection ranks by, highest first) is therefore ``-score``; for metrics on which the clean run
scores lowest (``kl``, where patching raises the metric) it is ``+score``. MIB and EAP-IG compute scores
against a loss (``-logit difference``), so their "highest signed score" is this importance: selecting by
signed importance here is selecting by signed score there.

References:
    Hanna, Pezzelle and Belinkov 2024, "Have Faith in Faithfulness" (EAP-IG's graph JSON, greedy selection);
    Mueller et al. 2025, "MIB: A Mechanistic Interpretability Benchmark" (top-n selection then pruning).
"""

from __future__ import annotations

import heapq
import json
import warnings
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor

from mechscope.circuits.attribution import EdgeScores
from mechscope.circuits.graph import Graph
from mechscope.core.errors import CorruptFileError, InputError
from mechscope.core.io import write_json_atomic, write_text_atomic

FORMAT = "mechscope.circuit"
FORMAT_VERSION = 1
_KEYS = ("format", "format_version", "model", "graph", "edges", "scores", "selection", "meta")
#: Metrics on which the clean model scores lowest, so patching an edge it needs raises the metric.
LOWER_IS_CLEAN = ("kl",)


def importance(scores: EdgeScores, *, absolute: bool) -> Float[Tensor, " n_edges"]:
    """Per edge, the key edges are ranked by (highest first): ``|score|``, or the signed importance
    (``-score``; ``+score`` for metrics in :data:`LOWER_IS_CLEAN`). Unscored edges get ``-inf``.

    Returns:
        float32 ``[n_edges]``.
    """
    s = scores.scores.float()
    key = s.abs() if absolute else (s if scores.info.get("metric") in LOWER_IS_CLEAN else -s)
    if scores.scored is not None:
        key = torch.where(scores.scored, key, torch.full_like(key, -float("inf")))
    return key


def receiver_owners(graph: Graph) -> list[list[int]]:
    """Per receiver, the source nodes that read through it: a query's head, a key/value head's query heads
    (all of its group), an MLP's own node; none for the logits."""
    rep = graph.n_heads // graph.n_kv_heads
    out = []
    for r in graph.receivers:
        heads, mlp = graph.layer_sources(r.layer) if r.kind != "logits" else (slice(0, 0), -1)
        if r.kind == "q":
            out.append([heads.start + r.index])
        elif r.kind in ("k", "v"):
            out.append(list(range(heads.start + r.index * rep, heads.start + (r.index + 1) * rep)))
        elif r.kind == "mlp":
            out.append([mlp])
        else:
            out.append([])
    return out


def _readers(graph: Graph) -> list[list[int]]:
    """Per source node, the receivers it reads through (the inverse of :func:`receiver_owners`)."""
    reads: list[list[int]] = [[] for _ in graph.sources]
    for r, owners in enumerate(receiver_owners(graph)):
        for s in owners:
            reads[s].append(r)
    return reads


def _graph_shape(graph: Graph) -> dict:
    return {"n_layers": graph.n_layers, "n_heads": graph.n_heads, "n_kv_heads": graph.n_kv_heads,
            "parallel": bool(graph.parallel), "n_edges": graph.n_edges}


@dataclass(eq=False)
class Circuit:
    """A set of edges of a graph, with optional scores and how it was chosen.

    Attributes:
        graph: the :class:`Graph` the edges belong to.
        edges: bool ``[n_edges]``, True = in the circuit.
        scores: float32 ``[n_edges]`` edge scores (mechscope's sign, metric units; NaN = not stored), or None.
        selection: how the edges were chosen (``{"method": "top_n", "top_n": 200, "absolute": True, ...}``).
        meta: provenance: task, metric, scoring method, steps, n_prompts, date.

    An empty circuit is allowed; evaluating it gives the all-ablated baseline m(∅) (faithfulness 0).
    """

    graph: Graph
    edges: Tensor
    scores: Tensor | None = None
    selection: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        E = self.graph.n_edges
        if self.edges.shape != (E,) or self.edges.dtype != torch.bool:
            raise InputError(f"a circuit's edges must be a bool mask [{E}] over {self.graph.model_name}'s edges, got "
                             f"{self.edges.dtype} {tuple(self.edges.shape)}.")
        self.edges = self.edges.cpu()
        if self.scores is not None:
            if self.scores.shape != (E,):
                raise InputError(f"scores must be [{E}] (one per edge of the graph), got {tuple(self.scores.shape)}.")
            self.scores = self.scores.detach().float().cpu()

    # -- what it holds -------------------------------------------------------------------------------------
    @property
    def n_edges(self) -> int:
        """Edges in the circuit."""
        return int(self.edges.sum())

    def __len__(self) -> int:
        return self.n_edges

    @property
    def is_empty(self) -> bool:
        return self.n_edges == 0

    def edge_names(self) -> list[str]:
        """The circuit's edges, ``"source->receiver"``, sorted."""
        names = self.graph.edge_names()
        return sorted(names[i] for i in self.edges.nonzero().flatten().tolist())

    def node_mask(self) -> Tensor:
        """Bool ``[n_sources]``: the nodes with at least one edge out in the circuit (EAP-IG's ``in_graph``)."""
        mask = torch.zeros(self.graph.n_sources, dtype=torch.bool)
        mask[self.graph.edge_source[self.edges]] = True
        return mask

    @property
    def nodes(self) -> list[str]:
        """Node names in graph order: every node with an edge out in the circuit, then ``logits`` when an edge
        enters it. A node's outputs reach the logits only through its out-edges, so this is the node set a
        node-level ablation keeps."""
        names = [n for n, keep in zip(self.graph.sources, self.node_mask().tolist()) if keep]
        into_logits = self.edges[self.graph.edge_receiver == self.graph.n_receivers - 1].any()
        return names + (["logits"] if bool(into_logits) else [])

    def __eq__(self, other) -> bool:
        if not isinstance(other, Circuit):
            return NotImplemented
        same_scores = (self.scores is None) == (other.scores is None) and (
            self.scores is None or torch.equal(self.scores.nan_to_num(nan=0.5), other.scores.nan_to_num(nan=0.5))
            and torch.equal(self.scores.isnan(), other.scores.isnan()))
        return (_graph_shape(self.graph) == _graph_shape(other.graph) and torch.equal(self.edges, other.edges)
                and same_scores and self.selection == other.selection and _undated(self.meta) == _undated(other.meta))

    def __repr__(self) -> str:
        how = ", ".join(f"{k}={v}" for k, v in self.selection.items())
        return (f"Circuit({self.graph.model_name!r}: {self.n_edges:,} of {self.graph.n_edges:,} edges, "
                f"{len(self.nodes)} nodes{'; ' + how if how else ''})")

    # -- building one --------------------------------------------------------------------------------------
    @classmethod
    def from_scores(cls, scores: EdgeScores, *, top_n: int | None = None, threshold: float | None = None,
                    absolute: bool = True, prune: bool = False) -> Circuit:
        """The highest-ranked edges: the ``top_n`` best, or every edge at or above ``threshold``.

        Args:
            scores: :class:`EdgeScores` of the graph.
            top_n: how many edges (1..number of scored edges). Ties go to the lower edge index.
            threshold: keep edges whose key is ``>= threshold`` (metric units).
            absolute: rank by ``|score|`` (True) or by the signed importance, ``-score`` (False; see the module
                docstring: the edges whose patching most lowers the metric first).
            prune: then drop edges not on a path from ``input`` to ``logits`` (:meth:`prune`), as MIB does.

        Raises:
            InputError: both or neither of top_n/threshold; top_n outside 1..n; a threshold that keeps nothing.
        """
        if (top_n is None) == (threshold is None):
            raise InputError("give exactly one of top_n (how many edges) or threshold (the lowest score kept).")
        key = importance(scores, absolute=absolute)
        n_ok = int(key.isfinite().sum())
        what = "|score|" if absolute else "importance (-score)"
        if top_n is not None:
            if isinstance(top_n, bool) or not isinstance(top_n, int) or not 1 <= top_n <= n_ok:
                raise InputError(
                    f"top_n must be an int from 1 to {n_ok} (the scored edges of {scores.graph.model_name}'s "
                    f"{scores.graph.n_edges:,}), got {top_n!r}. For the empty circuit use Circuit.from_edges(graph, []); "
                    "for every edge, top_n=" + str(n_ok) + ".")
            order = torch.sort(key, descending=True, stable=True).indices[:top_n]
            mask = torch.zeros(scores.graph.n_edges, dtype=torch.bool)
            mask[order] = True
            sel = {"method": "top_n", "top_n": top_n}
        else:
            mask = key >= threshold
            if not bool(mask.any()):
                best = float(key[key.isfinite()].max()) if n_ok else float("nan")
                raise InputError(
                    f"threshold {threshold:g} keeps no edge: the largest {what} is {best:.4g}. Use a threshold at or "
                    "below it, or top_n=N for the N best edges.")
            sel = {"method": "threshold", "threshold": float(threshold)}
        sel.update({"absolute": absolute, "n_edges": int(mask.sum())})
        out = cls(scores.graph, mask, scores.scores, sel, _meta(scores))
        return out.prune() if prune else out

    @classmethod
    def greedy(cls, scores: EdgeScores, n_edges: int, *, absolute: bool = True) -> Circuit:
        """Greedy selection from the logits backwards (EAP-IG's ``apply_greedy``): start with the edges into
        the logits as candidates; repeatedly take the best-ranked candidate; when its source node joins the
        circuit, the edges into that node's receivers become candidates. Every chosen edge leads to the
        logits, so the circuit stays connected on the logits side.

        Args:
            scores: :class:`EdgeScores`.
            n_edges: how many edges (1..number of scored edges).
            absolute: rank by ``|score|`` or by signed importance (see :meth:`from_scores`).

        Raises:
            InputError: n_edges outside 1..n.
        """
        g = scores.graph
        key = importance(scores, absolute=absolute)
        n_ok = int(key.isfinite().sum())
        if isinstance(n_edges, bool) or not isinstance(n_edges, int) or not 1 <= n_edges <= n_ok:
            raise InputError(f"n_edges must be an int from 1 to {n_ok} (the scored edges), got {n_edges!r}.")
        keys = key.tolist()
        src = g.edge_source.tolist()
        starts = torch.cat([torch.zeros(1, dtype=torch.long),
                            torch.bincount(g.edge_receiver, minlength=g.n_receivers).cumsum(0)]).tolist()
        reads = _readers(g)
        heap: list[tuple[float, int]] = []
        opened: set[int] = set()

        def open_receiver(r: int) -> None:
            if r not in opened:
                opened.add(r)
                for e in range(starts[r], starts[r + 1]):
                    heapq.heappush(heap, (-keys[e], e))

        open_receiver(g.n_receivers - 1)
        mask = torch.zeros(g.n_edges, dtype=torch.bool)
        joined: set[int] = set()
        taken = 0
        while taken < n_edges and heap:
            neg, e = heapq.heappop(heap)
            if neg == float("inf"):  # only unscored edges left
                break
            mask[e] = True
            taken += 1
            if src[e] not in joined:
                joined.add(src[e])
                for r in reads[src[e]]:
                    open_receiver(r)
        sel = {"method": "greedy", "n_edges": int(mask.sum()), "absolute": absolute}
        return cls(g, mask, scores.scores, sel, _meta(scores))

    @classmethod
    def from_edges(cls, graph: Graph, names, *, scores: Tensor | None = None) -> Circuit:
        """A circuit of the named edges (``"a3.h1->a5.h0<q>"``); an empty list gives the empty circuit.

        Raises:
            InputError: a name that is not an edge of the graph (with close names).
        """
        mask = torch.zeros(graph.n_edges, dtype=torch.bool)
        for name in names:
            mask[graph.edge_index(name)] = True
        return cls(graph, mask, scores, {"method": "edges", "n_edges": int(mask.sum())})

    @classmethod
    def from_nodes(cls, graph: Graph, nodes) -> Circuit:
        """Every edge out of the given nodes (names or indices): the edge form of a node circuit, whose
        edge-level and node-level ablations agree."""
        mask = graph.node_edges(list(nodes))
        return cls(graph, mask, None, {"method": "nodes", "n_edges": int(mask.sum())})

    def prune(self) -> Circuit:
        """The circuit without the edges that lie on no path from ``input`` to ``logits``.

        A node the input cannot reach through circuit edges computes, under corrupted-run patching, exactly
        its corrupted output, and an edge into a node that reaches no logit changes nothing downstream; so
        pruning leaves m(C) unchanged under ``corrupted`` ablation (not under mean or zero ablation, where a
        recomputed node differs from its ablated value). A key/value receiver counts as reaching the logits
        when any query head of its group does.
        """
        g = self.graph
        dense = g.dense(self.edges)  # [R, S]
        reads = _readers(g)
        fwd = torch.zeros(g.n_sources, dtype=torch.bool)
        fwd[0] = True
        for s in range(1, g.n_sources):
            fwd[s] = any(bool((dense[r] & fwd).any()) for r in reads[s])
        logits = g.n_receivers - 1
        live = torch.zeros(g.n_receivers, dtype=torch.bool)  # receivers whose reading reaches the logits
        live[logits] = True
        bwd = torch.zeros(g.n_sources, dtype=torch.bool)
        # a receiver's readers come after every source that writes to it, so `live` is final when it is used
        for s in range(g.n_sources - 1, -1, -1):
            bwd[s] = bool((dense[:, s] & live).any())
            for r in reads[s]:
                live[r] = live[r] or bool(bwd[s])
        keep = self.edges & fwd[g.edge_source] & live[g.edge_receiver]
        sel = {**self.selection, "pruned": True, "n_edges": int(keep.sum())}
        return Circuit(g, keep, self.scores, sel, dict(self.meta))

    # -- files ---------------------------------------------------------------------------------------------
    def to_dict(self, *, scores: str = "all") -> dict:
        """The JSON document (see :meth:`save`). ``scores``: ``"all"``, ``"circuit"`` (its edges only) or ``"none"``."""
        if scores not in ("all", "circuit", "none"):
            raise InputError(f"scores must be 'all', 'circuit' or 'none', got {scores!r}.")
        out_scores = {}
        if self.scores is not None and scores != "none":
            names = self.graph.edge_names()
            keep = torch.ones_like(self.edges) if scores == "all" else self.edges
            vals = self.scores.tolist()
            out_scores = {names[i]: (None if vals[i] != vals[i] else vals[i])
                          for i in sorted(keep.nonzero().flatten().tolist(), key=names.__getitem__)}
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "model": self.graph.model_name,
                "graph": _graph_shape(self.graph), "edges": self.edge_names(), "scores": out_scores,
                "selection": dict(self.selection), "meta": dict(self.meta)}

    def save(self, path, *, scores: str = "all") -> Path:
        """Write the circuit as JSON, atomically: ``{"format": "mechscope.circuit", "format_version": 1, "model",
        "graph": {n_layers, n_heads, n_kv_heads, parallel, n_edges}, "edges": [sorted names], "scores": {name:
        score} (sorted; all edges, the circuit's, or none), "selection", "meta"}``, one edge per line, so two
        circuits diff line by line. Scores are written exactly (float32 values as JSON doubles); NaN as null.

        Returns:
            the path written.
        """
        path = Path(path)
        write_json_atomic(self.to_dict(scores=scores), path)
        return path

    @classmethod
    def load(cls, path, graph: Graph) -> Circuit:
        """Read a circuit written by :meth:`save` onto ``graph``.

        Raises:
            CorruptFileError: not JSON, not this format, an unknown version or key.
            InputError: a circuit of another model (graph shapes differ, or an edge this graph lacks): the
                message names both models and the fix.
        """
        path = Path(path)
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise CorruptFileError(f"{path} is not a readable JSON circuit file ({e}).") from None
        return cls.from_dict(doc, graph, source=str(path))

    @classmethod
    def from_dict(cls, doc: dict, graph: Graph, *, source: str = "the circuit") -> Circuit:
        """The inverse of :meth:`to_dict` (see :meth:`load` for the errors)."""
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise CorruptFileError(f"{source} is not a mechscope circuit (its 'format' is not {FORMAT!r}).")
        if doc.get("format_version") != FORMAT_VERSION:
            raise CorruptFileError(f"{source} has format_version {doc.get('format_version')!r}; this mechscope reads "
                                   f"version {FORMAT_VERSION}. Upgrade mechscope or re-save the circuit.")
        unknown = sorted(set(doc) - set(_KEYS))
        missing = [k for k in _KEYS if k not in doc]
        if unknown or missing:
            raise CorruptFileError(f"{source}: unknown keys {unknown} / missing keys {missing} (expected {list(_KEYS)}).")
        theirs, ours = doc["model"], graph.model_name
        fix = (f"Load it onto the graph of {theirs} (Graph.from_model(mechscope.load(...)) of that model), or select a "
               f"new circuit for {ours} from its own edge scores.")
        if doc["graph"] != _graph_shape(graph):
            raise InputError(f"{source} holds a circuit of {theirs} (graph {doc['graph']}); this graph is {ours}'s "
                             f"({_graph_shape(graph)}). {fix}")
        index = {n: i for i, n in enumerate(graph.edge_names())}
        mask = torch.zeros(graph.n_edges, dtype=torch.bool)
        scores = torch.full((graph.n_edges,), float("nan")) if doc["scores"] else None
        for names, what in ((doc["edges"], "edge"), (doc["scores"], "scored edge")):
            bad = [n for n in names if n not in index]
            if bad:
                raise InputError(f"{source} (a circuit of {theirs}) names {len(bad)} {what}s that {ours}'s graph lacks, "
                                 f"e.g. {bad[:3]}. {fix}")
        mask[torch.tensor([index[n] for n in doc["edges"]], dtype=torch.long)] = True
        for n, s in doc["scores"].items():
            scores[index[n]] = float("nan") if s is None else s
        if theirs != ours:
            warnings.warn(f"{source} was selected on {theirs}; it is loaded onto {ours}, whose graph has the same shape. "
                          "Its edges are the same names, not necessarily the same mechanism.", UserWarning, stacklevel=3)
        return cls(graph, mask, scores, dict(doc["selection"]), dict(doc["meta"]))

    def to_mib(self, path=None) -> dict:
        """The circuit in EAP-IG's graph JSON, which MIB's circuit track reads: ``{"cfg": {n_layers, n_heads,
        parallel_attn_mlp}, "nodes": {name: in_graph}, "edges": {"src->dst": {"score", "in_graph"}}}`` over
        every edge, in EAP-IG's names (``a3.h1->a5.h0<q>``, ``m2->m4``, ``a9.h9->logits``).

        EAP-IG and MIB require keys and values per **query** head, so each GQA-native key/value edge
        ``u->a{L}.kv{G}<k>`` becomes one edge per query head of group G (``u->a{L}.h{H}<k>``), each carrying the
        native edge's score and in_graph flag (the native score on every copy: for EAP the copies' own scores
        would sum to it, so each copy's score here overstates that copy's share). Scores are written in MIB's
        sign, the signed importance (module docstring: ``-score`` for the logit difference, so MIB's
        ``absolute=False`` picks the edges this module's signed selection picks); null without scores.
        Nodes are ``in_graph`` when an edge leaves them (``logits``: when one enters it).

        Args:
            path: where to write it (atomically, compact JSON); None writes nothing.

        Returns:
            the document.
        """
        g = self.graph
        sign = 1.0 if self.meta.get("metric") in LOWER_IS_CLEAN else -1.0
        vals = None if self.scores is None else (sign * self.scores).tolist()
        rep = g.n_heads // g.n_kv_heads
        in_graph = self.edges.tolist()
        edges = {}
        for e, (name, r) in enumerate(zip(g.edge_names(), g.edge_receiver.tolist())):
            rec = g.receivers[r]
            score = None if vals is None or vals[e] != vals[e] else vals[e]
            if rec.kind in ("k", "v"):
                src = name.split("->")[0]
                for h in range(rec.index * rep, (rec.index + 1) * rep):
                    edges[f"{src}->a{rec.layer}.h{h}<{rec.kind}>"] = {"score": score, "in_graph": in_graph[e]}
            else:
                edges[name] = {"score": score, "in_graph": in_graph[e]}
        nodes_in = set(self.nodes)
        doc = {"cfg": {"n_layers": g.n_layers, "n_heads": g.n_heads, "parallel_attn_mlp": bool(g.parallel)},
               "nodes": {n: n in nodes_in for n in [*g.sources, "logits"]}, "edges": edges}
        if path is not None:
            write_text_atomic(json.dumps(doc, allow_nan=False), Path(path))
        return doc


def _undated(meta: dict) -> dict:
    """Provenance without its timestamp: two circuits made the same way at different times are equal."""
    return {k: v for k, v in meta.items() if k != "date"}


def _meta(scores: EdgeScores) -> dict:
    info = scores.info
    meta = {"task": info.get("task"), "metric": info.get("metric"), "method": scores.method, "steps": scores.steps,
            "n_prompts": info.get("n_prompts"), "date": datetime.now(UTC).isoformat(timespec="seconds")}
    return {k: v for k, v in meta.items() if v is not None}


__all__ = ["Circuit", "FORMAT", "FORMAT_VERSION", "LOWER_IS_CLEAN", "importance", "receiver_owners"]
