"""Activation patching and attribution patching over layers, positions and heads.

Both methods answer "how much of the clean behaviour does this activation restore?" for a corrupted
input (denoising): activation patching by running the corrupted input with one clean activation
patched in, attribution patching by the first-order Taylor estimate of the same effect.

Kinds of sweep (sites are canonical hook names):

==============  ==================================  ======================  =====================
kind            site                                one variant patches      values
==============  ==================================  ======================  =====================
``resid_pre``   ``blocks.L.hook_resid_pre``          one layer, one position [n_layers, pos]
``attn_out``    ``blocks.L.hook_attn_out``           one layer, all positions [n_layers]
``mlp_out``     ``blocks.L.hook_mlp_out``            one layer, all positions [n_layers]
``heads``       ``blocks.L.attn.hook_z``             one head, all positions  [n_layers, n_heads]
==============  ==================================  ======================  =====================

Activation patching stacks many patched variants along the batch axis of one forward pass
(``Patch(..., batch=rows)``), computes logits only for the positions the metric reads, and runs the
prefix that clean and corrupted prompts share only once (see :func:`activation_patching`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Int
from torch import Tensor

from mechscope.analysis.bootstrap import bootstrap_ci
from mechscope.core.errors import InputError, ShapeError
from mechscope.hooks.interventions import Patch

PATCH_KINDS: dict[str, str] = {
    "resid_pre": "blocks.{L}.hook_resid_pre",
    "attn_out": "blocks.{L}.hook_attn_out",
    "mlp_out": "blocks.{L}.hook_mlp_out",
    "heads": "blocks.{L}.attn.hook_z",
}

#: Default number of token positions (rows x positions) in one forward pass of a sweep.
TOKENS_PER_PASS = 2048


@dataclass(frozen=True)
class PatchingResult:
    """A patching map.

    Attributes:
        values: float32 CPU tensor, [n_layers, pos] (resid_pre), [n_layers] (attn_out, mlp_out) or
            [n_layers, n_heads] (heads), in the metric's units (1 = clean, 0 = corrupt for the
            normalised logit difference).
        kind: the sweep kind (a key of ``PATCH_KINDS``).
        metric: the metric's name.
        row_labels: "L0".."L{n_layers-1}".
        col_labels: "{token}_{position}" of the clean prompt 0 (resid_pre), "H0".. (heads), or None.
        method: "activation" or "attribution".
        ci_low / ci_high: with ``ci=``, the 95% bootstrap interval of each value over prompts (float32 CPU,
            the shape of ``values``; percentile intervals, see :func:`mechscope.analysis.bootstrap_ci`);
            else None.
        n_boot: bootstrap resamples behind ci_low / ci_high (0 without).
    """

    values: Tensor
    kind: str
    metric: str
    row_labels: list[str]
    col_labels: list[str] | None
    method: str
    ci_low: Tensor | None = None
    ci_high: Tensor | None = None
    n_boot: int = 0


def _pair(model, clean_tokens, corrupt_tokens) -> tuple[Tensor, Tensor]:
    clean = model._tokens(clean_tokens, None)
    corrupt = model._tokens(corrupt_tokens, None)
    if clean.shape != corrupt.shape:
        raise ShapeError(
            f"clean tokens {tuple(clean.shape)} and corrupted tokens {tuple(corrupt.shape)} differ in shape; "
            "patching matches activations position by position, so use the same number of prompts of equal "
            "token length (check with model.to_str_tokens)."
        )
    return clean, corrupt


def _check_kind(kind: str) -> str:
    if kind not in PATCH_KINDS:
        raise InputError(f"unknown patching kind {kind!r}; use one of {list(PATCH_KINDS)}.")
    return PATCH_KINDS[kind]


def _labels(model, kind: str, clean: Tensor) -> tuple[list[str], list[str] | None]:
    rows = [f"L{L}" for L in range(model.cfg.n_layers)]
    if kind == "heads":
        return rows, [f"H{h}" for h in range(model.cfg.n_heads)]
    if kind == "resid_pre":
        if model.tokenizer is not None:
            toks = model.to_str_tokens(clean[0])
        else:
            toks = [str(int(t)) for t in clean[0]]
        return rows, [f"{t}_{i}" for i, t in enumerate(toks)]
    return rows, None


def _shape(model, kind: str, n_pos: int) -> tuple[int, ...]:
    if kind == "resid_pre":
        return (model.cfg.n_layers, n_pos)
    if kind == "heads":
        return (model.cfg.n_layers, model.cfg.n_heads)
    return (model.cfg.n_layers,)


def _logits_to_keep(metric) -> int:
    """How many trailing positions of logits the metric needs (0 = all)."""
    pos = getattr(metric, "position", None)
    return -pos if isinstance(pos, int) and pos < 0 else 0


def _metric_name(metric) -> str:
    return getattr(metric, "name", None) or getattr(metric, "__name__", None) or "metric"


def _shared_prefix(clean: Tensor, corrupt: Tensor, keep: int) -> int:
    """Number of leading positions where every clean and corrupted prompt agree (0 disables reuse).

    Those positions are identical in every patched run (attention is causal), so they are computed
    once. Reuse needs the metric's logits to lie after the prefix (``keep`` trailing positions).
    """
    differs = (clean != corrupt).any(0).nonzero()
    if len(differs) == 0 or keep == 0:
        return 0
    start = int(differs[0])
    return start if keep <= clean.shape[1] - start else 0


def _prefix_cache(model, tokens: Tensor):
    """The model's own key/value cache of ``tokens`` (the shared prefix), or None if it keeps none."""
    with torch.no_grad():
        out = model.hf(tokens, use_cache=True, logits_to_keep=1)
    past = getattr(out, "past_key_values", None)
    return past if hasattr(past, "batch_repeat_interleave") else None


