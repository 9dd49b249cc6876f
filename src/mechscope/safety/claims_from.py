"""Claims made from results mechscope already produces: probe runs, causal checks of directions, monitor
calibrations, steering measurements and circuit evaluations (:class:`~mechscope.safety.claim.Claim`).

Each producer copies the numbers of its source unchanged (estimates, intervals, counts), names the kind of
evidence honestly (a probe's AUROC is correlational; steering, ablation and patching are causal), records the
controls the source ran, and lists what the source did not test, so that :func:`mechscope.safety.audit.grade`
can judge the claim by the published rubric.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from mechscope.core.errors import InputError
from mechscope.safety.claim import Claim, Control, DataRef, Mechanism, ModelRef, Test

CI_TRIPLE = "a CI, an (estimate, low, high) tuple, or a number"


def _triple(value, what: str) -> tuple[float, float | None, float | None]:
    """(estimate, low, high) from a CI, a 3-tuple, a dict with estimate/low/high, or a number."""
    if hasattr(value, "estimate") and hasattr(value, "low"):
        return float(value.estimate), float(value.low), float(value.high)
    if isinstance(value, Mapping) and "estimate" in value:
        low, high = value.get("low"), value.get("high")
        return float(value["estimate"]), None if low is None else float(low), None if high is None else float(high)
    if isinstance(value, (tuple, list)) and len(value) == 3:
        return float(value[0]), float(value[1]), float(value[2])
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value), None, None
    raise InputError(f"{what} must be a CI, an (estimate, low, high) tuple, or a number, got {value!r}.")


def _model_ref(model, fallback: str | None) -> ModelRef | None:
    if isinstance(model, ModelRef):
        return model
    if isinstance(model, str):
        return ModelRef(model)
    if model is not None and hasattr(model, "cfg"):
        return model_ref(model)
    return ModelRef(fallback) if fallback else None


def model_ref(model, *, hash_weights: bool = True) -> ModelRef:
    """A :class:`ModelRef` of a HookedModel: its name and, with ``hash_weights``, 16 hex digits of SHA-256 over
    every parameter's name, dtype, shape and bytes (in ``named_parameters`` order; reads every weight once)."""
    import hashlib

    import torch

    fp = None
    if hash_weights:
        h = hashlib.sha256()
        for name, p in model.hf.named_parameters():
            t = p.detach().cpu().contiguous()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        fp = h.hexdigest()[:16]
    return ModelRef(model.cfg.name, fp)


# -- probes ------------------------------------------------------------------------------------------------
def _probe_controls(ev) -> list[Control]:
    out = [Control("random directions", ev.random_auroc_mean, ev.random_auroc_mean - 2 * ev.random_auroc_std,
                   ev.random_auroc_mean + 2 * ev.random_auroc_std,
                   description="AUROC of random unit directions in the probe's standardised space; low/high = mean "
                               "± 2 sd over the directions")]
    if ev.shuffled_auroc is not None:
        out.append(Control("shuffled labels", ev.shuffled_auroc,
                           description="AUROC of the same method refitted on permuted training labels"))
    return out


def _probe_test(ev, name: str, data: str, held_out: bool, details: dict) -> Test:
    return Test(name, "correlational", ev.auroc.estimate, metric="auroc", units="dimensionless", low=ev.auroc.low,
                high=ev.auroc.high, ci_level=1 - ev.auroc.alpha, null=0.5, alternative="greater",
                n=ev.n_pos + ev.n_neg, held_out=held_out,
                data=data, controls=_probe_controls(ev),
                details={"balanced_accuracy": ev.balanced_accuracy.estimate, "recall": ev.recall.estimate,
                         "fpr": ev.fpr, "threshold": ev.threshold, "honest_fpr": ev.honest_fpr,
                         "n_pos": ev.n_pos, "n_neg": ev.n_neg, **details})


