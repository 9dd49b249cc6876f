"""What every ``mechscope`` command module shares: the consoles, the error handling, thread choice, tables,
and the checks that run before a model is loaded.

A :class:`~mechscope.core.errors.MechscopeError` becomes one red line on stderr and exit status 2; anything
else is a bug and keeps its traceback. Whatever can be checked without the model (option values, paths,
corpus names, dictionary folders, feature databases, output folders) is checked first, so a typo costs no
model load. What mechscope did other than asked (fewer tokens, a first download) is said on a yellow
``note:`` line. Command modules import this module and library code only, never each other, so each can be
imported on its own.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from mechscope.core.errors import InputError, MechscopeError

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


def clean_errors(fn):
    """Turn a MechscopeError into one red line on stderr and exit status 2 (no traceback); show the
    library's notes (INFO logs, e.g. a corpus fetched for the first time) while the command runs."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        show_library_notes()
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



#: Options shared by every command that reads a corpus.
CorpusOpt = typer.Option(["pydoc", "wikipedia", "austen", "shakespeare"], "--corpus", "-c",
                         help="corpus name, .txt/.jsonl/.parquet file, folder, or hf:NAME[:CONFIG] (repeatable)")
TextFieldOpt = typer.Option("text", "--text-field", help="the JSONL field / Parquet or hf: column holding the text")
SplitLinesOpt = typer.Option(False, "--split-lines",
                             help=".txt files: one document per non-blank line (default: one per file)")


def rank_threads(threads: int | None, info) -> int | None:
    """--threads for one rank of a torchrun job: as given, or the node's cores shared by its ranks
    (``LOCAL_WORLD_SIZE``) rather than each rank taking them all; None (the default choice) on one process."""
    if threads is not None or info.world_size == 1:
        return threads
    import os

    return max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", info.world_size)))


def set_threads(threads: int | None, announce: bool = True) -> tuple[int, str]:
    """Set torch's CPU threads to ``threads`` (from --threads) or to :func:`auto_threads`; say so if ``announce``."""
    import torch

    n, why = (threads, "--threads") if threads else auto_threads()
    torch.set_num_threads(n)
    if announce:
        out.print(Text(f"torch threads: {n} ({why})"))
    return n, why


def note(text: str) -> None:
    """Say, on a yellow ``note:`` line, something the command did other than the user may have expected."""
    out.print(Text(f"note: {text}", style="yellow"), soft_wrap=True)


class _NoteHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        note(record.getMessage())


def show_library_notes() -> None:
    """Print the library's INFO logs (logger ``mechscope``) as notes; the library itself stays quiet."""
    logger = logging.getLogger("mechscope")
    if not any(isinstance(h, _NoteHandler) for h in logger.handlers):
        logger.addHandler(_NoteHandler(level=logging.INFO))
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)


# -- checks that need no model ------------------------------------------------------------------------------
def check_choice(value: str, choices: Iterable[str], option: str) -> None:
    """Raises InputError naming ``option`` when ``value`` is not one of ``choices``."""
    choices = list(choices)
    if value not in choices:
        raise InputError(f"{option} must be one of {', '.join(choices)}; got {value!r}.")


def check_model_dtype(dtype: str, option: str = "--dtype") -> None:
    """Raises InputError unless ``dtype`` names a dtype a model can be loaded in."""
    from mechscope.models.loading import MODEL_DTYPES

    if dtype not in MODEL_DTYPES:
        raise InputError(f"{option} {dtype!r} is not a model dtype; use float32 or bfloat16 (bfloat16 is faster on "
                         "CPU; float16 also works but is slow there).")


def check_hook_name(hook: str, option: str = "--hook") -> None:
    """Raises InputError when ``hook`` is no hook name of any model (the layer is checked once a model is loaded)."""
    from mechscope.core.names import parse

    try:
        parse(hook)
    except MechscopeError as e:
        raise InputError(f"{option}: {e}. Run `mechscope hooks` for the full table.") from None


