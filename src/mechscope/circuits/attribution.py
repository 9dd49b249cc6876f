"""Scores for every edge: EAP, EAP-IG (``ig-inputs``, ``ig-activations``), clean-corrupted, and exact patching.

The gradient methods share one formula. For an edge ``u -> r`` and prompt ``i``,

    score_i(u -> r) = Σ_{pos, d_model} (z_u(corrupted) - z_u(clean)) * mean_k ∂m_i/∂x_r (at point k),

the first-order estimate of the change of the metric ``m_i`` when the edge carries the corrupted value
(negative for an edge the behaviour needs, when the metric is the logit difference). The methods differ in
where the gradient is taken:

- ``eap``: on the clean run (Syed et al. 2023). One backward per batch.
- ``eap-ig`` (= ``ig-inputs``): at ``m`` points on the straight line from the corrupted to the clean input
  embeddings, ``corrupted + (k/m)(clean - corrupted)``, k = 0..m-1 (Hanna et al. 2024). ``m`` backwards.
- ``ig-activations``: for each node group (the input, a layer's heads, a layer's MLP) its output is moved
  along the line from corrupted to clean while the rest of the model runs clean, and the gradient at every
  receiver downstream is averaged over the ``m`` points; ``m * (2 n_layers + 1)`` backwards.
- ``clean-corrupted``: the mean of the gradients on the clean and on the corrupted run.

``exact``: the metric with the one edge patched minus the clean metric, measured (many edges per forward).

Scores are per prompt (``per_prompt [n, n_edges]``) and their mean (``scores``), so any statistic over
prompts can carry a bootstrap interval.

References:
    Syed, Rager and Conmy 2023, "Attribution Patching Outperforms Automated Circuit Discovery" (EAP);
    Hanna, Pezzelle and Belinkov 2024, "Have Faith in Faithfulness" (EAP-IG and its variants);
    Sundararajan et al. 2017, "Axiomatic Attribution for Deep Networks" (integrated gradients).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechscope.circuits.engine import Layout, Sources, capture_sources, head_outputs, patched_logits, split_receivers
from mechscope.circuits.graph import Graph
from mechscope.core.errors import InputError

METHODS = ("eap", "eap-ig", "ig-inputs", "ig-activations", "clean-corrupted", "exact")

#: ``values(logits [B, k, d_vocab], clean_logits [B, k, d_vocab], rows) -> [B]``: the per-prompt raw metric of
#: the prompts ``rows`` (a slice of the task's prompts) of this batch.
ValuesFn = Callable[[Tensor, Tensor, slice], Tensor]


@dataclass
class EdgeScores:
    """A score for every edge of a graph.

    Attributes:
        graph: the :class:`Graph`.
        scores: ``[n_edges]`` float32, the mean over prompts (metric units: the raw task metric, e.g. nats of
            logit difference); negative = patching the edge lowers the metric.
        per_prompt: ``[n_prompts, n_edges]`` float32, or None.
        method: one of :data:`METHODS`. steps: interpolation points (IG methods).
        scored: bool ``[n_edges]``, the edges that have a score (``exact`` can score a subset; the others
            are 0 and False here).
        info: task name, metric, n_prompts, ...
    """

    graph: Graph
    scores: Tensor
    per_prompt: Tensor | None
    method: str
    steps: int = 1
    scored: Tensor | None = None
    info: dict = field(default_factory=dict)

    def node_scores(self) -> Float[Tensor, " n_sources"]:
        """Per node, the sum of its outgoing edges' scores (for the linear methods: the first-order effect
        of patching the node's output everywhere)."""
        out = torch.zeros(self.graph.n_sources, dtype=self.scores.dtype)
        return out.index_add_(0, self.graph.edge_source, self.scores)

    def top(self, k: int, *, absolute: bool = True) -> list[tuple[str, float]]:
        """The ``k`` edges with the largest (absolute) scores, as ``(name, score)``."""
        key = self.scores.abs() if absolute else -self.scores
        if self.scored is not None:
            key = torch.where(self.scored, key, torch.full_like(key, -float("inf")))
        idx = key.topk(min(k, key.numel())).indices.tolist()
        names = self.graph.edge_names()
        return [(names[i], float(self.scores[i])) for i in idx]