def _n_boot(ci: bool | int) -> int:
    """Resamples asked for by ``ci=``: False -> 0, True -> 1000, an int >= 10 -> that many."""
    if ci is False:
        return 0
    if ci is True:
        return 1000
    if isinstance(ci, int) and ci >= 10:
        return ci
    raise InputError(f"ci must be True (1000 bootstrap resamples), False, or a number of resamples >= 10; got {ci!r}.")


def _check_per_prompt(metric) -> None:
    if getattr(metric, "clean_values", None) is None or not hasattr(metric, "per_prompt"):
        raise InputError(
            "ci= needs per-prompt metric values, which a Metric from make_metric carries; got "
            f"{_metric_name(metric)!r}. Build the metric with make_metric, or leave ci off.")


def _intervals(metric, per_prompt: Tensor, n_boot: int) -> tuple[Tensor, Tensor]:
    """95% bootstrap intervals over prompts of a map whose per-prompt raw values are ``per_prompt`` [n, ...].

    Each resample of prompts recomputes the metric as the metric does: for the normalised logit
    difference, (mean - mean corrupt) / (mean clean - mean corrupt), all means over the resample; for
    "prob" and "kl", the mean.
    """
    extra = (1,) * (per_prompt.dim() - 1)

    def statistic(values, clean, corrupt):
        if metric.name != "logit_diff":
            return values.mean(1)
        base = corrupt.mean(1).reshape(-1, *extra)
        return (values.mean(1) - base) / (clean.mean(1).reshape(-1, *extra) - base)

    ci = bootstrap_ci((per_prompt, metric.clean_values, metric.corrupt_values), statistic=statistic, n_boot=n_boot)
    return torch.as_tensor(ci.low).float(), torch.as_tensor(ci.high).float()


