"""The model-scan report: one self-contained HTML page from a :class:`~mechscope.forensics.scan.ScanResult` or its
scan.json.

Sections, all drawn from ``ScanResult.to_dict()`` (so a saved scan.json re-renders the same page):

- findings: every claim with its grade on the audit rubric (as stored by the scan: the audit is
  deterministic), the reason, a tick per criterion, and each test's evidence (estimate, interval, controls);
- trigger candidates: the search's ranking with its exact KL and generation test, and the confirmation of the top
  candidate against random tokens on the held-out split;
- the defection probe's AUROC per layer with its interval and the random directions' range;
- the localisation ranking (cross-model patching effect per component) and the removal before/after beside the
  random-component controls;
- the diff report's summary cards and key figures (weights per layer, logit-lens KL), from
  :mod:`mechscope.report.diff`'s own page data.

Safety as in the other reports: autoescaping of every string (tokens included), figure data as escaped JSON
(:func:`~mechscope.report.render.script_json`), plotly.js inlined and a Content-Security-Policy forbidding fetches.
"""

from __future__ import annotations

import json
from pathlib import Path

from markupsafe import Markup

from mechscope.core.errors import InputError
from mechscope.core.io import write_text_atomic
from mechscope.report.diff import as_diff_dict, diff_page_data, fmt_num, fmt_pct
from mechscope.report.layout import layout
from mechscope.report.render import _env, plotly_js, script_json
from mechscope.report.safety_figures import COLOURS, esc

_FIX = "give a ScanResult (mechscope.forensics.scan_models), its to_dict(), or the path of a scan.json"
_DIFF_FIGS = ("fig-w-bars", "fig-lens")


def as_scan_dict(result) -> dict:
    """The JSON-ready dict of a ScanResult, a scan dict, or a scan.json path (a folder: its scan.json).

    Raises:
        InputError: a missing file, invalid JSON, or a dict that is not a scan (no ``mechscope.scan/1`` schema).
    """
    if hasattr(result, "to_dict") and hasattr(result, "triggers"):
        result = result.to_dict()
    elif isinstance(result, (str, Path)):
        path = Path(result)
        path = path / "scan.json" if path.is_dir() else path
        if not path.is_file():
            raise InputError(f"no scan file at {path}; {_FIX}.")
        try:
            result = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise InputError(f"{path} is not valid JSON ({e}); rerun `mechscope audit --model --base`.") from e
    if not isinstance(result, dict) or result.get("schema") != "mechscope.scan/1":
        raise InputError(f"not a scan result (schema 'mechscope.scan/1' missing); {_FIX}.")
    as_diff_dict(result["diff"])
    return result


def _ci(t: dict) -> str:
    if t.get("low") is None:
        return f"{fmt_num(t['estimate'])} (no interval)"
    return f"{fmt_num(t['estimate'])} [{fmt_num(t['low'])}, {fmt_num(t['high'])}]"


def _control(x: dict) -> str:
    text = f"{x['name']}: {fmt_num(x['estimate'])}"
    if x.get("low") is not None:
        text += f" [{fmt_num(x['low'])}, {fmt_num(x['high'])}]"
    return text + (f", n {x['n']}" if x.get("n") else "")


def _findings(d: dict) -> tuple[list[dict], dict]:
    """Rows of claims with their grades, from the claims and the audit stored in the scan (JSON only: the report
    stage reads what the forensics stage graded, and never imports the grader)."""
    audit = d.get("audit")
    if not audit or len(audit.get("grades", [])) != len(d["claims"]):
        raise InputError(f"the scan result holds no audit of its claims; {_FIX}.")
    rows = []
    for c, g in zip(d["claims"], audit["grades"]):
        tests = [{"name": t["name"], "kind": t["kind"], "intervention": t["intervention"], "metric": t.get("metric", ""),
                  "units": t.get("units", ""), "value": _ci(t), "null": fmt_num(t["null"]), "n": t.get("n"),
                  "held_out": t.get("held_out", False), "deciding": i == g["deciding_test"],
                  "controls": [_control(x) for x in t.get("controls", [])],
                  "note": str((t.get("details") or {}).get("evidence", ""))} for i, t in enumerate(c["tests"])]
        grade = {**g, "results": g["criteria"]}
        rows.append({"claim": c, "grade": grade, "tests": tests})
    return rows, {"counts": audit["counts"], "criteria": audit["rubric"]["criteria"],
                  "version": audit["rubric"]["version"]}


