"""``mechscope probe ...``: linear probes on a model's activations, with their evidence.

``sweep`` fits every method at every site of a labelled dataset from one cached pass (split by group, the best
site per method picked on a validation split), evaluates each cell on held-out groups with its intervals and
baselines, tests transfer to other datasets, and writes a run folder: ``run.json``, the best probe of each
method under ``probes/``, their claims (``claims.json``) and the HTML safety report. ``train`` is the same
at one site and one method, writing the probe folder itself. ``eval`` scores a saved probe on a dataset;
``causal`` steers along a saved probe's direction on twin pairs (or refusal-style prefixes) beside random
directions and writes its claim; ``report`` re-renders a run's report with monitored generations and claims.
Dataset names, files and option values are checked before the model loads.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer
from rich.table import Table
from rich.text import Text

from mechscope.cli.common import (
    check_choice,
    check_model_dtype,
    check_out_dir,
    check_out_file,
    clean_errors,
    labelled_option,
    load_model,
    load_probe,
    note,
    out,
    print_titled,
    set_threads,
)
from mechscope.core.errors import InputError
from mechscope.core.io import write_json_atomic

probe_app = typer.Typer(no_args_is_help=True, help="Linear probes: sweep sites and methods, train, evaluate, test "
                        "causally, report.")

ModelOpt = typer.Option("smollm2-135m", "--model", "-m", help="built-in alias, local folder, .gguf file or hub id")
DtypeOpt = typer.Option("float32", "--dtype", help="float32 or bfloat16")
ThreadsOpt = typer.Option(None, "--threads", min=1, help="torch CPU threads (default: the idle cores)")
ControlOpt = typer.Option("control", "--control", help="dataset of ordinary text that sets the threshold at --fpr "
                          "('none': the held-out negatives)")
FprOpt = typer.Option(0.01, "--fpr", help="false-positive rate of the threshold on the control set, in (0, 1)")
AggOpt = typer.Option("mean", "--aggregation", help="over each example's scored tokens: mean, max or last")
NBootOpt = typer.Option(1000, "--n-boot", min=10, help="bootstrap resamples of every interval")
BatchOpt = typer.Option(16, "--batch-size", min=1, help="examples per forward")
DATASET_HELP = "a built-in dataset (honesty_pairs, truth, deception_scenarios, harmfulness, control), a .jsonl file or hf:NAME"


@probe_app.callback()
def _group() -> None:
    """Linear probes: sweep sites and methods, train, evaluate, test causally, report."""


def _control(control: str):
    return None if control.lower() == "none" else labelled_option(control, "--control")


def _checks(fpr: float, aggregation: str, dtype: str, methods: list[str] | None = None) -> None:
    from mechscope.safety.metrics import check_fpr
    from mechscope.safety.probes import AGGREGATIONS, METHODS

    try:
        check_fpr(fpr)
    except InputError as e:
        raise InputError(f"--fpr: {e}") from None
    check_choice(aggregation, AGGREGATIONS, "--aggregation")
    for m in methods or ():
        check_choice(m, METHODS, "--method")
    check_model_dtype(dtype)


def _ci(ci: dict | None) -> str:
    return "n/a" if ci is None else f"{ci['estimate']:.3f} [{ci['low']:.3f}, {ci['high']:.3f}]"


def _summary_table(run: dict) -> Table:
    """One row per method: its best site and that probe's held-out numbers, baselines and transfer."""
    rows = {(r["site"], r["method"]): r for r in run["sweep"]["rows"]}
    transfer = {name: {(r["site"], r["method"]): r for r in cells} for name, cells in run["transfer"].items()}
    t = Table(title_justify="left")
    for col in ("method", "best site", "AUROC [95% CI]", f"recall @ {run['info']['fpr']:g} FPR", "random",
                "shuffled", *[f"→ {name}" for name in transfer]):
        t.add_column(col, no_wrap=True)
    for m, site in run["sweep"]["best_site"].items():
        r = rows[site, m]
        shuffled = "n/a" if r["shuffled_auroc"] is None else f"{r['shuffled_auroc']:.3f}"
        t.add_row(m, Text(site), _ci(r["auroc"]), _ci(r["recall"]),
                  f"{r['random_auroc_mean']:.3f} ± {r['random_auroc_std']:.3f}", shuffled,
                  *[_ci(cells[site, m]["auroc"]) for cells in transfer.values()])
    return t


