"""Influence, pruning and the graph's replacement and completeness scores (Ameisen et al. 2025, "Circuit
Tracing", sections on pruning and graph evaluation; the definitions circuit-tracer implements).

- Â = |A| with each row divided by its sum (a target's inputs as fractions); rows of zeros stay zero.
- Influence I = w (Â + Â² + ...), where ``w`` holds the target logits' probabilities: how much of the
  logits' (probability-weighted) input flows from each node, along every path.
- Node pruning keeps the nodes that carry ``node_threshold`` of the total influence I (tokens and logits
  always); edge pruning scores each edge ``Â[t, s] * (I[t] + w[t])`` on the node-pruned graph and keeps
  ``edge_threshold`` of the total score; then nodes left without an outgoing edge (features, errors) or
  an incoming one (features) are dropped until nothing changes.
- Replacement score = influence reaching the tokens / (tokens + errors). Completeness score = the
  share of each node's input that does not come from error nodes, weighted by its influence (plus ``w``).

The cumulative thresholds are found without sorting all scores: a weighted histogram over log-spaced bins
finds the bin where the cumulative share crosses the threshold, and only that bin's scores are sorted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mechscope.core.errors import InputError


def normalize_rows(A: Tensor) -> Tensor:
    """``|A|`` with every non-zero row scaled to sum 1 (computed in float64 sums, returned in A's dtype)."""
    absA = A.abs()
    s = absA.sum(-1, keepdim=True, dtype=torch.float64).clamp_min(1e-30).to(A.dtype)
    return absA / s


def influence(An: Tensor, weights: Tensor, max_iter: int = 1000) -> Tensor:
    """``weights @ (An + An² + ...)`` by repeated products (An must be nilpotent: a DAG's normalised adjacency).

    Args:
        An: ``[N, N]`` normalised adjacency (target x source).
        weights: ``[N]`` the starting weights (the logits' probabilities).

    Raises:
        InputError: no convergence in ``max_iter`` products (the adjacency has a cycle).
    """
    cur = weights @ An
    total = cur.clone()
    for _ in range(max_iter):
        if not bool(cur.any()):
            return total
        cur = cur @ An
        total += cur
    raise InputError(f"influence did not converge in {max_iter} steps: the adjacency is not a DAG.")


def cumulative_threshold(scores: Tensor, fraction: float, bins: int = 4096) -> float:
    """The score ``t`` such that the scores ``>= t`` hold at least ``fraction`` of the total, with ``t`` as large
    as possible (the definition a descending sort and cumulative sum give), without sorting every score.

    Returns:
        the threshold; ``inf`` when every score is zero (nothing to keep).

    Raises:
        InputError: ``fraction`` outside [0, 1], or negative scores.
    """
    if not 0.0 <= fraction <= 1.0:
        raise InputError(f"a threshold fraction must lie in [0, 1], got {fraction}.")
    s = scores.reshape(-1)
    pos = s[s > 0]
    if not len(pos):
        return float("inf")
    if bool((s < 0).any()):
        raise InputError("cumulative thresholds need non-negative scores.")
    pos = pos.double()
    total = float(pos.sum())
    target = fraction * total
    lo, hi = float(pos.min()), float(pos.max())
    if lo == hi or len(pos) <= bins:
        ordered = pos.sort(descending=True).values
        k = int(torch.searchsorted(ordered.cumsum(0), torch.tensor(target, dtype=torch.float64, device=s.device)))
        return float(ordered[min(k, len(ordered) - 1)])
    logs = pos.log()
    edges_lo, edges_hi = float(logs.min()), float(logs.max())
    b = ((logs - edges_lo) / (edges_hi - edges_lo) * (bins - 1)).long().clamp_(0, bins - 1)
    mass = torch.zeros(bins, dtype=torch.float64, device=s.device).index_add_(0, b, pos)
    above = mass.flip(0).cumsum(0).flip(0)  # mass of bin j and every higher bin
    target = min(target, float(above[0]))  # fraction 1: summation order must not put the total out of reach
    # the highest bin j whose cumulative mass (from the top) reaches the target
    j = int((above >= target).nonzero().max())
    higher = float(above[j + 1]) if j + 1 < bins else 0.0
    inside = pos[b == j].sort(descending=True).values
    k = int(torch.searchsorted(higher + inside.cumsum(0), torch.tensor(target, dtype=torch.float64, device=s.device)))
    return float(inside[min(k, len(inside) - 1)])


def node_influence(graph, edges: Tensor | None = None) -> Tensor:
    """``[N]`` each node's influence on the logits through the graph's edges (``edges``: the block, default the
    graph's), by :func:`block_influence`; logits get 0 (add :meth:`logit_weights` for their own weight)."""
    R = graph.edges if edges is None else edges
    src = block_influence(normalize_rows(R.float()), graph.row_weights(), graph.n_features)
    return torch.cat([src, torch.zeros(graph.n_logits, dtype=src.dtype, device=src.device)])


def block_influence(Rn: Tensor, row_weights: Tensor, n_features: int, max_iter: int = 1000) -> Tensor:
    """Influence on the sources of a block adjacency whose rows are ``[features | logits]`` and whose first
    ``n_features`` columns are those same features: ``w (An + An² + ...)`` restricted to the sources.

    Raises:
        InputError: no convergence (a cycle among the features).
    """
    n_logits = Rn.shape[0] - n_features
    cur = row_weights @ Rn
    total = cur.clone()
    for _ in range(max_iter):
        nxt = torch.cat([cur[:n_features], torch.zeros(n_logits, dtype=cur.dtype, device=cur.device)])
        if not bool(nxt.any()):
            return total
        cur = nxt @ Rn
        total += cur
    raise InputError(f"influence did not converge in {max_iter} steps: the feature edges form a cycle.")


@dataclass
class Pruned:
    """The result of :func:`prune`.

    Attributes:
        node_mask: bool ``[N]`` nodes kept.
        edge_mask: bool, the shape of :attr:`AttributionGraph.edges`: edges kept (target row x source).
        influence: ``[N]`` each node's influence on the logits (0 for the logits themselves).
        node_threshold / edge_threshold: the fractions asked for.
    """

    node_mask: Tensor
    edge_mask: Tensor
    influence: Tensor
    node_threshold: float
    edge_threshold: float


def prune(graph, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> Pruned:
    """Prune a graph by cumulative influence (see the module docstring).

    Raises:
        InputError: a threshold outside [0, 1].
    """
    for name, v in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= v <= 1.0:
            raise InputError(f"{name} must lie in [0, 1], got {v}.")
    R = graph.edges.float()
    nf, keep_from, ns = graph.n_features, graph.token_start, graph.n_sources
    dev = R.device
    # node id of each row
    rows = torch.cat([torch.arange(nf, device=dev), torch.arange(graph.logit_start, graph.n_nodes, device=dev)])
    node_infl = node_influence(graph)  # without the logits' own weight, as circuit-tracer thresholds it
    node_mask = node_infl >= cumulative_threshold(node_infl, node_threshold)
    node_mask[keep_from:] = True  # tokens and logits always
    pruned = R * node_mask[rows][:, None] * node_mask[:ns][None, :]
    Rn = normalize_rows(pruned)
    rw = graph.row_weights()
    src_infl = block_influence(Rn, rw, nf)
    row_infl = torch.cat([src_infl[:nf], torch.zeros(graph.n_logits, device=dev)]) + rw
    edge_scores = Rn * row_infl[:, None]
    edge_mask = edge_scores >= cumulative_threshold(edge_scores, edge_threshold)
    edge_mask &= edge_scores > 0
    del edge_scores, Rn, pruned
    while True:
        old = node_mask.clone()
        node_mask[:keep_from] &= edge_mask[:, :keep_from].any(0)  # features and errors need an outgoing edge
        node_mask[:nf] &= edge_mask[:nf].any(1)  # features need an incoming edge
        edge_mask &= node_mask[rows][:, None] & node_mask[:ns][None, :]
        if torch.equal(old, node_mask):
            break
    return Pruned(node_mask, edge_mask, node_infl, node_threshold, edge_threshold)


def graph_scores(graph, pruned: Pruned | None = None) -> tuple[float, float]:
    """(replacement score, completeness score) of the graph, or of its pruned part (edges and nodes not kept
    set to zero).
    """
    R = graph.edges.float()
    if pruned is not None:
        R = R * pruned.edge_mask
    Rn = normalize_rows(R)
    rw = graph.row_weights()
    infl = block_influence(Rn, rw, graph.n_features)  # over the sources
    e0, t0 = graph.error_start, graph.token_start
    token_infl, error_infl = float(infl[t0:].sum()), float(infl[e0:t0].sum())
    replacement = token_infl / max(token_infl + error_infl, 1e-30)
    # rows of errors and tokens have no inputs (non-error share 1); feature and logit rows from the block
    non_error_rows = 1 - Rn[:, e0:t0].sum(-1)
    out_src = infl + graph.logit_weights()[:graph.n_sources]  # zero logit weight on sources
    out_rows = torch.cat([out_src[:graph.n_features], rw[graph.n_features:]])
    if pruned is not None:
        out_src = out_src * pruned.node_mask[:graph.n_sources]
        out_rows = out_rows * torch.cat([pruned.node_mask[:graph.n_features], pruned.node_mask[graph.logit_start:]])
    feat_rows = non_error_rows[:graph.n_features] * out_rows[:graph.n_features]
    num = float(feat_rows.sum() + (non_error_rows[graph.n_features:] * out_rows[graph.n_features:]).sum()
                + out_src[e0:].sum())
    den = float(out_src.sum() + out_rows[graph.n_features:].sum())
    return replacement, num / max(den, 1e-30)
