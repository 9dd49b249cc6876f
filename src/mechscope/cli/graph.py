"""``mechscope transcoders train|eval`` and ``mechscope graph``: attribution graphs on the command line.

``transcoders train`` trains a transcoder for every layer from one streaming pass and evaluates them;
``graph "PROMPT" --transcoders DIR --out DIR`` computes, prunes and scores the prompt's attribution graph and
writes the graph folder and its Neuronpedia JSON; ``graph validate DIR`` perturbs sampled features and compares.
Options and paths are checked before the model loads. ``--device`` (default cpu) says where the model and the
transcoders run; what is written is the same wherever they ran (to float rounding).
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from mechscope.cli.common import (check_corpora, check_model_dtype, check_out_dir, clean_errors, note, out,
                                  print_table, rank_threads, set_threads)
from mechscope.core.errors import InputError

transcoders_app = typer.Typer(no_args_is_help=True, help="A transcoder for every layer: train and evaluate.")

ModelOpt = typer.Option("smollm2-135m", "--model", "-m", help="built-in alias, local folder, .gguf file or hub id")
ThreadsOpt = typer.Option(None, "--threads", min=1, help="torch CPU threads (default: the idle cores)")
DeviceOpt = typer.Option("cpu", "--device", help="where the model and the transcoders run: cpu, cuda or cuda:N")


def _check_device(device: str) -> None:
    """Raises InputError for a --device this machine lacks (before anything is loaded)."""
    from mechscope.models.placement import check_device

    check_device(device, "--device")


@transcoders_app.callback()
def _group() -> None:
    """A transcoder for every layer: train and evaluate."""


def _set_table(evaluation: dict) -> Table:
    t = Table(title="transcoders on held-out text", title_justify="left")
    for c in ("layer", "FVU", "FVU w/o outliers", "L0", "dead", "CE recovered"):
        t.add_column(c, justify="right")
    for r in evaluation["layers"]:
        t.add_row(str(r["layer"]), f"{r['fvu']:.3f}", f"{r['fvu_without_outliers']:.3f}", f"{r['l0']:.1f}",
                  f"{r['dead_fraction']:.1%}", f"{r['ce_loss_recovered']:.3f}")
    s = evaluation["set"]
    t.add_row("all", "", "", "", "", f"{s['ce_loss_recovered']:.3f}")
    return t


@transcoders_app.command("train")
@clean_errors
def train_cmd(
    out_dir: Path = typer.Option(Path("mechscope-transcoders"), "--out", "-o", help="the transcoder-set folder"),
    tokens: int = typer.Option(1_048_576, "--tokens", help="training tokens (every layer sees them all)"),
    width: int = typer.Option(4608, "--width", min=1, help="latents per transcoder (d_sae)"),
    k: int = typer.Option(32, "--k", min=1, help="latents kept per token (TopK)"),
    skip: bool = typer.Option(True, "--skip/--no-skip", help="a linear skip connection (Paulo et al. 2025)"),
    batch_tokens: int = typer.Option(2048, "--batch-tokens", min=1, help="tokens per optimizer step"),
    lr: float = typer.Option(8e-4, "--lr", help="Adam learning rate"),
    buffer_tokens: int = typer.Option(16_384, "--buffer-tokens", min=1, help="rows of the shuffle buffer"),
    model: str = ModelOpt,
    dtype: str = typer.Option("bfloat16", "--dtype", help="model dtype while training (bfloat16 is ~4x faster)"),
    corpus: list[str] = typer.Option(["pydoc", "wikipedia", "austen", "shakespeare"], "--corpus",
                                     help="corpus names, files or folders (repeatable)"),
    context_len: int = typer.Option(128, "--context-len", min=3, help="tokens per context (BOS included)"),
    eval_tokens: int = typer.Option(4096, "--eval-tokens", help="held-out tokens for the evaluation (0: skip)"),
    resume: bool = typer.Option(False, "--resume", help="continue the run in --out from its last checkpoint"),
    seed: int = typer.Option(0, "--seed"),
    threads: int | None = ThreadsOpt,
    device: str = DeviceOpt,
) -> None:
    """Train a TopK transcoder (MLP input -> MLP output) for every layer from one streaming pass over real text."""
    import mechscope
    from mechscope.graphs.train import train_transcoders
    from mechscope.training.pipeline import CorpusConfig

    check_model_dtype(dtype)
    if eval_tokens < 0:
        raise InputError(f"--eval-tokens must be 0 (no evaluation) or more, got {eval_tokens}.")
    if tokens < batch_tokens:
        raise InputError(f"--tokens {tokens:,} is less than one step of --batch-tokens {batch_tokens:,}.")
    check_corpora(corpus)
    check_out_dir(out_dir)
    _check_device(device)
    set_threads(threads)
    m = mechscope.load(model, dtype=dtype, device=device)
    ts = train_transcoders(m, out_dir, d_sae=width, k=k, skip=skip, n_tokens=tokens, batch_tokens=batch_tokens,
                           lr=lr, corpus=CorpusConfig(tuple(corpus), context_len=context_len, seed=seed), seed=seed,
                           buffer_tokens=buffer_tokens,
                           resume=resume, eval_tokens=eval_tokens)
    out.print(f"trained {ts.n_layers} transcoders in {out_dir.resolve()}", soft_wrap=True)
    if eval_tokens:
        print_table(_set_table(json.loads((out_dir / "eval.json").read_text())))


@transcoders_app.command("eval")
@clean_errors
def eval_cmd(
    folder: Path = typer.Argument(..., help="a transcoder-set folder"),
    tokens: int = typer.Option(4096, "--tokens", min=1, help="held-out tokens"),
    model: str = ModelOpt,
    dtype: str = typer.Option("bfloat16", "--dtype", help="model dtype"),
    threads: int | None = ThreadsOpt,
    device: str = DeviceOpt,
) -> None:
    """Evaluate a transcoder set on held-out text (per layer, and all layers spliced in at once)."""
    import mechscope
    from mechscope.core.io import jsonable, write_json_atomic
    from mechscope.graphs import load_transcoders
    from mechscope.graphs.train import evaluate_transcoders

    check_model_dtype(dtype)
    _check_device(device)
    ts = load_transcoders(folder, device=device)
    set_threads(threads)
    m = mechscope.load(model, dtype=dtype, device=device)
    ts.check_model(m)
    e = evaluate_transcoders(m, ts, n_tokens=tokens)
    write_json_atomic(jsonable(e), folder / "eval.json")
    print_table(_set_table(e))


@transcoders_app.command("features")
@clean_errors
def features_cmd(
    folder: Path = typer.Argument(..., help="a transcoder-set folder"),
    tokens: int = typer.Option(262_144, "--tokens", min=1, help="tokens of text to compute statistics on"),
    layers: str | None = typer.Option(None, "--layers", help="only these layers, e.g. 0-3,10 (default: all)"),
    corpus: list[str] = typer.Option(["pydoc", "wikipedia", "austen", "shakespeare"], "--corpus",
                                     help="corpus names, files or folders (repeatable)"),
    context_len: int = typer.Option(128, "--context-len", min=2, help="tokens per context (BOS included)"),
    split: str = typer.Option("train", "--split", help="corpus split: train or eval"),
    top_k: int = typer.Option(10, "--top-k", min=1, help="top-activating contexts kept per latent"),
    batch_contexts: int = typer.Option(8, "--batch-contexts", min=1, help="contexts per forward pass"),
    model: str = ModelOpt,
    dtype: str = typer.Option("bfloat16", "--dtype", help="model dtype (bfloat16: the encoder matmuls run in bf16 "
                              "too, as `features build` does)"),
    resume: bool = typer.Option(False, "--resume", help="continue an interrupted build (finished layers are kept)"),
    seed: int = typer.Option(0, "--seed"),
    threads: int | None = ThreadsOpt,
    device: str = typer.Option("cpu", "--device", help="where the model and the transcoders run: cpu or cuda "
                                                        "(torchrun: cuda:LOCAL_RANK per rank)"),
) -> None:
    """A feature database for every transcoder of the set (folder/features/L00.duckdb ...), from one pass over real
    text: what the graph viewer shows for a clicked feature."""
    import time

    import mechscope
    from mechscope.cli.common import check_choice, expand_latents, parse_latents
    from mechscope.data import corpus_tokens
    from mechscope.features.stats import StatsConfig
    from mechscope.graphs import load_transcoders
    from mechscope.graphs.features import build_set_features

    check_model_dtype(dtype)
    _check_device(device)
    check_choice(split, ("train", "eval"), "--split")
    check_corpora(corpus)
    ts = load_transcoders(folder)
    chosen = None
    if layers is not None:
        ranges = parse_latents(layers, "--layers")
        if any(b >= ts.n_layers for _, b in ranges):
            raise InputError(f"--layers {layers}: the set in {folder} has layers 0-{ts.n_layers - 1}.")
        chosen = expand_latents(ranges, ts.n_layers, f"the set in {folder}", "--layers")
    from mechscope.scale.dist import init_distributed, self_test, shutdown

    # under torchrun the batches split over ranks and rank 0 writes; the statistics live on the CPU, so the ranks
    # merge them over gloo whatever device the model runs on
    info = init_distributed("gloo", device=device)
    self_test(info, ["barrier", "all_reduce_sum", "all_reduce_max", "all_gather_single"])
    threads = rank_threads(threads, info)
    set_threads(threads, announce=info.is_main)
    m = mechscope.load(model, dtype=dtype, device=str(info.device))
    ts.check_model(m)
    ts.to(info.device)
    if m.tokenizer is None:
        raise InputError(f"{model} has no tokenizer; feature statistics need one to read the corpus.")
    packed = corpus_tokens(list(corpus), m.tokenizer, context_len, split, max_tokens=tokens, seed=seed,
                           cache=info.is_main)
    if tokens - packed.n_tokens >= packed.context_len:
        note(f"statistics over {packed.n_tokens:,} tokens, not the {tokens:,} asked: the {split} split of "
             f"{', '.join(corpus)} holds no more. Add text with --corpus for more.")
    t0 = time.perf_counter()
    bf16 = dtype in ("bfloat16", "bf16")
    paths = build_set_features(m, ts, packed.tokens, folder=folder, layers=chosen, resume=resume,
                               cfg=StatsConfig(top_k=top_k, per_bin=2, batch_contexts=batch_contexts, seed=seed),
                               encode_dtype="bfloat16" if bf16 else "float32",
                               meta={"corpus": list(corpus), "split": split, "context_len": context_len,
                                     "dtype": dtype}, progress=info.is_main, dist=info if info.backend else None)
    if info.is_main:
        out.print(f"{len(paths)} feature databases over {packed.n_tokens:,} tokens in "
                  f"{time.perf_counter() - t0:.0f} s -> {(folder / 'features').resolve()}"
                  + (f" ({info.world_size} ranks)" if info.world_size > 1 else ""), soft_wrap=True)
    shutdown()


def _scores_table(g, pr) -> Table:
    from mechscope.graphs import graph_scores

    t = Table(title=f"attribution graph: {g.n_features} feature nodes of {len(g.active_features)} active, "
                    f"{g.n_pos} tokens, {g.n_logits} target logits", title_justify="left")
    for c in ("graph", "nodes", "edges", "replacement score", "completeness score"):
        t.add_column(c, justify="right")
    rep, comp = graph_scores(g)
    t.add_row("full", f"{g.n_nodes:,}", f"{int((g.edges != 0).sum()):,}", f"{rep:.3f}", f"{comp:.3f}")
    rp, cp = graph_scores(g, pr)
    t.add_row(f"pruned ({pr.node_threshold:g} / {pr.edge_threshold:g})", f"{int(pr.node_mask.sum()):,}",
              f"{int(pr.edge_mask.sum()):,}", f"{rp:.3f}", f"{cp:.3f}")
    return t


@clean_errors
def graph_cmd(
    args: list[str] = typer.Argument(..., help='"PROMPT", or: validate DIR'),
    transcoders: Path | None = typer.Option(None, "--transcoders", "-t", help="the transcoder-set folder"),
    out_dir: Path | None = typer.Option(None, "--out", "-o", help="the graph folder to write"),
    target: list[str] = typer.Option([], "--target", help="a target token (one token, mind the space; repeatable); "
                                     "default: the most likely until p 0.95, at most 10"),
    max_feature_nodes: int = typer.Option(7500, "--max-feature-nodes", min=0, help="feature nodes kept, by influence"),
    node_threshold: float = typer.Option(0.8, "--node-threshold", help="pruning: cumulative influence of nodes kept"),
    edge_threshold: float = typer.Option(0.98, "--edge-threshold", help="pruning: cumulative influence of edges kept"),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="rows per backward pass"),
    n_features: int = typer.Option(100, "--n-features", min=1, help="validate: features perturbed"),
    model: str = ModelOpt,
    dtype: str = typer.Option("float32", "--dtype", help="model dtype (float32 for exact edges)"),
    threads: int | None = ThreadsOpt,
    device: str = DeviceOpt,
) -> None:
    """Attribution graph of PROMPT (mechscope graph "The capital of France is" -t DIR -o DIR), or
    validate a graph folder by interventions (mechscope graph validate DIR), or split an edge over the attention
    heads that carry it (mechscope graph heads DIR SOURCE_ID TARGET_ID; ids as the graph page shows them)."""
    import mechscope
    from mechscope.graphs import AttributionGraph, attribute, load_transcoders, prune, save_neuronpedia, validate

    check_model_dtype(dtype)
    _check_device(device)
    for name, v in (("--node-threshold", node_threshold), ("--edge-threshold", edge_threshold)):
        if not 0.0 <= v <= 1.0:
            raise InputError(f"{name} must lie in [0, 1], got {v}.")
    if args[0] == "validate":
        if len(args) != 2:
            raise InputError("usage: mechscope graph validate DIR (one graph folder).")
        g = AttributionGraph.load(args[1])
        tdir = transcoders or (Path(g.transcoders) if g.transcoders else None)
        if tdir is None:
            raise InputError("the graph does not record its transcoders; pass --transcoders DIR.")
        ts = load_transcoders(tdir, device=device)
        set_threads(threads)
        m = mechscope.load(model, dtype=dtype, device=device)
        v = validate(m, ts, g, n_features=n_features)
        from mechscope.core.io import jsonable, write_json_atomic
        from mechscope.graphs import steer_supernode, suggest_supernodes

        pr = prune(g, g.info.get("node_threshold", 0.8), g.info.get("edge_threshold", 0.98))
        steered = []
        for sn in suggest_supernodes(g, pr)[:5]:  # each suggested group ablated together, beside random groups
            chk = steer_supernode(m, ts, g, pr, sn.nodes, alpha=-1.0)
            steered.append({**sn.to_dict(), "steering": chk.to_dict()})
            out.print(f"supernode {sn.label}: ablated, top logit {chk.effect:+.3f} (graph predicts "
                      f"{chk.predicted:+.3f}; random groups {min(chk.random_effects, default=0):+.3f} .. "
                      f"{max(chk.random_effects, default=0):+.3f})", soft_wrap=True)
        write_json_atomic(jsonable({**v.to_dict(), "supernodes": steered}), Path(args[1]) / "validation.json")
        out.print(v.summary(), soft_wrap=True)
        return
    if args[0] == "heads":
        _heads(args, transcoders, model, dtype, threads, device)
        return
    if len(args) != 1:
        raise InputError(f'pass the prompt as one argument in quotes: mechscope graph "{" ".join(args)}" ...')
    if transcoders is None or out_dir is None:
        raise InputError("a graph needs --transcoders DIR (train with `mechscope transcoders train`) and --out DIR.")
    check_out_dir(out_dir)
    ts = load_transcoders(transcoders, device=device)
    set_threads(threads)
    m = mechscope.load(model, dtype=dtype, device=device)
    ts.check_model(m)
    g = attribute(m, ts, args[0], targets=target or None, max_feature_nodes=max_feature_nodes, batch_size=batch_size)
    pr = prune(g, node_threshold, edge_threshold)
    g.info.update(node_threshold=node_threshold, edge_threshold=edge_threshold)
    g.save(out_dir)
    slug = "".join(c if c.isalnum() else "-" for c in args[0].strip().lower())[:48].strip("-") or "graph"
    from mechscope.graphs import suggest_supernodes

    groups = suggest_supernodes(g, pr)
    save_neuronpedia(g, out_dir / "neuronpedia.json", slug=slug, pruned=pr, supernodes=groups)
    from mechscope.graphs.neuronpedia import load_neuronpedia
    from mechscope.report.graph_page import write_graph_page

    write_graph_page(load_neuronpedia(out_dir / "neuronpedia.json"), out_dir / "graph.html")
    print_table(_scores_table(g, pr))
    note(f"targets: {', '.join(f'{s!r} p={float(p):.3f}' for s, p in zip(g.logit_strs, g.logit_probs))}; "
         f"{g.info['seconds']:.0f} s")
    out.print(f"wrote {out_dir.resolve()} (graph.safetensors, graph.json, neuronpedia.json, graph.html)",
              soft_wrap=True)


def _heads(args: list[str], transcoders: Path | None, model: str, dtype: str, threads: int | None,
           device: str) -> None:
    """``mechscope graph heads DIR SOURCE TARGET``: the heads that carry the edge, and why the top one attended."""
    import mechscope
    from mechscope.graphs import load_transcoders
    from mechscope.graphs.edge_heads import json_edge_heads
    from mechscope.graphs.neuronpedia import load_neuronpedia

    if len(args) != 4:
        raise InputError("usage: mechscope graph heads DIR SOURCE_ID TARGET_ID (node ids as the graph page shows them, "
                         "e.g. 12_3456_5 for feature 3456 of layer 12 at position 5).")
    folder = Path(args[1])
    d = load_neuronpedia(folder / "neuronpedia.json" if folder.is_dir() else folder)
    recorded = (d["metadata"].get("mechscope") or {}).get("transcoders")
    tdir = transcoders or (Path(recorded) if recorded else None)
    if tdir is None:
        raise InputError("the graph does not record its transcoders; pass --transcoders DIR.")
    ts = load_transcoders(tdir, device=device)
    set_threads(threads)
    m = mechscope.load(model, dtype=dtype, device=device)
    ts.check_model(m)
    r = json_edge_heads(m, ts, d, args[2], args[3])
    toks = d["metadata"].get("prompt_tokens") or []

    def tok(p):
        return repr(toks[p]) if 0 <= p < len(toks) else str(p)

    out.print(f"edge {args[2]} -> {args[3]}: {r.edge:+.4f} (frozen replacement model)", soft_wrap=True)
    t = Table(title="heads that carry it", title_justify="left")
    for c in ("layer", "head", "share", "of edge", "strongest move (query <- key)"):
        t.add_column(c, justify="right")
    for h in r.top:
        q, k, v = h.moves[0]
        t.add_row(str(h.layer), str(h.head), f"{h.contribution:+.4f}", f"{h.fraction:.0%}",
                  f"{tok(q)} <- {tok(k)} ({v:+.4f})")
    print_table(t)
    for a in r.attention:
        note(f"L{a.layer}H{a.head} attends {tok(a.query_pos)} <- {tok(a.key_pos)} with score {a.score:+.3f} (pattern "
             f"{a.pattern:.3f}); the largest query x key pairs: " +
             "; ".join(f"{p.query} x {p.key} {p.value:+.3f}" for p in a.pairs[:5]))
