"""The probe and monitor page of ``mechscope serve`` (``/probe``): per-token scores of linear probes on a typed
prompt, and a generation watched by a runtime monitor.

Probes are folders written by :meth:`mechscope.safety.probe.Probe.save`, loaded against the served model by
:func:`load_probes` (``mechscope serve --probe DIR``, repeatable). Each is shown with a threshold, in logit
units, taken from the first of:

1. ``--probe-threshold`` (one value for every probe);
2. the probe's ``cfg.json`` ``info``: ``info["threshold"]``, or ``info["calibration"]["threshold"]`` (a
   :class:`~mechscope.safety.monitor_rules.Calibration` stored with the probe), e.g. set at 1% FPR on a
   control set;
3. 0, the probe's own decision boundary (uncalibrated: say so before reading a score as an alarm).

API (JSON; errors as :mod:`mechscope.app.web`):

- ``GET /api/probes`` -> ``{"probes": [{name, site, method, aggregation, model_name, d_model, threshold,
  threshold_from}]}``;
- ``POST /api/probe`` ``{text, chat=false, probes=null}`` -> ``{text, tokens [pos] (spans of text), labels
  [pos], n_tokens, aggregate_from, probes: [{name, site, ..., threshold, threshold_from, scores [pos],
  aggregate, above}]}``: one forward caches every probe's site; ``scores`` are the probe's logits at every
  position; ``aggregate`` is :meth:`Probe.aggregate` over positions ``aggregate_from..`` (a leading BOS is left
  out, as the monitor's calibration does); ``above``: aggregate > threshold;
- ``POST /api/monitor`` ``{prompt, chat=false, probe=null, max_new_tokens=40 (<= 200), rule="ema", ema=0.3,
  window=8, threshold=null}`` -> the probe's fields as in ``/api/probes`` and ``{probe, rule, ema, window,
  threshold, threshold_from, prompt_len, token_ids [pos], tokens [pos], labels [pos], text (the continuation),
  scores [pos], values [n_considered], values_from, alarms [{position, token_index, token, value}], flagged}``
  from :meth:`Monitor.generate` (greedy, ``on_alarm="flag"``; its tokens are those of plain generation; the
  rule sees the generated tokens only, so ``values_from`` is ``prompt_len``).

``chat=true`` renders the text as one user message through the tokenizer's chat template (with the
assistant's generation prompt for the monitor) and tokenizes it without adding special tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, Field

from mechscope.core.errors import InputError
from mechscope.data.labelled_render import user_prompt_ids

MAX_PROBE_TOKENS = 512  # a typed prompt, chat template included
MAX_MONITOR_TOKENS = 200  # new tokens per monitored generation
NO_PROBES = ("this server was started without probes; start it with `mechscope serve --probe DIR` (a folder "
             "written by Probe.save; repeat --probe for more).")


@dataclass(frozen=True)
class ServedProbe:
    """A probe as the app shows it.

    Attributes:
        name: its display name (the folder's name, or as many trailing path parts as make it unique).
        probe: the :class:`~mechscope.safety.probe.Probe`.
        threshold: logit units; see the module docstring for where it comes from.
        threshold_from: where the threshold came from, in words.
    """

    name: str
    probe: Any
    threshold: float
    threshold_from: str

    def describe(self) -> dict:
        p = self.probe
        return {"name": self.name, "site": p.site, "method": p.method, "aggregation": p.aggregation,
                "model_name": p.model_name, "d_model": p.d_model, "threshold": self.threshold,
                "threshold_from": self.threshold_from}


def stored_threshold(probe) -> float | None:
    """The threshold a probe's ``info`` carries (``threshold``, or ``calibration.threshold``), or None."""
    info = probe.info or {}
    cal = info.get("calibration")
    for v in (info.get("threshold"), cal.get("threshold") if isinstance(cal, dict) else None):
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            return float(v)
    return None


def probe_names(folders: Sequence[Path]) -> list[str]:
    """Display names: each folder's name, or its last k path parts for the smallest k that makes all unique.

    Raises:
        InputError: the same folder given twice.
    """
    paths = [Path(f).resolve() for f in folders]
    if len(set(paths)) < len(paths):
        twice = sorted({str(p) for p in paths if paths.count(p) > 1})
        raise InputError(f"--probe {twice[0]} is given more than once; give each probe folder once.")
    for k in range(1, max((len(p.parts) for p in paths), default=1) + 1):
        names = ["/".join(p.parts[-k:]) for p in paths]
        if len(set(names)) == len(names):
            return names
    return [str(p) for p in paths]


def check_probe_folders(folders: Sequence[Path], *, threshold: float | None = None) -> None:
    """Read every probe folder without a model (a typo costs no model load), and check ``--probe-threshold``.

    Raises:
        InputError / CorruptFileError: as :meth:`Probe.load`; the same folder twice; a non-finite threshold, or
            one given without a probe.
    """
    from mechscope.safety.probe import Probe

    _check_threshold(threshold)
    if threshold is not None and not folders:
        raise InputError("--probe-threshold is given but no --probe; pass the probe folder with --probe DIR.")
    probe_names(folders)
    for f in folders:
        Probe.load(f)


def _check_threshold(threshold: float | None) -> None:
    if threshold is not None and not math.isfinite(threshold):
        raise InputError(f"--probe-threshold must be a finite number (logit units), got {threshold}.")


def load_probes(folders: Sequence[Path], model, *, threshold: float | None = None) -> list[ServedProbe]:
    """Load probe folders for ``model``: each must be fitted on this model, at a site it has, of its width.

    Args:
        folders: folders written by :meth:`Probe.save`.
        model: the served HookedModel.
        threshold: one threshold (logit units) for every probe, overriding what the probes carry.

    Raises:
        InputError: a folder without a probe; a probe of another model or width (names both and the fix); a
            non-finite threshold.
        HookNameError / SiteUnavailableError: the model has no such site.
        CorruptFileError: as :meth:`Probe.load`.
    """
    from mechscope.safety.monitor import Monitor
    from mechscope.safety.probe import Probe

    _check_threshold(threshold)
    out = []
    for name, folder in zip(probe_names(folders), folders):
        probe = Probe.load(folder, model=model)
        Monitor(probe, threshold=0.0).check_model(model)  # the site exists, one vector per position, its width
        stored = stored_threshold(probe)
        if threshold is not None:
            out.append(ServedProbe(name, probe, float(threshold), "--probe-threshold"))
        elif stored is not None:
            out.append(ServedProbe(name, probe, stored, f"{Path(folder) / 'cfg.json'} (info)"))
        else:
            out.append(ServedProbe(name, probe, 0.0, "the probe's decision boundary (logit 0; not calibrated)"))
    return out


# -- requests ------------------------------------------------------------------------------------------
class ProbeBody(BaseModel):
    """POST /api/probe: a text, whether to render it as a chat user message, the probes to score (None: all)."""

    text: str = Field(..., min_length=1, max_length=8000)
    chat: bool = Field(False, strict=True)
    probes: list[str] | None = Field(None, min_length=1, max_length=32)


class MonitorBody(BaseModel):
    """POST /api/monitor: a prompt, the probe (None: the first), the rule and threshold (None: the probe's)."""

    prompt: str = Field(..., min_length=1, max_length=8000)
    chat: bool = Field(False, strict=True)
    probe: str | None = Field(None, min_length=1, max_length=500)
    max_new_tokens: int = Field(40, ge=1, le=MAX_MONITOR_TOKENS, strict=True)
    rule: Literal["ema", "window_max"] = "ema"
    ema: float = Field(0.3, gt=0, le=1, allow_inf_nan=False, strict=True)
    window: int = Field(8, ge=1, le=256, strict=True)
    threshold: float | None = Field(None, ge=-1e6, le=1e6, allow_inf_nan=False, strict=True)


# -- computing -----------------------------------------------------------------------------------------
def prompt_tokens(model, text: str, *, chat: bool, generation_prompt: bool, max_tokens: int) -> torch.Tensor:
    """[1, pos] token ids of ``text`` as the tokenizer's default (``model.to_tokens``) or, with ``chat``, as one
    user message through its chat template.

    Raises:
        InputError: blank text; a tokenizer without a chat template (with ``chat``); more than ``max_tokens``.
    """
    if not text.strip():
        raise InputError("the prompt is blank; type some text.")
    if chat:
        tok = model._need_tokenizer()
        if not getattr(tok, "chat_template", None):
            raise InputError(f"{model.cfg.name}'s tokenizer has no chat template; untick 'chat' to score the text "
                             "as it is, or serve a chat model.")
        tokens = user_prompt_ids(model, text, generation_prompt=generation_prompt)
    else:
        tokens = model.to_tokens(text)
    if tokens.shape[1] == 0:
        raise InputError("the prompt has no tokens for this tokenizer; type some text.")
    if tokens.shape[1] > max_tokens:
        raise InputError(f"the prompt has {tokens.shape[1]} tokens; this page takes at most {max_tokens}.")
    return tokens


def _spans(model, ids: list[int]) -> tuple[str, list[str], list[str]]:
    from mechscope.data.detokenize import decode_spans, token_labels

    (decoded,) = decode_spans(model.tokenizer, [ids])
    labels = token_labels(model.tokenizer, ids)
    return decoded.text, decoded.pieces, [labels[i] for i in ids]


def _pick(probes: list[ServedProbe], names: Sequence[str] | None) -> list[ServedProbe]:
    if not probes:
        raise InputError(NO_PROBES)
    if names is None:
        return list(probes)
    by_name = {p.name: p for p in probes}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise InputError(f"no probe named {unknown[0]!r}; this server has {sorted(by_name)}.")
    return [by_name[n] for n in dict.fromkeys(names)]


def score_prompt(model, probes: list[ServedProbe], text: str, *, names: Sequence[str] | None = None,
                 chat: bool = False, max_tokens: int = MAX_PROBE_TOKENS) -> dict:
    """Every chosen probe's per-token scores on ``text``, from one forward that caches each probe's site.

    Returns:
        JSON-ready: see ``POST /api/probe`` in the module docstring (scores: float64 logits, unrounded).

    Raises:
        InputError: no probes; an unknown name; a bad prompt (:func:`prompt_tokens`); NaN activations.
    """
    from mechscope.safety.monitor import Monitor

    chosen = _pick(probes, names)
    tokens = prompt_tokens(model, text, chat=chat, generation_prompt=False, max_tokens=max_tokens)
    sites = [Monitor(p.probe, threshold=0.0).check_model(model) for p in chosen]
    with torch.no_grad():
        _, cache = model.run(tokens, cache=sorted(set(sites)), logits_to_keep=1)
    ids = tokens[0].tolist()
    bos = getattr(model.tokenizer, "bos_token_id", None)
    start = 1 if bos is not None and len(ids) > 1 and ids[0] == bos else 0
    decoded, pieces, labels = _spans(model, ids)
    out: dict[str, Any] = {"text": decoded, "tokens": pieces, "labels": labels, "n_tokens": len(ids),
                           "aggregate_from": start, "chat": chat, "probes": []}
    for p, site in zip(chosen, sites):
        scores = p.probe.score_tokens(cache[site][0])
        agg = p.probe.aggregate(scores[start:])
        out["probes"].append({**p.describe(), "scores": scores.tolist(), "aggregate": agg,
                              "above": agg > p.threshold})
    return out


def monitor_prompt(model, probes: list[ServedProbe], body: MonitorBody) -> dict:
    """A greedy generation under a :class:`~mechscope.safety.monitor.Monitor` of one probe (``on_alarm="flag"``).

    Returns:
        JSON-ready: see ``POST /api/monitor`` in the module docstring.

    Raises:
        InputError: no probes; an unknown name; a bad prompt; as :meth:`Monitor.generate`.
    """
    from mechscope.safety.monitor import Monitor

    (served,) = _pick(probes, None if body.probe is None else [body.probe])[:1]
    threshold = served.threshold if body.threshold is None else float(body.threshold)
    tokens = prompt_tokens(model, body.prompt, chat=body.chat, generation_prompt=True, max_tokens=MAX_PROBE_TOKENS)
    mon = Monitor(served.probe, threshold=threshold, rule=body.rule, ema=body.ema, window=body.window, on_alarm="flag")
    (r,) = mon.generate(model, tokens, max_new_tokens=body.max_new_tokens)
    ids = r.tokens.tolist()
    _, pieces, labels = _spans(model, ids)
    return {**served.describe(), "probe": served.name, "rule": body.rule, "ema": body.ema, "window": body.window,
            "threshold": threshold,
            "threshold_from": served.threshold_from if body.threshold is None else "this request",
            "prompt_len": r.prompt_len, "tokens": pieces, "labels": labels, "token_ids": ids, "text": r.text,
            "scores": r.scores.tolist(), "values": r.values.tolist(), "values_from": len(ids) - r.values.numel(),
            "alarms": [{"position": a.position, "token_index": a.token_index, "token": labels[a.position],
                        "value": a.value} for a in r.alarms],
            "flagged": r.flagged}


def add_probe_routes(app, state) -> None:
    """Add ``GET /api/probes``, ``POST /api/probe`` and ``POST /api/monitor`` to ``app`` (the page itself is one of
    :data:`mechscope.app.server.PAGES`). The model is used under ``state.lock``."""
    from fastapi import HTTPException

    def need_model():
        if state.model is None:
            raise HTTPException(status_code=404, detail="this server was started without a model.")
        return state.model

    def need_probes(names: Sequence[str | None]) -> None:
        if not state.probes:
            raise HTTPException(status_code=404, detail=NO_PROBES)
        known = {p.name for p in state.probes}
        for n in names:
            if n is not None and n not in known:
                raise HTTPException(status_code=404, detail=f"no probe named {n!r}; this server has {sorted(known)}.")

    @app.get("/api/probes")
    def probes():
        """The loaded probes, each with its site, method, aggregation and threshold (and where that came from)."""
        return {"probes": [p.describe() for p in state.probes], "help": None if state.probes else NO_PROBES,
                "max_new_tokens": MAX_MONITOR_TOKENS}

    @app.post("/api/probe")
    def probe(body: ProbeBody):
        """Per-token scores of the probes on a text (one forward; see the module docstring)."""
        model = need_model()
        need_probes(body.probes or [])
        with state.lock:
            return score_prompt(model, state.probes, body.text, names=body.probes, chat=body.chat)

    @app.post("/api/monitor")
    def monitor(body: MonitorBody):
        """A generation watched by one probe's monitor: per-token scores, rule values, alarms, flagged."""
        model = need_model()
        need_probes([body.probe])
        with state.lock:
            return monitor_prompt(model, state.probes, body)


__all__ = ["MAX_MONITOR_TOKENS", "MAX_PROBE_TOKENS", "NO_PROBES", "MonitorBody", "ProbeBody", "ServedProbe",
           "add_probe_routes", "check_probe_folders", "load_probes", "monitor_prompt", "probe_names", "score_prompt",
           "stored_threshold"]
