"""Feature statistics of every latent of a dictionary (or every neuron of an MLP) in one streaming pass.

For each latent ``i`` over a set of token contexts ``[n_contexts, context_len]`` (position 0, the BOS,
is skipped: its activation is never counted and is stored as 0 in example activations):

- top-k activating contexts (by the latent's max over the context), with the latent's exact per-token
  activations over the whole context;
- quantile examples: a uniform random sample of ``sample_size`` firing contexts per latent (a bottom-k
  sketch on seeded random keys, deterministic and resumable), split after the pass into
  ``n_quantile_bins`` equal-count bins of their max activation, ``per_bin`` examples each (a uniform
  sample fills equal-count bins evenly: 2 x per_bin expected per bin by default);
- density (fraction of tokens with act > 0), max, mean (over firing tokens), a fixed-bin histogram of
  log10 activation;
- logit effects: ``(d_i * g) @ W_U`` with ``d_i`` the output direction (decoder row, or the MLP
  down-projection row of a neuron) and ``g`` the final norm's elementwise gain (``w``, ``1 + w`` for
  Gemma; the norm's scale and bias are left out): top promoted / suppressed tokens;
- co-activation: exact token counts of every pair of latents firing on the same token (the upper
  triangle of a dense int32 ``[d_sae, d_sae]`` matrix, 85 MB at 4,608 latents, filled with one
  ``index_add_`` of the pairs among each token's active latents: 496 pairs per token at k = 32), ranked
  by Jaccard ``c_ij / (f_i + f_j - c_ij)`` (a raw count would rank the densest latents first for every
  latent). Above ``coact_max_latents`` (16,384: 1 GiB) it is skipped, with a note in the database.

Every statistic except the stored per-token activations is computed from the sparse firing entries
``(context, position, latent, value)`` of a batch; a TopK dictionary yields them straight from its
top-k (no scan of the dense ``[B, P, d_sae]`` tensor, which exists only per batch).

Why the examples' activations are kept during the pass and not recomputed in a second pass: at 1M tokens
(7,800 contexts of 128) the 4,608 x (20 + 40) stored examples touch nearly every context, so a second
pass would cost about one more forward over the corpus; keeping them costs ``d_sae x (top_k +
sample_size) x context_len`` floats (141 MB for 4,608 latents) and a copy of only the changed rows per
batch.

Shape suffixes on locals: B contexts in a batch, P positions, N latents, S slots, K top-k.

References:
    Bricken et al. 2023, "Towards Monosemanticity" (feature dashboards: top and quantile examples,
    logit effects, density histograms); McDougall, sae_vis, and Decode Research's SAEDashboard (which
    use intervals of the max activation instead: those need the final max, so a one-pass version would
    have to keep examples for every interval of every possible max).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from collections.abc import Callable

import torch
from torch import Tensor

from mechscope.core.errors import InputError, MechscopeError
from mechscope.core.io import load_safetensors, save_safetensors_atomic, write_json_atomic
from mechscope.features.sources import FeatureSource

STATE_VERSION = 1


@dataclass(frozen=True)
class StatsConfig:
    """Settings of a feature-statistics pass.

    Attributes:
        top_k: top-activating contexts kept per latent.
        n_quantile_bins / per_bin: quantile examples: bins of equal count of the sampled contexts' max
            activation, examples per bin.
        sample_size: firing contexts sampled uniformly per latent for the quantile examples (default
            ``2 * n_quantile_bins * per_bin``, so each bin expects twice what it needs).
        n_logits: promoted and suppressed tokens kept per latent.
        n_coact: co-activating latents kept per latent.
        batch_contexts: contexts per forward pass.
        hist_lo / hist_hi / hist_bins: fixed histogram of log10(act) for act > 0; values outside
            ``[hist_lo, hist_hi)`` go to the end bins.
        coact_max_latents: above this many latents the dense co-occurrence matrix (4 bytes x n^2) is not
            built and co-activation is skipped (recorded in the result's notes).
        checkpoint_every: batches between checkpoints (0: none).
        seed: seeds the random keys of the quantile sample.
        memory_budget_bytes: refuse a pass whose running state (example buffers ``4 n (top_k +
            sample_size) context_len`` bytes plus the co-occurrence matrix ``4 n^2``) exceeds this.
    """

    top_k: int = 20
    n_quantile_bins: int = 5
    per_bin: int = 4
    sample_size: int | None = None
    n_logits: int = 10
    n_coact: int = 10
    batch_contexts: int = 8
    hist_lo: float = -3.0
    hist_hi: float = 4.0
    hist_bins: int = 70
    coact_max_latents: int = 16384
    checkpoint_every: int = 50
    seed: int = 0
    memory_budget_bytes: int = 8 * 2**30

    def __post_init__(self):
        for name in ("top_k", "n_quantile_bins", "per_bin", "n_logits", "n_coact", "batch_contexts", "hist_bins"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise InputError(f"StatsConfig.{name} must be a positive int, got {v!r}.")
        if self.sample_size is None:
            object.__setattr__(self, "sample_size", 2 * self.n_quantile_bins * self.per_bin)
        if self.sample_size < self.n_quantile_bins * self.per_bin:
            raise InputError(f"StatsConfig.sample_size={self.sample_size} is smaller than n_quantile_bins * per_bin "
                             f"= {self.n_quantile_bins * self.per_bin}; raise it.")
        if not self.hist_hi > self.hist_lo:
            raise InputError(f"StatsConfig.hist_hi ({self.hist_hi}) must exceed hist_lo ({self.hist_lo}).")
        if self.checkpoint_every < 0:
            raise InputError(f"StatsConfig.checkpoint_every must be >= 0, got {self.checkpoint_every}.")

    @property
    def hist_edges(self) -> list[float]:
        """The ``hist_bins + 1`` edges of the log10 histogram."""
        w = (self.hist_hi - self.hist_lo) / self.hist_bins
        return [self.hist_lo + i * w for i in range(self.hist_bins + 1)]


# -- the streaming state ------------------------------------------------------------------------------
def _merge_slots(keys_NS: Tensor, new_NB: Tensor, ctx_NS: Tensor | None = None,
                 ctx_B: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Which slots to overwrite with which new candidates so the slots hold the S largest keys.

    With ``ctx_NS`` (the slots' context ids) and ``ctx_B`` (the new candidates'), a tie at the last kept place
    goes to the lower context id, so what is kept does not depend on the order contexts arrived in (one process
    and the ranks of a distributed pass keep the same contexts); only the rows with such a tie are sorted.

    Returns (rows, slots, cols): for each replaced slot ``keys[rows, slots]`` takes ``new[rows, cols]``.
    Only changed slots are returned, so per-batch work is proportional to the changes.
    """
    n, S = keys_NS.shape
    cand = torch.cat([keys_NS, new_NB], dim=1)
    vals, idx = cand.topk(S, dim=1, sorted=False)
    if ctx_NS is not None:
        kth = vals.amin(1, keepdim=True)
        tied = ((cand == kth).sum(1) > (vals == kth).sum(1)) & (kth[:, 0] > -math.inf)
        if bool(tied.any()):
            r = tied.nonzero().flatten()
            cctx = torch.cat([ctx_NS[r], ctx_B[None, :].expand(len(r), -1)], dim=1)
            by_ctx = cctx.argsort(dim=1, stable=True)
            order = by_ctx.gather(1, cand[r].gather(1, by_ctx).argsort(dim=1, descending=True, stable=True))
            idx[r] = order[:, :S]
    is_new = idx >= S
    count = is_new.sum(1)
    if int(count.sum()) == 0:
        e = torch.empty(0, dtype=torch.long)
        return e, e, e
    kept = torch.zeros(n, S + 1, dtype=torch.bool).scatter_(1, torch.where(is_new, S, idx), True)[:, :S]
    free = torch.argsort(kept.to(torch.int8), dim=1, stable=True)  # evicted slots first
    news = torch.argsort((~is_new).to(torch.int8), dim=1, stable=True)  # new entries first
    j = torch.arange(S)
    take = j[None, :] < count[:, None]
    rows = torch.arange(n)[:, None].expand(n, S)[take]
    slots = free[take]
    cols = idx.gather(1, news)[take] - S
    return rows, slots, cols


@dataclass
class FeatureStats:
    """Running (then final) statistics; every tensor is CPU.

    Attributes:
        n_tokens: tokens counted (BOS positions excluded). n_contexts: contexts seen. next_batch: resume point.
        fired [N] int64; act_sum [N] float64; act_max [N] float32 (-inf before any token);
        hist [N, hist_bins] int64;
        top_key / top_ctx / top_pos [N, K] (key: context max, -inf for an empty slot), top_acts [N, K, P];
        smp_key / smp_val / smp_ctx / smp_pos [N, S], smp_acts [N, S, P] (key: seeded uniform random);
        coact [N, N] int32 or None.
    """

    n_tokens: int
    n_contexts: int
    next_batch: int
    tensors: dict[str, Tensor]
    notes: list[str] = field(default_factory=list)

    @classmethod
    def empty(cls, n: int, P: int, cfg: StatsConfig) -> "FeatureStats":
        K, S = cfg.top_k, cfg.sample_size
        buffers, coact = 4 * n * (K + S) * P, (4 * n * n if n <= cfg.coact_max_latents else 0)
        if buffers + coact > cfg.memory_budget_bytes:
            raise InputError(
                f"the running state of {n} latents needs {(buffers + coact) / 2**30:.1f} GiB (example buffers "
                f"{buffers / 2**30:.1f} GiB for top_k={K} + sample_size={S} contexts of {P} tokens, co-occurrence "
                f"{coact / 2**30:.1f} GiB) > memory_budget_bytes={cfg.memory_budget_bytes / 2**30:.1f} GiB. Lower "
                "top_k, per_bin or the context length, lower coact_max_latents, or raise the budget.")
        t = {
            "fired": torch.zeros(n, dtype=torch.int64), "act_sum": torch.zeros(n, dtype=torch.float64),
            "act_max": torch.full((n,), -math.inf), "hist": torch.zeros(n, cfg.hist_bins, dtype=torch.int64),
            "top_key": torch.full((n, K), -math.inf), "top_ctx": torch.full((n, K), -1, dtype=torch.int64),
            "top_pos": torch.zeros(n, K, dtype=torch.int64), "top_acts": torch.zeros(n, K, P),
            "smp_key": torch.full((n, S), -math.inf), "smp_val": torch.zeros(n, S),
            "smp_ctx": torch.full((n, S), -1, dtype=torch.int64), "smp_pos": torch.zeros(n, S, dtype=torch.int64),
            "smp_acts": torch.zeros(n, S, P),
        }
        notes = []
        if n <= cfg.coact_max_latents:
            t["coact"] = torch.zeros(n, n, dtype=torch.int32)
        else:
            notes.append(f"co-activation skipped: {n} latents > coact_max_latents={cfg.coact_max_latents} "
                         f"(a dense count matrix would take {4 * n * n / 2**30:.1f} GiB)")
        return cls(0, 0, 0, t, notes)

    def update(self, acts_BPN: Tensor, entries: tuple[Tensor, Tensor, Tensor, Tensor], ctx_ids: Tensor,
               batch_index: int, cfg: StatsConfig) -> None:
        """Fold one batch into the statistics.

        Args:
            acts_BPN: ``[B, P, N]`` activations, position 0 (BOS) already zeroed.
            entries: ``(b, pos, latent, value)`` of every activation > 0, in (b, pos) order. Every statistic
                but the stored per-token activations comes from these (sparse for TopK dictionaries).
            ctx_ids: ``[B]`` context ids. batch_index: seeds the sample's random keys.
        """
        t = self.tensors
        B, P, N = acts_BPN.shape
        b, p, lat, vals = entries
        self.n_tokens += B * (P - 1)
        self.n_contexts += B
        t["fired"] += torch.bincount(lat, minlength=N)
        t["act_sum"].index_add_(0, lat, vals.double())
        t["act_max"].scatter_reduce_(0, lat, vals, reduce="amax")
        width = (cfg.hist_hi - cfg.hist_lo) / cfg.hist_bins
        hb = ((vals.log10() - cfg.hist_lo) / width).floor().clamp(0, cfg.hist_bins - 1).long()
        t["hist"].view(-1).add_(torch.bincount(lat * cfg.hist_bins + hb, minlength=N * cfg.hist_bins))
        if "coact" in t:
            _count_pairs(t["coact"], b * P + p, lat, N)
        # per-context max and its first position: the candidates for the top and sampled examples
        flat = b * N + lat
        cmax = torch.zeros(B * N).scatter_reduce_(0, flat, vals, reduce="amax")
        at_max = vals == cmax[flat]
        cpos = torch.full((B * N,), P).scatter_reduce_(0, flat[at_max], p[at_max], reduce="amin")
        cmax, cpos = cmax.view(B, N), cpos.view(B, N)
        firing = cmax > 0
        key = torch.where(firing, cmax, -math.inf).T.contiguous()  # [N, B]
        rows, slots, cols = _merge_slots(t["top_key"], key, t["top_ctx"], ctx_ids)
        t["top_key"][rows, slots] = key[rows, cols]
        t["top_ctx"][rows, slots] = ctx_ids[cols]
        t["top_pos"][rows, slots] = cpos[cols, rows]
        acts_NB_P = _ByLatent(acts_BPN)
        t["top_acts"][rows, slots] = acts_NB_P[cols, rows]
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + batch_index)
        rkey = torch.where(firing, torch.rand(B, N, generator=g), -math.inf).T.contiguous()
        rows, slots, cols = _merge_slots(t["smp_key"], rkey, t["smp_ctx"], ctx_ids)
        t["smp_key"][rows, slots] = rkey[rows, cols]
        t["smp_val"][rows, slots] = cmax[cols, rows]
        t["smp_ctx"][rows, slots] = ctx_ids[cols]
        t["smp_pos"][rows, slots] = cpos[cols, rows]
        t["smp_acts"][rows, slots] = acts_NB_P[cols, rows]

    # -- checkpoints --------------------------------------------------------------------------------
    def save(self, folder: Path, fingerprint: dict) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        save_safetensors_atomic(self.tensors, folder / "state.safetensors")
        write_json_atomic({"version": STATE_VERSION, "fingerprint": fingerprint, "n_tokens": self.n_tokens,
                           "n_contexts": self.n_contexts, "next_batch": self.next_batch, "notes": self.notes},
                          folder / "state.json")

    @classmethod
    def load(cls, folder: Path, fingerprint: dict) -> "FeatureStats":
        meta = json.loads((folder / "state.json").read_text())
        if meta.get("fingerprint") != fingerprint:
            old = meta.get("fingerprint") or {}
            diff = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
            raise InputError(f"cannot resume from {folder}: it was started with other settings (differing: "
                             f"{', '.join(diff)}). Re-run with the same arguments, or delete {folder} to start over.")
        tensors = load_safetensors(folder / "state.safetensors", "feature-statistics checkpoint")
        return cls(meta["n_tokens"], meta["n_contexts"], meta["next_batch"], tensors, meta["notes"])


