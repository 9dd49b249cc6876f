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

from mechscope.circuits.engine import Sources, capture_sources, head_outputs, patched_logits, split_receivers
from mechscope.circuits.graph import Graph
from mechscope.core.errors import InputError

METHODS = ("eap", "eap-ig", "ig-inputs", "ig-activations", "clean-corrupted", "exact")

#: ``values(logits [B, k, d_vocab], clean_logits [B, k, d_vocab]) -> [B]`` per-prompt raw metric.
ValuesFn = Callable[[Tensor, Tensor], Tensor]


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
    """``[S, B, P * D]``: every node's corrupted minus clean output."""
    rows = [corrupt.input - clean.input]
    for L in range(graph.n_layers):
        rows += list(head_outputs(model, L, corrupt.z[L] - clean.z[L]))
        rows.append(corrupt.mlp[L] - clean.mlp[L])
    D = torch.stack(rows)
    return D.reshape(D.shape[0], D.shape[1], -1)


class _Accumulate:
    """Receives per-layer receiver gradients and adds ``weight * Σ D[s] . g[r]`` to per-prompt scores."""

    def __init__(self, graph: Graph, D: Tensor, out: Tensor, weight: float, sources: slice | None = None):
        self.graph, self.D, self.out, self.weight = graph, D, out, weight
        self.sources = sources

    def __call__(self, receivers: list[int], grad: Tensor) -> None:
        g = grad.detach().reshape(grad.shape[0], grad.shape[1], -1).to(self.D.dtype)  # [R', B, X]
        S = self.graph.upstream_count(self.graph.receivers[receivers[0]])
        lo, hi = (0, S) if self.sources is None else (self.sources.start, min(self.sources.stop, S))
        if hi <= lo:
            return
        part = torch.einsum("sbx,rbx->brs", self.D[lo:hi], g)  # [B, R', S']
        idx = torch.tensor(receivers)
        self.out[:, idx, lo:hi] += self.weight * part


def _check_pair(clean: Tensor, corrupt: Tensor) -> None:
    if clean.shape != corrupt.shape or clean.dim() != 2:
        raise InputError(f"clean {tuple(clean.shape)} and corrupted {tuple(corrupt.shape)} tokens must both be "
                         "[n, pos] with the same shape; pair every clean prompt with a corrupted one of equal "
                         "token length.")


def attribute(model, graph: Graph, clean_tokens: Int[Tensor, "n pos"], corrupt_tokens: Int[Tensor, "n pos"],
              values: ValuesFn, *, method: str = "eap-ig", steps: int = 5, batch_size: int = 16,
              logits_to_keep: int = 1, edges: Tensor | None = None, progress: bool = True) -> EdgeScores:
    """Score every edge of ``graph`` for a clean/corrupted task.

    Args:
        model: the HookedModel of ``graph``.
        graph: :meth:`Graph.from_model`.
        clean_tokens / corrupt_tokens: ``[n, pos]`` int64 pairs of equal length.
        values: per-prompt raw metric of logits (``Task.values``), ``(logits, clean_logits) -> [B]``,
            differentiable.
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
    starts = range(0, n, batch_size)
    for s in tqdm(starts, desc=f"{method} attribution", unit="batch", disable=not progress or len(starts) < 2):
        ct, xt = clean_tokens[s:s + batch_size].to(model.device), corrupt_tokens[s:s + batch_size].to(model.device)
        clean = capture_sources(model, ct, logits_to_keep=logits_to_keep)
        corrupt = capture_sources(model, xt, logits_to_keep=logits_to_keep)
        D = _source_deltas(model, graph, clean, corrupt).float()
        dense = torch.zeros(ct.shape[0], graph.n_receivers, graph.n_sources)
        for kwargs, weight, sources in _passes(method, steps, graph, clean, corrupt):
            acc = _Accumulate(graph, D, dense, weight, sources)
            with torch.enable_grad(), split_receivers(model, graph, acc, **kwargs):
                logits = model.hf(ct, use_cache=False, logits_to_keep=logits_to_keep).logits
                values(logits, clean.logits).sum().backward()
        per_prompt[s:s + ct.shape[0]] = graph.edges_of(dense)
    return EdgeScores(graph, per_prompt.mean(0), per_prompt, "ig-inputs" if method == "eap-ig" else method,
                      steps if method in ("eap-ig", "ig-inputs", "ig-activations") else 1,
                      info={"n_prompts": n})


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
        ct, xt = clean_tokens[s:s + batch_size].to(model.device), corrupt_tokens[s:s + batch_size].to(model.device)
        clean = capture_sources(model, ct, logits_to_keep=logits_to_keep)
        corrupt = capture_sources(model, xt, logits_to_keep=logits_to_keep)
        base = values(clean.logits, clean.logits).float()
        for v in range(0, idx.numel(), variants):
            chunk = idx[v:v + variants]
            masks = torch.zeros(chunk.numel(), graph.n_edges, dtype=torch.bool)
            masks[torch.arange(chunk.numel()), chunk] = True
            logits = patched_logits(model, graph, ct, corrupt, masks, logits_to_keep=logits_to_keep)
            for j, e in enumerate(chunk.tolist()):
                per_prompt[s:s + ct.shape[0], e] = values(logits[j], clean.logits).float() - base
            bar.update(1)
    bar.close()
    scored = torch.zeros(graph.n_edges, dtype=torch.bool)
    scored[idx] = True
    return EdgeScores(graph, per_prompt.mean(0), per_prompt, "exact", scored=scored, info={"n_prompts": n})