def _layer_table(run: dict, methods: list[str]) -> Table:
    rows = {(r["site"], r["method"]): r for r in run["sweep"]["rows"]}
    sites = list(dict.fromkeys(r["site"] for r in run["sweep"]["rows"]))
    val = run["sweep"].get("selection") == "validation"
    t = Table(title_justify="left")
    t.add_column("site", no_wrap=True)
    for m in methods:
        t.add_column(f"{m} AUROC" + (" (val)" if val else ""), no_wrap=True)
    best = run["sweep"]["best_site"]
    for s in sites:
        cells = []
        for m in methods:
            r = rows[s, m]
            cell = f"{r['auroc']['estimate']:.3f}" + (f" ({r['validation_auroc']:.3f})" if val else "")
            cells.append(Text(cell, style="bold green" if best[m] == s else ""))
        t.add_row(Text(s), *cells)
    return t


def _run_probes(dataset: str, *, sites, methods, aggregation, control, transfer, fpr, test_fraction,
                validation_fraction, seed, n_boot, batch_size, model, dtype, threads, out_dir, causal_pairs,
                title_sweep: bool):
    """The shared body of sweep and train; returns (run dict, best probes {method: Probe})."""
    from mechscope.report.safety import write_safety_report
    from mechscope.safety import train_probe
    from mechscope.safety.audit import audit
    from mechscope.safety.claim_io import write_claims
    from mechscope.safety.claims_from import (
        claim_from_causal_check,
        claim_from_probe_run,
    )

    ds = labelled_option(dataset, "DATASET")
    ds.require_both_classes(f"training a probe on {ds.name!r}")
    ctrl = _control(control)
    others = [labelled_option(t, "--transfer") for t in transfer]
    pairs = None if causal_pairs is None else labelled_option(causal_pairs, "--causal")
    if not 0 < test_fraction < 1:
        raise InputError(f"--test-fraction must lie strictly between 0 and 1, e.g. 0.5; got {test_fraction}.")
    if not 0 <= validation_fraction < 1:
        raise InputError(f"--validation-fraction must lie in [0, 1), e.g. 0.25 (0 picks the site on the test split, "
                         f"which makes its AUROC optimistic); got {validation_fraction}.")
    check_out_dir(out_dir)
    set_threads(threads)
    m = load_model(model, dtype)
    t0 = time.perf_counter()
    run = train_probe(m, ds, sites=sites, methods=tuple(methods), aggregation=aggregation, control=ctrl,
                      transfer=others, fpr=fpr, test_fraction=test_fraction, validation_fraction=float(validation_fraction),
                      seed=seed, n_boot=n_boot, batch_size=batch_size, progress=True)
    d = run.to_dict()
    if run.info["selection"] == "test":
        note("--validation-fraction 0: the best site was picked on the test split, so its test AUROC is optimistic.")
    out_dir.mkdir(parents=True, exist_ok=True)
    probes = {}
    claims = []
    for method in methods:
        site = run.sweep.best_site(method)
        ev = run.sweep.evaluations[site, method]
        p = run.best(method)
        p.info.update(threshold=ev.threshold, fpr=fpr,  # dataset and fingerprint: recorded by train_probe
                      control=None if ctrl is None else ctrl.name, test_auroc=ev.auroc.estimate,
                      split={"test_fraction": test_fraction, "validation_fraction": validation_fraction, "seed": seed})
        probes[method] = p
        p.save(out_dir / "probes" / method)
        claim = claim_from_probe_run(run, method=method)
        claims.append(claim)
        if pairs is not None:
            from mechscope.safety import causal_check

            check = causal_check(m, p, pairs, control_texts=ctrl, n_boot=n_boot, seed=seed)
            d.setdefault("causal", {})[method] = check.to_dict()
            claims.append(claim_from_causal_check(check, probe=p))
            out.print(Text(f"causal check of {method} at {site}: {check.verdict} ({check.reason})"))
    d["seconds"] = time.perf_counter() - t0
    write_json_atomic(d, out_dir / "run.json")
    write_claims(out_dir / "claims.json", claims)
    report = write_safety_report(out_dir / "report.html", runs={ds.name: d}, claims=audit(claims).to_dict()["grades"],
                                 title=f"Probes on {ds.name}: {m.cfg.name}")
    if title_sweep:
        print_titled(f"AUROC on the held-out groups of {ds.name} by site (best site in green"
                     + (", picked on the validation split)" if run.info["selection"] == "validation" else ")"),
                     _layer_table(d, list(methods)))
    print_titled(f"{ds.name}: {run.info['n_train']} train / {run.info['n_validation']} validation / "
                 f"{run.info['n_test']} test examples, {run.info['bootstrap']} bootstrap", _summary_table(d))
    out.print(Text(f"wrote {out_dir / 'run.json'}, {out_dir / 'probes'}/<method>, {out_dir / 'claims.json'} and {report}"))
    return d, probes


