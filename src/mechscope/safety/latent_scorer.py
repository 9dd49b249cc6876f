"""A per-token score from chosen latents of a sparse dictionary, for a :class:`~mechscope.safety.monitor.Monitor`.

An SAE (or transcoder) latent that fires on a concept is a detector without training a probe: the score of a
token is the (weighted) sum, or the max, of the chosen latents' activations there::

    acts  = dictionary.encode(x)              # [pos, d_sae], the dictionary's own encode (exact)
    score = sum_i w_i acts[:, l_i]            # reduce="sum"
    score = max_i w_i acts[:, l_i]            # reduce="max"

``x`` is the activation of the dictionary's input site ``cfg.hook_in`` (a transcoder's input, not the site it
writes). Scores are in the dictionary's activation units (non-negative), not logits; a monitor's threshold on
them is calibrated the same way (:meth:`Monitor.calibrate`).

:class:`LatentScorer` has the interface the monitor reads of a :class:`~mechscope.safety.probe.Probe`:
``site``, ``d_model``, ``model_name``, ``method``, ``aggregation``, :meth:`score_tokens`, :meth:`aggregate`.

References:
    Bricken et al. 2023, "Towards Monosemanticity" (latents as feature detectors); Templeton et al. 2024,
    "Scaling Monosemanticity" (section "Safety-Relevant Features").
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from mechscope.core.errors import HookNameError, InputError
from mechscope.core.names import axes, split_sae
from mechscope.dictionaries.model import SparseDictionary
from mechscope.safety.probe import AGGREGATIONS

#: How the chosen latents' activations at one token become its score.
REDUCTIONS = ("sum", "max")
#: What :attr:`LatentScorer.method` says (a probe's is one of its fitting methods).
METHOD = "sae_latents"


class LatentScorer:
    """Per-token scores from chosen latents of a dictionary: their (weighted) sum or max.

    Args:
        dictionary: a :class:`~mechscope.dictionaries.SparseDictionary` (SAE or transcoder) whose input site
            has one vector per position (e.g. ``blocks.L.hook_resid_post``, ``blocks.L.mlp.hook_post``).
            BatchTopK dictionaries must be in eval mode (their inference threshold), so that a token's
            score does not depend on the other tokens of a batch.
        latents: latent indices in ``0 .. d_sae - 1``, at least one, no repeats.
        reduce: ``"sum"`` or ``"max"`` over the chosen latents (:data:`REDUCTIONS`).
        weights: one finite weight >= 0 per latent (not all 0), multiplying its activation; None: all 1.
        aggregation: how a sequence's token scores become one score (:meth:`aggregate`), one of
            ``"mean" | "max" | "last"``; default ``"max"``: latents are sparse, and a mean dilutes one firing
            by the sequence's length.
        site: the hook to read, instead of ``dictionary.cfg.hook_in`` (for files that do not record it);
            None: the dictionary's.
        model_name: the model the dictionary reads; None: ``dictionary.cfg.model_name`` (None if empty).

    Attributes:
        site, d_model (the input width ``cfg.d_in``), model_name, method (``"sae_latents"``), aggregation,
        latents (tuple of int), weights (float64 [n_latents] or None), reduce, dictionary.

    Raises:
        InputError: not a SparseDictionary; empty latents, a non-integer, repeated or out-of-range index
            (names the valid range); an unknown reduce or aggregation; weights of another count than the
            latents, negative, non-finite or all zero; a site that is not one vector per position (hook_z,
            a spliced ``.sae.`` site) or not a hook name; a BatchTopK dictionary in training mode.
    """

    method = METHOD

    def __init__(self, dictionary: SparseDictionary, latents: Sequence[int], *, reduce: str = "sum",
                 weights: Sequence[float] | Tensor | None = None, aggregation: str = "max", site: str | None = None,
                 model_name: str | None = None):
        if not isinstance(dictionary, SparseDictionary):
            raise InputError(f"LatentScorer needs a SparseDictionary (mechscope.dictionaries.load_dictionary(folder)),"
                             f" got {type(dictionary).__name__}.")
        cfg = dictionary.cfg
        self.dictionary = dictionary
        self.latents = _check_latents(latents, cfg.d_sae)
        if reduce not in REDUCTIONS:
            raise InputError(f"reduce must be one of {REDUCTIONS} (over the chosen latents at each token), "
                             f"got {reduce!r}.")
        if aggregation not in AGGREGATIONS:
            raise InputError(f"aggregation must be one of {AGGREGATIONS} (over a sequence's tokens), got {aggregation!r}.")
        self.reduce, self.aggregation = reduce, aggregation
        self.weights = None if weights is None else _check_weights(weights, len(self.latents))
        self.site = cfg.hook_in if site is None else site
        _check_site(self.site, cfg.hook_in)
        self.d_model = cfg.d_in
        self.model_name = model_name if model_name is not None else (cfg.model_name or None)
        self._check_mode()

    def _check_mode(self) -> None:
        d = self.dictionary
        if d.cfg.architecture == "batchtopk" and d.training and not d.batchtopk_use_threshold:
            raise InputError("the BatchTopK dictionary is in training mode: its latents at a token would depend on "
                             "the other tokens of the batch (TopK over the batch), so a monitor's scores would "
                             "change with how generation batches them. Call dictionary.eval() (its inference "
                             "threshold) first.")

    @torch.no_grad()
    def encode(self, acts: Float[Tensor, "pos d_in"]) -> Float[Tensor, "pos n_latents"]:
        """float64 [pos, n_latents] (CPU): the chosen latents' activations (the dictionary's encode, unweighted).

        Args:
            acts: one sequence's activations at :attr:`site`, [pos, d_in], any float dtype and device (moved to
                the dictionary's device and dtype, as its encode does).

        Raises:
            InputError: not 2-D floats; width other than ``d_in``; NaN or infinite values; a BatchTopK
                dictionary in training mode.
        """
        if not isinstance(acts, Tensor) or acts.dim() != 2 or not acts.is_floating_point():
            got = f"{acts.dtype} {tuple(acts.shape)}" if isinstance(acts, Tensor) else type(acts).__name__
            raise InputError(f"score_tokens takes one sequence's activations as floats [pos, d], got {got}.")
        if acts.shape[1] != self.d_model:
            raise InputError(f"the activations have width {acts.shape[1]} but the dictionary reads {self.d_model} "
                             f"features at {self.site}; give activations of that site on the model it was trained "
                             f"on ({self.model_name or 'see its cfg.json'}).")
        if not bool(torch.isfinite(acts).all()):
            raise InputError(f"the activations at {self.site} hold {int((~torch.isfinite(acts)).sum())} NaN or "
                             "infinite values; the latents cannot be computed. Recollect them in float32.")
        self._check_mode()
        d = self.dictionary
        full = d.encode(acts.to(d.W_enc.device))  # [pos, d_sae], the dictionary's dtype
        return full[:, list(self.latents)].to("cpu", torch.float64)

    def score_tokens(self, acts: Float[Tensor, "pos d_in"]) -> Float[Tensor, " pos"]:
        """float64 [pos] per-token scores (activation units of the dictionary, >= 0) of one sequence.

        Args:
            acts: activations at :attr:`site`, [pos, d_in] (see :meth:`encode`).

        Raises:
            InputError: as :meth:`encode`.
        """
        lat = self.encode(acts)
        if self.weights is not None:
            lat = lat * self.weights
        return lat.sum(-1) if self.reduce == "sum" else lat.max(-1).values

    def aggregate(self, token_scores: Float[Tensor, " pos"]) -> float:
        """One sequence's score from its token scores, by :attr:`aggregation`. Raises InputError if empty."""
        if token_scores.numel() == 0:
            raise InputError("no token scores to aggregate: the sequence selected no tokens.")
        s = token_scores.double()
        return float({"mean": s.mean, "max": s.max, "last": lambda: s[-1]}[self.aggregation]())

    def describe(self) -> dict[str, Any]:
        """JSON-ready facts: method, site, model, dictionary (architecture, d_sae, folder), latents, weights, rules."""
        c = self.dictionary.cfg
        return {"method": self.method, "site": self.site, "model_name": self.model_name, "d_model": self.d_model,
                "dictionary": {"architecture": c.architecture, "d_sae": c.d_sae, "hook_in": c.hook_in,
                               "hook_out": c.hook_out, "source": getattr(self.dictionary, "source", None)},
                "latents": list(self.latents), "weights": None if self.weights is None else self.weights.tolist(),
                "reduce": self.reduce, "aggregation": self.aggregation}

    def __repr__(self) -> str:
        w = "" if self.weights is None else f", weights={self.weights.tolist()}"
        return f"LatentScorer(site={self.site!r}, latents={list(self.latents)}, reduce={self.reduce!r}{w})"


