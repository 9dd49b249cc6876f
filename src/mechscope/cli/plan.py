"""``mechscope plan harvest|train|features``: predict a run's memory per rank, disk and wall time before it runs.

    mechscope plan harvest --model meta-llama/Llama-3.1-8B --hook blocks.15.hook_resid_post --tokens 1e9 \\
        --context-len 2048 --device h100 --nproc 8
    mechscope plan train --d-in 4096 --width 131072 --tokens 1e9 --device h100 --nproc 8 --tp 8 --hours 2

``--device this`` (the default) calibrates this machine with the actual model once (cached); ``h100`` / ``h200``
use the vendor's peak at ``--mfu``. A plan over ``--memory-gb``, ``--disk-gb`` or ``--hours`` exits with status 2
and every term's number. On a GPU the host's memory (token ids, shard staging, feature statistics) is totalled
apart from the device's.
"""

from __future__ import annotations

import json

import typer
from rich.table import Table
from rich.text import Text

from mechscope.cli.common import clean_errors, out, print_table, set_threads

plan_app = typer.Typer(no_args_is_help=True, help="Predict memory, disk and time of a run before it runs.")

ModelOpt = typer.Option("smollm2-135m", "--model", "-m", help="alias, folder, config.json or hub id (config only)")
DeviceOpt = typer.Option("this", "--device", help="this (calibrate this machine), h100 or h200")
MfuOpt = typer.Option(0.4, "--mfu", help="fraction of a named device's peak reached (assumed)")
NprocOpt = typer.Option(1, "--nproc", "--world", min=1, help="ranks (torchrun --nproc-per-node x nodes)")
MemOpt = typer.Option(None, "--memory-gb", help="refuse a plan needing more memory per rank (GB)")
DiskOpt = typer.Option(None, "--disk-gb", help="refuse a plan writing more than this (GB)")
HoursOpt = typer.Option(None, "--hours", help="refuse a plan taking longer (hours)")
JsonOpt = typer.Option(False, "--json", help="print the plan as JSON")
RecalOpt = typer.Option(False, "--recalibrate", help="measure this machine again (--device this)")
ThreadsOpt = typer.Option(None, "--threads", min=1, help="torch CPU threads of the calibration (as the run's)")


@plan_app.callback()
def _group() -> None:
    """Predict memory, disk and time of a run before it runs."""


def _tokens(v: float) -> int:
    from mechscope.core.errors import InputError

    if v < 1 or v != int(v):
        raise InputError(f"--tokens must be a positive whole number (1e9 is fine), got {v}.")
    return int(v)


def _device(device: str, mfu: float, model: str, dtype: str, recalibrate: bool, threads: int | None):
    from mechscope.planning.calibrate import calibrate, device_profile

    if device == "this":
        set_threads(threads, announce=False)
        return calibrate(model, dtype=dtype, refresh=recalibrate)
    return device_profile(device, mfu=mfu)


def _show(plan, budget, as_json: bool) -> None:
    from mechscope.planning.budget import fmt

    if as_json:
        out.print_json(json.dumps(plan.to_dict()))
    else:
        table = Table(title=f"plan: {plan.kind} on {plan.world} rank{'s' if plan.world > 1 else ''}"
                      + (f" (tp {plan.tp})" if plan.tp > 1 else "") + f", {plan.device}", title_justify="left")
        for col in ("", "term", "value", "formula"):
            table.add_column(col, no_wrap=col != "formula")
        totals = [("memory", "memory / rank", plan.memory_bytes), ("disk", "disk (peak)", plan.disk_bytes),
                  ("time", "time", plan.seconds)]
        if not plan.host_is_device:
            totals.insert(1, ("memory", "host memory / rank", plan.host_memory_bytes))
        for kind, label, total in totals:
            for t in plan.terms:
                if t.kind == kind and (label != "host memory / rank") == (plan.host_is_device or not t.host):
                    tags = [t.phase and f"during {t.phase}", t.reclaimable and "reclaimable"]
                    name = t.name + (f" [{', '.join(x for x in tags if x)}]" if any(tags) else "")
                    table.add_row(Text(""), Text(name), Text(fmt(kind, t.value)), Text(t.formula))
            note = f"peak during {plan.peak_phase}" if kind == "memory" and plan.peak_phase else ""
            table.add_row(Text(label, style="bold"), Text("total", style="bold"), Text(fmt(kind, total), style="bold"),
                          Text(note), end_section=True)
        print_table(table)
        for n in plan.notes:
            out.print(Text(f"note: {n}", style="dim"), soft_wrap=True)
    plan.check(budget)