def _source_deltas(model, graph: Graph, clean: Sources, corrupt: Sources) -> Tensor:
    """``[S, B, P * D]`` float32: every node's corrupted minus clean output."""
    B, P, Dm = clean.input.shape
    D = torch.empty(graph.n_sources, B, P, Dm)
    D[0] = corrupt.input - clean.input
    for L in range(graph.n_layers):
        heads, mlp = graph.layer_sources(L)
        D[heads] = head_outputs(model, L, corrupt.z[L] - clean.z[L])
        D[mlp] = corrupt.mlp[L] - clean.mlp[L]
    return D.view(graph.n_sources, B, -1)


class _Gradients:
    """Receives per-layer receiver gradients during backward passes and sums ``weight * grad`` per receiver."""

    def __init__(self, graph: Graph, shape: tuple[int, ...]):
        self.graph = graph
        self.G = torch.zeros(graph.n_receivers, *shape)  # [R, B, P * D]
        self.weight = 1.0

    def __call__(self, receivers: list[int], grad: Tensor) -> None:
        g = grad.detach().reshape(grad.shape[0], grad.shape[1], -1).to(self.G.dtype)
        self.G[torch.tensor(receivers)] += self.weight * g

    def score(self, D: Tensor, out: Tensor, sources: slice | None = None) -> None:
        """Add ``Σ D[s] . G[r]`` to per-prompt scores ``out [B, R, S]`` for every edge (from ``sources`` only)."""
        g = self.graph
        for layer in range(g.n_layers + 1):
            groups = [g.receivers_of_layer(layer)] if layer < g.n_layers else []
            groups += [g.receivers_of_layer(layer, ("mlp", "logits"))]
            for recv in groups:
                if not recv:
                    continue
                S = g.upstream_count(g.receivers[recv[0]])
                lo, hi = (0, S) if sources is None else (sources.start, min(sources.stop, S))
                if hi <= lo:
                    continue
                idx = torch.tensor(recv)
                out[:, idx, lo:hi] += torch.einsum("sbx,rbx->brs", D[lo:hi], self.G[idx])


def _check_pair(clean: Tensor, corrupt: Tensor) -> None:
    if clean.shape != corrupt.shape or clean.dim() != 2:
        raise InputError(f"clean {tuple(clean.shape)} and corrupted {tuple(corrupt.shape)} tokens must both be "
                         "[n, pos] with the same shape; pair every clean prompt with a corrupted one of equal "
                         "token length.")


