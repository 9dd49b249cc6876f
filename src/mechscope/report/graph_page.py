"""The attribution-graph page: one self-contained HTML file (``graph.html``) drawn from the graph JSON alone.

Its content is :func:`~mechscope.report.graph_view.graph_view`. Safety as in the other pages: the template
autoescapes, the view reaches the page's script as escaped JSON, plotly.js is inlined and a
Content-Security-Policy forbids every fetch, so the page opens offline.
"""

from __future__ import annotations

from pathlib import Path

from markupsafe import Markup

from mechscope.core.io import write_text_atomic
from mechscope.report.graph_view import graph_view
from mechscope.report.render import _env, plotly_js, script_json


def render_graph_html(graph_json: dict) -> str:
    """The graph page as one HTML string (plotly.js inlined: about 5 MB)."""
    view = graph_view(graph_json)
    return _env().get_template("graph.html.j2").render(
        v=view, view_json=script_json({"figure": view["figure"], "nodes": view["nodes"], "pinned": view["pinned"]}),
        plotly_js=Markup(plotly_js()))


def write_graph_page(graph_json: dict, path) -> Path:
    """Write the page to ``path`` atomically; returns it."""
    page = render_graph_html(graph_json)  # render first: a template error leaves no file behind
    write_text_atomic(page, Path(path))
    return Path(path)


__all__ = ["render_graph_html", "write_graph_page"]
