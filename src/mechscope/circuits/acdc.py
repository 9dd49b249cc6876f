"""ACDC, automatic circuit discovery (Conmy et al. 2023): greedy pruning of edges (or nodes) by their effect.

The circuit starts as the whole graph. Receivers are visited in reverse topological order (``logits``
first, then the last MLP, the last layer's query/key/value receivers, ..., layer 0's); for each receiver its
incoming edges are tried one at a time, sources in reverse topological order (latest writer first). Trying
an edge means patching it (it carries its value on the corrupted prompts) on top of every edge removed so
far, and measuring the metric over all prompts. With ``before`` the metric of the current circuit and
``after`` the metric with the edge also patched, the *damage* is

- ``after - before`` for ``metric="kl"`` (default: mean over prompts of KL(clean || current) at the task's
  position, in nats, as ACDC uses), or for a task whose own metric is ``kl``;
- ``before - after`` for ``metric="task"`` with a higher-is-better task metric (logit difference, prob,
  prob_mass).

The edge is **removed** (stays patched) when ``damage <= tau`` (``|damage| <= tau`` with ``absolute=True``)
and the current metric becomes ``after``; otherwise it is kept. ACDC compares signed changes
(``result - cur_metric < threshold``), so by default an edge whose patching moves the output *closer* to
the clean model is removed too; with ``absolute=True`` every edge that changes the metric by more than tau
either way is kept (at tau = 0: every edge that changes it at all).

A receiver whose node has no kept outgoing edge left (all its reads go nowhere) has its incoming edges
removed without a forward pass: with every edge out of a node patched, its inputs cannot change the
logits, so the metric does not change. The trace marks these ``evaluated=False``.

``level="node"`` visits nodes instead (MLPs and heads in reverse topological order, ``input`` last):
removing a node patches all its outgoing edges, which is patching its output everywhere. SmolLM2-135M
has 301 nodes against 70,651 edges.

**Batching, exactly.** The decisions are sequential: each depends on every earlier one. Runs of
candidates are evaluated as variants of one forward *speculatively*: variant j patches the current circuit's
removed edges plus candidates 1..j of the run, i.e. the state the sequential algorithm reaches if
candidates 1..j-1 are all removed (ACDC removes most candidates). The variants are read in order; at the
first kept candidate the rest of the run is discarded (its states assumed a removal that did not happen)
and the next run starts after it. Every decision therefore compares exactly the two states the sequential
algorithm compares: ``variants=1`` is the sequential algorithm, and larger values give the same trace (up
to float rounding of different batch shapes), in about (kept + removed / variants) forwards.

References:
    Conmy, Mavor-Parker, Lynch, Heimersheim and Garriga-Alonso 2023, "Towards Automated Circuit Discovery
    for Mechanistic Interpretability" (NeurIPS 2023), section 3 and Algorithm 1.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor

from mechscope.circuits.engine import Layout, capture_sources, patched_logits
from mechscope.circuits.graph import Graph
from mechscope.circuits.roc import ROC, roc_of_circuits
from mechscope.core.errors import InputError

LEVELS = ("edge", "node")
METRICS = ("kl", "task")


@dataclass(frozen=True)
class ACDCStep:
    """One decision of ACDC.

    Attributes:
        candidate: the edge (``"source->receiver"``) or node tried.
        before / after: the metric (mean over prompts; nats for KL) of the current circuit, and with the
            candidate also patched (equal to ``before`` when not evaluated).
        damage: the change the rule compares with tau (see the module docstring).
        kept: whether the candidate stays in the circuit.
        evaluated: False when the candidate was removed without a forward (its node reaches nothing).
    """

    candidate: str
    before: float
    after: float
    damage: float
    kept: bool
    evaluated: bool = True

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class ACDCResult:
    """What ACDC found.

    Attributes:
        graph: the :class:`Graph`. level: ``"edge"`` or ``"node"``. tau / metric / absolute: the settings.
        kept: bool ``[n_edges]``, the circuit's edges (node level: edges from kept nodes into receivers of
            kept nodes or the logits; untested candidates count as kept when the run stopped early).
        kept_nodes: bool ``[n_sources]``, nodes with at least one kept outgoing edge.
        trace: every decision, in order.
        metric_full / metric_circuit: the search metric with nothing patched and of the final circuit.
        task_values: the task's own metric (mean) for the full model, the circuit and everything patched
            (``"full"``, ``"circuit"``, ``"empty"``), and the normalised faithfulness
            (circuit - empty) / (full - empty).
        complete: False when the time budget stopped the search (``untested`` candidates were kept).
        n_forwards: forward passes of the search (each of ``variants x batch_size`` rows at most).
        seconds: wall time.
    """

    graph: Graph
    level: str
    tau: float
    metric: str
    absolute: bool
    kept: Tensor
    kept_nodes: Tensor
    trace: list[ACDCStep]
    metric_full: float
    metric_circuit: float
    task_values: dict
    complete: bool
    untested: int
    n_forwards: int
    seconds: float
    info: dict = field(default_factory=dict)

    @property
    def n_kept(self) -> int:
        return int(self.kept.sum())

    def kept_names(self) -> list[str]:
        """The kept edges' names (edge order)."""
        names = self.graph.edge_names()
        return [names[i] for i in self.kept.nonzero().flatten().tolist()]

    def kept_node_names(self) -> list[str]:
        return [self.graph.sources[i] for i in self.kept_nodes.nonzero().flatten().tolist()]

    def circuit(self):
        """The kept edges as a :class:`mechscope.circuits.circuit.Circuit`.

        Raises:
            InputError: mechscope.circuits.circuit is not available in this installation.
        """
        try:
            from mechscope.circuits.circuit import Circuit
        except ImportError:
            raise InputError("mechscope.circuits.circuit is not available here; use result.kept (a bool edge "
                             "mask) directly.") from None
        selection = {"method": "acdc", "level": self.level, "tau": self.tau, "metric": self.metric,
                     "absolute": self.absolute, "complete": self.complete, "n_edges": self.n_kept}
        return Circuit(self.graph, self.kept.clone(), None, selection, dict(self.info))

    def __str__(self) -> str:
        what = f"{int(self.kept_nodes.sum())} of {self.graph.n_sources} nodes, " if self.level == "node" else ""
        tv = self.task_values
        return (f"ACDC ({self.level} level, tau={self.tau:g}, {self.metric}{', |damage|' if self.absolute else ''}): "
                f"kept {what}{self.n_kept} of {self.graph.n_edges} edges; metric {self.metric_circuit:.4g} "
                f"(full {self.metric_full:.4g}); faithfulness {tv.get('faithfulness', float('nan')):.3f}; "
                f"{self.n_forwards} forwards, {self.seconds:.1f} s" + ("" if self.complete else
                                                                       f"; STOPPED EARLY, {self.untested} untested"))


