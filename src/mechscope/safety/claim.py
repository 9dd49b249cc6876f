"""The claim record: an interpretability claim with its evidence, as strict JSON (schema :data:`SCHEMA`).

A claim names the behaviour explained; the mechanism proposed (sites, heads, features, directions, edges);
the tests run, each with its effect size and interval, what kind of evidence it is (``causal``: an
intervention such as steering, ablation or patching; ``correlational``: reading the model, e.g. a probe's
AUROC), whether it used held-out data, and its controls (random directions, shuffled labels, random
circuits) with their own numbers; the data and model it was measured on, with fingerprints; and what was
*not* tested. :mod:`mechscope.safety.audit` grades claims on a published rubric;
:mod:`mechscope.safety.claims_from` makes them from probe runs, causal checks, monitors, steering and circuits.

Files (:mod:`mechscope.safety.claim_io`) hold one claim object, a list of them, or ``{"claims": [...]}``.
Reading is strict: an unknown key, a missing field, a NaN, an interval whose low end exceeds its high end
raise :class:`~mechscope.core.errors.InputError` naming the file, the claim, the field and the fix. JSON only,
never pickle.

References:
    SAFETY.md, "Claims and their evidence"; Bolukbasi et al. 2021, "An Interpretability Illusion for BERT";
    Makelov et al. 2023, "Is This the Subspace You Are Looking For? An Interpretability Illusion for
    Subspace Activation Patching".
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from mechscope.core.errors import InputError

#: The schema tag of one claim object.
SCHEMA = "mechscope.claim/1"
#: Kinds of evidence a test gives.
KINDS = ("causal", "correlational")
#: Interventions a test may make; ``none`` (reading only) is the correlational one.
INTERVENTIONS = ("none", "steer", "ablate", "patch")
ALTERNATIVES = ("two-sided", "greater", "less")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class _Bad(Exception):
    """A field that fails validation: (field path, problem and fix). Turned into InputError with the context."""

    def __init__(self, path: str, message: str):
        super().__init__(path, message)
        self.path, self.message = path, message


class FieldError(InputError):
    """An invalid field of a claim record; ``field`` is its path (e.g. ``tests[1].low``), ``problem`` the rest."""

    def __init__(self, owner: str, field: str, problem: str):
        super().__init__(f"{owner}.{field} {problem}." if field else f"{owner} {problem}.")
        self.field, self.problem = field, problem


def _num(value, path: str, *, optional: bool = False) -> float | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Bad(path, f"must be a number{' or null' if optional else ''}, got {value!r}; write a JSON number "
                         "such as 0.42")
    if not math.isfinite(value):
        raise _Bad(path, f"is {value}, which is not a finite number; record a finite value (drop the test if it "
                         "was undefined, and say why under not_tested)")
    return float(value)


def _count(value, path: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _Bad(path, f"must be a positive whole number (examples, prompts or pairs) or null, got {value!r}")
    return value


def _text(value, path: str, *, optional: bool = False, empty: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or (not empty and not value.strip()):
        raise _Bad(path, f"must be a non-empty string{' or null' if optional else ''}, got {value!r}")
    return value


def _texts(value, path: str) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)):
        raise _Bad(path, f"must be a list of strings, got {type(value).__name__} {value!r}")
    return tuple(_text(v, f"{path}[{i}]") for i, v in enumerate(value))


def _interval(low, high) -> tuple[float | None, float | None]:
    low, high = _num(low, "low", optional=True), _num(high, "high", optional=True)
    if (low is None) != (high is None):
        raise _Bad("low", f"and high must both be numbers or both be null (got low={low}, high={high}); give "
                          "both ends of the interval or neither")
    if low is not None and low > high:
        raise _Bad("low", f"is {low}, above high {high}; an interval is [low, high] with low <= high (swap them)")
    return low, high


def _bool(value, path: str, *, optional: bool = False) -> bool | None:
    if value is None and optional:
        return None
    if not isinstance(value, bool):
        raise _Bad(path, f"must be true or false{' or null' if optional else ''}, got {value!r}")
    return value


@dataclass(frozen=True)
class Control:
    """A baseline or control beside a test, in the test's units (e.g. random directions, shuffled labels).

    Attributes:
        name: what it is, e.g. ``"random directions"``.
        estimate: its value (the mean over draws for a family of random controls).
        low / high: its spread, both or neither: a confidence interval, or the range over its draws
            (``description`` says which). The audit counts a control beaten when the test's estimate lies
            beyond the far end of ``[low, high]`` (or beyond ``estimate`` without them), on the test's side.
        n: draws or examples behind it (None: unknown). description: how it was made.
    """

    name: str
    estimate: float
    low: float | None = None
    high: float | None = None
    n: int | None = None
    description: str = ""

    def __post_init__(self):
        _wrap(self._check, "Control")

    def _check(self) -> None:
        _text(self.name, "name")
        object.__setattr__(self, "estimate", _num(self.estimate, "estimate"))
        low, high = _interval(self.low, self.high)
        object.__setattr__(self, "low", low)
        object.__setattr__(self, "high", high)
        _count(self.n, "n")
        _text(self.description, "description", empty=True)


@dataclass(frozen=True)
class Test:
    """One test run for a claim: an effect size with its interval, the kind of evidence and the controls.

    Attributes:
        name: what was measured, e.g. ``"steer along the probe direction, alpha 4"``.
        kind: ``"causal"`` (an intervention on the proposed mechanism) or ``"correlational"`` (reading only).
        intervention: ``"steer"``, ``"ablate"``, ``"patch"`` for causal tests; ``"none"`` for correlational ones.
        metric: the statistic, e.g. ``"auroc"``, ``"mean change of log P(cont_1) - log P(cont_0)"``.
        units: its units, e.g. ``"nats"``, ``"dimensionless"``.
        estimate: the effect size. low / high: its confidence interval (both or neither; None: none given).
        ci_level: the interval's confidence level, e.g. 0.95.
        null: the value of no effect (0 for a change; 0.5 for an AUROC).
        alternative: which side of the null supports the claim: ``"greater"`` (an AUROC claimed above chance:
            an AUROC far below 0.5 reads the opposite and does not support it), ``"less"``, or ``"two-sided"``
            (either side, e.g. "steering moves the metric").
        n: examples, prompts or pairs behind the estimate. held_out: measured on data not used to find the
            mechanism. data: the name of the :class:`DataRef` it used (None: unnamed).
        passed: the producing tool's own rule (e.g. :data:`mechscope.safety.causal.RULE`), or None.
        controls: its baselines and controls. details: further JSON numbers (an alpha, a KL, a threshold).

    Raises:
        InputError: a missing or non-finite number, low > high, an unknown kind or intervention, a causal test
            without an intervention or a correlational one with one.
    """

    name: str
    kind: str
    estimate: float
    intervention: str = "none"
    metric: str = ""
    units: str = ""
    low: float | None = None
    high: float | None = None
    ci_level: float = 0.95
    null: float = 0.0
    alternative: str = "two-sided"
    n: int | None = None
    held_out: bool = False
    data: str | None = None
    passed: bool | None = None
    controls: Sequence[Control] = ()
    details: dict = field(default_factory=dict)

    __test__ = False  # not a pytest test class

    def __post_init__(self):
        _wrap(self._check, "Test")

    def _check(self) -> None:
        _text(self.name, "name")
        if self.kind not in KINDS:
            raise _Bad("kind", f"must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.intervention not in INTERVENTIONS:
            raise _Bad("intervention", f"must be one of {', '.join(INTERVENTIONS)}, got {self.intervention!r}")
        if (self.kind == "causal") != (self.intervention != "none"):
            raise _Bad("intervention", f"is {self.intervention!r} but kind is {self.kind!r}: a causal test intervenes "
                                       "(steer, ablate or patch) and a correlational one does not (none); fix the "
                                       "kind or the intervention")
        if self.alternative not in ALTERNATIVES:
            raise _Bad("alternative", f"must be one of {', '.join(ALTERNATIVES)}, got {self.alternative!r}")
        _text(self.metric, "metric", empty=True)
        _text(self.units, "units", empty=True)
        for k in ("estimate", "null", "ci_level"):
            object.__setattr__(self, k, _num(getattr(self, k), k))
        if not 0 < self.ci_level < 1:
            raise _Bad("ci_level", f"must lie in (0, 1), e.g. 0.95, got {self.ci_level}")
        low, high = _interval(self.low, self.high)
        object.__setattr__(self, "low", low)
        object.__setattr__(self, "high", high)
        _count(self.n, "n")
        _bool(self.held_out, "held_out")
        _text(self.data, "data", optional=True)
        _bool(self.passed, "passed", optional=True)
        controls = tuple(self.controls)
        for i, c in enumerate(controls):
            if not isinstance(c, Control):
                raise _Bad(f"controls[{i}]", f"must be a Control, got {type(c).__name__}")
        object.__setattr__(self, "controls", controls)
        _details(self.details, "details")

    @property
    def has_interval(self) -> bool:
        return self.low is not None


@dataclass(frozen=True)
class Mechanism:
    """The mechanism proposed: a description and the components it names (strings: hook names, heads such as
    ``"a8.h1"``, feature ids such as ``"sae:blocks.6.hook_resid_post/1234"``, directions, edges)."""

    description: str
    sites: Sequence[str] = ()
    heads: Sequence[str] = ()
    features: Sequence[str] = ()
    directions: Sequence[str] = ()
    edges: Sequence[str] = ()

    def __post_init__(self):
        _wrap(self._check, "Mechanism")

    def _check(self) -> None:
        _text(self.description, "description")
        for k in ("sites", "heads", "features", "directions", "edges"):
            object.__setattr__(self, k, _texts(getattr(self, k), k))


@dataclass(frozen=True)
class DataRef:
    """A data set a claim's tests used: name, fingerprint (e.g. SHA-256 of the examples), split, size."""

    name: str
    fingerprint: str | None = None
    split: str | None = None
    n: int | None = None

    def __post_init__(self):
        _wrap(self._check, "DataRef")

    def _check(self) -> None:
        _text(self.name, "name")
        _text(self.fingerprint, "fingerprint", optional=True)
        _text(self.split, "split", optional=True)
        _count(self.n, "n")


