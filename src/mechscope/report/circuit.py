"""The circuit page: one self-contained HTML file (``circuit.html``) drawn from an ``evaluation.json`` alone.

Its content is :func:`~mechscope.report.circuit_view.circuit_view`: the circuit as a layered graph to hover
and click, faithfulness with its interval and the ablation, MIB's curves with interval bands and CPR / CMD,
the robustness and role tables, the strongest edges and the commands that rerun it. Safety as in the report:
the template autoescapes, the view reaches the page's script as escaped JSON, plotly.js is inlined and a
Content-Security-Policy forbids every fetch, so the page opens offline.
"""

from __future__ import annotations

from pathlib import Path

from markupsafe import Markup

from mechscope.core.io import write_text_atomic
from mechscope.report.circuit_view import circuit_view
from mechscope.report.render import _env, plotly_js, script_json


def render_circuit_html(ev: dict) -> str:
    """The circuit page as one HTML string (plotly.js inlined: about 5 MB)."""
    view = circuit_view(ev)
    return _env().get_template("circuit.html.j2").render(
        v=view, ev=ev, view_json=script_json({"figures": view["figures"], "nodes": view["nodes"]}),
        plotly_js=Markup(plotly_js()))


def write_circuit_page(ev: dict, out_dir, name: str = "circuit.html") -> Path:
    """Write the page into ``out_dir`` atomically; returns its path."""
    path = Path(out_dir) / name
    page = render_circuit_html(ev)  # render first: a template error leaves no file behind
    write_text_atomic(page, path)
    return path


__all__ = ["render_circuit_html", "write_circuit_page"]
