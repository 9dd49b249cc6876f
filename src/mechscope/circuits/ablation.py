"""What an ablated edge carries, and the task metric under many edge masks at once.

An edge outside a circuit carries, instead of its source's output on the clean prompt:

- ``corrupted``: the source's output on the paired corrupted prompt (resample ablation with a fixed pair;
  EAP-IG's and MIB's "patching");
- ``mean``: the source's output averaged over a reference set of prompts, per position (default: the task's
  corrupted prompts, the analogue of Wang et al.'s ABC distribution);
- ``zero``: zero (the node's contribution removed; biases outside the node outputs stay).

Edge level patches every edge outside the circuit; node level patches every edge out of every node outside
the circuit's node set (:attr:`Circuit.nodes`), so a circuit's nodes talk to everything.

:func:`measure` runs a task's prompts once per batch for the clean model and then every mask as a variant of
:func:`~mechscope.circuits.engine.patched_logits` (variants stacked on the batch axis, ``rows_per_forward``
rows per forward), so a whole faithfulness curve costs a few forwards per batch.

References:
    Miller, Chughtai and Saunders 2024, "Transformer Circuit Evaluation Metrics Are Not Robust" (ablation
    type and level change faithfulness); Wang et al. 2022 (mean ablation over a reference distribution).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from mechscope.circuits.circuit import Circuit
from mechscope.circuits.engine import Layout, Sources, capture_sources, patched_logits
from mechscope.circuits.graph import Graph
from mechscope.core.errors import InputError

ABLATIONS = ("corrupted", "mean", "zero")
LEVELS = ("edge", "node")


def ablated_edges(circuit: Circuit, level: str = "edge") -> Bool[Tensor, " n_edges"]:
    """Bool ``[n_edges]``: the edges an evaluation of ``circuit`` patches at ``level``.

    Raises:
        InputError: an unknown level.
    """
    if level == "edge":
        return ~circuit.edges
    if level == "node":
        return ~circuit.node_mask()[circuit.graph.edge_source]
    raise InputError(f"unknown level {level!r}; use one of {LEVELS}.")


@torch.no_grad()
def mean_sources(model, tokens: Int[Tensor, "n_ref pos"], *, batch_size: int = 16, logits_to_keep: int = 1) -> Sources:
    """Every node's output averaged over ``tokens`` per position (float64 sums, stored in the model's dtype).

    Args:
        tokens: ``[n_ref, pos]`` int64 reference prompts, all of one length.

    Returns:
        :class:`Sources` with batch 1 (``input [1, P, D]``, ``z [1, P, H, d_head]``, ``mlp [1, P, D]``,
        ``logits [1, k, d_vocab]``); :func:`broadcast_sources` expands it to a batch.
    """
    if tokens.dim() != 2 or tokens.shape[0] < 1:
        raise InputError(f"reference tokens must be [n, pos] with n >= 1, got {tuple(tokens.shape)}.")
    total = None
    for s in range(0, tokens.shape[0], batch_size):
        cs = capture_sources(model, tokens[s:s + batch_size].to(model.device), logits_to_keep=logits_to_keep)
        parts = [cs.input, *cs.z, *cs.mlp, cs.logits]
        sums = [p.double().sum(0, keepdim=True) for p in parts]
        total = sums if total is None else [a + b for a, b in zip(total, sums)]
        dtype = cs.input.dtype
    means = [t.div(tokens.shape[0]).to(dtype) for t in total]
    n = model.cfg.n_layers
    return Sources(means[0], means[1:1 + n], means[1 + n:1 + 2 * n], means[-1])


def zero_sources(like: Sources) -> Sources:
    """Zeros of the shapes of ``like`` (batch 1)."""
    def z(t):
        return torch.zeros_like(t[:1])
    return Sources(z(like.input), [z(t) for t in like.z], [z(t) for t in like.mlp], z(like.logits))


def broadcast_sources(src: Sources, batch: int) -> Sources:
    """A batch-1 :class:`Sources` viewed as ``batch`` rows (no copy)."""
    def b(t):
        return t.expand(batch, *t.shape[1:])
    return Sources(b(src.input), [b(t) for t in src.z], [b(t) for t in src.mlp], b(src.logits))


def check_model(model, graph: Graph) -> None:
    """Raise if ``graph`` is not the graph of ``model``'s shape (a circuit of another model)."""
    c = model.cfg
    if (graph.n_layers, graph.n_heads, graph.n_kv_heads) != (c.n_layers, c.n_heads, c.n_kv_heads):
        raise InputError(
            f"the circuit belongs to {graph.model_name}'s graph ({graph.n_layers} layers, {graph.n_heads} heads), not to "
            f"{c.name} ({c.n_layers} layers, {c.n_heads} heads); evaluate it on {graph.model_name}, or select a circuit "
            f"for {c.name} from its own edge scores.")