@dataclass(frozen=True)
class _Item:
    name: str
    edges: Tensor  # int64 edge indices patched by removing it
    owners: tuple[int, ...]  # nodes whose reads the item feeds (edge level); empty: never skipped


class _Evaluator:
    """The metric of edge masks over all prompts, batch by batch (clean logits and corrupted sources cached)."""

    def __init__(self, model, graph: Graph, task, metric: str, batch_size: int):
        self.model, self.graph = model, graph
        self.keep = -task.position
        self.layout = Layout(model, graph)
        search = dataclasses.replace(task, metric="kl") if metric == "kl" else task
        self.lower_better = search.metric == "kl"
        self.n = len(task)
        self.parts = []
        for s in range(0, self.n, batch_size):
            rows = slice(s, min(self.n, s + batch_size))
            part = task.subset(rows)
            clean = part.clean_tokens.to(model.device)
            corrupt = capture_sources(model, part.corrupt_tokens.to(model.device), logits_to_keep=self.keep)
            # the clean logits on the engine's own path (nothing patched), so the full model's KL is exactly 0
            clean_logits = patched_logits(model, graph, clean, corrupt, torch.zeros(1, graph.n_edges, dtype=torch.bool),
                                          logits_to_keep=self.keep, layout=self.layout)[0]
            self.parts.append((clean, clean_logits, corrupt, search.subset(rows), part))
        self.n_forwards = 0

    def full(self) -> float:
        """The search metric of the full model (nothing patched), from the clean logits already computed."""
        return sum(float(search.values(cl, cl).double().sum()) for _, cl, _, search, _ in self.parts) / self.n

    def __call__(self, masks: Tensor, own_metric: bool = False) -> list[float]:
        """Mean metric over prompts for each mask ``[V, n_edges]`` (the task's own metric if ``own_metric``)."""
        total = torch.zeros(masks.shape[0], dtype=torch.float64)
        for clean, clean_logits, corrupt, search, part in self.parts:
            logits = patched_logits(self.model, self.graph, clean, corrupt, masks, logits_to_keep=self.keep,
                                    layout=self.layout)
            self.n_forwards += 1
            t = part if own_metric else search
            for j in range(masks.shape[0]):
                total[j] += float(t.values(logits[j], clean_logits).double().sum())
        return (total / self.n).tolist()