@probe_app.command("sweep")
@clean_errors
def sweep_cmd(
    dataset: str = typer.Argument(..., help=DATASET_HELP),
    sites: str = typer.Option("blocks.*.hook_resid_post", "--sites", help="hook names or globs, comma-separated"),
    methods: list[str] = typer.Option(["logistic", "diff_means", "lda", "lat"], "--method",
                                      help="repeatable: logistic, diff_means, lda, lat, ccs"),
    aggregation: str = AggOpt,
    control: str = ControlOpt,
    transfer: list[str] = typer.Option([], "--transfer", help="repeatable: datasets to test every probe on, whole"),
    fpr: float = FprOpt,
    test_fraction: float = typer.Option(0.5, "--test-fraction", help="share of the groups held out for testing"),
    validation_fraction: float = typer.Option(0.25, "--validation-fraction",
                                              help="share of the training groups that picks the best site"),
    causal: str | None = typer.Option(None, "--causal", help="twin-pair dataset: steer along each best probe's "
                                      "direction beside random directions (e.g. deception_scenarios)"),
    seed: int = typer.Option(0, "--seed", help="seed of the split and the bootstrap"),
    n_boot: int = NBootOpt,
    batch_size: int = BatchOpt,
    out_dir: Path = typer.Option(Path("mechscope-probes"), "--out", "-o", help="run folder"),
    model: str = ModelOpt,
    dtype: str = DtypeOpt,
    threads: int | None = ThreadsOpt,
) -> None:
    """Fit every method at every site from one cached pass; evaluate on held-out groups, with baselines."""
    _checks(fpr, aggregation, dtype, methods)
    _run_probes(dataset, sites=[s.strip() for s in sites.split(",") if s.strip()], methods=methods,
                aggregation=aggregation, control=control, transfer=transfer, fpr=fpr, test_fraction=test_fraction,
                validation_fraction=validation_fraction, seed=seed, n_boot=n_boot, batch_size=batch_size, model=model,
                dtype=dtype, threads=threads, out_dir=out_dir, causal_pairs=causal, title_sweep=True)


@probe_app.command("train")
@clean_errors
def train_cmd(
    dataset: str = typer.Argument(..., help=DATASET_HELP),
    site: str = typer.Option(..., "--site", help="one hook name, e.g. blocks.16.hook_resid_post"),
    method: str = typer.Option("logistic", "--method", help="logistic, diff_means, lda, lat or ccs"),
    aggregation: str = AggOpt,
    control: str = ControlOpt,
    transfer: list[str] = typer.Option([], "--transfer", help="repeatable: datasets to test the probe on, whole"),
    fpr: float = FprOpt,
    test_fraction: float = typer.Option(0.5, "--test-fraction", help="share of the groups held out for testing"),
    seed: int = typer.Option(0, "--seed", help="seed of the split and the bootstrap"),
    n_boot: int = NBootOpt,
    batch_size: int = BatchOpt,
    out_dir: Path = typer.Option(Path("mechscope-probe"), "--out", "-o", help="run folder; the probe goes to "
                                 "OUT/probes/METHOD"),
    model: str = ModelOpt,
    dtype: str = DtypeOpt,
    threads: int | None = ThreadsOpt,
) -> None:
    """Fit one probe at one site, evaluate it on held-out groups with its baselines, and save it."""
    from mechscope.cli.common import check_hook_name

    _checks(fpr, aggregation, dtype, [method])
    if "*" in site or "," in site:
        raise InputError(f"--site {site!r}: train fits one site; use `mechscope probe sweep --sites` for several.")
    check_hook_name(site, "--site")
    _run_probes(dataset, sites=[site], methods=[method], aggregation=aggregation, control=control, transfer=transfer,
                fpr=fpr, test_fraction=test_fraction, validation_fraction=0.0, seed=seed, n_boot=n_boot,
                batch_size=batch_size, model=model, dtype=dtype, threads=threads, out_dir=out_dir, causal_pairs=None,
                title_sweep=False)


