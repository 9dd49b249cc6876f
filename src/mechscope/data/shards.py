"""Activation store, on disk: :func:`harvest` writes sharded safetensors, :class:`ShardedActivations` reads them.

Directory layout::

    out_dir/
      manifest.json             format, model fingerprint, hooks, d_in, dtype, contexts sha256, shards
      shard_00000.safetensors   one tensor per hook [rows, d_in] + __context__ / __pos__ / __token__ [rows]
      shard_00001.safetensors   ...

A shard holds whole contexts (``max(1, shard_tokens // rows_per_context)`` of them), rows
context-major, all hooks aligned. Every file is written to a hidden tmp file, fsynced, then renamed
over its final name (and the directory fsynced), and the manifest is rewritten the same way after each
shard, so a kill at any moment leaves the shards the manifest lists intact. Re-running
:func:`harvest` with the same arguments resumes at the first shard not listed.

Reading: shards are memory-mapped with ``torch.from_file(shared=False)`` (a private, lazy mapping that
keeps no file descriptor open) and each tensor is a zero-copy view of its byte range, reinterpreted
with ``Tensor.view(dtype)`` (bfloat16 included, which numpy lacks). A random batch is one
``index_select`` per shard straight from the page cache. safetensors' own ``safe_open`` was not used for
reading: ``get_tensor`` copies a whole tensor per call and ``get_slice`` takes contiguous slices only.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import struct
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from jaxtyping import Int
from safetensors.torch import save as st_save
from torch import Tensor

from mechscope.core.errors import InputError
from mechscope.data.store import (
    INDEX_KEYS,
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

FORMAT = "mechscope.activations"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "I64": torch.int64,
              "I32": torch.int32}
# manifest keys that must match for a resume, and the keys a manifest holds in all
_IDENTITY = ("format", "format_version", "model", "model_fingerprint", "hooks", "d_in", "dtype", "n_contexts",
             "context_len", "contexts_sha256", "skip_positions", "shard_tokens", "contexts_per_shard",
             "forward_batch_contexts")
_KEYS = set(_IDENTITY) | {"n_tokens", "n_tokens_total", "complete", "shards"}
_SHARD_KEYS = {"file", "contexts", "n_tokens", "n_bytes", "sha256"}


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


# -- reading and checking files ------------------------------------------------------------------------
def _fix(path: Path) -> str:
    return (f"Re-run harvest(...) with the same arguments into {path}: it re-writes damaged or missing "
            "shards and resumes.")


def _read_manifest(path: Path) -> dict:
    """Load and validate ``manifest.json``.

    Raises:
        InputError: missing, not JSON, another format or version, unknown or missing keys.
    """
    f = path / MANIFEST
    if not f.is_file():
        raise InputError(f"{path} has no {MANIFEST}: not a harvested activation directory (or the harvest "
                         "was killed before it started). Run mechscope.data.harvest(...) into it.")
    try:
        m = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{f} is not valid JSON ({e}); delete the directory and harvest again.") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise InputError(f"{f} is not a {FORMAT} manifest.")
    if m.get("format_version") != FORMAT_VERSION:
        raise InputError(f"{f} has format_version {m.get('format_version')!r}; this mechscope reads "
                         f"{FORMAT_VERSION}. Harvest again with this version.")
    if set(m) != _KEYS:
        raise InputError(f"{f}: unknown keys {sorted(set(m) - _KEYS)}, missing keys {sorted(_KEYS - set(m))}.")
    for s in m["shards"]:
        if not isinstance(s, dict) or set(s) != _SHARD_KEYS:
            raise InputError(f"{f}: a shard entry {s!r} does not have the keys {sorted(_SHARD_KEYS)}.")
    return m


def _parse_header(file: Path, n_bytes: int) -> tuple[dict, int]:
    """(tensor entries, start of the data region) of a safetensors file; checks offsets fit the file.

    Raises:
        InputError: missing or truncated file, corrupted header; names the file and the fix.
    """
    if not file.is_file():
        raise InputError(f"shard {file} is missing. {_fix(file.parent)}")
    size = file.stat().st_size
    if size != n_bytes:
        raise InputError(f"shard {file} has {size:,} bytes, the manifest says {n_bytes:,} (truncated or "
                         f"overwritten). {_fix(file.parent)}")
    with open(file, "rb") as f:
        head = f.read(8)
        try:
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise ValueError(f"header length {n} exceeds the file")
            header = json.loads(f.read(n))
            start = 8 + n
            for k, v in header.items():
                if k == "__metadata__":
                    continue
                lo, hi = v["data_offsets"]
                count = 1
                for d in v["shape"]:
                    count *= d
                if v["dtype"] not in _ST_DTYPES or hi - lo != count * _ST_DTYPES[v["dtype"]].itemsize \
                        or start + hi > size:
                    raise ValueError(f"entry {k} does not fit the file")
        except (struct.error, ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
            raise InputError(f"shard {file} has a corrupted safetensors header ({e}). {_fix(file.parent)}") from None
    return header, start


def _shard_ok(file: Path, entry: dict, keys: Sequence[str]) -> bool:
    try:
        header, _ = _parse_header(file, entry["n_bytes"])
    except InputError:
        return False
    return set(keys) <= set(header)


# -- harvest ---------------------------------------------------------------------------------------------
def harvest(model, hooks: str | Sequence[str], contexts: Int[Tensor, "n_contexts context_len"],
            out_dir: str | os.PathLike, *, shard_tokens: int = 2**18, dtype: torch.dtype = torch.bfloat16,
            skip_positions: int = 1, forward_batch_contexts: int = 8, memory_budget_bytes: int | None = None,
            progress: bool = True) -> "ShardedActivations":
    """Run the model once over ``contexts`` and write the activations at ``hooks`` to sharded safetensors.

    Resumable: called again with the same arguments on the same ``out_dir`` after a kill, it checks the
    manifest matches and continues at the first shard not written (already complete: returns at once).
    Shards hold whole contexts and forward batches never straddle shards, so a resumed harvest writes
    the same bytes as an uninterrupted one.

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
        progress: tqdm bar of tokens.

    Returns:
        ShardedActivations over ``out_dir``.

    Raises:
        InputError: bad argument; ``out_dir`` holds a harvest with other settings (says which differ);
            NaN/inf activations (names hook, context, position; nothing written for them).
        MemoryBudgetError: the plan exceeds ``memory_budget_bytes`` (before any forward).
        OSError: ENOSPC, when the disk lacks room for the planned output (checked before any forward) or
            fills up while writing (the tmp file is removed; listed shards stay loadable).
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
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for f in [*out.glob(".shard_*.safetensors.tmp"), *out.glob(f".{MANIFEST}.tmp")]:  # left by a kill mid-write
        f.unlink()
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
                              stacklevel=2)
                keep = keep[:i]
                break
        manifest["shards"] = keep
        if manifest["complete"] and len(keep) == -(-n // cps):
            return ShardedActivations(out)
    else:
        foreign = [p.name for p in out.iterdir() if not p.name.startswith("shard_")]
        if foreign:
            raise InputError(f"{out} is not empty ({foreign[:3]}) and holds no {MANIFEST}; harvest into an empty "
                             "or new directory.")
        manifest = dict(identity, shards=[])
    manifest.update(complete=False, n_tokens_total=n * rpc)
    manifest["n_tokens"] = sum(s["n_tokens"] for s in manifest["shards"])
    first_shard = len(manifest["shards"])
    n_shards = -(-n // cps)
    # disk: every remaining shard's bytes (values + index tensors + headers) must fit now
    need = (n - first_shard * cps) * rpc * (sum(d_in.values()) * dtype.itemsize + 16) + 4096 * (n_shards - first_shard)
    free = shutil.disk_usage(out).free
    if need > free:
        raise OSError(errno.ENOSPC, f"harvest needs about {need:,} bytes of disk for the remaining "
                      f"{n_shards - first_shard} shards and {out} has {free:,} bytes free; free space, harvest "
                      "fewer contexts or hooks, or use a dtype of fewer bytes.")
    _write_manifest(out, manifest)
    stop = stop_layer(names, model.cfg.n_layers)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n * rpc, initial=manifest["n_tokens"], unit="tok", unit_scale=True, desc="harvest")
    try:
        for s in range(first_shard, n_shards):
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
            manifest["shards"].append({"file": file, "contexts": [k0, k1], "n_tokens": (k1 - k0) * rpc,
                                       "n_bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
            manifest["n_tokens"] += (k1 - k0) * rpc
            del data
            _write_manifest(out, manifest)
        manifest["complete"] = True
        _write_manifest(out, manifest)
    finally:
        if bar is not None:
            bar.close()
    return ShardedActivations(out)


def _short(v) -> str:
    s = json.dumps(v) if not isinstance(v, str) else v
    return s if len(s) <= 24 else s[:12] + "..."


# -- reading ---------------------------------------------------------------------------------------------
def _epoch_seed(seed: int, epoch: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed},{epoch}".encode()).digest()[:8], "little") & (2**63 - 1)


class ShardedActivations:
    """A harvested activation directory, memory-mapped (see the module docstring for why this way).

    Args:
        path: the ``out_dir`` of :func:`harvest`.
        allow_incomplete: open a harvest that has not finished (its listed shards only).
        verify_checksums: also check each shard's sha256 against the manifest (reads every byte).

    Attributes:
        hooks: hook names, in forward order.
        d_in: hook -> feature size.
        n_tokens: rows (tokens) available.
        dtype: storage dtype.
        manifest: the parsed manifest.json.

    Raises:
        InputError: no or bad manifest; incomplete harvest (unless allowed); a missing or truncated
            shard, a corrupted header or checksum (names the file and says to re-run harvest, which
            resumes and re-writes damaged shards).
    """

    def __init__(self, path: str | os.PathLike, *, allow_incomplete: bool = False, verify_checksums: bool = False):
        self.path = Path(path)
        m = self.manifest = _read_manifest(self.path)
        if not m["complete"] and not allow_incomplete:
            raise InputError(f"{self.path} is an unfinished harvest ({m['n_tokens']:,} of {m['n_tokens_total']:,} "
                             "tokens); re-run harvest(...) with the same arguments to finish it, or open it with "
                             "allow_incomplete=True.")
        self.hooks: list[str] = list(m["hooks"])
        self.d_in: dict[str, int] = dict(m["d_in"])
        self.dtype: torch.dtype = _DTYPES[m["dtype"]]
        self._shards: list[dict[str, Tensor]] = []
        for entry in m["shards"]:
            file = self.path / entry["file"]
            header, start = _parse_header(file, entry["n_bytes"])
            if verify_checksums:
                with open(file, "rb") as f:
                    if hashlib.file_digest(f, "sha256").hexdigest() != entry["sha256"]:
                        raise InputError(f"shard {file} does not match its sha256 in the manifest (corrupted). "
                                         f"Delete that file, then: {_fix(self.path)}")
            raw = torch.from_file(str(file), shared=False, size=entry["n_bytes"], dtype=torch.uint8)
            views = {}
            for key in self.hooks + list(INDEX_KEYS):
                v = header.get(key)
                want = (entry["n_tokens"], self.d_in[key]) if key in self.d_in else (entry["n_tokens"],)
                if v is None or tuple(v["shape"]) != want:
                    raise InputError(f"shard {file}: tensor {key!r} is {'missing' if v is None else v['shape']}, "
                                     f"expected shape {list(want)}. {_fix(self.path)}")
                lo, hi = v["data_offsets"]
                views[key] = raw[start + lo:start + hi].view(_ST_DTYPES[v["dtype"]]).view(want)
            self._shards.append(views)
        self.n_tokens: int = sum(e["n_tokens"] for e in m["shards"])
        sizes = torch.tensor([e["n_tokens"] for e in m["shards"]], dtype=torch.int64)
        self._starts = torch.cumsum(sizes, 0) - sizes

    def __repr__(self) -> str:
        return (f"ShardedActivations({str(self.path)!r}, hooks={self.hooks}, n_tokens={self.n_tokens:,}, "
                f"dtype={self.manifest['dtype']}, shards={len(self._shards)})")

    def __len__(self) -> int:
        return self.n_tokens

    def _check_key(self, key: str) -> None:
        if key not in self.d_in and key not in INDEX_KEYS:
            raise InputError(f"{key!r} is not stored here; stored hooks: {self.hooks} (and {list(INDEX_KEYS)}).")

    def tensor(self, key: str, dtype: torch.dtype | None = None) -> Tensor:
        """All rows of a hook [n_tokens, d_in] (or an index key [n_tokens]), in file order, as a new tensor.

        Args:
            key: a hook name, or ``__context__`` / ``__pos__`` / ``__token__``.
            dtype: output dtype (default: as stored).

        Raises:
            InputError: a key that is not stored.
        """
        self._check_key(key)
        parts = [s[key] for s in self._shards]
        out = torch.cat(parts) if parts else torch.empty(0)
        return out.to(dtype) if dtype is not None else out

    def gather(self, rows: Int[Tensor, "n"], keys: Sequence[str], dtype: torch.dtype | None = None) -> dict[str, Tensor]:
        """Rows by global index (file order), for each key, in the order of ``rows``.

        Args:
            rows: int64 indices into [0, n_tokens); sorted indices are fastest (no reordering).
            keys: hook names and/or index keys.
            dtype: output dtype of hook values (index keys keep their int dtype).

        Raises:
            InputError: a key that is not stored, or an index out of range.
        """
        if len(rows) and (int(rows.min()) < 0 or int(rows.max()) >= self.n_tokens):
            raise InputError(f"row indices must lie in [0, {self.n_tokens}), got {int(rows.min())}..{int(rows.max())}.")
        is_sorted = bool((rows[1:] >= rows[:-1]).all())
        order = None if is_sorted else torch.argsort(rows)
        srt = rows if order is None else rows[order]
        shard = torch.searchsorted(self._starts, srt, right=True) - 1
        bounds = torch.searchsorted(shard, torch.arange(len(self._shards) + 1)).tolist()
        out = {}
        for k in keys:
            self._check_key(k)
            first = self._shards[0][k]
            buf = first.new_empty((len(rows), *first.shape[1:]))
            for s in range(len(self._shards)):
                lo, hi = bounds[s], bounds[s + 1]  # rows of one shard are contiguous once sorted
                if hi > lo:
                    torch.index_select(self._shards[s][k], 0, srt[lo:hi] - self._starts[s], out=buf[lo:hi])
            if order is not None:
                unsorted = torch.empty_like(buf)
                unsorted[order] = buf
                buf = unsorted
            out[k] = buf.to(dtype) if dtype is not None and k in self.d_in else buf
        return out

    def training_batches(self, batch_tokens: int, seed: int, start_step: int) -> Iterator[dict[str, Tensor]]:
        """The trainer's entry point (shared with ``ActivationStream``): :meth:`batches` with these settings."""
        return self.batches(batch_tokens, seed=seed, start_step=start_step)

    def batches(self, batch_tokens: int, *, seed: int = 0, start_step: int = 0, hooks: Sequence[str] | None = None,
                dtype: torch.dtype = torch.float32, drop_last: bool = True,
                include_index: bool = False) -> Iterator[dict[str, Tensor]]:
        """Endless shuffled batches ``{hook: [batch_tokens, d_in]}``, epoch after epoch.

        Epoch e is a fresh permutation of all rows from a torch.Generator seeded by (seed, e); batch i
        of the epoch is slice i of it, its rows returned in file order (sorted indices read faster; the
        choice of rows is what is random). Batch t is a pure function of (seed, t), so ``batches(..., start_step=t)`` yields exactly what an
        iteration from 0 yields from step t on, at no extra cost (one permutation: 8 bytes per row).

        Args:
            batch_tokens: rows per batch.
            seed: shuffle seed.
            start_step: index of the first batch (resume a training run).
            hooks: subset of hooks to load (default all).
            dtype: output dtype of the activations (default float32).
            drop_last: drop each epoch's last partial batch (default), else yield it short.
            include_index: add ``__context__``, ``__pos__``, ``__token__`` [batch_tokens] to each batch.

        Raises:
            InputError: bad arguments; fewer rows than one batch with drop_last.
        """
        positive_int("batch_tokens", batch_tokens)
        if not isinstance(start_step, int) or isinstance(start_step, bool) or start_step < 0:
            raise InputError(f"start_step must be an int >= 0, got {start_step!r}.")
        keys = list(self.hooks if hooks is None else hooks)
        for k in keys:
            if k not in self.d_in:
                raise InputError(f"hooks: {k!r} is not stored here; stored: {self.hooks}.")
        if include_index:
            keys += list(INDEX_KEYS)
        N = self.n_tokens
        per_epoch = N // batch_tokens if drop_last else -(-N // batch_tokens)
        if per_epoch == 0:
            raise InputError(f"{N} rows make no batch of {batch_tokens}; lower batch_tokens or pass drop_last=False.")
        return self._iterate(batch_tokens, seed, start_step, keys, dtype, per_epoch)

    def _iterate(self, B, seed, start_step, keys, dtype, per_epoch) -> Iterator[dict[str, Tensor]]:
        epoch, k = divmod(start_step, per_epoch)
        while True:
            g = torch.Generator().manual_seed(_epoch_seed(seed, epoch))
            perm = torch.randperm(self.n_tokens, generator=g)
            for i in range(k, per_epoch):
                # rows of a batch come in file order (sorted: faster reads); which rows is random
                yield self.gather(perm[i * B:(i + 1) * B].sort().values, keys, dtype)
            epoch, k = epoch + 1, 0