def _items(graph: Graph, level: str) -> list[_Item]:
    """Candidates in ACDC's visiting order."""
    if level == "node":
        return [_Item(graph.sources[s], graph.node_edges([s]).nonzero().flatten(), ())
                for s in reversed(range(graph.n_sources))]
    rep = graph.n_heads // graph.n_kv_heads
    names = graph.edge_names()
    out = []
    for r in reversed(range(graph.n_receivers)):
        rec = graph.receivers[r]
        if rec.kind == "logits":
            owners: tuple[int, ...] = ()
        elif rec.kind == "mlp":
            owners = (graph.layer_sources(rec.layer)[1],)
        else:
            first = graph.layer_sources(rec.layer)[0].start
            heads = [rec.index] if rec.kind == "q" else range(rec.index * rep, (rec.index + 1) * rep)
            owners = tuple(first + h for h in heads)
        edges = (graph.edge_receiver == r).nonzero().flatten().flip(0)  # latest source first
        out += [_Item(names[e], torch.tensor([e]), owners) for e in edges.tolist()]
    return out


def acdc(model, task, *, tau: float = 0.01, metric: str = "kl", level: str = "edge", absolute: bool = False,
         graph: Graph | None = None, batch_size: int = 32, variants: int = 8, max_candidates: int = 20_000,
         time_budget_s: float | None = None, progress: bool = True) -> ACDCResult:
    """Discover a circuit with ACDC (see the module docstring for the algorithm and its batching).

    Args:
        model: a HookedModel of a pre-norm family (see :meth:`Graph.from_model`).
        task: a :class:`~mechscope.data.task.Task`; patched edges carry their values on its corrupted prompts.
        tau: the threshold (the metric's units: nats for KL); >= 0. Larger tau, smaller circuits.
        metric: ``"kl"`` (KL(clean || current) at ``task.position``, mean over prompts) or ``"task"`` (the
            task's own metric, e.g. the logit difference).
        level: ``"edge"`` or ``"node"`` (for large graphs: SmolLM2 has 70,651 edges, 301 nodes).
        absolute: compare ``|damage|`` with tau instead of the signed damage (ACDC's default is signed).
        graph: the model's :class:`Graph` (built if None).
        batch_size: prompts per forward (all prompts are used for every decision).
        variants: candidates evaluated per forward (speculatively; 1 = the plain sequential algorithm).
        max_candidates: refuse a search with more candidates (edges or nodes) than this.
        time_budget_s: stop after this many seconds; the untested candidates stay in the circuit
            (``complete=False``, and a warning says so). None: no limit.
        progress: a progress bar over candidates.

    Returns:
        :class:`ACDCResult` with the kept edges, the trace of every decision, and the task metric of the
        full model, the circuit and the fully patched model.

    Raises:
        InputError: tau negative or not finite; an unknown metric or level; variants or batch_size < 1;
            more candidates than ``max_candidates`` (the message gives the count and the fix).

    Warns:
        UserWarning: the time budget ran out before every candidate was tried.

    References:
        Conmy et al. 2023, "Towards Automated Circuit Discovery for Mechanistic Interpretability", Algorithm 1.
    """
    from tqdm.auto import tqdm

    if not isinstance(tau, (int, float)) or not tau >= 0 or tau == float("inf"):
        raise InputError(f"tau must be a finite number >= 0 (the largest damage a removed edge may do, in the "
                         f"metric's units), got {tau!r}.")
    if metric not in METRICS:
        raise InputError(f"unknown metric {metric!r}; use 'kl' (KL to the clean model, ACDC's default) or 'task'.")
    if level not in LEVELS:
        raise InputError(f"unknown level {level!r}; use 'edge' or 'node'.")
    if variants < 1 or batch_size < 1:
        raise InputError(f"variants and batch_size must be >= 1, got {variants} and {batch_size}.")
    graph = graph or Graph.from_model(model)
    items = _items(graph, level)
    if len(items) > max_candidates:
        raise InputError(
            f"{level}-level ACDC on {graph.model_name} tries {len(items):,} candidates, more than max_candidates="
            f"{max_candidates:,} (each is a forward over all prompts, divided by at most variants={variants}). "
            + (f"Use level='node' ({graph.n_sources} nodes), or raise max_candidates." if level == "edge" else
               "Raise max_candidates."))
    t0 = time.perf_counter()
    ev = _Evaluator(model, graph, task, metric, batch_size)
    E = graph.n_edges
    patched = torch.zeros(E, dtype=torch.bool)
    alive = torch.bincount(graph.edge_source, minlength=graph.n_sources)  # unpatched edges out of each node
    full = ev.full()
    cur = full
    trace: list[ACDCStep] = []

    def damage(before: float, after: float) -> float:
        return after - before if ev.lower_better else before - after

    def remove(it: _Item) -> None:
        patched[it.edges] = True
        alive.sub_(torch.bincount(graph.edge_source[it.edges], minlength=graph.n_sources))

    bar = tqdm(total=len(items), desc=f"ACDC ({level}s)", unit=level, disable=not progress)
    i, stopped = 0, False
    while i < len(items):
        if time_budget_s is not None and time.perf_counter() - t0 > time_budget_s:
            stopped = True
            break
        # a run of candidates, each assuming the ones before it in the run are removed
        spec_alive, mask = alive.clone(), patched.clone()
        run, masks = [], []
        j = i
        while j < len(items) and len(masks) < variants:
            it = items[j]
            skip = bool(it.owners) and all(int(spec_alive[o]) == 0 for o in it.owners)
            mask = mask.clone()
            mask[it.edges] = True
            spec_alive.sub_(torch.bincount(graph.edge_source[it.edges], minlength=graph.n_sources))
            if not skip:
                masks.append(mask)
            run.append((j, skip))
            j += 1
        values = ev(torch.stack(masks)) if masks else []
        k, nxt = 0, j
        for pos, skip in run:
            it = items[pos]
            if skip:
                trace.append(ACDCStep(it.name, cur, cur, 0.0, False, False))
                remove(it)
                bar.update(1)
                continue
            after = values[k]
            k += 1
            d = damage(cur, after)
            kept = (abs(d) if absolute else d) > tau
            trace.append(ACDCStep(it.name, cur, after, d, kept))
            bar.update(1)
            if kept:
                nxt = pos + 1
                break
            remove(it)
            cur = after
        i = nxt
    bar.close()
    untested = len(items) - i
    if stopped:
        warnings.warn(
            f"ACDC stopped at its time budget ({time_budget_s:g} s) after {i} of {len(items)} {level}s; the "
            f"{untested} untested {level}s stay in the circuit, so it is larger than ACDC's. Raise time_budget_s "
            "or use fewer prompts" + (", or level='node'." if level == "edge" else "."), UserWarning, stacklevel=2)
    kept_nodes = torch.zeros(graph.n_sources, dtype=torch.bool)
    if level == "node":
        kept_nodes[:] = alive > 0
        kept = _node_circuit_edges(graph, kept_nodes)
    else:
        kept = ~patched
        kept_nodes[:] = alive > 0
    full_v, circ_v, empty_v = ev(torch.stack([torch.zeros(E, dtype=torch.bool), ~kept, torch.ones(E, dtype=torch.bool)]),
                                 own_metric=True)
    denom = full_v - empty_v
    tv = {"metric": task.metric, "full": full_v, "circuit": circ_v, "empty": empty_v,
          "faithfulness": (circ_v - empty_v) / denom if denom != 0 else float("nan")}
    return ACDCResult(graph, level, float(tau), metric, absolute, kept, kept_nodes, trace, full, cur, tv, not stopped,
                      untested, ev.n_forwards, time.perf_counter() - t0,
                      {"task": task.name, "n_prompts": len(task), "variants": variants, "batch_size": batch_size})


