"""How faithful a circuit is: normalised faithfulness with bootstrap intervals, MIB's CPR and CMD curves, and
the same circuit under every ablation.

Normalised faithfulness (Marks et al. 2024; MIB):

    f(C) = (m(C) - m(∅)) / (m(M) - m(∅)),

with m the task metric averaged over prompts (raw units, e.g. nats of logit difference), m(M) the clean
model, m(∅) the model with every edge ablated and m(C) the model with only the circuit's edges kept. 1 = the
full model's behaviour, 0 = none of it; values above 1 and below 0 happen. Every number comes with a 95%
percentile bootstrap interval over prompts: a resample draws prompts with replacement and recomputes the
ratio of its means (numerator and denominator resampled together). Because one ratio of means hides how
prompts differ, the per-prompt ratios' median and interquartile range come with it (Miller et al. 2024).
Every result names its ablation (``corrupted``, ``mean``, ``zero``) and level (``edge``, ``node``): the
same circuit's faithfulness moves a lot between them (:func:`robustness_table`).

References:
    Marks et al. 2024, "Sparse Feature Circuits", section 3 (normalised faithfulness);
    Mueller et al. 2025, "MIB: A Mechanistic Interpretability Benchmark", section 4 (CPR, CMD);
    Miller, Chughtai and Saunders 2024, "Transformer Circuit Evaluation Metrics Are Not Robust", section 4.
"""

from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import dataclass, field

import torch
from jaxtyping import Int
from torch import Tensor

from mechscope.analysis.bootstrap import CI, bootstrap_ci
from mechscope.circuits.ablation import ABLATIONS, LEVELS, ablated_edges, measure
from mechscope.circuits.attribution import EdgeScores
from mechscope.circuits.circuit import Circuit
from mechscope.core.errors import InputError

#: MIB's circuit sizes, in percent of the graph's edges.
MIB_PERCENTS = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0)
#: A per-prompt ratio is defined where |m_i(M) - m_i(∅)| exceeds this (metric units).
MIN_PROMPT_EFFECT = 1e-6


def faithfulness_of_means(c: Tensor, z: Tensor, m: Tensor) -> Tensor:
    """``(mean c - mean z) / (mean m - mean z)`` over axis 1 (the bootstrap's prompt axis); ``c`` may carry more
    axes (sizes), ``z`` and ``m`` are ``[B, n]``."""
    zm = z.mean(1)
    den = m.mean(1) - zm
    extra = (None,) * (c.dim() - 2)
    return (c.mean(1) - zm[(...,) + extra]) / den[(...,) + extra]


def per_prompt_spread(mC: Tensor, m0: Tensor, mM: Tensor) -> dict:
    """Median and interquartile range of per-prompt ratios ``(mC_i - m0_i) / (mM_i - m0_i)`` over the prompts
    where the denominator exceeds :data:`MIN_PROMPT_EFFECT` (the others are counted, not used)."""
    den = mM - m0
    ok = den.abs() > MIN_PROMPT_EFFECT
    if not bool(ok.any()):
        return {"median": math.nan, "q25": math.nan, "q75": math.nan, "iqr": math.nan, "n_defined": 0}
    r = ((mC - m0)[ok] / den[ok]).double()
    q25, med, q75 = torch.quantile(r, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)).tolist()
    return {"median": med, "q25": q25, "q75": q75, "iqr": q75 - q25, "n_defined": int(ok.sum())}