def claim_from_probe_run(run, method: str = "logistic", *, site: str | None = None, behaviour: str | None = None,
                         causal=None, causal_held_out: bool | None = None, model=None) -> Claim:
    """A correlational claim from a :class:`~mechscope.safety.train.ProbeRun`: the probe's AUROC on the held-out
    groups with its bootstrap interval (null 0.5), the random-direction (mean ± 2 sd) and shuffled-label
    baselines as controls, and one more test per transfer data set.

    With ``site=None`` the site is the run's best (:meth:`ProbeRun.best`). When a validation split picked it
    (``run.info["selection"] == "validation"``, :func:`~mechscope.safety.train.train_probe`'s default), the
    held-out test stays held out; when the held-out split picked it, that test is marked *not* held out (its
    estimate is the maximum over sites, biased upward). The transfer tests stay held out. Pass ``site`` only
    when it was fixed before looking at the held-out numbers.

    Args:
        run: the ProbeRun. method: the probe method (one of the sweep's).
        behaviour: the claim's words (default: "the label of <dataset> is linearly readable by a <method> probe
            at <site>").
        causal: a :class:`~mechscope.safety.causal.CausalCheck` of this probe's direction, whose tests are
            added (:func:`claim_from_causal_check`); without one, "causal effect of the direction" is listed
            as not tested. causal_held_out: passed on as its ``held_out`` (default: held out iff the check's
            data set has another name than the probe's training set).
        model: a ModelRef, a name or a HookedModel (hashed); default the probe's model name, no fingerprint.

    Raises:
        InputError: a method or site the sweep lacks.
    """
    sweep, info = run.sweep, run.info
    chosen = site is None and getattr(sweep, "selection", "test") == "test"  # picked by the held-out AUROC
    site = sweep.best_site(method) if site is None else site
    if (site, method) not in sweep.evaluations:
        raise InputError(f"the sweep has no probe of {method!r} at {site!r}; its sites are {list(sweep.sites)} and "
                         f"methods {list(sweep.methods)}.")
    ev, probe = sweep.evaluations[site, method], sweep.probes[site, method]
    name = info.get("dataset", "dataset")
    data = [DataRef(name, info.get("fingerprint"), "held-out groups", info.get("n_test"))]
    sel = {"site_selected_by_test_auroc": chosen, "n_sites": len(sweep.sites), "method": method, "site": site}
    tests = [_probe_test(ev, f"{method} probe AUROC on the held-out groups of {name}", name, not chosen, sel)]
    for tname, cells in run.transfer.items():
        if (site, method) in cells:
            ref = tname if tname not in {d.name for d in data} else f"{tname} (transfer)"  # a name shared with training
            data.append(DataRef(ref, info.get("fingerprints", {}).get(tname), "whole (transfer)",
                                cells[site, method].n_pos + cells[site, method].n_neg))
            tests.append(_probe_test(cells[site, method], f"{method} probe AUROC on {ref}", ref, True,
                                     {"site": site, "method": method}))
    if info.get("control") and info["control"] not in {d.name for d in data}:
        data.append(DataRef(info["control"], info.get("fingerprints", {}).get(info["control"]),
                            "control set (threshold at fpr)", info.get("n_control") or None))
    not_tested = []
    if chosen:
        not_tested.append(f"the held-out AUROC at a site fixed in advance (the site was chosen by it among "
                          f"{len(sweep.sites)})")
    if not run.transfer:
        not_tested.append("transfer to another data set")
    if causal is not None:
        cc = claim_from_causal_check(causal, probe=probe, held_out=causal_held_out, found_on=name)
        tests += list(cc.tests)
        data += [d for d in cc.data if d.name not in {x.name for x in data}]
        not_tested += [n for n in cc.not_tested if n not in not_tested]
    else:
        not_tested.append("causal effect of the direction (steering or ablation along it)")
    return Claim(
        behaviour or f"the label of {name!r} is linearly readable by a {method} probe at {site}",
        Mechanism(f"a linear direction ({method} probe, {info.get('aggregation', 'mean')} over scored tokens) at {site}",
                  sites=(site,), directions=(f"{method} probe direction at {site}",)),
        tuple(tests), tuple(data), _model_ref(model, probe.model_name), tuple(not_tested),
        source="mechscope.safety.claims_from.claim_from_probe_run")


