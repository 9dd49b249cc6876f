"""HTML rendering of a results dict: one self-contained file (plotly.js inline once, no network).

Safety: the template is rendered with autoescape, so every token string is HTML-escaped; data given to
scripts is JSON with ``<``, ``>``, ``&`` and the JS line separators written as ``\\uXXXX`` escapes, so a
token such as ``</script>`` cannot end a script element. A Content-Security-Policy forbids every
network fetch (``default-src 'none'``).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from markupsafe import Markup

from mechscope.report.figures import build_figures, visible

_TEMPLATES = Path(__file__).parent / "templates"
_JS_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def script_json(obj: Any) -> Markup:
    """JSON safe to place inside a ``<script>`` element (and valid JavaScript)."""
    text = json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    for ch, esc in _JS_ESCAPES.items():
        text = text.replace(ch, esc)
    return Markup(text)


@functools.lru_cache(maxsize=1)
def plotly_js() -> str:
    """The plotly.js bundle shipped with the plotly package, ready to inline in a script element."""
    from plotly.offline import get_plotlyjs

    js = get_plotlyjs()
    return js.replace("</script", "<\\/script")  # inert inside JS strings and regexes; never present today


@functools.lru_cache(maxsize=1)
def _env():
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(_TEMPLATES)),
        autoescape=True,  # every {{ }} is HTML-escaped, whatever the file extension
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["tok"] = visible
    env.filters["num"] = _num
    return env


def _num(x, digits: int = 3) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, bool) or isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        if x == 0:
            return "0"
        return f"{x:.{digits}g}" if abs(x) < 1e-3 or abs(x) >= 1e5 else f"{x:.{digits}f}"
    return str(x)


def render_html(results: dict) -> str:
    """The report as one HTML string (about 5 MB, most of it plotly.js)."""
    figures = build_figures(results)
    return _env().get_template("report.html.j2").render(
        r=results,
        figures=figures,
        figures_json=script_json(figures),
        plotly_js=Markup(plotly_js()),
    )