@dataclass(frozen=True)
class CircuitEvaluation:
    """One circuit's faithfulness under one ablation at one level.

    Attributes:
        faithfulness: f(C) with its 95% bootstrap interval (dimensionless, 1 = the full model).
        m_model / m_empty / m_circuit: the mean metric of the clean model, the all-ablated model and the
            circuit, each with its interval (the task metric's raw units).
        per_prompt: per-prompt ratios where defined: ``median``, ``q25``, ``q75``, ``iqr``, ``n_defined``.
        ablation: ``corrupted``, ``mean`` or ``zero``. level: ``edge`` or ``node``.
        n_prompts, n_edges (in the circuit), n_nodes, task, metric.
        note: what to know when reading it (an empty circuit, an undefined ratio), or "".
        values: per-prompt metric ``{"model", "empty", "circuit"}``, float64 ``[n]``.
    """

    faithfulness: CI
    m_model: CI
    m_empty: CI
    m_circuit: CI
    per_prompt: dict
    ablation: str
    level: str
    n_prompts: int
    n_edges: int
    n_nodes: int
    task: str
    metric: str
    note: str = ""
    values: dict = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict:
        """JSON-ready (no per-prompt values)."""
        return {"ablation": self.ablation, "level": self.level, "task": self.task, "metric": self.metric,
                "n_prompts": self.n_prompts, "n_edges": self.n_edges, "n_nodes": self.n_nodes,
                "faithfulness": self.faithfulness.to_dict(), "m_model": self.m_model.to_dict(),
                "m_empty": self.m_empty.to_dict(), "m_circuit": self.m_circuit.to_dict(),
                "per_prompt": dict(self.per_prompt), "note": self.note}

    def __str__(self) -> str:
        f, p = self.faithfulness, self.per_prompt
        return (f"faithfulness {f.estimate:.3f} [{f.low:.3f}, {f.high:.3f}] ({self.ablation} ablation, {self.level} level; "
                f"{self.n_edges:,} edges, {self.n_nodes} nodes, {self.n_prompts} prompts of {self.task}); per prompt "
                f"median {p['median']:.3f}, IQR {p['iqr']:.3f}; {self.metric}: model {self.m_model.estimate:+.3f}, "
                f"circuit {self.m_circuit.estimate:+.3f}, all ablated {self.m_empty.estimate:+.3f}"
                + (f". {self.note}" if self.note else ""))


def _check(ablation: str, level: str, n_boot: int) -> None:
    if ablation not in ABLATIONS:
        raise InputError(f"unknown ablation {ablation!r}; use one of {ABLATIONS}.")
    if level not in LEVELS:
        raise InputError(f"unknown level {level!r}; use one of {LEVELS}.")
    if n_boot < 10:
        raise InputError(f"n_boot must be >= 10 resamples (1000 is usual), got {n_boot}.")


def _evaluation(circuit: Circuit, task, mM: Tensor, m0: Tensor, mC: Tensor, ablation: str, level: str, n_boot: int,
                seed: int, warn: bool = True) -> CircuitEvaluation:
    n = mM.shape[0]
    what = f"normalised faithfulness ({ablation} ablation, {level} level)"
    notes = []
    if circuit.is_empty:
        notes.append("The circuit is empty: m(C) is the all-ablated baseline m(∅), so its faithfulness is 0 by "
                     "definition.")
    if abs(float(mM.mean() - m0.mean())) <= MIN_PROMPT_EFFECT:
        notes.append(f"m(M) and m(∅) are equal on these prompts ({float(mM.mean()):+.4g}): the ablation removes no "
                     "behaviour, so faithfulness is undefined (NaN).")
    for note in notes:
        if warn:
            warnings.warn(f"{what}: {note}", UserWarning, stacklevel=3)
    f = bootstrap_ci((mC, m0, mM), statistic=faithfulness_of_means, n_boot=n_boot, seed=seed)
    if warn and not notes:
        f.warn_if_wide(0.1, what=what)
    mean_ci = [bootstrap_ci(v, n_boot=n_boot, seed=seed) for v in (mM, m0, mC)]
    return CircuitEvaluation(f, *mean_ci, per_prompt_spread(mC, m0, mM), ablation, level, n, circuit.n_edges,
                             len(circuit.nodes), task.name, task.metric, " ".join(notes),
                             {"model": mM, "empty": m0, "circuit": mC})


