"""A runtime monitor: a linear probe or SAE latents read at every generated token, an alarm rule, and actions.

While :func:`mechscope.features.generation.generate` runs, a hook reads the probe's site (it never changes
the value, so the tokens are exactly those of plain generation) and scores each new position with
:meth:`Probe.score_tokens` (or :meth:`~mechscope.safety.latent_scorer.LatentScorer.score_tokens`: the sum or max
of chosen latents of a sparse dictionary at its input site, in its activation units). An alarm rule turns the
sequence of scores into one value per token:

- ``ema``: the exponential moving average ``v_0 = s_0``, ``v_t = a s_t + (1 - a) v_{t-1}`` (``a = ema``);
- ``window_max``: the mean of the last ``window`` scores (fewer at the start), so that the item's score
  is the max over rolling windows.

An alarm fires when the value rises above the threshold (strictly; "positive iff score > threshold", as
:mod:`mechscope.safety.metrics`): one alarm per excursion, at the token where the value crosses. By default
the rule sees only generated tokens (the prompt's tokens are scored, in :attr:`MonitoredGeneration.scores`,
but do not alarm); ``include_prompt=True`` runs it from the first prompt token.

The threshold is calibrated on a control set of ordinary text to an item-level false-positive rate: an item
alarms iff the max of its rule values is above the threshold, so at most ``fpr`` of the control items do.
Probes drift as the model changes: :meth:`Monitor.recalibrate` on every new checkpoint reports the shift.

Cost: the probe is one dot product per token (a LatentScorer: one dictionary encode); with the KV cache the
last generated token needs one extra forward, stopped right after the probe's layer. Prompts are generated one at
a time, or ``batch_size`` at a time (left-padded, with the KV cache; :mod:`mechscope.safety.monitor_batch`), with
the same tokens and records either way.

References:
    Goldowsky-Dill et al. 2025, "Detecting Strategic Deception Using Linear Probes" (per-token probe scores,
    control-set threshold at 1% FPR); Bailey et al. 2024, "Obfuscated Activations Bypass LLM Latent-Space
    Defenses" (monitors can be evaded; recalibrate at every checkpoint).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from mechscope.core.errors import InputError
from mechscope.data.labelled import LabelledDataset
from mechscope.data.labelled_render import RenderedExample, render
from mechscope.features.generation import generate as _generate
from mechscope.safety.activations import collect_features
from mechscope.safety.latent_scorer import LatentScorer
from mechscope.safety.metrics import check_fpr, threshold_at_fpr
from mechscope.safety.monitor_rules import (
    ACTIONS,
    QUANTILES,
    RULES,
    Alarm,
    Calibration,
    Drift,
    MonitoredGeneration,
    RuleState,
    check_rule,
    rule_values,
)
from mechscope.safety.probes import Probe


class _Halt(Exception):
    """Raised from the probe's hook to end a forward (a stop, or the last token's scoring pass)."""


class _Watch:
    """One prompt's generation under the monitor: the hooks and what they saw."""

    def __init__(self, monitor: Monitor, model, index: int, n_prompt: int):
        self.m, self.model, self.index, self.n_prompt = monitor, model, index, n_prompt
        self.ids: list[int] = []
        self.offset = 0
        self.scores: list[float] = []
        self.considered: list[float] = []
        self.values: list[float] = []
        self.alarms: list[Alarm] = []
        self.state = RuleState(monitor.rule, monitor.ema, monitor.window)
        self.above = False
        self.stopped = self.flagged = self.halt_after_site = False
        self.past = None

    def record(self) -> MonitoredGeneration:
        """What this prompt's generation saw, as its record."""
        tok = getattr(self.model, "tokenizer", None)
        text = tok.decode(self.ids[self.n_prompt:], skip_special_tokens=True) if tok is not None else None
        return MonitoredGeneration(self.index, torch.tensor(self.ids, dtype=torch.long), self.n_prompt, text,
                                   torch.tensor(self.scores, dtype=torch.float64),
                                   torch.tensor(self.values, dtype=torch.float64), tuple(self.alarms), self.stopped,
                                   self.flagged)

    def pre(self, module, args, kwargs):  # on model.hf: which tokens this forward reads, from which position
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            raise InputError("the monitor needs input_ids in every forward (it reads the tokens it scores).")
        past = kwargs.get("past_key_values")
        self.offset = int(past.get_seq_length()) if past is not None else 0
        self.ids[self.offset:] = ids[0].tolist()

    def post(self, module, args, kwargs, out):  # keeps the KV cache for the last token's scoring pass
        self.past = getattr(out, "past_key_values", None)

    def site(self, value: Tensor) -> None:  # value [1, pos, d]; returns None: the value is never changed
        first = len(self.scores) - self.offset  # this forward's index of the first unscored position
        acts = value[0, first:]
        if not bool(torch.isfinite(acts).all()):
            p = len(self.scores) + int((~torch.isfinite(acts)).any(-1).nonzero()[0, 0])
            raise InputError(f"the model produced NaN or infinite activations at {self.m.probe.site}, position {p} of "
                             f"prompt {self.index}; the probe cannot score them. Load the model in float32 "
                             "(fp16 overflows) or check the prompt.")
        start = len(self.scores)
        self.scores.extend(self.m.probe.score_tokens(acts).tolist())
        for p in range(start, len(self.scores)):
            if (self.m.include_prompt or p >= self.n_prompt) and not self.stopped:
                self._step(p, self.scores[p])
        if self.stopped or self.halt_after_site:
            raise _Halt

    def _step(self, p: int, s: float) -> None:
        m = self.m
        self.considered.append(s)
        v = self.state.push(s)
        self.values.append(v)
        above = v > m.threshold
        if above and not self.above:
            tok = getattr(self.model, "tokenizer", None)
            alarm = Alarm(self.index, p, p - self.n_prompt if p >= self.n_prompt else None, self.ids[p],
                          tok.decode([self.ids[p]]) if tok is not None else None, v, m.threshold, m.rule,
                          tuple(self.considered[-m.window:]))
            self.alarms.append(alarm)
            m._log(alarm)
            if m.on_alarm == "flag":
                self.flagged = True
            elif m.on_alarm == "stop" or (callable(m.on_alarm) and m.on_alarm(alarm) == "stop"):
                self.stopped = True
        self.above = above


