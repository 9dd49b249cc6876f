"""Which attention heads carry an edge of an attribution graph, and why they attended where they did.

An edge's weight is the sum over every path from its source to its target in the frozen local replacement
model that passes no other feature: through the residual stream, the transcoders' skip connections and the
attention heads' value/output circuits (patterns frozen). A path passes at most one head of each layer, so for
every layer ``l`` the edge splits exactly into the paths through each head of ``l`` plus those through none:

    edge = sum_h C[l, h] + R[l],    C[l, h] = sum_q < dT/dz[l, q, h],  dz[l, q, h] >

with ``dT/dz`` the gradient of the target at the head's output ``hook_z`` and ``dz`` the change the source
makes there (both in the linear frozen model, so this is exact, not a first-order estimate). A head's share
splits further over its (query, key) moves: ``C[l, h, q, k] = A[h, q, k] < dT/dz[l, q, h], dv[l, k, g(h)] >``
(``A`` the frozen pattern, ``v`` the values of the head's key/value group). For the heads that carry most, the
strongest move is passed to :func:`~mechscope.graphs.attention.explain_attention`, which splits that attention
score into the query- and key-side features that set it: why the head attended where it did.

References:
    Ameisen et al. 2025, "Circuit Tracing" (attention-mediated edges under frozen patterns; "what attention
    heads are doing" is left open there, circuit-tracer #53); Elhage et al. 2021 (OV and QK circuits).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from mechscope.core.errors import InputError
from mechscope.graphs.replacement import frozen_forward, replacement_state
from mechscope.graphs.transcoders import TranscoderSet


@dataclass
class HeadMove:
    """One head's share of an edge. ``moves``: its strongest ``(query_pos, key_pos, contribution)`` triples."""

    layer: int
    head: int
    contribution: float
    fraction: float
    moves: list[tuple[int, int, float]]

    def to_dict(self) -> dict:
        return {"layer": self.layer, "head": self.head, "contribution": self.contribution, "fraction": self.fraction,
                "moves": [list(m) for m in self.moves]}


@dataclass
class EdgeHeads:
    """What :func:`edge_heads` returns.

    Attributes:
        source / target: the nodes (dicts as :meth:`AttributionGraph.node`).
        edge: the edge measured in the frozen replacement model (target change per the source at its value).
        heads: float64 ``[n_layers, n_heads]``: ``C[l, h]``, the paths through head ``h`` of layer ``l``.
        residual: float64 ``[n_layers]``: ``R[l] = edge - sum_h C[l, h]``, the paths through no head of ``l``.
        top: the heads with the largest ``|C|`` (fraction = C / edge), each with its strongest moves.
        attention: for the first ``explain`` of them, the split of the strongest move's attention score
            (:class:`~mechscope.graphs.attention.AttentionExplanation`).
    """

    source: dict
    target: dict
    edge: float
    heads: Tensor
    residual: Tensor
    top: list[HeadMove]
    attention: list[Any] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"source": self.source, "target": self.target, "edge": self.edge,
                "heads": self.heads.tolist(), "residual": self.residual.tolist(),
                "top": [h.to_dict() for h in self.top], "attention": [a.to_dict() for a in self.attention]}


def _check_nodes(source: dict, target: dict, n_layers: int, P: int) -> None:
    if source.get("kind") not in ("feature", "error", "token"):
        raise InputError(f"an edge's source is a feature, error or token node, got a {source.get('kind')} node.")
    if target.get("kind") not in ("feature", "logit"):
        raise InputError(f"an edge's target is a feature or logit node, got a {target.get('kind')} node.")
    for n in (source, target):
        if not 0 <= int(n["pos"]) < P:
            raise InputError(f"position {n['pos']} is outside the prompt's {P} tokens.")
    if target["kind"] == "feature" and source["kind"] != "token" and not (
            source["layer"] < target["layer"] and source["pos"] <= target["pos"]):
        raise InputError(f"no edge runs from layer {source['layer']} position {source['pos']} to layer "
                         f"{target['layer']} position {target['pos']}: a source writes after its layer's MLP, at or "
                         "before the target's position.")


