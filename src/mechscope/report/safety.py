"""The safety report: one self-contained HTML file from probe runs, monitored generations and audited claims.

Drawn from JSON-ready dicts alone, so it re-renders from saved files:

- ``runs``: {title: ``ProbeRun.to_dict()``} (:mod:`mechscope.safety.train`), optionally with ``"scores"``:
  {method: {"site", "parts": {"test" | "validation" | "control" | "transfer:<name>": {"scores", "labels"}}}},
  the selected probe of each method scored on each part. Per run: AUROC and recall at the FPR by layer with
  their 95% bootstrap bands and baselines, ROC curves and score histograms of the selected probes (when the run
  holds scores), and a summary table.
- ``generations``: ``MonitoredGeneration.to_dict()`` plus ``token_strings``, ``threshold``, ``probe``, ``rule``:
  each as a strip of tokens coloured by score (diverging at the threshold, prompt dimmed, alarms outlined) and
  its score and rule value by position.
- ``claims``: claim dicts with their audit grade; a claim of another shape is shown as its JSON.

The selected site of a method is the run's ``scores[method]["site"]`` (chosen on the validation split when
``info["selection"] == "validation"``), else the sweep's ``best_site`` (the highest test AUROC: optimistic,
since it is chosen on the split it is scored on; the page says which).

Safety as in the other reports: the template autoescapes, figure data reaches the page's script as escaped
JSON (:func:`~mechscope.report.render.script_json`), plotly.js is inlined once and a Content-Security-Policy
forbids every fetch, so the page opens offline.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from markupsafe import Markup

from mechscope.core.errors import InputError
from mechscope.core.io import write_text_atomic
from mechscope.report.render import _env, plotly_js, script_json
from mechscope.report.safety_figures import (
    COLOURS,
    check_generation,
    esc,
    generation_figure,
    histogram_figure,
    natural_key,
    operating_point,
    part_name,
    roc_area,
    roc_figure,
    roc_points,
    sweep_figure,
    token_strip,
)

_FIX = "give ProbeRun.to_dict() of a finished train_probe run (with 'sweep': {'rows': [one per site and method]})"
NO_SCORES = ("This run holds no per-example scores (it was saved before they were recorded): the ROC curves and "
             "score histograms need run['scores'], the selected probes' scores on each part; rerun the probe "
             "training with this version of mechscope to get them.")


def _ci(d, digits: int = 3) -> str:
    if not isinstance(d, dict) or d.get("estimate") is None:
        return "n/a"
    if d.get("low") is None or d.get("high") is None:
        return f"{d['estimate']:.{digits}f}"
    return f"{d['estimate']:.{digits}f} [{d['low']:.{digits}f}, {d['high']:.{digits}f}]"


def _float(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def _pct(x) -> str:
    return "n/a" if not isinstance(x, (int, float)) else f"{100 * x:g}%"


def _f(x, digits: int = 3) -> str:
    return "n/a" if not isinstance(x, (int, float)) or isinstance(x, bool) or not math.isfinite(x) else f"{x:.{digits}f}"


def check_run(title: str, run) -> list[dict]:
    """The run's sweep rows, checked: a dict with ``sweep.rows``, each row with site, method and auroc.

    Raises:
        InputError: a run that is not such a dict, with the fix.
    """
    rows = run.get("sweep", {}).get("rows") if isinstance(run, dict) and isinstance(run.get("sweep"), dict) else None
    if not rows or not isinstance(rows, list):
        raise InputError(f"run {title!r} has no sweep rows (run['sweep']['rows'] is missing or empty); {_FIX}.")
    for r in rows:
        if not isinstance(r, dict) or any(k not in r for k in ("site", "method", "auroc")):
            raise InputError(f"run {title!r}: a sweep row lacks site, method or auroc ({str(r)[:120]}); {_FIX}.")
    return rows


def _selected(run: dict, methods: list[str], rows: list[dict]) -> dict[str, str]:
    scores = run.get("scores") or {}
    best = (run.get("sweep") or {}).get("best_site") or {}
    out = {}
    for m in methods:
        site = (scores.get(m) or {}).get("site") or best.get(m)
        if site is None:  # neither recorded: the highest test AUROC
            site = max((r for r in rows if r["method"] == m), key=lambda r: r["auroc"].get("estimate") or 0)["site"]
        out[m] = site
    return out


def _run_view(i: int, title: str, run, figs: dict) -> dict:
    """One run's section: its info, summary rows and figure ids (the figures are added to ``figs``)."""
    rows = check_run(title, run)
    info = run.get("info") or {}
    methods = list(dict.fromkeys(r["method"] for r in rows))
    sites = sorted(dict.fromkeys(r["site"] for r in rows), key=natural_key)
    cell = {(r["site"], r["method"]): r for r in rows}
    by_method = {m: [cell[s, m] for s in sites if (s, m) in cell] for m in methods}
    selected = _selected(run, methods, rows)
    chosen = {m: cell.get((selected[m], m)) or {} for m in methods}  # the selected probe's row
    fpr, control = info.get("fpr", rows[0].get("fpr")), info.get("control") or rows[0].get("control") or "control"
    name = f"fig-r{i}"
    figs[f"{name}-auroc"] = sweep_figure(by_method, selected, "auroc", f"AUROC by layer on the test split ({esc(title)})",
                                         "AUROC (held-out groups)")
    figs[f"{name}-recall"] = sweep_figure(by_method, selected, "recall",
                                          f"Recall at {_pct(fpr)} FPR on {esc(control)} by layer ({esc(title)})",
                                          "recall at the threshold")
    scores = run.get("scores") or {}
    parts = {m: (scores.get(m) or {}).get("parts") or {} for m in methods}
    roc, hist = _roc_figures(title, parts, chosen), _histograms(parts, selected, chosen)
    figs.update({f"{name}-roc-{j}": f for j, f in roc.items()})
    figs.update({f"{name}-hist-{k}": f for k, f in hist.items()})
    keys = ("dataset", "fingerprint", "n_train", "n_validation", "n_test", "n_control", "aggregation", "fpr", "control",
            "transfer", "selection", "bootstrap", "paired", "seed", "test_fraction", "validation_fraction", "seconds")
    return {"title": title, "anchor": f"run-{i}", "info": [[k, _text(info[k])] for k in keys if k in info],
            "ids": {"sweep": [f"{name}-auroc", f"{name}-recall"], "roc": [f"{name}-roc-{j}" for j in roc],
                    "hist": [f"{name}-hist-{k}" for k in hist]},
            "summary": _summary(title, run.get("transfer") or {}, selected, chosen),
            "selection": _selection(run, scores), "has_scores": bool(scores), "fpr": _pct(fpr), "control": control}


