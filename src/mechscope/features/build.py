"""From the running state of a feature-statistics pass to the feature database.

:func:`finalize` sorts the top examples, picks the quantile examples, computes logit effects and ranks
co-activating latents; :func:`build_feature_db` runs the pass (with checkpoints), finalises and writes
the DuckDB file atomically.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from mechscope.core.errors import InputError
from mechscope.features.sources import FeatureSource, final_norm_gain, logit_effects
from mechscope.features.stats import FeatureStats, StatsConfig, _fingerprint, compute_feature_stats


@dataclass
class FinalStats:
    """Per-latent results ready for the database (all CPU tensors; N latents).

    Attributes:
        n_tokens; density / act_max / act_mean [N] (max 0 and mean 0 for a latent that never fired);
        fired [N]; hist [N, bins]; hist_edges; top_ctx/top_pos/top_val [N, K], top_acts [N, K, P]
        sorted by value, ctx -1 in unused slots; q_ctx/q_pos/q_val/q_bin [N, Q], q_acts [N, Q, P]
        (ctx -1 unused), q_edges [N, n_bins + 1]; logits (up_v, up_i, down_v, down_i) or None;
        coact_ids / coact_count [N, C] int64 and coact_jaccard [N, C] float (id -1 unused) or None;
        notes.
    """

    n_tokens: int
    density: Tensor
    act_max: Tensor
    act_mean: Tensor
    fired: Tensor
    hist: Tensor
    hist_edges: list[float]
    top: dict[str, Tensor]
    quant: dict[str, Tensor]
    logits: tuple[Tensor, Tensor, Tensor, Tensor] | None
    coact: dict[str, Tensor] | None
    notes: list[str]


def finalize(stats: FeatureStats, source: FeatureSource, cfg: StatsConfig) -> FinalStats:
    """Sort the examples, pick quantile examples, compute logit effects and co-activation rankings."""
    t = stats.tensors
    fired = t["fired"]
    n_tok = max(stats.n_tokens, 1)
    act_max = torch.where(fired > 0, t["act_max"], torch.zeros(()))
    act_mean = (t["act_sum"] / fired.clamp_min(1)).float()
    by_ctx = t["top_ctx"].argsort(dim=1, stable=True)  # ties in value: the earlier context first
    order = by_ctx.gather(1, t["top_key"].gather(1, by_ctx).argsort(dim=1, descending=True, stable=True))
    valid = t["top_key"].gather(1, order) > -math.inf
    top = {"ctx": torch.where(valid, t["top_ctx"].gather(1, order), -1), "pos": t["top_pos"].gather(1, order),
           "val": t["top_key"].gather(1, order).clamp_min(0),
           "acts": t["top_acts"].gather(1, order[:, :, None].expand_as(t["top_acts"]))}
    quant = _quantiles(_canonical_sample(t), cfg)
    logits = None
    dirs = source.directions()
    notes = list(stats.notes)
    if dirs is None:
        notes.append("logit effects skipped: the dictionary's output is not in the residual stream (d_out != d_model)")
    else:
        logits = logit_effects(dirs, final_norm_gain(source.model), source.model.W_U, cfg.n_logits)
    coact = None
    if "coact" in t:
        coact = _rank_coactivation(t["coact"], fired, cfg.n_coact)
    return FinalStats(stats.n_tokens, fired.double() / n_tok, act_max, act_mean, fired, t["hist"], cfg.hist_edges,
                      top, quant, logits, coact, notes)


def _canonical_sample(t: dict[str, Tensor]) -> dict[str, Tensor]:
    """The sample's slots in one order, by random key (descending), then context: which slot a sampled context
    sits in depends on the pass's history (and on the ranks of a distributed pass); the quantile pick must not."""
    keys = ("smp_key", "smp_val", "smp_ctx", "smp_pos", "smp_acts")
    by_ctx = t["smp_ctx"].argsort(dim=1, stable=True)
    order = by_ctx.gather(1, t["smp_key"].gather(1, by_ctx).argsort(dim=1, descending=True, stable=True))
    out = dict(t)
    for k in keys:
        idx = order.view(*order.shape, *([1] * (t[k].ndim - 2))).expand_as(t[k])
        out[k] = t[k].gather(1, idx)
    return out