# -- causal checks -------------------------------------------------------------------------------------------
def _causal_tests(check, alphas: str, held_out: bool, data: str, signed: bool = True) -> list[Test]:
    mode = check.mode
    run = [j for j, a in enumerate(check.alphas) if mode == "ablate" or a != 0]
    if alphas == "best":
        pick = [j for j in run if check.alphas[j] in check.passing_alphas] or run
        run = [max(pick, key=lambda j: (abs(check.effect[j].estimate), -j))]
    n_rand = int(check.random_effects.shape[0])
    tests = []
    for j in run:
        a, ci = check.alphas[j], check.effect[j]
        m = float(check.random_max_abs[j])
        ctrl = Control("random directions", float(check.random_mean[j]), -m, m, n=n_rand,
                       description=f"mean effect of {n_rand} seeded Gaussian unit directions at the same alpha; "
                                   "low/high = ± the largest |effect| among them (the causal check's rule compares "
                                   "|effect| with it)")
        details = {"alpha": a, "mode": mode, "norm_unit": check.norm_unit, "site": check.site,
                   "clean_metric": check.clean_metric, "z": None if math.isnan(float(check.z[j])) else float(check.z[j])}
        if check.kl is not None:
            details["kl"] = float(check.kl[j])
            details["kl_random_mean"] = float(check.kl_random[:, j].mean())
        what = "add along the direction" if mode == "add" else "ablate the direction, set its component"
        tests.append(Test(f"{what}, alpha {a:g}", "causal", ci.estimate, intervention="steer" if mode == "add"
                          else "ablate", metric="mean change of log P(label-1 cont.) - log P(label-0 cont.)",
                          units="nats", low=ci.low, high=ci.high, ci_level=1 - ci.alpha, null=0.0,
                          alternative=("greater" if a > 0 else "less") if signed and mode == "add" else "two-sided",
                          n=check.n_pairs,
                          held_out=held_out, data=data, passed=a in check.passing_alphas, controls=(ctrl,),
                          details=details))
    return tests