def edge_heads(model, transcoders: TranscoderSet, tokens: Tensor, source: dict, target: dict, *, top: int = 5,
               explain: int = 1, n_moves: int = 3, zero_first: bool = True,
               str_tokens: list[str] | None = None, state=None) -> EdgeHeads:
    """Split the edge ``source -> target`` of a prompt's attribution graph over the attention heads that carry it.

    Args:
        model: the HookedModel (plain dot-product attention). transcoders: the graph's transcoder set.
        tokens: the prompt ``[P]`` int64 (an :class:`AttributionGraph`'s ``tokens``, BOS included).
        source: a feature (``layer, pos, feature, activation``), error (``layer, pos``) or token (``pos``) node.
        target: a feature (``layer, pos, feature``) or logit (``token``, at the last position) node.
        top: heads listed. explain: how many of them get their strongest move's score explained (0: none).
        n_moves: (query, key) moves listed per head. zero_first: as the graph was made.
        state: the prompt's :func:`~mechscope.graphs.replacement.replacement_state` (made with ``zero_first``), when
            the caller keeps it (the web app does, per graph): saves two real forwards per call.

    Returns:
        :class:`EdgeHeads` (tensors on the CPU, computed where the model runs); ``edge`` equals the graph's adjacency
        entry (to float rounding).

    Raises:
        InputError: a node of the wrong kind, out of range, or a pair with no edge between them; attention the
            split does not cover (see :func:`~mechscope.graphs.attention.explain_attention`).
    """
    from mechscope.graphs.attention import explain_attention

    c = model.cfg
    tokens = tokens.reshape(-1)
    P, n = len(tokens), c.n_layers
    _check_nodes(source, target, n, P)
    st = state if state is not None else replacement_state(model, transcoders, tokens, zero_first=zero_first)
    if not torch.equal(st.tokens.cpu(), tokens.cpu()) or st.first_zeroed != zero_first:
        raise InputError("state= is the replacement state of another prompt (or of another zero_first); pass the "
                         "state of these tokens.")
    dt, dev, D = st.mlp_out.dtype, st.mlp_out.device, c.d_model
    deltas, embed_delta = None, None
    L, p = int(source.get("layer", -1)), int(source["pos"])
    if source["kind"] == "token":
        embed_delta = torch.zeros(2, P, D, dtype=dt, device=dev)
        embed_delta[1, p] = st.embed[p]
    else:
        vec = (float(source["activation"]) * transcoders[L].W_dec[int(source["feature"])].detach().to(dt)
               if source["kind"] == "feature" else st.errors[L, p])
        deltas = {L: torch.zeros(2, P, D, dtype=dt, device=dev)}
        deltas[L][1, p] = vec
    z, v = {}, {}

    def keep(store, i):
        def fn(x):
            y = x.clone()  # a new tensor, so the runtime puts it in the forward (the same one it would skip)
            y.retain_grad()
            store[i] = y
            return y
        return fn

    fns = {f"blocks.{i}.attn.hook_z": keep(z, i) for i in range(n)}
    fns.update({f"blocks.{i}.attn.hook_v": keep(v, i) for i in range(n)})
    with frozen_forward(model, transcoders, st, 2, deltas=deltas, embed_delta=embed_delta, functions=fns) as run:
        if target["kind"] == "feature":
            t = transcoders[int(target["layer"])]
            x = run.mlp_in[int(target["layer"])][:, int(target["pos"])]
            val = t.encode_pre(x.to(t.W_enc.dtype))[:, int(target["feature"])].double()
        else:
            lg = run.logits[:, -1].double()
            val = lg[:, int(target["token"])] - lg.mean(-1)
        val[0].backward()
    edge = float((val[1] - val[0]).detach())
    H = c.n_heads
    group = H // c.n_kv_heads
    heads = torch.zeros(n, H, dtype=torch.float64)
    grads = {}
    for i in range(n):
        g = z[i].grad
        if g is None:
            continue
        gz = g[0].double()  # [P, H, dh]: gradients are the same for both copies (the model is linear)
        heads[i] = (gz * (z[i][1] - z[i][0]).detach().double()).sum((0, 2)).cpu()  # C[l, h] = sum_q <dT/dz, dz>
        grads[i] = gz
    residual = edge - heads.sum(1)
    order = heads.flatten().abs().argsort(descending=True)[:top]
    top_heads = []
    for j in order.tolist():
        i, h = divmod(j, H)
        if heads[i, h] == 0:
            break
        # the head's (query, key) moves, only for the heads listed: A[h, q, k] <dT/dz[q, h], dv[k, g(h)]>
        dv = (v[i][1] - v[i][0]).detach().double()[:, h // group]  # [P(k), dh]
        M = (st.patterns[i][h].double() * (grads[i][:, h] @ dv.T)).flatten()  # [q * k]
        mv = M.abs().argsort(descending=True)[:n_moves].tolist()
        top_heads.append(HeadMove(i, h, float(heads[i, h]), float(heads[i, h] / edge) if edge else 0.0,
                                  [(k // P, k % P, float(M[k])) for k in mv]))
    expl = [explain_attention(model, transcoders, tokens, hm.layer, hm.head, hm.moves[0][0], hm.moves[0][1],
                              str_tokens=str_tokens, state=st) for hm in top_heads[:explain]]
    return EdgeHeads(source, target, edge, heads, residual, top_heads, expl)


def graph_edge_heads(model, transcoders: TranscoderSet, graph, source: int, target: int, **kwargs) -> EdgeHeads:
    """:func:`edge_heads` for nodes ``source`` and ``target`` (indices) of an :class:`AttributionGraph`."""
    return edge_heads(model, transcoders, graph.tokens, graph.node(source), graph.node(target),
                      zero_first=bool(graph.info.get("first_zeroed", True)), str_tokens=list(graph.str_tokens),
                      **kwargs)


def json_node(node: dict) -> dict:
    """A node of the graph JSON (:func:`~mechscope.graphs.to_neuronpedia`) as :meth:`AttributionGraph.node`'s dict."""
    kind = {"cross layer transcoder": "feature", "mlp reconstruction error": "error", "embedding": "token",
            "logit": "logit"}[node["feature_type"]]
    out = {"kind": kind, "pos": int(node["ctx_idx"])}
    if kind in ("feature", "error"):
        out["layer"] = int(node["layer"])
    if kind == "feature":
        out["feature"] = int(node["node_id"].split("_")[1])
        out["activation"] = float(node["activation"])
    if kind in ("token", "logit"):
        out["token"] = int(node["feature"])
    return out


def json_edge_heads(model, transcoders: TranscoderSet, graph_json: dict, source_id: str, target_id: str,
                    **kwargs) -> EdgeHeads:
    """:func:`edge_heads` for two node ids of a graph JSON (its ``metadata.mechscope.tokens`` is the prompt).

    Raises:
        InputError: an id not in the graph, a JSON without the prompt's token ids (not written by mechscope).
    """
    ms = graph_json["metadata"].get("mechscope") or {}
    if "tokens" not in ms:
        raise InputError("this graph JSON has no metadata.mechscope.tokens (it was not written by mechscope), so its "
                         "prompt cannot be re-run; compute the graph with `mechscope graph`.")
    nodes = {n["node_id"]: n for n in graph_json["nodes"]}
    for i in (source_id, target_id):
        if i not in nodes:
            raise InputError(f"node {i!r} is not in this graph; node ids are shown when a node is clicked.")
    strs = graph_json["metadata"].get("prompt_tokens")
    return edge_heads(model, transcoders, json_tokens(graph_json), json_node(nodes[source_id]),
                      json_node(nodes[target_id]), zero_first=json_first_zeroed(graph_json), str_tokens=strs,
                      **kwargs)


def json_tokens(graph_json: dict) -> Tensor:
    """The prompt's token ids ``[P]`` int64 from a graph JSON written by mechscope."""
    return torch.tensor(graph_json["metadata"]["mechscope"]["tokens"], dtype=torch.long)


def json_first_zeroed(graph_json: dict) -> bool:
    """Whether the graph dropped position 0's features (recorded since the field exists; True before)."""
    return bool((graph_json["metadata"].get("mechscope") or {}).get("first_zeroed", True))
