"""``mechscope sae ...``: train and evaluate sparse dictionaries from the command line."""

from __future__ import annotations

import itertools
import os
import json
from pathlib import Path

import typer
from rich.table import Table
from rich.text import Text

from mechscope.cli.common import (CorpusOpt, SplitLinesOpt, TextFieldOpt, check_choice, check_corpora, check_hook_name,
                                  check_model_dtype, check_out_dir, clean_errors, load_dictionaries, note, out,
                                  print_table, rank_threads, set_threads)

sae_app = typer.Typer(no_args_is_help=True, help="Train and evaluate sparse autoencoders and transcoders.")


def _site_tag(hook: str) -> str:
    return hook.replace("blocks.", "L").replace(".hook_", "_").replace("hook_", "").replace(".", "_")


def _eval_table(rows: dict) -> Table:
    keys = ("l0", "fvu", "fvu_without_outliers", "cosine_similarity", "ce_loss_recovered", "delta_lm_loss",
            "kl_to_clean", "dead_fraction", "dense_fraction", "n_tokens")
    table = Table(title="evaluation on held-out text", title_justify="left")
    table.add_column("dictionary", no_wrap=True)
    for k in keys:
        table.add_column(k, justify="right")
    for name, s in rows.items():
        table.add_row(Text(name), *[Text(f"{s[k]:.4g}" if isinstance(s[k], float) else str(s[k])) for k in keys])
    return table


def _write_eval(folder: Path, e, corpus) -> None:
    """Write eval.json (it records the tokens asked and used) and say when fewer were used than asked."""
    from mechscope.core.io import jsonable, write_json_atomic

    write_json_atomic(jsonable(e), folder / "eval.json")
    if e.n_tokens_requested and e.n_tokens < e.n_tokens_requested:
        note(f"{folder.name}: evaluated on {e.n_tokens:,} held-out tokens, not the {e.n_tokens_requested:,} asked: "
             f"the held-out split of {', '.join(corpus.sources)} (about {corpus.eval_fraction:.0%} of its documents) "
             "holds no more. Add text with --corpus for a larger evaluation; eval.json records both numbers.")


