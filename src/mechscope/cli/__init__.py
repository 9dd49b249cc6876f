"""The ``mechscope`` command line, one module per command group.

:mod:`~mechscope.cli.common` holds what every command shares (consoles, one-line errors with exit
status 2, thread choice); :mod:`~mechscope.cli.root` the top-level commands (``version``, ``hooks``,
``lens``, ``report``, ``serve``); :mod:`~mechscope.cli.sae`, :mod:`~mechscope.cli.features` and
:mod:`~mechscope.cli.toys` the ``sae``, ``features`` and ``toy`` groups; :mod:`~mechscope.cli.circuit` the
``circuit`` group; :mod:`~mechscope.cli.probe` and :mod:`~mechscope.cli.monitor` the ``probe`` and ``monitor``
groups; :mod:`~mechscope.cli.audit`, :mod:`~mechscope.cli.finetune`, :mod:`~mechscope.cli.diff` and
:mod:`~mechscope.cli.plant` the ``audit``, ``finetune``, ``diff`` and ``plant`` commands; :mod:`~mechscope.cli.dist` the
``dist`` group (torchrun start-up checks); :mod:`~mechscope.cli.plan` the ``plan`` group (memory, disk and time
of a run, predicted). This module only
assembles them: the command modules import ``common`` and library code, never each other.
"""

from __future__ import annotations

from mechscope.cli.audit import audit
from mechscope.cli.circuit import circuit_app
from mechscope.cli.common import auto_threads, clean_errors
from mechscope.cli.diff import diff_cmd
from mechscope.cli.dist import dist_app
from mechscope.cli.features import features_app
from mechscope.cli.finetune import finetune_cmd
from mechscope.cli.graph import graph_cmd, transcoders_app
from mechscope.cli.monitor import monitor_app
from mechscope.cli.plan import plan_app
from mechscope.cli.plant import plant_cmd
from mechscope.cli.probe import probe_app
from mechscope.cli.root import app
from mechscope.cli.sae import sae_app
from mechscope.cli.toys import toys_app

app.add_typer(sae_app, name="sae")
app.add_typer(features_app, name="features")
app.add_typer(toys_app, name="toy")
app.add_typer(circuit_app, name="circuit")
app.add_typer(probe_app, name="probe")
app.add_typer(monitor_app, name="monitor")
app.add_typer(transcoders_app, name="transcoders")
app.add_typer(dist_app, name="dist")
app.add_typer(plan_app, name="plan")
app.command("graph")(graph_cmd)
app.command("audit")(audit)
app.command("finetune")(finetune_cmd)
app.command("diff")(diff_cmd)
app.command("plant")(plant_cmd)

__all__ = ["app", "auto_threads", "clean_errors", "main"]


def main() -> None:  # pragma: no cover - `python -m mechscope.cli`
    """Run the command line (the ``mechscope`` entry point is :data:`app` itself)."""
    app()