def _roc_figures(title: str, parts: dict[str, dict], chosen: dict[str, dict]) -> dict[int, dict]:
    """ROC figures on the test part and each transfer part, keyed by the part's index among them."""
    names = list(dict.fromkeys(p for ps in parts.values() for p in ps if p == "test" or p.startswith("transfer:")))
    out = {}
    for j, part in enumerate(names):
        curves = []
        for k, (m, ps) in enumerate(parts.items()):
            d = ps.get(part)
            if not d or d.get("labels") is None:
                continue
            try:
                roc = roc_points(d["scores"], d["labels"], drop_intermediate=True)
            except InputError as e:
                raise InputError(f"run {title!r}, scores of {m} on {part}: {e}") from e
            t = _float(chosen[m].get("threshold"))
            curves.append({"method": m, "colour": COLOURS[k % len(COLOURS)], "roc": roc, "threshold": t,
                           "auroc": roc_area(roc["fpr"], roc["tpr"]),
                           "point": None if t is None else operating_point(d["scores"], d["labels"], t)})
        if curves:
            out[j] = roc_figure(curves, part)
    return out


def _histograms(parts: dict[str, dict], selected: dict[str, str], chosen: dict[str, dict]) -> dict[int, dict]:
    """Per method (keyed by its index), the histograms of its selected probe on every part but validation."""
    out = {}
    for k, (m, ps) in enumerate(parts.items()):
        sets = []
        for part, d in ps.items():
            if part == "validation" or not d:
                continue
            dash = "dash" if part.startswith("transfer:") else "solid"
            if d.get("labels") is None:
                sets.append((part_name(part), [float(x) for x in d["scores"]], "#5f6b7a", "dot"))
                continue
            for lab, what, c in ((1, "positives", "#b3261e"), (0, "negatives", "#2b5cab")):
                vals = [float(s) for s, y in zip(d["scores"], d["labels"]) if y == lab]
                if vals:
                    sets.append((f"{part_name(part)} {what}", vals, c if part == "test" else _shade(c, len(sets)), dash))
        if sets:
            out[k] = histogram_figure(m, selected[m], sets, _float(chosen[m].get("threshold")))
    return out


