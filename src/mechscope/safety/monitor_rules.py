"""Alarm rules and the records of a runtime monitor (:mod:`mechscope.safety.monitor`): the rule values of a
sequence of per-token probe scores (``ema`` or ``window_max``), and the alarms, monitored generations,
calibrations and drift reports, each JSON-ready.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechscope.core.errors import InputError

#: Alarm rules (see the module docstring).
RULES = ("ema", "window_max")
#: Built-in actions on an alarm; a callable ``fn(alarm) -> "stop" | None`` is accepted too.
ACTIONS = ("record", "flag", "stop")
#: Quantiles of the control scores kept by a calibration.
QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)


class RuleState:
    """The alarm rule, one score at a time (the same code serves generation and calibration)."""

    def __init__(self, rule: str, ema: float, window: int):
        self.rule, self.ema = rule, ema
        self.recent: deque[float] = deque(maxlen=window)
        self.value: float | None = None

    def push(self, s: float) -> float:
        self.recent.append(s)
        if self.rule == "ema":
            self.value = s if self.value is None else self.ema * s + (1 - self.ema) * self.value
        else:
            self.value = sum(self.recent) / len(self.recent)
        return self.value


def rule_values(scores: Float[Tensor, " n"] | Sequence[float], rule: str = "ema", *, ema: float = 0.3,
                window: int = 8) -> Float[Tensor, " n"]:
    """The alarm rule's value at each token of a score sequence, float64 [n] (logit units, as the scores).

    ``ema``: ``v_0 = s_0``, ``v_t = ema * s_t + (1 - ema) * v_{t-1}``. ``window_max``: ``v_t`` = mean of
    ``s[max(0, t - window + 1) : t + 1]``. An item alarms iff ``max(v) > threshold``.

    Raises:
        InputError: unknown rule, ``ema`` outside (0, 1], ``window`` < 1, non-finite scores.
    """
    check_rule(rule, ema, window)
    s = torch.as_tensor(scores, dtype=torch.float64).flatten()
    if not bool(torch.isfinite(s).all()):
        raise InputError("the scores hold NaN or infinite values; score finite activations.")
    state = RuleState(rule, ema, window)
    return torch.tensor([state.push(float(x)) for x in s], dtype=torch.float64)


def check_rule(rule, ema, window) -> None:
    if rule not in RULES:
        raise InputError(f"unknown alarm rule {rule!r}; choose one of {RULES}.")
    if isinstance(ema, bool) or not isinstance(ema, (int, float)) or not 0 < ema <= 1:
        raise InputError(f"ema must lie in (0, 1] (the weight of the newest score; 0.3 is the default), got {ema!r}.")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise InputError(f"window must be an int >= 1 (tokens per rolling window; 8 is the default), got {window!r}.")


@dataclass(frozen=True)
class Alarm:
    """One alarm: the rule's value rose above the threshold at one token.

    Attributes:
        prompt_index: which prompt of the call.
        position: the token's absolute position in prompt + continuation (0-based).
        token_index: its index among the generated tokens (None for a prompt token).
        token_id / token: the token's id and decoded text (None without a tokenizer).
        value: the rule's value there (logit units); threshold: the threshold it exceeded; rule: the rule.
        scores: the raw scores of the window that ends at this token (the last ``window`` considered
            tokens; for ``ema`` the same count, as context).
    """

    prompt_index: int
    position: int
    token_index: int | None
    token_id: int
    token: str | None
    value: float
    threshold: float
    rule: str
    scores: tuple[float, ...]

    def to_dict(self) -> dict:
        """JSON-ready (one line of the alarm log)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


@dataclass(frozen=True)
class MonitoredGeneration:
    """One prompt's monitored generation.

    Attributes:
        prompt_index: which prompt of the call.
        tokens: int64 [prompt_len + n_new], prompt and continuation (cut at the alarm token when stopped).
        prompt_len: number of prompt tokens.
        text: the decoded continuation (special tokens skipped), or None without a tokenizer.
        scores: float64 [prompt_len + n_new], the probe's logit at every token, prompt included.
        values: float64 [n_considered], the rule's value at each token it considered (the generated ones,
            or every token with ``include_prompt``).
        alarms: the alarms, in order.
        stopped: an alarm ended the generation (``on_alarm="stop"`` or a callable that returned "stop").
        flagged: ``on_alarm="flag"`` and an alarm fired.
    """

    prompt_index: int
    tokens: Tensor
    prompt_len: int
    text: str | None
    scores: Tensor
    values: Tensor
    alarms: tuple[Alarm, ...]
    stopped: bool
    flagged: bool

    @property
    def new_tokens(self) -> Int[Tensor, " n_new"]:
        """int64 [n_new], the continuation."""
        return self.tokens[self.prompt_len:]

    def to_dict(self) -> dict:
        """JSON-ready: token ids, scores and values as lists, alarms as dicts."""
        return {"prompt_index": self.prompt_index, "tokens": self.tokens.tolist(), "prompt_len": self.prompt_len,
                "text": self.text, "scores": self.scores.tolist(), "values": self.values.tolist(),
                "alarms": [a.to_dict() for a in self.alarms], "stopped": self.stopped, "flagged": self.flagged}