@dataclass(frozen=True)
class ModelRef:
    """The model a claim is about: its name (hub id or folder) and a fingerprint of its weights, if known."""

    name: str
    fingerprint: str | None = None

    def __post_init__(self):
        _wrap(self._check, "ModelRef")

    def _check(self) -> None:
        _text(self.name, "name")
        _text(self.fingerprint, "fingerprint", optional=True)


@dataclass(frozen=True)
class Claim:
    """An interpretability claim and its evidence.

    Attributes:
        behaviour: the behaviour explained, in words.
        mechanism: the :class:`Mechanism` proposed.
        tests: the :class:`Test` s run (may be empty: a hypothesis with no evidence yet).
        data: the :class:`DataRef` s the tests used. model: the :class:`ModelRef`, or None.
        not_tested: what was not tested, each in words (e.g. "causal effect of the direction").
        id: a short identifier; default: 12 hex digits of SHA-256 over behaviour, source and created.
        created: ISO 8601 time (UTC by default). source: what made it (a function or a person).
        notes: free text.

    Raises:
        InputError: an empty behaviour, a component of the wrong type, an unreadable time, a test naming data
            that ``data`` lacks, two data sets of one name.
    """

    behaviour: str
    mechanism: Mechanism
    tests: Sequence[Test] = ()
    data: Sequence[DataRef] = ()
    model: ModelRef | None = None
    not_tested: Sequence[str] = ()
    id: str = ""
    created: str = field(default_factory=_now)
    source: str = ""
    notes: str = ""

    def __post_init__(self):
        _wrap(self._check, "Claim")

    def _check(self) -> None:
        _text(self.behaviour, "behaviour")
        for k, cls in (("mechanism", Mechanism), ("model", ModelRef)):
            v = getattr(self, k)
            if not isinstance(v, cls) and not (k == "model" and v is None):
                raise _Bad(k, f"must be a {cls.__name__}, got {type(v).__name__}")
        for k, cls in (("tests", Test), ("data", DataRef)):
            items = tuple(getattr(self, k))
            for i, v in enumerate(items):
                if not isinstance(v, cls):
                    raise _Bad(f"{k}[{i}]", f"must be a {cls.__name__}, got {type(v).__name__}")
            object.__setattr__(self, k, items)
        object.__setattr__(self, "not_tested", _texts(self.not_tested, "not_tested"))
        _text(self.source, "source", empty=True)
        _text(self.notes, "notes", empty=True)
        _text(self.created, "created")
        try:
            datetime.fromisoformat(self.created)
        except ValueError:
            raise _Bad("created", f"{self.created!r} is not an ISO 8601 time; write e.g. 2026-01-31T12:00:00+00:00")
        names = [d.name for d in self.data]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise _Bad("data", f"names {twice} more than once; give each data set one entry")
        for i, t in enumerate(self.tests):
            if t.data is not None and t.data not in names:
                raise _Bad(f"tests[{i}].data", f"names data {t.data!r}, which the claim's data list lacks (it has "
                                               f"{names}); add a data entry of that name")
        if not self.id:
            key = f"{self.behaviour}\n{self.mechanism.description}\n{self.source}\n{self.created}"
            h = hashlib.sha256(key.encode()).hexdigest()[:12]
            object.__setattr__(self, "id", h)
        _text(self.id, "id")

    # -- JSON ------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """JSON-ready, with ``"schema": "mechscope.claim/1"``; tuples become lists."""
        def plain(x):
            if dataclasses.is_dataclass(x):
                return {f.name: plain(getattr(x, f.name)) for f in dataclasses.fields(x)}
            if isinstance(x, (list, tuple)):
                return [plain(v) for v in x]
            if isinstance(x, dict):
                return {k: plain(v) for k, v in x.items()}
            return x

        return {"schema": SCHEMA, **plain(self)}

    @classmethod
    def from_dict(cls, d: dict, where: str = "claim") -> Claim:
        """The claim of :meth:`to_dict`'s layout (strict: unknown keys and a wrong schema tag raise).

        Args:
            where: what to call it in errors, e.g. ``"claims.json: claim 2"``.

        Raises:
            InputError: naming ``where``, the field and the fix.
        """
        ident = d.get("id") if isinstance(d, dict) else None
        label = where + (f" (id {ident!r})" if isinstance(ident, str) and ident else "")
        try:
            if not isinstance(d, dict):
                raise _Bad("", f"must be a JSON object, got {type(d).__name__}")
            if d.get("schema") != SCHEMA:
                raise _Bad("schema", f"is {d.get('schema')!r}, not {SCHEMA!r}; write \"schema\": \"{SCHEMA}\" (a "
                                     "claim of another version needs converting)")
            body = _fields(cls, {k: v for k, v in d.items() if k != "schema"}, "", required=("behaviour", "mechanism"))
            body["mechanism"] = _sub(Mechanism, body["mechanism"], "mechanism", ("description",))
            if body.get("model") is not None:
                body["model"] = _sub(ModelRef, body["model"], "model", ("name",))
            for k, sub, req in (("tests", Test, ("name", "kind", "estimate")), ("data", DataRef, ("name",))):
                items = body.get(k, [])
                if not isinstance(items, list):
                    raise _Bad(k, f"must be a list, got {type(items).__name__}")
                body[k] = tuple(_test(it, f"{k}[{i}]") if sub is Test else _sub(sub, it, f"{k}[{i}]", req)
                                for i, it in enumerate(items))
            try:
                return cls(**body)
            except FieldError as e:
                raise _Bad(e.field, e.problem) from None
        except _Bad as e:
            raise InputError(_message(label, e)) from None