def _node_circuit_edges(graph: Graph, kept_nodes: Tensor) -> Tensor:
    """Edges from kept nodes into receivers read by a kept node (or the logits)."""
    rep = graph.n_heads // graph.n_kv_heads
    reads = torch.zeros(graph.n_receivers, dtype=torch.bool)
    for r, rec in enumerate(graph.receivers):
        if rec.kind == "logits":
            reads[r] = True
        elif rec.kind == "mlp":
            reads[r] = bool(kept_nodes[graph.layer_sources(rec.layer)[1]])
        else:
            first = graph.layer_sources(rec.layer)[0].start
            heads = [rec.index] if rec.kind == "q" else range(rec.index * rep, (rec.index + 1) * rep)
            reads[r] = any(bool(kept_nodes[first + h]) for h in heads)
    return kept_nodes[graph.edge_source] & reads[graph.edge_receiver]


@dataclass
class ACDCSweep:
    """ACDC at several thresholds. ``results[i]`` ran at ``taus[i]``; ``roc`` is against the known circuit."""

    taus: list[float]
    results: list[ACDCResult]
    roc: ROC | None

    def circuits(self) -> Tensor:
        """bool ``[len(taus), n_edges]``."""
        return torch.stack([r.kept for r in self.results])


def acdc_sweep(model, task, taus, *, known: Tensor | None = None, **kwargs) -> ACDCSweep:
    """ACDC at each tau (a ROC curve against a known circuit, as in Conmy et al. 2023, section 4.1).

    Args:
        model, task: as :func:`acdc`.
        taus: thresholds (each >= 0).
        known: bool ``[n_edges]``, the known circuit's edges; with it, ``roc`` holds the points (one per tau,
            plus (0, 0) and (1, 1)) and the area under them.
        **kwargs: passed to :func:`acdc` (metric, level, absolute, batch_size, variants, ...). At node level the
            ROC still compares edges (those of the kept nodes).

    Returns:
        :class:`ACDCSweep`.

    Raises:
        InputError: no taus; as :func:`acdc` and :func:`~mechscope.circuits.roc.roc_of_circuits`.
    """
    taus = [float(t) for t in taus]
    if not taus:
        raise InputError("no taus given; pass thresholds, e.g. [1e-4, 1e-3, 1e-2, 1e-1].")
    graph = kwargs.pop("graph", None) or Graph.from_model(model)
    kwargs.setdefault("progress", False)
    results = [acdc(model, task, tau=t, graph=graph, **kwargs) for t in taus]
    roc = roc_of_circuits(torch.stack([r.kept for r in results]), known, taus) if known is not None else None
    return ACDCSweep(taus, results, roc)


__all__ = ["ACDCResult", "ACDCStep", "ACDCSweep", "acdc", "acdc_sweep"]