@dataclass(frozen=True)
class Calibration:
    """A threshold set on control items, and the control scores' quantiles (for drift).

    Attributes:
        fpr: the target item-level false-positive rate; achieved_fpr: the share of control items that alarm.
        threshold: the rule value alarmed above (logit units).
        n_items: control items; rule / ema / window: the rule calibrated for.
        token_quantiles: quantile -> value of every control token's score.
        item_quantiles: quantile -> value of the items' max rule values (what the threshold cuts).
        model_name: the model the control scores came from (None for given scores).
    """

    fpr: float
    achieved_fpr: float
    threshold: float
    n_items: int
    rule: str
    ema: float
    window: int
    token_quantiles: dict[float, float]
    item_quantiles: dict[float, float]
    model_name: str | None = None

    def to_dict(self) -> dict:
        """JSON-ready (quantile keys as strings)."""
        out = dict(self.__dict__)
        for k in ("token_quantiles", "item_quantiles"):
            out[k] = {str(q): v for q, v in out[k].items()}
        return out

    @classmethod
    def from_dict(cls, d: dict) -> Calibration:
        """The inverse of :meth:`to_dict`.

        Raises:
            InputError: missing or unknown keys, or values of the wrong type (names them).
        """
        names = set(cls.__dataclass_fields__)
        if not isinstance(d, dict) or not (names - {"model_name"}) <= set(d) <= names:
            got = sorted(d) if isinstance(d, dict) else type(d).__name__
            raise InputError(f"a calibration needs the keys {sorted(names)}, got {got}; write it with "
                             "Calibration.to_dict (or `mechscope monitor calibrate`).")
        try:
            q = {k: {float(a): float(b) for a, b in d[k].items()} for k in ("token_quantiles", "item_quantiles")}
            out = cls(float(d["fpr"]), float(d["achieved_fpr"]), float(d["threshold"]), int(d["n_items"]), str(d["rule"]),
                      float(d["ema"]), int(d["window"]), q["token_quantiles"], q["item_quantiles"], d.get("model_name"))
        except (TypeError, ValueError, AttributeError) as e:
            raise InputError(f"a calibration holds a value of the wrong type ({e}); write it with Calibration.to_dict.") from None
        check_rule(out.rule, out.ema, out.window)
        if not (0 < out.fpr < 1 and math.isfinite(out.threshold)):
            raise InputError(f"a calibration needs fpr in (0, 1) and a finite threshold, got {out.fpr}, {out.threshold}.")
        return out


@dataclass(frozen=True)
class Drift:
    """Control scores of one calibration against the next (e.g. before and after a fine-tuning checkpoint).

    Attributes:
        before / after: the two calibrations; ``after.threshold`` is the monitor's threshold now.
    """

    before: Calibration
    after: Calibration

    @property
    def threshold_shift(self) -> float:
        """``after.threshold - before.threshold`` (logit units)."""
        return self.after.threshold - self.before.threshold

    def quantile_shift(self, which: str = "token") -> dict[float, float]:
        """Per quantile, after minus before, of the ``"token"`` scores or the ``"item"`` max rule values."""
        a, b = getattr(self.after, f"{which}_quantiles"), getattr(self.before, f"{which}_quantiles")
        return {q: a[q] - b[q] for q in a}

    def to_dict(self) -> dict:
        """JSON-ready."""
        return {"before": self.before.to_dict(), "after": self.after.to_dict(), "threshold_shift": self.threshold_shift,
                "token_quantile_shift": {str(q): v for q, v in self.quantile_shift("token").items()},
                "item_quantile_shift": {str(q): v for q, v in self.quantile_shift("item").items()}}


__all__ = ["ACTIONS", "QUANTILES", "RULES", "Alarm", "Calibration", "Drift", "MonitoredGeneration", "RuleState",
           "check_rule", "rule_values"]