@sae_app.command("train")
@clean_errors
def train_cmd(
    hook: list[str] = typer.Option(..., "--hook", help="input hook, e.g. blocks.15.hook_resid_post (repeatable)"),
    arch: str = typer.Option("topk", "--arch", help="relu, topk, batchtopk or jumprelu"),
    k: list[int] = typer.Option([32], "--k", help="latents per token for topk/batchtopk (repeatable)"),
    width: list[int] = typer.Option([4608], "--width", help="number of latents d_sae (repeatable)"),
    tokens: int = typer.Option(2_000_000, "--tokens", help="training tokens (rounded down to whole --batch-tokens steps)"),
    hook_out: str | None = typer.Option(None, "--hook-out", help="output hook: trains a transcoder (e.g. blocks.N.hook_mlp_out)"),
    skip: bool = typer.Option(False, "--skip", help="transcoder with a linear skip connection"),
    batch_tokens: int = typer.Option(4096, "--batch-tokens", help="tokens per optimizer step"),
    lr: float | None = typer.Option(None, "--lr", help="learning rate (default 2e-4 / sqrt(d_sae / 2^14))"),
    l1: float = typer.Option(5.0, "--l1", help="relu: L1 coefficient"),
    l0: float = typer.Option(1.0, "--l0", help="jumprelu: L0 coefficient"),
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="built-in alias, local folder, .gguf or hub id"),
    dtype: str = typer.Option("bfloat16", "--dtype", help="model dtype for harvesting activations"),
    compute_dtype: str = typer.Option("bfloat16", "--compute-dtype", help="dictionary compute: float32 or bfloat16 (autocast)"),
    corpus: list[str] = CorpusOpt,
    text_field: str = TextFieldOpt,
    split_lines: bool = SplitLinesOpt,
    context_len: int = typer.Option(128, "--context-len", help="tokens per context (BOS included)"),
    out_dir: Path = typer.Option(Path("mechscope-sae"), "--out", "-o", help="run folder"),
    resume: bool = typer.Option(False, "--resume", help="continue the run in --out from its last checkpoint"),
    checkpoint_every: int = typer.Option(100, "--checkpoint-every", help="steps between checkpoints (0: end only)"),
    eval_tokens: int = typer.Option(25_000, "--eval-tokens", help="held-out tokens to evaluate on afterwards (0: skip)"),
    seed: int = typer.Option(0, "--seed"),
    threads: int | None = typer.Option(None, "--threads", min=1, help="torch CPU threads (default: the idle cores)"),
    wandb_project: str | None = typer.Option(None, "--wandb-project", help="log to Weights & Biases (if installed)"),
    stream: bool = typer.Option(False, "--stream", help="stream activations through a shuffle buffer instead of harvesting them to disk"),
    memory_budget_gib: float | None = typer.Option(None, "--memory-budget-gib", help="refuse a plan that needs more memory than this (GiB)"),
    tp: int = typer.Option(1, "--tp", min=1, help="under torchrun: latent shards per dictionary (world = dp x tp)"),
    device: str | None = typer.Option(None, "--device", help="cpu or cuda (default: cuda when available); torchrun: "
                                                             "cuda:LOCAL_RANK per rank"),
) -> None:
    """Harvest activations from real text and train dictionaries (every --hook x --width x --k from one pass).

    Under torchrun (``torchrun --nproc-per-node=N -m mechscope sae train ...``) the harvest's shards are split
    over the ranks and training is data parallel with the same global batch (--batch-tokens), equal to one
    process to rounding; rank 0 writes and prints. ``--tp T`` also splits each dictionary's latents over T ranks
    (every --width must be a multiple of T; the world size a multiple of T). A run resumes (--resume) at any
    world size and any --tp.
    """
    import mechscope
    from mechscope.core.errors import InputError
    from mechscope.dictionaries import ARCHITECTURES, DictionaryConfig
    from mechscope.dictionaries.splice import site_width
    from mechscope.training import DictionarySpec, TrainConfig
    from mechscope.training.pipeline import CorpusConfig, evaluate_on_corpus, train_on_corpus

    # every check that needs no model first (a typo costs no model load)
    if eval_tokens < 0:
        raise InputError(f"--eval-tokens must be 0 (no evaluation) or more, got {eval_tokens}.")
    check_model_dtype(dtype)
    check_choice(compute_dtype, ("float32", "bfloat16"), "--compute-dtype")
    check_choice(arch, ARCHITECTURES, "--arch")
    for h in hook:
        check_hook_name(h, "--hook")
    if hook_out is not None:
        check_hook_name(hook_out, "--hook-out")
    ks = k if arch in ("topk", "batchtopk") else [None]

    def config(h: str, w: int, kk: int | None, d_in: int = 1, d_out: int = 1, name: str = "") -> DictionaryConfig:
        return DictionaryConfig(arch, d_in, w, h, hook_out=hook_out or h, d_out=d_out, k=kk, skip=skip, model_name=name)

    for h, w, kk in itertools.product(hook, width, ks):
        config(h, w, kk)  # --width, --k, --skip against the architecture, before the widths are known
    tcfg = TrainConfig(n_tokens=tokens, batch_tokens=batch_tokens, dtype=compute_dtype, seed=seed,
                       checkpoint_every_steps=checkpoint_every, wandb_project=wandb_project,
                       memory_budget_bytes=None if memory_budget_gib is None else int(memory_budget_gib * 2**30))
    corpus_cfg = CorpusConfig(tuple(corpus), context_len=context_len, seed=seed, text_field=text_field,
                              split_lines=split_lines)
    check_corpora(corpus)
    check_out_dir(out_dir)
    from mechscope.training.parallel import check_tp
    from mechscope.training.tensor_parallel import shard_bounds

    check_tp(int(os.environ.get("WORLD_SIZE", "1") or 1), tp)  # before any model is loaded
    for w in width:
        shard_bounds(w, 0, tp)
    if tcfg.n_tokens_trained != tokens:
        note(f"training on {tcfg.n_tokens_trained:,} tokens, not the {tokens:,} asked: {tcfg.n_steps:,} whole steps "
             f"of --batch-tokens {batch_tokens:,} (a part-step is not trained). Pass a multiple of --batch-tokens to "
             "train on exactly that many.")
    from mechscope.scale.dist import init_distributed, self_test, shutdown

    info = init_distributed(device=device)
    self_test(info, ["barrier", "broadcast", "all_reduce_sum", "all_reduce_max", "all_reduce_min", "all_gather_single"])
    set_threads(rank_threads(threads, info), announce=info.is_main)
    m = mechscope.load(model, dtype=dtype, device=str(info.device))
    specs = []
    for h, w, kk in itertools.product(hook, width, ks):
        h_out = hook_out or h
        cfg = config(h, w, kk, site_width(m, h), site_width(m, h_out), m.cfg.name)
        name = f"{arch}_{_site_tag(h)}" + (f"_to_{_site_tag(h_out)}" if h_out != h else "") + f"_w{w}" + (f"_k{kk}" if kk else "")
        specs.append(DictionarySpec(name, cfg, lr=lr, l1_coefficient=l1, l0_coefficient=l0))
    par = info if info.backend else None
    results = train_on_corpus(m, specs, tcfg, out_dir, corpus=corpus_cfg, resume=resume, stream=stream, dist=par,
                              progress=info.is_main, tp=tp)
    if info.is_main:
        out.print(Text(f"trained {len(results)} dictionar{'y' if len(results) == 1 else 'ies'} in "
                       f"{out_dir.resolve()}", style="bold green"), soft_wrap=True)
    if eval_tokens:
        rows = {}
        for name, d in results.items():
            e = evaluate_on_corpus(m, d.to(m.device), corpus=corpus_cfg, n_tokens=eval_tokens, progress=info.is_main,
                                   dist=par)
            if info.is_main:
                _write_eval(out_dir / name, e, corpus_cfg)
            rows[name] = e.summary()
        if info.is_main:
            print_table(_eval_table(rows))
    shutdown()


