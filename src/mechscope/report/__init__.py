"""The mechscope report: standard analyses of one model as results.json and a self-contained HTML page.

``mechscope report`` (see :mod:`mechscope.cli`) calls :func:`build_report`; :func:`render_html`
re-renders a report from a saved results.json.
"""

from mechscope.report.build import (
    ReportConfig,
    ReportPaths,
    build_report,
    compute_results,
    write_report,
)
from mechscope.report.diff import render_diff_report
from mechscope.report.render import render_html

__all__ = [
    "ReportConfig",
    "ReportPaths",
    "build_report",
    "compute_results",
    "render_diff_report",
    "render_html",
    "write_report",
]
