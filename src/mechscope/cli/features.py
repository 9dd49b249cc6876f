"""``mechscope features ...``: build feature databases (statistics of every latent or neuron over a corpus)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.text import Text

from mechscope.cli.common import (CorpusOpt, SplitLinesOpt, TextFieldOpt, check_choice, check_corpora, check_hook_name,
                                  check_model_dtype, check_out_dir, check_out_file, clean_errors, expand_latents,
                                  load_dictionaries, note, open_database, out, parse_latents, print_table, rank_threads,
                                  set_threads)

features_app = typer.Typer(no_args_is_help=True, help="Feature statistics and the feature database.")


@features_app.callback()
def _group() -> None:
    """Feature statistics and the feature database (a group, so `features build` keeps its name)."""


@features_app.command("build")
@clean_errors
def build_cmd(
    dictionary: Path | None = typer.Argument(None, help="dictionary folder (mechscope, SAELens or sparsify)"),
    out_path: Path = typer.Option(Path("features.duckdb"), "--out", "-o", help="the database file to write"),
    neurons: str | None = typer.Option(None, "--neurons", help="instead of a dictionary: an MLP hook, e.g. blocks.3.mlp.hook_post"),
    corpus: list[str] = CorpusOpt,
    text_field: str = TextFieldOpt,
    split_lines: bool = SplitLinesOpt,
    tokens: int = typer.Option(1_000_000, "--tokens", help="tokens of text to compute statistics on"),
    context_len: int = typer.Option(128, "--context-len", help="tokens per context (BOS included)"),
    split: str = typer.Option("train", "--split", help="corpus split: train or eval"),
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="built-in alias, local folder, .gguf or hub id"),
    dtype: str = typer.Option("bfloat16", "--dtype", help="model dtype"),
    hook: str | None = typer.Option(None, "--hook", help="hook for dictionary files that do not record one (sparsify)"),
    encode_dtype: str = typer.Option(
        "auto", "--encode-dtype",
        help="encoder matmul: float32 (exact), bfloat16 (faster), or auto: bfloat16 when --dtype is bfloat16"),
    top_k: int = typer.Option(20, "--top-k", help="top-activating contexts kept per latent"),
    batch_contexts: int = typer.Option(8, "--batch-contexts", help="contexts per forward pass"),
    checkpoint_every: int = typer.Option(50, "--checkpoint-every", help="batches between checkpoints (0: none)"),
    resume: bool = typer.Option(False, "--resume", help="continue an interrupted build from <out>.partial/"),
    seed: int = typer.Option(0, "--seed"),
    threads: int | None = typer.Option(None, "--threads", min=1, help="torch CPU threads (default: the idle cores)"),
    device: str = typer.Option("cpu", "--device", help="where the model and dictionary run: cpu or cuda (torchrun: "
                                                       "cuda:LOCAL_RANK per rank)"),
) -> None:
    """Compute top and quantile examples, density, histograms, logit effects and co-activation of every
    latent of a dictionary (or every neuron of --neurons) in one pass, and write a DuckDB feature database.
    Under torchrun each rank folds the batches of its global indices and rank 0 writes the merged database."""
    import time

    import mechscope
    from mechscope.core.errors import InputError
    from mechscope.data import corpus_tokens
    from mechscope.features.build import build_feature_db
    from mechscope.features.sources import FeatureSource
    from mechscope.features.stats import StatsConfig

    # every check that needs no model first (a typo costs no model load)
    if (dictionary is None) == (neurons is None):
        raise InputError("give a dictionary folder or --neurons blocks.L.mlp.hook_post (exactly one of them).")
    if encode_dtype not in ("auto", "float32", "bfloat16"):
        raise InputError(f"--encode-dtype must be auto, float32 or bfloat16, got {encode_dtype!r}.")
    check_model_dtype(dtype)
    check_choice(split, ("train", "eval"), "--split")
    if tokens < 1 or context_len < 2:
        raise InputError(f"--tokens must be >= 1 and --context-len >= 2, got {tokens} and {context_len}.")
    if neurons is not None:
        check_hook_name(neurons, "--neurons")
        if not neurons.endswith(".mlp.hook_post"):
            raise InputError(f"--neurons takes an MLP hidden hook like 'blocks.3.mlp.hook_post', got {neurons!r}.")
    if hook is not None:
        check_hook_name(hook)
    cfg = StatsConfig(top_k=top_k, batch_contexts=batch_contexts, checkpoint_every=checkpoint_every, seed=seed)
    check_corpora(corpus)
    check_out_file(out_path, "--out", "features.duckdb")
    d = load_dictionaries([dictionary], hook=hook)[0] if dictionary is not None else None
    if encode_dtype == "auto":
        # the activations already carry bf16 rounding; a bf16 encoder matmul then keeps 99% of each latent's
        # top token and a mean Jaccard of 0.994 between active sets (measured: README), at ~1/8 of the cost
        encode_dtype = "bfloat16" if dtype in ("bfloat16", "bf16") else "float32"
    from mechscope.scale.dist import init_distributed, self_test, shutdown

    # under torchrun each rank folds the batches of its global indices; the statistics live on the CPU, so the
    # ranks merge them over gloo whatever device the model runs on
    info = init_distributed("gloo", device=device)
    self_test(info, ["barrier", "all_reduce_sum", "all_reduce_max", "all_gather_single"])
    threads = rank_threads(threads, info)
    set_threads(threads, announce=info.is_main)
    m = mechscope.load(model, dtype=dtype, device=str(info.device))
    if d is not None:
        d = d.to(info.device)
        source = FeatureSource(m, dictionary=d, dictionary_path=str(Path(dictionary).resolve()),
                               encode_dtype=encode_dtype)
    else:
        source = FeatureSource(m, neurons=neurons)
    if m.tokenizer is None:
        raise InputError(f"{model} has no tokenizer; feature statistics need one to read the corpus.")
    packed = corpus_tokens(list(corpus), m.tokenizer, context_len, split, max_tokens=tokens, seed=seed,
                           text_field=text_field, split_lines=split_lines, cache=info.is_main)
    if tokens - packed.n_tokens >= packed.context_len:  # more than the rounding down to whole contexts
        note(f"statistics over {packed.n_tokens:,} tokens, not the {tokens:,} asked: the {split} split of "
             f"{', '.join(corpus)} holds no more. Add text with --corpus for more.")
    t0 = time.perf_counter()
    db = build_feature_db(source, packed.tokens, out_path, cfg, resume=resume, progress=info.is_main,
                          meta={"corpus": list(corpus), "split": split, "context_len": context_len, "dtype": dtype},
                          dist=info if info.backend else None)
    if db is None:  # another rank than 0: its statistics went to rank 0, which writes the database
        shutdown()
        return
    msg = (f"{db.n_latents} latents over {db.meta['n_tokens']:,} tokens in {time.perf_counter() - t0:.0f} s -> "
           f"{out_path.resolve()}")
    for n in db.meta.get("notes", []):
        note(n)
    db.close()
    out.print(Text(msg + (f" ({info.world_size} ranks)" if info.world_size > 1 else ""), style="bold green"),
              soft_wrap=True)
    shutdown()


@features_app.command("explain")
@clean_errors
def explain_cmd(
    database: Path = typer.Argument(..., help="feature database (mechscope features build)"),
    dictionary: Path = typer.Option(..., "--dictionary", "-d", help="the dictionary the database describes"),
    latents: str = typer.Option(..., "--latents", help="latent ids and ranges, e.g. 3,17,250-255"),
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="the model the dictionary belongs to"),
    dtype: str = typer.Option("bfloat16", "--dtype"),
    explainer: str | None = typer.Option(None, "--explainer", help="local chat model for explaining and scoring (default: --model)"),
    endpoint: str | None = typer.Option(None, "--endpoint", help="OpenAI-compatible base URL (…/v1) instead of a local model"),
    endpoint_model: str | None = typer.Option(None, "--endpoint-model", help="model name at --endpoint"),
    corpus: list[str] = CorpusOpt,
    text_field: str = TextFieldOpt,
    split_lines: bool = SplitLinesOpt,
    n_contexts: int = typer.Option(300, "--contexts", help="held-out contexts to draw examples from"),
    context_len: int = typer.Option(64, "--context-len"),
    threads: int | None = typer.Option(None, "--threads", min=1),
) -> None:
    """Label latents: explain each from its top contexts, score the label by detection on held-out contexts,
    and store label, score and provenance in the database."""
    import mechscope
    from mechscope.core.errors import InputError
    from mechscope.data import corpus_tokens
    from mechscope.dictionaries.splice import check_fits
    from mechscope.features.autointerp import LocalChatBackend, OpenAIChatBackend
    from mechscope.features.db import FeatureDB
    from mechscope.features.labeling import label_latents
    from mechscope.features.sources import check_database_matches

    # every check that needs no model first (a typo costs no model load)
    ranges = parse_latents(latents)
    if endpoint and not endpoint_model:
        raise InputError("--endpoint needs --endpoint-model (the model name the server expects).")
    if n_contexts < 1:
        raise InputError(f"--contexts must be at least 1, got {n_contexts}.")
    check_model_dtype(dtype)
    check_corpora(corpus)
    d = load_dictionaries([dictionary])[0]
    with open_database(database) as db:
        ids = expand_latents(ranges, db.n_latents, str(database))
        check_database_matches(db, d)
    set_threads(threads, announce=False)
    m = mechscope.load(model, dtype=dtype)
    check_fits(m, d)
    if endpoint:
        backend = OpenAIChatBackend(endpoint, endpoint_model)
    else:
        backend = LocalChatBackend(m if explainer is None else mechscope.load(explainer, dtype=dtype))
    contexts = corpus_tokens(list(corpus), m.tokenizer, context_len, "eval", text_field=text_field,
                             split_lines=split_lines).tokens[:n_contexts]
    db = FeatureDB(database, read_only=False)
    results = label_latents(m, d, db, ids, contexts, explainer=backend)
    from rich.table import Table

    table = Table(title=f"labels written to {database}", title_justify="left")
    for col in ("latent", "label", "detection balanced accuracy", "AUROC"):
        table.add_column(col)
    for latent, r in results.items():
        if isinstance(r, str):
            table.add_row(str(latent), Text(r), "", "")
        else:
            auroc = "" if r.score.auroc is None else f"{r.score.auroc:.2f}"
            table.add_row(str(latent), Text(r.label), f"{r.score.balanced_accuracy:.2f}", auroc)
    print_table(table)
    out.print(Text(f"scorer: {backend.name}", style="dim"))


@features_app.command("export")
@clean_errors
def export_cmd(
    database: Path = typer.Argument(..., help="feature database (mechscope features build)"),
    latents: str | None = typer.Option(None, "--latents", help="ids and ranges, e.g. 0-99,250,4000-4010 (default: "
                                                               "the first 100 latents, or all if fewer)"),
    dashboard: Path | None = typer.Option(None, "--dashboard", help="write a self-contained HTML dashboard here"),
    neuronpedia: Path | None = typer.Option(
        None, "--neuronpedia", help="write Neuronpedia's upload format (SAEDashboard batch-N.json + explanations.json) here"),
    model_id: str = typer.Option("smollm2-135m", "--model-id", help="Neuronpedia model id"),
    sae_set: str | None = typer.Option(
        None, "--sae-set", help="Neuronpedia source-set id, e.g. res-topk-4608 (default: from the database's dictionary)"),
    layer: int | None = typer.Option(None, "--layer", help="layer number (default: from the database's hook)"),
    sae: Path | None = typer.Option(None, "--sae", help="the dictionary folder: include each latent's decoder direction "
                                                        "(lets Neuronpedia steer with it)"),
) -> None:
    """Export features: a static HTML dashboard that opens offline, and/or Neuronpedia's upload format.

    Upload the Neuronpedia folder with Neuronpedia's convert-saedashboard-to-neuronpedia-export.py
    --saedashboard-output-dir FOLDER.
    """
    from mechscope.core.errors import InputError

    if dashboard is None and neuronpedia is None:
        raise InputError("nothing to do: pass --dashboard FILE.html and/or --neuronpedia FOLDER.")
    ranges = parse_latents(latents) if latents is not None else None
    if dashboard is not None:
        check_out_file(dashboard, "--dashboard", "features.html")
    if neuronpedia is not None:
        check_out_dir(neuronpedia, "--neuronpedia")
    d = load_dictionaries([sae])[0] if sae is not None else None
    with open_database(database) as db:
        _export(db, ranges, d, database, dashboard, neuronpedia, model_id, sae_set, layer)


def _export(db, ranges, d, database: Path, dashboard: Path | None, neuronpedia: Path | None, model_id: str,
            sae_set: str | None, layer: int | None) -> None:
    from mechscope.features.export import export_dashboard, export_neuronpedia
    from mechscope.features.sources import check_database_matches

    ids = expand_latents(ranges, db.n_latents, str(database)) if ranges else list(range(min(100, db.n_latents)))
    if d is not None:
        check_database_matches(db, d)
    if dashboard is not None:
        export_dashboard(db, ids, dashboard, title=f"mechscope features: {database.name}")
        out.print(Text(f"dashboard: {dashboard.resolve()}", style="bold green"), soft_wrap=True)
    if neuronpedia is not None:
        vectors = None if d is None else d.W_dec.detach().float()
        if sae_set is None:
            src = db.meta.get("source") or {}
            hook = str(db.meta.get("hook", ""))
            kind = "res" if "resid" in hook else "mlp" if "mlp" in hook else "att" if ("attn" in hook or "hook_z" in hook) else "x"
            arch = src.get("architecture", "dict") if isinstance(src, dict) else "dict"
            sae_set = f"{kind}-{arch}-{db.n_latents}"  # Neuronpedia's style, e.g. res-topk-4608
        export_neuronpedia(db, ids, neuronpedia, model_id=model_id, sae_set=sae_set, layer=layer, vectors=vectors)
        out.print(Text(f"neuronpedia upload files: {neuronpedia.resolve()}", style="bold green"), soft_wrap=True)
