"""Activation store, in memory: stream hook activations over token contexts through a shuffle buffer.

:class:`ActivationStream` runs the model over ``contexts`` a few at a time, keeps the rows (one row
per token, all hooks aligned) in a shuffle buffer, and yields training batches ``{hook: [batch_tokens,
d_in]}``; :func:`plan_memory` says what a stream or a harvest (:mod:`mechscope.data.shards`) needs
before any forward pass runs.

Rows and ids: context ``k`` (an index into ``contexts``) gives rows for positions ``skip_positions ..
context_len - 1`` in order, so row ``r`` of epoch ``e`` has the global id
``(e * n_contexts + k) * rows_per_context + (pos - skip_positions)``. A *forward batch* is a fixed
group of ``forward_batch_contexts`` consecutive contexts (the last may be smaller); every forward,
first run or replay, uses exactly these groups, so the same rows get bit-identical values.

Shuffle buffer (the mixing SAELens uses): fill the buffer to ``buffer_tokens`` rows, permute it,
emit the first half as batches, keep the second half, refill, repeat. Rows from neighbouring
positions of one context are thereby spread over about ``buffer_tokens / 2`` rows of output.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

import torch
from jaxtyping import Int
from torch import Tensor

from mechscope.core.errors import InputError, MemoryBudgetError
from mechscope.core.names import axes as site_axes
from mechscope.core.names import parse

#: Extra keys of a batch with ``include_positions=True`` (and tensors of every harvested shard):
#: index of the context in ``contexts``, position in the context, token id at that position.
INDEX_KEYS: tuple[str, ...] = ("__context__", "__pos__", "__token__")
_INDEX_BYTES_PER_ROW = 8 + 4 + 4  # int64 context, int32 pos, int32 token (as harvest stores them)
_MIB = 2**20


# -- sites -------------------------------------------------------------------------------------------
def site_dims(model, hooks: str | Sequence[str]) -> dict[str, int]:
    """Resolve hook names and give each its feature size ``d_in`` (all axes after ``pos`` flattened).

    ``blocks.{L}.attn.hook_z`` [batch pos n_heads d_head] gives ``d_in = n_heads * d_head``, as
    dictionaries over head outputs expect.

    Raises:
        HookNameError / SiteUnavailableError: a bad or unavailable name (from ``model.resolve``).
        InputError: a site without one row per token (attention scores and patterns).
    """
    names = model.resolve(hooks)
    c = model.cfg
    sizes = dict(d_model=c.d_model, d_vocab=c.d_vocab, n_heads=c.n_heads, n_kv_heads=c.n_kv_heads,
                 d_head=c.d_head, d_mlp=c.d_mlp)
    out = {}
    for n in names:
        ax = site_axes(n)
        if ax[:2] not in (("batch", "pos"), ("batch", "kv_pos")):
            raise InputError(f"{n} has axes [{' '.join(ax)}], not one row per token; store per-token sites "
                             "such as hook_resid_post, hook_mlp_out, mlp.hook_post or attn.hook_z.")
        out[n] = math.prod(sizes[a] for a in ax[2:])
    return out


def stop_layer(hooks: Sequence[str], n_layers: int) -> int | None:
    """The ``stop_at_layer`` that runs just far enough for ``hooks`` (None: the final norm is needed).

    ``run(stop_at_layer=L)`` runs blocks 0..L-1, so every site of block L-1 fires and no logits are
    computed; ``ln_final.hook_normalized`` needs the full forward (then logits of one position only).
    """
    if "ln_final.hook_normalized" in hooks:
        return None
    return min(n_layers, max((parse(h)[1] if parse(h)[1] is not None else -1) for h in hooks) + 1)


def model_fingerprint(model) -> str:
    """sha256 of the model's config and a sample of every parameter (first and last 16 values).

    Cheap (microseconds of hashing, no pass over all weights) and changes with the weights, the dtype
    and the attention implementation, all of which change activations.
    """
    h = hashlib.sha256(json.dumps(asdict(model.cfg), sort_keys=True).encode())
    for name, p in sorted(model.hf.named_parameters()):
        flat = p.detach().reshape(-1)
        sample = torch.cat([flat[:16], flat[-16:]]).to("cpu", torch.float32)
        h.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()


def contexts_fingerprint(contexts: Tensor) -> str:
    """sha256 of a token tensor's shape and int64 values."""
    t = contexts.detach().to("cpu", torch.int64).contiguous()
    h = hashlib.sha256(f"{tuple(t.shape)}".encode())
    h.update(t.numpy().tobytes())
    return h.hexdigest()