def _check_latents(latents, d_sae: int) -> tuple[int, ...]:
    if hasattr(latents, "tolist") and not isinstance(latents, Sequence):  # a tensor or NumPy array
        latents = latents.flatten().tolist() if hasattr(latents, "flatten") else latents.tolist()
    if isinstance(latents, str) or not isinstance(latents, Sequence):
        raise InputError(f"latents must be a list of latent indices, e.g. [12, 40], got {latents!r:.60}.")
    out = []
    for given in latents:
        try:
            i = None if isinstance(given, bool) else operator.index(given)  # ints and NumPy integers, not floats
        except TypeError:
            i = None
        if i is None:
            raise InputError(f"latent indices must be integers in 0..{d_sae - 1}, got {given!r}.")
        if not 0 <= i < d_sae:
            raise InputError(f"latent {i} is out of range: the dictionary has {d_sae} latents (0..{d_sae - 1}). "
                             "Pick indices of this dictionary (e.g. from its feature database).")
        out.append(int(i))
    if not out:
        raise InputError("no latents given: a LatentScorer needs at least one latent index, e.g. latents=[12].")
    if len(set(out)) != len(out):
        dup = sorted({i for i in out if out.count(i) > 1})
        raise InputError(f"latents {dup} are repeated; give each latent once (use weights= to count one more).")
    return tuple(out)


