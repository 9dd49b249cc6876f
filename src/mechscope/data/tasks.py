"""Circuit tasks as data: load one from a JSONL file or by built-in name, save one as JSONL.

A JSONL task file holds one pair a line::

    {"clean": "The capital of France is the city of", "corrupt": "The capital of Spain is the city of",
     "answer": " Paris", "wrong": " Madrid", "group": "capitals"}

``answer`` and ``wrong`` must each be one token of the model's tokenizer (mind the leading space);
``group`` is optional (a template or scenario id; :meth:`Task.split` keeps a group on one side). Each
pair's clean and corrupted prompts must have the same token length. Pairs of different lengths from
other pairs can't share a batch: the most common length is kept and a warning says how many pairs of
which lengths were dropped.

This module re-exports :class:`Task`, :class:`TaskCheck`, :func:`check_task` and every built-in builder,
so ``from mechscope.data.tasks import ...`` reaches all of them.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import warnings
from collections import Counter
from pathlib import Path

import torch

from mechscope.core.errors import InputError
from mechscope.data.task import TASK_METRICS, Task, TaskCheck, check_task
from mechscope.data.task_builtins import docstring_task, greater_than_task, induction_task, ioi_task
from mechscope.data.task_facts import factual_recall_task
from mechscope.data.textfiles import check_text_field, jsonl_objects

#: Built-in task name -> builder ``(model, n, seed) -> Task``.
BUILTIN_TASKS = {
    "ioi": ioi_task,
    "induction": induction_task,
    "greater_than": greater_than_task,
    "factual_recall": factual_recall_task,
    "docstring": docstring_task,
}

_REQUIRED = ("clean", "corrupt", "answer", "wrong")
_KEYS = (*_REQUIRED, "group")


def _show(ids: list[int], tok) -> str:
    return "[" + ", ".join(repr(tok.decode([i])) for i in ids) + "]"


def _answer_id(path: Path, line: int, key: str, text: str, model) -> int:
    tok = model._need_tokenizer()
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if len(ids) == 1:
        return ids[0]
    hint = ""
    if not text.startswith(" ") and len(tok(" " + text, add_special_tokens=False)["input_ids"]) == 1:
        hint = f" {(' ' + text)!r} (with a leading space, as the word follows another) is one token: use that."
    raise InputError(
        f"{path}, line {line}: {key} {text!r} is {len(ids)} tokens for {model.cfg.name}'s tokenizer "
        f"{_show(ids, tok)}; an answer must be exactly one token, the next token the model predicts.{hint} "
        "Otherwise use a shorter answer (its first token) or another word.")


def _read_pairs(path: Path) -> list[dict]:
    rows = []
    for line, obj in jsonl_objects(path):
        missing = [k for k in _REQUIRED if k not in obj]
        unknown = sorted(set(obj) - set(_KEYS))
        if missing or unknown:
            raise InputError(
                f"{path}, line {line}: " + (f"missing {missing}" if missing else "") + ("; " if missing and unknown else "")
                + (f"unknown keys {unknown}" if unknown else "") + f". Each line needs {list(_REQUIRED)} (strings) "
                "and may have 'group'.")
        row = {k: check_text_field(path, line, k, obj[k]) for k in _KEYS if k in obj}
        row["line"] = line
        rows.append(row)
    if not rows:
        raise InputError(f"{path} holds no task pairs (it is empty or blank); write one JSON object a line with "
                         f"{list(_REQUIRED)}.")
    grouped = ["group" in r for r in rows]
    if any(grouped) and not all(grouped):
        line = rows[grouped.index(False)]["line"]
        raise InputError(f"{path}, line {line}: no 'group' while other lines have one; give every line a group or none.")
    return rows


def _lines(rows, limit: int = 5) -> str:
    shown = ", ".join(str(r["line"]) for r in rows[:limit])
    return shown + (f" and {len(rows) - limit} more" if len(rows) > limit else "")


def _load_jsonl(path: Path, model, n: int | None, metric: str) -> Task:
    if metric == "prob_mass":
        raise InputError(
            f"metric 'prob_mass' needs sets of answer tokens, which a JSONL task does not have; use "
            f"'logit_diff', 'prob' or 'kl' for {path}.")
    rows = _read_pairs(path)
    for r in rows:
        r["answer_id"] = _answer_id(path, r["line"], "answer", r["answer"], model)
        r["wrong_id"] = _answer_id(path, r["line"], "wrong", r["wrong"], model)
        r["len"] = model.to_tokens(r["clean"]).shape[1]
        r["corrupt_len"] = model.to_tokens(r["corrupt"]).shape[1]
    unequal = [r for r in rows if r["len"] != r["corrupt_len"]]
    if unequal:
        detail = "; ".join(f"line {r['line']}: {r['len']} vs {r['corrupt_len']}" for r in unequal[:5])
        raise InputError(
            f"{path}: {len(unequal)} of {len(rows)} pairs have clean and corrupted prompts of different token "
            f"lengths ({detail}{' ...' if len(unequal) > 5 else ''}; clean vs corrupted tokens for "
            f"{model.cfg.name}). Patching matches positions one to one, so reword the corrupted prompts to the "
            "clean ones' token length (check with model.to_str_tokens).")
    counts = Counter(r["len"] for r in rows)
    if len(counts) > 1:
        target = max(counts, key=lambda L: (counts[L], -L))
        dropped = [r for r in rows if r["len"] != target]
        others = ", ".join(f"{c} of {L} tokens" for L, c in sorted(counts.items()) if L != target)
        warnings.warn(
            f"{path}: pairs of different token lengths cannot share a batch; kept the {counts[target]} pairs of "
            f"{target} tokens (the most common length) and dropped {len(dropped)} ({others}; lines "
            f"{_lines(dropped)}). Give every pair one length to keep them all.", UserWarning, stacklevel=3)
        rows = [r for r in rows if r["len"] == target]
    if n is not None:
        if n < 1 or n > len(rows):
            raise InputError(f"{path}: asked for n={n} pairs but it holds {len(rows)} usable pairs; use 1 <= n <= {len(rows)}.")
        rows = rows[:n]
    groups = tuple(r["group"] for r in rows) if "group" in rows[0] else ()
    return Task(
        name=path.stem, clean_tokens=model.to_tokens([r["clean"] for r in rows]),
        corrupt_tokens=model.to_tokens([r["corrupt"] for r in rows]),
        answer=torch.tensor([r["answer_id"] for r in rows]), wrong=torch.tensor([r["wrong_id"] for r in rows]),
        metric=metric, clean_text=tuple(r["clean"] for r in rows), corrupt_text=tuple(r["corrupt"] for r in rows),
        groups=groups,
    )


def load_task(source: str | os.PathLike, model, *, n: int | None = None, metric: str | None = None,
              seed: int = 0) -> Task:
    """A task from a JSONL file or a built-in name ("ioi", "induction", "greater_than", "factual_recall",
    "docstring").

    Args:
        source: a built-in name, or the path of a JSONL file (format in the module docstring).
        model: a HookedModel with a tokenizer (its tokenizer decides token lengths and answer ids).
        n: number of prompts; None: the builder's default, or every usable pair of the file (else the
            first n of them).
        metric: override the task's metric ("logit_diff", "prob", "kl"; "prob_mass" only for tasks with
            answer sets, i.e. greater_than).
        seed: seed of a built-in builder.

    Returns:
        Task (a file's task is named after the file's stem).

    Raises:
        InputError: an unknown name (lists the close matches and the built-ins); a missing file; an empty
            file; a line that is not a JSON object (names the line); a missing or unknown key; an answer
            or wrong that is not one token (names the line and what it tokenizes to); a pair whose clean
            and corrupted prompts differ in token length (names the lines and lengths); n out of range;
            an unknown metric, or prob_mass for a task without answer sets.

    Warns:
        UserWarning: a file whose pairs have different token lengths: the most common length is kept and
            the warning counts the dropped pairs by length (ties keep the shorter length).
    """
    if metric is not None and metric not in TASK_METRICS:
        raise InputError(f"unknown metric {metric!r}; use one of {TASK_METRICS}.")
    kind, where = resolve_task_source(source)
    if kind == "builtin":
        task = BUILTIN_TASKS[where](model, **({} if n is None else {"n": n}), seed=seed)
        if metric is not None and metric != task.metric:
            if metric == "prob_mass":
                raise InputError(f"task {where!r} has no answer sets, so it cannot use metric 'prob_mass'; use "
                                 "'logit_diff', 'prob' or 'kl'.")
            task = dataclasses.replace(task, metric=metric)
        return task
    return _load_jsonl(where, model, n, metric or "logit_diff")


def resolve_task_source(source: str | os.PathLike) -> tuple[str, str | Path]:
    """What a task source names, checked without a model: ``("builtin", name)`` or ``("file", path)``.

    Callers that load the model later (the CLI) call this first, so a typo fails in a second.

    Raises:
        InputError: an unknown name (with close matches and the built-ins); a missing file; a folder.
    """
    name = os.fspath(source)
    if isinstance(source, str) and name in BUILTIN_TASKS:
        return "builtin", name
    path = Path(name).expanduser()
    if path.is_file():
        return "file", path
    if path.exists():
        raise InputError(f"{path} is not a file; a task is a JSONL file or one of {sorted(BUILTIN_TASKS)}.")
    if os.sep in name or "/" in name or path.suffix:
        raise InputError(f"no task file {path}; check the path, or use a built-in task: {sorted(BUILTIN_TASKS)}.")
    close = difflib.get_close_matches(name, list(BUILTIN_TASKS), n=3, cutoff=0.5)
    raise InputError(
        f"unknown task {name!r}" + (f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ".")
        + f" Built-in tasks: {sorted(BUILTIN_TASKS)}; or give the path of a JSONL file.")


def save_task(task: Task, path: str | os.PathLike, model) -> Path:
    """Write a task as JSONL that :func:`load_task` reads back (texts, answers decoded, groups).

    Args:
        task: a task with texts (every built-in except induction).
        path: the file to write (overwritten).
        model: the HookedModel whose tokenizer decodes the answer ids.

    Returns:
        The path written.

    Raises:
        InputError: a task without texts (built from token ids), or with answer sets (prob_mass), which
            JSONL does not hold.
    """
    if not task.clean_text:
        raise InputError(f"task {task.name!r} has no texts (it was built from token ids), so it cannot be saved as JSONL.")
    if task.answer_sets is not None:
        raise InputError(f"task {task.name!r} has answer sets (metric prob_mass), which a JSONL task file does not hold.")
    tok = model._need_tokenizer()
    path = Path(path)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(len(task)):
            row = {"clean": task.clean_text[i], "corrupt": task.corrupt_text[i],
                   "answer": tok.decode([int(task.answer[i])]), "wrong": tok.decode([int(task.wrong[i])])}
            if task.groups:
                row["group"] = task.groups[i]
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


__all__ = [
    "Task", "TaskCheck", "TASK_METRICS", "check_task", "load_task", "resolve_task_source", "save_task", "BUILTIN_TASKS",
    "ioi_task", "induction_task", "greater_than_task", "factual_recall_task", "docstring_task",
]