def _fields(cls, d, path: str, required: tuple[str, ...]) -> dict:
    if not isinstance(d, dict):
        raise _Bad(path, f"must be a JSON object, got {type(d).__name__} {d!r}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise _Bad(f"{path}.{unknown[0]}".lstrip("."), f"is not a field of a {cls.__name__.lower()}; the fields are "
                                                      f"{sorted(known)} (remove it or fix its spelling)")
    missing = [k for k in required if k not in d]
    if missing:
        raise _Bad(f"{path}.{missing[0]}".lstrip("."), f"is missing; every {cls.__name__.lower()} needs "
                                                      f"{', '.join(required)}")
    spec = _SPEC[cls]  # JSON values to the annotated types first (ints to floats, lists to tuples)
    return {k: spec[k](v, f"{path}.{k}".lstrip(".")) if k in spec else v for k, v in d.items()}


def _sub(cls, d, path: str, required: tuple[str, ...]):
    body = _fields(cls, d, path, required)
    try:
        return cls(**body)
    except FieldError as e:  # re-anchored at this path
        raise _Bad(f"{path}.{e.field}" if e.field else path, e.problem) from None


def _test(d, path: str) -> Test:
    body = _fields(Test, d, path, ("name", "kind", "estimate"))
    ctrls = body.get("controls", [])
    if not isinstance(ctrls, list):
        raise _Bad(f"{path}.controls", f"must be a list, got {type(ctrls).__name__}")
    body["controls"] = tuple(_sub(Control, c, f"{path}.controls[{i}]", ("name", "estimate"))
                             for i, c in enumerate(ctrls))
    return _sub(Test, body, path, ())


