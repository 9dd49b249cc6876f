"""Writing the on-disk activation store: :func:`harvest` runs the model over contexts and writes sharded
safetensors with a manifest (the format and the reader: :mod:`mechscope.data.shards`).

Every file is written to a hidden tmp file, fsynced, then renamed over its final name (and the directory fsynced),
so a kill at any moment leaves the files the manifest lists intact.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from jaxtyping import Int
from safetensors.torch import save as st_save
from torch import Tensor

from mechscope.core.errors import InputError
from mechscope.data.shards import (_IDENTITY, FORMAT, FORMAT_VERSION, MANIFEST, ShardedActivations, _read_manifest,
                                   _shard_ok)
from mechscope.data.store import (
    check_contexts,
    contexts_fingerprint,
    forward_rows,
    index_rows,
    model_fingerprint,
    plan_memory,
    positive_int,
    site_dims,
    stop_layer,
    storage_dtype,
)


# -- atomic writes -----------------------------------------------------------------------------------
def _write_file(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` and fsync it (tests replace this to simulate a full disk or a kill)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


def _atomic_write(path: Path, data: bytes) -> None:
    """Write via a tmp file + fsync + os.replace + directory fsync; a failure leaves ``path`` as it was.

    Raises:
        OSError: ENOSPC with the bytes needed and free, when the disk is full (tmp file removed).
    """
    tmp = _tmp(path)
    try:
        _write_file(tmp, data)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            free = shutil.disk_usage(path.parent).free
            raise OSError(errno.ENOSPC, (
                f"disk full while writing {path.name}: it needs {len(data):,} bytes and "
                f"{free:,} bytes are free on {path.parent}. The shards already listed in {MANIFEST} are "
                "intact; free space (or move the directory) and re-run harvest with the same arguments "
                "to resume.")) from e
        raise
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_manifest(out: Path, manifest: dict) -> None:
    _atomic_write(out / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())


# -- harvest ---------------------------------------------------------------------------------------------
def harvest(model, hooks: str | Sequence[str], contexts: Int[Tensor, "n_contexts context_len"],
            out_dir: str | os.PathLike, *, shard_tokens: int = 2**18, dtype: torch.dtype = torch.bfloat16,
            skip_positions: int = 1, forward_batch_contexts: int = 8, memory_budget_bytes: int | None = None,
            progress: bool = True, dist=None) -> "ShardedActivations":
    """Run the model once over ``contexts`` and write the activations at ``hooks`` to sharded safetensors.

    Resumable: called again with the same arguments on the same ``out_dir`` after a kill, it checks the
    manifest matches and continues at the first shard not written (already complete: returns at once).
    Shards hold whole contexts and forward batches never straddle shards, so a resumed harvest writes
    the same bytes as an uninterrupted one.

    Distributed (``dist``, under torchrun): shard ``s`` belongs to rank ``s % world_size``, so every file's name
    and bytes depend on global context indices only and a harvest at any world size writes the same directory,
    byte for byte, as one process (manifest included). A shard no world size divides is simply owned by fewer
    ranks: nothing pads, drops or waits inside the loop. Each finished shard also gets a hidden sidecar
    (``.shard_00007.json``, its manifest entry) so that ranks need not share the manifest while they work; rank 0
    lists every shard once all are written, then removes the sidecars. A relaunch after a killed rank, at this
    or another world size, recomputes only the shards without a valid file and sidecar.

    Args:
        model: a HookedModel.
        hooks: hook names or globs; all rows aligned across hooks.
        contexts: token ids [n_contexts, context_len].
        out_dir: directory (created; must be empty or a harvest of the same arguments).
        shard_tokens: target rows per shard (rounded down to whole contexts, at least one context).
        dtype: storage dtype (bfloat16 default: half the bytes of float32, its range).
        skip_positions: leading positions of each context not stored (BOS).
        forward_batch_contexts: contexts per model forward.
        memory_budget_bytes: optional; the :func:`~mechscope.data.store.plan_memory` total must fit.
        progress: tqdm bar of tokens (rank 0 only).
        dist: a :class:`~mechscope.scale.dist.DistInfo` of a distributed job (None: one process).

    Returns:
        ShardedActivations over ``out_dir``.

    Raises:
        InputError: bad argument; ``out_dir`` holds a harvest with other settings (says which differ);
            NaN/inf activations (names hook, context, position; nothing written for them).
        MemoryBudgetError: the plan exceeds ``memory_budget_bytes`` (before any forward).
        OSError: ENOSPC, when the disk lacks room for the planned output (checked before any forward) or
            fills up while writing (the tmp file is removed; listed shards stay loadable).
        DistributedError: (distributed) rank 0 refused the directory, or a peer died (within the group's timeout).
    """
    d_in = site_dims(model, hooks)
    names = list(d_in)
    contexts = check_contexts(model, contexts, skip_positions)
    positive_int("shard_tokens", shard_tokens)
    positive_int("forward_batch_contexts", forward_batch_contexts)
    storage_dtype(dtype)
    n, ctx = contexts.shape
    rpc = ctx - skip_positions
    plan = plan_memory(model, names, context_len=ctx, forward_batch_contexts=forward_batch_contexts, dtype=dtype,
                       skip_positions=skip_positions, shard_tokens=shard_tokens, n_contexts=n)
    plan.check(memory_budget_bytes)
    cps = max(1, shard_tokens // rpc)
    identity = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "model": model.cfg.name,
        "model_fingerprint": model_fingerprint(model), "hooks": names, "d_in": d_in,
        "dtype": str(dtype).replace("torch.", ""), "n_contexts": n, "context_len": ctx,
        "contexts_sha256": contexts_fingerprint(contexts), "skip_positions": skip_positions,
        "shard_tokens": shard_tokens, "contexts_per_shard": cps, "forward_batch_contexts": forward_batch_contexts,
    }
    W, rank = (1, 0) if dist is None else (dist.world_size, dist.rank)
    out = Path(out_dir)
    n_shards = -(-n // cps)
    status, error, manifest = 0, None, None
    if rank == 0:
        try:
            manifest = _open_directory(out, identity, names, n, rpc, cps, d_in, dtype)
            status = 2 if manifest is None else 0  # 2: already complete
        except BaseException as e:  # noqa: BLE001 - re-raised below, after telling the other ranks
            status, error = 1, e
    status = _agree_status(dist, status)
    if status == 1:
        if error is not None:
            raise error
        from mechscope.scale.dist import DistributedError

        raise DistributedError(f"rank {rank}: rank 0 refused the harvest into {out} (its log says why); fix that "
                               "and relaunch.")
    if status == 2:
        return ShardedActivations(out)
    if rank != 0:
        manifest = _read_manifest(out)
    done = {e["contexts"][0] // cps: e for e in manifest["shards"]}
    done.update(_valid_sidecars(out, names, exclude=done))
    todo = [s for s in range(rank, n_shards, W) if s not in done]
    stop = stop_layer(names, model.cfg.n_layers)
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=n * rpc, initial=sum(e["n_tokens"] for e in done.values()), unit="tok", unit_scale=True,
                   desc="harvest" if W == 1 else f"harvest (rank 0 of {W})")
    try:
        for s in todo:
            k0, k1 = s * cps, min((s + 1) * cps, n)
            parts = []
            for f0 in range(k0, k1, forward_batch_contexts):
                toks = contexts[f0:min(f0 + forward_batch_contexts, k1)]
                rows = forward_rows(model, names, toks, f0, skip_positions, dtype, stop)
                rows.update(index_rows(toks, f0, skip_positions))
                parts.append(rows)
                if bar is not None:
                    bar.update(len(toks) * rpc)
            tensors = {k: torch.cat([p[k] for p in parts]).contiguous() for k in parts[0]}
            del parts
            # one metadata key: safetensors keeps metadata in a hash map whose order varies between
            # runs, and shards must be byte-for-byte reproducible
            data = st_save(tensors, metadata={"mechscope": json.dumps({"format": FORMAT, "shard": s})})
            del tensors
            file = f"shard_{s:05d}.safetensors"
            _atomic_write(out / file, data)
            entry = {"file": file, "contexts": [k0, k1], "n_tokens": (k1 - k0) * rpc, "n_bytes": len(data),
                     "sha256": hashlib.sha256(data).hexdigest()}
            del data
            _atomic_write(out / _sidecar(s), json.dumps(entry).encode())
            done[s] = entry
            if W == 1:  # one process keeps the manifest current after every shard
                _list_shards(out, manifest, done, complete=False)
    finally:
        if bar is not None:
            bar.close()
    _barrier(dist, "the end of the harvest")
    if rank == 0:
        done.update(_valid_sidecars(out, names, exclude=done))
        missing = [s for s in range(n_shards) if s not in done]
        if missing:
            raise InputError(f"shards {missing[:5]} of {out} were not written by their ranks; relaunch the same "
                             "command to finish them.")
        _list_shards(out, manifest, done, complete=True)
        for f in out.glob(".shard_*.json"):
            f.unlink()
    _barrier(dist, "the manifest")
    return ShardedActivations(out)


def _short(v) -> str:
    s = json.dumps(v) if not isinstance(v, str) else v
    return s if len(s) <= 24 else s[:12] + "..."


def _sidecar(s: int) -> str:
    return f".shard_{s:05d}.json"


def _valid_sidecars(out: Path, names: Sequence[str], exclude: dict) -> dict[int, dict]:
    """Shards finished by some rank (a sidecar whose shard file exists, fits its header and hashes to it)."""
    found = {}
    for f in sorted(out.glob(".shard_*.json")):
        try:
            s = int(f.name[len(".shard_"):-len(".json")])
            entry = json.loads(f.read_text())
        except (ValueError, json.JSONDecodeError, UnicodeDecodeError):
            continue
        if s in exclude or not isinstance(entry, dict) or set(entry) != {"file", "contexts", "n_tokens", "n_bytes",
                                                                          "sha256"}:
            continue
        file = out / entry["file"]
        if _shard_ok(file, entry, names) and hashlib.sha256(file.read_bytes()).hexdigest() == entry["sha256"]:
            found[s] = entry
    return found


def _list_shards(out: Path, manifest: dict, done: dict[int, dict], *, complete: bool) -> None:
    """Rewrite the manifest listing the finished shards in order (only whole, written shards are ever listed)."""
    manifest["shards"] = [done[s] for s in sorted(done)]
    manifest["n_tokens"] = sum(e["n_tokens"] for e in manifest["shards"])
    manifest["complete"] = complete
    _write_manifest(out, manifest)


def _agree_status(dist, status: int) -> int:
    """Rank 0's verdict on the directory (0 go, 1 refused, 2 already complete), shared with every rank."""
    if dist is None or dist.world_size == 1:
        return status
    import torch.distributed as tdist

    from mechscope.scale.dist import guarded

    t = torch.tensor([status], dtype=torch.int64, device=dist.device)
    guarded(dist, "the harvest's start-up broadcast", tdist.broadcast, t, 0)
    return int(t)


def _barrier(dist, what: str) -> None:
    if dist is not None and dist.world_size > 1:
        import torch.distributed as tdist

        from mechscope.scale.dist import guarded

        guarded(dist, f"the barrier before {what}", tdist.barrier)


def _open_directory(out: Path, identity: dict, names: list[str], n: int, rpc: int, cps: int, d_in: dict,
                    dtype: torch.dtype) -> dict | None:
    """Create or check ``out`` for a harvest of ``identity``: the manifest to continue (its listed shards checked),
    or None when the directory already holds the complete harvest.

    Raises:
        InputError: a harvest with other settings, or a non-empty directory without a manifest.
        OSError: ENOSPC, too little disk for the remaining shards.
    """
    out.mkdir(parents=True, exist_ok=True)
    for f in [*out.glob(".shard_*.tmp"), *out.glob("..shard_*.tmp"), *out.glob(f".{MANIFEST}.tmp")]:
        f.unlink()  # left by a kill mid-write
    n_shards = -(-n // cps)
    if (out / MANIFEST).is_file():
        manifest = _read_manifest(out)
        diff = [k for k in _IDENTITY if manifest[k] != identity[k]]
        if diff:
            lines = "; ".join(f"{k}: on disk {_short(manifest[k])}, now {_short(identity[k])}" for k in diff)
            raise InputError(f"{out} holds a harvest with other settings ({lines}). Harvest into a new out_dir, "
                             "or delete this one to start over.")
        keep = manifest["shards"]
        for i, entry in enumerate(keep):
            if not _shard_ok(out / entry["file"], entry, names):
                warnings.warn(f"{entry['file']} is missing or damaged; re-writing it and the shards after it.",
                              stacklevel=3)
                keep = keep[:i]
                break
        manifest["shards"] = keep
        if manifest["complete"] and len(keep) == n_shards:
            return None
    else:
        foreign = [p.name for p in out.iterdir() if not p.name.startswith(("shard_", ".shard_"))]
        if foreign:
            raise InputError(f"{out} is not empty ({foreign[:3]}) and holds no {MANIFEST}; harvest into an empty "
                             "or new directory.")
        manifest = dict(identity, shards=[])
    manifest.update(complete=False, n_tokens_total=n * rpc)
    manifest["n_tokens"] = sum(s["n_tokens"] for s in manifest["shards"])
    first = len(manifest["shards"])
    # disk: every remaining shard's bytes (values + index tensors + headers) must fit now
    need = max(0, n - first * cps) * rpc * (sum(d_in.values()) * dtype.itemsize + 16) + 4096 * (n_shards - first)
    free = shutil.disk_usage(out).free
    if need > free:
        raise OSError(errno.ENOSPC, f"harvest needs about {need:,} bytes of disk for the remaining "
                      f"{n_shards - first} shards and {out} has {free:,} bytes free; free space, harvest "
                      "fewer contexts or hooks, or use a dtype of fewer bytes.")
    _write_manifest(out, manifest)
    return manifest