@torch.no_grad()
def measure(model, graph: Graph, task, plan: Sequence[tuple[str, Tensor]], *,
            reference: Int[Tensor, "n_ref pos"] | None = None,
            batch_size: int = 16, rows_per_forward: int = 64, progress: bool = False) -> tuple[Tensor, list[Tensor]]:
    """The task metric, per prompt, of the clean model and of each masked variant.

    Args:
        model: the HookedModel of ``graph``.
        graph: its :class:`Graph`.
        task: a :class:`~mechscope.data.task.Task`.
        plan: ``(ablation, masks)`` pairs: masks bool ``[V, n_edges]`` (True = the edge is ablated), ablation
            one of :data:`ABLATIONS`.
        reference: ``[n_ref, pos]`` prompts whose per-position mean the ``mean`` ablation uses (default: the
            task's corrupted prompts); ``pos`` must be the task's.
        batch_size: prompts per batch.
        rows_per_forward: variants x prompts per forward; the engine holds ``[n_sources, rows, pos, d_model]``
            floats, so memory grows with it (SmolLM2, 14 positions: 10 MB a row).
        progress: a progress bar over batches.

    Returns:
        (clean ``[n]``, one ``[V, n]`` per plan entry), float64 CPU, in the metric's raw units. A mask that
        ablates nothing is the clean model (its values are the clean ones exactly); repeated masks run once.

    Raises:
        InputError: an unknown ablation, masks of the wrong size, a reference of another length.
    """
    from tqdm.auto import tqdm

    check_model(model, graph)
    for ablation, masks in plan:
        if ablation not in ABLATIONS:
            raise InputError(f"unknown ablation {ablation!r}; use one of {ABLATIONS}.")
        if masks.dim() != 2 or masks.shape[1] != graph.n_edges:
            raise InputError(f"masks must be [V, {graph.n_edges}], got {tuple(masks.shape)}.")
    if batch_size < 1 or rows_per_forward < 1:
        raise InputError(f"batch_size and rows_per_forward must be >= 1, got {batch_size} and {rows_per_forward}.")
    keep = -task.position
    n, pos = task.clean_tokens.shape
    fixed: dict[str, Sources] = {}
    if any(a in ("mean", "zero") for a, _ in plan):
        ref = task.corrupt_tokens if reference is None else reference
        if ref.dim() != 2 or ref.shape[1] != pos:
            raise InputError(f"reference prompts of shape {tuple(ref.shape)} do not fit the task's {pos} positions; the "
                             "mean ablation averages per position, so give [n_ref, pos] prompts of the task's length.")
        fixed["mean"] = mean_sources(model, ref if any(a == "mean" for a, _ in plan) else ref[:1], batch_size=batch_size,
                                     logits_to_keep=keep)
        fixed["zero"] = zero_sources(fixed["mean"])
    unique = []  # per plan entry: (ablation, distinct masks [U, E], index of each mask in them [V])
    for ablation, masks in plan:
        u, inverse = torch.unique(masks.bool().cpu(), dim=0, return_inverse=True)
        unique.append((ablation, u, inverse))
    layout = Layout(model, graph)
    clean_vals = torch.zeros(n, dtype=torch.float64)
    out = [torch.zeros(u.shape[0], n, dtype=torch.float64) for _, u, _ in unique]
    starts = range(0, n, batch_size)
    for s in tqdm(starts, desc="evaluating circuits", unit="batch", disable=not progress or len(starts) < 2):
        rows = slice(s, min(n, s + batch_size))
        part = task.subset(rows)
        ct = part.clean_tokens.to(model.device)
        B = ct.shape[0]
        clean_logits = model.hf(ct, use_cache=False, logits_to_keep=keep).logits
        clean_vals[rows] = part.values(clean_logits, clean_logits).double().cpu()
        corrupt = None
        for (ablation, u, _), vals in zip(unique, out):
            if ablation == "corrupted":
                if corrupt is None:
                    corrupt = capture_sources(model, part.corrupt_tokens.to(model.device), logits_to_keep=keep)
                src = corrupt
            else:
                src = broadcast_sources(fixed[ablation], B)
            run = u.any(1)
            vals[~run, rows] = clean_vals[rows]  # a mask that ablates nothing is the clean run
            todo = run.nonzero().flatten()
            per = max(1, rows_per_forward // B)
            for c in range(0, todo.numel(), per):
                idx = todo[c:c + per]
                logits = patched_logits(model, graph, ct, src, u[idx], logits_to_keep=keep, layout=layout)
                for v, i in enumerate(idx.tolist()):
                    vals[i, rows] = part.values(logits[v], clean_logits).double().cpu()
    return clean_vals, [vals[inverse] for vals, (_, _, inverse) in zip(out, unique)]


__all__ = ["ABLATIONS", "LEVELS", "ablated_edges", "broadcast_sources", "check_model", "mean_sources", "measure",
           "zero_sources"]
