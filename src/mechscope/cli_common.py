"""What every ``mechscope`` sub-command module shares: a MechscopeError becomes one red line and exit code 2.

It lives apart from :mod:`mechscope.cli` so that the sub-command modules (``cli_sae``, ``cli_features``)
can be imported on their own, in any order.
"""

from __future__ import annotations

import functools

import typer
from rich.console import Console
from rich.text import Text

from mechscope.core.errors import MechscopeError

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