def evaluate_circuit(model, task, circuit: Circuit, *, ablation: str = "corrupted", level: str = "edge",
                     reference: Int[Tensor, "n_ref pos"] | None = None, batch_size: int = 16, rows_per_forward: int = 64,
                     n_boot: int = 1000, seed: int = 0, progress: bool = False) -> CircuitEvaluation:
    """Normalised faithfulness of a circuit on a task, with bootstrap intervals over prompts.

    Cost per batch of prompts: one clean forward, one corrupted forward (``corrupted`` ablation) and two
    patched variants (m(∅) and m(C), stacked in one forward); a circuit of every edge needs only m(∅) (its m(C)
    is the clean run exactly, so its faithfulness is exactly 1). On SmolLM2 a patched variant costs 1.3x a
    plain forward for m(∅) and circuits up to ~100 edges, ~1.8x at 1,000 and ~2.5x at 10,000-35,000 edges
    (bench/circuits.py).

    Args:
        model: the HookedModel the circuit's graph was built from.
        task: a :class:`~mechscope.data.task.Task` (its prompts, metric and position).
        circuit: the :class:`Circuit`.
        ablation: what edges outside the circuit carry: ``corrupted`` (the paired corrupted prompt's value),
            ``mean`` (the mean over ``reference``, per position) or ``zero``.
        level: ``edge`` (every edge outside the circuit is ablated) or ``node`` (every edge out of every node
            outside :attr:`Circuit.nodes`).
        reference: ``[n_ref, pos]`` prompts for the mean (default: the task's corrupted prompts).
        batch_size: prompts per batch. rows_per_forward: variants x prompts per forward (memory).
        n_boot: bootstrap resamples. seed: their seed.
        progress: a progress bar.

    Returns:
        :class:`CircuitEvaluation`.

    Raises:
        InputError: an unknown ablation or level; a circuit of another model; a reference of another length.

    Warns:
        UserWarning: the faithfulness interval is wider than 0.1; the circuit is empty (its faithfulness is 0
            by definition); m(M) = m(∅) (faithfulness undefined).

    References:
        Marks et al. 2024 (normalised faithfulness); Miller et al. 2024 (ablation, level, per-prompt spread).
    """
    _check(ablation, level, n_boot)
    masks = torch.stack([torch.ones(circuit.graph.n_edges, dtype=torch.bool), ablated_edges(circuit, level)])
    mM, (vals,) = measure(model, circuit.graph, task, [(ablation, masks)], reference=reference, batch_size=batch_size,
                          rows_per_forward=rows_per_forward, progress=progress)
    return _evaluation(circuit, task, mM, vals[0], vals[1], ablation, level, n_boot, seed)


@dataclass(frozen=True)
class FaithfulnessCurve:
    """Faithfulness of circuits of growing size, and the area MIB scores.

    Attributes:
        kind: ``cpr`` (circuits by signed importance; area under f, higher is better) or ``cmd`` (circuits by
            |score|; area under |1 - f|, lower is better).
        percents: the sizes, in percent of the graph's edges.
        n_edges: edges selected at each size (``int(percent / 100 * n_edges)``); n_kept: after pruning.
        faithfulness: f at each size, a CI whose fields are float64 ``[K]`` tensors.
        area: CPR or CMD with its interval (each resample recomputes the whole curve from the same prompts).
        ablation, level, task, metric, method (of the scores), n_prompts.
        values: per-prompt metric ``{"model" [n], "empty" [n], "circuits" [n, K]}``.
    """

    kind: str
    percents: tuple
    n_edges: tuple
    n_kept: tuple
    faithfulness: CI
    area: CI
    ablation: str
    level: str
    task: str
    metric: str
    method: str
    n_prompts: int
    values: dict = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "percents": list(self.percents), "n_edges": list(self.n_edges),
                "n_kept": list(self.n_kept), "faithfulness": self.faithfulness.to_dict(), "area": self.area.to_dict(),
                "ablation": self.ablation, "level": self.level, "task": self.task, "metric": self.metric,
                "method": self.method, "n_prompts": self.n_prompts}

    def __str__(self) -> str:
        a = self.area
        lines = [(f"{self.kind.upper()} {a.estimate:.3f} [{a.low:.3f}, {a.high:.3f}] ({self.method} scores, "
                  f"{self.ablation} ablation, {self.level} level, {self.n_prompts} prompts of {self.task})"),
                 f"{'% edges':>8} {'edges':>8} {'kept':>8} {'f':>8} {'95% CI':>20}"]
        f = self.faithfulness
        for i, p in enumerate(self.percents):
            lines.append(f"{p:>8g} {self.n_edges[i]:>8,} {self.n_kept[i]:>8,} {float(f.estimate[i]):>8.3f} "
                         f"{'[' + format(float(f.low[i]), '.3f') + ', ' + format(float(f.high[i]), '.3f') + ']':>20}")
        return "\n".join(lines)