def _summary(title: str, transfer: dict, selected: dict[str, str], chosen: dict[str, dict]) -> list[list]:
    """The summary table's rows of one run: one per method (the transfer AUROCs as a list of lines)."""
    out = []
    for m, r in chosen.items():
        tr = []
        for ds, trows in transfer.items():
            t = next((x for x in trows if x.get("site") == selected[m] and x.get("method") == m), None)
            if t is not None:
                tr.append(f"{ds}: {_ci(t.get('auroc'))}")
        out.append([title, m, selected[m], _ci(r.get("auroc")), _ci(r.get("recall")), _ci(r.get("balanced_accuracy")),
                    f"{_f(r.get('random_auroc_mean'))} ± {_f(r.get('random_auroc_std'))}",
                    _f(r.get("shuffled_auroc")), _f(r.get("validation_auroc")), tr or ["n/a"]])
    return out


def _selection(run: dict, scores: dict) -> str:
    """How the run chose each method's site, in words."""
    how = (run.get("info") or {}).get("selection") or (run.get("sweep") or {}).get("selection")
    if how == "validation":
        return "each method's site chosen on the validation split"
    if how not in (None, "test"):
        return f"each method's site chosen by {how}"
    if how is None and any((v or {}).get("site") for v in scores.values()):
        return "each method's site as recorded with its scores (how it was chosen is not recorded)"
    return "each method's site with the highest test AUROC (chosen on the split it is scored on: optimistic)"