def attribute_pairs(model, graph: Graph, clean_tokens: Int[Tensor, "n pos"], corrupt_tokens: Int[Tensor, "n pos"],
                    values: ValuesFn, *, method: str = "eap-ig", steps: int = 5, batch_size: int = 16,
                    logits_to_keep: int = 1, edges: Tensor | None = None, progress: bool = True) -> EdgeScores:
    """Score every edge of ``graph`` for clean/corrupted token pairs and a metric (see :func:`attribute`).

    Args:
        model: the HookedModel of ``graph``.
        graph: :meth:`Graph.from_model`.
        clean_tokens / corrupt_tokens: ``[n, pos]`` int64 pairs of equal length.
        values: per-prompt raw metric, ``(logits, clean_logits, rows) -> [B]`` for the prompts ``rows`` of
            the batch (see :func:`task_values` for a Task), differentiable.
        method: one of :data:`METHODS` (``eap-ig`` is ``ig-inputs``).
        steps: interpolation points ``m`` of the IG methods (5 suffices for ig-inputs, Hanna et al. 2024).
        batch_size: prompts per forward (memory grows as batch x pos x n_sources x d_model).
        logits_to_keep: the metric reads the last this many positions.
        edges: for ``exact`` only: int64 indices (or a bool mask) of the edges to measure; default all.
        progress: a progress bar over batches (and edges for ``exact``).

    Returns:
        :class:`EdgeScores` with per-prompt scores.

    Raises:
        InputError: an unknown method, bad steps, unequal token shapes.
    """
    if method not in METHODS:
        raise InputError(f"unknown method {method!r}; use one of {METHODS}.")
    if method in ("eap-ig", "ig-inputs", "ig-activations") and (not isinstance(steps, int) or steps < 1):
        raise InputError(f"steps must be a positive int, got {steps!r}.")
    _check_pair(clean_tokens, corrupt_tokens)
    if method == "exact":
        return exact_scores(model, graph, clean_tokens, corrupt_tokens, values, edges=edges, batch_size=batch_size,
                            logits_to_keep=logits_to_keep, progress=progress)
    from tqdm.auto import tqdm

    n = clean_tokens.shape[0]
    per_prompt = torch.zeros(n, graph.n_edges)
    layout = Layout(model, graph)
    starts = range(0, n, batch_size)
    for s in tqdm(starts, desc=f"{method} attribution", unit="batch", disable=not progress or len(starts) < 2):
        rows = slice(s, min(n, s + batch_size))
        ct, xt = clean_tokens[rows].to(model.device), corrupt_tokens[rows].to(model.device)
        clean = capture_sources(model, ct, logits_to_keep=logits_to_keep)
        corrupt = capture_sources(model, xt, logits_to_keep=logits_to_keep)
        D = _source_deltas(model, graph, clean, corrupt)
        dense = torch.zeros(ct.shape[0], graph.n_receivers, graph.n_sources)
        grads, group = _Gradients(graph, D.shape[1:]), None
        for kwargs, weight, sources in _passes(method, steps, graph, clean, corrupt):
            if sources != group and group is not None:  # ig-activations: score each node group's passes apart
                grads.score(D, dense, group)
                grads.G.zero_()
            group, grads.weight = sources, weight
            with torch.enable_grad(), split_receivers(model, graph, grads, layout=layout, **kwargs):
                logits = model.hf(ct, use_cache=False, logits_to_keep=logits_to_keep).logits
                values(logits, clean.logits, rows).sum().backward()
            del logits  # its graph keeps the receivers' copies alive otherwise
        grads.score(D, dense, group)
        per_prompt[rows] = graph.edges_of(dense)
    return EdgeScores(graph, per_prompt.mean(0), per_prompt, "ig-inputs" if method == "eap-ig" else method,
                      steps if method in ("eap-ig", "ig-inputs", "ig-activations") else 1,
                      info={"n_prompts": n})


def task_values(task) -> ValuesFn:
    """A :class:`~mechscope.data.task.Task`'s per-prompt metric as the engine calls it (a batch of rows)."""
    def values(logits: Tensor, clean_logits: Tensor, rows: slice) -> Tensor:
        return task.subset(rows).values(logits, clean_logits)
    return values


def attribute(model, task, *, graph: Graph | None = None, method: str = "eap-ig", steps: int = 5,
              batch_size: int = 16, edges: Tensor | None = None, progress: bool = True) -> EdgeScores:
    """Score every edge of the model's graph on a task.

    Args:
        model: a HookedModel of a pre-norm family (not Gemma: see :meth:`Graph.from_model`).
        task: a :class:`~mechscope.data.task.Task` (clean and corrupted prompts, answers, metric).
        graph: the model's :class:`Graph` (built if None).
        method: ``eap``, ``eap-ig`` (= ``ig-inputs``), ``ig-activations``, ``clean-corrupted`` or ``exact``.
        steps: interpolation points of the IG methods.
        batch_size: prompts per forward.
        edges: ``exact`` only: the edges to measure (indices or a bool mask); default all.
        progress: progress bars.

    Returns:
        :class:`EdgeScores`: per-prompt and mean scores in the task metric's raw units (negative = patching
        the edge lowers the metric).

    Raises:
        InputError: an unknown method, bad steps, a model family without exact edges.
    """
    graph = graph or Graph.from_model(model)
    out = attribute_pairs(model, graph, task.clean_tokens, task.corrupt_tokens, task_values(task), method=method,
                          steps=steps, batch_size=batch_size, logits_to_keep=-task.position, edges=edges,
                          progress=progress)
    out.info.update({"task": task.name, "metric": task.metric, "steps": out.steps})
    return out


