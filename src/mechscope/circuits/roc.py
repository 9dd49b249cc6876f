"""ROC curves and their area against a known circuit: for edge scores (rank by magnitude) and for a family
of discovered circuits (one per threshold, e.g. an ACDC tau sweep).

A discovered circuit C is compared with a known edge set K over all edges of the graph:
TPR = |C ∩ K| / |K|, FPR = |C \\ K| / |not K|. For scores, every threshold on |score| gives a circuit; the
area under that curve is the probability that a known edge outranks an edge outside K (ties count one
half), the Mann-Whitney form. For a sweep, the points are joined by straight lines from (0, 0) to (1, 1)
and the area taken by the trapezoid rule, as the ACDC paper does for its tau sweeps.

References:
    Conmy et al. 2023, "Towards Automated Circuit Discovery for Mechanistic Interpretability", section 4.1
    (ROC curves of edges recovered against the known circuits, AUC tables).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mechscope.core.errors import InputError


@dataclass(frozen=True)
class ROC:
    """Points of a ROC curve and its area.

    Attributes:
        fpr / tpr: float64 ``[k]``, sorted by fpr (then tpr), starting at (0, 0) and ending at (1, 1).
        auc: the area under the curve, 0..1 (0.5: chance).
        n_known / n_other: edges in and outside the known circuit.
        thresholds: per point, the threshold that gave it (tau for a sweep; NaN for the added ends).
    """

    fpr: Tensor
    tpr: Tensor
    auc: float
    n_known: int
    n_other: int
    thresholds: Tensor | None = None


def _check_known(known: Tensor, n: int) -> Tensor:
    known = torch.as_tensor(known).flatten().bool().cpu()
    if known.numel() != n:
        raise InputError(f"the known circuit has {known.numel()} entries for {n} edges; give one bool per edge.")
    k = int(known.sum())
    if k == 0 or k == n:
        raise InputError(f"the known circuit holds {k} of {n} edges; a ROC curve needs edges both in and outside it.")
    return known


def roc_auc(scores: Tensor, known: Tensor, *, absolute: bool = True) -> ROC:
    """The ROC curve of ranking edges by score against a known circuit.

    Args:
        scores: ``[n_edges]`` edge scores (e.g. :class:`~mechscope.circuits.attribution.EdgeScores`'s
            ``scores``).
        known: bool ``[n_edges]``, the edges of the known circuit.
        absolute: rank by ``|score|`` (default: a large effect of either sign is in the circuit).

    Returns:
        :class:`ROC`; ``auc`` is P(score of a known edge > score of another edge) + 0.5 P(tie).

    Raises:
        InputError: shapes that differ; a known set that is empty or holds every edge.
    """
    s = torch.as_tensor(scores).flatten().double().cpu()
    known = _check_known(known, s.numel())
    key = s.abs() if absolute else s
    pos, neg = key[known], key[~known]
    # ranks with ties averaged: AUC = (sum of positive ranks - n_pos (n_pos + 1) / 2) / (n_pos n_neg)
    order = torch.cat([pos, neg])
    sorted_vals, idx = order.sort()
    ranks = torch.empty_like(sorted_vals)
    i = 0
    vals = sorted_vals.tolist()
    while i < len(vals):
        j = i
        while j + 1 < len(vals) and vals[j + 1] == vals[i]:
            j += 1
        ranks[i:j + 1] = (i + j) / 2 + 1
        i = j + 1
    r = torch.empty_like(ranks)
    r[idx] = ranks
    n_pos, n_neg = pos.numel(), neg.numel()
    auc = float((r[:n_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
    thr = torch.unique(key).flip(0)
    tpr = torch.stack([(pos >= t).double().mean() for t in thr]) if thr.numel() else torch.zeros(0)
    fpr = torch.stack([(neg >= t).double().mean() for t in thr]) if thr.numel() else torch.zeros(0)
    zero, one = torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    return ROC(torch.cat([zero, fpr, one]), torch.cat([zero, tpr, one]), auc, n_pos, n_neg,
               torch.cat([torch.full((1,), float("nan"), dtype=torch.float64), thr.double(),
                          torch.full((1,), float("nan"), dtype=torch.float64)]))


def roc_of_circuits(circuits: Tensor, known: Tensor, thresholds=None) -> ROC:
    """The ROC curve of a family of circuits (e.g. one per ACDC tau) against a known circuit.

    Args:
        circuits: bool ``[k, n_edges]``, one discovered circuit per row.
        known: bool ``[n_edges]``.
        thresholds: ``[k]`` the threshold of each row (kept with its point), or None.

    Returns:
        :class:`ROC` with the points sorted by (fpr, tpr), (0, 0) and (1, 1) added, and the trapezoid area.

    Raises:
        InputError: shapes that differ; an empty or full known set; no circuits.
    """
    c = torch.as_tensor(circuits).bool().cpu()
    if c.dim() == 1:
        c = c[None]
    if c.shape[0] == 0:
        raise InputError("no circuits given; pass one bool edge mask per threshold, [k, n_edges].")
    known = _check_known(known, c.shape[1])
    tpr = (c & known).sum(1).double() / int(known.sum())
    fpr = (c & ~known).sum(1).double() / int((~known).sum())
    thr = torch.full((c.shape[0],), float("nan"), dtype=torch.float64) if thresholds is None else \
        torch.as_tensor(thresholds, dtype=torch.float64).flatten()
    if thr.numel() != c.shape[0]:
        raise InputError(f"{thr.numel()} thresholds for {c.shape[0]} circuits.")
    nan = torch.full((1,), float("nan"), dtype=torch.float64)
    fpr = torch.cat([torch.zeros(1, dtype=torch.float64), fpr, torch.ones(1, dtype=torch.float64)])
    tpr = torch.cat([torch.zeros(1, dtype=torch.float64), tpr, torch.ones(1, dtype=torch.float64)])
    thr = torch.cat([nan, thr, nan])
    order = sorted(range(fpr.numel()), key=lambda i: (float(fpr[i]), float(tpr[i])))
    fpr, tpr, thr = fpr[order], tpr[order], thr[order]
    auc = float(torch.trapezoid(tpr, fpr))
    return ROC(fpr, tpr, auc, int(known.sum()), int((~known).sum()), thr)


__all__ = ["ROC", "roc_auc", "roc_of_circuits"]