def area_statistic(x: Tensor, kind: str):
    """The bootstrap statistic of a curve: ``(c [B, n, K], z [B, n], m [B, n]) -> [B, K + 1]``, f at each size
    then the area (trapezoid over ``x`` on a linear axis; ``cmd`` integrates ``|1 - f|``)."""
    def stat(c, z, m):
        f = faithfulness_of_means(c, z, m)
        y = f if kind == "cpr" else (1 - f).abs()
        return torch.cat([f, torch.trapezoid(y, x.to(f.dtype), dim=-1)[:, None]], dim=1)
    return stat


def faithfulness_curve(model, task, scores: EdgeScores, *, sizes=MIB_PERCENTS, kind: str = "cpr",
                       ablation: str = "corrupted", level: str = "edge", prune: bool = True,
                       reference: Int[Tensor, "n_ref pos"] | None = None, batch_size: int = 16, rows_per_forward: int = 64,
                       n_boot: int = 1000, seed: int = 0, progress: bool = False) -> FaithfulnessCurve:
    """MIB's faithfulness curve of a scoring: circuits of every size in ``sizes``, f of each, and its area.

    What is selected (MIB's evaluation code): at each size p, ``int(p / 100 * n_edges)`` edges by
    :meth:`Circuit.from_scores` top-n (signed importance for ``cpr``: ``-score``, the edges whose patching
    most lowers the metric, which is MIB's "highest signed score" under its loss sign; ``|score|`` for
    ``cmd``), then pruned to the edges on a path from input to logits (``prune``). The area is the trapezoid
    rule over the nominal fractions ``p / 100`` on a linear axis, from the smallest size to the largest (no
    point at 0): CPR = area under f, CMD = area under |1 - f|. A size that selects no edge is the empty
    circuit (f = 0).

    Cost per batch: one clean forward, one corrupted forward, and ``len(sizes)`` patched variants (fewer:
    repeated circuits run once, and the circuit of every edge is the clean run), stacked ``rows_per_forward //
    batch_size`` per forward.

    Args:
        model, task: as :func:`evaluate_circuit`.
        scores: :class:`EdgeScores` on the model's graph.
        sizes: percents of the graph's edges, increasing (default MIB's 0.1 ... 100).
        kind: ``cpr`` or ``cmd``.
        ablation, level, reference, batch_size, rows_per_forward, n_boot, seed, progress: as
            :func:`evaluate_circuit`.
        prune: prune each circuit as MIB does.

    Returns:
        :class:`FaithfulnessCurve`.

    Raises:
        InputError: an unknown kind, ablation or level; sizes not increasing or outside (0, 100].

    Warns:
        UserWarning: an interval (any size's f, or the area) wider than 0.1.

    References:
        Mueller et al. 2025, "MIB", section 4.1 (CPR, CMD); MIB's circuit-track evaluation code.
    """
    _check(ablation, level, n_boot)
    if kind not in ("cpr", "cmd"):
        raise InputError(f"unknown kind {kind!r}; use 'cpr' (signed scores, area under f) or 'cmd' (|score|, area "
                         "under |1 - f|).")
    sizes = tuple(float(p) for p in sizes)
    if len(sizes) < 2 or any(not 0 < p <= 100 for p in sizes) or any(a >= b for a, b in itertools.pairwise(sizes)):
        raise InputError(f"sizes must be at least two increasing percents in (0, 100], got {sizes}.")
    g = scores.graph
    circuits = []
    for p in sizes:
        k = int(p / 100 * g.n_edges)
        if k == 0:
            circuits.append(Circuit(g, torch.zeros(g.n_edges, dtype=torch.bool)))
        else:
            circuits.append(Circuit.from_scores(scores, top_n=min(k, int(scores.scores.isfinite().sum())),
                                                absolute=kind == "cmd", prune=prune))
    masks = torch.stack([torch.ones(g.n_edges, dtype=torch.bool)] + [ablated_edges(c, level) for c in circuits])
    mM, (vals,) = measure(model, g, task, [(ablation, masks)], reference=reference, batch_size=batch_size,
                          rows_per_forward=rows_per_forward, progress=progress)
    m0, mC = vals[0], vals[1:].T  # [n], [n, K]
    x = torch.tensor(sizes, dtype=torch.float64) / 100
    ci = bootstrap_ci((mC, m0, mM), statistic=area_statistic(x, kind), n_boot=n_boot, seed=seed)
    K = len(sizes)
    f = CI(ci.estimate[:K], ci.low[:K], ci.high[:K], ci.n, n_boot, ci.alpha)
    area = CI(float(ci.estimate[K]), float(ci.low[K]), float(ci.high[K]), ci.n, n_boot, ci.alpha)
    what = f"the {kind.upper()} curve ({scores.method} scores, {ablation} ablation, {level} level)"
    f.warn_if_wide(0.1, what=f"faithfulness along {what}")
    area.warn_if_wide(0.1, what=what.replace("the ", "the area of the ", 1))
    return FaithfulnessCurve(kind, sizes, tuple(int(p / 100 * g.n_edges) for p in sizes),
                             tuple(c.n_edges for c in circuits), f, area, ablation, level, task.name, task.metric,
                             scores.method, len(mM), {"model": mM, "empty": m0, "circuits": mC})