def _details(d, path: str) -> dict:
    if not isinstance(d, dict):
        raise _Bad(path, f"must be a JSON object, got {type(d).__name__}")
    try:
        json.dumps(d, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise _Bad(path, f"must hold plain finite JSON values ({e}); convert tensors with .tolist() and drop NaNs")
    return d


def _opt(conv):
    return lambda v, p: conv(v, p, optional=True)


def _any_text(v, p):
    return _text(v, p, empty=True)


_SPEC = {
    Control: {"name": _text, "estimate": _num, "low": _opt(_num), "high": _opt(_num), "n": _count,
              "description": _any_text},
    Test: {"name": _text, "kind": _text, "estimate": _num, "intervention": _text, "metric": _any_text,
           "units": _any_text, "low": _opt(_num), "high": _opt(_num), "ci_level": _num, "null": _num,
           "alternative": _text, "n": _count,
           "held_out": _bool, "data": _opt(_text), "passed": _opt(_bool), "details": _details},
    Mechanism: {"description": _text, **dict.fromkeys(("sites", "heads", "features", "directions", "edges"), _texts)},
    DataRef: {"name": _text, "fingerprint": _opt(_text), "split": _opt(_text), "n": _count},
    ModelRef: {"name": _text, "fingerprint": _opt(_text)},
    Claim: {"behaviour": _text, "not_tested": _texts, "id": _text, "created": _text, "source": _any_text,
            "notes": _any_text},
}


def _message(where: str, e: _Bad) -> str:
    return f"{where}: {e.path + ' ' if e.path else ''}{e.message}."


def _wrap(check, owner: str) -> None:
    try:
        check()
    except _Bad as e:
        raise FieldError(owner, e.path, e.message) from None


__all__ = ["INTERVENTIONS", "KINDS", "SCHEMA", "Claim", "Control", "DataRef", "FieldError", "Mechanism", "ModelRef",
           "Test"]