def check_contexts(model, contexts, skip_positions: int) -> Tensor:
    """Validate a token tensor [n_contexts, context_len]; returns it as int64 on the CPU.

    Raises:
        InputError: not a 2-D integer tensor, empty, ids outside the vocabulary, too long for the
            model, or no position left after ``skip_positions``.
    """
    if not isinstance(contexts, Tensor) or contexts.dim() != 2 or contexts.dtype not in (torch.int64, torch.int32):
        got = f"{type(contexts).__name__} {getattr(contexts, 'dtype', '')} {tuple(getattr(contexts, 'shape', ()))}"
        raise InputError(f"contexts must be an integer tensor [n_contexts, context_len] (from the corpus packer); got {got}.")
    n, ctx = contexts.shape
    if n == 0:
        raise InputError("contexts is empty; pass at least one context.")
    if not isinstance(skip_positions, int) or isinstance(skip_positions, bool) or not 0 <= skip_positions < ctx:
        raise InputError(f"skip_positions must be an int in [0, context_len={ctx}), got {skip_positions!r}.")
    lo, hi = int(contexts.min()), int(contexts.max())
    if lo < 0 or hi >= model.cfg.d_vocab:
        raise InputError(f"contexts hold token ids {lo}..{hi} outside the vocabulary [0, {model.cfg.d_vocab}); "
                         "tokenize with this model's tokenizer.")
    if ctx > model.cfg.n_ctx:
        raise InputError(f"context_len {ctx} exceeds the model's context {model.cfg.n_ctx}; pack shorter contexts.")
    return contexts.detach().to("cpu", torch.int64)