@plan_app.command("harvest")
@clean_errors
def harvest_cmd(
    hook: list[str] = typer.Option(..., "--hook", help="hook to store (repeatable)"),
    tokens: float = typer.Option(1_000_000, "--tokens", help="tokens of text"),
    context_len: int = typer.Option(128, "--context-len", min=2),
    shard_tokens: int = typer.Option(2**18, "--shard-tokens", min=1),
    batch_contexts: int = typer.Option(8, "--batch-contexts", min=1),
    store_dtype: str = typer.Option("bfloat16", "--store-dtype"),
    model: str = ModelOpt, dtype: str = typer.Option("bfloat16", "--dtype", help="model dtype"),
    device: str = DeviceOpt, mfu: float = MfuOpt, nproc: int = NprocOpt, memory_gb: float | None = MemOpt,
    disk_gb: float | None = DiskOpt, hours: float | None = HoursOpt, as_json: bool = JsonOpt,
    recalibrate: bool = RecalOpt, threads: int | None = ThreadsOpt,
) -> None:
    """Plan `mechscope sae harvest`: memory per rank, disk, time."""
    from mechscope.planning.plan import Budget, plan_harvest

    budget = Budget.of(memory_gb, disk_gb, hours)
    dev = _device(device, mfu, model, dtype, recalibrate, threads)
    p = plan_harvest(model, hook, _tokens(tokens), context_len=context_len, forward_batch_contexts=batch_contexts,
                     shard_tokens=shard_tokens, store_dtype=store_dtype, dtype=dtype, world=nproc, device=dev)
    _show(p, budget, as_json)


@plan_app.command("train")
@clean_errors
def train_cmd(
    d_in: int | None = typer.Option(None, "--d-in", help="input width (default: the --hook's width in --model)"),
    hook: str = typer.Option("blocks.15.hook_resid_post", "--hook", help="input hook (for --d-in)"),
    arch: str = typer.Option("topk", "--arch", help="relu, topk, batchtopk or jumprelu"),
    width: list[int] = typer.Option([4608], "--width", help="d_sae (repeatable)"),
    k: list[int] = typer.Option([32], "--k", help="topk/batchtopk k (repeatable)"),
    tokens: float = typer.Option(2_000_000, "--tokens"),
    batch_tokens: int = typer.Option(4096, "--batch-tokens", min=1),
    compute_dtype: str = typer.Option("bfloat16", "--compute-dtype"),
    checkpoint_every: int = typer.Option(100, "--checkpoint-every", min=0),
    keep_checkpoints: int = typer.Option(2, "--keep-checkpoints", min=1),
    data_rows: float | None = typer.Option(None, "--data-rows", help="rows in the harvest read (default: --tokens)"),
    tp: int = typer.Option(1, "--tp", min=1, help="latent shards of each dictionary (divides --nproc)"),
    model: str = ModelOpt, dtype: str = typer.Option("bfloat16", "--dtype", help="model dtype (calibration)"),
    device: str = DeviceOpt, mfu: float = MfuOpt, nproc: int = NprocOpt, memory_gb: float | None = MemOpt,
    disk_gb: float | None = DiskOpt, hours: float | None = HoursOpt, as_json: bool = JsonOpt,
    recalibrate: bool = RecalOpt, threads: int | None = ThreadsOpt,
) -> None:
    """Plan dictionary training on harvested activations (`mechscope sae train`'s training part)."""
    from mechscope.planning.costs import model_dims
    from mechscope.planning.plan import Budget, plan_train

    budget = Budget.of(memory_gb, disk_gb, hours)
    d = d_in if d_in is not None else model_dims(model).hook_width(hook)
    dev = _device(device, mfu, model, dtype, recalibrate, threads)
    p = plan_train(d, width, _tokens(tokens), architecture=arch, k=k, batch_tokens=batch_tokens,
                   compute_dtype=compute_dtype, checkpoint_every_steps=checkpoint_every,
                   keep_checkpoints=keep_checkpoints,
                   data_rows=None if data_rows is None else _tokens(data_rows), world=nproc, tp=tp, device=dev)
    _show(p, budget, as_json)


@plan_app.command("features")
@clean_errors
def features_cmd(
    hook: str = typer.Option(..., "--hook", help="the dictionary's input hook (or blocks.L.mlp.hook_post)"),
    width: int = typer.Option(..., "--width", help="latents of the dictionary (d_mlp for --neurons)"),
    neurons: bool = typer.Option(False, "--neurons", help="MLP neurons: no encoder"),
    tokens: float = typer.Option(1_000_000, "--tokens"),
    context_len: int = typer.Option(128, "--context-len", min=2),
    batch_contexts: int = typer.Option(8, "--batch-contexts", min=1),
    top_k: int = typer.Option(20, "--top-k", min=1),
    model: str = ModelOpt, dtype: str = typer.Option("bfloat16", "--dtype", help="model dtype"),
    device: str = DeviceOpt, mfu: float = MfuOpt, nproc: int = NprocOpt, memory_gb: float | None = MemOpt,
    disk_gb: float | None = DiskOpt, hours: float | None = HoursOpt, as_json: bool = JsonOpt,
    recalibrate: bool = RecalOpt, threads: int | None = ThreadsOpt,
) -> None:
    """Plan `mechscope features build`: memory per rank, database size, time."""
    from mechscope.planning.plan import Budget, plan_features

    budget = Budget.of(memory_gb, disk_gb, hours)
    dev = _device(device, mfu, model, dtype, recalibrate, threads)
    p = plan_features(model, hook, width, _tokens(tokens), context_len=context_len, batch_contexts=batch_contexts,
                      top_k=top_k, encode="neurons" if neurons else "dictionary", dtype=dtype,
                      encode_dtype=dtype, world=nproc, device=dev)
    _show(p, budget, as_json)