def _passes(method: str, steps: int, graph: Graph, clean: Sources, corrupt: Sources):
    """``(split_receivers kwargs, weight, sources scored)`` of each backward a method takes."""
    if method == "eap":
        yield {}, 1.0, None
    elif method in ("eap-ig", "ig-inputs"):
        for k in range(steps):
            a = k / steps
            yield {"input_value": corrupt.input + a * (clean.input - corrupt.input)}, 1.0 / steps, None
    elif method == "clean-corrupted":
        yield {}, 0.5, None
        yield {"input_value": corrupt.input}, 0.5, None
    elif method == "ig-activations":
        groups = [("input", 0, slice(0, 1), corrupt.input)]
        for L in range(graph.n_layers):
            heads, mlp = graph.layer_sources(L)
            groups += [("heads", L, heads, corrupt.z[L]), ("mlp", L, slice(mlp, mlp + 1), corrupt.mlp[L])]
        for kind, L, rows, corr in groups:
            for k in range(steps):
                a = k / steps

                def edit(out, corr=corr, a=a):
                    return corr.to(out.dtype) + a * (out - corr.to(out.dtype))
                yield {"source_edit": (kind, L, edit)}, 1.0 / steps, rows


@torch.no_grad()
def exact_scores(model, graph: Graph, clean_tokens: Tensor, corrupt_tokens: Tensor, values: ValuesFn, *,
                 edges: Tensor | None = None, batch_size: int = 16, variants: int = 16, logits_to_keep: int = 1,
                 progress: bool = True) -> EdgeScores:
    """Per prompt, the metric with one edge patched minus the clean metric, for each edge in ``edges``.

    ``variants`` edges are measured per forward (each a copy of the batch); cost: one forward of
    ``batch_size`` prompts per edge, divided by nothing but the model's speed.

    Returns:
        :class:`EdgeScores` (method ``exact``) whose ``scored`` marks the measured edges.
    """
    from tqdm.auto import tqdm

    _check_pair(clean_tokens, corrupt_tokens)
    if edges is None:
        idx = torch.arange(graph.n_edges)
    elif edges.dtype == torch.bool:
        idx = edges.nonzero().flatten()
    else:
        idx = edges.long().flatten()
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= graph.n_edges):
        raise InputError(f"edge indices must be in 0..{graph.n_edges - 1}.")
    n = clean_tokens.shape[0]
    per_prompt = torch.zeros(n, graph.n_edges)
    total = len(range(0, n, batch_size)) * len(range(0, idx.numel(), variants))
    bar = tqdm(total=total, desc="exact edge patching", unit="forward", disable=not progress or total < 2)
    for s in range(0, n, batch_size):
        rows = slice(s, min(n, s + batch_size))
        ct, xt = clean_tokens[rows].to(model.device), corrupt_tokens[rows].to(model.device)
        clean = capture_sources(model, ct, logits_to_keep=logits_to_keep)
        corrupt = capture_sources(model, xt, logits_to_keep=logits_to_keep)
        base = values(clean.logits, clean.logits, rows).float()
        layout = Layout(model, graph)
        for v in range(0, idx.numel(), variants):
            chunk = idx[v:v + variants]
            masks = torch.zeros(chunk.numel(), graph.n_edges, dtype=torch.bool)
            masks[torch.arange(chunk.numel()), chunk] = True
            logits = patched_logits(model, graph, ct, corrupt, masks, logits_to_keep=logits_to_keep, layout=layout)
            for j, e in enumerate(chunk.tolist()):
                per_prompt[rows, e] = values(logits[j], clean.logits, rows).float() - base
            bar.update(1)
    bar.close()
    scored = torch.zeros(graph.n_edges, dtype=torch.bool)
    scored[idx] = True
    return EdgeScores(graph, per_prompt.mean(0), per_prompt, "exact", scored=scored, info={"n_prompts": n})