def _count_pairs(coact_NN: Tensor, tok: Tensor, lat: Tensor, N: int, max_pairs: int = 1 << 23) -> None:
    """Add 1 to ``coact[i, j]`` (i < j: the upper triangle only) for every token where latents i and j both fire.

    ``tok``/``lat`` are the firing entries sorted by (token, latent) (any increasing token numbering).
    Tokens are padded to the largest active count within a chunk of tokens sized so that at most
    ``max_pairs`` pairs are materialised at once. The full symmetric count is ``U + U.T`` plus the
    diagonal ``fired``.
    """
    if tok.numel() == 0:
        return
    tok = torch.unique_consecutive(tok, return_inverse=True)[1]
    counts = torch.bincount(tok)
    starts = torch.cumsum(counts, 0) - counts
    order_in_tok = torch.arange(tok.numel()) - starts[tok]
    T = counts.numel()
    width = int(counts.max())
    if width < 2:
        return
    padded = torch.full((T, width), -1, dtype=torch.long)
    padded[tok, order_in_tok] = lat
    iu = torch.triu_indices(width, width, 1)
    step = max(1, max_pairs // iu.shape[1])
    flat = coact_NN.view(-1)
    for s in range(0, T, step):
        a, c = padded[s:s + step, iu[0]], padded[s:s + step, iu[1]]
        pair = (a * N + c)[(a >= 0) & (c >= 0)]
        flat.index_add_(0, pair, torch.ones_like(pair, dtype=torch.int32))


_TRANSPOSE_ROWS = 2048


class _ByLatent:
    """``acts[b, :, latent]`` rows of a ``[B, P, N]`` tensor; for many rows, from a transposed copy (the
    strided gather reads one cache line per position and is ~3x slower than transposing once)."""

    def __init__(self, acts_BPN: Tensor):
        self.acts, self.t = acts_BPN, None

    def __getitem__(self, idx: tuple[Tensor, Tensor]) -> Tensor:
        b, lat = idx
        if b.numel() < _TRANSPOSE_ROWS:
            return self.acts[b, :, lat]
        if self.t is None:
            self.t = self.acts.permute(0, 2, 1).contiguous()  # [B, N, P]
        return self.t[b, lat]


# -- the pass --------------------------------------------------------------------------------------------
def _fingerprint(source: FeatureSource, tokens: Tensor, cfg: StatsConfig) -> dict:
    return {"source": source.identity, "config": asdict(cfg), "tokens_shape": list(tokens.shape),
            "tokens_sha256": hashlib.sha256(tokens.numpy().tobytes()).hexdigest()[:16]}


def check_stats_tokens(tokens) -> Tensor:
    """``tokens`` as CPU int64 ``[n_contexts, context_len]``.

    Raises:
        InputError: not an integer tensor of rank 2, no contexts, contexts of fewer than 2 tokens.
    """
    if not isinstance(tokens, Tensor) or tokens.ndim != 2 or tokens.dtype not in (torch.int64, torch.int32):
        raise InputError("tokens must be an int64 tensor [n_contexts, context_len] (e.g. corpus_tokens(...).tokens).")
    if tokens.shape[0] == 0:
        raise InputError("no contexts to compute feature statistics on; give a corpus with text in it.")
    if tokens.shape[1] < 2:
        raise InputError(f"contexts need at least 2 tokens (BOS + text), got context_len {tokens.shape[1]}.")
    return tokens.long().cpu()


def check_batch(source: FeatureSource, acts: Tensor, entries, ids: Tensor) -> None:
    """Refuse a batch with the wrong width or non-finite activations (names the contexts and the fix)."""
    if acts.shape[-1] != source.n_latents:
        raise MechscopeError(f"{source.hook} gave {acts.shape[-1]} features, expected {source.n_latents}.")
    if not torch.isfinite(entries[3]).all() or not torch.isfinite(acts.amax()):
        raise MechscopeError(f"non-finite latent activations in contexts {int(ids[0])}..{int(ids[-1])}; "
                             "check the dictionary weights and the model dtype.")


def compute_feature_stats(source: FeatureSource, tokens: Tensor, cfg: StatsConfig = StatsConfig(), *,
                          checkpoint_dir: str | Path | None = None, resume: bool = False,
                          progress: bool = True,
                          on_batch: Callable[[int], None] | None = None, dist=None) -> FeatureStats:
    """Stream ``tokens`` through the model once and collect every latent's statistics.

    Args:
        source: the latents (:class:`FeatureSource`).
        tokens: ``[n_contexts, context_len]`` int64 token ids; position 0 (BOS) is not counted.
        cfg: :class:`StatsConfig`.
        checkpoint_dir: folder for checkpoints (``state.safetensors`` + ``state.json``), written every
            ``cfg.checkpoint_every`` batches; None: no checkpoints.
        resume: continue from the checkpoint in ``checkpoint_dir``.
        progress: show a tqdm bar over contexts.
        on_batch: called with the index of each finished batch (after any checkpoint).
        dist: a :class:`~mechscope.scale.dist.DistInfo`: fold only this rank's batches (``b % world_size ==
            rank``); merge the ranks with :func:`mechscope.features.parallel.merge_stats`.

    Returns:
        :class:`FeatureStats` with the running tensors (finish with :func:`finalize`).

    Raises:
        InputError: no contexts, contexts of fewer than 2 tokens, non-integer tokens; ``resume`` without a
            checkpoint, or a checkpoint written with other settings.
    """
    tokens = check_stats_tokens(tokens)
    fp = _fingerprint(source, tokens, cfg)
    folder = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if resume:
        if folder is None or not (folder / "state.json").exists():
            raise InputError(f"nothing to resume: no checkpoint in {folder}. Run without --resume to start.")
        stats = FeatureStats.load(folder, fp)
    else:
        stats = FeatureStats.empty(source.n_latents, tokens.shape[1], cfg)
    n_batches = math.ceil(tokens.shape[0] / cfg.batch_contexts)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=tokens.shape[0], initial=min(tokens.shape[0], stats.next_batch * cfg.batch_contexts),
                   unit="ctx", desc="feature stats", dynamic_ncols=True)
    try:
        W, r = (1, 0) if dist is None else (dist.world_size, dist.rank)
        for bi in (b for b in range(stats.next_batch, n_batches) if b % W == r):  # this rank's batches
            ids = torch.arange(bi * cfg.batch_contexts, min(tokens.shape[0], (bi + 1) * cfg.batch_contexts))
            acts, entries = source.activations(tokens[ids])
            check_batch(source, acts, entries, ids)
            stats.update(acts, entries, ids, bi, cfg)
            stats.next_batch = bi + 1
            if bar is not None:
                bar.update(len(ids))
            local = (bi - r) // W + 1  # this rank's count of batches so far (one process: next_batch)
            if folder is not None and cfg.checkpoint_every and local % cfg.checkpoint_every == 0 \
                    and stats.next_batch < n_batches:
                stats.save(folder, fp)
            if on_batch is not None:
                on_batch(bi)
    finally:
        if bar is not None:
            bar.close()
    return stats
