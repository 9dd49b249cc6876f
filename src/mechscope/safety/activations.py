"""Activations of labelled examples at many sites from one cached pass: the features probes are fitted on.

Each example is token ids with a mask of the tokens to score (``RenderedExample`` from
:func:`mechscope.data.labelled.render`, or anything with ``tokens`` int64 ``[pos]`` and ``score_mask``
bool ``[pos]``). Examples are sorted by length and right-padded into batches: in a causal model the padding
after a sequence never reaches its real positions, so each example's activations are those of its own
forward (up to float rounding of the batched matmuls; tested to 1e-5 against one forward per example).
Every requested site is cached in the same forward, so a sweep over every layer costs one pass over the
data.

Aggregations over an example's scored tokens: ``mean`` (Goldowsky-Dill et al. 2025 score a response by the
mean over its tokens), ``max`` (per dimension), ``last`` (the last scored token).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from mechscope.core.errors import InputError
from mechscope.safety.probes import AGGREGATIONS


@dataclass
class Features:
    """Per-example activation vectors at each site.

    Attributes:
        sites: hook names, in the model's order.
        vectors: site -> float32 ``[n_examples, d]``, aggregated over each example's scored tokens.
        aggregation: one of :data:`AGGREGATIONS`.
        n_scored: int64 ``[n_examples]``, scored tokens per example.
        tokens: with ``keep_tokens``: site -> list of float32 ``[n_scored_i, d]`` (the scored tokens'
            activations, for token-level probes and monitors' offline checks); else empty.
    """

    sites: list[str]
    vectors: dict[str, Tensor]
    aggregation: str
    n_scored: Tensor
    tokens: dict[str, list[Tensor]] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.n_scored.numel())

    def subset(self, idx: Sequence[int] | Tensor) -> Features:
        """The features of examples ``idx``, in that order."""
        i = torch.as_tensor(idx, dtype=torch.long)
        return Features(list(self.sites), {s: v[i] for s, v in self.vectors.items()}, self.aggregation,
                        self.n_scored[i], {s: [t[j] for j in i.tolist()] for s, t in self.tokens.items()})


def aggregate(acts: Tensor, how: str) -> Tensor:
    """Aggregate ``acts [n_tokens, d]`` over tokens: ``mean``, ``max`` (per dimension) or ``last``."""
    if how == "mean":
        return acts.mean(0)
    if how == "max":
        return acts.max(0).values
    if how == "last":
        return acts[-1]
    raise InputError(f"unknown aggregation {how!r}; use one of {AGGREGATIONS}.")


def _check_examples(examples) -> None:
    if len(examples) == 0:
        raise InputError("no examples to collect activations for; pass a non-empty dataset.")
    for i, ex in enumerate(examples):
        t, m = ex.tokens, ex.score_mask
        if t.dim() != 1 or m.shape != t.shape or m.dtype != torch.bool:
            raise InputError(f"example {i}: tokens must be int64 [pos] and score_mask bool [pos] of the same length, "
                             f"got {tuple(t.shape)} and {m.dtype} {tuple(m.shape)}.")
        if not bool(m.any()):
            raise InputError(f"example {i} scores no token (its score_mask is all False); fix its score_span.")


@torch.no_grad()
def collect_features(model, examples, sites: str | Sequence[str] = "blocks.*.hook_resid_post", *,
                     aggregation: str = "mean", batch_size: int = 16, keep_tokens: bool = False,
                     progress: bool = True) -> Features:
    """Run the model once over ``examples`` and aggregate every site's activations over the scored tokens.

    Args:
        model: a HookedModel.
        examples: rendered examples (``tokens`` int64 ``[pos]``, ``score_mask`` bool ``[pos]``).
        sites: hook names or globs with one value per position (``[batch, pos, d]``), e.g. every
            ``blocks.*.hook_resid_post`` (the default).
        aggregation: ``mean``, ``max`` or ``last`` over the scored tokens.
        batch_size: examples per forward (sorted by length, right-padded).
        keep_tokens: also keep each example's scored tokens' activations (memory: n_tokens x d per site).
        progress: a progress bar over batches.

    Returns:
        :class:`Features`, examples in the given order.

    Raises:
        InputError: no examples; an example without scored tokens or with malformed tensors; an unknown
            aggregation; a site whose value is not ``[batch, pos, d]``; NaN or inf activations (names the
            site, the example and the count).
        HookNameError: a site the model does not have.
    """
    from tqdm.auto import tqdm

    if aggregation not in AGGREGATIONS:
        raise InputError(f"unknown aggregation {aggregation!r}; use one of {AGGREGATIONS}.")
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}.")
    _check_examples(examples)
    names = model.resolve([sites] if isinstance(sites, str) else list(sites))
    n = len(examples)
    order = sorted(range(n), key=lambda i: int(examples[i].tokens.numel()))
    vectors: dict[str, Tensor] = {}
    tokens: dict[str, list[Tensor | None]] = {s: [None] * n for s in names} if keep_tokens else {}
    n_scored = torch.tensor([int(ex.score_mask.sum()) for ex in examples], dtype=torch.long)
    pad = 0
    starts = range(0, n, batch_size)
    for s in tqdm(starts, desc="activations", unit="batch", disable=not progress or len(starts) < 2):
        rows = order[s:s + batch_size]
        P = max(int(examples[i].tokens.numel()) for i in rows)
        ids = torch.full((len(rows), P), pad, dtype=torch.long)
        attn = torch.zeros(len(rows), P, dtype=torch.long)
        for j, i in enumerate(rows):
            t = examples[i].tokens
            ids[j, :t.numel()] = t
            attn[j, :t.numel()] = 1
        cache = model.run(ids.to(model.device), cache=names, attention_mask=attn.to(model.device),
                          logits_to_keep=1).cache
        for site in names:
            value = cache[site]
            if value.dim() != 3:
                raise InputError(f"site {site} has shape {tuple(value.shape)}; probes need one vector per position "
                                 "([batch, pos, d]), e.g. blocks.L.hook_resid_post.")
            for j, i in enumerate(rows):
                m = examples[i].score_mask
                acts = value[j, :m.numel()][m.to(value.device)].float().cpu()
                bad = int((~torch.isfinite(acts)).sum())
                if bad:
                    raise InputError(f"{bad} NaN/inf activation values at {site} in example {i}; check the model's "
                                     "dtype (fp16 overflows: load with dtype='float32') and the example's text.")
                if site not in vectors:
                    vectors[site] = torch.empty(n, acts.shape[-1])
                vectors[site][i] = aggregate(acts, aggregation)
                if keep_tokens:
                    tokens[site][i] = acts
    return Features(names, vectors, aggregation, n_scored, tokens)  # type: ignore[arg-type]


__all__ = ["Features", "aggregate", "collect_features"]
