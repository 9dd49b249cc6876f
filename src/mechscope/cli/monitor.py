"""``mechscope monitor ...``: generate under a probe monitor, calibrate its threshold, report drift.

``generate`` reads a saved probe at every generated token (the tokens are exactly those of plain generation),
applies the alarm rule and prints each continuation with the spans above the threshold marked; ``--out``
keeps every generation as JSON lines for ``mechscope probe report``, ``--log`` every alarm. The threshold is
given (``--threshold``), read from a calibration file (``--calibration``), or set on the control set at
``--fpr``. ``calibrate`` writes such a file; ``drift`` calibrates again on another checkpoint and reports
how the control scores moved. Files and option values are checked before the model loads.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import typer
from rich.table import Table
from rich.text import Text

from mechscope.cli.common import (
    check_choice,
    check_model_dtype,
    check_out_file,
    clean_errors,
    expand_latents,
    labelled_option,
    load_dictionaries,
    load_model,
    load_probe,
    out,
    parse_latents,
    print_titled,
    set_threads,
)
from mechscope.core.errors import InputError
from mechscope.core.io import write_json_atomic

monitor_app = typer.Typer(no_args_is_help=True, help="Runtime monitors: generate under a probe, calibrate, drift.")

ModelOpt = typer.Option("smollm2-135m", "--model", "-m", help="built-in alias, local folder, .gguf file or hub id")
DtypeOpt = typer.Option("float32", "--dtype", help="float32 or bfloat16")
ThreadsOpt = typer.Option(None, "--threads", min=1, help="torch CPU threads (default: the idle cores)")
RuleOpt = typer.Option("ema", "--rule", help="ema or window_max")
EmaOpt = typer.Option(0.3, "--ema", help="ema: the newest score's weight, in (0, 1]")
WindowOpt = typer.Option(8, "--window", help="window_max: tokens per rolling window")
ControlOpt = typer.Option("control", "--control", help="dataset of ordinary text for calibration")
RULES = ("ema", "window_max")


@monitor_app.callback()
def _group() -> None:
    """Runtime monitors: generate under a probe, calibrate, drift."""


def _probe(folder: Path, model=None, latents: str | None = None):
    """A saved probe, or with ``latents`` a :class:`LatentScorer` over those latents of the dictionary in ``folder``."""
    if latents is None:
        return load_probe(folder, model)
    from mechscope.safety import LatentScorer

    ranges = parse_latents(latents)
    d = load_dictionaries([folder])[0]
    ids = expand_latents(ranges, d.cfg.d_sae, str(folder))
    scorer = LatentScorer(d, ids, model_name=None if model is None else model.cfg.name)
    if model is not None:
        from mechscope.dictionaries.splice import check_fits

        check_fits(model, d)
    return scorer


def _read_calibration(path: Path):
    from mechscope.safety.monitor_rules import Calibration

    if not path.is_file():
        raise InputError(f"--calibration {path} does not exist; write one with `mechscope monitor calibrate --out`.")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
        return Calibration.from_dict(d["calibration"]), d.get("probe"), d.get("latents")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise InputError(f"{path} is not a calibration file ({type(e).__name__}: {e}); write one with "
                         "`mechscope monitor calibrate --out`.") from None


def _prompt_ids(model, text: str, chat: bool):
    if not chat:
        return text
    if model.tokenizer is None or getattr(model.tokenizer, "chat_template", None) is None:
        raise InputError(f"{model.cfg.name} has no chat template; pass --raw to generate from the text as it is.")
    from mechscope.data.labelled_render import user_prompt_ids

    return user_prompt_ids(model, text)[0]


def _marked(model, g, threshold: float) -> Text:
    """The continuation with every token whose rule value is above the threshold in bold red."""
    text = Text()
    new = g.tokens[g.prompt_len:].tolist()
    values = g.values[-len(new):].tolist() if new else []
    for tok, v in zip(new, values):
        piece = model.tokenizer.decode([tok]) if model.tokenizer is not None else f"<{tok}>"
        text.append(piece, style="bold red" if v > threshold else "")
    return text


@monitor_app.command("generate")
@clean_errors
def generate_cmd(
    probe: Path = typer.Argument(..., help="probe folder (cfg.json + probe.safetensors), or a dictionary folder "
                                 "with --latents"),
    prompts: list[str] | None = typer.Argument(None, help="prompts (each a user message unless --raw)"),
    prompts_file: Path | None = typer.Option(None, "--prompts-file", help="one prompt per line"),
    latents: str | None = typer.Option(None, "--latents", help="PROBE is a sparse dictionary (SAE or transcoder): "
                                       "score each token by the sum of these latents' activations, e.g. 12,40-42"),
    threshold: float | None = typer.Option(None, "--threshold", help="alarm above this rule value (logit units)"),
    calibration: Path | None = typer.Option(None, "--calibration", help="calibration.json of `monitor calibrate`"),
    fpr: float = typer.Option(0.01, "--fpr", help="without --threshold or --calibration: calibrate on --control to "
                              "this item-level false-positive rate"),
    control: str = ControlOpt,
    rule: str = RuleOpt,
    ema: float = EmaOpt,
    window: int = WindowOpt,
    on_alarm: str = typer.Option("flag", "--on-alarm", help="record, flag, or stop (end the generation at the alarm)"),
    max_new_tokens: int = typer.Option(40, "--max-new-tokens", min=1, max=4096),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0: greedy"),
    seed: int = typer.Option(0, "--seed"),
    batch_size: int = typer.Option(1, "--batch-size", min=1, help="prompts generated together (left-padded, KV "
                                   "cache; the same tokens as one at a time)"),
    raw: bool = typer.Option(False, "--raw", help="generate from the prompt text as it is (no chat template)"),
    log: Path | None = typer.Option(None, "--log", help="append every alarm to this JSONL file"),
    out_file: Path | None = typer.Option(None, "--out", "-o", help="write every generation as JSON lines (for "
                                         "`mechscope probe report --generations`)"),
    model: str = ModelOpt,
    dtype: str = DtypeOpt,
    threads: int | None = ThreadsOpt,
) -> None:
    """Generate under a probe monitor and print each continuation with the spans above the threshold marked."""
    from mechscope.safety import Monitor
    from mechscope.safety.metrics import check_fpr

    check_choice(rule, RULES, "--rule")
    check_choice(on_alarm, ("record", "flag", "stop"), "--on-alarm")
    check_model_dtype(dtype)
    if threshold is not None and calibration is not None:
        raise InputError("give --threshold or --calibration, not both.")
    if threshold is not None and not math.isfinite(threshold):
        raise InputError(f"--threshold must be a finite number (logit units), got {threshold}.")
    texts = list(prompts or [])
    if prompts_file is not None:
        if not prompts_file.is_file():
            raise InputError(f"--prompts-file {prompts_file} does not exist; give a text file, one prompt per line.")
        texts += [line for line in prompts_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not texts:
        raise InputError("no prompts: give them as arguments or with --prompts-file.")
    p = _probe(probe, latents=latents)
    cal, ctrl = None, None
    if calibration is not None:
        cal, _, _ = _read_calibration(calibration)
        rule, ema, window = cal.rule, cal.ema, cal.window
    elif threshold is None:
        try:
            check_fpr(fpr)
        except InputError as e:
            raise InputError(f"--fpr: {e}") from None
        ctrl = labelled_option(control, "--control")
    for path, option in ((log, "--log"), (out_file, "--out")):
        if path is not None:
            check_out_file(path, option, "monitor.jsonl")
    mon = Monitor(p, threshold=cal.threshold if cal else threshold, fpr=fpr, rule=rule, ema=ema, window=window,
                  on_alarm=on_alarm, log=log)
    set_threads(threads)
    m = load_model(model, dtype)
    p = _probe(probe, m, latents)
    mon.probe = p
    if ctrl is not None:
        c = mon.calibrate(m, ctrl, fpr)
        out.print(Text(f"calibrated on {c.n_items} {ctrl.name} items: threshold {c.threshold:.3f} "
                       f"(item-level FPR {c.achieved_fpr:.3f}, target {fpr:g})"))
    gens = mon.generate(m, [_prompt_ids(m, t, not raw) for t in texts], max_new_tokens=max_new_tokens,
                        temperature=temperature, seed=seed, batch_size=batch_size)
    rows = []
    for text, g in zip(texts, gens):
        status = "STOPPED" if g.stopped else ("FLAGGED" if g.alarms else "clean")
        out.print(Text(f"[{g.prompt_index}] {status} ({len(g.alarms)} alarms): ", style="bold") + Text(text))
        out.print(_marked(m, g, mon.threshold))
        out.print()
        strings = [m.tokenizer.decode([t]) for t in g.tokens.tolist()] if m.tokenizer is not None else []
        rows.append({**g.to_dict(), "prompt": text, "token_strings": strings, "threshold": mon.threshold,
                     "probe": str(probe), "site": p.site, "rule": mon.rule})
    if out_file is not None:
        from mechscope.core.io import write_text_atomic

        write_text_atomic("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), out_file)
        out.print(Text(f"wrote {out_file}"))
    n_flag = sum(bool(g.alarms) for g in gens)
    out.print(Text(f"{n_flag} of {len(gens)} generations alarmed (threshold {mon.threshold:.3f}, rule {mon.rule})"))


def _calibration_table(cals: dict) -> Table:
    t = Table(title_justify="left")
    t.add_column("", no_wrap=True)
    t.add_column("threshold")
    t.add_column("item FPR")
    for q in cals[next(iter(cals))].token_quantiles:
        t.add_column(f"token q{q:g}")
    for name, c in cals.items():
        t.add_row(name, f"{c.threshold:.3f}", f"{c.achieved_fpr:.3f}", *[f"{v:.3f}" for v in c.token_quantiles.values()])
    return t


@monitor_app.command("calibrate")
@clean_errors
def calibrate_cmd(
    probe: Path = typer.Argument(..., help="probe folder, or a dictionary folder with --latents"),
    latents: str | None = typer.Option(None, "--latents", help="PROBE is a sparse dictionary: these latents' summed "
                                       "activations are the score"),
    fpr: float = typer.Option(0.01, "--fpr", help="item-level false-positive rate on the control set, in (0, 1)"),
    control: str = ControlOpt,
    rule: str = RuleOpt,
    ema: float = EmaOpt,
    window: int = WindowOpt,
    out_file: Path = typer.Option(Path("calibration.json"), "--out", "-o", help="the calibration file"),
    model: str = ModelOpt,
    dtype: str = DtypeOpt,
    threads: int | None = ThreadsOpt,
) -> None:
    """Set a monitor's threshold to an item-level FPR on control text; write it with the control-score quantiles."""
    from mechscope.safety import Monitor

    check_choice(rule, RULES, "--rule")
    check_model_dtype(dtype)
    p = _probe(probe, latents=latents)
    ctrl = labelled_option(control, "--control")
    check_out_file(out_file, "--out", "calibration.json")
    mon = Monitor(p, fpr=fpr, rule=rule, ema=ema, window=window)
    set_threads(threads)
    m = load_model(model, dtype)
    mon.probe = _probe(probe, m, latents)
    c = mon.calibrate(m, ctrl, fpr)
    write_json_atomic({"probe": str(probe), "latents": latents, "site": p.site, "control": ctrl.name,
                       "calibration": c.to_dict()}, out_file)
    print_titled(f"{p.method} probe at {p.site} on {c.n_items} {ctrl.name} items ({m.cfg.name})",
                 _calibration_table({m.cfg.name: c}))
    out.print(Text(f"wrote {out_file}"))


