"""Attribution graphs over the prompts of one task, and what recurs among them.

:func:`task_graphs` builds one graph per clean prompt of a :class:`~mechscope.data.task.Task` (the circuits'
task format: built-in tasks or JSONL files of clean/corrupt/answer/wrong), with the answer and the wrong token as
the two target logits. :func:`aggregate` says which features (by layer and latent, wherever they fire) and which
edges between them recur in the pruned graphs, how often, and with what mean influence and weight — the
features that carry the task rather than one prompt.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch

from mechscope.core.errors import InputError
from mechscope.graphs.attribution import attribute
from mechscope.graphs.graph import AttributionGraph
from mechscope.graphs.prune import Pruned, prune


def task_graphs(model, transcoders, task, *, n: int | None = None, progress: bool = True,
                **attribute_kwargs) -> list[AttributionGraph]:
    """One graph per clean prompt of ``task`` (the first ``n``), targets: its answer and its wrong token.

    BOS is put in front of prompts that lack it (the transcoders were trained with it); the scored position
    must be the last (``task.position == -1``).

    Raises:
        InputError: a task scored at another position, ``n`` < 1.
    """
    if task.position != -1:
        raise InputError(f"task {task.name!r} is scored at position {task.position}; graphs explain the last "
                         "position's logits. Use a task scored at -1.")
    count = task.clean_tokens.shape[0] if n is None else n
    if count < 1:
        raise InputError(f"n must be >= 1, got {n}.")
    bos = getattr(model.tokenizer, "bos_token_id", None) if model.tokenizer is not None else None
    out = []
    from tqdm.auto import tqdm

    for i in tqdm(range(min(count, task.clean_tokens.shape[0])), desc="task graphs", disable=not progress):
        tok = task.clean_tokens[i]
        if bos is not None and int(tok[0]) != bos:
            tok = torch.cat([torch.tensor([bos], dtype=tok.dtype, device=tok.device), tok])
        out.append(attribute(model, transcoders, tok, targets=[int(task.answer[i]), int(task.wrong[i])],
                             progress=False, **attribute_kwargs))
    return out


@dataclass
class Aggregate:
    """What recurs in a set of pruned graphs.

    Attributes:
        n_graphs: graphs aggregated.
        features: ``(layer, latent) -> {"count", "mean_influence", "positions_from_end"}``, kept in ``count`` graphs.
        edges: ``(source, target) -> {"count", "mean_weight"}`` between features (``("F", layer, latent)``) and the
            first target logit (``("logit", 0)``), over the graphs where both ends are kept and the edge too.
    """

    n_graphs: int
    features: dict = field(default_factory=dict)
    edges: dict = field(default_factory=dict)

    def recurring(self, min_fraction: float = 0.5) -> list[tuple[tuple[int, int], dict]]:
        """Features kept in at least ``min_fraction`` of the graphs, most frequent (then most influential) first."""
        rows = [(k, v) for k, v in self.features.items() if v["count"] >= min_fraction * self.n_graphs]
        return sorted(rows, key=lambda kv: (-kv[1]["count"], -kv[1]["mean_influence"]))


def aggregate(graphs: list[AttributionGraph], pruned: list[Pruned] | None = None, *, node_threshold: float = 0.8,
              edge_threshold: float = 0.98) -> Aggregate:
    """Count the features and feature edges that the pruned graphs share (see :class:`Aggregate`).

    Raises:
        InputError: no graphs, or a ``pruned`` list of another length.
    """
    if not graphs:
        raise InputError("no graphs to aggregate.")
    pruned = pruned or [prune(g, node_threshold, edge_threshold) for g in graphs]
    if len(pruned) != len(graphs):
        raise InputError(f"{len(pruned)} pruning results for {len(graphs)} graphs.")
    feats: dict = defaultdict(lambda: {"count": 0, "influence": 0.0, "positions_from_end": set()})
    edges: dict = defaultdict(lambda: {"count": 0, "weight": 0.0})
    for g, pr in zip(graphs, pruned):
        nf = g.n_features
        key = {}
        seen = set()
        for i in pr.node_mask[:nf].nonzero().flatten().tolist():
            n = g.node(i)
            k = (n["layer"], n["feature"])
            key[i] = ("F", *k)
            if k not in seen:  # a latent kept at several positions of one graph counts once
                feats[k]["count"] += 1
                seen.add(k)
            feats[k]["influence"] += float(pr.influence[i])
            feats[k]["positions_from_end"].add(n["pos"] - g.n_pos)
        rows, cols = pr.edge_mask.nonzero(as_tuple=True)
        pair_seen = set()
        for r, c in zip(rows.tolist(), cols.tolist()):
            if c not in key or not (r < nf and r in key or r == nf):  # feature -> feature, or feature -> top logit
                continue
            tgt = key[r] if r < nf else ("logit", 0)
            pair = (key[c], tgt)
            if pair in pair_seen:
                continue
            pair_seen.add(pair)
            edges[pair]["count"] += 1
            edges[pair]["weight"] += float(g.edges[r, c])
    n = len(graphs)
    features = {k: {"count": v["count"], "mean_influence": v["influence"] / n,
                    "positions_from_end": sorted(v["positions_from_end"])} for k, v in feats.items()}
    out_edges = {k: {"count": v["count"], "mean_weight": v["weight"] / v["count"]} for k, v in edges.items()}
    return Aggregate(n, features, out_edges)
