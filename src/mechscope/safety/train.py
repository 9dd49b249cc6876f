"""Probes on a model: a labelled dataset split by group, activations at every site from one pass, every method
fitted and evaluated with its baselines, and the probes tested on other datasets (transfer).

The workflow of Goldowsky-Dill et al. 2025 (Apollo's deception probes), on any HookedModel: train on one
dataset (e.g. instructed honesty pairs), set the alarm threshold at a false-positive rate on ordinary text
(the control set), and report AUROC and recall at that threshold on held-out groups and on other datasets.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from mechscope.core.errors import InputError
from mechscope.safety.activations import collect_features
from mechscope.safety.metrics import ProbeEvaluation, evaluate_probe
from mechscope.safety.probes import Probe
from mechscope.safety.sweep import SweepResult, probe_sweep


@dataclass
class ProbeRun:
    """The result of :func:`train_probe`.

    Attributes:
        sweep: every (site, method) probe and its evaluation on the held-out groups.
        transfer: dataset name -> {(site, method): ProbeEvaluation} of the same probes on that whole dataset.
        info: dataset names and fingerprints, the split (groups on each side), example counts, timings (s).
        scores: method -> {"site": the best site, "parts": {part: {"scores": [n] floats, "labels": [n] ints or
            None}}}: the best probe's logits on each part ("validation", "test", "control",
            "transfer:NAME"), for ROC curves and histograms.
    """

    sweep: SweepResult
    transfer: dict[str, dict[tuple[str, str], ProbeEvaluation]] = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    scores: dict[str, dict] = field(default_factory=dict)

    def best(self, method: str = "logistic") -> Probe:
        """The probe of ``method`` at the best site (highest validation AUROC; see :attr:`SweepResult.selection`)."""
        return self.sweep.probes[self.sweep.best_site(method), method]

    def to_dict(self) -> dict:
        """JSON-ready: the sweep's rows, the transfer rows, info and the best probes' scores."""
        return {"sweep": self.sweep.to_dict(), "info": self.info, "scores": self.scores,
                "transfer": {name: [{"site": s, "method": m, **e.to_dict()} for (s, m), e in cells.items()]
                             for name, cells in self.transfer.items()}}


def _dataset(source):
    from mechscope.data.labelled_builtins import load_labelled

    return load_labelled(source) if isinstance(source, str) else source


def group_pairs(dataset) -> torch.Tensor | None:
    """(positive, negative) index pairs of the groups that hold exactly one example of each label (the twins
    of instructed pairs), or None when fewer than two groups do."""
    pairs = [(pos, neg) for neg, pos in dataset.twins().values()]
    return torch.tensor(pairs, dtype=torch.long) if len(pairs) >= 2 else None


def train_probe(model, dataset, *, sites: str | Sequence[str] = "blocks.*.hook_resid_post",
                methods: Sequence[str] = ("logistic", "diff_means", "lda", "lat"), aggregation: str = "mean",
                test_fraction: float = 0.5, validation_fraction: float = 0.25, seed: int = 0, control="control",
                transfer: Sequence = (), clustered: bool = True,
                fpr: float = 0.01, fit_kwargs: dict | None = None, batch_size: int = 16, n_boot: int = 1000,
                n_random: int = 100, shuffled: bool = True, progress: bool = True) -> ProbeRun:
    """Train and evaluate probes of every method at every site.

    Args:
        model: a HookedModel.
        dataset: a :class:`~mechscope.data.labelled.LabelledDataset`, or a built-in name, ``.jsonl`` path or
            ``hf:`` source (:func:`~mechscope.data.labelled_builtins.load_labelled`).
        sites: hook names or globs (default every ``hook_resid_post``).
        methods: probe methods (:data:`mechscope.safety.probes.METHODS`). ``lat`` and ``ccs`` use the
            dataset's twin pairs (groups of one example of each label) when it has them.
        aggregation: over each example's scored tokens: ``mean``, ``max`` or ``last``.
        test_fraction / seed: the split by group (no group on both sides; checked).
        validation_fraction: share of the training groups held out to pick each method's best site (the
            probes are fitted on the rest); 0 picks on the test split, which makes the best site's test AUROC
            optimistic (``info["selection"]`` says which was used).
        clustered: bootstrap intervals resample the test groups (the examples of a group, e.g. the honest and
            dishonest answer on one fact, are not independent); False resamples examples.
        control: the dataset whose scores set the threshold at ``fpr`` (ordinary text; label 0), or None to
            set it on the held-out negatives.
        transfer: datasets (or names) to test every probe on, whole.
        fpr: false-positive rate of the threshold, in (0, 1).
        fit_kwargs: {method: keyword arguments}, e.g. ``{"logistic": {"C": 1.0}}``.
        batch_size: examples per forward. n_boot / n_random: bootstrap resamples and random directions.
        shuffled: the shuffled-label baseline (refits every cell once more).
        progress: progress bars.

    Cost: one forward pass over train + test + control + transfer examples (every site cached at once), then
    the fits.

    Returns:
        :class:`ProbeRun`.

    Raises:
        InputError: a dataset with one class only (with its counts); a split that shares a group; anything
            :func:`~mechscope.safety.activations.collect_features`, :func:`~mechscope.safety.probes.fit_probe`
            or :func:`~mechscope.safety.metrics.evaluate_probe` raises (bad sites, NaN activations, fpr).
    """
    from mechscope.data.labelled import check_disjoint
    from mechscope.data.labelled_render import render

    ds = _dataset(dataset)
    ds.require_both_classes(f"training a probe on {ds.name!r}")
    train, test = ds.split(test_fraction, seed)
    check_disjoint(train, test)
    test.require_both_classes(f"evaluating on the held-out groups of {ds.name!r} (try another seed or test_fraction)")
    parts = {"train": train, "test": test}
    if not 0 <= validation_fraction < 1:
        raise InputError(f"validation_fraction must lie in [0, 1), e.g. 0.25, got {validation_fraction!r}.")
    if validation_fraction > 0:
        train, val = train.split(validation_fraction, seed + 1)
        check_disjoint(train, val)
        for part, what in ((train, "fitting"), (val, "validation")):
            part.require_both_classes(f"the {what} part of {ds.name!r}'s training groups (try another seed, a "
                                      "smaller validation_fraction, or validation_fraction=0)")
        parts.update(train=train, validation=val)
    if control is not None:
        parts["control"] = _dataset(control)
    others = [_dataset(t) for t in transfer]
    names = [t.name for t in others]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise InputError(f"transfer datasets named {twice} appear more than once; their results are kept by name, so "
                         "give each a distinct name (LabelledDataset(name, examples)).")
    for t in others:
        t.require_both_classes(f"testing transfer to {t.name!r}")
        parts[f"transfer:{t.name}"] = t
    t0 = time.perf_counter()
    rendered, spans, start = [], {}, 0
    for name, part in parts.items():
        r = render(model, part)
        rendered += r
        spans[name] = slice(start, start + len(r))
        start += len(r)
    feats = collect_features(model, rendered, sites, aggregation=aggregation, batch_size=batch_size, progress=progress)
    t_collect = time.perf_counter() - t0

    def rows(name):
        return {s: v[spans[name]] for s, v in feats.vectors.items()}

    kw = {m: dict((fit_kwargs or {}).get(m, {})) for m in methods}
    pairs = group_pairs(train)
    for m in ("lat", "ccs"):
        if m in kw and pairs is not None and "pairs" not in kw[m]:
            kw[m]["pairs"] = pairs
    tr, te = rows("train"), rows("test")
    t1 = time.perf_counter()
    validation = (rows("validation"), parts["validation"].labels) if "validation" in parts else None
    sweep = probe_sweep({s: (tr[s], te[s]) for s in feats.sites}, train.labels, test.labels, tuple(methods),
                        control=rows("control") if control is not None else None, validation=validation,
                        groups=test.groups if clustered else None, fit_kwargs=kw,
                        model_name=model.cfg.name, aggregation=aggregation, fpr=fpr, n_boot=n_boot,
                        n_random=n_random, shuffled=shuffled, seed=seed)
    fingerprint = ds.fingerprint()
    for p in sweep.probes.values():
        p.info.update(dataset=ds.name, fingerprint=fingerprint)
    out: dict[str, dict[tuple[str, str], ProbeEvaluation]] = {}
    for t in others:
        x = rows(f"transfer:{t.name}")
        ctrl = rows("control") if control is not None else None
        out[t.name] = {(s, m): evaluate_probe(p, x[s], t.labels, control=None if ctrl is None else ctrl[s], fpr=fpr,
                                              groups=t.groups if clustered else None, n_boot=n_boot,
                                              n_random=n_random, seed=seed)
                       for (s, m), p in sweep.probes.items()}
    scores = {}
    for m in methods:
        site = sweep.best_site(m)
        probe = sweep.probes[site, m]
        scores[m] = {"site": site, "parts": {
            name: {"scores": probe.score(rows(name)[site]).tolist(),
                   "labels": None if name == "control" else [int(v) for v in parts[name].labels]}
            for name in parts if name != "train"}}
    info = {"dataset": ds.name, "fingerprint": fingerprint, "test_fraction": test_fraction, "seed": seed,
            "validation_fraction": validation_fraction, "selection": sweep.selection,
            "bootstrap": "clustered" if clustered else "stratified",
            "n_train": len(train), "n_test": len(test), "train_groups": sorted(set(train.groups)),
            "n_validation": len(parts["validation"]) if "validation" in parts else 0,
            "validation_groups": sorted(set(parts["validation"].groups)) if "validation" in parts else [],
            "test_groups": sorted(set(test.groups)), "aggregation": aggregation, "fpr": fpr,
            "control": None if control is None else parts["control"].name,
            "n_control": 0 if control is None else len(parts["control"]),
            "transfer": [t.name for t in others], "paired": pairs is not None,
            "fingerprints": {part.name: part.fingerprint() for key, part in parts.items()
                             if key == "control" or key.startswith("transfer:")},
            "seconds": {"activations": t_collect, "fits": time.perf_counter() - t1}}
    return ProbeRun(sweep, out, info, scores)


__all__ = ["ProbeRun", "group_pairs", "train_probe"]