def claim_from_causal_check(check, probe=None, *, behaviour: str | None = None, alphas: str = "all",
                            signed: bool = True, held_out: bool | None = None, found_on: str | None = None,
                            data_fingerprint: str | None = None, model=None) -> Claim:
    """A causal claim from a :class:`~mechscope.safety.causal.CausalCheck`: one causal test per alpha that was
    run (alpha 0 of add mode is the clean run and is left out), or only the best with ``alphas="best"`` (the
    passing alpha of largest |effect|, else the alpha of largest |effect|). Each test copies the bootstrap CI
    of the mean effect (nats), has the random directions as its control (mean, and ± the largest |effect|),
    and ``passed`` = the alpha is among the check's passing alphas (:data:`~mechscope.safety.causal.RULE`).

    Args:
        probe: the :class:`~mechscope.safety.probes.Probe` whose direction was checked (names the mechanism).
        signed: the claim is that the direction acts as its probe reads it: adding its label-1 side (alpha > 0)
            makes the label-1 continuation likelier and subtracting it (alpha < 0) the label-0 one, so each add
            test's alternative is "greater" or "less" by the sign of alpha (an effect of the opposite sign does
            not support it). False: the claim is only that the direction moves the choice, either way (two-sided
            tests). Ablation tests are two-sided either way.
        held_out: whether the twin pairs were kept out of finding the direction; default: True iff
            ``found_on`` names another data set than the check's, else False.
        found_on: the name of the data the direction was found on (default: the probe's ``info["dataset"]``,
            which :func:`~mechscope.safety.train.train_probe` records).
        data_fingerprint: the twin data set's fingerprint (default: the one the check records).
        model: a ModelRef, a name or a HookedModel; default the check's model name.

    Raises:
        InputError: ``alphas`` neither "all" nor "best".
    """
    if alphas not in ("all", "best"):
        raise InputError(f"alphas must be 'all' or 'best', got {alphas!r}.")
    ds = check.info.get("dataset", "twin pairs")
    if found_on is None and probe is not None:
        found_on = probe.info.get("dataset")  # train_probe records its training set's name
    if held_out is None:
        held_out = found_on is not None and found_on != ds
    tests = _causal_tests(check, alphas, held_out, ds, signed)
    n_rand = int(check.random_effects.shape[0])
    not_tested = ["behaviour in free generation (the metric is teacher-forced on fixed continuations)",
                  "other sites than " + check.site]
    if n_rand < 19:
        not_tested.append(f"a 5%-level random-direction control ({n_rand} random directions; 19 or more needed)")
    if check.kl is None:
        not_tested.append("side effects on ordinary text (KL; pass control_texts)")
    what = f"the {probe.method} probe direction" if probe is not None else "the direction"
    if signed and check.mode == "add":
        default = (f"adding the label-1 side of {what} at {check.site} makes the label-1 continuations of {ds!r} "
                   "likelier, and subtracting it the label-0 ones")
    else:
        default = f"{what} at {check.site} causally moves the choice between the label-1 and label-0 continuations of {ds!r}"
    return Claim(
        behaviour or default,
        Mechanism(f"{what} at {check.site} ({check.mode})", sites=(check.site,),
                  directions=(f"{probe.method} probe direction at {check.site}" if probe is not None else
                              f"direction at {check.site}",)),
        tuple(tests), (DataRef(ds, data_fingerprint or check.info.get("fingerprint"), "twin pairs", check.n_pairs),),
        _model_ref(model, check.info.get("model")), tuple(not_tested),
        source="mechscope.safety.claims_from.claim_from_causal_check", notes=f"verdict: {check.verdict}: {check.reason}")


# -- monitors ------------------------------------------------------------------------------------------------
def _wilson(k: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, mid - half), min(1.0, mid + half)


