"""``mechscope circuit ...``: discover a circuit on a task, evaluate it on held-out prompts, path-patch, render.

``discover`` scores every edge on the train split of a task (or runs ACDC), selects a circuit and writes its
folder (:mod:`mechscope.circuits.runs`); ``evaluate`` measures it on the held-out split discover recorded
and writes ``evaluation.json`` and the circuit page; ``render`` re-draws the page from ``evaluation.json``;
``path-patch`` runs Wang et al.'s path patching between named senders and receivers. Option values, task
names, folders and node names are checked before the model loads.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import typer
from rich.table import Table
from rich.text import Text

from mechscope.cli.common import (check_choice, check_model_dtype, check_out_dir, check_out_file, check_task_source,
                                  checked_task, clean_errors, note, out, print_titled, rerun_command, set_threads,
                                  task_source)
from mechscope.core.errors import InputError

circuit_app = typer.Typer(no_args_is_help=True, help="Circuits: discover, evaluate with intervals, path-patch, render.")

METHODS = ("eap", "eap-ig", "ig-activations", "clean-corrupted", "exact", "acdc")
ABLATIONS = ("corrupted", "mean", "zero")
LEVELS = ("edge", "node")
_SENDER = re.compile(r"input|a\d+\.h\d+|m\d+")
_RECEIVER = re.compile(r"a\d+\.(h|kv)\d+<[qkv]>|m\d+|logits")

TaskOpt = typer.Option(..., "--task", "-t", help="a built-in task (ioi, induction, greater_than, factual_recall, "
                       "docstring) or a JSONL file of clean/corrupt/answer/wrong pairs")
NOpt = typer.Option(None, "--n", help="prompts (default: 128 of a built-in task, every fact of factual_recall, every "
                    "pair of a file)")
ModelOpt = typer.Option("smollm2-135m", "--model", "-m", help="built-in alias, local folder, .gguf file or hub id")
DtypeOpt = typer.Option("float32", "--dtype", help="float32 or bfloat16")
NoCheckOpt = typer.Option(False, "--no-check", help="go on when the model does not solve the task (a note instead "
                          "of an error; the circuit of a behaviour the model lacks means little)")
BatchOpt = typer.Option(16, "--batch-size", min=1, help="prompts per forward")
NBootOpt = typer.Option(1000, "--n-boot", min=10, help="bootstrap resamples of every interval")
ThreadsOpt = typer.Option(None, "--threads", min=1, help="torch CPU threads (default: the idle cores)")


@circuit_app.callback()
def _group() -> None:
    """Circuits: discover, evaluate with intervals, path-patch, render."""


def _load(model: str, dtype: str):
    """(the model, seconds it took to load)."""
    import mechscope

    t = time.perf_counter()
    return mechscope.load(model, dtype=dtype), time.perf_counter() - t


def _names(text: str | None, pattern: re.Pattern, option: str, example: str) -> list[str]:
    names = [s.strip() for s in (text or "").split(",") if s.strip()]
    bad = [n for n in names if not pattern.fullmatch(n)]
    if bad:
        raise InputError(f"{option}: {bad[0]!r} is not a node name; write names like {example}, comma-separated.")
    return names


# -- discover -------------------------------------------------------------------------------------------------
@circuit_app.command("discover")
@clean_errors
def discover_cmd(
    task: str = TaskOpt,
    n: int | None = NOpt,
    split: float = typer.Option(0.5, "--split", help="share of the prompts held out for evaluate (never scored on)"),
    method: str = typer.Option("eap-ig", "--method",
                               help="eap, eap-ig, ig-activations, clean-corrupted, exact or acdc"),
    steps: int = typer.Option(5, "--steps", help="interpolation steps of eap-ig and ig-activations"),
    edges: int | None = typer.Option(None, "--edges", help="keep the N best edges (default 200)"),
    threshold: float | None = typer.Option(None, "--threshold", help="keep every edge whose |score| is at least T"),
    greedy: bool = typer.Option(False, "--greedy", help="grow the circuit from the logits backwards (EAP-IG's greedy)"),
    signed: bool = typer.Option(False, "--signed", help="rank edges by signed importance (-score) instead of |score|"),
    prune: bool = typer.Option(True, "--prune/--no-prune", help="drop edges on no path from input to logits (MIB)"),
    tau: float = typer.Option(0.01, "--tau", help="acdc: the largest KL change (nats) a removed edge may cause"),
    level: str = typer.Option("node", "--level", help="acdc: edge or node (node for large graphs)"),
    max_candidates: int = typer.Option(20_000, "--max-candidates", min=1, help="acdc: refuse larger searches"),
    out_dir: Path = typer.Option(Path("mechscope-circuit"), "--out", "-o", help="folder for circuit.json and the rest"),
    model: str = ModelOpt,
    dtype: str = DtypeOpt,
    no_check: bool = NoCheckOpt,
    batch_size: int = BatchOpt,
    seed: int = typer.Option(0, "--seed", help="seed of the task's prompts and of the split"),
    threads: int | None = ThreadsOpt,
) -> None:
    """Score every edge on the train split of a task (or run ACDC) and save the selected circuit in --out."""
    import math

    check_task_source(task)
    check_choice(method, METHODS, "--method")
    check_choice(level, LEVELS, "--level")
    check_model_dtype(dtype)
    if not 0 < split < 1:
        raise InputError(f"--split {split} must lie strictly between 0 and 1 (the share of prompts held out), "
                         "e.g. 0.5.")
    if n is not None and n < 2:
        raise InputError(f"--n {n}: a split needs at least 2 prompts; pass --n 2 or more.")
    if steps < 1:
        raise InputError(f"--steps must be at least 1, got {steps}.")
    if method == "acdc":
        if edges is not None or threshold is not None or greedy:
            raise InputError("--edges, --threshold and --greedy select from edge scores; ACDC selects by --tau "
                             "(raise it for a smaller circuit).")
        if not (tau >= 0 and math.isfinite(tau)):
            raise InputError(f"--tau must be a finite number >= 0, got {tau}.")
    else:
        if edges is not None and threshold is not None:
            raise InputError("give --edges N or --threshold T, not both.")
        if greedy and threshold is not None:
            raise InputError("--greedy grows a circuit to a number of edges; use it with --edges N, not --threshold.")
        if edges is not None and edges < 1:
            raise InputError(f"--edges must be at least 1, got {edges}; an empty circuit has faithfulness 0 by "
                             "definition.")
        if threshold is not None and not math.isfinite(threshold):
            raise InputError(f"--threshold must be a finite number, got {threshold}.")
        edges = 200 if edges is None and threshold is None else edges
    check_out_dir(out_dir)
    command = rerun_command("circuit", discover_cmd, locals())
    set_threads(threads)

    from mechscope.circuits import Graph
    from mechscope.circuits.runs import DISCOVER_SCHEMA, FILES, graph_shape, prompts_hash, save_scores

    notes: list[str] = []
    timings: dict[str, float] = {}
    m, timings["load"] = _load(model, dtype)
    graph = Graph.from_model(m)
    if method == "acdc" and level == "edge" and graph.n_edges > max_candidates:
        raise InputError(f"edge-level ACDC on {m.cfg.name} tries {graph.n_edges:,} edges, more than --max-candidates "
                         f"{max_candidates:,} (one forward over every prompt each); use --level node "
                         f"({graph.n_sources} nodes), or raise --max-candidates.")
    t = time.perf_counter()
    full, check = checked_task(m, task, n, no_check, notes)
    train, test = full.split(split, seed)
    timings["task"] = time.perf_counter() - t
    out.print(Text(f"{graph}; scoring on {len(train)} train prompts, {len(test)} held out"), soft_wrap=True)
    t = time.perf_counter()
    circuit, scores, acdc_result = _discover(m, graph, train, method, steps, edges, threshold, greedy, signed, prune,
                                             tau, level, max_candidates, batch_size, notes)
    timings["discover"] = time.perf_counter() - t

    from mechscope.core.io import jsonable, write_json_atomic

    out_dir.mkdir(parents=True, exist_ok=True)
    circuit.save(out_dir / FILES["circuit"])
    save_scores(out_dir / FILES["scores"], graph, scores=scores, acdc=acdc_result)
    circuit.to_mib(out_dir / FILES["mib"])
    record = {
        "schema": DISCOVER_SCHEMA, "command": command, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": {"arg": model, "name": m.cfg.name, "dtype": dtype},
        "task": {"source": task_source(task),
                 "name": full.name, "metric": full.metric, "n": n, "seed": seed, "n_prompts": len(full)},
        "split": {"test_fraction": split, "seed": seed, "n_train": len(train), "n_test": len(test),
                  "by_group": bool(full.groups), "train_hash": prompts_hash(train), "test_hash": prompts_hash(test)},
        "check": {**check.to_dict(), "required": not no_check},
        "method": method, "steps": steps if method in ("eap-ig", "ig-activations") else None,
        "selection": circuit.selection, "graph": graph_shape(graph),
        "n_edges": circuit.n_edges, "n_nodes": len(circuit.nodes), "notes": notes,
        "timings_s": timings, "files": FILES,
    }
    write_json_atomic(jsonable(record), out_dir / FILES["discover"])
    _print_circuit(circuit)
    for line in notes:
        note(line)
    out.print(Text(f"circuit: {(out_dir / FILES['circuit']).resolve()} ({circuit.n_edges} edges, {len(circuit.nodes)} "
                   f"nodes; {timings['discover']:.1f} s)\nnext: mechscope circuit evaluate {out_dir} --curve",
                   style="bold green"), soft_wrap=True)


def _discover(m, graph, train, method, steps, edges, threshold, greedy, signed, prune, tau, level, max_candidates,
              batch_size, notes):
    """(circuit, edge scores or None, ACDC result or None), refusing selections that keep nothing."""
    from mechscope.circuits import Circuit, acdc, attribute
    from mechscope.circuits.circuit import importance
    from mechscope.circuits.runs import collected_warnings

    empty_fix, res = "raise --edges, lower --threshold, or pass --no-prune", None
    with collected_warnings(notes):
        if method == "acdc":
            res = acdc(m, train, tau=tau, level=level, graph=graph, batch_size=batch_size,
                       max_candidates=max_candidates)
            circuit, scores, empty_fix = res.circuit(), None, f"lower --tau (now {tau:g})"
            out.print(Text(str(res)), soft_wrap=True)
        else:
            scores = attribute(m, train, graph=graph, method=method, steps=steps, batch_size=batch_size)
            key = importance(scores, absolute=not signed)
            n_ok = int(key.isfinite().sum())
            if edges is not None and edges > n_ok:
                raise InputError(f"--edges {edges} is more than the {n_ok:,} scored edges of {graph.model_name}'s "
                                 f"graph; pass --edges {n_ok} or fewer.")
            if threshold is not None and not bool((key >= threshold).any()):
                best = float(key[key.isfinite()].max())
                what = "importance (-score)" if signed else "|score|"
                raise InputError(f"--threshold {threshold:g} keeps no edge: the largest {what} is {best:.4g}; pass "
                                 f"--threshold {best:.3g} or lower, or --edges N for the N best edges.")
            if greedy:
                circuit = Circuit.greedy(scores, edges, absolute=not signed)
                circuit = circuit.prune() if prune else circuit
            else:
                circuit = Circuit.from_scores(scores, top_n=edges, threshold=threshold, absolute=not signed,
                                              prune=prune)
            chosen = edges if edges is not None else int((key >= threshold).sum())
            if prune and circuit.n_edges < chosen:
                notes.append(f"pruning kept {circuit.n_edges} of the {chosen} selected edges (the others lie on no "
                             "path from input to logits; --no-prune keeps them).")
    if circuit.is_empty:
        raise InputError(f"the selected circuit is empty (no edge on a path from input to logits), and an empty "
                         f"circuit's faithfulness is 0 by definition; {empty_fix}.")
    return circuit, scores, res


def _print_circuit(circuit, k: int = 12) -> None:
    g = circuit.graph
    names = g.edge_names()
    idx = circuit.edges.nonzero().flatten()
    if circuit.scores is not None:
        idx = idx[circuit.scores[idx].abs().argsort(descending=True)]
    kinds = g.edge_kind()
    table_title = f"circuit: {circuit.n_edges} edges, {len(circuit.nodes)} nodes (strongest first)"
    table = Table()
    for col, j in (("edge", "left"), ("kind", "left"), ("score", "right")):
        table.add_column(col, justify=j, no_wrap=True)
    for e in idx[:k].tolist():
        s = "" if circuit.scores is None else f"{float(circuit.scores[e]):+.4g}"
        table.add_row(Text(names[e]), Text(kinds[e]), Text(s))
    print_titled(table_title, table)


# -- evaluate -------------------------------------------------------------------------------------------------
@circuit_app.command("evaluate")
@clean_errors
def evaluate_cmd(
    folder: Path = typer.Argument(..., help="the --out folder of mechscope circuit discover"),
    task: str | None = typer.Option(None, "--task", "-t", help="evaluate on this task instead (all its prompts; "
                                    "default: the held-out split discover recorded)"),
    n: int | None = NOpt,
    ablation: str = typer.Option("corrupted", "--ablation", help="what edges outside the circuit carry: corrupted, "
                                 "mean or zero"),
    level: str = typer.Option("edge", "--level", help="edge or node"),
    curve: bool = typer.Option(False, "--curve", help="MIB's faithfulness curves (CPR and CMD) from the saved scores"),
    robustness: bool = typer.Option(False, "--robustness", help="faithfulness under every ablation x level"),
    roles: bool = typer.Option(False, "--roles", help="IOI only: the classes of the circuit's heads (slow: minutes)"),
    out_dir: Path | None = typer.Option(None, "--out", "-o", help="folder for evaluation.json and circuit.html "
                                        "(default: FOLDER)"),
    model: str | None = typer.Option(None, "--model", "-m", help="default: the model discover used"),
    dtype: str | None = typer.Option(None, "--dtype", help="default: discover's dtype"),
    no_check: bool = NoCheckOpt,
    n_boot: int = NBootOpt,
    batch_size: int = BatchOpt,
    seed: int = typer.Option(0, "--seed", help="seed of the bootstrap"),
    threads: int | None = ThreadsOpt,
) -> None:
    """Evaluate a discovered circuit on held-out prompts: faithfulness with its interval, curves, robustness, roles."""
    from mechscope.circuits.runs import FILES, open_run

    run = open_run(folder)
    if not run.circuit.get("edges"):
        raise InputError(f"{folder / FILES['circuit']} holds an empty circuit, whose faithfulness is 0 by definition; "
                         "discover a larger one (raise --edges, lower --threshold or --tau).")
    check_choice(ablation, ABLATIONS, "--ablation")
    check_choice(level, LEVELS, "--level")
    rec = (run.discover or {}).get("model", {})
    model = model or rec.get("arg") or "smollm2-135m"
    dtype = dtype or rec.get("dtype") or "float32"
    check_model_dtype(dtype)
    if n is not None and task is None:
        raise InputError("--n sets the prompts of --task; without --task the circuit is evaluated on the held-out "
                         "prompts discover recorded. Pass --task with --n, or leave out --n.")
    if task is not None:
        check_task_source(task)
        task = task_source(task)
    elif run.discover is None:
        raise InputError(f"{folder} has no {FILES['discover']} recording its task and split; pass --task (a built-in "
                         "task or a JSONL file) to evaluate the circuit on.")
    source = task or run.task_source
    if roles and source != "ioi":
        raise InputError(f"--roles classifies heads by the IOI circuit's evidence, so it needs the ioi task (this "
                         f"evaluation uses {source!r}); leave out --roles.")
    if curve and run.method == "acdc":
        raise InputError(f"{folder} is an ACDC run: it has no edge scores to draw MIB's faithfulness curve from; leave "
                         "out --curve, or discover with an attribution method (--method eap, eap-ig, ...).")
    out_dir = out_dir or folder
    check_out_dir(out_dir)
    command = rerun_command("circuit", evaluate_cmd, locals())
    set_threads(threads)

    from mechscope.circuits.runs import evaluate_run, held_out

    notes: list[str] = []
    m, load_s = _load(model, dtype)
    if task is not None and task != run.task_source:
        checked_task(m, task, n, no_check, notes)
    prompts, info = held_out(m, run, task, n)
    out.print(Text(f"evaluating {run.circuit.get('model')}'s circuit ({len(run.circuit.get('edges', []))} edges) on "
                   f"{info['n_prompts']} prompts of {info['source']} ({info['split']})"), soft_wrap=True)
    if roles:
        heads = len({e.split("->")[0] for e in run.circuit.get("edges", []) if e.startswith("a")})
        note(f"--roles gathers the IOI evidence of the circuit's {heads} heads (about 10 s a head for SmolLM2 on a "
             "CPU).")
    ev = evaluate_run(m, run, prompts, info, ablation=ablation, level=level, curve=curve, robustness=robustness,
                      roles=roles, n_boot=n_boot, batch_size=batch_size, seed=seed, command=command)
    ev["run"]["timings_s"]["load"] = load_s
    ev["notes"] = notes + ev["notes"]

    from mechscope.core.io import write_json_atomic
    from mechscope.report.circuit import write_circuit_page

    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(ev, out_dir / FILES["evaluation"])
    page = write_circuit_page(ev, out_dir)
    _print_evaluation(ev)
    for line in ev["notes"]:
        note(line)
    out.print(Text(f"evaluation: {(out_dir / FILES['evaluation']).resolve()}\npage: {page.resolve()}",
                   style="bold green"), soft_wrap=True)


def _ci(d: dict | None, digits: int = 3) -> str:
    if not d or d.get("estimate") is None:
        return "n/a"
    lo, hi = d.get("low"), d.get("high")
    if lo is None:
        return f"{d['estimate']:.{digits}f}"
    return f"{d['estimate']:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def _print_evaluation(ev: dict) -> None:
    f = ev["faithfulness"]
    t = ev["task"]
    table_title = (f"{ev['circuit']['n_edges']} edges, {ev['circuit']['n_nodes']} nodes on {t['n_prompts']} "
                        f"prompts of {t['name']} ({t['split']}); {f['ablation']} ablation, {f['level']} level")
    table = Table()
    table.add_column("quantity", no_wrap=True)
    table.add_column("estimate [95% CI]", justify="right", no_wrap=True)
    p = f["per_prompt"]
    rows = [("faithfulness f(C)", _ci(f["faithfulness"])),
            ("per prompt: median (IQR)", "n/a" if p.get("median") is None else f"{p['median']:.3f} ({p['iqr']:.3f})"),
            (f"m(M) model ({f['metric']})", _ci(f["m_model"])), (f"m(C) circuit ({f['metric']})", _ci(f["m_circuit"])),
            (f"m(∅) all ablated ({f['metric']})", _ci(f["m_empty"]))]
    for kind, c in ev["curves"].items():
        rows.append((f"{kind.upper()} ({'higher' if kind == 'cpr' else 'lower'} is better)", _ci(c["area"])))
    for q, v in rows:
        table.add_row(Text(q), Text(v))
    print_titled(table_title, table)
    if ev.get("robustness"):
        rt_title = "robustness: the same circuit under every ablation and level"
        rt = Table()
        for col in ("ablation", "level", "f [95% CI]", "median", "IQR"):
            rt.add_column(col, no_wrap=True, justify="left" if col in ("ablation", "level") else "right")
        for r in ev["robustness"]:
            pp = r["per_prompt"]
            med = "n/a" if pp.get("median") is None else f"{pp['median']:.3f}"
            iqr = "n/a" if pp.get("iqr") is None else f"{pp['iqr']:.3f}"
            rt.add_row(Text(r["ablation"]), Text(r["level"]), Text(_ci(r["faithfulness"])), Text(med), Text(iqr))
        print_titled(rt_title, rt)
    if ev.get("roles"):
        ro_title = "IOI head classes (Wang et al.'s evidence)"
        ro = Table()
        for col in ("head", "class", "direct effect", "END->IO", "copy score"):
            ro.add_column(col, no_wrap=True)
        for h in ev["roles"]["heads"]:
            ro.add_row(Text(h["head"]), Text(h["role"]), Text(_ci(h["dla"], 2)),
                       Text(_ci(h["attention"].get("END->IO"), 2)), Text(f"{h['copy_score']:.2f}"))
        print_titled(ro_title, ro)


# -- render -----------------------------------------------------------------------------------------------------
@circuit_app.command("render")
@clean_errors
def render_cmd(
    evaluation: Path = typer.Argument(..., help="an evaluation.json written by mechscope circuit evaluate"),
    out_dir: Path | None = typer.Option(None, "--out", "-o", help="folder for circuit.html (default: beside the JSON)"),
) -> None:
    """Re-draw the circuit page from a saved evaluation.json (no model)."""
    from mechscope.report.circuit import write_circuit_page
    from mechscope.circuits.runs import read_evaluation

    ev = read_evaluation(evaluation)
    out_dir = out_dir or (evaluation if evaluation.is_dir() else evaluation.parent)
    check_out_dir(out_dir)
    page = write_circuit_page(ev, out_dir)
    out.print(Text(f"page: {page.resolve()}", style="bold green"), soft_wrap=True)


# -- path patching ---------------------------------------------------------------------------------------------
@circuit_app.command("path-patch")
@clean_errors
def path_patch_cmd(
    task: str = TaskOpt,
    n: int | None = NOpt,
    senders: str | None = typer.Option(None, "--senders", help="nodes patched together, e.g. a20.h0,m3,input "
                                       "(with --sweep: each alone; default every head)"),
    receivers: str = typer.Option(..., "--receivers", help="receivers, e.g. 'a23.h0<q>,a23.kv0<v>,m25,logits'"),
    positions: str = typer.Option("all", "--positions", help="where receivers are patched: end (the scored "
                                  "position), all, or a position N"),
    sweep: bool = typer.Option(False, "--sweep", help="each sender alone: a layer x head table"),
    top: int = typer.Option(10, "--top", min=1, help="--sweep: senders listed"),
    out_file: Path | None = typer.Option(None, "--out", "-o", help="write every effect and interval as JSON"),
    model: str = ModelOpt,
    dtype: str = DtypeOpt,
    no_check: bool = NoCheckOpt,
    n_boot: int = NBootOpt,
    batch_size: int = BatchOpt,
    seed: int = typer.Option(0, "--seed", help="seed of the task's prompts and the bootstrap"),
    threads: int | None = ThreadsOpt,
) -> None:
    """Path patching (Wang et al. 2022, App. B): the senders' effect on the metric through the receivers only."""
    check_task_source(task)
    send = _names(senders, _SENDER, "--senders", "a20.h0, m3 or input")
    recv = _names(receivers, _RECEIVER, "--receivers", "a23.h0<q>, a23.kv0<k>, m25 or logits")
    if not recv:
        raise InputError("--receivers names no receiver; pass e.g. --receivers 'a23.h0<q>' or --receivers logits.")
    if not send and not sweep:
        raise InputError("--senders names no node; pass e.g. --senders a20.h0, or --sweep to try every head alone.")
    if positions not in ("end", "all") and not re.fullmatch(r"-?\d+", positions):
        raise InputError(f"--positions {positions!r}: use end (the scored position), all, or a position number.")
    check_model_dtype(dtype)
    if out_file is not None:
        check_out_file(out_file, "--out", "path-patching.json")
    command = rerun_command("circuit", path_patch_cmd, locals())
    set_threads(threads)

    from mechscope.circuits import Graph, path_patching, path_patching_sweep
    from mechscope.circuits.runs import collected_warnings

    notes: list[str] = []
    m, _ = _load(model, dtype)
    graph = Graph.from_model(m)
    task_, _ = checked_task(m, task, n, no_check, notes)
    P = task_.clean_tokens.shape[1]
    pos = None if positions == "all" else P + task_.position if positions == "end" else int(positions)
    if pos is not None and not -P <= pos < P:
        raise InputError(f"--positions {positions}: the prompts have {P} tokens; use a position in {-P}..{P - 1}.")
    kw = {"positions": pos, "graph": graph, "batch_size": batch_size, "n_boot": n_boot, "seed": seed}
    with collected_warnings(notes):
        if sweep:
            res = path_patching_sweep(m, task_, recv, senders=send or None, **kw)
        else:
            res = path_patching(m, task_, send, recv, progress=True, **kw)
    doc = _print_sweep(res, top) if sweep else _print_path(res)
    for line in notes:
        note(line)
    if out_file is not None:
        from mechscope.core.io import jsonable, write_json_atomic

        write_json_atomic(jsonable({**doc, "command": command, "task": task_.name, "metric": task_.metric,
                                    "n_prompts": len(task_), "positions": positions, "clean_value": res.clean_value,
                                    "receivers": res.receivers}), out_file)
        out.print(Text(f"results: {out_file.resolve()}", style="bold green"), soft_wrap=True)


