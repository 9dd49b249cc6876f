"""A circuit run on disk: what ``mechscope circuit discover`` leaves in its folder, the held-out prompts it
recorded, and the evaluation record that ``mechscope circuit evaluate`` writes and the circuit page reads.

A discover folder holds:

- ``circuit.json``: the circuit (:meth:`~mechscope.circuits.Circuit.save`: its edges, every edge's score,
  how it was selected, provenance);
- ``scores.safetensors``: every edge's score ``scores [n_edges]`` and per-prompt scores ``per_prompt
  [n_train, n_edges]`` (float32, the task metric's raw units; ``scored [n_edges]`` bool for ``exact`` on a
  subset), or for ACDC its trace (``acdc_candidate`` int64 edge or node indices in visiting order,
  ``acdc_before`` / ``acdc_after`` / ``acdc_damage`` float64, ``acdc_kept`` / ``acdc_evaluated`` bool) and
  ``kept [n_edges]``. String metadata: ``format``, ``format_version``, ``model``, ``graph`` (JSON of the graph
  shape), ``method``, ``steps``, ``info`` (JSON). No pickle;
- ``mib.json``: the circuit in EAP-IG / MIB's graph JSON (:meth:`~mechscope.circuits.Circuit.to_mib`);
- ``discover.json``: the run record: command, model, task (source, n, metric, seed) and its split (test
  fraction, seed, sizes and a hash of the held-out prompts, so ``evaluate`` can prove it uses the same ones),
  the task check, method, selection and timings.

``evaluation.json`` (schema :data:`EVALUATION_SCHEMA`) holds every number ``evaluate`` measured, plus the
circuit's edges with their scores and kinds, so the page (:mod:`mechscope.report.circuit`) is built from it
alone.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from mechscope.core.errors import CorruptFileError, InputError
from mechscope.core.io import jsonable, save_safetensors_atomic

SCORES_FORMAT = "mechscope.edge_scores"
DISCOVER_SCHEMA = "mechscope.circuit_discover/1"
EVALUATION_SCHEMA = "mechscope.circuit_evaluation/1"
FILES = {"circuit": "circuit.json", "scores": "scores.safetensors", "mib": "mib.json", "discover": "discover.json",
         "evaluation": "evaluation.json", "page": "circuit.html"}


def graph_shape(graph) -> dict:
    """The shape a circuit file records (``Circuit.save``'s ``graph``): layers, heads, KV heads, parallel, edges."""
    return {"n_layers": graph.n_layers, "n_heads": graph.n_heads, "n_kv_heads": graph.n_kv_heads,
            "parallel": bool(graph.parallel), "n_edges": graph.n_edges}


def prompts_hash(task) -> str:
    """16 hex digits of SHA-256 over a task's clean and corrupted tokens and answers: the same prompts or not."""
    h = hashlib.sha256()
    for t in (task.clean_tokens, task.corrupt_tokens, task.answer, task.wrong):
        h.update(t.detach().cpu().long().numpy().tobytes())
    return h.hexdigest()[:16]


# -- scores.safetensors ---------------------------------------------------------------------------------------
def save_scores(path, graph, *, scores=None, acdc=None) -> Path:
    """Write edge scores (an :class:`~mechscope.circuits.EdgeScores`) or an ACDC result's trace, atomically."""
    meta = {"format": SCORES_FORMAT, "format_version": "1", "model": graph.model_name,
            "graph": json.dumps(graph_shape(graph))}
    if scores is not None:
        tensors = {"scores": scores.scores.float()}
        if scores.per_prompt is not None:
            tensors["per_prompt"] = scores.per_prompt.float()
        if scores.scored is not None:
            tensors["scored"] = scores.scored.bool()
        meta.update(method=scores.method, steps=str(scores.steps), info=json.dumps(jsonable(scores.info)))
    else:
        trace = acdc.trace
        index = ({n: i for i, n in enumerate(graph.sources)} if acdc.level == "node"
                 else {n: i for i, n in enumerate(graph.edge_names())})
        tensors = {"kept": acdc.kept.bool(), "kept_nodes": acdc.kept_nodes.bool(),
                   "acdc_candidate": torch.tensor([index[s.candidate] for s in trace], dtype=torch.long)}
        for key in ("before", "after", "damage"):
            tensors[f"acdc_{key}"] = torch.tensor([getattr(s, key) for s in trace], dtype=torch.float64)
        for key in ("kept", "evaluated"):
            tensors[f"acdc_{key}"] = torch.tensor([getattr(s, key) for s in trace], dtype=torch.bool)
        info = {"level": acdc.level, "tau": acdc.tau, "metric": acdc.metric, "absolute": acdc.absolute,
                "complete": acdc.complete, "untested": acdc.untested, "n_forwards": acdc.n_forwards,
                "task_values": acdc.task_values, **acdc.info}
        meta.update(method="acdc", steps="1", info=json.dumps(jsonable(info)))
    save_safetensors_atomic(tensors, Path(path), metadata=meta)
    return Path(path)


def load_scores(path, graph):
    """The :class:`~mechscope.circuits.EdgeScores` saved by :func:`save_scores`, or None for an ACDC run (it
    gives kept edges and a trace, not scores).

    Raises:
        CorruptFileError: missing, unreadable or not this format.
        InputError: scores of another model's graph.
    """
    from safetensors import SafetensorError, safe_open

    from mechscope.circuits import EdgeScores

    path = Path(path)
    if not path.is_file():
        raise CorruptFileError(f"{path} is missing; the circuit's folder lost its scores. Re-run mechscope circuit "
                               "discover to write them.")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CorruptFileError(f"{path} is not a readable safetensors file ({e}); re-run mechscope circuit "
                               "discover.") from None
    if meta.get("format") != SCORES_FORMAT:
        raise CorruptFileError(f"{path} is not a mechscope edge-score file (its format is {meta.get('format')!r}).")
    if json.loads(meta["graph"]) != graph_shape(graph):
        raise InputError(f"{path} holds scores of {meta.get('model')} ({meta['graph']}), not of {graph.model_name} "
                         f"({json.dumps(graph_shape(graph))}); evaluate it with --model {meta.get('model')}.")
    if meta["method"] == "acdc":
        return None
    return EdgeScores(graph, tensors["scores"], tensors.get("per_prompt"), meta["method"], int(meta["steps"]),
                      tensors.get("scored"), json.loads(meta["info"]))


# -- the run folder -------------------------------------------------------------------------------------------
@dataclass
class RunFolder:
    """A folder holding ``circuit.json`` (and, from ``discover``, ``discover.json`` and ``scores.safetensors``).

    Attributes:
        path: the folder. circuit: ``circuit.json`` parsed (not yet loaded onto a graph).
        discover: ``discover.json`` parsed, or None (a circuit saved from Python).
    """

    path: Path
    circuit: dict
    discover: dict | None

    @property
    def method(self) -> str | None:
        return (self.discover or {}).get("method") or self.circuit.get("meta", {}).get("method")

    @property
    def task_source(self) -> str | None:
        return ((self.discover or {}).get("task") or {}).get("source")


def _read_json(path: Path, what: str) -> dict:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CorruptFileError(f"{path} is not readable JSON ({e}); re-run mechscope circuit {what}.") from None
    if not isinstance(doc, dict):
        raise CorruptFileError(f"{path} holds no JSON object; re-run mechscope circuit {what}.")
    return doc


def open_run(path) -> RunFolder:
    """Read a discover folder's records (no model needed).

    Raises:
        InputError: not a folder, or no ``circuit.json`` in it (says how to make one).
        CorruptFileError: an unreadable ``circuit.json`` or ``discover.json``.
    """
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"{path} is not a folder; pass the --out folder of mechscope circuit discover.")
    if not (path / FILES["circuit"]).is_file():
        raise InputError(f"{path} has no {FILES['circuit']}; pass the --out folder of mechscope circuit discover "
                         f"(run mechscope circuit discover --task ... --out {path} first).")
    circuit = _read_json(path / FILES["circuit"], "discover")
    disc = path / FILES["discover"]
    return RunFolder(path, circuit, _read_json(disc, "discover") if disc.is_file() else None)