def _shade(hex_colour: str, k: int) -> str:
    """A transfer set's colour: the class colour darkened a little per set (k), so sets stay apart."""
    f = max(0.45, 1 - 0.15 * (k // 2))
    r, g, b = (int(int(hex_colour[i:i + 2], 16) * f) for i in (1, 3, 5))
    return f"#{r:02x}{g:02x}{b:02x}"


def _text(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return ", ".join(f"{k} {_text(x)}" for k, x in v.items())
    if isinstance(v, (list, tuple)):
        return ", ".join(_text(x) for x in v) or "none"
    return str(v)


def _claim_view(c) -> dict:
    """A claim as table cells: a claim dict (``id``, ``behaviour``, ``kind``, ``audit``: {"grade", "criteria"}) or an
    audit's grade dict (``claim_id``, ``letter``, ``criteria``, ``summary``); any other value as its JSON."""
    if isinstance(c, dict) and "claim_id" in c and "id" not in c:  # mechscope.safety.audit.Grade.to_dict()
        c = {"id": c["claim_id"], "behaviour": c.get("behaviour", ""), "kind": c.get("kind", ""),
             "audit": {"grade": c.get("letter"), "criteria": c.get("criteria"), "summary": c.get("summary")}}
    if not isinstance(c, dict) or "id" not in c:
        return {"raw": json.dumps(c, indent=1, ensure_ascii=False, default=str)}
    audit = c.get("audit", c.get("grade"))
    grade, criteria = None, []
    if isinstance(audit, dict):
        grade = audit.get("grade")
        for k in audit.get("criteria") or []:
            if isinstance(k, dict):
                criteria.append({"id": str(k.get("id", "?")), "passed": bool(k.get("passed")),
                                 "reason": str(k.get("reason") or "")})
    elif audit is not None:
        grade = audit
    summary = audit.get("summary") if isinstance(audit, dict) else None
    return {"id": str(c["id"]), "behaviour": _text(c.get("behaviour", "")), "kind": _text(c.get("kind", "")),
            "grade": None if grade is None else str(grade), "criteria": criteria,
            "summary": "" if summary is None else str(summary)}


def _build(runs, generations) -> tuple[dict, dict]:
    if isinstance(runs, dict) and "sweep" in runs:  # one run given bare
        runs = {str((runs.get("info") or {}).get("dataset", "probe run")): runs}
    if runs is not None and not isinstance(runs, dict):
        raise InputError(f"runs must be a dict {{title: run dict}}, got {type(runs).__name__}; {_FIX}.")
    figs: dict = {}
    run_views = [_run_view(i, str(t), r, figs) for i, (t, r) in enumerate((runs or {}).items())]
    gens = []
    for i, g in enumerate(generations or []):
        g = check_generation(g, i)
        figs[f"fig-g{i}"] = generation_figure(g)
        gens.append({"id": f"fig-g{i}", "anchor": f"gen-{i}", "tokens": token_strip(g), "threshold": g["threshold"],
                     "probe": str(g.get("probe") or "probe"), "rule": str(g.get("rule") or "rule"),
                     "prompt_index": g.get("prompt_index", i), "n_alarms": len(g["alarms"]),
                     "stopped": bool(g.get("stopped")), "flagged": bool(g.get("flagged")),
                     "n_prompt": g["prompt_len"], "n_tokens": len(g["tokens"])})
    return {"runs": run_views, "generations": gens}, figs


def safety_figures(runs: dict | None, generations: list[dict] | None = None) -> dict[str, dict]:
    """Every plotly figure of the report, keyed by the id of the element it is drawn into.

    Ids: ``fig-r{i}-auroc`` / ``fig-r{i}-recall`` (run i's layer sweep), ``fig-r{i}-roc-{j}`` (ROC on its j-th
    scored part), ``fig-r{i}-hist-{k}`` (method k's histograms), ``fig-g{i}`` (generation i).

    Raises:
        InputError: a run without sweep rows; a malformed generation (each names the fix).
    """
    return _build(runs, generations)[1]


def render_safety_html(*, runs: dict | None = None, generations: list[dict] | None = None,
                       claims: list | None = None, title: str = "Safety report") -> str:
    """The report as one HTML string (plotly.js inlined: about 5 MB).

    Args:
        runs: {title: ``ProbeRun.to_dict()`` (+ ``scores``)}, or one run dict.
        generations: monitored generations (``MonitoredGeneration.to_dict()`` + ``token_strings``, ``threshold``,
            ``probe``, ``rule``).
        claims: claim dicts (``id``, ``behaviour``, ``kind``, ``audit``); None or empty leaves the section out.
        title: the page's heading.

    Raises:
        InputError: nothing to show; as :func:`safety_figures`.
    """
    if not runs and not generations and not claims:
        raise InputError("nothing to report: give runs (probe runs), generations (monitored) or claims.")
    view, figs = _build(runs, generations)
    view["claims"] = [_claim_view(c) for c in claims or []]
    view["summary_columns"] = ["run", "method", "site", "AUROC [95% CI]", "recall at FPR [95% CI]",
                               "balanced accuracy [95% CI]", "random directions (mean ± std)", "shuffled labels",
                               "validation AUROC", "transfer AUROC [95% CI]"]
    return _env().get_template("safety.html.j2").render(
        v=view, title=title, figures=figs, figures_json=script_json(figs), plotly_js=Markup(plotly_js()),
        no_scores=NO_SCORES)


def write_safety_report(path, *, runs: dict | None = None, generations: list[dict] | None = None,
                        claims: list | None = None, title: str = "Safety report") -> Path:
    """Render the report and write it to ``path`` atomically (temporary file, then rename); returns the path.

    Raises:
        InputError: the folder of ``path`` does not exist; as :func:`render_safety_html`.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise InputError(f"cannot write {path}: its folder {path.parent} does not exist; create it first "
                         f"(mkdir -p {path.parent}) or choose a path in an existing folder.")
    page = render_safety_html(runs=runs, generations=generations, claims=claims, title=title)  # no file on error
    write_text_atomic(page, path)
    return path


__all__ = ["NO_SCORES", "check_run", "render_safety_html", "safety_figures", "write_safety_report"]
