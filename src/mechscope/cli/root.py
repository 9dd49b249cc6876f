"""The top-level ``mechscope`` commands: ``version``, ``hooks``, ``lens``, ``report`` and ``serve``.

:data:`app` is the root command; :mod:`mechscope.cli` adds the ``sae``, ``features`` and ``toy`` groups to it.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table
from rich.text import Text

from mechscope.cli.common import (DeviceMapOpt, MaxMemoryOpt, OffloadFolderOpt, check_model_dtype, check_out_dir,
                                  clean_errors, err, load_dictionaries, load_model, note, open_database, out,
                                  print_table, set_threads)

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Mechanistic interpretability on real HuggingFace models.",
)

ModelOpt = typer.Option("smollm2-135m", "--model", "-m", help="built-in alias, local folder, .gguf file or hub id")
DtypeOpt = typer.Option("float32", "--dtype", help="float32 or bfloat16 (bfloat16 is ~4x faster on CPU)")


def _shape(axes: str, cfg) -> str:
    sizes = {"d_model": cfg.d_model, "d_vocab": cfg.d_vocab, "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads,
             "d_head": cfg.d_head, "d_mlp": cfg.d_mlp, "n_layers": cfg.n_layers}
    return "[" + ", ".join(str(sizes.get(a, a)) for a in axes.split()) + "]"


@app.command()
@clean_errors
def version() -> None:
    """Print the versions of mechscope, torch and transformers."""
    import torch
    import transformers

    import mechscope

    out.print(f"mechscope {mechscope.__version__}  torch {torch.__version__}  transformers {transformers.__version__}")


@app.command()
@clean_errors
def hooks(model: str = ModelOpt, dtype: str = DtypeOpt, device_map: str | None = DeviceMapOpt,
          max_memory: str | None = MaxMemoryOpt, offload_folder: Path | None = OffloadFolderOpt) -> None:
    """Print every hook point of a model: name, axes and shape (and, with --device-map, what runs where)."""
    check_model_dtype(dtype)
    m = load_model(model, dtype, device_map, max_memory, offload_folder)
    if device_map is not None:
        where = Table(title=f"{m.cfg.name}: placement (module -> device; disk -> cpu: stored on disk, run on cpu)",
                      title_justify="left")
        for col in ("module", "device"):
            where.add_column(col, no_wrap=True)
        for name, dev in m.placement().items():
            where.add_row(Text(name or "(whole model)"), Text(dev))
        print_table(where)
    table = Table(title=f"{m.cfg.name}: {len(m.hook_names())} hook points", title_justify="left")
    for col in ("name", "axes", "shape"):
        table.add_column(col, no_wrap=True)
    for name, axes in m.hook_names().items():
        table.add_row(Text(name), Text(axes), Text(_shape(axes, m.cfg)))
    print_table(table)


@app.command()
@clean_errors
def lens(
    text: str = typer.Argument(..., help="prompt to read the residual stream of"),
    target: str | None = typer.Option(None, "--target", "-t", help="token to track, e.g. ' Paris' (mind the space)"),
    k: int = typer.Option(5, "--k", help="top tokens per layer"),
    position: int = typer.Option(-1, "--position", help="position to read (default: last)"),
    model: str = ModelOpt,
    dtype: str = DtypeOpt,
    device_map: str | None = DeviceMapOpt,
    max_memory: str | None = MaxMemoryOpt,
    offload_folder: Path | None = OffloadFolderOpt,
) -> None:
    """Print a logit lens of TEXT: the top tokens that each layer's residual stream predicts."""
    from mechscope.analysis import logit_lens
    from mechscope.core.errors import InputError

    if not text:
        raise InputError('the prompt is empty, so there is no position to read; pass some text, e.g. '
                         'mechscope lens "The capital of France is".')
    if k < 1:
        raise InputError(f"--k must be at least 1 (top tokens per layer), got {k}.")
    if target == "":
        raise InputError("--target is empty; pass the token to track, e.g. --target ' Paris' (mind the space).")
    check_model_dtype(dtype)
    m = load_model(model, dtype, device_map, max_memory, offload_folder)
    r = logit_lens(m, text, position=position, target=target, k=k)
    table = Table(title=f"logit lens of {text!r} at position {position} ({m.cfg.name})", title_justify="left")
    table.add_column("layer", no_wrap=True)
    table.add_column(f"top {k} (probability)", no_wrap=True)
    if r.target_prob is not None:
        table.add_column(f"p({r.target_token!r})", justify="right")
        table.add_column("rank", justify="right")
    for i, label in enumerate(r.labels):
        tops = "  ".join(f"{t!r} {float(p):.2f}" for t, p in zip(r.top_tokens[i], r.top_probs[i]))
        row = [Text(label), Text(tops)]
        if r.target_prob is not None:
            row += [Text(f"{float(r.target_prob[i]):.3f}"), Text(str(int(r.target_rank[i])))]
        table.add_row(*row)
    print_table(table)


