"""Feature databases of several dictionaries of one model from one streaming pass.

A transcoder set has one dictionary per layer; building their databases one by one would run the model over
the corpus once per layer (30 times for SmolLM2). Here one forward per batch caches every source's hook and
each source folds its own latents into its own :class:`~mechscope.features.stats.FeatureStats`, so every
database equals the one :func:`~mechscope.features.build.build_feature_db` writes for that source alone
(same statistics, same examples: tested), at the cost of one forward.

Checkpoints go to each output's own ``<out>.partial/`` folder, written together; a killed build resumes
from the earliest one (a source whose checkpoint is ahead skips the batches it has), and a source whose
database was already written (the file exists and its checkpoint is gone) is left as it is.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from torch import Tensor

from mechscope.core.errors import InputError
from mechscope.features.build import finalize
from mechscope.features.sources import FeatureSource
from mechscope.features.stats import (FeatureStats, StatsConfig, _fingerprint, check_batch, check_stats_tokens)


def _running_bytes(source: FeatureSource, P: int, cfg: StatsConfig) -> int:
    n = source.n_latents
    return 4 * n * (cfg.top_k + cfg.sample_size) * P + (4 * n * n if n <= cfg.coact_max_latents else 0)


def build_feature_dbs(sources: list[FeatureSource], tokens: Tensor, outs: list[str | Path],
                      cfg: StatsConfig = StatsConfig(), *, resume: bool = False, metas: list[dict] | None = None,
                      progress: bool = True, dist=None) -> list[Path]:
    """Write the feature database of every source in ``sources`` from one pass of the model over ``tokens``.

    Args:
        sources: :class:`FeatureSource` s of one model (the same object), each a dictionary or MLP neurons.
        tokens: ``[n_contexts, context_len]`` int64 (position 0, the BOS, is not counted).
        outs: one ``.duckdb`` path per source (distinct).
        cfg: :class:`StatsConfig`, shared; its ``memory_budget_bytes`` bounds the running state of *all*
            sources together.
        resume: continue from the ``<out>.partial/`` checkpoints; outputs already written are kept.
        metas: extra provenance per source (as ``build_feature_db``'s ``meta``).
        progress: a tqdm bar over contexts.
        dist: a :class:`~mechscope.scale.dist.DistInfo` (torchrun): batch ``b`` to rank ``b % world_size``, each
            source's statistics merged exactly (:func:`mechscope.features.parallel.merge_stats`), rank 0 writes
            the databases; checkpoints per rank (``<out>.partial/rank{r}-of-{W}``, resumed at the same world size).

    Returns:
        The database paths, in the order of ``sources``.

    Raises:
        InputError: no sources; sources of different models; ``outs`` not one distinct path per source; the
            running state of all sources over ``memory_budget_bytes``; a checkpoint without ``resume``; a
            checkpoint of other settings; bad tokens (as :func:`~mechscope.features.stats.compute_feature_stats`).
    """
    from mechscope.features.db import FeatureDB

    if not sources:
        raise InputError("no feature sources given; pass at least one dictionary.")
    model = sources[0].model
    if any(s.model is not model for s in sources):
        raise InputError("every source must read the same loaded model (one forward serves them all).")
    outs = [Path(o) for o in outs]
    if len(outs) != len(sources) or len({o.resolve() for o in outs}) != len(outs):
        raise InputError(f"give one distinct output path per source: {len(sources)} sources, {len(outs)} paths "
                         f"({len({o.resolve() for o in outs})} distinct).")
    metas = metas or [{} for _ in sources]
    tokens = check_stats_tokens(tokens)
    P = tokens.shape[1]
    need = sum(_running_bytes(s, P, cfg) for s in sources)
    if need > cfg.memory_budget_bytes:
        raise InputError(f"the running state of {len(sources)} sources needs {need / 2**30:.1f} GiB > "
                         f"memory_budget_bytes={cfg.memory_budget_bytes / 2**30:.1f} GiB. Lower top_k, per_bin or "
                         "the context length, build fewer sources per pass, or raise the budget.")
    W, rank = (1, 0) if dist is None else (dist.world_size, dist.rank)
    partials = [o.with_name(o.name + ".partial") for o in outs]
    if W > 1:
        partials = [p / f"rank{rank}-of-{W}" for p in partials]
    todo = []
    for i, (src, out, part) in enumerate(zip(sources, outs, partials)):
        has_ckpt = (part / "state.json").exists()
        if has_ckpt and not resume:
            raise InputError(f"{part} holds a checkpoint of an interrupted build; pass resume=True (--resume) to "
                             "continue it, or delete the folder to start over.")
        if resume and out.exists() and not has_ckpt:
            continue  # written by the interrupted run
        todo.append(i)
    fps = {i: _fingerprint(sources[i], tokens, cfg) for i in todo}
    stats: dict[int, FeatureStats] = {}
    for i in todo:
        ck = partials[i] / "state.json"
        stats[i] = FeatureStats.load(partials[i], fps[i]) if resume and ck.exists() else \
            FeatureStats.empty(sources[i].n_latents, P, cfg)
    n_batches = math.ceil(tokens.shape[0] / cfg.batch_contexts)
    start = min((st.next_batch for st in stats.values()), default=n_batches)
    hooks = list(dict.fromkeys(sources[i].hook for i in todo))
    stops = [sources[i].stop_at_layer for i in todo]
    stop = None if not stops or any(s is None for s in stops) else max(stops)
    bar = None
    if progress and todo and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=tokens.shape[0], initial=min(tokens.shape[0], start * cfg.batch_contexts), unit="ctx",
                   desc=f"feature stats ({len(todo)} sources)", dynamic_ncols=True)
    try:
        for bi in (b for b in range(start, n_batches) if b % W == rank):  # this rank's batches
            ids = torch.arange(bi * cfg.batch_contexts, min(tokens.shape[0], (bi + 1) * cfg.batch_contexts))
            with torch.no_grad():
                cache = model.run(tokens[ids].to(model.device), cache=hooks, stop_at_layer=stop).cache
            for i in todo:
                st = stats[i]
                if st.next_batch > bi:
                    continue
                acts, entries = sources[i].from_hook(cache[sources[i].hook], tokens[ids].shape)
                check_batch(sources[i], acts, entries, ids)
                st.update(acts, entries, ids, bi, cfg)
                st.next_batch = bi + 1
            del cache
            if bar is not None:
                bar.update(len(ids))
            local = (bi - rank) // W + 1  # this rank's count of batches (one process: bi + 1)
            if cfg.checkpoint_every and local % cfg.checkpoint_every == 0 and bi + 1 < n_batches:
                for i in todo:
                    stats[i].save(partials[i], fps[i])
    finally:
        if bar is not None:
            bar.close()
    if W > 1:
        from mechscope.features.parallel import merge_stats

        for i in todo:  # every rank, the same order: a collective per source
            stats[i] = merge_stats(stats[i], dist)
        if rank != 0:
            return outs  # rank 0 writes the databases
    for i in todo:
        src = sources[i]
        final = finalize(stats[i], src, cfg)
        info = {"model": model.cfg.name, "source": src.identity, "hook": src.hook,
                "tokens_sha256": fps[i]["tokens_sha256"], "config": asdict(cfg), **metas[i]}
        FeatureDB.create(outs[i], final, tokens, model.tokenizer, info).close()
        shutil.rmtree(outs[i].with_name(outs[i].name + ".partial"), ignore_errors=True)
    return outs