@monitor_app.command("drift")
@clean_errors
def drift_cmd(
    calibration: Path = typer.Argument(..., help="calibration.json of `monitor calibrate` on the earlier checkpoint"),
    model: str = typer.Option(..., "--model", "-m", help="the new checkpoint (built-in alias, folder or hub id)"),
    probe: Path | None = typer.Option(None, "--probe", help="probe folder (default: the one the calibration names)"),
    control: str = ControlOpt,
    out_file: Path | None = typer.Option(None, "--out", "-o", help="write the drift report (JSON)"),
    dtype: str = DtypeOpt,
    threads: int | None = ThreadsOpt,
) -> None:
    """Calibrate again on a new checkpoint and report how the threshold and the control-score quantiles moved."""
    from mechscope.safety import Monitor

    check_model_dtype(dtype)
    before, named, latents = _read_calibration(calibration)
    folder = probe or (Path(named) if named else None)
    if folder is None:
        raise InputError(f"{calibration} names no probe; pass --probe DIR.")
    p = _probe(folder, latents=latents)  # no model-name check: a fine-tune has another name; the width is checked
    ctrl = labelled_option(control, "--control")
    if out_file is not None:
        check_out_file(out_file, "--out", "drift.json")
    mon = Monitor(p, fpr=before.fpr, rule=before.rule, ema=before.ema, window=before.window)
    mon.calibration, mon.threshold = before, before.threshold
    set_threads(threads)
    m = load_model(model, dtype)
    mon.check_model(m)
    drift = mon.recalibrate(m, ctrl)
    print_titled(f"control-score drift of the {p.method} probe at {p.site} (threshold shift "
                 f"{drift.threshold_shift:+.3f})",
                 _calibration_table({f"before ({before.model_name})": before, f"after ({m.cfg.name})": drift.after}))
    if out_file is not None:
        write_json_atomic(drift.to_dict(), out_file)
        out.print(Text(f"wrote {out_file}"))


__all__ = ["monitor_app"]
