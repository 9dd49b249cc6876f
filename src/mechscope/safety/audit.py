"""Grade interpretability claims on a published rubric (:data:`RUBRIC`, :data:`GRADES`) and render the audit.

Each claim (:class:`~mechscope.safety.claim.Claim`) is judged by one *deciding test*: the best of its causal
tests if it has any, else the best of its correlational ones ("best" = supports the claim, then held-out,
then has controls, then a narrow interval, then has an interval; ties go to the first listed). The criteria
are checked on that test, and the letter follows :data:`GRADES`:

- **A**: a causal test on held-out data whose interval excludes the null, beats every control, and is
  narrow (``(high - low) / |estimate - null| <= max_rel_width``, default 1);
- **B**: a causal test that supports the claim but lacks held-out data, a control, or a narrow interval;
- **C**: only correlational evidence, supporting, on held-out data, beating its baselines;
- **D**: correlational evidence without held-out data or baselines, or that does not support the claim, or
  no test at all;
- **F**: contradicted: causal tests were run and none supports the claim (each interval contains the null,
  or a control does as well, or the tool's own rule failed).

A test *supports* the claim when its interval excludes the null, it beats every control it has, and its
tool's own rule (``passed``) is not false. Everything is deterministic: the same claims give the same audit.

References:
    SAFETY.md, "Claims and their evidence"; Bolukbasi et al. 2021, "An Interpretability Illusion for BERT"
    (directions that look meaningful on one data set and not on another: the reason for held-out data);
    Makelov et al. 2023, "Is This the Subspace You Are Looking For?" (an intervention can move behaviour
    through a dormant pathway: the reason for random-subspace controls); docs/safety/audit-rubric.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mechscope.core.errors import InputError
from mechscope.safety.claim import Claim, Test

RUBRIC_VERSION = "mechscope.audit-rubric/1"
#: The widest interval, relative to the effect, that counts as narrow.
DEFAULT_MAX_REL_WIDTH = 1.0


@dataclass(frozen=True)
class Criterion:
    """One criterion of the rubric: its id, what it checks, and the wording when it passes and fails.
    ``graded``: whether the letter depends on it (advisory criteria are reported only)."""

    id: str
    title: str
    checks: str
    passes: str
    fails: str
    graded: bool = True


#: The published rubric (docs/safety/audit-rubric.md explains each criterion).
RUBRIC: tuple[Criterion, ...] = (
    Criterion("causal", "Causal evidence",
              "At least one test intervenes on the proposed mechanism (steering, ablation, patching).",
              "a causal test was run", "only correlational tests: reading a signal (probe accuracy, attention "
              "patterns) shows the information is there, not that the model uses it"),
    Criterion("null_excluded", "Interval excludes the null",
              "The deciding test has a confidence interval and it excludes the null value (0 for a change, 0.5 "
              "for an AUROC), on the side the claim names when its alternative is one-sided (an AUROC claimed above "
              "chance must lie above 0.5).", "the interval excludes the null",
              "the interval contains the null, lies on the wrong side of it, or there is none"),
    Criterion("beats_control", "Beats its controls",
              "The deciding test's estimate lies beyond every control's far end (its interval, or the range of "
              "its draws, or its estimate) on the same side of the null.",
              "the effect is larger than every control's", "a control (random directions, shuffled labels, random "
              "components) does as well, or there is none to beat"),
    Criterion("controls", "Controls present",
              "The deciding test has at least one control or baseline run beside it.",
              "controls were run", "no control: nothing says how large an effect any direction or component gets"),
    Criterion("held_out", "Held-out data",
              "The deciding test was measured on data not used to find the mechanism.",
              "measured on held-out data", "measured on the data the mechanism was found on (or not said)"),
    Criterion("ci_width", "Narrow interval",
              "The deciding test's relative interval width (high - low) / |estimate - null| is at most "
              "max_rel_width (1 by default): the interval is no wider than the effect is large.",
              "the interval is narrow relative to the effect", "the interval is wide relative to the effect, or "
              "there is none"),
    Criterion("own_rule", "Passes its tool's rule",
              "The producing tool's own pass rule (e.g. the causal check's verdict) did not fail.",
              "the tool's rule passed or was not given", "the tool's own rule failed"),
    Criterion("provenance", "Provenance recorded",
              "The model and every data set carry a fingerprint, so the numbers can be traced and rerun.",
              "model and data are fingerprinted", "a fingerprint is missing", graded=False),
    Criterion("limits", "Limits stated",
              "The claim lists what was not tested.", "the claim says what was not tested",
              "the claim does not say what was not tested", graded=False),
)

#: Grade letters and their definitions.
GRADES: dict[str, str] = {
    "A": "causal evidence: a causal test on held-out data whose interval excludes the null, beats every control, "
         "and is narrow relative to the effect",
    "B": "causal evidence with a gap: a causal test supports the claim but lacks held-out data, a control, or a "
         "narrow interval",
    "C": "correlational evidence only, on held-out data, excluding the null and beating its baselines",
    "D": "weak evidence: correlational without held-out data or baselines, not supporting the claim, or no test",
    "F": "contradicted: causal tests were run and none supports the claim",
}


@dataclass(frozen=True)
class CriterionResult:
    """One criterion on one claim: passed or not, and why in words (with the numbers)."""

    id: str
    passed: bool
    reason: str


@dataclass(frozen=True)
class Grade:
    """The grade of one claim.

    Attributes:
        claim_id / behaviour: the claim's. letter: ``A``-``D`` or ``F``; definition: :data:`GRADES`'s.
        summary: why this letter, in one sentence. results: one :class:`CriterionResult` per :data:`RUBRIC` entry.
        deciding_test: index into the claim's tests (None without tests).
        n_tests / n_causal / n_supporting: tests, causal tests, tests that support the claim.
    """

    claim_id: str
    behaviour: str
    letter: str
    definition: str
    summary: str
    results: tuple[CriterionResult, ...]
    deciding_test: int | None
    n_tests: int
    n_causal: int
    n_supporting: int

    def result(self, criterion: str) -> CriterionResult:
        """The result of criterion ``criterion`` (an id of :data:`RUBRIC`). Raises InputError for another id."""
        for r in self.results:
            if r.id == criterion:
                return r
        raise InputError(f"no criterion {criterion!r}; the rubric's are {[c.id for c in RUBRIC]}.")

    def to_dict(self) -> dict:
        """JSON-ready."""
        return {"claim_id": self.claim_id, "behaviour": self.behaviour, "letter": self.letter,
                "definition": self.definition, "summary": self.summary, "deciding_test": self.deciding_test,
                "n_tests": self.n_tests, "n_causal": self.n_causal, "n_supporting": self.n_supporting,
                "criteria": [{"id": r.id, "passed": r.passed, "reason": r.reason} for r in self.results]}


# -- the checks on one test ------------------------------------------------------------------------------
def _fmt(x: float) -> str:
    return f"{x:.4g}"


def _ci(t: Test) -> str:
    ci = f" [{_fmt(t.low)}, {_fmt(t.high)}]" if t.has_interval else " (no interval)"
    return f"{_fmt(t.estimate)}{ci}{' ' + t.units if t.units else ''}"


def _side(t: Test) -> float:
    """+1 / -1: the side of the null that supports the claim (a two-sided test: the estimate's side; 0 at the null)."""
    if t.alternative == "greater":
        return 1.0
    if t.alternative == "less":
        return -1.0
    return math.copysign(1.0, t.estimate - t.null) if t.estimate != t.null else 0.0


def excludes_null(t: Test) -> bool:
    """The test's interval lies wholly on the supporting side of its null (either side for a two-sided test;
    False without an interval)."""
    if not t.has_interval:
        return False
    above, below = t.low > t.null, t.high < t.null
    return {"greater": above, "less": below}.get(t.alternative, above or below)


def beats(t: Test, c) -> bool:
    """The test's estimate lies beyond the control's far end (of estimate, low, high) on the supporting side."""
    side = _side(t)
    far = max(side * (v - t.null) for v in (c.estimate, c.low, c.high) if v is not None)
    return side != 0 and side * (t.estimate - t.null) > far


def relative_width(t: Test) -> float:
    """``(high - low) / |estimate - null|`` (dimensionless; inf for a zero effect, nan without an interval)."""
    if not t.has_interval:
        return math.nan
    effect = abs(t.estimate - t.null)
    return math.inf if effect == 0 else (t.high - t.low) / effect


def supports(t: Test) -> bool:
    """Interval excludes the null, every control beaten, own rule not failed."""
    return excludes_null(t) and all(beats(t, c) for c in t.controls) and t.passed is not False


def _key(t: Test, max_rel_width: float):
    return (supports(t), t.held_out, bool(t.controls), relative_width(t) <= max_rel_width, t.has_interval)


def _results(claim: Claim, t: Test | None, causal: bool, max_rel_width: float) -> list[CriterionResult]:
    r = []
    n_causal = sum(x.kind == "causal" for x in claim.tests)
    r.append(CriterionResult("causal", causal, f"{n_causal} of {len(claim.tests)} tests are causal" + (
        "" if causal else "; none intervenes (steer, ablate or patch)")))
    if t is None:
        for c in RUBRIC[1:7]:
            r.append(CriterionResult(c.id, False, "no test was run"))
    else:
        name = f"{t.name!r}: {t.metric + ' ' if t.metric else ''}{_ci(t)}"
        if not t.has_interval:
            r.append(CriterionResult("null_excluded", False, f"{name} has no interval; report a confidence interval"))
        else:
            ok = excludes_null(t)
            if t.alternative == "two-sided":
                why = f"{'excludes' if ok else 'contains'} the null {_fmt(t.null)}"
            else:
                want = "above" if t.alternative == "greater" else "below"
                why = (f"lies {want} the null {_fmt(t.null)}" if ok else
                       f"does not lie {want} the null {_fmt(t.null)}, where the claim needs it")
            r.append(CriterionResult("null_excluded", ok, f"{name} {why}"))
        if not t.controls:
            r.append(CriterionResult("beats_control", False, "no control to beat"))
        else:
            lost = [c.name for c in t.controls if not beats(t, c)]
            parts = ", ".join(f"{c.name} {_fmt(c.estimate)}" + (f" [{_fmt(c.low)}, {_fmt(c.high)}]" if c.low is not None
                                                                 else "") for c in t.controls)
            r.append(CriterionResult("beats_control", not lost, f"estimate {_fmt(t.estimate)} against {parts}"
                                     + (f"; not beyond {', '.join(lost)}" if lost else "")))
        r.append(CriterionResult("controls", bool(t.controls), f"{len(t.controls)} control(s)" + (
            ": " + ", ".join(c.name for c in t.controls) if t.controls else "; add random directions, shuffled labels "
                                                                             "or random components")))
        where = f"on {t.data!r}" if t.data else "on unnamed data"
        r.append(CriterionResult("held_out", t.held_out, f"{where}, " + ("held out" if t.held_out else
                                                                          "not marked held out")))
        w = relative_width(t)
        r.append(CriterionResult("ci_width", w <= max_rel_width, "no interval" if math.isnan(w) else
                                 f"relative width {_fmt(w)} (limit {_fmt(max_rel_width)})"))
        r.append(CriterionResult("own_rule", t.passed is not False, {True: "the tool's rule passed", None:
                                 "no rule given", False: "the tool's own rule failed"}[t.passed]))
    missing = ([] if claim.model is not None and claim.model.fingerprint else ["model"]) + [
        f"data {d.name!r}" for d in claim.data if not d.fingerprint]
    if not claim.data:
        missing.append("data (none listed)")
    r.append(CriterionResult("provenance", not missing, "model and data fingerprinted" if not missing else
                             "no fingerprint for " + ", ".join(missing)))
    r.append(CriterionResult("limits", bool(claim.not_tested), f"{len(claim.not_tested)} item(s) not tested" if
                             claim.not_tested else "nothing listed under not_tested"))
    return r


def grade(claim: Claim, *, max_rel_width: float = DEFAULT_MAX_REL_WIDTH) -> Grade:
    """Grade one claim on :data:`RUBRIC` (see the module docstring for the rules).

    Args:
        claim: the claim.
        max_rel_width: the largest ``(high - low) / |estimate - null|`` that counts as narrow (dimensionless, > 0).

    Returns:
        :class:`Grade`.

    Raises:
        InputError: ``max_rel_width`` not a positive finite number; something other than a Claim.
    """
    if not isinstance(claim, Claim):
        raise InputError(f"grade takes a Claim, got {type(claim).__name__}; read files with read_claims.")
    if isinstance(max_rel_width, bool) or not isinstance(max_rel_width, (int, float)) or not (
            0 < max_rel_width < math.inf):
        raise InputError(f"max_rel_width must be a positive finite number (1 = an interval as wide as the effect), "
                         f"got {max_rel_width!r}.")
    tests = list(claim.tests)
    causal_idx = [i for i, t in enumerate(tests) if t.kind == "causal"]
    pool = causal_idx or list(range(len(tests)))
    n_sup = sum(supports(t) for t in tests)
    if not pool:
        results = _results(claim, None, False, max_rel_width)
        return Grade(claim.id, claim.behaviour, "D", GRADES["D"], "no test was run: the claim is a hypothesis",
                     tuple(results), None, 0, 0, 0)
    best = max(pool, key=lambda i: (_key(tests[i], max_rel_width), -i))
    t = tests[best]
    results = _results(claim, t, bool(causal_idx), max_rel_width)
    ok = {r.id: r.passed for r in results}
    gaps = [c.title.lower() for c in RUBRIC if c.id in ("held_out", "controls", "ci_width") and not ok[c.id]]
    n_kind = len(causal_idx) if causal_idx else len(tests)
    kind = "causal" if causal_idx else "correlational"
    sup_kind = sum(supports(tests[i]) for i in pool)
    if causal_idx:
        if not supports(t):
            fails = [c.title.lower() for c in RUBRIC if c.id in ("null_excluded", "beats_control", "own_rule")
                     and not ok[c.id] and not (c.id == "beats_control" and not t.controls)]
            letter, summary = "F", (f"none of {n_kind} causal tests supports the claim (best: {t.name!r}, "
                                    f"{_ci(t)}; criteria not met: {', '.join(fails)})")
        elif not gaps:
            letter, summary = "A", (f"{t.name!r} ({_ci(t)}) supports the claim on held-out data, beats its "
                                    "controls and is narrow")
        else:
            letter, summary = "B", f"{t.name!r} ({_ci(t)}) supports the claim; missing: {', '.join(gaps)}"
    else:
        missing = [g for g in gaps if g != "narrow interval"]
        if supports(t) and not missing:
            letter, summary = "C", (f"correlational only: {t.name!r} ({_ci(t)}) holds on held-out data and beats "
                                    "its baselines; no causal test")
        elif not supports(t):
            letter, summary = "D", f"correlational only, and no test supports the claim (best: {t.name!r}, {_ci(t)})"
        else:
            letter, summary = "D", f"correlational only: {t.name!r} ({_ci(t)}); missing: {', '.join(missing)}"
    summary += f" [{sup_kind} of {n_kind} {kind} tests support it]"
    return Grade(claim.id, claim.behaviour, letter, GRADES[letter], summary, tuple(results), best, len(tests),
                 len(causal_idx), n_sup)


@dataclass(frozen=True)
class Audit:
    """Claims and their grades, with the rubric's settings.

    Attributes:
        claims / grades: in the same order. max_rel_width: the narrow-interval limit used. rubric_version.
    """

    claims: tuple[Claim, ...]
    grades: tuple[Grade, ...]
    max_rel_width: float
    rubric_version: str = RUBRIC_VERSION

    def counts(self) -> dict[str, int]:
        """Claims per letter, every letter present (0 included)."""
        return {k: sum(g.letter == k for g in self.grades) for k in GRADES}

    def to_dict(self) -> dict:
        """JSON-ready: the rubric (criteria and grade definitions), the settings, and every claim's grade."""
        return {"rubric": rubric_dict(), "max_rel_width": self.max_rel_width, "counts": self.counts(),
                "grades": [g.to_dict() for g in self.grades]}

    def table(self):
        """A rich Table: per claim its id, behaviour, grade, a tick per criterion and the summary (not printed)."""
        from rich.table import Table
        from rich.text import Text

        t = Table(title=None, show_lines=False)
        t.add_column("claim")
        t.add_column("behaviour", max_width=40)
        t.add_column("grade", justify="center")
        for c in RUBRIC:
            t.add_column(c.id, justify="center")
        t.add_column("why", max_width=72)
        style = {"A": "bold green", "B": "green", "C": "yellow", "D": "red", "F": "bold red"}
        for g in self.grades:  # Text cells: claim strings are never read as rich markup
            ticks = [Text("✓" if r.passed else "✗", style="green" if r.passed else "red") for r in g.results]
            t.add_row(Text(g.claim_id), Text(g.behaviour), Text(g.letter, style=style[g.letter]), *ticks,
                      Text(g.summary))
        return t

    def reasons_table(self):
        """A rich Table with one row per claim and criterion: passed or not, and the reason in words."""
        from rich.table import Table
        from rich.text import Text

        t = Table()
        for name in ("claim", "criterion", "", "reason"):
            t.add_column(name)
        for g in self.grades:
            for r in g.results:
                t.add_row(Text(g.claim_id), Text(r.id), Text("✓" if r.passed else "✗"), Text(r.reason))
        return t


def audit(claims, *, max_rel_width: float = DEFAULT_MAX_REL_WIDTH) -> Audit:
    """Grade every claim (:func:`grade`).

    Args:
        claims: a :class:`Claim` or a sequence of them (e.g. from :func:`~mechscope.safety.claim.read_claims`).

    Raises:
        InputError: as :func:`grade`.
    """
    claims = (claims,) if isinstance(claims, Claim) else tuple(claims)
    return Audit(claims, tuple(grade(c, max_rel_width=max_rel_width) for c in claims), float(max_rel_width))


def rubric_dict() -> dict:
    """The rubric as JSON: version, criteria, grade definitions, default narrow-interval limit."""
    return {"version": RUBRIC_VERSION, "default_max_rel_width": DEFAULT_MAX_REL_WIDTH,
            "criteria": [c.__dict__ for c in RUBRIC], "grades": dict(GRADES)}


def rubric_table():
    """The rubric as a rich Table: criterion id, title, what it checks, whether the letter depends on it."""
    from rich.table import Table
    from rich.text import Text

    t = Table()
    for name in ("criterion", "title", "checks", "graded"):
        t.add_column(name)
    for c in RUBRIC:
        t.add_row(Text(c.id), Text(c.title), Text(c.checks), Text("yes" if c.graded else "advisory"))
    return t


def grades_table():
    """The grade letters and their definitions as a rich Table."""
    from rich.table import Table
    from rich.text import Text

    t = Table()
    t.add_column("grade")
    t.add_column("definition")
    for k, v in GRADES.items():
        t.add_row(Text(k), Text(v))
    return t


# -- HTML ------------------------------------------------------------------------------------------------
_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>mechscope audit: {{ n }} claim(s)</title>
<style>
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 4px 8px; vertical-align: top; text-align: left; }
th { background: #f3f3f3; }
.g { font-weight: bold; text-align: center; font-size: 1.2em; }
.gA { background: #c8f0c8; } .gB { background: #e3f5d0; } .gC { background: #fff3c4; }
.gD { background: #fde0c8; } .gF { background: #f8c4c4; }
.ok { color: #137333; } .no { color: #b3261e; }
.reasons { font-size: 0.9em; color: #444; margin: 0; padding-left: 1.2em; }
code { font-size: 0.95em; }
</style></head><body>
<h1>Audit of {{ n }} claim(s)</h1>
<p>Grades: {% for k, v in counts.items() %}{{ k }} {{ v }}{% if not loop.last %}, {% endif %}{% endfor %}.
Rubric {{ version }}; an interval counts as narrow when (high &minus; low) / |estimate &minus; null| &le; {{ width }}.</p>
<table>
<tr><th>claim</th><th>behaviour and mechanism</th><th>grade</th><th>why</th>
{% for c in criteria %}<th title="{{ c.checks }}">{{ c.id }}</th>{% endfor %}</tr>
{% for row in rows %}
<tr><td><code>{{ row.grade.claim_id }}</code></td>
<td>{{ row.claim.behaviour }}<br><small>{{ row.claim.mechanism.description }}</small></td>
<td class="g g{{ row.grade.letter }}" title="{{ row.grade.definition }}">{{ row.grade.letter }}</td>
<td>{{ row.grade.summary }}
<ul class="reasons">{% for r in row.grade.results %}<li><b>{{ r.id }}</b>: {{ r.reason }}</li>{% endfor %}
{% if row.claim.not_tested %}<li><b>not tested</b>: {{ row.claim.not_tested | join("; ") }}</li>{% endif %}</ul></td>
{% for r in row.grade.results %}<td class="{{ 'ok' if r.passed else 'no' }}" title="{{ r.reason }}">{{ "✓" if r.passed else "✗" }}</td>{% endfor %}
</tr>
{% endfor %}
</table>
<h2>The rubric</h2>
<table><tr><th>grade</th><th>definition</th></tr>
{% for k, v in grades.items() %}<tr><td class="g g{{ k }}">{{ k }}</td><td>{{ v }}</td></tr>{% endfor %}
</table>
<table><tr><th>criterion</th><th>checks</th><th>passes</th><th>fails</th><th>graded</th></tr>
{% for c in criteria %}<tr><td><b>{{ c.id }}</b><br>{{ c.title }}</td><td>{{ c.checks }}</td><td>{{ c.passes }}</td>
<td>{{ c.fails }}</td><td>{{ "yes" if c.graded else "advisory" }}</td></tr>{% endfor %}
</table>
<p>The deciding test is the best causal test if any, else the best correlational one. A test supports the claim
when its interval excludes the null, it beats every control, and its tool's own rule did not fail.</p>
</body></html>
"""


def audit_html(audit: Audit) -> str:
    """A self-contained HTML page of an audit: a table of claims (grade, why, a tick per criterion with its
    reason), then the rubric. No scripts and no external resources; every string from the claims is escaped
    (jinja2 autoescaping)."""
    from jinja2 import Environment

    env = Environment(autoescape=True)
    rows = [{"claim": c, "grade": g} for c, g in zip(audit.claims, audit.grades)]
    return env.from_string(_PAGE).render(n=len(rows), rows=rows, counts=audit.counts(), criteria=RUBRIC,
                                         grades=GRADES, version=audit.rubric_version, width=_fmt(audit.max_rel_width))


__all__ = ["DEFAULT_MAX_REL_WIDTH", "GRADES", "RUBRIC", "RUBRIC_VERSION", "Audit", "Criterion", "CriterionResult",
           "Grade", "audit", "audit_html", "beats", "excludes_null", "grade", "grades_table", "relative_width", "rubric_dict",
           "rubric_table", "supports"]
