"""``mechscope toy ...``: the classic results reproduced from scratch, each writing ``<out>/<toy>.html`` and
``<out>/<toy>.json`` with the paper's numbers beside ours."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.text import Text

from mechscope.cli.common import check_corpora, check_out_dir, clean_errors, out, set_threads

toys_app = typer.Typer(no_args_is_help=True, help="Classic results from scratch: superposition, grokking, induction.")


@toys_app.callback()
def _group() -> None:
    """Classic results from scratch (a group, so each toy keeps its name)."""


def _start(threads: int | None, out_dir: Path) -> None:
    """Check the output folder before any training, then set the threads."""
    check_out_dir(out_dir)
    set_threads(threads)


def _write(result: dict, out_dir: Path) -> None:
    from mechscope.report.toys import write_toy_report

    html, js = write_toy_report(result, out_dir)
    out.print(Text(f"{result['title']}: {result['runtime_s']:.0f} s", style="bold"))
    for c in result["comparisons"]:
        out.print(Text(f"  {c['quantity']}: paper {c['paper']} | ours {c['ours']}"), soft_wrap=True)
    out.print(Text(f"report: {html.resolve()}\nresults: {js.resolve()}", style="bold green"), soft_wrap=True)


OUT = typer.Option(Path("mechscope-toys"), "--out", "-o", help="folder for <toy>.html and <toy>.json")
SEED = typer.Option(0, "--seed", help="seeds data, initialisation and every sample; recorded in the result")
THREADS = typer.Option(None, "--threads", min=1, help="torch CPU threads (default: the idle cores)")


@toys_app.command("superposition")
@clean_errors
def superposition_cmd(
    out_dir: Path = OUT,
    seed: int = SEED,
    steps: int = typer.Option(6_000, "--steps", help="Adam steps of each sparsity-sweep model"),
    threads: int | None = THREADS,
) -> None:
    """Toy Models of Superposition (Elhage et al. 2022): n=20 features in m=5 dimensions over a sparsity
    sweep, and the phase diagram of 2 features in 1 dimension."""
    from mechscope.toys.superposition import SuperpositionConfig, run_superposition

    cfg = SuperpositionConfig(seed=seed, steps=steps)  # checks itself
    _start(threads, out_dir)
    _write(run_superposition(cfg), out_dir)


@toys_app.command("modular")
@clean_errors
def modular_cmd(
    out_dir: Path = OUT,
    seed: int = SEED,
    p: int = typer.Option(113, "--p", help="the modulus (a prime)"),
    epochs: int = typer.Option(15_000, "--epochs", help="full-batch epochs"),
    train_fraction: float = typer.Option(0.3, "--train-fraction", help="share of the p^2 pairs trained on"),
    threads: int | None = THREADS,
) -> None:
    """Modular addition and grokking (Nanda et al. 2023): loss curves, key frequencies, progress measures."""
    from mechscope.toys.modular import ModularConfig, run_modular

    cfg = ModularConfig(p=p, epochs=epochs, train_fraction=train_fraction, seed=seed)
    cfg.check()
    _start(threads, out_dir)
    _write(run_modular(cfg), out_dir)


@toys_app.command("induction")
@clean_errors
def induction_cmd(
    out_dir: Path = OUT,
    seed: int = SEED,
    steps: int | None = typer.Option(None, "--steps", help="training steps (default: 4000; synthetic 2000)"),
    batch: int | None = typer.Option(None, "--batch", help="contexts per step (default: 8; synthetic 32)"),
    lr: float | None = typer.Option(None, "--lr", help="peak AdamW learning rate (default: 3e-3)"),
    context_len: int | None = typer.Option(None, "--context-len",
                                           help="tokens per context (default 512: the paper's ICL score needs >= 501)"),
    corpus: list[str] = typer.Option(["pysource"], "--corpus", "-c",
                                     help="training text: corpus names or files (repeatable; default pysource, "
                                          "the Python standard library's source)"),
    synthetic: bool = typer.Option(False, "--synthetic", help="the quick setting: repeated trigram-language sequences "
                                                              "instead of text (about a minute)"),
    eval_every: int | None = typer.Option(None, "--eval-every", help="steps between scored checkpoints (default: 250)"),
    vocab: int | None = typer.Option(None, "--vocab", help="token ids: the BPE's size (default 1024; synthetic 64)"),
    tokenizer: str = typer.Option("bpe", "--tokenizer", help="bpe (trained on the corpora, every token its own id) "
                                                             "or smollm2 (the default model's, top ids + 'other')"),
    d_model: int | None = typer.Option(None, "--d-model", help="residual width (default 128; synthetic 64)"),
    heads: int | None = typer.Option(None, "--heads", help="attention heads per layer (default 2; synthetic 4)"),
    positions: str | None = typer.Option(None, "--positions", help="shortformer (GPT-2 with sinusoidal positions in "
                                         "q and k only; default for text), learned (GPT-2; default --synthetic) or "
                                         "rotary (Llama)"),
    device: str = typer.Option("cpu", "--device", help="where to train: cpu, cuda or cuda:N"),
    threads: int | None = THREADS,
) -> None:
    """Induction heads from scratch (Olsson et al. 2022): a 2-layer attention-only model, the ICL score and
    head scores over training, the phase change, and the circuit ablated."""
    import dataclasses

    from mechscope.toys.induction import SYNTHETIC, InductionConfig, run_induction

    base = SYNTHETIC if synthetic else InductionConfig(corpus=tuple(corpus))
    given = {"steps": steps, "batch": batch, "lr": lr, "context_len": context_len, "eval_every": eval_every,
             "vocab": vocab, "d_model": d_model, "n_heads": heads, "positions": positions}
    cfg = dataclasses.replace(base, seed=seed, device=device, tokenizer=tokenizer,
                              **{k: v for k, v in given.items() if v is not None})
    cfg.check()
    if not cfg.synthetic:
        check_corpora(cfg.corpus)
    _start(threads, out_dir)
    _write(run_induction(cfg), out_dir)


@toys_app.command("render")
@clean_errors
def render_cmd(
    results: Path = typer.Argument(..., help="a <toy>.json written by mechscope toy ... (e.g. docs/toys/modular.json)"),
    out_dir: Path = OUT,
) -> None:
    """Re-render a toy's HTML page from its saved JSON (no training)."""
    import json

    from mechscope.core.errors import InputError
    from mechscope.report.toys import write_toy_report
    from mechscope.toys.common import REQUIRED

    try:
        result = json.loads(Path(results).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read {results} as JSON ({e}); pass a <toy>.json from mechscope toy.") from None
    missing = [k for k in (*REQUIRED, "runtime_s", "date", "machine", "version") if k not in result]
    if missing:
        raise InputError(f"{results} is not a toy result (missing {missing}); pass a <toy>.json from mechscope toy.")
    check_out_dir(out_dir)
    html, _ = write_toy_report(result, out_dir)
    out.print(Text(f"report: {html.resolve()}", style="bold green"), soft_wrap=True)
