"""Supernodes suggested automatically, and each checked by steering its features together.

Ameisen et al. (2025) group features that play one role in a graph ("say Austin", "Texas") into supernodes by
hand; circuit-tracer users ask for help with it (its issue #20). Here a feature's role is its **signed edge
profile** in the pruned graph: its incoming edges from every source and its outgoing edges to every target, each
half scaled to unit norm. Features are clustered by average-linkage agglomeration on the cosine similarity of
their profiles, merging while the two closest clusters are at least ``threshold`` similar.

A suggested group is then **validated by steering it**: every member's activation is scaled by ``1 + alpha``
together in the real model (``alpha x activation x decoder row`` added to its MLP output), and the change of the
top target logit (demeaned) is compared with the graph's linear prediction (the members' path sums) and with
the same steering of random groups of kept features of the same size (the control).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from mechscope.core.errors import InputError
from mechscope.graphs.graph import AttributionGraph
from mechscope.graphs.prune import Pruned
from mechscope.hooks.interventions import Add


@dataclass
class Supernode:
    """A suggested group of feature nodes.

    Attributes:
        nodes: the members' node ids (features of the graph).
        similarity: mean pairwise cosine similarity of their edge profiles.
        layers / positions: the members' layers and positions (sorted, distinct).
        label: a short description: the positions' tokens and the layers.
    """

    nodes: list[int]
    similarity: float
    layers: list[int]
    positions: list[int]
    label: str

    def to_dict(self) -> dict:
        return asdict(self)


def edge_profiles(graph: AttributionGraph, pruned: Pruned) -> tuple[Tensor, Tensor]:
    """(kept feature node ids ``[F']``, their profiles ``[F', n_rows + n_sources]``): signed incoming edges (from
    kept sources) and outgoing edges (to kept targets), each half scaled to unit norm."""
    nf = graph.n_features
    kept = pruned.node_mask[:nf].nonzero().flatten()
    E = graph.edges.float() * pruned.edge_mask
    incoming = E[kept]  # [F', n_sources]
    outgoing = E[:, kept].T  # [F', n_rows]

    def unit(x):
        return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    return kept, torch.cat([unit(incoming), unit(outgoing)], -1) / 2 ** 0.5


def suggest_supernodes(graph: AttributionGraph, pruned: Pruned, *, threshold: float = 0.7,
                       min_size: int = 2) -> list[Supernode]:
    """Groups of kept features with similar signed edge profiles (average linkage, cosine >= ``threshold``).

    Returns:
        the groups of at least ``min_size`` members, most similar first.

    Raises:
        InputError: a threshold outside (-1, 1], ``min_size`` < 2.
    """
    if not -1.0 < threshold <= 1.0:
        raise InputError(f"threshold must lie in (-1, 1], got {threshold}.")
    if min_size < 2:
        raise InputError(f"min_size must be >= 2 (a supernode groups features), got {min_size}.")
    kept, prof = edge_profiles(graph, pruned)
    n = len(kept)
    if n < 2:
        return []
    S = (prof @ prof.T).double()  # cosine similarities (profiles are unit vectors)
    clusters = [[i] for i in range(n)]
    sums = S.clone()  # sum of pairwise similarities between clusters i and j
    size = torch.ones(n, dtype=torch.float64, device=S.device)
    alive = torch.ones(n, dtype=torch.bool, device=S.device)
    while True:
        avg = sums / (size[:, None] * size[None, :])
        avg.fill_diagonal_(-float("inf"))
        avg[~alive] = -float("inf")
        avg[:, ~alive] = -float("inf")
        flat = int(avg.argmax())
        i, j = divmod(flat, n)
        if avg[i, j] < threshold:
            break
        clusters[i] += clusters[j]
        clusters[j] = []
        sums[i] += sums[j]
        sums[:, i] += sums[:, j]
        size[i] += size[j]
        alive[j] = False
    out = []
    for c in clusters:
        if len(c) < min_size:
            continue
        idx = torch.tensor(c, device=S.device)
        sub = S[idx][:, idx]
        sim = float((sub.sum() - sub.diagonal().sum()) / (len(c) * (len(c) - 1)))
        nodes = sorted(int(kept[i]) for i in c)
        info = [graph.node(i) for i in nodes]
        layers = sorted({d["layer"] for d in info})
        positions = sorted({d["pos"] for d in info})
        toks = ", ".join(repr(graph.str_tokens[p]) for p in positions[:4])
        label = f"{len(nodes)} features at {toks}{'…' if len(positions) > 4 else ''}, layers {layers[0]}–{layers[-1]}"
        out.append(Supernode(nodes, sim, layers, positions, label))
    return sorted(out, key=lambda s: -s.similarity)


@dataclass
class SteeringCheck:
    """The result of :func:`steer_supernode`.

    Attributes:
        alpha: each member's activation was scaled by ``1 + alpha``.
        effect: the real model's change of the top target's demeaned logit.
        predicted: the graph's linear prediction (the members' path sums to that logit, times alpha).
        random_effects: the same steering of random groups of kept features of the same size.
        beats_random: ``|effect|`` exceeds every random group's.
    """

    alpha: float
    effect: float
    predicted: float
    random_effects: list[float]
    beats_random: bool

    def to_dict(self) -> dict:
        return asdict(self)


def _group_deltas(model, transcoders, graph: AttributionGraph, nodes: list[int], alpha: float) -> dict[int, Tensor]:
    P, D = graph.n_pos, model.cfg.d_model
    deltas: dict[int, Tensor] = {}
    for i in nodes:
        n = graph.node(i)
        d = deltas.setdefault(n["layer"], torch.zeros(1, P, D, dtype=model.dtype, device=model.device))
        row = transcoders[n["layer"]].W_dec[n["feature"]].detach()
        d[0, n["pos"]] += alpha * n["activation"] * row.to(d.device, d.dtype)
    return deltas


def _top_logit(model, graph: AttributionGraph, deltas: dict[int, Tensor] | None = None) -> float:
    """The top target's demeaned logit in the real model, with ``deltas`` added to the MLP outputs."""
    t = int(graph.logit_tokens[0])
    with torch.no_grad():
        lg = model.run(graph.tokens[None].to(model.device), logits_to_keep=1,
                       interventions=[Add(f"blocks.{L}.hook_mlp_out", direction=d) for L, d in (deltas or {}).items()]
                       ).logits[0, -1].double()
    return float(lg[t] - lg.mean())