def claim_from_monitor(calibration_or_monitor, *, behaviour: str, recall=None, auroc=None, heldout_fpr=None,
                       n: int | None = None, data: str | None = None, recall_baselines: Mapping | None = None,
                       auroc_baselines: Mapping | None = None, control_data: str | None = None, model=None) -> Claim:
    """A correlational claim from a monitor's :class:`~mechscope.safety.monitor_rules.Calibration` (or a
    :class:`~mechscope.safety.monitor.Monitor` holding one), with optional held-out evaluation numbers.

    Tests: the calibration's achieved item-level FPR on the control items with a 95% Wilson interval (not
    held out: the threshold was set on them; null = the target fpr); and, when given, recall at the threshold
    on held-out positives (null = the achieved FPR: a detector at chance flags positives as often as negatives),
    AUROC (null 0.5) and the FPR on held-out negatives (null = the target fpr), all held out on ``data``.

    Args:
        recall / auroc / heldout_fpr: each a CI, an (estimate, low, high) tuple, or a number.
        n: held-out items behind those numbers. data: their data set's name (default "held-out evaluation").
        recall_baselines / auroc_baselines: {name: a CI, an (estimate, low, high) tuple, or a number} controls of the recall / AUROC test, e.g.
            ``{"random-direction monitor": 0.02}``.
        control_data: the control set's name. model: a ModelRef, a name or a HookedModel.

    Raises:
        InputError: no calibration (call ``monitor.calibrate`` first); a number in another form.
    """
    cal = getattr(calibration_or_monitor, "calibration", calibration_or_monitor)
    if cal is None or not hasattr(cal, "achieved_fpr"):
        raise InputError("claim_from_monitor needs a Calibration or a calibrated Monitor; call "
                         "monitor.calibrate(model, controls, fpr) first.")
    ctrl = control_data or "control items"
    lo, hi = _wilson(cal.achieved_fpr * cal.n_items, cal.n_items)
    tests = [Test(f"false-positive rate at the calibrated threshold on {ctrl}", "correlational", cal.achieved_fpr,
                  metric="item-level false-positive rate", units="share of items", low=min(lo, cal.achieved_fpr),
                  high=max(hi, cal.achieved_fpr), null=cal.fpr, n=cal.n_items, held_out=False, data=ctrl,
                  details={"threshold": cal.threshold, "rule": cal.rule, "ema": cal.ema, "window": cal.window,
                           "target_fpr": cal.fpr, "interval": "Wilson 95%"})]
    refs = [DataRef(ctrl, None, "calibration", cal.n_items)]
    ev_name = data or "held-out evaluation"

    def controls(baselines):
        return tuple(Control(k, *_triple(v, f"baseline {k!r}")) for k, v in (baselines or {}).items())

    for value, label, metric, null, base in (
            (recall, "recall of held-out positives at the threshold", "recall", cal.achieved_fpr, recall_baselines),
            (auroc, "AUROC of the monitor's item scores", "auroc", 0.5, auroc_baselines),
            (heldout_fpr, "false-positive rate on held-out negatives", "item-level false-positive rate", cal.fpr, None)):
        if value is None:
            continue
        est, low, high = _triple(value, metric)
        tests.append(Test(label, "correlational", est, metric=metric, units="share of items" if metric != "auroc"
                          else "dimensionless", low=low, high=high, null=null,
                          alternative="less" if metric.endswith("false-positive rate") else "greater", n=n,
                          held_out=True, data=ev_name,
                          controls=controls(base)))
    if len(tests) > 1:
        refs.append(DataRef(ev_name, None, "held-out", n))
    not_tested = ["causal role of the monitored direction", "evasion by a model trained against the monitor",
                  "drift at later checkpoints (recalibrate)"]
    if recall is None and auroc is None:
        not_tested.insert(0, "detection of the behaviour on held-out positives (only the calibration FPR is known)")
    return Claim(behaviour, Mechanism(f"a probe monitor ({cal.rule} rule) alarming above {cal.threshold:.4g}"),
                 tuple(tests), tuple(refs), _model_ref(model, cal.model_name), tuple(not_tested),
                 source="mechscope.safety.claims_from.claim_from_monitor")


# -- steering ------------------------------------------------------------------------------------------------
def _steering_value(effect, target: int | None, n_boot: int, seed: int, what: str):
    """(estimate, low, high, n) of the mean change in log-probability of one target (or the mean over targets)."""
    if hasattr(effect, "delta_logprob"):
        from mechscope.analysis.bootstrap import bootstrap_ci

        d = effect.delta_logprob.double()  # [P, T]
        if target is not None and not -d.shape[1] <= target < d.shape[1]:
            raise InputError(f"{what}: target {target} is no index of the {d.shape[1]} target tokens; pass 0-"
                             f"{d.shape[1] - 1}, or None for their mean.")
        per_prompt = d.mean(1) if target is None else d[:, target]
        if per_prompt.shape[0] < 2:
            raise InputError(f"{what}: an interval needs >= 2 prompts, the SteeringEffect has {per_prompt.shape[0]}; "
                             "measure steering on more prompts.")
        ci = bootstrap_ci(per_prompt, n_boot=n_boot, seed=seed)
        return float(ci.estimate), float(ci.low), float(ci.high), int(per_prompt.shape[0])
    est, low, high = _triple(effect, what)
    return est, low, high, None