@sae_app.command("eval")
@clean_errors
def eval_cmd(
    dictionary: list[Path] = typer.Argument(..., help="dictionary folder(s): mechscope, SAELens or sparsify"),
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="the model the dictionary belongs to"),
    dtype: str = typer.Option("bfloat16", "--dtype", help="model dtype"),
    hook: str | None = typer.Option(None, "--hook", help="hook for files that do not record one (sparsify)"),
    corpus: list[str] = CorpusOpt,
    text_field: str = TextFieldOpt,
    split_lines: bool = SplitLinesOpt,
    context_len: int = typer.Option(128, "--context-len"),
    tokens: int = typer.Option(25_000, "--tokens", help="held-out tokens to evaluate on"),
    seed: int = typer.Option(0, "--seed", help="seed of the train/eval split (use the training run's)"),
    threads: int | None = typer.Option(None, "--threads", min=1),
) -> None:
    """Evaluate dictionaries on held-out text: L0, FVU, CE loss recovered, KL, dead/dense latents.

    Writes eval.json into each dictionary folder. Under torchrun the batches split over ranks and rank 0 writes."""
    import mechscope
    from mechscope.core.errors import InputError
    from mechscope.dictionaries.splice import check_fits
    from mechscope.training.pipeline import CorpusConfig, evaluate_on_corpus

    check_model_dtype(dtype)
    if tokens < 1:
        raise InputError(f"--tokens must be at least 1 (held-out tokens to evaluate on), got {tokens}.")
    if hook is not None:
        check_hook_name(hook)
    corpus_cfg = CorpusConfig(tuple(corpus), context_len=context_len, seed=seed, text_field=text_field,
                              split_lines=split_lines)
    check_corpora(corpus)
    dicts = load_dictionaries(dictionary, hook=hook)
    from mechscope.scale.dist import init_distributed, self_test, shutdown

    info = init_distributed(device="cpu")  # under torchrun: the batches split over ranks, rank 0 writes
    self_test(info, ["barrier", "all_reduce_sum"])
    threads = rank_threads(threads, info)
    set_threads(threads, announce=False)
    m = mechscope.load(model, dtype=dtype)
    for d in dicts:
        check_fits(m, d)
    rows = {}
    for folder, d in zip(dictionary, dicts):
        e = evaluate_on_corpus(m, d, corpus=corpus_cfg, n_tokens=tokens, progress=info.is_main,
                               dist=info if info.backend else None)
        if info.is_main:
            _write_eval(folder, e, corpus_cfg)
        rows[folder.name] = e.summary()
    if info.is_main:
        print_table(_eval_table(rows))
        out.print(json.dumps(rows, indent=1))
    shutdown()