def task_prompts(model, source: str, n: int | None, metric: str | None = None, seed: int = 0):
    """``load_task`` with the CLI's default size: 128 prompts of a built-in task (factual_recall: every fact),
    every pair of a file."""
    from mechscope.data.tasks import BUILTIN_TASKS, load_task

    if n is None and source in BUILTIN_TASKS and source != "factual_recall":
        n = 128
    return load_task(source, model, n=n, metric=metric, seed=seed)


def held_out(model, run: RunFolder, source: str | None = None, n: int | None = None):
    """The prompts to evaluate a run's circuit on, and what they are.

    With no ``source`` (or discover's own), the held-out split discover recorded, checked to be the same prompts
    by their hash; with another task, all of its prompts (a task discover never saw).

    Returns:
        (Task, ``{"source", "n_prompts", "split": "held-out" | "whole task", ...}``).

    Raises:
        InputError: no task given and no discover.json; the recorded split gives other prompts now (a changed
            file, another model's tokenizer).
    """
    rec = (run.discover or {}).get("task")
    if source is None and rec is None:
        raise InputError(f"{run.path} has no {FILES['discover']} recording the task; pass --task (a built-in task or "
                         "a JSONL file) to evaluate the circuit on.")
    if source is None or (rec and source == rec["source"] and n in (None, rec["n"])):
        task = task_prompts(model, rec["source"], rec["n"], rec["metric"], rec["seed"])
        split = run.discover["split"]
        train, test = task.split(split["test_fraction"], split["seed"])
        if len(test) != split["n_test"] or prompts_hash(test) != split["test_hash"]:
            raise InputError(
                f"{rec['source']} no longer gives the held-out prompts discover recorded in "
                f"{run.path / FILES['discover']} ({len(test)} prompts, hash {prompts_hash(test)}; recorded "
                f"{split['n_test']}, {split['test_hash']}): the task file or the model's tokenizer changed. Re-run "
                "mechscope circuit discover, or pass --task to evaluate on a task's whole prompt set.")
        return test, {"source": rec["source"], "n_prompts": len(test), "split": "held-out",
                      "test_fraction": split["test_fraction"], "seed": split["seed"], "n_train": len(train),
                      "test_hash": split["test_hash"]}
    task = task_prompts(model, source, n)
    return task, {"source": source, "n_prompts": len(task), "split": "whole task", "test_hash": prompts_hash(task)}


