"""Activation store, on disk: :func:`~mechscope.data.harvesting.harvest` writes sharded safetensors,
:class:`ShardedActivations` reads them (this module: the format, its checks and the reader).

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

import hashlib
import json
import os
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from jaxtyping import Int
from torch import Tensor

from mechscope.core.errors import InputError
from mechscope.data.store import (
    INDEX_KEYS,
    positive_int,
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

    def training_batches(self, batch_tokens: int, seed: int, start_step: int,
                         part: slice | None = None) -> Iterator[dict[str, Tensor]]:
        """The trainer's entry point (shared with ``ActivationStream``): :meth:`batches` with these settings;
        ``part`` keeps only those rows of each batch (a data-parallel rank's), and reads only them."""
        return self.batches(batch_tokens, seed=seed, start_step=start_step, part=part)

    def batches(self, batch_tokens: int, *, seed: int = 0, start_step: int = 0, hooks: Sequence[str] | None = None,
                dtype: torch.dtype = torch.float32, drop_last: bool = True,
                include_index: bool = False, part: slice | None = None) -> Iterator[dict[str, Tensor]]:
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
            part: only these rows of each batch (in the batch's file order), e.g. a data-parallel rank's
                ``slice(B*r//W, B*(r+1)//W)``; the rows outside it are not read.

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
        return self._iterate(batch_tokens, seed, start_step, keys, dtype, per_epoch, part or slice(None))

    def _iterate(self, B, seed, start_step, keys, dtype, per_epoch, part) -> Iterator[dict[str, Tensor]]:
        epoch, k = divmod(start_step, per_epoch)
        while True:
            g = torch.Generator().manual_seed(_epoch_seed(seed, epoch))
            perm = torch.randperm(self.n_tokens, generator=g)
            for i in range(k, per_epoch):
                # rows of a batch come in file order (sorted: faster reads); which rows is random
                yield self.gather(perm[i * B:(i + 1) * B].sort().values[part], keys, dtype)
            epoch, k = epoch + 1, 0