@dataclass(frozen=True)
class RobustnessTable:
    """One circuit's faithfulness under several ablations and levels (:func:`robustness_table`)."""

    rows: list

    def to_dict(self) -> dict:
        return {"rows": [r.to_dict() for r in self.rows]}

    def __str__(self) -> str:
        head = f"{'ablation':<10} {'level':<6} {'f':>7} {'95% CI':>17} {'median':>7} {'IQR':>7} {'m(∅)':>8}"
        lines = [head]
        for r in self.rows:
            f, p = r.faithfulness, r.per_prompt
            lines.append(f"{r.ablation:<10} {r.level:<6} {f.estimate:>7.3f} {f'[{f.low:.3f}, {f.high:.3f}]':>17} "
                         f"{p['median']:>7.3f} {p['iqr']:>7.3f} {r.m_empty.estimate:>+8.3f}")
        return "\n".join(lines)


def robustness_table(model, task, circuit: Circuit, *, ablations=ABLATIONS, levels=LEVELS,
                     reference: Int[Tensor, "n_ref pos"] | None = None, batch_size: int = 16, rows_per_forward: int = 64,
                     n_boot: int = 1000, seed: int = 0, progress: bool = False) -> RobustnessTable:
    """The circuit's faithfulness under every ablation x level, from one pass over the prompts.

    Cost per batch: one clean forward, one corrupted forward, and per ablation three variants (m(∅), the
    edge-level and the node-level circuit; m(∅) is shared by both levels, being the same mask).

    Returns:
        :class:`RobustnessTable` with one :class:`CircuitEvaluation` per (ablation, level), in that order.

    Raises:
        InputError: an unknown ablation or level.

    Warns:
        UserWarning: per row, as :func:`evaluate_circuit`.

    References:
        Miller, Chughtai and Saunders 2024, "Transformer Circuit Evaluation Metrics Are Not Robust".
    """
    for a in ablations:
        for lv in levels:
            _check(a, lv, n_boot)
    everything = torch.ones(circuit.graph.n_edges, dtype=torch.bool)
    masks = torch.stack([everything] + [ablated_edges(circuit, lv) for lv in levels])
    mM, vals = measure(model, circuit.graph, task, [(a, masks) for a in ablations], reference=reference,
                       batch_size=batch_size, rows_per_forward=rows_per_forward, progress=progress)
    rows = [_evaluation(circuit, task, mM, v[0], v[1 + j], a, lv, n_boot, seed)
            for a, v in zip(ablations, vals) for j, lv in enumerate(levels)]
    return RobustnessTable(rows)


__all__ = ["CircuitEvaluation", "FaithfulnessCurve", "MIB_PERCENTS", "RobustnessTable", "area_statistic",
           "evaluate_circuit", "faithfulness_curve", "faithfulness_of_means", "per_prompt_spread", "robustness_table"]