@probe_app.command("eval")
@clean_errors
def eval_cmd(
    probe: Path = typer.Argument(..., help="probe folder (cfg.json + probe.safetensors)"),
    dataset: str = typer.Argument(..., help=DATASET_HELP + " (scored whole)"),
    control: str = ControlOpt,
    fpr: float = FprOpt,
    n_boot: int = NBootOpt,
    batch_size: int = BatchOpt,
    json_out: Path | None = typer.Option(None, "--json", help="write the evaluation as JSON here"),
    model: str = ModelOpt,
    dtype: str = DtypeOpt,
    threads: int | None = ThreadsOpt,
) -> None:
    """Score a saved probe on a whole dataset: AUROC, balanced accuracy, recall at --fpr, with intervals."""
    from mechscope.data.labelled_render import render
    from mechscope.safety import collect_features, evaluate_probe

    _checks(fpr, "mean", dtype)
    p = load_probe(probe)  # a missing or corrupt folder costs no model load
    ds = labelled_option(dataset, "DATASET")
    ds.require_both_classes(f"evaluating a probe on {ds.name!r}")
    ctrl = _control(control)
    if json_out is not None:
        check_out_file(json_out, "--json", "evaluation.json")
    set_threads(threads)
    m = load_model(model, dtype)
    p = load_probe(probe, m)
    parts = [("data", ds)] + ([("control", ctrl)] if ctrl is not None else [])
    x = {name: collect_features(m, render(m, part), [p.site], aggregation=p.aggregation, batch_size=batch_size,
                                progress=True).vectors[m.resolve([p.site])[0]] for name, part in parts}
    ev = evaluate_probe(p, x["data"], ds.labels, control=x.get("control"), fpr=fpr, groups=ds.groups, n_boot=n_boot)
    t = Table(title_justify="left")
    for col in ("n pos / neg", "AUROC [95% CI]", "balanced acc.", f"recall @ {fpr:g} FPR", "threshold", "honest FPR",
                "random"):
        t.add_column(col, no_wrap=True)
    d = ev.to_dict()
    t.add_row(f"{ev.n_pos} / {ev.n_neg}", _ci(d["auroc"]), _ci(d["balanced_accuracy"]), _ci(d["recall"]),
              f"{ev.threshold:.3f}", "n/a" if ev.honest_fpr is None else f"{ev.honest_fpr:.3f}",
              f"{ev.random_auroc_mean:.3f} ± {ev.random_auroc_std:.3f}")
    print_titled(f"{p.method} probe at {p.site} on {ds.name} ({ev.control} threshold, {ev.bootstrap} bootstrap)", t)
    if json_out is not None:
        write_json_atomic({"probe": str(probe), "dataset": ds.name, "fingerprint": ds.fingerprint(), **d}, json_out)
        out.print(Text(f"wrote {json_out}"))