def _quantiles(t: dict[str, Tensor], cfg: StatsConfig, chunk: int = 4096) -> dict[str, Tensor]:
    """:func:`_quantile_chunk` over chunks of latents (its pairwise ranking is ``[chunk, S, S]``)."""
    keys = ("smp_key", "smp_val", "smp_ctx", "smp_pos", "smp_acts")
    N = t["smp_key"].shape[0]
    parts = [_quantile_chunk({k: t[k][s:s + chunk] for k in keys}, cfg) for s in range(0, N, chunk)]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def _quantile_chunk(t: dict[str, Tensor], cfg: StatsConfig) -> dict[str, Tensor]:
    """Split each latent's uniform sample of firing contexts into ``n_quantile_bins`` equal-count bins of
    their max activation (bin b holds sorted sample positions ``[round(b m / nb), round((b + 1) m / nb))``
    of the ``m`` sampled), and keep a random ``per_bin`` of each bin (the largest random keys), sorted by
    value within the bin. Output slot ``b * per_bin + j``; unused slots have ctx -1. Vectorised over latents.
    """
    N, S = t["smp_key"].shape
    nb, pb = cfg.n_quantile_bins, cfg.per_bin
    valid = t["smp_key"] > -math.inf
    m = valid.sum(1, keepdim=True)  # [N, 1]
    val_sorted, order = torch.where(valid, t["smp_val"], math.inf).sort(dim=1, stable=True)
    b_ = torch.arange(nb + 1)
    bounds = (2 * b_ * m + nb) // (2 * nb)  # [N, nb + 1], round half up
    r = torch.arange(S).expand(N, S)
    ok = r < m
    bin_r = (torch.searchsorted(bounds.contiguous(), r.contiguous(), right=True) - 1).clamp(0, nb - 1)
    key_r = t["smp_key"].gather(1, order)
    # within each bin, largest key first: rank by key inside the bin
    comp = torch.where(ok, bin_r.double() + (1 - key_r.double()) * 0.5, math.inf)
    by_key = comp.argsort(dim=1, stable=True)
    rank_key = torch.empty_like(by_key).scatter_(1, by_key, r) - bounds.gather(1, bin_r)
    keep = ok & (rank_key < pb)
    # among the kept of a bin, rank by value (descending; ties: lower sorted position first)
    same = keep[:, :, None] & keep[:, None, :] & (bin_r[:, :, None] == bin_r[:, None, :])
    higher = (val_sorted[:, None, :] > val_sorted[:, :, None]) | (
        (val_sorted[:, None, :] == val_sorted[:, :, None]) & (r[:, None, :] < r[:, :, None]))
    rank_val = (same & higher).sum(2)
    slot = torch.where(keep, bin_r * pb + rank_val, nb * pb)  # nb * pb: a discard column
    Q = nb * pb
    P = t["smp_acts"].shape[2]

    def place(x: Tensor, fill) -> Tensor:
        out = torch.full((N, Q + 1, *x.shape[2:]), fill, dtype=x.dtype)
        idx = slot.view(N, S, *([1] * (x.ndim - 2))).expand_as(x)
        return out.scatter_(1, idx, x)[:, :Q]

    src = order  # sorted position -> original slot
    ctx = torch.where(keep, t["smp_ctx"].gather(1, src), -1)
    acts = t["smp_acts"].gather(1, src[:, :, None].expand(N, S, P))
    edge_idx = torch.cat([bounds[:, :nb].clamp(max=(m - 1).clamp_min(0)), (m - 1).clamp_min(0)], dim=1)
    return {"ctx": place(ctx, -1), "pos": place(t["smp_pos"].gather(1, src), 0),
            "val": place(t["smp_val"].gather(1, src), 0.0), "bin": place(bin_r, 0), "acts": place(acts, 0.0),
            "edges": torch.where(m > 0, val_sorted.gather(1, edge_idx), 0.0)}