@sae_app.command("harvest")
@clean_errors
def harvest_cmd(
    hook: list[str] = typer.Option(..., "--hook", help="hook to store, e.g. blocks.15.hook_resid_post (repeatable)"),
    out_dir: Path = typer.Option(..., "--out", "-o", help="the activation directory (shards + manifest.json)"),
    tokens: int = typer.Option(1_000_000, "--tokens", min=1, help="tokens of text to run the model on"),
    corpus: list[str] = CorpusOpt,
    text_field: str = TextFieldOpt,
    split_lines: bool = SplitLinesOpt,
    context_len: int = typer.Option(128, "--context-len", min=2, help="tokens per context (BOS included)"),
    split: str = typer.Option("train", "--split", help="corpus split: train or eval"),
    shard_tokens: int = typer.Option(2**18, "--shard-tokens", min=1, help="rows per shard (whole contexts)"),
    batch_contexts: int = typer.Option(8, "--batch-contexts", min=1, help="contexts per forward"),
    store_dtype: str = typer.Option("bfloat16", "--store-dtype", help="bfloat16, float16 or float32 on disk"),
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="built-in alias, local folder, .gguf or hub id"),
    dtype: str = typer.Option("bfloat16", "--dtype", help="model dtype"),
    device: str | None = typer.Option(None, "--device", help="cpu or cuda (default: cuda when available)"),
    timeout: float = typer.Option(60.0, "--timeout", help="seconds a peer may be missing or silent (torchrun)"),
    seed: int = typer.Option(0, "--seed"),
    threads: int | None = typer.Option(None, "--threads", min=1, help="torch CPU threads per rank"),
) -> None:
    """Run the model over real text and store activations as sharded safetensors. Under torchrun every rank takes the
    shards of its global indices (shard s to rank s % world size): the directory is byte-identical to one process's,
    and a relaunch after a killed rank recomputes only the missing shards."""
    import time

    import torch

    import mechscope
    from mechscope.data import corpus_tokens
    from mechscope.core.errors import InputError
    from mechscope.data.harvesting import harvest
    from mechscope.scale.dist import init_distributed, self_test, shutdown

    for h in hook:
        check_hook_name(h)
    check_model_dtype(dtype)
    check_choice(split, ("train", "eval"), "--split")
    check_choice(store_dtype, ("bfloat16", "float16", "float32"), "--store-dtype")
    check_corpora(corpus)
    info = init_distributed(timeout_s=timeout, device=device)
    self_test(info, ["barrier", "broadcast"])
    threads = rank_threads(threads, info)
    set_threads(threads, announce=info.is_main)
    m = mechscope.load(model, dtype=dtype, device=str(info.device))
    if m.tokenizer is None:
        raise InputError(f"{model} has no tokenizer; a harvest needs one to read the corpus.")
    packed = corpus_tokens(list(corpus), m.tokenizer, context_len, split, max_tokens=tokens, seed=seed,
                           text_field=text_field, split_lines=split_lines, cache=info.is_main)
    t0 = time.perf_counter()
    sa = harvest(m, hook, packed.tokens, out_dir, shard_tokens=shard_tokens, dtype=getattr(torch, store_dtype),
                 forward_batch_contexts=batch_contexts, progress=info.is_main, dist=info if info.backend else None)
    if info.is_main:
        out.print(f"harvested {sa.n_tokens:,} tokens at {len(sa.hooks)} hooks into {out_dir.resolve()} in "
                  f"{time.perf_counter() - t0:.0f} s ({info.world_size} rank{'s' if info.world_size > 1 else ''})",
                  soft_wrap=True)
    shutdown()