def _nearest_existing(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_out_dir(path: Path, option: str = "--out") -> None:
    """Raises InputError when ``path`` cannot be (or become) a folder this user can write into."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{option} {path} is a file, not a folder; pass a folder (created if missing).")
    base = _nearest_existing(path)
    if not base.is_dir():
        raise InputError(f"{option} {path}: {base} is a file, so the folder cannot be created there; pass another "
                         "path.")
    if not os.access(base, os.W_OK | os.X_OK):
        raise InputError(f"{option} {path}: {base} is not writable by this user; pass a folder you can write to "
                         "(or fix its permissions).")


def check_out_file(path: Path, option: str, example: str = "out") -> None:
    """Raises InputError when ``path`` cannot be written as a file (a folder there, or no write permission)."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{option} {path} is a folder; pass a file name, e.g. {path / example}.")
    if path.exists() and not os.access(path, os.W_OK):
        raise InputError(f"{option} {path} exists and is not writable by this user; pass another file name "
                         "(or fix its permissions).")
    check_out_dir(path.parent, option)


def check_corpora(sources: Sequence[str]) -> None:
    """Each corpus name is known (and fetchable here), each path exists; nothing is read or fetched."""
    from mechscope.data.sources import check_source

    for s in sources:
        check_source(s)


def load_dictionaries(folders: Sequence[Path], hook: str | None = None) -> list:
    """Load dictionary folders before the model: a missing folder, a bad cfg.json or truncated weights cost no
    model load (they are small next to the model)."""
    from mechscope.dictionaries import load_dictionary

    return [load_dictionary(f, hook=hook) for f in folders]


def labelled_option(source: str, option: str):
    """A labelled dataset (built-in name, ``.jsonl`` file or ``hf:`` source) named by ``option``; its errors name
    the option."""
    from mechscope.data.labelled_builtins import load_labelled

    try:
        return load_labelled(source)
    except InputError as e:
        raise InputError(f"{option}: {e}") from None


def load_probe(folder: Path, model=None):
    """A saved probe folder; with ``model``, one fitted for another model or width is refused."""
    from mechscope.safety.probe import Probe

    return Probe.load(folder, model=model)


#: Options that split a model across devices (accelerate), for commands that load one model.
DeviceMapOpt = typer.Option(None, "--device-map",
                            help="split the model across devices: auto (or balanced, sequential) or one device; "
                                 "hooks fire where each block runs")
MaxMemoryOpt = typer.Option(None, "--max-memory",
                            help="with --device-map: most each device may hold, e.g. 0=20GiB,cpu=60GiB; the rest "
                                 "goes to disk")
OffloadFolderOpt = typer.Option(None, "--offload-folder",
                                help="with --device-map: folder for offloaded weights (needed for .bin/GGUF "
                                     "checkpoints; safetensors are read in place)")


def parse_max_memory(text: str | None, option: str = "--max-memory") -> dict | None:
    """``0=20GiB,cpu=60GiB`` as ``{0: "20GiB", "cpu": "60GiB"}`` (None for None); devices and sizes are checked
    by :func:`mechscope.load`.

    Raises:
        InputError: a part that is not ``device=size``, or a device named twice.
    """
    if text is None:
        return None
    budget: dict = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        dev, eq, size = part.partition("=")
        dev, size = dev.strip(), size.strip()
        if not eq or not dev or not size:
            raise InputError(f"{option} takes device=size pairs like 0=20GiB,cpu=60GiB; {part!r} is not one.")
        key = int(dev) if dev.isdigit() else dev
        if key in budget:
            raise InputError(f"{option} names {dev} twice; give each device one size.")
        budget[key] = int(size) if size.isdigit() else size
    if not budget:
        raise InputError(f"{option} is empty; pass device=size pairs like 0=20GiB,cpu=60GiB.")
    return budget


def load_model(model: str, dtype: str, device_map: str | None = None, max_memory: str | None = None,
               offload_folder: Path | None = None):
    """``mechscope.load(model, dtype=dtype)``, split across devices when ``device_map`` (--device-map) is given;
    ``max_memory`` is the --max-memory text."""
    import mechscope

    if device_map is None and max_memory is None and offload_folder is None:
        return mechscope.load(model, dtype=dtype)
    return mechscope.load(model, dtype=dtype, device_map=device_map, max_memory=parse_max_memory(max_memory),
                          offload_folder=offload_folder)


def open_database(path: Path):
    """Open a feature database read-only (raises InputError/CorruptFileError for a missing or broken file)."""
    from mechscope.features.db import FeatureDB

    return FeatureDB(path, read_only=True)


# -- latent id lists ----------------------------------------------------------------------------------------
_RANGE = re.compile(r"(\d+)(?:-(\d+))?")


