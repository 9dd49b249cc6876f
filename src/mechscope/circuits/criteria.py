"""Wang et al.'s completeness and minimality of a circuit, by node knockouts.

F(X) is the mean task metric of the model with every node outside the node set X knocked out (node level:
every edge out of such a node carries its ablated value; Wang et al. mean-ablate over the ABC distribution,
so the default here is ``mean`` over the task's corrupted prompts). C is the circuit's node set
(:attr:`Circuit.nodes`), M every node.

- **Completeness**: for subsets K of C, ``|F(C \\ K) - F(M \\ K)|`` should be small: knocking the same nodes out
  of the circuit and of the whole model should do the same thing, else the model holds a mechanism the
  circuit lacks (backup heads). K: ∅ (plain faithfulness), C itself, random subsets, and optionally a greedy
  search for the K that maximises the gap.
- **Minimality**: for each node v of C, ``max_K |F(C \\ (K ∪ {v})) - F(C \\ K)|`` should be large: every node
  matters for some K. Reported as well relative to ``|F(M)|`` (Wang et al. ask for a few percent).

Every gap has a 95% bootstrap interval over prompts. Knockout sets are chosen on the same prompts they are
measured on (greedy K, the best K per node), so those gaps lean high; hold out prompts to avoid it.

``input`` and ``logits`` are never knocked out (K ranges over heads and MLPs).

References:
    Wang et al. 2022, "Interpretability in the Wild", section 4 (faithfulness, completeness, minimality)
    and appendix K (the greedy search for K).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Int
from torch import Tensor

from mechscope.analysis.bootstrap import bootstrap_ci
from mechscope.circuits.ablation import measure
from mechscope.circuits.circuit import Circuit
from mechscope.core.errors import InputError


@dataclass(frozen=True)
class KnockoutGap:
    """``|F(A) - F(B)|`` for one knockout set, with its interval (metric units).

    Attributes:
        knocked_out: the node names of K (for minimality: K, without the node itself).
        f_a / f_b: the two means (``F(C \\ K)`` and ``F(M \\ K)``; for minimality ``F(C \\ (K ∪ {v}))`` and
            ``F(C \\ K)``).
        gap: |f_a - f_b|. low / high: its 95% bootstrap interval. relative: gap / |F(M)|.
    """

    knocked_out: tuple
    f_a: float
    f_b: float
    gap: float
    low: float
    high: float
    relative: float

    def to_dict(self) -> dict:
        return {"knocked_out": list(self.knocked_out), "f_a": self.f_a, "f_b": self.f_b, "gap": self.gap,
                "low": self.low, "high": self.high, "relative": self.relative}


@dataclass(frozen=True)
class Completeness:
    """Completeness gaps ``|F(C \\ K) - F(M \\ K)|`` per knockout set K (:func:`completeness`).

    Attributes:
        gaps: one :class:`KnockoutGap` per K (``f_a`` = F(C \\ K), ``f_b`` = F(M \\ K)).
        f_model: F(M), the clean model's mean metric. ablation: how nodes are knocked out.
        n_forwards: patched variants run per batch of prompts (each about one forward of the batch).
    """

    gaps: list
    f_model: float
    ablation: str
    n_forwards: int

    @property
    def worst(self) -> KnockoutGap:
        """The K with the largest gap."""
        return max(self.gaps, key=lambda g: g.gap)

    def to_dict(self) -> dict:
        return {"f_model": self.f_model, "ablation": self.ablation, "n_forwards": self.n_forwards,
                "gaps": [g.to_dict() for g in self.gaps]}


@dataclass(frozen=True)
class Minimality:
    """Per node v of the circuit, the largest ``|F(C \\ (K ∪ {v})) - F(C \\ K)|`` over the sets K tried.

    Attributes:
        nodes: node name -> :class:`KnockoutGap` (its ``knocked_out`` is the best K).
        f_model, ablation, n_forwards: as :class:`Completeness`.
        threshold: the relative gap a node needs to count as mattering.
    """

    nodes: dict
    f_model: float
    ablation: str
    n_forwards: int
    threshold: float

    @property
    def unneeded(self) -> list[str]:
        """Nodes whose best relative gap is below the threshold (candidates to drop)."""
        return [n for n, g in self.nodes.items() if g.relative < self.threshold]

    def to_dict(self) -> dict:
        return {"f_model": self.f_model, "ablation": self.ablation, "n_forwards": self.n_forwards,
                "threshold": self.threshold, "nodes": {n: g.to_dict() for n, g in self.nodes.items()},
                "unneeded": self.unneeded}


def _knockable(circuit: Circuit) -> list[int]:
    g = circuit.graph
    return [i for i in circuit.node_mask().nonzero().flatten().tolist() if g.sources[i] != "input"]


def _mask(circuit: Circuit, keep: Tensor) -> Tensor:
    """Edge mask [n_edges]: every edge out of a source not in ``keep`` (bool [n_sources]) is ablated."""
    return ~keep[circuit.graph.edge_source]


def _sets(circuit: Circuit, k_sets, n_random: int, seed: int) -> list[list[int]]:
    g = circuit.graph
    nodes = _knockable(circuit)
    if k_sets is not None:
        out = []
        for K in k_sets:
            idx = [g.node_index(v) if isinstance(v, str) else int(v) for v in K]
            outside = [g.sources[i] for i in idx if i not in nodes]
            if outside:
                raise InputError(f"knockout set {list(K)} holds nodes outside the circuit (or input): {outside}; K must "
                                 f"be a subset of the circuit's heads and MLPs.")
            out.append(sorted(set(idx)))
        return out
    gen = torch.Generator().manual_seed(seed)
    out = [[]]
    for _ in range(n_random):
        pick = torch.rand(len(nodes), generator=gen) < 0.5
        out.append([v for v, p in zip(nodes, pick.tolist()) if p])
    return out


def _gaps(a: Tensor, b: Tensor, sets, names, f_model: float, n_boot: int, seed: int) -> list[KnockoutGap]:
    """Gaps |mean a_j - mean b_j| for columns j of ``a, b [n, J]``, all resampled with the same prompts."""
    ci = bootstrap_ci((a, b), statistic=lambda x, y: (x.mean(1) - y.mean(1)).abs(), n_boot=n_boot, seed=seed)
    est, low, high = (torch.atleast_1d(torch.as_tensor(t)) for t in (ci.estimate, ci.low, ci.high))
    scale = abs(f_model) if f_model else float("nan")
    return [KnockoutGap(tuple(names[i] for i in K), float(a[:, j].mean()), float(b[:, j].mean()), float(est[j]),
                        float(low[j]), float(high[j]), float(est[j]) / scale) for j, K in enumerate(sets)]


def completeness(model, task, circuit: Circuit, k_sets=None, *, n_random: int = 8, greedy_steps: int = 0,
                 ablation: str = "mean", reference: Int[Tensor, "n_ref pos"] | None = None, batch_size: int = 16,
                 rows_per_forward: int = 64, n_boot: int = 1000, seed: int = 0, progress: bool = False) -> Completeness:
    """Wang et al.'s completeness: ``|F(C \\ K) - F(M \\ K)|`` for knockout sets K of the circuit's nodes.

    Args:
        model, task: as :func:`~mechscope.circuits.evaluate.evaluate_circuit`.
        circuit: the :class:`Circuit`; its node set C is :attr:`Circuit.nodes`.
        k_sets: the sets K to try (lists of node names), or None for ∅, C itself and ``n_random`` random subsets
            (each node of C in K with probability 1/2, seeded).
        n_random: random subsets when ``k_sets`` is None.
        greedy_steps: if > 0, also grow one K greedily (Wang et al., appendix K): at each step add the node of
            C whose knockout maximises the gap given the K so far.
        ablation: how nodes are knocked out (``mean`` as Wang et al., ``corrupted``, ``zero``).
        reference, batch_size, rows_per_forward, n_boot, seed, progress: as ``evaluate_circuit``.

    Cost: ``2 * (number of sets) + 2 * greedy_steps * |C|`` patched variants per batch of prompts (each about
    one forward of the batch), plus one clean forward (and a corrupted one for ``corrupted``) per pass; the
    greedy search makes one pass per step.

    Returns:
        :class:`Completeness` (``worst`` is the largest gap).

    Raises:
        InputError: a K with nodes outside the circuit; an unknown ablation; an empty circuit.

    References:
        Wang et al. 2022, "Interpretability in the Wild", section 4.2 and appendix K.
    """
    if circuit.is_empty:
        raise InputError("the circuit is empty: it has no nodes to knock out, and F(C) is the all-ablated baseline.")
    g = circuit.graph
    C = circuit.node_mask()
    everything = torch.ones(g.n_sources, dtype=torch.bool)
    sets = _sets(circuit, k_sets, n_random, seed)
    if k_sets is None:
        sets.insert(1, _knockable(circuit))
    n_forwards = 0
    kw = {"reference": reference, "batch_size": batch_size, "rows_per_forward": rows_per_forward, "progress": progress}

    def run(candidate_sets):
        masks = []
        for K in candidate_sets:
            out = torch.zeros(g.n_sources, dtype=torch.bool)
            out[K] = True
            masks += [_mask(circuit, C & ~out), _mask(circuit, everything & ~out)]
        mM, (vals,) = measure(model, g, task, [(ablation, torch.stack(masks))], **kw)
        return mM, vals[0::2].T, vals[1::2].T  # [n], [n, J], [n, J]

    mM, a, b = run(sets)
    n_forwards += 2 * len(sets)
    if greedy_steps > 0:
        K: list[int] = []
        for _ in range(greedy_steps):
            cands = [v for v in _knockable(circuit) if v not in K]
            if not cands:
                break
            _, ca, cb = run([K + [v] for v in cands])
            n_forwards += 2 * len(cands)
            K = K + [cands[int((ca.mean(0) - cb.mean(0)).abs().argmax())]]
        _, ga, gb = run([K])
        n_forwards += 2
        sets.append(K)
        a, b = torch.cat([a, ga], 1), torch.cat([b, gb], 1)
    f_model = float(mM.mean())
    return Completeness(_gaps(a, b, sets, g.sources, f_model, n_boot, seed), f_model, ablation, n_forwards)


def minimality(model, task, circuit: Circuit, k_sets=None, *, n_random: int = 3, threshold: float = 0.01,
               ablation: str = "mean", reference: Int[Tensor, "n_ref pos"] | None = None, batch_size: int = 16,
               rows_per_forward: int = 64, n_boot: int = 1000, seed: int = 0, progress: bool = False) -> Minimality:
    """Wang et al.'s minimality: for each node v of the circuit, ``max_K |F(C \\ (K ∪ {v})) - F(C \\ K)|``.

    Args:
        model, task, circuit: as :func:`completeness`.
        k_sets: the sets K to try (node names), or None for ∅ and ``n_random`` random subsets of C (each node
            with probability 1/2). For each K, every node of C outside K is tried.
        threshold: the relative gap (of |F(M)|) a node needs to count as mattering (:attr:`Minimality.unneeded`).
        ablation, reference, batch_size, rows_per_forward, n_boot, seed, progress: as :func:`completeness`.

    Cost: ``Σ_K (1 + |C \\ K|)`` patched variants per batch of prompts, one pass.

    Returns:
        :class:`Minimality`: per node the best K, its gap with an interval (chosen by the point estimate on
        the same prompts, so it leans high), and the gap relative to |F(M)|.

    Raises:
        InputError: a K with nodes outside the circuit; an empty circuit.

    References:
        Wang et al. 2022, "Interpretability in the Wild", section 4.3.
    """
    if circuit.is_empty:
        raise InputError("the circuit is empty: it has no nodes whose minimality could be measured.")
    g = circuit.graph
    C = circuit.node_mask()
    sets = _sets(circuit, k_sets, n_random, seed)
    nodes = _knockable(circuit)
    masks, pairs = [], []  # pairs: (node, K, column of C \ K, column of C \ (K ∪ {v}))
    for K in sets:
        out = torch.zeros(g.n_sources, dtype=torch.bool)
        out[K] = True
        base = len(masks)
        masks.append(_mask(circuit, C & ~out))
        for v in nodes:
            if v in K:
                continue
            out_v = out.clone()
            out_v[v] = True
            pairs.append((v, K, base, len(masks)))
            masks.append(_mask(circuit, C & ~out_v))
    mM, (vals,) = measure(model, g, task, [(ablation, torch.stack(masks))], reference=reference, batch_size=batch_size,
                          rows_per_forward=rows_per_forward, progress=progress)
    means = vals.mean(1)
    best: dict[int, tuple] = {}
    for v, K, i_base, i_v in pairs:
        gap = float((means[i_v] - means[i_base]).abs())
        if v not in best or gap > best[v][0]:
            best[v] = (gap, K, i_base, i_v)
    order = [v for v in nodes if v in best]
    a = torch.stack([vals[best[v][3]] for v in order], 1)
    b = torch.stack([vals[best[v][2]] for v in order], 1)
    f_model = float(mM.mean())
    gaps = _gaps(a, b, [best[v][1] for v in order], g.sources, f_model, n_boot, seed)
    return Minimality({g.sources[v]: gap for v, gap in zip(order, gaps)}, f_model, ablation, len(masks), threshold)


__all__ = ["Completeness", "KnockoutGap", "Minimality", "completeness", "minimality"]