def _rank_coactivation(U: Tensor, fired: Tensor, n: int, chunk: int = 512) -> dict[str, Tensor]:
    """Top-``n`` co-activating latents of each latent by Jaccard ``c / (f_i + f_j - c)``, from the upper
    triangle ``U`` of pair counts and the firing counts (rows in chunks: no [N, N] float copy)."""
    N = U.shape[0]
    n = min(n, max(N - 1, 1))
    ids, counts, jacs = [], [], []
    for s in range(0, N, chunk):
        rows = slice(s, min(N, s + chunk))
        C = U[rows].long() + U[:, rows].T.long()  # [R, N] symmetric counts, 0 on the diagonal
        union = fired[rows, None] + fired[None, :] - C
        jac = torch.where(C > 0, C / union.clamp_min(1), torch.zeros(()))
        jac[torch.arange(C.shape[0]), torch.arange(rows.start, rows.stop)] = -1.0
        top = jac.topk(n, dim=1)
        ok = top.values > 0
        ids.append(torch.where(ok, top.indices, -1))
        counts.append(C.gather(1, top.indices))
        jacs.append(top.values.clamp_min(0).float())
    return {"ids": torch.cat(ids), "count": torch.cat(counts), "jaccard": torch.cat(jacs)}


def build_feature_db(source: FeatureSource, tokens: Tensor, out: str | Path, cfg: StatsConfig = StatsConfig(), *,
                     resume: bool = False, meta: dict | None = None, progress: bool = True,
                     on_batch: Callable[[int], None] | None = None, dist=None):
    """Compute the statistics of every latent of ``source`` over ``tokens`` and write the feature database.

    Checkpoints go to ``<out>.partial/`` (removed when the database is written); the database is built in
    a temporary file and renamed, so a killed build never leaves a partial file at ``out``.

    Args:
        source: the latents. tokens: ``[n_contexts, context_len]`` int64. out: the ``.duckdb`` file.
        cfg: :class:`StatsConfig`. resume: continue from ``<out>.partial/``. meta: extra provenance
            (corpus names, ...). progress / on_batch: as in :func:`compute_feature_stats`.
        dist: a :class:`~mechscope.scale.dist.DistInfo` (torchrun): each rank folds the batches of its global
            indices, the statistics merge exactly (:mod:`mechscope.features.parallel`), rank 0 writes the database;
            checkpoints per rank in ``<out>.partial/rank{r}-of-{W}`` (resume at the same world size).

    Returns:
        The open (read-only) :class:`~mechscope.features.db.FeatureDB` (None on ranks other than 0).

    Raises:
        InputError: as :func:`compute_feature_stats`; an existing checkpoint without ``resume`` (resume
            or delete it).
    """
    from mechscope.features.db import FeatureDB

    out = Path(out)
    partial = out.with_name(out.name + ".partial")
    W, rank = (1, 0) if dist is None else (dist.world_size, dist.rank)
    ckpt = partial if W == 1 else partial / f"rank{rank}-of-{W}"
    if not resume and (ckpt / "state.json").exists():
        raise InputError(f"{ckpt} holds a checkpoint of an interrupted build; pass resume=True (--resume) to "
                         "continue it, or delete the folder to start over.")
    stats = compute_feature_stats(source, tokens, cfg, checkpoint_dir=ckpt, resume=resume, progress=progress,
                                  on_batch=on_batch, dist=dist)
    if W > 1:
        from mechscope.features.parallel import merge_stats

        stats = merge_stats(stats, dist)
        if rank != 0:  # rank 0 writes the database (no barrier after: a large write may outlast the timeout)
            return None
    final = finalize(stats, source, cfg)
    fp = _fingerprint(source, tokens.long().cpu(), cfg)
    info = {"model": source.model.cfg.name, "source": source.identity, "hook": source.hook,
            "tokens_sha256": fp["tokens_sha256"], "config": asdict(cfg), **(meta or {})}
    db = FeatureDB.create(out, final, tokens.long().cpu(), source.model.tokenizer, info)
    shutil.rmtree(partial, ignore_errors=True)
    return db
