"""HTML + JSON pages for the toy reproductions (``mechscope.toys``): the paper's numbers beside ours, the
figures, and the settings that reproduce them. Same safety as the main report: autoescaped template,
figure data as escaped JSON, a CSP that forbids every fetch, plotly inlined (the page opens offline)."""

from __future__ import annotations

from pathlib import Path

from markupsafe import Markup

from mechscope.core.io import write_json_atomic, write_text_atomic
from mechscope.report.render import _env, plotly_js, script_json


def render_toy_html(result: dict) -> str:
    """One toy result (see ``mechscope.toys.common``) as a self-contained HTML page."""
    figures = {f["id"]: f["fig"] for f in result["figures"]}
    return _env().get_template("toy.html.j2").render(r=result, figures_json=script_json(figures),
                                                      plotly_js=Markup(plotly_js()))


def write_toy_report(result: dict, out: str | Path) -> tuple[Path, Path]:
    """Write ``<out>/<toy>.html`` and ``<out>/<toy>.json`` (each atomically); returns both paths."""
    out = Path(out)
    html, js = out / f"{result['toy']}.html", out / f"{result['toy']}.json"
    page = render_toy_html(result)  # render first: a template error leaves no file behind
    write_json_atomic(result, js)
    write_text_atomic(page, html)
    return html, js