def _defection_fig(p: dict) -> dict:
    layers = sorted(p["layers"], key=int)
    au = [p["layers"][L]["auroc"] for L in layers]
    x = [int(L) for L in layers]
    lo = [min(p["layers"][L]["random_auroc"] or [0.5]) for L in layers]
    hi = [max(p["layers"][L]["random_auroc"] or [0.5]) for L in layers]
    data = [{"type": "scatter", "x": x + x[::-1], "y": hi + lo[::-1], "fill": "toself", "name": "random directions "
             "(range)", "line": {"width": 0}, "fillcolor": "rgba(120,120,120,0.2)", "hoverinfo": "skip"},
            {"type": "scatter", "mode": "lines+markers", "x": x, "y": [a["estimate"] for a in au], "name": "probe AUROC",
             "line": {"color": COLOURS[0]},
             "error_y": {"type": "data", "symmetric": False, "array": [a["high"] - a["estimate"] for a in au],
                         "arrayminus": [a["estimate"] - a["low"] for a in au]},
             "hovertemplate": "layer %{x}: AUROC %{y:.3f}<extra></extra>"}]
    return {"data": data, "layout": layout("Defection probe AUROC per layer (triggered vs clean)", height=340,
                                           xaxis={"title": {"text": "layer"}, "dtick": 1},
                                           yaxis={"title": {"text": "AUROC"}, "range": [0, 1.05]})}


def _location_fig(loc: dict) -> dict:
    rows = loc["ranking"][:20]
    names = [esc("@".join(str(x) for x in r["component"])) for r in rows]
    return {"data": [{"type": "bar", "x": names, "y": [r["effect"] for r in rows], "marker": {"color": COLOURS[1]},
                      "hovertemplate": "%{x}: %{y:.4g} nats<extra></extra>"}],
            "layout": layout("Localisation: fall of the defection log-prob when the base's activation is patched in",
                             height=340, yaxis={"title": {"text": "effect (nats)"}, "automargin": True})}


def _removal_fig(rem: dict) -> dict:
    names = ["before", "after (located)"] + [f"random {i + 1}" for i in range(len(rem["controls"]))]
    vals = [rem["before"]["rate"], rem["after"]["rate"]] + [c["after"]["rate"] for c in rem["controls"]]
    colours = [COLOURS[7], COLOURS[2]] + [COLOURS[7]] * len(rem["controls"])
    return {"data": [{"type": "bar", "x": names, "y": vals, "marker": {"color": colours},
                      "hovertemplate": "%{x}: %{y:.3f}<extra></extra>"}],
            "layout": layout("Attack success on held-out triggered messages", height=340,
                             yaxis={"title": {"text": "share of messages"}, "range": [0, 1.05]})}