# -- evaluation -----------------------------------------------------------------------------------------------
def circuit_edges(circuit) -> list[dict]:
    """The circuit's edges as JSON rows: name, source, receiver, kind (q/k/v/mlp/logits), receiver layer, score."""
    g = circuit.graph
    names, kinds = g.edge_names(), g.edge_kind()
    rec = g.edge_receiver.tolist()
    scores = None if circuit.scores is None else circuit.scores.tolist()
    rows = []
    for e in circuit.edges.nonzero().flatten().tolist():
        src, dst = names[e].split("->")
        s = None if scores is None or scores[e] != scores[e] else scores[e]
        rows.append({"name": names[e], "source": src, "receiver": dst, "kind": kinds[e],
                     "layer": g.receivers[rec[e]].layer, "score": s})
    return rows


@contextlib.contextmanager
def collected_warnings(notes: list[str]):
    """Record every warning raised inside as a line in ``notes`` (each message once), instead of printing it."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        text = " ".join(str(w.message).split())
        if text not in notes:
            notes.append(text)


def evaluate_run(model, run: RunFolder, task, task_info: dict, *, ablation: str = "corrupted", level: str = "edge",
                 curve: bool = True, robustness: bool = False, roles: bool = False, n_boot: int = 1000,
                 batch_size: int = 16, seed: int = 0, progress: bool = True, command: str = "") -> dict:
    """Evaluate a run folder's circuit on ``task`` and return the evaluation record (JSON-ready).

    Steps: faithfulness under ``ablation`` at ``level`` with its interval; with ``curve``, MIB's CPR and CMD
    curves from the saved scores (same ablation and level); with ``robustness``, every ablation x level; with
    ``roles``, the IOI classes of the circuit's heads. Warnings (wide intervals, an empty circuit) are
    recorded in ``notes``.

    Raises:
        InputError: a circuit of another model; an empty circuit; a curve asked of an ACDC run (no scores);
            roles asked of a circuit without heads.
    """
    import mechscope
    from mechscope.circuits import Circuit, Graph, evaluate_circuit, faithfulness_curve, robustness_table

    graph = Graph.from_model(model)
    theirs = run.circuit.get("model")
    if run.circuit.get("graph") != graph_shape(graph):
        raise InputError(f"{run.path / FILES['circuit']} holds a circuit of {theirs} ({run.circuit.get('graph')}); the "
                         f"model loaded is {model.cfg.name} ({graph_shape(graph)}). Pass --model {theirs} (or its "
                         f"folder), or discover a circuit for {model.cfg.name}.")
    circuit = Circuit.load(run.path / FILES["circuit"], graph)
    if circuit.is_empty:
        raise InputError(f"{run.path / FILES['circuit']} holds an empty circuit, whose faithfulness is 0 by "
                         "definition; discover a larger one (raise --edges, lower --threshold or --tau).")
    scores = load_scores(run.path / FILES["scores"], graph) if curve else None
    if curve and scores is None:
        raise InputError(f"{run.path} is an ACDC run: it has no edge scores to draw MIB's faithfulness curve from; "
                         "leave out --curve, or discover with an attribution method (eap, eap-ig, ...).")
    heads = [n for n in circuit.nodes if n.startswith("a")]
    if roles and not heads:
        raise InputError(f"the circuit in {run.path} has no attention heads to classify; leave out --roles.")
    notes: list[str] = []
    timings: dict[str, float] = {}
    kw = {"n_boot": n_boot, "seed": seed, "batch_size": batch_size, "progress": progress}
    out: dict = {"schema": EVALUATION_SCHEMA}
    with collected_warnings(notes):
        t = time.perf_counter()
        ev = evaluate_circuit(model, task, circuit, ablation=ablation, level=level, **kw)
        out["faithfulness"] = {**ev.to_dict(), "values": ev.values}
        timings["faithfulness"] = time.perf_counter() - t
        out["curves"] = {}
        if curve:
            for kind in ("cpr", "cmd"):
                t = time.perf_counter()
                c = faithfulness_curve(model, task, scores, kind=kind, ablation=ablation, level=level, **kw)
                out["curves"][kind] = {**c.to_dict(), "values": c.values}
                timings[f"curve_{kind}"] = time.perf_counter() - t
        out["robustness"] = None
        if robustness:
            t = time.perf_counter()
            out["robustness"] = robustness_table(model, task, circuit, **kw).to_dict()["rows"]
            timings["robustness"] = time.perf_counter() - t
        out["roles"] = None
        if roles:
            from mechscope.circuits.ioi import ioi_roles

            t = time.perf_counter()
            out["roles"] = ioi_roles(model, task, heads, n_boot=n_boot, seed=seed, batch_size=batch_size,
                                     progress=progress).to_dict()
            timings["roles"] = time.perf_counter() - t
    c = model.cfg
    out.update({
        "model": {"name": c.name, "family": c.family, **graph_shape(graph)},
        "circuit": {"folder": str(run.path), "n_edges": circuit.n_edges, "n_nodes": len(circuit.nodes),
                    "percent_of_edges": 100 * circuit.n_edges / graph.n_edges, "nodes": circuit.nodes,
                    "selection": circuit.selection, "meta": circuit.meta, "has_scores": circuit.scores is not None,
                    "edges": circuit_edges(circuit)},
        "task": {"name": task.name, "metric": task.metric, **task_info},
        "discover": run.discover,
        "notes": notes,
        "run": {"command": command, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "timings_s": timings,
                "version": mechscope.__version__,
                "settings": {"ablation": ablation, "level": level, "curve": curve, "robustness": robustness,
                             "roles": roles, "n_boot": n_boot, "seed": seed, "batch_size": batch_size}},
    })
    return jsonable(out)


def read_evaluation(path) -> dict:
    """An ``evaluation.json`` (or the folder holding one).

    Raises:
        InputError: no such file, or a file that is not an evaluation record (says which command writes one).
    """
    path = Path(path)
    if path.is_dir():
        path = path / FILES["evaluation"]
    if not path.is_file():
        hint = (f" {path.parent} holds a discovered circuit: run mechscope circuit evaluate {path.parent} first."
                if (path.parent / FILES["circuit"]).is_file() else "")
        raise InputError(f"{path} does not exist; pass the evaluation.json that mechscope circuit evaluate writes "
                         f"(or its folder).{hint}")
    doc = _read_json(path, "evaluate")
    if doc.get("schema") != EVALUATION_SCHEMA:
        raise InputError(f"{path} is not a circuit evaluation (schema {doc.get('schema')!r}, not "
                         f"{EVALUATION_SCHEMA!r}); pass the evaluation.json of mechscope circuit evaluate.")
    return doc


__all__ = ["DISCOVER_SCHEMA", "EVALUATION_SCHEMA", "FILES", "RunFolder", "circuit_edges", "collected_warnings",
           "evaluate_run", "graph_shape", "held_out", "load_scores", "open_run", "prompts_hash", "read_evaluation",
           "save_scores", "task_prompts"]
