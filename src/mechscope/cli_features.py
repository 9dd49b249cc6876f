"""``mechscope features ...``: build feature databases (statistics of every latent or neuron over a corpus)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.text import Text

from mechscope.cli import _clean_errors

features_app = typer.Typer(no_args_is_help=True, help="Feature statistics and the feature database.")


@features_app.callback()
def _group() -> None:
    """Feature statistics and the feature database (a group, so `features build` keeps its name)."""


@features_app.command("build")
@_clean_errors
def build_cmd(
    dictionary: Path | None = typer.Argument(None, help="dictionary folder (mechscope, SAELens or sparsify)"),
    out_path: Path = typer.Option(Path("features.duckdb"), "--out", "-o", help="the database file to write"),
    neurons: str | None = typer.Option(None, "--neurons", help="instead of a dictionary: an MLP hook, e.g. blocks.3.mlp.hook_post"),
    corpus: list[str] = typer.Option(["pydoc", "wikipedia", "austen", "shakespeare"], "--corpus", "-c",
                                     help="corpus name, text/JSONL/Parquet file, folder, or hf:DATASET (repeatable)"),
    tokens: int = typer.Option(1_000_000, "--tokens", help="tokens of text to compute statistics on"),
    context_len: int = typer.Option(128, "--context-len", help="tokens per context (BOS included)"),
    split: str = typer.Option("train", "--split", help="corpus split: train or eval"),
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="built-in alias, local folder, .gguf or hub id"),
    dtype: str = typer.Option("bfloat16", "--dtype", help="model dtype"),
    hook: str | None = typer.Option(None, "--hook", help="hook for dictionary files that do not record one (sparsify)"),
    encode_dtype: str = typer.Option("float32", "--encode-dtype", help="TopK encoder matmul: float32 (exact) or bfloat16 (faster)"),
    top_k: int = typer.Option(20, "--top-k", help="top-activating contexts kept per latent"),
    batch_contexts: int = typer.Option(8, "--batch-contexts", help="contexts per forward pass"),
    checkpoint_every: int = typer.Option(50, "--checkpoint-every", help="batches between checkpoints (0: none)"),
    resume: bool = typer.Option(False, "--resume", help="continue an interrupted build from <out>.partial/"),
    seed: int = typer.Option(0, "--seed"),
    threads: int | None = typer.Option(None, "--threads", min=1, help="torch CPU threads (default: the idle cores)"),
) -> None:
    """Compute top and quantile examples, density, histograms, logit effects and co-activation of every
    latent of a dictionary (or every neuron of --neurons) in one pass, and write a DuckDB feature database."""
    import time

    import torch

    import mechscope
    from mechscope.cli import auto_threads, out
    from mechscope.core.errors import InputError
    from mechscope.data import corpus_tokens
    from mechscope.features.build import build_feature_db
    from mechscope.features.sources import FeatureSource
    from mechscope.features.stats import StatsConfig

    if (dictionary is None) == (neurons is None):
        raise InputError("give a dictionary folder or --neurons blocks.L.mlp.hook_post (exactly one of them).")
    n, why = (threads, "--threads") if threads else auto_threads()
    torch.set_num_threads(n)
    out.print(Text(f"torch threads: {n} ({why})"))
    m = mechscope.load(model, dtype=dtype)
    if dictionary is not None:
        from mechscope.dictionaries import load_dictionary

        d = load_dictionary(dictionary, hook=hook)
        source = FeatureSource(m, dictionary=d, dictionary_path=str(Path(dictionary).resolve()),
                               encode_dtype=encode_dtype)
    else:
        source = FeatureSource(m, neurons=neurons)
    if m.tokenizer is None:
        raise InputError(f"{model} has no tokenizer; feature statistics need one to read the corpus.")
    packed = corpus_tokens(list(corpus), m.tokenizer, context_len, split, max_tokens=tokens, seed=seed)
    cfg = StatsConfig(top_k=top_k, batch_contexts=batch_contexts, checkpoint_every=checkpoint_every, seed=seed)
    t0 = time.perf_counter()
    db = build_feature_db(source, packed.tokens, out_path, cfg, resume=resume,
                          meta={"corpus": list(corpus), "split": split, "context_len": context_len, "dtype": dtype})
    msg = (f"{db.n_latents} latents over {db.meta['n_tokens']:,} tokens in {time.perf_counter() - t0:.0f} s -> "
           f"{out_path.resolve()}")
    for note in db.meta.get("notes", []):
        out.print(Text(f"note: {note}", style="yellow"), soft_wrap=True)
    db.close()
    out.print(Text(msg, style="bold green"), soft_wrap=True)