def claim_from_steering(effect, *, behaviour: str, mechanism: Mechanism | str, baselines: Sequence = (),
                        target: int | None = None, intervention: str = "steer", held_out: bool = False,
                        data: str | None = None, data_fingerprint: str | None = None, n: int | None = None,
                        units: str = "nats", n_boot: int = 1000, seed: int = 0, model=None) -> Claim:
    """A causal claim from a steering measurement: a :class:`~mechscope.features.steering.SteeringEffect`
    (:func:`~mechscope.features.steering.measure_steering`), or plain numbers.

    From a SteeringEffect the test is the mean over prompts of the change in log P(target) at each prompt's
    last position (``delta_logprob[:, target]``; the mean over targets with ``target=None``), with a
    percentile bootstrap CI over prompts. Each baseline (a SteeringEffect of a control direction, e.g. a
    random one of the same norm, or a CI, an (estimate, low, high) tuple, or a number) becomes a control of the test.

    Args:
        effect: a SteeringEffect, or a CI, an (estimate, low, high) tuple, or a number of the effect (``units``; give ``n``).
        mechanism: a :class:`Mechanism`, or its description (a feature, a contrastive direction).
        target: the index into the effect's target tokens (None: the mean over them).
        intervention: "steer" (addition, clamping) or "ablate".
        held_out: the prompts were not used to find the direction. data / data_fingerprint: the prompts' name.

    Raises:
        InputError: fewer than 2 prompts in a SteeringEffect; a number in another form; an unknown intervention.
    """
    est, low, high, n_eff = _steering_value(effect, target, n_boot, seed, "effect")
    controls = []
    for i, b in enumerate(baselines):
        be, bl, bh, bn = _steering_value(b, target, n_boot, seed, f"baseline {i}")
        controls.append(Control(f"baseline {i}" if not hasattr(b, "delta_logprob") else f"control direction {i}",
                                be, bl, bh, n=bn, description="steering effect of a control direction (CI over "
                                                              "prompts)" if bn else ""))
    mech = mechanism if isinstance(mechanism, Mechanism) else Mechanism(mechanism)
    name = data or "steering prompts"
    metric = "mean change of log P(target) at the last position" + ("" if target is None else f" (target {target})")
    kl = getattr(effect, "kl", None)
    test = Test(f"{intervention} along the proposed direction", "causal", est, intervention=intervention, metric=metric,
                units=units, low=low, high=high, null=0.0, n=n_eff or n, held_out=held_out, data=name,
                controls=tuple(controls), details={} if kl is None else {"kl_mean": float(kl.mean())})
    not_tested = ["effects beyond the next token (free generation)"]
    if not controls:
        not_tested.append("steering along random directions of the same norm (control)")
    return Claim(behaviour, mech, (test,), (DataRef(name, data_fingerprint, None, n_eff or n),),
                 _model_ref(model, None), tuple(not_tested), source="mechscope.safety.claims_from.claim_from_steering")