def parse_latents(text: str, option: str = "--latents") -> list[tuple[int, int]]:
    """Ids and ranges (``0-99,250,4000-4010``) as inclusive ``(first, last)`` pairs, without expanding them.

    Raises:
        InputError: a part that is neither an id nor a range, an empty range (``10-5``), or no id at all.
    """
    ranges = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        m = _RANGE.fullmatch(part)
        if m is None:
            raise InputError(f"{option} takes ids and ranges like 0-99,250; {part!r} (in {text!r}) is neither.")
        a, b = int(m.group(1)), int(m.group(2) or m.group(1))
        if b < a:
            raise InputError(f"{option}: the range {part} is empty (it runs from {a} down to {b}); write it low-high, "
                             f"e.g. {b}-{a}.")
        ranges.append((a, b))
    if not ranges:
        raise InputError(f"{option} names no latent; pass ids and ranges like 0-99,250.")
    return ranges


def expand_latents(ranges: Sequence[tuple[int, int]], n_latents: int, where: str, option: str = "--latents") -> list[int]:
    """The ids of ``ranges``, each once in first-listed order, all below ``n_latents`` (``where`` has them).

    Raises:
        InputError: an id at or past ``n_latents`` (names the valid range).
    """
    beyond = [f"{a}" if a == b else f"{a}-{b}" for a, b in ranges if b >= n_latents]
    if beyond:
        raise InputError(f"{option}: {', '.join(beyond)} {'is' if len(beyond) == 1 else 'are'} beyond the latents of "
                         f"{where}, which are 0-{n_latents - 1}; pass ids in that range.")
    from collections import Counter

    ids = [i for a, b in ranges for i in range(a, b + 1)]
    twice = [i for i, n in Counter(ids).items() if n > 1]
    if twice:
        shown = ", ".join(map(str, twice[:5])) + (", ..." if len(twice) > 5 else "")
        note(f"{option} lists {len(twice)} latent(s) more than once ({shown}); each is taken once, in the order "
             "first listed.")
    return list(dict.fromkeys(ids))


# -- tasks and run records (the circuit commands) --------------------------------------------------------------
def check_task_source(source: str) -> None:
    """A built-in task name or an existing file; anything else is refused (with close names) before the model loads."""
    from mechscope.data.tasks import resolve_task_source

    resolve_task_source(source)


def task_source(source: str) -> str:
    """The task as a run record keeps it: a built-in name, or a file's absolute path."""
    from mechscope.data.tasks import BUILTIN_TASKS

    p = Path(source).expanduser()
    return str(p.resolve()) if source not in BUILTIN_TASKS and p.is_file() else source


def checked_task(model, source: str, n: int | None, no_check: bool, notes: list[str]):
    """The task (``task_prompts``) and its check, printed: a task the model does not solve is refused unless
    ``no_check`` (``--no-check``), which adds a line to ``notes`` instead; library warnings go to ``notes``."""
    from mechscope.data.tasks import check_task
    from mechscope.circuits.runs import collected_warnings, task_prompts

    with collected_warnings(notes):
        task = task_prompts(model, source, n)
        check = check_task(model, task)
        out.print(Text(str(check)), soft_wrap=True)
        try:
            check.require()
        except InputError as e:
            if not no_check:
                raise InputError(f"{e} To go on anyway, pass --no-check.") from None
            notes.append(f"--no-check: going on although {check.n_correct} of {check.n} clean prompts prefer the "
                         "answer; the circuit describes a behaviour the model does not reliably have.")
    return task, check


def rerun_command(group: str, fn, values: dict) -> str:
    """The command line that reruns command ``fn`` of ``mechscope <group>`` with these parameter ``values`` (its
    locals): the arguments, then every option that differs from its default."""
    import inspect
    import shlex

    from typer.models import ArgumentInfo

    parts = ["mechscope", group, fn.__name__.removesuffix("_cmd").replace("_", "-")]
    for name, p in inspect.signature(fn).parameters.items():
        v = values[name]
        if isinstance(p.default, ArgumentInfo):
            parts.append(str(v))
        elif v is not None and v != p.default.default:
            flag = "--" + {"out_dir": "out", "out_file": "out"}.get(name, name.replace("_", "-"))
            parts += [flag if v else "--no-" + flag[2:]] if isinstance(v, bool) else [flag, str(v)]
    return shlex.join(parts)


def print_titled(title: str, table: Table) -> None:
    """Print a bold title line, then the table (a rich title would wrap to the table's width)."""
    out.print(Text(title, style="bold"), soft_wrap=True)
    print_table(table)
