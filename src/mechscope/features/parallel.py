"""Feature statistics over several ranks (torchrun): each rank folds the batches of its global indices, then the
running statistics merge into what one process computes.

Batch ``b`` belongs to rank ``b % world_size``; its random sample keys are seeded by ``b``, as in one process. The
merge is exact for everything the database stores as counts or selections: firing counts, histograms and
co-activation counts are summed (integers), maxima taken, the top contexts are the ``top_k`` largest of all ranks'
top contexts (a context's key is its max activation; ties go to the lower context id), and the quantile sample is
the ``sample_size`` largest random keys of all ranks' samples — the same sets one process keeps (up to exact ties
at the last kept place, which one process breaks by its pass's history). The quantile examples are then picked
from the sample in a canonical slot order (:func:`mechscope.features.build._canonical_sample`), so they do not
depend on which rank sampled what. Only the float64 activation sums (the mean activation) are added in another
order, so they agree to float64 rounding.

Checkpoints are per rank (``<out>.partial/rank{r}-of-{W}``): a killed build resumes at the same world size.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from mechscope.features.stats import FeatureStats

SUMMED = ("fired", "act_sum", "hist")
SLOTS = {"top": ("top_key", "top_ctx", "top_pos", "top_acts"), "smp": ("smp_key", "smp_val", "smp_ctx", "smp_pos",
                                                                       "smp_acts")}


def _gather(info, t: Tensor) -> Tensor:
    """``[W, *t.shape]``: every rank's ``t`` (all ranks get all)."""
    from mechscope.scale.dist import guarded

    out = torch.empty((info.world_size * t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)
    guarded(info, "the feature statistics' all-gather", dist.all_gather_single, out, t.contiguous())
    return out.view(info.world_size, *t.shape)


def _select(parts: dict[str, Tensor], key: str, ctx: str | None, keep: int) -> dict[str, Tensor]:
    """Per latent, the ``keep`` slots of largest key among ``[W, N, S, ...]`` candidates (ties: lower context)."""
    W, N, S = parts[key].shape[:3]
    flat = {k: v.permute(1, 0, *range(2, v.ndim)).reshape(N, W * S, *v.shape[3:]) for k, v in parts.items()}
    order = torch.arange(W * S).expand(N, W * S)
    if ctx is not None:  # stable sorts: by context, then by key descending
        by_ctx = flat[ctx].argsort(dim=1, stable=True)
        order = by_ctx
    keys = flat[key].gather(1, order)
    order = order.gather(1, keys.argsort(dim=1, descending=True, stable=True))[:, :keep]
    out = {}
    for k, v in flat.items():
        idx = order.view(N, keep, *([1] * (v.ndim - 2))).expand(N, keep, *v.shape[2:])
        out[k] = v.gather(1, idx)
    return out


def merge_stats(stats: FeatureStats, info) -> FeatureStats:
    """Every rank's running statistics merged (a collective: every rank calls it and gets the merged result).

    Args:
        stats: this rank's :class:`FeatureStats` over the batches it owns.
        info: the job's :class:`~mechscope.scale.dist.DistInfo`.

    Returns:
        The statistics one process would have over all batches (see the module docstring for what is exact).
    """
    from mechscope.scale.dist import guarded

    if info.world_size == 1:
        return stats
    t = stats.tensors
    merged = dict(t)
    for k in SUMMED + (("coact",) if "coact" in t else ()):
        v = t[k].clone()
        guarded(info, f"the feature statistics' all-reduce of {k}", dist.all_reduce, v)
        merged[k] = v
    mx = t["act_max"].clone()
    guarded(info, "the feature statistics' all-reduce of act_max", dist.all_reduce, mx, dist.ReduceOp.MAX)
    merged["act_max"] = mx
    counts = torch.tensor([stats.n_tokens, stats.n_contexts], dtype=torch.int64)
    guarded(info, "the feature statistics' all-reduce of counts", dist.all_reduce, counts)
    for group, names in SLOTS.items():
        parts = {k: _gather(info, t[k]) for k in names}
        keep = t[names[0]].shape[1]
        sel = _select(parts, names[0], names[1] if group == "top" else None, keep)
        merged.update(sel)
    notes = list(dict.fromkeys(stats.notes))
    return FeatureStats(int(counts[0]), int(counts[1]), stats.next_batch, merged, notes)