def _print_path(res) -> dict:
    ci = res.ci
    out.print(Text(f"{', '.join(res.senders)} -> {', '.join(res.receivers)}: effect {res.effect:+.4f}"
                   + (f" [{ci.low:+.4f}, {ci.high:+.4f}]" if ci else "") + f" ({res.info['metric']}, clean "
                   f"{res.clean_value:+.4f}, {res.per_prompt.numel()} prompts)", style="bold"), soft_wrap=True)
    return {"senders": res.senders, "effect": res.effect, "ci": None if ci is None else ci.to_dict(),
            "per_prompt": res.per_prompt}


def _print_sweep(res, top: int) -> dict:
    best = res.top(top)
    index = {s: i for i, s in enumerate(res.senders)}
    lo, hi = (res.ci.low, res.ci.high) if res.ci is not None else (None, None)
    table_title = (f"top {len(best)} senders -> {', '.join(res.receivers)} ({res.info['metric']}; clean "
                        f"{res.clean_value:+.3f})")
    table = Table()
    for col in ("sender", "effect", "95% CI"):
        table.add_column(col, justify="left" if col == "sender" else "right", no_wrap=True)
    for name, eff in best:
        i = index[name]
        table.add_row(Text(name), Text(f"{eff:+.4f}"),
                      Text("" if lo is None else f"[{float(lo[i]):+.4f}, {float(hi[i]):+.4f}]"))
    print_titled(table_title, table)
    grid = res.head_map()
    top_names = {name for name, _ in best}
    layers = sorted({int(s[1:].split(".")[0]) for s in top_names if s.startswith("a")})
    if layers:
        g_title = "layer x head (effect; the top senders in bold; - = not swept)"
        g = Table()
        g.add_column("layer", no_wrap=True)
        for h in range(res.n_heads):
            g.add_column(f"h{h}", justify="right", no_wrap=True)
        for layer in layers:
            cells = []
            for h in range(res.n_heads):
                v = float(grid[layer, h])
                bold = "bold" if f"a{layer}.h{h}" in top_names else ""
                cells.append(Text("-" if v != v else f"{v:+.3f}", style=bold))
            g.add_row(Text(str(layer)), *cells)
        print_titled(g_title, g)
    return {"senders": res.senders, "effect": res.effect, "ci": None if res.ci is None else res.ci.to_dict(),
            "top": [{"sender": s, "effect": e} for s, e in best], "head_map": grid}
