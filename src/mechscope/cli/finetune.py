"""``mechscope finetune``: full or LoRA fine-tuning of a model on a labelled-data JSONL of chats or texts."""

from __future__ import annotations

from pathlib import Path

import typer

from mechscope.cli.common import check_out_dir, clean_errors, out, set_threads

ModelOpt = typer.Option("smollm2-135m", "--model", "-m", help="built-in alias, local folder, .gguf file or hub id")
OutOpt = typer.Option(Path("mechscope-finetune"), "--out", "-o", help="run folder; the tuned model goes to OUT/model")
LoraTargetOpt = typer.Option([], "--lora-target", help="repeatable: module names for LoRA (default: every attention "
                             "and MLP projection)")
ThreadsOpt = typer.Option(None, "--threads", min=1, help="torch CPU threads (default: the idle cores)")


@clean_errors
def finetune_cmd(
    data: str = typer.Argument(..., help="labelled-data .jsonl (chats or texts); the loss covers the assistant "
                               "answer (the last message) or each example's score_span"),
    model: str = ModelOpt,
    out_dir: Path = OutOpt,
    method: str = typer.Option("full", "--method", help="full or lora"),
    steps: int | None = typer.Option(None, "--steps", help="optimizer steps (default: --epochs, or 100)"),
    epochs: float | None = typer.Option(None, "--epochs", help="passes over the data (instead of --steps)"),
    lr: float = typer.Option(1e-4, "--lr", help="AdamW (peak) learning rate"),
    lr_schedule: str = typer.Option("constant", "--lr-schedule", help="constant, linear or cosine (after warmup)"),
    warmup: int = typer.Option(0, "--warmup", help="optimizer steps of linear warmup"),
    batch_size: int = typer.Option(8, "--batch-size", help="examples per micro-batch"),
    grad_accum: int = typer.Option(1, "--grad-accum", help="micro-batches per optimizer step"),
    lora_r: int = typer.Option(8, "--lora-r", help="LoRA rank"),
    lora_alpha: float = typer.Option(16.0, "--lora-alpha", help="LoRA alpha (the update scale is alpha / r)"),
    lora_dropout: float = typer.Option(0.0, "--lora-dropout", help="dropout on the LoRA input"),
    lora_targets: list[str] = LoraTargetOpt,
    max_len: int = typer.Option(512, "--max-len", help="tokens per example (longer ones are cut)"),
    loss_on: str = typer.Option("answer", "--loss-on", help="answer (the scored tokens: completion-only) or all "
                                "(every token, prompt and template included)"),
    unlikelihood: float = typer.Option(0.0, "--unlikelihood", min=0.0, help="weight of the unlikelihood loss on "
                                       "examples' rejected answers (meta.reject): -log(1 - p) per rejected token"),
    checkpoint_every: int = typer.Option(0, "--checkpoint-every", help="steps between checkpoints (0: the last only)"),
    seed: int = typer.Option(0, "--seed", help="seed of the data order, LoRA init and dropout"),
    bf16: bool = typer.Option(False, "--bf16", help="bfloat16 autocast (weights stay float32)"),
    resume: bool = typer.Option(False, "--resume", help="continue the run in --out from its latest checkpoint"),
    threads: int | None = ThreadsOpt,
) -> None:
    """Fine-tune a model (full or LoRA) on chat or text examples; writes OUT/model, which --model OUT/model opens."""
    from mechscope.finetune import FinetuneConfig, finetune

    cfg = FinetuneConfig(method=method, lr=lr, lr_schedule=lr_schedule, warmup_steps=warmup, n_steps=steps if steps is not None or epochs is not None else 100,
                         n_epochs=epochs, batch_size=batch_size, grad_accum=grad_accum, lora_r=lora_r,
                         lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                         lora_target_modules=tuple(lora_targets) or None, seed=seed, bf16=bf16,
                         checkpoint_every=checkpoint_every, max_len=max_len,
                         loss_on=loss_on, unlikelihood=unlikelihood)
    check_out_dir(out_dir)
    set_threads(threads)
    res = finetune(model, data, out_dir, cfg, resume=resume)
    loss = "n/a" if res.final_loss is None else f"{res.final_loss:.4f}"
    out.print(f"{res.n_steps} steps, final loss {loss} nats/token; model: {res.model_dir}")