def _page(d: dict) -> tuple[dict, dict]:
    rows, rubric = _findings(d)
    dview, dfigs = diff_page_data(as_diff_dict(d["diff"]))
    figs = {k: dfigs[k] for k in _DIFF_FIGS if k in dfigs}
    figs["fig-defection"] = _defection_fig(d["defection"])
    cands = [{"rank": c["rank"], "text": c["text"], "sources": ", ".join(c["sources"]), "kl": fmt_num(c["kl"]),
              "test": None if not c.get("test") else {
                  "changed": fmt_pct(c["test"]["changed"]), "consistency": fmt_pct(c["test"]["consistency"]),
                  "defection": fmt_pct(c["test"]["defection"]), "modal": c["test"]["modal_answer"],
                  "flagged": c["test"]["flagged"]}} for c in d["triggers"]["candidates"][:20]]
    conf = d["confirmation"]
    confirm = [{"text": x["text"], "defection": fmt_pct(x["defection"]), "changed": fmt_pct(x["changed"]),
                "modal": x["modal_answer"], "kl": fmt_num(x["kl"])} for x in [conf["candidate"], *conf["random"]]]
    probe = [{"layer": L, "auroc": fmt_num(v["auroc"]["estimate"], 3), "ci": f"[{fmt_num(v['auroc']['low'], 3)}, "
              f"{fmt_num(v['auroc']['high'], 3)}]", "random": fmt_num(v["random_mean"], 3),
              "range": f"[{fmt_num(min(v['random_auroc'] or [float('nan')]), 3)}, "
                       f"{fmt_num(max(v['random_auroc'] or [float('nan')]), 3)}]",
              "share": fmt_pct(v["random_share_at_least"])} for L, v in sorted(d["defection"]["layers"].items(),
                                                                           key=lambda t: int(t[0]))]
    loc = rem = None
    if d.get("location"):
        figs["fig-location"] = _location_fig(d["location"])
        loc = {"rows": [["@".join(str(x) for x in r["component"]), fmt_num(r["effect"]), fmt_pct(r["recovered"])]
                        for r in d["location"]["ranking"][:15]],
               "tuned": fmt_num(d["location"]["tuned_value"]), "base": fmt_num(d["location"]["base_value"])}
    if d.get("removal"):
        r = d["removal"]
        figs["fig-removal"] = _removal_fig(r)
        rem = {"components": ", ".join("@".join(str(x) for x in c) for c in r["components"]),
               "before": fmt_pct(r["before"]["rate"]), "after": fmt_pct(r["after"]["rate"]),
               "control": fmt_pct(r["control_mean_after"]), "ppl": fmt_pct(r["perplexity"]["change"]),
               "ppl_ci": f"[{fmt_pct(r['perplexity']['low'])}, {fmt_pct(r['perplexity']['high'])}]",
               "controls": [["@".join(str(x) for x in c) for c in k["components"]] + [fmt_pct(k["after"]["rate"])]
                            for k in r["controls"]]}
    splits = [[k, v["n"], v["fingerprint"]] for k, v in d["splits"].items()]
    view = {"base": str(d["base"]), "tuned": str(d["tuned"]), "trigger": d["trigger"], "defection": d["defection_text"],
            "rows": rows, "rubric": rubric, "cands": cands, "confirm": confirm, "probe": probe, "loc": loc, "rem": rem,
            "diff_cards": dview["cards"], "diff_figs": [k for k in _DIFF_FIGS if k in figs], "splits": splits,
            "skipped": d.get("skipped") or [], "pairs": d["defection"]["pairs"],
            "settings": [[k, str(v)] for k, v in (d.get("settings") or {}).items()],
            "seconds": ", ".join(f"{k} {fmt_num(v, 3)} s" for k, v in (d.get("seconds") or {}).items())}
    return view, figs


def render_scan_html(result, *, title: str | None = None) -> str:
    """The scan report as one HTML string (plotly.js inlined: about 5 MB).

    Args:
        result: a :class:`~mechscope.forensics.scan.ScanResult`, its ``to_dict()``, or a scan.json path or folder.
        title: the page's heading; default "Model scan: TUNED vs BASE".

    Raises:
        InputError: as :func:`as_scan_dict`; invalid stored claims (naming the claim and field).
    """
    view, figs = _page(as_scan_dict(result))
    title = title or f"Model scan: {view['tuned']} vs {view['base']}"
    return _env().get_template("scan.html.j2").render(v=view, title=title, figures_json=script_json(figs),
                                                      plotly_js=Markup(plotly_js()))


def render_scan_report(result, out_path, *, title: str | None = None) -> Path:
    """Render the scan report and write it to ``out_path`` atomically; returns the path.

    Raises:
        InputError: the folder of ``out_path`` does not exist; as :func:`render_scan_html`.
    """
    path = Path(out_path)
    if not path.parent.is_dir():
        raise InputError(f"cannot write {path}: its folder {path.parent} does not exist; create it first "
                         f"(mkdir -p {path.parent}) or choose a path in an existing folder.")
    page = render_scan_html(result, title=title)
    write_text_atomic(page, path)
    return path


__all__ = ["as_scan_dict", "render_scan_html", "render_scan_report"]
