"""The report's circuit section (``mechscope report --circuit DIR``): per circuit, its faithfulness with the
interval, MIB's curve and the graph, each with a link to the circuit's own page beside the report.

A folder that holds ``evaluation.json`` (from ``mechscope circuit evaluate``) is read as it is. A folder with
only ``discover`` output is evaluated here, kept short: corrupted ablation, edge level, at most
:data:`MAX_PROMPTS` of its held-out prompts, CPR and CMD curves when it has edge scores, no robustness
table or head roles; the section says what was done and how long it took.
"""

from __future__ import annotations

import time
from pathlib import Path

from mechscope.circuits.runs import FILES, evaluate_run, held_out, open_run, read_evaluation

#: Held-out prompts a report evaluates at most (a discover folder without evaluation.json).
MAX_PROMPTS = 32


def check_circuit_folders(folders) -> None:
    """Before the model loads: each folder holds a readable evaluation.json or a discover folder's circuit.json.

    Raises:
        InputError: a folder with neither (says which command makes one). CorruptFileError: unreadable files.
    """
    for folder in folders:
        if (Path(folder) / FILES["evaluation"]).is_file():
            read_evaluation(folder)
        else:
            open_run(folder)


def circuit_section(folders, model, *, n_boot: int = 1000, progress: bool = True) -> list[dict]:
    """One entry per folder: ``name``, ``folder``, ``how`` (read, or evaluated here and how), ``page`` (the
    circuit page's file name beside the report) and ``evaluation`` (the record the page is drawn from)."""
    out = []
    for i, folder in enumerate(Path(f) for f in folders):
        if (folder / FILES["evaluation"]).is_file():
            ev = read_evaluation(folder)
            how = f"read from {folder / FILES['evaluation']} (mechscope circuit evaluate)"
        else:
            run = open_run(folder)
            t = time.perf_counter()
            task, info = held_out(model, run)
            n_all = len(task)
            if n_all > MAX_PROMPTS:
                task = task.subset(slice(0, MAX_PROMPTS))
                info = {**info, "n_prompts": MAX_PROMPTS, "split": f"held-out, the first {MAX_PROMPTS} of {n_all}"}
            curve = run.method != "acdc"
            ev = evaluate_run(model, run, task, info, curve=curve, n_boot=n_boot, progress=progress,
                              command=f"mechscope report --circuit {folder}")
            how = (f"evaluated by mechscope report in {time.perf_counter() - t:.0f} s (no evaluation.json in the "
                   f"folder): corrupted ablation, edge level, {len(task)} of its {n_all} held-out prompts"
                   + (", CPR/CMD curves" if curve else "") + f"; no robustness table or head roles. Run mechscope "
                   f"circuit evaluate {folder} --curve --robustness for the full evaluation.")
        out.append({"name": folder.resolve().name, "folder": str(folder), "how": how, "page": f"circuit-{i}.html",
                    "evaluation": ev})
    return out


def circuit_figures(section: list[dict]) -> dict:
    """Plotly specs per circuit: ``fig-circuit-graph-{i}`` and, when computed, ``fig-circuit-curve-{i}``."""
    from mechscope.report.circuit_view import circuit_view

    figs = {}
    for i, entry in enumerate(section):
        view = circuit_view(entry["evaluation"])
        for key, fig in view["figures"].items():
            figs[f"fig-circuit-{key}-{i}"] = fig
    return figs


__all__ = ["MAX_PROMPTS", "check_circuit_folders", "circuit_figures", "circuit_section"]