# -- circuits ------------------------------------------------------------------------------------------------
def claim_from_circuit(evaluation: dict | str | Path, *, behaviour: str | None = None,
                       controls: Sequence[Control] | Mapping = (),
                       model=None) -> Claim:
    """A causal claim from a circuit evaluation record (``evaluation.json`` of ``mechscope circuit evaluate``,
    :func:`~mechscope.circuits.runs.read_evaluation`'s layout, schema ``mechscope.circuit_evaluation/1``).

    Tests: the normalised faithfulness f(C) (Marks et al. 2024) under the run's ablation and level, with its
    bootstrap CI over prompts (null 0: the all-ablated model); with ``robustness`` rows, one test per other
    ablation x level (Miller et al. 2024). Ablation ``corrupted`` is patching, ``mean``/``zero`` ablation.
    Held out when the prompts are discover's held-out split or a task discover never saw. CPR/CMD areas and
    the per-prompt spread go into the details.

    Args:
        evaluation: the record (dict), or the path of evaluation.json or its folder.
        controls: :class:`Control` s of the faithfulness test, or {name: a CI, an (estimate, low, high) tuple, or
            a number}, e.g. random circuits of the same size (the record has none; without them that control is
            listed as not tested).

    Raises:
        InputError: not an evaluation record (another schema, e.g. a study's own JSON), a missing section.
    """
    from mechscope.circuits.runs import EVALUATION_SCHEMA, read_evaluation

    ev = read_evaluation(evaluation) if isinstance(evaluation, (str, Path)) else evaluation
    if not isinstance(ev, dict) or ev.get("schema") != EVALUATION_SCHEMA:
        raise InputError(f"claim_from_circuit takes a circuit evaluation record (schema {EVALUATION_SCHEMA!r}, from "
                         "mechscope circuit evaluate); got "
                         f"{ev.get('schema') if isinstance(ev, dict) else type(ev).__name__!r}.")
    missing = [k for k in ("faithfulness", "task", "circuit", "model") if not ev.get(k)]
    if missing:
        raise InputError(f"the evaluation record lacks {missing}; re-run mechscope circuit evaluate.")
    task, circ, f = ev["task"], ev["circuit"], ev["faithfulness"]
    disc_src = ((ev.get("discover") or {}).get("task") or {}).get("source")
    held = task.get("split") == "held-out" or (task.get("split") == "whole task" and disc_src is not None
                                                and task.get("source") != disc_src)
    name = task.get("source") or task.get("name") or "task"
    if isinstance(controls, Mapping):
        ctrls = tuple(Control(str(k), *_triple(v, f"control {k!r}")) for k, v in controls.items())
    else:
        ctrls = tuple(controls)
        if not all(isinstance(c, Control) for c in ctrls):
            raise InputError("controls must be Control objects or {name: a CI, an (estimate, low, high) tuple, or a "
                             "number}.")

    def test(row, extra, controls=()):
        fc = row["faithfulness"]
        return Test(f"faithfulness f(C), {row['ablation']} ablation, {row['level']} level", "causal", fc["estimate"],
                    intervention="patch" if row["ablation"] == "corrupted" else "ablate",
                    metric=f"normalised faithfulness of {row.get('metric', 'the task metric')}", units="dimensionless",
                    low=fc["low"], high=fc["high"], ci_level=1 - fc.get("alpha", 0.05), null=0.0,
                    alternative="greater", n=row.get("n_prompts"), held_out=held, data=name, controls=controls,
                    details={"per_prompt": {k: v for k, v in (row.get("per_prompt") or {}).items() if v is not None},
                             "m_model": row["m_model"]["estimate"], "m_empty": row["m_empty"]["estimate"],
                             "m_circuit": row["m_circuit"]["estimate"], **extra})

    curves = {k: {"estimate": c["area"]["estimate"], "low": c["area"]["low"], "high": c["area"]["high"],
                  "method": c.get("method")} for k, c in (ev.get("curves") or {}).items()}
    tests = [test(f, {"curves": curves} if curves else {}, ctrls)]
    for row in ev.get("robustness") or []:
        if (row["ablation"], row["level"]) != (f["ablation"], f["level"]):
            tests.append(test(row, {}))
    nodes = list(circ.get("nodes") or [])
    not_tested = []
    if not ctrls:
        not_tested.append("random circuits of the same size (control)")
    if not ev.get("robustness"):
        not_tested.append("faithfulness under other ablations and levels (robustness)")
    if not held:
        not_tested.append("faithfulness on prompts not used to discover the circuit")
    not_tested.append("minimality of each component")
    m = ev["model"]
    return Claim(
        behaviour or f"the circuit implements {task.get('name', name)} (metric {task.get('metric', '?')})",
        Mechanism(f"a circuit of {circ.get('n_edges')} edges ({circ.get('percent_of_edges', math.nan):.3g}% of the "
                  f"graph) over {len(nodes)} nodes", sites=tuple(n for n in nodes if not n.startswith("a")),
                  heads=tuple(n for n in nodes if n.startswith("a")),
                  edges=tuple(e["name"] for e in circ.get("edges") or [])),
        tuple(tests), (DataRef(name, task.get("test_hash"), task.get("split"), task.get("n_prompts")),),
        _model_ref(model, m.get("name")), tuple(not_tested), source="mechscope.safety.claims_from.claim_from_circuit",
        notes=" ".join(ev.get("notes") or []))


__all__ = ["claim_from_causal_check", "claim_from_circuit", "claim_from_monitor", "claim_from_probe_run",
           "claim_from_steering", "model_ref"]
