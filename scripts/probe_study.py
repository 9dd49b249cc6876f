"""Probes on SmolLM2-135M-Instruct: instructed honesty, truth and harmfulness, with baselines and transfer.

Every number comes from ``mechscope.safety.train_probe`` on the built-in datasets (written for this project):

1. honesty_pairs: every ``hook_resid_post`` x {logistic, diff_means, lda, lat, ccs}, split by fact; the
   threshold at 1% false positives on the ``control`` set; the same probes tested on the held-out
   ``deception_scenarios`` and on ``truth`` (transfer).
2. truth: trained on affirmative statements only, tested on held-out affirmative groups and on the negated
   statements (Marks & Tegmark 2023's negation test).
3. harmfulness: harmful vs harmless requests, split by goal; recall at 1% FPR on the control set.
4. the causal check of the best honesty directions (logistic and difference of means, refitted at their
   best layer): steering along them on the held-out deception scenarios, beside random directions.

Writes ``docs/safety/smollm2-probes.json`` (every cell) and ``docs/safety/smollm2-probes.md`` (the tables).
Usage: ``.venv/bin/python scripts/probe_study.py`` (about 35 minutes on a 2-core CPU); ``--causal-only``
redoes step 4 on the JSON of an earlier run.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import mechscope
from mechscope.data.labelled import LabelledDataset
from mechscope.data.labelled_builtins import load_labelled
from mechscope.safety import causal_check, train_probe

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("logistic", "diff_means", "lda", "lat", "ccs")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _ci(d: dict, fmt: str = ".3f") -> str:
    return f"{d['estimate']:{fmt}} [{d['low']:{fmt}}, {d['high']:{fmt}}]"


def summary(run, name: str) -> dict:
    """Per method: the best layer, its held-out evaluation, and its transfer evaluations; the AUROC per layer."""
    out = {"info": run.info, "methods": {}, "by_layer": run.sweep.table("auroc")}
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
    ap.add_argument("--causal-only", action="store_true")
    args = ap.parse_args()
    methods = tuple(args.methods.split(","))
    model = mechscope.load("smollm2-135m", dtype="float32")
    if args.causal_only:
        doc = json.loads((args.out / "smollm2-probes.json").read_text())
        doc["causal"] = causal_stage(model, doc)
        (args.out / "smollm2-probes.json").write_text(json.dumps(doc, indent=1))
        write_markdown(doc, args.out / "smollm2-probes.md")
        return
    doc: dict = {"model": "SmolLM2-135M-Instruct", "dtype": "float32", "aggregation": "mean", "fpr": 0.01}

    t = time.perf_counter()
    run = train_probe(model, "honesty_pairs", methods=methods, transfer=["deception_scenarios", "truth"])
    doc["honesty"] = summary(run, "honesty_pairs") | {"seconds": time.perf_counter() - t}

    t = time.perf_counter()
    truth = load_labelled("truth")
    plain = LabelledDataset("truth_affirmative", tuple(e for e in truth.examples if not e.meta["negated"]))
    negated = LabelledDataset("truth_negated", tuple(e for e in truth.examples if e.meta["negated"]))
    run = train_probe(model, plain, methods=methods, transfer=[negated])
    doc["truth"] = summary(run, "truth") | {"seconds": time.perf_counter() - t}

    t = time.perf_counter()
    run = train_probe(model, "harmfulness", methods=methods)
    doc["harmfulness"] = summary(run, "harmfulness") | {"seconds": time.perf_counter() - t}

    doc["causal"] = causal_stage(model, doc)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "smollm2-probes.json").write_text(json.dumps(doc, indent=1))
    write_markdown(doc, args.out / "smollm2-probes.md")
    log(f"wrote {args.out}")


def causal_stage(model, doc: dict, methods=("logistic", "diff_means"), alphas=(-8.0, -4.0, 4.0, 8.0),
                 n_random: int = 8) -> dict:
    """Refit the best honesty probe of each method at its layer (the same fit as the sweep's) and steer along
    it on every deception scenario, beside ``n_random`` random directions, with the KL on 24 control texts."""
    control = [e.text for e in load_labelled("control").examples if e.text is not None][:24]
    out = {}
    for m in methods:
        site = doc["honesty"]["methods"][m]["site"]
        t = time.perf_counter()
        run = train_probe(model, "honesty_pairs", sites=site, methods=(m,), control=None, shuffled=False,
                          n_boot=200, n_random=10, progress=False)
        check = causal_check(model, run.sweep.probes[site, m], "deception_scenarios", alphas=alphas,
                             n_random=n_random, control_texts=control)
        out[m] = check.to_dict() | {"seconds": time.perf_counter() - t}
        log(f"causal check, {m} at {site}: {check.verdict} ({check.reason})")
    return out


def write_markdown(doc: dict, path: Path) -> None:
    L = ["# Probes on SmolLM2-135M-Instruct", "",
         "Generated by `scripts/probe_study.py` (fp32, CPU; mean over each example's scored tokens; thresholds at "
         "1% false positives on the built-in `control` set; 95% stratified bootstrap intervals over examples; "
         "random = mean AUROC of 100 random directions; shuffled = the method refitted on permuted labels).", ""]
    for key, title in (("honesty", "Instructed honesty pairs (train) → held-out facts, deception scenarios, truth"),
                       ("truth", "True vs false statements: affirmative (train) → held-out affirmative, negated"),
                       ("harmfulness", "Harmful vs harmless requests, split by goal")):
        part = doc[key]
        info = part["info"]
        L += [f"## {title}", "",
              f"{info['n_train']} train / {info['n_test']} held-out examples ({len(info['train_groups'])} / "
              f"{len(info['test_groups'])} groups); control set {info['n_control']} items; "
              f"{part['seconds']:.0f} s.", ""]
        transfers = info["transfer"]
        head = "| method | best layer | held-out AUROC | recall at 1% FPR | random | shuffled |"
        sep = "|---|---|---|---|---|---|"
        for t in transfers:
            head += f" {t} AUROC | {t} recall |"
            sep += "---|---|"
        L += [head, sep]
        for m, r in part["methods"].items():
            e = r["held_out"]
            sh = "—" if e["shuffled_auroc"] is None else f"{e['shuffled_auroc']:.3f}"
            row = (f"| {m} | {r['site'].split('.')[1]} | {_ci(e['auroc'])} | {_ci(e['recall'])} | "
                   f"{e['random_auroc_mean']:.3f} ± {e['random_auroc_std']:.3f} | {sh} |")
            for t in transfers:
                x = r["transfer"][t]
                row += f" {_ci(x['auroc'])} | {_ci(x['recall'])} |"
            L.append(row)
        L += ["", "AUROC by layer (held-out):", "", "| layer | " + " | ".join(part["methods"]) + " |",
              "|---|" + "---|" * len(part["methods"])]
        for site, cells in part["by_layer"].items():
            L.append(f"| {site.split('.')[1]} | " + " | ".join(f"{cells[m]:.3f}" for m in part["methods"]) + " |")
        L.append("")
    if "causal" in doc:
        L += ["## Causal check of the honesty directions on the deception scenarios", "",
              "Effect = change of log P(deceptive answer) − log P(honest answer) (nats, summed over the answer's "
              "tokens, mean over scenarios) when the direction is added at its layer at every position, "
              "alpha in units of the layer's per-coordinate RMS; random = the largest |effect| of the random "
              "directions; KL on control text (nats).", "",
              "| direction | layer | alpha | effect [95% CI] | max \\|random\\| | KL | KL random (mean) |",
              "|---|---|---|---|---|---|---|"]
        for m, c in doc["causal"].items():
            for i, a in enumerate(c["alphas"]):
                e = c["effect"][i]
                rnd = max(abs(r[i]) for r in c["random_effects"])
                kr = sum(r[i] for r in c["kl_random"]) / len(c["kl_random"])
                L.append(f"| {m} | {c['site'].split('.')[1]} | {a:g} | {_ci(e, '+.2f')} | {rnd:.2f} | "
                         f"{c['kl'][i]:.3f} | {kr:.3f} |")
            L.append(f"| {m}: **{c['verdict']}** | | | {c['reason']} | | | |")
        L.append("")
    path.write_text("\n".join(L) + "\n")


if __name__ == "__main__":
    main()
