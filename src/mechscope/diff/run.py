"""``diff_models``: every comparison of a base and a tuned model in one call, as one JSON-ready result."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mechscope.core.io import jsonable, write_json_atomic
from mechscope.diff.activations import DEFAULT_SITES, ActivationDiff, activation_diff
from mechscope.diff.compat import check_comparable
from mechscope.diff.cross_patch import CrossPatchResult, cross_model_patching
from mechscope.diff.dictionary import DictionaryDiff, dictionary_diff
from mechscope.diff.kl import LensDiff, TokenKL, logit_lens_diff, token_kl
from mechscope.diff.weights import WeightDeltas, weight_deltas


@dataclass(frozen=True)
class DiffResult:
    """What :func:`diff_models` found.

    Attributes:
        base / tuned: the models' names.
        n_texts: texts compared.
        weights / activations / kl / lens: the parts (see their classes).
        patching: cross-model patching, or None when no prompts and metric were given.
        dictionary: a crosscoder's or diff-SAE's tuned-specific latents, or None when none was asked for.
        settings: the arguments that shaped the numbers.
        seconds: wall time of each part.
    """

    base: str
    tuned: str
    n_texts: int
    weights: WeightDeltas
    activations: ActivationDiff
    kl: TokenKL
    lens: LensDiff
    patching: CrossPatchResult | None = None
    dictionary: DictionaryDiff | None = None
    settings: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-ready (floats to 6 significant digits, NaN/inf to None)."""
        return jsonable({
            "base": self.base, "tuned": self.tuned, "n_texts": self.n_texts, "settings": self.settings,
            "seconds": self.seconds, "weights": self.weights.to_dict(), "activations": self.activations.to_dict(),
            "kl": self.kl.to_dict(), "logit_lens": self.lens.to_dict(),
            "patching": None if self.patching is None else self.patching.to_dict(),
            **({} if self.dictionary is None else {
                "dictionary": {k: v for k, v in self.dictionary.to_dict().items() if k != "latents"},
                "latents": self.dictionary.latents}),
        })

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False, allow_nan=False)

    def save(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` as JSON to ``path`` atomically (a folder gets ``diff.json`` inside)."""
        path = Path(path)
        if path.is_dir():
            path = path / "diff.json"
        write_json_atomic(self.to_dict(), path)
        return path


def diff_models(
    base,
    tuned,
    texts,
    *,
    prompts=None,
    metric: Callable | None = None,
    sites: Sequence[str] = DEFAULT_SITES,
    first_k: int = 5,
    skip_first: bool = True,
    mean_diff: bool = False,
    top_n: int = 20,
    n_boot: int = 1000,
    batch_size: int = 8,
    max_len: int | None = 256,
    patch_per: str = "layer",
    patch_kinds: Sequence[str] | None = None,
    dictionary: str | None = None,
    dictionary_texts=None,
    dictionary_options: dict | None = None,
    check: bool = True,
    progress: bool = True,
) -> DiffResult:
    """Compare a base model with a tuned one: weights, activations, next-token KL, logit lens, and optionally
    cross-model patching.

    Args:
        base / tuned: HookedModels of one architecture and tokenizer (checked unless ``check=False``).
        texts: texts (or token-id rows) for the activation, KL and logit-lens comparisons.
        prompts / metric: both given: also :func:`~mechscope.diff.cross_model_patching` on these prompts (of
            equal token length) with this metric (e.g. :func:`~mechscope.diff.logprob_metric`).
        sites / first_k / skip_first / mean_diff: see :func:`~mechscope.diff.activation_diff`.
        top_n / n_boot: see :func:`~mechscope.diff.token_kl` (top_n also sizes the logit lens's token lists).
        batch_size / max_len: texts per forward pass, tokens kept per text.
        patch_per / patch_kinds: ``per`` and ``kinds`` of the patching.
        dictionary: ``"crosscoder"`` or ``"diff-sae"``: also train that dictionary on both models' activations
            and list its tuned-specific latents (:func:`~mechscope.diff.dictionary_diff`); None skips it.
        dictionary_texts: its texts (default ``texts``; a dictionary wants far more tokens than the other parts).
        dictionary_options: keyword arguments of :func:`~mechscope.diff.dictionary_diff` (``site``, ``d_sae``,
            ``k``, ``n_steps``, ``batch_rows``, ``top``, ...).

    Returns:
        DiffResult (``save(path)`` writes it as JSON).

    Raises:
        InputError: models that cannot be compared (see :func:`~mechscope.diff.check_comparable`), prompts
            without a metric or the reverse, and the parts' own errors.
    """
    from mechscope.core.errors import InputError

    if (prompts is None) != (metric is None):
        raise InputError("cross-model patching needs both prompts= and metric= (e.g. logprob_metric(target_ids)); "
                         "pass both, or neither to skip it.")
    if check:
        check_comparable(base, tuned)
    n_texts = len(texts)
    secs: dict[str, float] = {}
    common = {"batch_size": batch_size, "max_len": max_len, "progress": progress}

    def timed(name, fn, *a, **kw):
        t0 = time.perf_counter()
        r = fn(*a, **kw)
        secs[name] = round(time.perf_counter() - t0, 3)
        return r

    w = timed("weights", weight_deltas, base, tuned)
    acts = timed("activations", activation_diff, base, tuned, texts, sites=sites, first_k=first_k,
                 skip_first=skip_first, mean_diff=mean_diff, **common)
    kl = timed("kl", token_kl, base, tuned, texts, top_n=top_n, n_boot=n_boot, **common)
    lens = timed("logit_lens", logit_lens_diff, base, tuned, texts, top_n=top_n, **common)
    dd = None
    if dictionary is not None:
        opts = {"batch_size": batch_size, "max_tokens": max_len, "progress": progress, **(dictionary_options or {})}
        dd = timed("dictionary", dictionary_diff, base, tuned, texts if dictionary_texts is None else dictionary_texts,
                   kind=dictionary, **opts)
    patch = None
    if prompts is not None:
        patch = timed("patching", cross_model_patching, base, tuned, prompts, metric, per=patch_per,
                      kinds=patch_kinds, progress=progress)
    settings = {"sites": list(sites) if not isinstance(sites, str) else [sites], "first_k": first_k,
                "skip_first": skip_first, "top_n": top_n, "n_boot": n_boot, "batch_size": batch_size,
                "max_len": max_len, "patch_per": patch_per if patch else None,
                "patch_kinds": list(patch.patched) if patch else None, "dictionary": dictionary,
                "dictionary_site": dd.site if dd else None}
    return DiffResult(base.cfg.name, tuned.cfg.name, n_texts, w, acts, kl, lens, patch, dd, settings, secs)


__all__ = ["DiffResult", "diff_models"]