@probe_app.command("causal")
@clean_errors
def causal_cmd(
    probe: Path = typer.Argument(..., help="probe folder (cfg.json + probe.safetensors)"),
    pairs: str | None = typer.Option(None, "--pairs", help="twin-pair dataset (one honest and one deceptive answer "
                                     "per group, same prompt; default deception_scenarios)"),
    refusal: str | None = typer.Option(None, "--refusal", help="instead of --pairs: a dataset of requests (its "
                                       "label-1 examples, e.g. harmfulness) answered by a refusal and a compliance "
                                       "prefix; the metric is log P(refusal) - log P(compliance)"),
    alphas: str = typer.Option("-8,-4,-2,0,2,4,8", "--alphas", help="steering strengths in units of the site's "
                               "per-coordinate RMS, comma-separated"),
    mode: str = typer.Option("add", "--mode", help="add (activation addition) or ablate (projection)"),
    n_random: int = typer.Option(8, "--n-random", min=1, help="random directions of the same norm (19 for a 5% level)"),
    control: str = ControlOpt,
    n_boot: int = NBootOpt,
    claims_out: Path = typer.Option(Path("claims.json"), "--claims", help="write the claim here (JSON)"),
    model: str = ModelOpt,
    dtype: str = DtypeOpt,
    threads: int | None = ThreadsOpt,
) -> None:
    """Steer along a saved probe's direction on twin pairs, beside random directions; write the claim."""
    from mechscope.safety import causal_check
    from mechscope.safety.claim_io import write_claims
    from mechscope.safety.claims_from import claim_from_causal_check

    check_choice(mode, ("add", "ablate"), "--mode")
    check_model_dtype(dtype)
    try:
        values = [float(a) for a in alphas.split(",") if a.strip()]
    except ValueError:
        raise InputError(f"--alphas {alphas!r} is not comma-separated numbers, e.g. -8,-4,0,4,8.") from None
    p = load_probe(probe)
    if refusal is not None and pairs is not None:
        raise InputError("give --pairs or --refusal, not both.")
    if refusal is not None:
        from mechscope.safety.refusal import refusal_pairs

        ds = refusal_pairs(labelled_option(refusal, "--refusal"))
    else:
        ds = labelled_option(pairs or "deception_scenarios", "--pairs")
    ctrl = _control(control)
    check_out_file(claims_out, "--claims", "claims.json")
    set_threads(threads)
    m = load_model(model, dtype)
    p = load_probe(probe, m)
    check = causal_check(m, p, ds, alphas=values, mode=mode, n_random=n_random, control_texts=ctrl, n_boot=n_boot)
    out.print(Text(str(check)))
    write_claims(claims_out, [claim_from_causal_check(check, probe=p)])
    out.print(Text(f"wrote {claims_out}"))


@probe_app.command("report")
@clean_errors
def report_cmd(
    runs: list[Path] = typer.Argument(..., help="run folders of `probe sweep`/`probe train` (or their run.json)"),
    generations: list[Path] = typer.Option([], "--generations", help="repeatable: generations.jsonl of "
                                           "`mechscope monitor generate`"),
    claims: list[Path] = typer.Option([], "--claims", help="repeatable: claims files to show (default: each run's)"),
    out_file: Path = typer.Option(Path("safety-report.html"), "--out", "-o", help="the HTML file"),
) -> None:
    """Render one self-contained HTML safety report from saved runs, monitored generations and claims."""
    from mechscope.report.safety import write_safety_report
    from mechscope.safety.audit import audit
    from mechscope.safety.claim_io import read_claims

    check_out_file(out_file, "--out", "safety-report.html")
    loaded, claim_list = {}, []
    for r in runs:
        path = r / "run.json" if r.is_dir() else r
        if not path.is_file():
            raise InputError(f"{r} holds no run.json; pass a folder written by `mechscope probe sweep`.")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InputError(f"{path} is not valid JSON ({e}); rerun `mechscope probe sweep`.") from None
        if not isinstance(d, dict) or "sweep" not in d or "info" not in d:
            raise InputError(f"{path} is not a probe run (no sweep or info); pass a run.json of `mechscope probe sweep`.")
        loaded[d["info"].get("dataset", path.parent.name)] = d
        if not claims and (path.parent / "claims.json").is_file():
            claim_list += read_claims(path.parent / "claims.json")
    for c in claims:
        claim_list += read_claims(c)
    gens = []
    for g in generations:
        gens += _read_generations(g)
    graded = audit(claim_list).to_dict() if claim_list else None
    path = write_safety_report(out_file, runs=loaded, generations=gens,
                               claims=graded["grades"] if graded else [], title="Safety report")
    out.print(Text(f"wrote {path} ({len(loaded)} runs, {len(gens)} generations, {len(claim_list)} claims)"))


def _read_generations(path: Path) -> list[dict]:
    from mechscope.data.textfiles import jsonl_objects

    if not path.is_file():
        raise InputError(f"--generations {path} does not exist; write it with `mechscope monitor generate --out`.")
    rows = []
    for i, row in jsonl_objects(path):
        if not {"tokens", "scores", "token_strings", "threshold"} <= set(row):
            raise InputError(f"{path}:{i} is not a monitored generation (needs tokens, scores, token_strings, "
                             "threshold); write it with `mechscope monitor generate --out`.")
        rows.append(row)
    return rows

__all__ = ["probe_app"]