def activation_patching(
    model,
    clean_tokens: Int[Tensor, "batch pos"] | Sequence[str],
    corrupt_tokens: Int[Tensor, "batch pos"] | Sequence[str],
    metric: Callable[[Tensor], Tensor],
    *,
    kind: str,
    batch_size: int | None = None,
    progress: bool = True,
    ci: bool | int = False,
) -> PatchingResult:
    """Patch each clean activation into the corrupted run, one at a time, and measure the metric.

    Every variant (a layer and position, a layer, or a head) runs the corrupted prompts with that one
    clean activation in place (denoising). Three exact savings keep this fast on a CPU:

    - variants are stacked along the batch axis, ``batch_size`` per forward pass, and logits are
      computed only for the trailing positions the metric reads;
    - the leading positions where clean and corrupted prompts agree are the same in every patched run
      (causal attention): they run once, and each pass continues from the model's own key/value cache;
    - a variant whose clean activation equals the corrupted one changes nothing and scores the
      corrupted run's value without a forward pass.

    Args:
        model: a HookedModel.
        clean_tokens / corrupt_tokens: [batch, pos] token ids (or texts) of equal shape.
        metric: ``metric(logits [batch, pos', d_vocab]) -> scalar`` over the batch of prompts, e.g. from
            :func:`make_metric`; its ``position`` attribute (negative index), when present, limits the
            logits computed.
        kind: "resid_pre", "attn_out", "mlp_out" or "heads" (see the module table).
        batch_size: patched variants per forward pass; None fits about ``TOKENS_PER_PASS`` tokens.
        progress: show a tqdm progress bar over forward passes.
        ci: True (1,000 resamples) or a number of resamples: also give each value's 95% bootstrap interval
            over prompts (``ci_low`` / ``ci_high``), from the same forward passes (each patched run's
            per-prompt metric values are kept). Needs a :class:`~mechscope.analysis.metrics.Metric` from
            :func:`make_metric`. Values are the same with and without it.

    Returns:
        PatchingResult with ``method="activation"``.

    Raises:
        ShapeError: clean and corrupted inputs of different shape (use prompts of equal token length).
        InputError: an unknown kind; batch_size < 1; ``ci`` with a metric without per-prompt values, or
            a bad ``ci``.

    References:
        Meng et al. 2022, "Locating and Editing Factual Associations in GPT" (causal tracing); Wang et
        al. 2022 (IOI), section 3; Heimersheim & Nanda 2024, "How to use and interpret activation
        patching" (denoising vs noising).
    """
    from tqdm.auto import tqdm

    template = _check_kind(kind)
    clean, corrupt = _pair(model, clean_tokens, corrupt_tokens)
    if batch_size is not None and batch_size < 1:
        raise InputError(f"batch_size must be >= 1 (variants per forward pass), got {batch_size}.")
    n_boot = _n_boot(ci)
    if n_boot:
        _check_per_prompt(metric)
    n, n_pos = clean.shape
    sites = [template.format(L=L) for L in range(model.cfg.n_layers)]
    keep = _logits_to_keep(metric)
    _, clean_cache = model.run(clean, cache=sites, logits_to_keep=1)
    corrupt_logits, corrupt_cache = model.run(corrupt, cache=sites, logits_to_keep=keep)
    with torch.no_grad():
        corrupt_value = float(metric(corrupt_logits))
    start = _shared_prefix(clean, corrupt, keep)
    past = _prefix_cache(model, corrupt[:, :start]) if start else None
    if past is None:
        start = 0

    shape = _shape(model, kind, n_pos)
    values = torch.full(shape, corrupt_value)
    if n_boot:  # per-prompt raw values of every variant; unpatched variants score the corrupted run's
        with torch.no_grad():
            per_prompt = metric.per_prompt(corrupt_logits).double().cpu().reshape(n, *(1,) * len(shape))
        per_prompt = per_prompt.expand(n, *shape).clone()
    todo = []
    for idx in torch.cartesian_prod(*[torch.arange(s) for s in shape]).reshape(-1, len(shape)).tolist():
        site = sites[idx[0]]
        if kind == "resid_pre":
            if idx[1] < start:
                continue
            sl = (slice(None), idx[1])
        elif kind == "heads":
            sl = (slice(None), slice(start, None), idx[1])
        else:
            sl = (slice(None), slice(start, None))
        if not torch.equal(clean_cache[site][sl], corrupt_cache[site][sl]):
            todo.append(idx)

    suffix = corrupt[:, start:]
    per_pass = batch_size or max(1, TOKENS_PER_PASS // (n * suffix.shape[1]))
    chunks = [todo[i:i + per_pass] for i in range(0, len(todo), per_pass)]
    for chunk in tqdm(chunks, desc=f"patching {kind}", disable=not progress, leave=False):
        k = len(chunk)
        ivs = []
        for j, idx in enumerate(chunk):  # rows are interleaved: prompt i of variant j is row i * k + j
            site = sites[idx[0]]
            sel = {"resid_pre": dict(positions=idx[-1] - start), "heads": dict(heads=idx[-1])}.get(kind, {})
            ivs.append(Patch(site, source=clean_cache[site][:, start:], batch=slice(j, None, k), **sel))
        tokens = suffix.repeat_interleave(k, dim=0)
        if past is None:
            logits, _ = model.run(tokens, interventions=ivs, logits_to_keep=keep)
        else:
            kv = copy.deepcopy(past)
            kv.batch_repeat_interleave(k)
            with torch.no_grad(), model.hooks(interventions=ivs):
                logits = model.hf(tokens, past_key_values=kv, use_cache=True, logits_to_keep=keep).logits
        with torch.no_grad():
            for j, idx in enumerate(chunk):
                values[tuple(idx)] = float(metric(logits[j::k]))
                if n_boot:
                    per_prompt[(slice(None), *idx)] = metric.per_prompt(logits[j::k]).double().cpu()
    rows, cols = _labels(model, kind, clean)
    low, high = _intervals(metric, per_prompt, n_boot) if n_boot else (None, None)
    return PatchingResult(values, kind, _metric_name(metric), rows, cols, "activation", low, high, n_boot)


def attribution_patching(
    model,
    clean_tokens: Int[Tensor, "batch pos"] | Sequence[str],
    corrupt_tokens: Int[Tensor, "batch pos"] | Sequence[str],
    metric: Callable[[Tensor], Tensor],
    *,
    kind: str,
    ci: bool | int = False,
) -> PatchingResult:
    """Linear estimate of activation patching: ``(clean_act - corrupt_act) . d metric / d act``.

    The gradient is taken at the corrupted run, so each value approximates the effect of patching that
    one clean activation into the corrupted run (the same sweep as :func:`activation_patching`),
    summed over the dimensions the patch covers (d_model, or d_head for a head's ``hook_z``; all
    positions except for ``resid_pre``) and over prompts (the metric already averages over them).
    Costs one clean forward, one corrupted forward and one backward pass.

    Args:
        model: a HookedModel.
        clean_tokens / corrupt_tokens: [batch, pos] token ids (or texts) of equal shape.
        metric: differentiable ``metric(logits) -> scalar``, e.g. from :func:`make_metric`.
        kind: "resid_pre", "attn_out", "mlp_out" or "heads".
        ci: True (1,000 resamples) or a number of resamples: also give each value's 95% bootstrap interval
            over prompts (``ci_low`` / ``ci_high``). Prompts do not interact in a forward pass, so each
            prompt's own attribution is its term of the sum; a resample averages those terms and, for
            the normalised logit difference, divides by the resample's own clean - corrupted difference.
            Needs a :class:`~mechscope.analysis.metrics.Metric` from :func:`make_metric`; no extra passes.

    Returns:
        PatchingResult with ``method="attribution"``, same shape and units as activation patching.

    Raises:
        ShapeError: clean and corrupted inputs of different shape (use prompts of equal token length).
        InputError: an unknown kind; a metric that does not return a scalar; ``ci`` with a metric without
            per-prompt values, or a bad ``ci``.

    References:
        Nanda 2023, "Attribution Patching: Activation Patching At Industrial Scale"; Syed et al. 2023,
        "Attribution Patching Outperforms Automated Circuit Discovery", section 2.
    """
    template = _check_kind(kind)
    clean, corrupt = _pair(model, clean_tokens, corrupt_tokens)
    n_boot = _n_boot(ci)
    if n_boot:
        _check_per_prompt(metric)
    n_layers = model.cfg.n_layers
    sites = [template.format(L=L) for L in range(n_layers)]
    keep = _logits_to_keep(metric)
    _, clean_cache = model.run(clean, cache=sites, logits_to_keep=max(keep, 1))
    _, corrupt_cache = model.run(corrupt, cache=sites, backward=metric, logits_to_keep=keep)
    # axes: resid/attn/mlp [batch, pos, d_model]; hook_z [batch, pos, n_heads, d_head]
    reduce = {"resid_pre": (0, 2), "attn_out": (0, 1, 2), "mlp_out": (0, 1, 2), "heads": (0, 1, 3)}[kind]
    rows, prompt_rows = [], []
    with torch.no_grad():
        for site in sites:
            diff = clean_cache[site].float() - corrupt_cache[site].float()
            rows.append((diff * corrupt_cache.grad(site).float()).sum(dim=reduce))
            if n_boot:  # each prompt's term of the sum: the same reduction without the batch axis
                prompt_rows.append((diff * corrupt_cache.grad(site).float()).sum(dim=tuple(d for d in reduce if d)))
    values = torch.stack(rows).cpu()
    row_labels, cols = _labels(model, kind, clean)
    low = high = None
    if n_boot:
        # term_i = d(metric)/d(raw_i) * (raw attribution of prompt i); the metric is a mean of per-prompt
        # raw values (normalised by clean - corrupted for logit_diff), so raw attribution_i = term_i * scale
        n = clean.shape[0]
        scale = n * ((metric.raw_clean - metric.raw_corrupt) if metric.name == "logit_diff" else 1.0)
        per_prompt = torch.stack(prompt_rows, dim=1).double().cpu() * scale  # [n, n_layers, ...]
        if metric.name == "logit_diff":  # a resample's raw values: corrupted + attribution, as activation patching's
            per_prompt = per_prompt + metric.corrupt_values.double().reshape(n, *(1,) * (per_prompt.dim() - 1))
        low, high = _intervals(metric, per_prompt, n_boot)
    return PatchingResult(values, kind, _metric_name(metric), row_labels, cols, "attribution", low, high, n_boot)
