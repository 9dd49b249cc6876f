"""What every ``mechscope`` command module shares: the consoles, the error handling, thread choice, tables.

A :class:`~mechscope.core.errors.MechscopeError` becomes one red line on stderr and exit status 2; anything
else is a bug and keeps its traceback. Command modules import this module and library code only, never
each other, so each can be imported on its own.
"""

from __future__ import annotations

import functools
import os

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from mechscope.core.errors import MechscopeError

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


def clean_errors(fn):
    """Turn a MechscopeError into one red line on stderr and exit status 2 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MechscopeError as e:
            msg = " ".join(str(e).split())  # one line, whatever the message holds
            err.print(Text(f"error: {msg}", style="bold red"), soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


def print_table(table: Table) -> None:
    """Print a table without wrapping cells, even when stdout is a pipe (rich then assumes 80 columns)."""
    from rich.measure import Measurement

    need = Measurement.get(out, out.options.update(width=10_000), table).maximum
    Console(highlight=False, width=max(out.width, need)).print(table)


def auto_threads() -> tuple[int, str]:
    """Torch threads for a long CPU job: the cores that other processes leave idle (1-minute load average).

    On an oversubscribed CPU, OpenMP threads that wait for each other make every op slower; measured
    on a 2-core machine at load ~4: 2 threads were 8x slower than 1 on small forwards, and no faster on
    large ones. Returns (threads, reason).
    """
    import torch

    n = torch.get_num_threads()
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # not on every platform
        return n, "torch default"
    cores = os.cpu_count() or n
    return max(1, min(n, cores - int(load))), f"auto: load {load:.1f} on {cores} cores"

