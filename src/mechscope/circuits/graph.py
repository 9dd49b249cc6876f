"""The computational graph of a model: nodes that write to the residual stream, receivers that read it, and
every edge from an earlier writer to a later reader.

Nodes (sources, in topological order): ``input`` (the embeddings: the residual stream entering block 0),
one per attention head ``a{L}.h{H}`` (its output through W_O, without b_O), one per MLP ``m{L}``.
Receivers (readers, in topological order): each head's query input ``a{L}.h{H}<q>``; each key and value
input **per KV head** ``a{L}.kv{G}<k>`` / ``<v>`` (grouped-query attention kept native: a key/value head
is computed once from one input and shared by its query heads; for multi-head attention, where the two
coincide, receivers are named ``a{L}.h{H}<k>`` as in EAP-IG), each MLP's input ``m{L}``, and ``logits``
(the final residual stream). An edge ``u->r`` exists when ``u`` writes before ``r`` reads: every node of an
earlier layer, the same layer's heads for its MLP (not with GPT-NeoX's parallel residual, where both read
the block's input), and ``input`` for everything.

Because a pre-norm receiver reads the sum of the outputs of all earlier nodes (plus constant biases),
patching an edge is exact: receiver input = its input in this run + (source output on the corrupted run
- source output in this run). Edges are numbered receiver-major: edge ``e`` is ``(receiver[e], source[e])``.

SmolLM2-135M (30 layers, 9 query and 3 key/value heads) has 301 nodes, 481 receivers and 70,651 edges;
with keys and values copied per query head (what EAP-IG and MIB require) it would have 123,211.

References:
    Syed et al. 2023, "Attribution Patching Outperforms Automated Circuit Discovery" (the edge graph);
    Hanna et al. 2024, "Have Faith in Faithfulness" (EAP-IG's node and edge naming, kept here);
    Mueller et al. 2025, "MIB: A Mechanistic Interpretability Benchmark".
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

import torch
from torch import Tensor

from mechscope.core.errors import InputError

RECEIVER_KINDS = ("q", "k", "v", "mlp", "logits")


@dataclass(frozen=True)
class Receiver:
    """A place that reads the residual stream.

    Attributes:
        name: ``a{L}.h{H}<q>``, ``a{L}.kv{G}<k>`` (``a{L}.h{H}<k>`` without GQA), ``m{L}`` or ``logits``.
        kind: ``"q"``, ``"k"``, ``"v"``, ``"mlp"`` or ``"logits"``.
        layer: the block it belongs to (``n_layers`` for the logits).
        index: the query head (q) or key/value head (k, v); -1 for an MLP or the logits.
    """

    name: str
    kind: str
    layer: int
    index: int


class Graph:
    """The edge graph of one model (see the module docstring).

    Build it with :meth:`from_model`. Edge masks are boolean tensors ``[n_edges]``; :meth:`dense` turns
    one (or a stack ``[V, n_edges]``) into receiver-by-source matrices ``[.., n_receivers, n_sources]``.

    Attributes:
        model_name, n_layers, n_heads, n_kv_heads, parallel: the model's shape.
        sources: node names in topological order (``input`` first).
        receivers: :class:`Receiver` objects in topological order (``logits`` last).
        allowed: ``[n_receivers, n_sources]`` bool, the edges that exist.
        edge_receiver / edge_source: ``[n_edges]`` int64 indices of each edge's ends.
    """

    def __init__(self, model_name: str, n_layers: int, n_heads: int, n_kv_heads: int, parallel: bool):
        if n_heads % n_kv_heads:
            raise InputError(f"n_heads {n_heads} is not a multiple of n_kv_heads {n_kv_heads}.")
        self.model_name, self.n_layers, self.n_heads, self.n_kv_heads = model_name, n_layers, n_heads, n_kv_heads
        self.parallel = parallel
        H, G = n_heads, n_kv_heads
        kv = "kv" if G != H else "h"
        self.sources = ["input"] + [n for L in range(n_layers) for n in (*(f"a{L}.h{h}" for h in range(H)), f"m{L}")]
        recv = []
        for L in range(n_layers):
            recv += [Receiver(f"a{L}.h{h}<q>", "q", L, h) for h in range(H)]
            recv += [Receiver(f"a{L}.{kv}{g}<k>", "k", L, g) for g in range(G)]
            recv += [Receiver(f"a{L}.{kv}{g}<v>", "v", L, g) for g in range(G)]
            recv.append(Receiver(f"m{L}", "mlp", L, -1))
        recv.append(Receiver("logits", "logits", n_layers, -1))
        self.receivers = recv
        allowed = torch.zeros(len(recv), len(self.sources), dtype=torch.bool)
        for i, r in enumerate(recv):
            allowed[i, :self.upstream_count(r)] = True
        self.allowed = allowed
        self.edge_receiver, self.edge_source = allowed.nonzero(as_tuple=True)
        self._source_index = {n: i for i, n in enumerate(self.sources)}
        self._receiver_index = {r.name: i for i, r in enumerate(recv)}
        self._edge_names: list[str] | None = None
        self._edge_index: dict[str, int] | None = None

    @classmethod
    def from_model(cls, model) -> "Graph":
        """The graph of a HookedModel.

        Raises:
            InputError: Gemma 2/3, whose attention and MLP outputs pass through a norm before joining the
                residual stream: a head's effect on later layers is then not its own output, so edges do
                not decompose the residual and edge patching is not exact (use node-level activation
                patching, ``mechscope.analysis.activation_patching``, on these models).
        """
        if model.adapter.post_attn_norm:
            raise InputError(
                f"{model.cfg.name} ({model.cfg.family}) normalises each attention and MLP output before adding it "
                "to the residual stream, so a later layer does not read the sum of earlier nodes' outputs and edge "
                "patching would not be exact. Circuit discovery supports pre-norm models whose blocks add their "
                "outputs directly (Llama, Mistral, Qwen2/3, SmolLM, GPT-2, GPT-NeoX); for this model use "
                "node-level activation patching (mechscope.analysis.activation_patching).")
        c = model.cfg
        return cls(c.name, c.n_layers, c.n_heads, c.n_kv_heads, model.adapter.is_parallel(model.text_config))

    # -- sizes and names ---------------------------------------------------------------------------------
    @property
    def n_sources(self) -> int:
        return len(self.sources)

    @property
    def n_receivers(self) -> int:
        return len(self.receivers)

    @property
    def n_edges(self) -> int:
        return int(self.edge_receiver.numel())

    def upstream_count(self, r: Receiver) -> int:
        """How many sources (a prefix of :attr:`sources`) write before ``r`` reads."""
        H = self.n_heads
        before_layer = 1 + r.layer * (H + 1)
        if r.kind == "mlp" and not self.parallel:
            return before_layer + H
        return before_layer

    def layer_sources(self, layer: int) -> tuple[slice, int]:
        """(the slice of layer ``layer``'s heads in :attr:`sources`, the index of its MLP)."""
        start = 1 + layer * (self.n_heads + 1)
        return slice(start, start + self.n_heads), start + self.n_heads

    def receivers_of_layer(self, layer: int, kinds: tuple[str, ...] = ("q", "k", "v")) -> list[int]:
        """Indices of a layer's receivers of the given kinds, in order."""
        return [i for i, r in enumerate(self.receivers) if r.layer == layer and r.kind in kinds]

    def edge_names(self) -> list[str]:
        """``"source->receiver"`` for every edge, in edge order (EAP-IG's naming)."""
        if self._edge_names is None:
            self._edge_names = [f"{self.sources[s]}->{self.receivers[r].name}"
                                for r, s in zip(self.edge_receiver.tolist(), self.edge_source.tolist())]
        return self._edge_names

    def edge_index(self, name: str) -> int:
        """The index of an edge ``"source->receiver"``.

        Raises:
            InputError: no such edge (the message lists close names and says why it may not exist).
        """
        if self._edge_index is None:
            self._edge_index = {n: i for i, n in enumerate(self.edge_names())}
        if name in self._edge_index:
            return self._edge_index[name]
        src, _, dst = name.partition("->")
        why = ""
        if src in self._source_index and dst in self._receiver_index:
            why = f" {src} does not write before {dst} reads, so there is no such edge."
        elif src not in self._source_index:
            why = f" There is no node {src!r} (nodes: input, a{{L}}.h{{H}}, m{{L}} with L < {self.n_layers})."
        elif dst not in self._receiver_index:
            why = f" There is no receiver {dst!r} (receivers: {self.receivers[0].name}, ..., logits)."
        close = difflib.get_close_matches(name, self.edge_names(), n=3, cutoff=0.8)
        raise InputError(f"{name!r} is not an edge of {self.model_name}'s graph.{why}"
                         + (f" Closest: {close}." if close else ""))

    def node_index(self, name: str) -> int:
        """The index of a node (source) name.

        Raises:
            InputError: no such node, with close names.
        """
        if name not in self._source_index:
            close = difflib.get_close_matches(name, self.sources, n=3)
            raise InputError(f"{name!r} is not a node of {self.model_name}'s graph (nodes: input, a{{L}}.h{{H}}, "
                             f"m{{L}}).{' Closest: ' + str(close) + '.' if close else ''}")
        return self._source_index[name]

    # -- masks ---------------------------------------------------------------------------------------------
    def dense(self, edge_values: Tensor) -> Tensor:
        """Edge values ``[..., n_edges]`` as matrices ``[..., n_receivers, n_sources]`` (0 where no edge)."""
        if edge_values.shape[-1] != self.n_edges:
            raise InputError(f"expected {self.n_edges} edge values in the last axis, got {tuple(edge_values.shape)}.")
        out = torch.zeros(*edge_values.shape[:-1], self.n_receivers, self.n_sources, dtype=edge_values.dtype,
                          device=edge_values.device)
        out[..., self.edge_receiver.to(edge_values.device), self.edge_source.to(edge_values.device)] = edge_values
        return out

    def edges_of(self, matrix: Tensor) -> Tensor:
        """The inverse of :meth:`dense`: ``[..., n_receivers, n_sources]`` -> ``[..., n_edges]``."""
        return matrix[..., self.edge_receiver.to(matrix.device), self.edge_source.to(matrix.device)]

    def node_edges(self, nodes) -> Tensor:
        """Bool ``[n_edges]``: every edge out of the given nodes (names or indices)."""
        idx = torch.tensor([self.node_index(n) if isinstance(n, str) else int(n) for n in nodes], dtype=torch.long)
        return torch.isin(self.edge_source, idx)

    def edge_kind(self) -> list[str]:
        """Per edge, the receiver's kind (``q``, ``k``, ``v``, ``mlp``, ``logits``): the edge type."""
        kinds = [r.kind for r in self.receivers]
        return [kinds[r] for r in self.edge_receiver.tolist()]

    def __repr__(self) -> str:
        gqa = f"{self.n_heads} query / {self.n_kv_heads} key-value heads" if self.n_kv_heads != self.n_heads else \
            f"{self.n_heads} heads"
        return (f"Graph({self.model_name!r}: {self.n_layers} layers, {gqa}; {self.n_sources} nodes, "
                f"{self.n_receivers} receivers, {self.n_edges:,} edges)")