def _check_weights(weights, n: int) -> Tensor:
    try:
        w = torch.as_tensor(weights, dtype=torch.float64).flatten().cpu()
    except (TypeError, ValueError, RuntimeError):
        raise InputError(f"weights must be numbers, one per latent, got {weights!r:.60}.") from None
    if w.numel() != n:
        raise InputError(f"weights has {w.numel()} entries but there are {n} latents; give one weight per latent, "
                         "in the order of latents.")
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise InputError(f"weights must be finite and >= 0 (latent activations are non-negative, so a negative "
                         f"weight would lower the score when the concept fires), got {w.tolist()}. Drop the latents "
                         "whose weight is negative, or give a weight >= 0.")
    if not bool((w > 0).any()):
        raise InputError("the weights are all 0, so every score would be 0; give at least one positive weight.")
    return w


def _check_site(site: str, hook_in: str) -> None:
    if not isinstance(site, str):
        raise InputError(f"site must be a hook name such as blocks.6.hook_resid_post, got {site!r}.")
    try:
        names = axes(site)
    except HookNameError as e:
        raise InputError(f"the dictionary's site {site!r} is not a hook name ({e}).") from None
    if split_sae(site) is not None or len(names) != 3 or names[:2] != ("batch", "pos"):
        raise InputError(f"the dictionary reads {site} (axes {list(names)}), not one vector per position; a monitor "
                         f"scores each token from one [d] vector. Use a dictionary of a [batch, pos, d] site such as "
                         f"blocks.L.hook_resid_post, hook_mlp_out or mlp.hook_post (this one reads {hook_in}).")


__all__ = ["METHOD", "REDUCTIONS", "LatentScorer"]