def _prompt_ids(model, prompt) -> Tensor:
    if isinstance(prompt, Tensor):
        t = prompt.reshape(1, -1) if prompt.dim() == 1 else prompt
        if t.dim() != 2 or t.shape[0] != 1:
            raise InputError(f"a prompt tensor must be [pos] or [1, pos], got {tuple(prompt.shape)}.")
        t = model._tokens(t, None)
    elif isinstance(prompt, str):
        t = model.to_tokens(prompt)
    else:
        raise InputError(f"a prompt must be a string or token ids, got {type(prompt).__name__}.")
    if t.shape[1] == 0:
        raise InputError(f"the prompt {prompt!r:.40} has no tokens for this tokenizer; give some text.")
    return t


class Monitor:
    """A probe or SAE latents watching generation: per-token scores, an alarm rule, a threshold, actions and a log.

    Args:
        probe: a :class:`Probe` with ``site`` set (one vector per position, e.g. ``blocks.15.hook_resid_post``),
            or a :class:`~mechscope.safety.latent_scorer.LatentScorer` (chosen latents of a sparse dictionary).
        threshold: the rule value alarmed above (the scorer's units: logits for a probe, the dictionary's
            activation units for latents); None until :meth:`calibrate` sets it.
        fpr: the default target item-level false-positive rate of :meth:`calibrate`, in (0, 1).
        rule: ``"ema"`` or ``"window_max"`` (module docstring); ema: the newest score's weight in (0, 1];
            window: tokens per rolling window (``window_max``), and scores kept in each alarm's record.
        on_alarm: ``"record"`` (keep every alarm), ``"flag"`` (also mark the generation), ``"stop"`` (end that
            generation at the alarm token), or ``fn(alarm) -> "stop" | None``.
        include_prompt: let the prompt's tokens alarm too (default: only generated tokens).
        log: a ``.jsonl`` path; each alarm appends one JSON line (one ``write`` on an ``O_APPEND`` file, so
            lines from concurrent writers do not interleave); None: no log.

    Raises:
        InputError: neither a Probe nor a LatentScorer; a probe without a site; an unknown rule or action; ema,
            window, fpr or threshold out of range; a log whose folder does not exist.
    """

    def __init__(self, probe: Probe | LatentScorer, *, threshold: float | None = None, fpr: float | None = None,
                 rule: str = "ema", ema: float = 0.3, window: int = 8, on_alarm: str | Callable[[Alarm], Any] = "record",
                 include_prompt: bool = False, log: str | os.PathLike | None = None):
        if not isinstance(probe, (Probe, LatentScorer)):
            raise InputError(f"Monitor needs a Probe (fit_probe or Probe.load) or a LatentScorer(dictionary, latents),"
                             f" got {type(probe).__name__}.")
        if probe.site is None:
            raise InputError("the probe has no site, so the monitor does not know where to read it; use "
                             "dataclasses.replace(probe, site='blocks.L.hook_resid_post') with its site.")
        check_rule(rule, ema, window)
        if not (callable(on_alarm) or on_alarm in ACTIONS):
            raise InputError(f"on_alarm must be one of {ACTIONS} or a callable fn(alarm) -> 'stop' | None, "
                             f"got {on_alarm!r}.")
        if threshold is not None and not math.isfinite(threshold):
            raise InputError(f"threshold must be a finite number (the scorer's units), got {threshold!r}.")
        if log is not None and not Path(log).parent.is_dir():
            raise InputError(f"the alarm log's folder {Path(log).parent} does not exist; create it or pick another path.")
        self.probe, self.rule, self.ema, self.window = probe, rule, float(ema), window
        self.threshold = None if threshold is None else float(threshold)
        self.fpr = None if fpr is None else check_fpr(fpr)
        self.on_alarm, self.include_prompt = on_alarm, include_prompt
        self.log = None if log is None else Path(log)
        self.calibration: Calibration | None = None

    # -- attaching -------------------------------------------------------------------------------
    def check_model(self, model) -> str:
        """The scorer's concrete site on ``model``, after checking it exists and has the scorer's width.

        Raises:
            HookNameError / SiteUnavailableError: the model has no such site.
            InputError: the site has not one vector per position, or its width is not the scorer's ``d_model``
                (a probe fitted, or a dictionary trained, for another model or width).
        """
        (name,) = model.resolve([self.probe.site])
        axes = model.hook_names()[name].split()
        if len(axes) != 3 or axes[:2] != ["batch", "pos"]:
            raise InputError(f"{name} has axes {axes}; a monitor needs one vector per position ([batch, pos, d]), "
                             "e.g. blocks.L.hook_resid_post.")
        width = getattr(model.cfg, axes[2])
        if width != self.probe.d_model:
            what, fix = (("the dictionary", "Use a dictionary trained on this model at") if isinstance(
                self.probe, LatentScorer) else ("the probe", "Refit it on this model's activations at"))
            raise InputError(f"{what} reads {self.probe.d_model} features but {name} of {model.cfg.name!r} has "
                             f"{width} ({axes[2]}): it was made for another model or width "
                             f"({self.probe.model_name!r}). {fix} {name}.")
        return name

    def _log(self, alarm: Alarm) -> None:
        if self.log is None:
            return
        line = json.dumps({**alarm.to_dict(), "site": self.probe.site, "ema": self.ema, "window": self.window})
        fd = os.open(self.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            os.write(fd, (line + "\n").encode("utf-8"))
        finally:
            os.close(fd)

    # -- generation ----------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, model, prompts: str | Tensor | Sequence[str | Tensor], *, max_new_tokens: int = 40,
                 temperature: float = 0.0, seed: int = 0, stop_at_eos: bool = True,
                 use_kv_cache: bool = True, batch_size: int = 1) -> list[MonitoredGeneration]:
        """Generate with :func:`~mechscope.features.generation.generate` under the monitor (or in batches).

        The tokens are exactly those of ``generate`` with the same arguments (the hook returns None), cut at
        the alarm token when an alarm stops a generation. Every token is scored, the last one by one extra
        forward (with the KV cache: of that token only) that ends at the probe's layer. Steering is not
        supported here: that extra forward would not be steered.

        With ``batch_size > 1``, :func:`~mechscope.safety.monitor_batch.generate_batched` generates that many
        prompts together (left-padded, attention mask and position ids, KV cache), each row with its own
        scores, rule state, alarms, actions and seeded generator: the same records and log lines as
        ``batch_size=1`` up to float rounding (log lines interleave across rows). A row that ends (EOS, stop)
        stays in the batch, masked, until the batch ends.

        Args:
            model: a HookedModel whose site matches the probe (:meth:`check_model`).
            prompts: a text, token ids ([pos], or [batch, pos]: one prompt per row), or a list of them.
            max_new_tokens, temperature, seed, stop_at_eos, use_kv_cache: as ``generate`` (``seed`` per prompt).
            batch_size: prompts generated together; 1 (the default) runs ``generate`` on each prompt in turn.

        Returns:
            One :class:`MonitoredGeneration` per prompt, in order.

        Raises:
            InputError: no threshold (calibrate first or pass ``threshold=``); the probe does not fit the model;
                NaN or infinite activations (names the site, position and prompt); bad prompts or arguments
                (``batch_size`` not an int >= 1).
        """
        if self.threshold is None:
            raise InputError("the monitor has no threshold: call monitor.calibrate(model, control, fpr) first, or "
                             "pass threshold= to Monitor.")
        site = self.check_model(model)
        if isinstance(prompts, (str, Tensor)):
            prompts = list(prompts) if isinstance(prompts, Tensor) and prompts.dim() == 2 else [prompts]
        if len(prompts) == 0:
            raise InputError("no prompts given.")
        if batch_size != 1 or isinstance(batch_size, bool):
            from mechscope.safety.monitor_batch import generate_batched

            return generate_batched(model, site, [_prompt_ids(model, p) for p in prompts],
                                    lambda i, n: _Watch(self, model, i, n), _Halt, batch_size=batch_size,
                                    max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                                    stop_at_eos=stop_at_eos, use_kv_cache=use_kv_cache)
        return [self._one(model, site, i, _prompt_ids(model, p), max_new_tokens, temperature, seed, stop_at_eos,
                          use_kv_cache) for i, p in enumerate(prompts)]

    def _one(self, model, site, index, ids, max_new_tokens, temperature, seed, stop_at_eos, use_kv_cache):
        w = _Watch(self, model, index, ids.shape[1])
        handles = [model.hf.register_forward_pre_hook(w.pre, with_kwargs=True),
                   model.hf.register_forward_hook(w.post, with_kwargs=True)]
        try:
            with model.hooks(functions={site: w.site}):
                try:
                    gen = _generate(model, ids, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                                    stop_at_eos=stop_at_eos, use_kv_cache=use_kv_cache)
                    seq = gen.tokens.to(model.device)
                except _Halt:
                    seq = None
                n = len(w.scores)
                if seq is not None and n < seq.shape[1]:  # score the tokens no forward has read yet
                    w.halt_after_site = True
                    past = w.past if use_kv_cache else None
                    try:
                        if past is not None and int(past.get_seq_length()) == n:
                            model.hf(input_ids=seq[:, n:], past_key_values=past, use_cache=True)
                        else:
                            model.hf(input_ids=seq, use_cache=False)
                    except _Halt:
                        pass
        finally:
            for h in handles:
                h.remove()
            w.past = None
        return w.record()

    # -- calibration -------------------------------------------------------------------------------
    def control_scores(self, model, controls, *, batch_size: int = 16) -> list[Float[Tensor, " _n_i"]]:
        """Per control item, the probe's float64 scores of its scored tokens (one batched pass, site cached).

        Args:
            controls: a list of texts (every token scored but a leading BOS); a :class:`LabelledDataset`, a
                built-in name or a ``.jsonl`` path (its label-0 items, scored tokens by their ``score_span``);
                or rendered examples (``tokens`` int64 [pos], ``score_mask`` bool [pos]).

        Raises:
            InputError: no control items; NaN activations; the probe does not fit the model.
        """
        site = self.check_model(model)
        examples = self._examples(model, controls)
        feats = collect_features(model, examples, [site], batch_size=batch_size, keep_tokens=True, progress=False)
        return [self.probe.score_tokens(a) for a in feats.tokens[site]]

    def _examples(self, model, controls) -> list:
        if isinstance(controls, (str, os.PathLike)):
            from mechscope.data.labelled_builtins import load_labelled

            controls = load_labelled(controls)
        if isinstance(controls, LabelledDataset):
            negatives = [e for e in controls.examples if e.label == 0]
            if not negatives:
                raise InputError(f"{controls.name!r} has no label-0 items; a control set is ordinary text (label 0).")
            return render(model, LabelledDataset(controls.name, tuple(negatives)))
        items = list(controls)
        if not items:
            raise InputError("no control items; give ordinary texts (a few hundred) or a control dataset.")
        if all(isinstance(c, str) for c in items):
            bos = getattr(model.tokenizer, "bos_token_id", None) if model.tokenizer is not None else None
            out = []
            for text in items:
                ids = model.to_tokens(text)[0].cpu()
                mask = torch.ones_like(ids, dtype=torch.bool)
                if bos is not None and ids.numel() > 1 and int(ids[0]) == bos:
                    mask[0] = False  # BOS's activations are an outlier on many models
                out.append(RenderedExample(text, ids, mask))
            return out
        return items

    def calibrate(self, model, controls, fpr: float | None = None, *, batch_size: int = 16) -> Calibration:
        """Set the threshold so that at most ``fpr`` of the control items alarm under the rule.

        Each control item's scored tokens are run through the rule as if generated; see
        :meth:`calibrate_scores` and :meth:`control_scores` (``controls``).

        Raises:
            InputError: ``fpr`` outside (0, 1) (or none given here nor to Monitor); bad controls; as
                :meth:`control_scores`.
        """
        fpr = self._fpr(fpr)
        cal = self.calibrate_scores(self.control_scores(model, controls, batch_size=batch_size), fpr)
        self.calibration = replace(cal, model_name=model.cfg.name)
        return self.calibration

    def calibrate_scores(self, control_scores: Sequence[Float[Tensor, " _n_i"]], fpr: float | None = None) -> Calibration:
        """Set the threshold from per-item token scores: at most ``fpr`` of the items alarm.

        An item alarms iff the max of its rule values is above the threshold; the threshold is
        :func:`threshold_at_fpr` of those maxima, so the item-level FPR on these items is <= ``fpr``
        (exactly ``floor(fpr n) / n`` without ties). Sets :attr:`threshold` and :attr:`calibration`.

        Args:
            control_scores: one float [n_i] score sequence per control item (logit units), n_i >= 1.

        Raises:
            InputError: ``fpr`` outside (0, 1); no items; an empty or non-finite item.
        """
        fpr = self._fpr(fpr)
        items = [torch.as_tensor(s, dtype=torch.float64).flatten() for s in control_scores]
        if not items or any(s.numel() == 0 for s in items):
            raise InputError("calibration needs control items with at least one scored token each.")
        stats = torch.stack([rule_values(s, self.rule, ema=self.ema, window=self.window).max() for s in items])
        threshold = threshold_at_fpr(stats, fpr)
        tokens = torch.cat(items)
        q = torch.tensor(QUANTILES, dtype=torch.float64)
        self.threshold, self.fpr = threshold, fpr
        self.calibration = Calibration(
            fpr, float((stats > threshold).double().mean()), threshold, len(items), self.rule, self.ema, self.window,
            dict(zip(QUANTILES, torch.quantile(tokens, q).tolist())),
            dict(zip(QUANTILES, torch.quantile(stats, q).tolist())))
        return self.calibration

    def recalibrate(self, model, controls, fpr: float | None = None, *, batch_size: int = 16) -> Drift:
        """Calibrate again on ``model`` (e.g. a new checkpoint) and report the drift of the control scores.

        Returns:
            :class:`Drift`: the previous and the new calibration (control-score quantiles, thresholds);
            the monitor now uses the new threshold. ``fpr`` defaults to the previous calibration's.

        Raises:
            InputError: no previous calibration (call :meth:`calibrate` first); as :meth:`calibrate`.
        """
        before = self.calibration
        if before is None:
            raise InputError("recalibrate compares with a previous calibration; call monitor.calibrate first.")
        after = self.calibrate(model, controls, before.fpr if fpr is None else fpr, batch_size=batch_size)
        return Drift(before, after)

    def _fpr(self, fpr) -> float:
        fpr = self.fpr if fpr is None else fpr
        if fpr is None:
            raise InputError("give fpr (the share of control items allowed to alarm, e.g. 0.01) here or to Monitor.")
        return check_fpr(fpr)

    def __repr__(self) -> str:
        param = f"ema={self.ema}" if self.rule == "ema" else f"window={self.window}"
        return (f"Monitor(site={self.probe.site!r}, rule={self.rule!r}, {param}, threshold={self.threshold}, "
                f"on_alarm={self.on_alarm!r})")


__all__ = ["ACTIONS", "QUANTILES", "RULES", "Alarm", "Calibration", "Drift", "Monitor", "MonitoredGeneration",
           "rule_values"]