def steer_supernode(model, transcoders, graph: AttributionGraph, pruned: Pruned, nodes: list[int], *,
                    alpha: float = -1.0, n_random: int = 8, seed: int = 0) -> SteeringCheck:
    """Steer a group of features together in the real model (``alpha=-1`` ablates them) and compare with the
    graph's prediction and with random groups of kept features of the same size.

    Raises:
        InputError: a node that is not a feature of the graph.
    """
    from mechscope.graphs.validate import _path_sums

    for i in nodes:
        if graph.node_kind(i) != "feature":
            raise InputError(f"node {i} is a {graph.node_kind(i)} node; a supernode groups features.")
    base = _top_logit(model, graph)  # once for the group and every random group
    effect = _top_logit(model, graph, _group_deltas(model, transcoders, graph, nodes, alpha)) - base
    delta = torch.zeros(graph.n_features, 1, dtype=torch.float64, device=graph.edges.device)
    for i in nodes:
        delta[i, 0] = alpha * float(graph.activations[graph.selected[i]])
    predicted = float(_path_sums(graph, delta)[0, 0])
    pool = [int(i) for i in pruned.node_mask[:graph.n_features].nonzero().flatten() if int(i) not in set(nodes)]
    g = torch.Generator().manual_seed(seed)
    rand = []
    for _ in range(n_random if len(pool) >= len(nodes) else 0):
        pick = [pool[int(k)] for k in torch.randperm(len(pool), generator=g)[:len(nodes)]]
        rand.append(_top_logit(model, graph, _group_deltas(model, transcoders, graph, pick, alpha)) - base)
    return SteeringCheck(alpha, effect, predicted, rand, bool(rand) and abs(effect) > max(abs(r) for r in rand))