@app.command()
@clean_errors
def report(
    model: str = ModelOpt,
    out_dir: Path = typer.Option(Path("mechscope-report"), "--out", "-o", help="folder for report.html and results.json"),
    dtype: str = DtypeOpt,
    n_prompts: int = typer.Option(60, "--n-prompts", help="IOI prompts for logit difference and accuracy"),
    patch_prompts: int | None = typer.Option(None, "--patch-prompts", help="IOI prompts used in the patching sweeps (default: chosen to keep the run short)"),
    seed: int = typer.Option(0, "--seed", help="seed of the random-token and IOI datasets"),
    threads: int | None = typer.Option(None, "--threads", min=1, help="torch CPU threads (default: the idle cores)"),
    sae: list[Path] = typer.Option([], "--sae", help="dictionary folder to add a sparse-dictionary section for (repeatable)"),
    circuit: list[Path] = typer.Option([], "--circuit", help="circuit folder (mechscope circuit discover/evaluate) to add "
                                       "a circuit section for (repeatable)"),
) -> None:
    """Run the standard analyses on a model and write a self-contained HTML report plus results.json."""
    from mechscope.report import ReportConfig, build_report
    from mechscope.report.circuit_section import check_circuit_folders

    cfg = ReportConfig(model=model, out=out_dir, dtype=dtype, n_prompts=n_prompts, patch_prompts=patch_prompts, seed=seed,
                       sae=tuple(sae), circuit=tuple(circuit))
    check_model_dtype(dtype)
    check_out_dir(out_dir)
    load_dictionaries(sae)  # a missing folder or broken file costs no model load
    check_circuit_folders(circuit)
    set_threads(threads)
    paths = build_report(cfg, console=out)
    out.print(Text(f"report:  {paths.html.resolve()}", style="bold green"), soft_wrap=True)
    out.print(Text(f"results: {paths.json.resolve()}", style="bold green"), soft_wrap=True)


@app.command()
@clean_errors
def serve(
    model: str = ModelOpt,
    dtype: str = typer.Option("bfloat16", "--dtype", help="model dtype"),
    dictionary: Path | None = typer.Option(None, "--dictionary", "-d", help="dictionary folder (mechscope, SAELens or sparsify)"),
    features: Path | None = typer.Option(None, "--features", help="feature database built by `mechscope features build`"),
    report: Path | None = typer.Option(None, "--report", help="results.json (or its folder) of `mechscope report`"),
    circuit: Path | None = typer.Option(None, "--circuit", help="evaluation.json (or its folder) of `mechscope circuit "
                                        "evaluate`: the /circuit page"),
    graph: Path | None = typer.Option(None, "--graph", help="graph folder of `mechscope graph` (or its "
                                      "neuronpedia.json): the /graph page"),
    transcoders: Path | None = typer.Option(None, "--transcoders", help="the graph's transcoder set: feature contexts "
                                            "(its features/ databases) and steering on the /graph page (default: the "
                                            "set the graph records, if that folder exists)"),
    probe: list[Path] = typer.Option([], "--probe", help="probe folder written by Probe.save, fitted on this model: the "
                                     "/probe page (repeatable)"),
    probe_threshold: float | None = typer.Option(None, "--probe-threshold", help="alarm threshold (logit units) for "
                                                 "every --probe (default: the one in the probe's cfg.json info, "
                                                 "else 0, its decision boundary)"),
    host: str = typer.Option("127.0.0.1", "--host", help="address to bind (loopback by default: the app has no authentication)"),
    port: int = typer.Option(8000, "--port", min=1, max=65535),
    threads: int | None = typer.Option(None, "--threads", min=1, help="torch CPU threads (default: the idle cores)"),
) -> None:
    """Serve the local web app: feature browser, feature pages, prompt inspector, patching, steering, circuit, probes,
    attribution graphs."""
    import uvicorn

    import mechscope
    from mechscope.app import AppState, create_app, load_report

    check_model_dtype(dtype)
    results = load_report(report)  # everything that needs no model first: a typo costs no model load
    evaluation = None
    if circuit is not None:
        from mechscope.circuits.runs import read_evaluation

        evaluation = read_evaluation(circuit)
    graph_json = None
    if graph is not None:
        from mechscope.graphs.neuronpedia import load_neuronpedia

        graph_json = load_neuronpedia(graph / "neuronpedia.json" if graph.is_dir() else graph)
    elif transcoders is not None:
        from mechscope.core.errors import InputError

        raise InputError("--transcoders serves a graph's transcoder set; give the graph too (--graph DIR).")
    tset, tdbs = None, {}
    if graph_json is not None:
        from mechscope.graphs import load_transcoders
        from mechscope.graphs.features import open_set_features

        recorded = (graph_json["metadata"].get("mechscope") or {}).get("transcoders")
        if transcoders is None and recorded and Path(recorded).is_dir():
            transcoders = Path(recorded)
            note(f"--transcoders {recorded} (the set this graph records)")
        if transcoders is not None:
            tset = load_transcoders(transcoders)
            tdbs = open_set_features(transcoders, tset)
    d = load_dictionaries([dictionary])[0] if dictionary is not None else None
    db = open_database(features) if features is not None else None
    if d is not None and db is not None:
        from mechscope.features.sources import check_database_matches

        check_database_matches(db, d)
    if probe or probe_threshold is not None:
        from mechscope.app.probe_routes import check_probe_folders

        check_probe_folders(probe, threshold=probe_threshold)
    n, why = set_threads(threads, announce=False)
    state = AppState(model=mechscope.load(model, dtype=dtype), report=results, circuit=evaluation, graph=graph_json)
    state.dictionary, state.db = d, db
    if tset is not None:
        tset.check_model(state.model)
        state.graph_transcoders, state.graph_features = tset.to(device=state.model.device), tdbs
    if d is not None:
        from mechscope.app.server import make_steer
        from mechscope.dictionaries.splice import check_fits

        check_fits(state.model, d)
        state.steer = make_steer(state.model, d)
    if probe:
        from mechscope.app.probe_routes import load_probes

        state.probes = load_probes(probe, state.model, threshold=probe_threshold)
    if host not in ("127.0.0.1", "localhost", "::1"):
        err.print(Text(f"warning: binding to {host}: anyone who can reach it can run the model.", style="yellow"))
    out.print(Text(f"mechscope serving on http://{host}:{port}  (torch threads: {n}, {why})", style="bold green"))
    uvicorn.run(create_app(state), host=host, port=port, log_level="warning")
