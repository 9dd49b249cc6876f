"""Probe every site with every method, and ensemble probes across sites.

Model-free: it takes activations already collected (one vector per example and site). The best layer varies
by model and task and multi-layer ensembles help (Nordby et al. 2026): sweep every layer, compare the methods,
and read each cell beside its baselines and interval.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from jaxtyping import Float
from torch import Tensor

from mechscope.core.errors import InputError
from mechscope.safety.metrics import ProbeEvaluation, auroc, evaluate_probe
from mechscope.safety.probes import METHODS, Probe, fit_probe


@dataclass(frozen=True)
class SweepResult:
    """A table site x method of fitted probes and their evaluations.

    Attributes:
        sites / methods: the table's axes, in the order given.
        probes / evaluations: dicts keyed by (site, method).
        validation_auroc: {(site, method): AUROC on a validation split} when one was given (empty otherwise).
    """

    sites: tuple[str, ...]
    methods: tuple[str, ...]
    probes: dict[tuple[str, str], Probe]
    evaluations: dict[tuple[str, str], ProbeEvaluation]
    validation_auroc: dict[tuple[str, str], float] = field(default_factory=dict)

    @property
    def selection(self) -> str:
        """Which split picks the best site: "validation", or "test" (optimistic: the reported AUROC then is the
        maximum over sites of noisy estimates)."""
        return "validation" if self.validation_auroc else "test"

    def best_site(self, method: str) -> str:
        """The site whose probe of ``method`` has the highest validation AUROC (test AUROC without a validation
        split; ties go to the earlier site). Raises InputError for a method not swept."""
        if method not in self.methods:
            raise InputError(f"method {method!r} was not swept; the sweep has {self.methods}.")
        if self.validation_auroc:
            return max(self.sites, key=lambda s: self.validation_auroc[s, method])
        return max(self.sites, key=lambda s: self.evaluations[s, method].auroc.estimate)

    def table(self, metric: str = "auroc") -> dict[str, dict[str, float]]:
        """{site: {method: estimate}} of ``metric`` ("auroc", "balanced_accuracy" or "recall")."""
        if metric not in ("auroc", "balanced_accuracy", "recall"):
            raise InputError(f"metric {metric!r} is not one of auroc, balanced_accuracy, recall.")
        return {s: {m: getattr(self.evaluations[s, m], metric).estimate for m in self.methods} for s in self.sites}

    def to_dict(self) -> dict:
        """JSON-ready: the evaluations as rows, and the best site per method."""
        rows = [{"site": s, "method": m, **self.evaluations[s, m].to_dict(),
                 **({"validation_auroc": self.validation_auroc[s, m]} if self.validation_auroc else {})}
                for s in self.sites for m in self.methods]
        return {"rows": rows, "best_site": {m: self.best_site(m) for m in self.methods}, "selection": self.selection}


def probe_sweep(features: dict[str, tuple], y_train, y_test, methods: tuple[str, ...] | list[str] = METHODS, *,
                control: dict[str, Tensor] | None = None, honest: dict[str, Tensor] | None = None,
                validation: tuple[dict[str, Tensor], object] | None = None, groups=None,
                fit_kwargs: dict[str, dict] | None = None, model_name: str | None = None, aggregation: str = "mean",
                fpr: float = 0.01, n_boot: int = 1000, n_random: int = 100, shuffled: bool = True,
                seed: int = 0) -> SweepResult:
    """Fit and evaluate every method at every site.

    Args:
        features: {site: (X_train [n_train, d], X_test [n_test, d])}, one vector per example (the same examples,
            in the same order, at every site).
        y_train / y_test: int [n_train] / [n_test] in {0, 1}.
        methods: from :data:`~mechscope.safety.probes.METHODS`.
        control / honest: {site: activations [n_c, d]} of a control set (threshold at ``fpr``) and of honest
            items (their flagged share); None: threshold on the test negatives, no honest FPR.
        validation: ({site: X_val [n_val, d]}, y_val [n_val]) of groups held out of training and test: every
            probe's AUROC there picks the best site (:meth:`SweepResult.best_site`), so the test AUROC of the
            chosen site is not inflated by the choice.
        groups: one group per test example for a clustered bootstrap (:func:`evaluate_probe`).
        fit_kwargs: {method: keyword arguments of its fit function}, e.g. {"logistic": {"C": 1.0}}.
        shuffled: refit each cell on shuffled labels for the baseline (doubles the fitting time).

    Returns:
        SweepResult.

    Raises:
        InputError: no sites; an unknown method; a site's train/test rows not matching the labels; control or
            honest sets missing a site; anything :func:`fit_probe` or :func:`evaluate_probe` raises.
    """
    if not features:
        raise InputError("no sites to sweep: give features={site: (X_train, X_test)}.")
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise InputError(f"unknown probe methods {bad or '(none given)'}; choose from {METHODS}.")
    for name, sets in (("control", control), ("honest", honest), ("validation", None if validation is None else validation[0])):
        missing = sorted(set(features) - set(sets or features))
        if missing:
            raise InputError(f"{name} has no activations for sites {missing}; give one array per swept site.")
    fit_kwargs = fit_kwargs or {}
    probes, evals, val = {}, {}, {}
    for site, (X_train, X_test) in features.items():
        if len(X_train) != len(y_train) or len(X_test) != len(y_test):
            raise InputError(f"site {site}: {len(X_train)}/{len(X_test)} train/test rows but {len(y_train)}/"
                             f"{len(y_test)} labels; every site needs the same examples in the same order.")
        for m in methods:
            kw = fit_kwargs.get(m, {})
            p = fit_probe(X_train, y_train, m, site=site, model_name=model_name, aggregation=aggregation,
                          info={"split": "train"}, **kw)
            probes[site, m] = p
            evals[site, m] = evaluate_probe(
                p, X_test, y_test, control=None if control is None else control[site],
                honest=None if honest is None else honest[site], fpr=fpr, train=(X_train, y_train) if shuffled else None,
                groups=groups, fit_kwargs=kw, n_boot=n_boot, n_random=n_random, seed=seed)
            if validation is not None:
                val[site, m] = auroc(p.score(validation[0][site]), validation[1])
    return SweepResult(tuple(features), tuple(methods), probes, evals, val)


def ensemble(probes: list[Probe], X_by_site: dict[str, Tensor]) -> Float[Tensor, " n"]:
    """Mean over probes of their standardised scores, ``(score - train mean) / train std``.

    Each probe's scores are standardised by the mean and std of its scores on its own training rows
    (``info["train_score_mean"]``/``["train_score_std"]``, recorded by :func:`fit_probe`), so that probes of
    different scales weigh alike and the result does not depend on the set scored.

    Args:
        probes: fitted probes, each with a ``site``; several may share a site.
        X_by_site: {site: float [n, d]} with the same n examples at every site.

    Returns:
        float64 [n]: higher = positive class.

    Raises:
        InputError: no probes; a probe without site or training score statistics; a site missing from X_by_site;
            sites with different numbers of examples.
    """
    if not probes:
        raise InputError("no probes to ensemble.")
    out, n = [], None
    for p in probes:
        if p.site not in X_by_site:
            raise InputError(f"the probe of {p.method} reads site {p.site}, which X_by_site lacks (it has "
                             f"{sorted(X_by_site)[:8]}); collect activations there.")
        if "train_score_mean" not in p.info or not p.info.get("train_score_std"):
            raise InputError(f"the probe at {p.site} has no training score statistics; fit it with fit_probe.")
        s = p.score(X_by_site[p.site])
        if n is not None and s.shape[0] != n:
            raise InputError(f"site {p.site} has {s.shape[0]} examples but another has {n}; give the same examples.")
        n = s.shape[0]
        out.append((s - p.info["train_score_mean"]) / p.info["train_score_std"])
    return torch.stack(out).mean(0)


__all__ = ["SweepResult", "ensemble", "probe_sweep"]
