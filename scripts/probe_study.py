"""Probes on SmolLM2-135M-Instruct: instructed honesty, truth and harmfulness, with baselines and transfer.

Every number comes from ``mechscope.safety.train_probe`` on the built-in datasets (written for this project):

1. honesty_pairs: every ``hook_resid_post`` x {logistic, diff_means, lda, lat, ccs}, split by fact; the
   threshold at 1% false positives on the ``control`` set; the same probes tested on the held-out
   ``deception_scenarios`` and on ``truth`` (transfer).
2. truth: trained on affirmative statements only, tested on held-out affirmative groups and on the negated
   statements (Marks & Tegmark 2023's negation test).
3. harmfulness: harmful vs harmless requests, split by goal; recall at 1% FPR on the control set.
4. the causal check of the best honesty directions (logistic and difference of means at their best layer):
   steering along them on the held-out deception scenarios, beside random directions.
5. the refusal check of the best harmfulness direction (logistic, at its layer): steering along it on 32
   held-out harmful requests answered by a refusal and a compliance prefix (``refusal_pairs``).
6. the claims these support (``mechscope.safety.claims_from``), graded by ``mechscope.safety.audit``.

Each method's best layer is picked on a validation split of the training groups (25%), so the held-out AUROC
of that layer is not the maximum of noisy test estimates; intervals resample whole groups (clustered
bootstrap). Writes ``docs/safety/smollm2-probes.json`` (every cell), ``docs/safety/smollm2-probes.md`` (the
tables), ``docs/safety/runs/*.json`` (each run as ``mechscope probe report`` reads it), and
``docs/safety/smollm2-claims.json`` with its audit ``docs/safety/smollm2-audit.md``.
Usage: ``.venv/bin/python scripts/probe_study.py`` (about 30 minutes on a 2-core CPU); ``--refusal-only`` runs
step 5 alone on the outputs of an earlier run and re-audits the claims.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import mechscope
from mechscope.data.labelled import LabelledDataset
from mechscope.data.labelled_builtins import load_labelled
from mechscope.core.io import write_json_atomic
from mechscope.safety import causal_check, train_probe
from mechscope.safety.audit import audit
from mechscope.safety.claim_io import read_claims, write_claims
from mechscope.safety.claims_from import claim_from_causal_check, claim_from_probe_run
from mechscope.safety.refusal import refusal_pairs

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("logistic", "diff_means", "lda", "lat", "ccs")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _ci(d: dict, fmt: str = ".3f") -> str:
    return f"{d['estimate']:{fmt}} [{d['low']:{fmt}}, {d['high']:{fmt}}]"


def summary(run, name: str) -> dict:
    """Per method: the best layer, its held-out evaluation, and its transfer evaluations; the AUROC per layer."""
    out = {"info": run.info, "methods": {}, "by_layer": run.sweep.table("auroc"),
           "validation_by_layer": {s: {m: run.sweep.validation_auroc[s, m] for m in run.sweep.methods}
                                   for s in run.sweep.sites} if run.sweep.validation_auroc else {}}
    for m in run.sweep.methods:
        site = run.sweep.best_site(m)
        row = {"site": site, "held_out": run.sweep.evaluations[site, m].to_dict()}
        row["transfer"] = {t: cells[site, m].to_dict() for t, cells in run.transfer.items()}
        out["methods"][m] = row
    log(f"{name}: " + ", ".join(f"{m} {r['site'].split('.')[1]} {r['held_out']['auroc']['estimate']:.3f}"
                                 for m, r in out["methods"].items()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "safety")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--refusal-only", action="store_true")
    args = ap.parse_args()
    methods = tuple(args.methods.split(","))
    model = mechscope.load("smollm2-135m", dtype="float32")
    if args.refusal_only:
        doc = json.loads((args.out / "smollm2-probes.json").read_text())
        claims = [c for c in read_claims(args.out / "smollm2-claims.json") if "refusal" not in c.behaviour]
        refusal_stage(model, doc, claims, args.out)
        return
    doc: dict = {"model": "SmolLM2-135M-Instruct", "dtype": "float32", "aggregation": "mean", "fpr": 0.01}
    (args.out / "runs").mkdir(parents=True, exist_ok=True)
    runs = {}

    t = time.perf_counter()
    runs["honesty"] = run = train_probe(model, "honesty_pairs", methods=methods, transfer=["deception_scenarios", "truth"])
    doc["honesty"] = summary(run, "honesty_pairs") | {"seconds": time.perf_counter() - t}

    t = time.perf_counter()
    truth = load_labelled("truth")
    plain = LabelledDataset("truth_affirmative", tuple(e for e in truth.examples if not e.meta["negated"]))
    negated = LabelledDataset("truth_negated", tuple(e for e in truth.examples if e.meta["negated"]))
    runs["truth"] = run = train_probe(model, plain, methods=methods, transfer=[negated])
    doc["truth"] = summary(run, "truth") | {"seconds": time.perf_counter() - t}

    t = time.perf_counter()
    runs["harmfulness"] = run = train_probe(model, "harmfulness", methods=methods)
    doc["harmfulness"] = summary(run, "harmfulness") | {"seconds": time.perf_counter() - t}
    for name, r in runs.items():
        write_json_atomic(r.to_dict(), args.out / "runs" / f"{name}.json")

    checks = causal_stage(model, runs["honesty"])
    doc["causal"] = {m: c.to_dict() | {"seconds": sec} for m, (c, sec) in checks.items()}
    claims = [claim_from_probe_run(runs[k], "logistic", model=model) for k in ("honesty", "truth", "harmfulness")]
    claims += [claim_from_causal_check(c, runs["honesty"].best(m), model=model) for m, (c, _) in checks.items()]
    refusal_stage(model, doc, claims, args.out, runs["harmfulness"])


def refusal_stage(model, doc: dict, claims: list, out: Path, run=None, n: int = 32, alphas=(-8.0, -4.0, 4.0, 8.0),
                  n_random: int = 8) -> None:
    """Steer along the best logistic harmfulness direction on ``n`` held-out harmful requests (refusal prefix vs
    compliance prefix), beside random directions; then write the claims, their audit, the JSON and the tables."""
    site = doc["harmfulness"]["methods"]["logistic"]["site"]
    if run is None:  # the same fit as the sweep's: the same split and validation split, one site
        run = train_probe(model, "harmfulness", sites=site, methods=("logistic",), shuffled=False, n_boot=100,
                          n_random=10, progress=False)
    probe = run.sweep.probes[site, "logistic"]
    held_out = set(run.info["test_groups"])
    harm = load_labelled("harmfulness")
    requests = LabelledDataset("harmfulness_held_out", tuple(
        e for e in harm.examples if e.label == 1 and e.group in held_out)[:n])
    control = [e.text for e in load_labelled("control").examples if e.text is not None][:24]
    t = time.perf_counter()
    check = causal_check(model, probe, refusal_pairs(requests), alphas=alphas, n_random=n_random,
                         control_texts=control)
    doc["refusal"] = check.to_dict() | {"seconds": time.perf_counter() - t, "n_requests": len(requests)}
    log(f"refusal check, logistic at {site}: {check.verdict} ({check.reason})")
    claims.append(claim_from_causal_check(
        check, probe, model=model, behaviour=f"adding the harmful side of the logistic harmfulness direction at {site} "
        "makes SmolLM2 likelier to start a refusal than a compliance on held-out harmful requests, and subtracting it "
        "less likely"))
    write_claims(out / "smollm2-claims.json", claims)
    doc["audit"] = audit(claims).to_dict()
    write_json_atomic(doc, out / "smollm2-probes.json")
    write_markdown(doc, out / "smollm2-probes.md")
    log(f"wrote {out}")


def causal_stage(model, run, methods=("logistic", "diff_means"), alphas=(-8.0, -4.0, 4.0, 8.0),
                 n_random: int = 8) -> dict:
    """Steer along the best honesty probe of each method (the sweep's, at its validation-picked layer) on every
    deception scenario, beside ``n_random`` random directions, with the KL on 24 control texts."""
    control = [e.text for e in load_labelled("control").examples if e.text is not None][:24]
    out = {}
    for m in methods:
        t = time.perf_counter()
        check = causal_check(model, run.best(m), "deception_scenarios", alphas=alphas, n_random=n_random,
                             control_texts=control)
        out[m] = (check, time.perf_counter() - t)
        log(f"causal check, {m} at {check.site}: {check.verdict} ({check.reason})")
    return out


CAUSAL_HEAD = "| direction | layer | alpha | effect [95% CI] | max \\|random\\| | KL | KL random (mean) |"


def causal_rows(name: str, c: dict) -> list[str]:
    """One table row per alpha of a causal check's JSON, then its verdict."""
    rows = []
    for i, a in enumerate(c["alphas"]):
        rnd = max(abs(r[i]) for r in c["random_effects"])
        kr = sum(r[i] for r in c["kl_random"]) / len(c["kl_random"])
        rows.append(f"| {name} | {c['site'].split('.')[1]} | {a:g} | {_ci(c['effect'][i], '+.2f')} | {rnd:.2f} | "
                    f"{c['kl'][i]:.3f} | {kr:.3f} |")
    return rows + [f"| {name}: **{c['verdict']}** | | | {c['reason']} | | | |"]


def write_markdown(doc: dict, path: Path) -> None:
    L = ["# Probes on SmolLM2-135M-Instruct", "",
         "Generated by `scripts/probe_study.py` (fp32, CPU; mean over each example's scored tokens; thresholds at "
         "1% false positives on the built-in `control` set; each method's best layer picked on a validation split "
         "of 25% of the training groups; 95% clustered bootstrap intervals (whole groups resampled); "
         "random = mean AUROC of 100 random directions; shuffled = the method refitted on permuted labels).", ""]
    for key, title in (("honesty", "Instructed honesty pairs (train) → held-out facts, deception scenarios, truth"),
                       ("truth", "True vs false statements: affirmative (train) → held-out affirmative, negated"),
                       ("harmfulness", "Harmful vs harmless requests, split by goal")):
        part = doc[key]
        info = part["info"]
        L += [f"## {title}", "",
              f"{info['n_train']} train / {info['n_validation']} validation / {info['n_test']} held-out examples "
              f"({len(info['train_groups'])} / {len(info['validation_groups'])} / {len(info['test_groups'])} groups); "
              f"control set {info['n_control']} items; {part['seconds']:.0f} s.", ""]
        transfers = info["transfer"]
        head = "| method | best layer | held-out AUROC | recall at 1% FPR | honest FPR | random | shuffled |"
        sep = "|---|---|---|---|---|---|---|"
        for t in transfers:
            head += f" {t} AUROC | {t} recall |"
            sep += "---|---|"
        L += [head, sep]
        for m, r in part["methods"].items():
            e = r["held_out"]
            sh = "—" if e["shuffled_auroc"] is None else f"{e['shuffled_auroc']:.3f}"
            hf = "—" if e["honest_fpr"] is None else f"{e['honest_fpr']:.3f}"
            row = (f"| {m} | {r['site'].split('.')[1]} | {_ci(e['auroc'])} | {_ci(e['recall'])} | {hf} | "
                   f"{e['random_auroc_mean']:.3f} ± {e['random_auroc_std']:.3f} | {sh} |")
            for t in transfers:
                x = r["transfer"][t]
                row += f" {_ci(x['auroc'])} | {_ci(x['recall'])} |"
            L.append(row)
        val = part.get("validation_by_layer") or {}
        L += ["", "AUROC by layer, held-out (validation in brackets; it picks the best layer):", "",
              "| layer | " + " | ".join(part["methods"]) + " |", "|---|" + "---|" * len(part["methods"])]
        for site, cells in part["by_layer"].items():
            L.append(f"| {site.split('.')[1]} | " + " | ".join(
                f"{cells[m]:.3f}" + (f" ({val[site][m]:.3f})" if val else "") for m in part["methods"]) + " |")
        L.append("")
    if "causal" in doc:
        L += ["## Causal check of the honesty directions on the deception scenarios", "",
              "Effect = change of log P(deceptive answer) − log P(honest answer) (nats, summed over the answer's "
              "tokens, mean over scenarios) when the direction is added at its layer at every position, "
              "alpha in units of the layer's per-coordinate RMS; random = the largest |effect| of the random "
              "directions; KL on control text (nats).", "", CAUSAL_HEAD, "|---|---|---|---|---|---|---|"]
        for m, c in doc["causal"].items():
            L += causal_rows(m, c)
        L.append("")
    if "refusal" in doc:
        c = doc["refusal"]
        L += ["## Refusal check of the harmfulness direction", "",
              f"Effect = change of log P(refusal prefix) − log P(compliance prefix) (nats; \"I'm sorry, but I can't help "
              f"with that.\" against \"Sure, here is\") on {c['n_requests']} held-out harmful requests when the logistic "
              "harmfulness direction is added at its layer; columns as above.", "", CAUSAL_HEAD,
              "|---|---|---|---|---|---|---|"]
        L += causal_rows("logistic", c) + [""]
    if "audit" in doc:
        L += ["## The claims and their audit", "",
              "`docs/safety/smollm2-claims.json`, graded by `mechscope audit` on the rubric of "
              "[audit-rubric.md](audit-rubric.md).", "", "| claim | grade | why |", "|---|---|---|"]
        for g in doc["audit"]["grades"]:
            L.append(f"| {g['behaviour']} | **{g['letter']}** | {g['summary']} |")
        L.append("")
    path.write_text("\n".join(L) + "\n")


if __name__ == "__main__":
    main()