def positive_int(name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InputError(f"{name} must be a positive int, got {value!r}.")
    return value


def storage_dtype(dtype) -> torch.dtype:
    ok = (torch.float32, torch.bfloat16, torch.float16)
    if dtype not in ok:
        raise InputError(f"dtype must be one of {[str(d) for d in ok]} (storage dtype of activations), got {dtype!r}.")
    return dtype


# -- one forward batch ---------------------------------------------------------------------------------
def forward_rows(model, hooks: Sequence[str], contexts: Tensor, first: int, skip_positions: int,
                 dtype: torch.dtype, stop: int | None) -> dict[str, Tensor]:
    """Rows of every hook for ``contexts`` [b, ctx] (whose first row is context index ``first``).

    Returns ``{hook: [b * (ctx - skip_positions), d_in]}`` in ``dtype`` on the CPU, context-major.

    Raises:
        InputError: a NaN/inf value; names the hook, context index and position of the first bad row
            and the likely fix (a non-finite value is never stored).
    """
    b, ctx = contexts.shape
    res = model.run(contexts, cache=list(hooks), stop_at_layer=stop, cache_device="cpu",
                    logits_to_keep=1 if stop is None else 0)
    out = {}
    for h in hooks:
        raw = res.cache[h]
        raw = raw.reshape(b, ctx, -1)[:, skip_positions:]
        x = raw.to(dtype).reshape(b * (ctx - skip_positions), -1)
        if not bool(torch.isfinite(x).all()):
            _raise_non_finite(model, h, x, raw, first, ctx - skip_positions, skip_positions, dtype)
        out[h] = x
    return out


def _raise_non_finite(model, hook, x, raw, first, rows_per_context, skip, dtype):
    bad = int((~torch.isfinite(x)).any(dim=1).nonzero()[0, 0])
    k, pos = first + bad // rows_per_context, bad % rows_per_context + skip
    finite_in_model = bool(torch.isfinite(raw).all())
    if finite_in_model:
        why = (f"the model's values are finite but overflow the storage dtype {dtype}; store as "
               "torch.bfloat16 or torch.float32.")
    else:
        why = (f"the model itself produced it (model dtype {model.cfg.dtype}); float16 overflows easily: load "
               "the model with dtype='bfloat16' or 'float32', or drop this context.")
    raise InputError(f"non-finite activation (NaN/inf) at {hook}, context {k}, position {pos}: {why} "
                     "Nothing was stored for it.")


def index_rows(contexts: Tensor, first: int, skip_positions: int) -> dict[str, Tensor]:
    """``__context__`` (int64), ``__pos__`` and ``__token__`` (int32) of the rows of ``contexts``."""
    b, ctx = contexts.shape
    r = ctx - skip_positions
    return {
        "__context__": torch.arange(first, first + b, dtype=torch.int64).repeat_interleave(r),
        "__pos__": torch.arange(skip_positions, ctx, dtype=torch.int32).repeat(b),
        "__token__": contexts[:, skip_positions:].reshape(-1).to(torch.int32),
    }


# -- memory plan ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MemoryTerm:
    """One term of a :class:`MemoryPlan`.

    Attributes:
        name: short name ("forward", "cache", "buffer", "shuffle copy", "staging").
        n_bytes: bytes of host (or device, for the forward) memory the term needs at its peak.
        what: what the memory holds.
        lower: which argument lowers it.
    """

    name: str
    n_bytes: int
    what: str
    lower: str

    def __post_init__(self):
        if self.n_bytes < 0:
            raise InputError(f"MemoryTerm.n_bytes must be >= 0, got {self.n_bytes}.")


@dataclass(frozen=True)
class MemoryPlan:
    """What an :class:`ActivationStream` or :func:`~mechscope.data.shards.harvest` needs.

    Attributes:
        terms: the memory terms; they can all be live at once, so the peak is their sum.
        disk_bytes: bytes a harvest writes to disk (0 for a stream); not part of ``total_bytes``.
    """

    terms: tuple[MemoryTerm, ...]
    disk_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        """Sum of the memory terms, bytes (model weights not included: they are already loaded)."""
        return sum(t.n_bytes for t in self.terms)

    def describe(self) -> str:
        lines = [f"  {t.name}: {t.n_bytes / _MIB:,.1f} MiB ({t.what}; lower {t.lower})" for t in self.terms]
        lines.append(f"  total: {self.total_bytes / _MIB:,.1f} MiB")
        if self.disk_bytes:
            lines.append(f"  disk output: {self.disk_bytes / _MIB:,.1f} MiB")
        return "\n".join(lines)

    def check(self, memory_budget_bytes: int | None) -> None:
        """Raise MemoryBudgetError if the memory terms exceed the budget (None: no budget).

        Raises:
            MemoryBudgetError: listing each term in MiB and what to lower.
        """
        if memory_budget_bytes is not None and self.total_bytes > memory_budget_bytes:
            biggest = max(self.terms, key=lambda t: t.n_bytes)
            raise MemoryBudgetError(
                f"the plan needs {self.total_bytes / _MIB:,.1f} MiB but memory_budget_bytes allows "
                f"{memory_budget_bytes / _MIB:,.1f} MiB:\n{self.describe()}\n"
                f"The largest term is {biggest.name!r}: lower {biggest.lower}, or raise memory_budget_bytes."
            )


def plan_memory(model, hooks: str | Sequence[str], *, context_len: int, forward_batch_contexts: int,
                dtype: torch.dtype = torch.float32, skip_positions: int = 1, buffer_tokens: int | None = None,
                shard_tokens: int | None = None, n_contexts: int | None = None) -> MemoryPlan:
    """Bytes a stream (``buffer_tokens`` given) or a harvest (``shard_tokens`` given) needs.

    Terms (B = forward_batch_contexts, T = context_len, D = sum of d_in over hooks, s = bytes per
    element of ``dtype``, m = bytes per element of the model's dtype):

    - forward: B*T*(6*d_model + 3*d_mlp)*m (residual stream, norm, attention and MLP intermediates of
      one block) + B*n_heads*T*T*m (one layer's attention scores) + logits of one position. An
      estimate: the exact peak depends on the attention kernel.
    - cache: B*T*D*(m + s): the hooked values of one forward, before and after the cast to ``dtype``.
    - buffer (stream): (buffer_tokens + B*T) * (D*s + 8): the shuffle buffer, which can hold one
      forward batch beyond ``buffer_tokens`` after a refill, plus int64 row ids.
    - shuffle copy (stream): the same again, the permuted copy made at each shuffle.
    - staging (harvest): 3 * rows_per_shard * (D*s + 16): one shard's rows with their index tensors,
      the bytes safetensors copies them into, and the serialized file (a shard holds at most the
      ``n_contexts`` given).
    - disk_bytes (harvest, when ``n_contexts`` is given): every row's values and index tensors.

    Raises:
        InputError: a bad argument (named).
    """
    d_in = site_dims(model, hooks)
    positive_int("context_len", context_len)
    positive_int("forward_batch_contexts", forward_batch_contexts)
    s = storage_dtype(dtype).itemsize
    m = model.dtype.itemsize
    c = model.cfg
    D = sum(d_in.values())
    B, T = forward_batch_contexts, context_len
    rows_per_context = T - skip_positions
    stop = stop_layer(list(d_in), c.n_layers)
    terms = [
        MemoryTerm("forward", B * T * (6 * c.d_model + 3 * c.d_mlp) * m + B * c.n_heads * T * T * m
                   + (B * c.d_vocab * 4 if stop is None else 0),
                   f"model forward of {B} x {T} tokens (estimate)", "forward_batch_contexts"),
        MemoryTerm("cache", B * T * D * (m + s), "hooked values of one forward, before and after the cast",
                   "forward_batch_contexts"),
    ]
    disk = 0
    if buffer_tokens is not None:
        buf = (positive_int("buffer_tokens", buffer_tokens) + B * rows_per_context) * (D * s + 8)
        terms += [MemoryTerm("buffer", buf, f"shuffle buffer of {buffer_tokens} rows of {D} values",
                             "buffer_tokens or dtype"),
                  MemoryTerm("shuffle copy", buf, "permuted copy of the buffer at each shuffle",
                             "buffer_tokens or dtype")]
    if shard_tokens is not None:
        per_shard = max(1, positive_int("shard_tokens", shard_tokens) // rows_per_context)
        if n_contexts is not None:
            per_shard = min(per_shard, max(1, n_contexts))
        per_shard *= rows_per_context
        terms.append(MemoryTerm("staging", 3 * per_shard * (D * s + _INDEX_BYTES_PER_ROW),
                                "one shard's rows, safetensors' copy of them and the serialized bytes",
                                "shard_tokens"))
        if n_contexts is not None:
            disk = n_contexts * rows_per_context * (D * s + _INDEX_BYTES_PER_ROW)
    return MemoryPlan(tuple(terms), disk)


# -- the stream ----------------------------------------------------------------------------------------
class ActivationStream:
    """Shuffled batches of activations at one or more hooks, computed on the fly.

    Args:
        model: a HookedModel.
        hooks: hook names (or globs); every batch holds all of them with rows aligned: row i of each
            hook is the same token (input and output of a transcoder, say).
        contexts: token ids [n_contexts, context_len], int64.
        batch_tokens: rows per yielded batch.
        buffer_tokens: shuffle-buffer size in rows; at least 2 * batch_tokens.
        forward_batch_contexts: contexts per model forward.
        skip_positions: leading positions of each context not used (default 1: the BOS position,
            whose residual norm is many times that of other tokens).
        dtype: storage dtype of the buffer and the batches (float32, bfloat16 or float16).
        seed: seed of the shuffles; the stream is a pure function of (model, contexts, arguments).
        epochs: passes over ``contexts`` (same order each pass, re-mixed by the buffer); None cycles
            forever. When the contexts are used up, the buffer is emptied in whole batches and
            iteration stops (a last partial batch is dropped).
        memory_budget_bytes: if given, the :func:`plan_memory` total must fit, else MemoryBudgetError
            is raised here, before any forward pass.
        progress: show a tqdm bar of tokens processed by the model.
        include_positions: add ``__context__`` (int64), ``__pos__`` and ``__token__`` (int32) [batch_tokens]
            to each batch: which context, position and token each row is.

    Yields:
        ``{hook: Float[Tensor, "batch_tokens d_in"]}`` in ``dtype`` on the CPU (plus the index keys).

    Raises:
        InputError: a bad argument (the message names it); NaN/inf activations while streaming
            (names hook, context and position).
        MemoryBudgetError: the plan exceeds ``memory_budget_bytes``.
        HookNameError / SiteUnavailableError: bad hook names.

    References:
        Bloom et al., SAELens (2024): the mixing buffer, refilled when half empty.
    """

    def __init__(self, model, hooks: str | Sequence[str], contexts: Int[Tensor, "n_contexts context_len"], *,
                 batch_tokens: int = 4096, buffer_tokens: int = 2**16, forward_batch_contexts: int = 8,
                 skip_positions: int = 1, dtype: torch.dtype = torch.float32, seed: int = 0,
                 epochs: int | None = 1, memory_budget_bytes: int | None = None, progress: bool = False,
                 include_positions: bool = False):
        self.model = model
        self.d_in: dict[str, int] = site_dims(model, hooks)
        self.hooks: list[str] = list(self.d_in)
        self.contexts = check_contexts(model, contexts, skip_positions)
        self.batch_tokens = positive_int("batch_tokens", batch_tokens)
        self.buffer_tokens = positive_int("buffer_tokens", buffer_tokens)
        if buffer_tokens < 2 * batch_tokens:
            raise InputError(f"buffer_tokens ({buffer_tokens}) must be at least 2 * batch_tokens "
                             f"({2 * batch_tokens}) for the buffer to mix rows; raise buffer_tokens.")
        self.forward_batch_contexts = positive_int("forward_batch_contexts", forward_batch_contexts)
        self.skip_positions = skip_positions
        self.dtype = storage_dtype(dtype)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise InputError(f"seed must be an int, got {seed!r}.")
        self.seed = seed
        if epochs is not None:
            positive_int("epochs", epochs)
        self.epochs = epochs
        self.progress = bool(progress)
        self.include_positions = bool(include_positions)
        n, ctx = self.contexts.shape
        self.rows_per_context = ctx - skip_positions
        self.n_chunks_per_epoch = -(-n // self.forward_batch_contexts)
        self._stop = stop_layer(self.hooks, model.cfg.n_layers)
        self.plan = plan_memory(model, self.hooks, context_len=ctx, forward_batch_contexts=forward_batch_contexts,
                                dtype=dtype, skip_positions=skip_positions, buffer_tokens=buffer_tokens)
        self.plan.check(memory_budget_bytes)
        self.n_forward_contexts = 0  # contexts run through the model so far (replays included)

    @property
    def n_tokens_total(self) -> int:
        """Rows one pass over the contexts gives: n_contexts * (context_len - skip_positions)."""
        return self.contexts.shape[0] * self.rows_per_context

    # chunk c (global over epochs) = forward batch c % n_chunks_per_epoch of epoch c // n_chunks_per_epoch
    def _has_chunk(self, c: int) -> bool:
        return self.epochs is None or c < self.epochs * self.n_chunks_per_epoch

    def _chunk_contexts(self, c: int) -> tuple[int, int, int]:
        """(epoch, first context, end context) of chunk c."""
        e, j = divmod(c, self.n_chunks_per_epoch)
        k0 = j * self.forward_batch_contexts
        return e, k0, min(k0 + self.forward_batch_contexts, self.contexts.shape[0])

    def _chunk_ids(self, c: int) -> Tensor:
        e, k0, k1 = self._chunk_contexts(c)
        base = e * self.contexts.shape[0]
        return torch.arange((base + k0) * self.rows_per_context, (base + k1) * self.rows_per_context)

    def _chunk_of(self, ids: Tensor) -> Tensor:
        g = ids // self.rows_per_context
        n = self.contexts.shape[0]
        return (g // n) * self.n_chunks_per_epoch + (g % n) // self.forward_batch_contexts

    def _forward_chunk(self, c: int) -> dict[str, Tensor]:
        _, k0, k1 = self._chunk_contexts(c)
        toks = self.contexts[k0:k1]
        out = forward_rows(self.model, self.hooks, toks, k0, self.skip_positions, self.dtype, self._stop)
        if self.include_positions:
            out.update(index_rows(toks, k0, self.skip_positions))
        self.n_forward_contexts += k1 - k0
        return out

    def _values_for(self, ids: Tensor) -> dict[str, Tensor]:
        """Values of the rows ``ids`` (any order), by re-running the forward batches that hold them."""
        keys = self.hooks + (list(INDEX_KEYS) if self.include_positions else [])
        if not len(ids):
            idx_dtype = {"__context__": torch.int64, "__pos__": torch.int32, "__token__": torch.int32}
            return {k: torch.empty((0, self.d_in[k]), dtype=self.dtype) if k in self.d_in
                    else torch.empty(0, dtype=idx_dtype[k]) for k in keys}
        out = {k: None for k in keys}
        chunks = self._chunk_of(ids)
        for c in torch.unique(chunks).tolist():
            where = (chunks == c).nonzero().squeeze(1)
            vals = self._forward_chunk(c)
            local = ids[where] - self._chunk_ids(c)[0]
            for k, v in vals.items():
                if out[k] is None:
                    out[k] = v.new_empty((len(ids), *v.shape[1:]))
                out[k][where] = v[local]
        return out

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        return self.batches()

    def training_batches(self, batch_tokens: int, seed: int, start_step: int) -> Iterator[dict[str, Tensor]]:
        """The trainer's entry point (shared with ``ShardedActivations``): :meth:`batches` from ``start_step``.

        The stream's own settings fix the batch size and shuffle seed; ``seed`` is not used.

        Raises:
            InputError: ``batch_tokens`` differs from the stream's.
        """
        if batch_tokens != self.batch_tokens:
            raise InputError(f"the activation stream yields {self.batch_tokens} tokens a batch but "
                             f"TrainConfig.batch_tokens is {batch_tokens}; make them equal.")
        return self.batches(start_step=start_step)

    def batches(self, start_step: int = 0) -> Iterator[dict[str, Tensor]]:
        """Iterate from batch index ``start_step``: exactly the batches an iteration from 0 yields there.

        Cost of a start_step > 0: the shuffles before it are replayed on row ids only (no forward
        passes); then the rows still in the buffer at that point are recomputed by re-running the
        forward batches that hold them. A forward batch's rows left in the buffer halve with each
        shuffle, so the buffer holds rows of the last ~log2(rows per forward batch) + 1 refills: the
        replay costs that many half-buffers of forwards (counted in :attr:`n_forward_contexts`;
        measured: 8,192-row buffer, 256-row forward batches -> ~1,100 contexts, 4.3 buffers),
        whatever start_step is. For free exact resumes, harvest to disk and use ShardedActivations.

        Raises:
            InputError: a negative start_step.
        """
        if not isinstance(start_step, int) or isinstance(start_step, bool) or start_step < 0:
            raise InputError(f"start_step must be an int >= 0, got {start_step!r}.")
        return self._iterate(start_step)

    def _iterate(self, start_step: int) -> Iterator[dict[str, Tensor]]:
        B = self.batch_tokens
        gen = torch.Generator().manual_seed(self.seed)
        ids = torch.empty(0, dtype=torch.int64)
        vals: dict[str, Tensor] | None = None  # aligned with ids once materialised
        next_chunk, step = 0, 0
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            total = None if self.epochs is None else self.epochs * self.n_tokens_total
            bar = tqdm(total=total, unit="tok", desc="activations", unit_scale=True)
        try:
            while True:
                n_old = ids.numel()
                new_chunks = []
                while ids.numel() < self.buffer_tokens and self._has_chunk(next_chunk):
                    new_chunks.append(next_chunk)
                    ids = torch.cat([ids, self._chunk_ids(next_chunk)])
                    next_chunk += 1
                n = ids.numel()
                if n < B:
                    return
                more = self._has_chunk(next_chunk)
                n_out = max(B, (n // 2) // B * B) if more else n // B * B
                n_steps = n_out // B
                perm = torch.randperm(n, generator=gen)
                if step + n_steps <= start_step:  # replay: ids only
                    ids = ids[perm][n_out:]
                    step += n_steps
                    continue
                if vals is None:
                    vals = self._values_for(ids[:n_old])
                for c in new_chunks:
                    fresh = self._forward_chunk(c)
                    vals = {k: torch.cat([vals[k], fresh[k]]) for k in vals}
                    if bar is not None:
                        bar.update(len(fresh[self.hooks[0]]))
                ids = ids[perm]
                vals = {k: v[perm] for k, v in vals.items()}
                for i in range(n_steps):
                    if step >= start_step:
                        yield {k: v[i * B:(i + 1) * B] for k, v in vals.items()}
                    step += 1
                ids = ids[n_out:]
                vals = {k: v[n_out:] for k, v in vals.items()}
        finally:
            if bar is not None:
                bar.close()

    @property
    def n_batches(self) -> int | None:
        """Batches one full iteration yields (None when ``epochs`` is None), without running the model."""
        if self.epochs is None:
            return None
        B, n, steps, c = self.batch_tokens, 0, 0, 0
        while True:
            while n < self.buffer_tokens and self._has_chunk(c):
                n += len(self._chunk_ids(c))
                c += 1
            if n < B:
                return steps
            n_out = max(B, (n // 2) // B * B) if self._has_chunk(c) else n // B * B
            steps += n_out // B
            n -= n_out
