"""How well a probe separates the classes: AUROC, balanced accuracy, recall at a fixed false-positive rate,
with stratified bootstrap intervals and the two baselines a probe must beat.

Scores are logits (higher = positive class); labels int 0/1. The decision rule everywhere is
"positive iff score > threshold" (strictly above).

The standard of Goldowsky-Dill et al. 2025 (section 3.3): AUROC of positives vs negatives; a threshold at 1%
false positives on a control set of ordinary text; recall of positives at that threshold; the share of honest
items flagged at it; bootstrap 95% intervals. Baselines: random unit directions (what any direction gets) and
the same method refitted on shuffled labels (what the method finds in noise).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from mechscope.analysis.bootstrap import CI, bootstrap_indices
from mechscope.core.errors import InputError
from mechscope.safety.probes import Probe, as_acts, as_labels, fit_probe

Scores = Float[Tensor, " n"] | Float[np.ndarray, " n"]
ControlScores = Float[Tensor, " n_c"] | Float[np.ndarray, " n_c"]


def _scores(s, what: str = "scores") -> Tensor:
    t = (s if isinstance(s, Tensor) else torch.as_tensor(np.asarray(s, dtype=np.float64))).detach().cpu().double()
    if t.dim() != 1:
        raise InputError(f"{what} must be [n] (one per example), got shape {tuple(t.shape)}.")
    bad = int((~torch.isfinite(t)).sum())
    if bad:
        raise InputError(f"{what} hold {bad} NaN or infinite values; score finite activations.")
    return t


def check_fpr(fpr) -> float:
    """``fpr`` as a float, or InputError unless it is a number in (0, 1)."""
    if isinstance(fpr, bool) or not isinstance(fpr, (int, float)) or not 0 < fpr < 1:
        raise InputError(f"fpr must lie in (0, 1), e.g. 0.01 for 1% false positives, got {fpr!r}.")
    return float(fpr)


def auroc_batched(pos: Float[Tensor, "B n1"], neg: Float[Tensor, "B n0"]) -> Float[Tensor, " B"]:
    """AUROC of each row: P(pos > neg) + 0.5 P(pos == neg) over all pairs (Mann-Whitney U / (n1 n0))."""
    neg_sorted = neg.sort(dim=1).values.contiguous()
    below = torch.searchsorted(neg_sorted, pos.contiguous(), right=False).double()
    at_or_below = torch.searchsorted(neg_sorted, pos.contiguous(), right=True).double()
    return (0.5 * (below + at_or_below)).mean(1) / neg.shape[1]


def auroc(scores: Scores, labels) -> float:
    """Area under the ROC curve: the probability that a random positive outscores a random negative, ties 1/2.

    Args:
        scores: float [n]; labels: int [n] in {0, 1}, both present.

    Returns:
        float in [0, 1]; 0.5 is chance.

    Raises:
        InputError: non-finite scores, labels not 0/1 or of one class, mismatched lengths.

    References:
        Mann & Whitney 1947; Hanley & McNeil 1982, "The meaning and use of the area under a ROC curve".
    """
    s = _scores(scores)
    y = as_labels(labels, s.shape[0])
    return float(auroc_batched(s[y == 1][None], s[y == 0][None])[0])


def balanced_accuracy(scores: Scores, labels, threshold: float = 0.0) -> float:
    """Mean of the true-positive and true-negative rates of "positive iff score > threshold".

    Threshold 0 is a probe's own decision boundary (logit 0; midway between the class means for the
    mean-difference methods). Raises InputError as :func:`auroc`.
    """
    s = _scores(scores)
    y = as_labels(labels, s.shape[0])
    pred = s > threshold
    return 0.5 * (float(pred[y == 1].double().mean()) + float((~pred[y == 0]).double().mean()))


def threshold_batched(control: Float[Tensor, "B n"], fpr: float) -> Float[Tensor, " B"]:
    """Per row, the smallest control score t with at most floor(fpr n) control scores > t."""
    n = control.shape[1]
    k = math.floor(fpr * n + 1e-9)
    return control.sort(dim=1).values[:, n - k - 1]


def threshold_at_fpr(control_scores: ControlScores, fpr: float) -> float:
    """The score above which at most ``fpr`` of the control items fall (strictly above: flagged).

    It is the (n - k)-th smallest control score with k = floor(fpr n): the k largest lie above it (fewer
    if it is tied with them), so the control FPR is <= fpr. With fewer than 1/fpr items, k = 0 and the
    threshold is the control maximum (no control item flagged).

    Raises:
        InputError: fpr outside (0, 1); fewer than 1 control score; non-finite scores.
    """
    check_fpr(fpr)
    c = _scores(control_scores, "control scores")
    if c.numel() < 1:
        raise InputError("no control scores: give the probe's scores on a control set of ordinary text.")
    return float(threshold_batched(c[None], fpr)[0])


def recall_at_fpr(scores: Scores, labels, control_scores: ControlScores | None = None, fpr: float = 0.01) -> float:
    """Share of positives scoring above the threshold at ``fpr`` false positives on ``control_scores``.

    Args:
        control_scores: float [n_c], the scores of a control set (ordinary text); None uses the negatives.

    Raises:
        InputError: as :func:`auroc` and :func:`threshold_at_fpr`.
    """
    s = _scores(scores)
    y = as_labels(labels, s.shape[0])
    t = threshold_at_fpr(s[y == 0] if control_scores is None else control_scores, fpr)
    return float((s[y == 1] > t).double().mean())


def _ci(estimate: float, boot: Tensor, n: int, alpha: float) -> CI:
    boot = torch.where(boot.isfinite(), boot, torch.nan)
    low, high = torch.nanquantile(boot, torch.tensor([alpha / 2, 1 - alpha / 2], dtype=torch.float64)).tolist()
    return CI(float(estimate), low, high, n, boot.shape[0], alpha)


def auroc_ci(scores: Scores, labels, *, groups=None, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0) -> CI:
    """AUROC with a percentile bootstrap interval: stratified (positives and negatives resampled separately), or
    clustered when ``groups`` are given (whole groups resampled; resamples lacking a class are left out).

    Args:
        groups: one group name per example (examples of a group are dependent, e.g. twin answers), or None.

    Raises:
        InputError: as :func:`auroc`; fewer than 2 examples of a class; n_boot < 10; alpha outside (0, 1);
            groups of the wrong length or fewer than 2 groups.

    References:
        Efron & Tibshirani 1993; Field & Welsh 2007 (the cluster bootstrap).
    """
    s = _scores(scores)
    y = as_labels(labels, s.shape[0])
    pos, neg = s[y == 1], s[y == 0]
    _check_boot(len(pos), len(neg), n_boot, alpha)
    if groups is not None:
        w = _cluster_weights(list(groups), len(s), n_boot, seed)
        return _ci(auroc(s, y), _weighted_auroc(pos, neg, w[:, y == 1], w[:, y == 0]), len(s), alpha)
    boot = auroc_batched(pos[bootstrap_indices(len(pos), n_boot, seed)], neg[bootstrap_indices(len(neg), n_boot, seed + 1)])
    return _ci(auroc(s, y), boot, len(s), alpha)


def _check_boot(n_pos: int, n_neg: int, n_boot: int, alpha: float) -> None:
    if min(n_pos, n_neg) < 2:
        raise InputError(f"a bootstrap interval needs >= 2 examples of each class, got {n_pos} positives and "
                         f"{n_neg} negatives.")
    if n_boot < 10:
        raise InputError(f"n_boot must be >= 10 resamples (1000 is usual), got {n_boot}.")
    if not 0 < alpha < 1:
        raise InputError(f"alpha must lie in (0, 1) (0.05 for a 95% interval), got {alpha}.")


@dataclass(frozen=True)
class ProbeEvaluation:
    """One probe on one test set (all rates in [0, 1]).

    Attributes:
        auroc / balanced_accuracy / recall: estimates with stratified bootstrap intervals (:class:`CI`);
            balanced accuracy at ``ba_threshold``, recall at ``threshold`` (``fpr`` on the control set).
        threshold: the score flagged above, at ``fpr`` false positives on the control set (on the test
            negatives when no control set was given: ``control`` is then "test negatives").
        honest_fpr: share of the given honest items above ``threshold``; with a control set and no honest items
            given, the share of the test negatives (the honest answers in context); None otherwise.
        bootstrap: "stratified" (examples resampled within each class) or "clustered" (groups resampled).
        random_auroc_mean / random_auroc_std: AUROC over ``n_random`` random unit directions (in the probe's
            standardised space); chance is 0.5 with a spread that shrinks as 1/sqrt(n).
        shuffled_auroc: AUROC of the same method refitted on permuted training labels (None without training data).
    """

    method: str
    site: str | None
    n_pos: int
    n_neg: int
    auroc: CI
    balanced_accuracy: CI
    recall: CI
    fpr: float
    threshold: float
    ba_threshold: float
    control: str
    honest_fpr: float | None
    random_auroc_mean: float
    random_auroc_std: float
    shuffled_auroc: float | None
    bootstrap: str = "stratified"

    def to_dict(self) -> dict:
        """JSON-ready."""
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        return {k: v.to_dict() if isinstance(v, CI) else v for k, v in out.items()}


def _cluster_weights(groups, n: int, n_boot: int, seed: int) -> Float[Tensor, "n_boot n"]:
    """Per resample, each example's weight: how many times its group was drawn (groups with replacement)."""
    if len(groups) != n:
        raise InputError(f"groups has {len(groups)} entries for {n} examples; give one group per test example.")
    ids: dict = {}
    gid = torch.tensor([ids.setdefault(g, len(ids)) for g in groups], dtype=torch.long)
    if len(ids) < 2:
        raise InputError(f"a clustered bootstrap needs >= 2 groups, got {len(ids)}; give groups=None to resample "
                         "examples.")
    draws = bootstrap_indices(len(ids), n_boot, seed)
    counts = torch.zeros(n_boot, len(ids), dtype=torch.float64).scatter_add_(1, draws, torch.ones_like(draws, dtype=torch.float64))
    return counts[:, gid]


def _weighted_mean(w: Tensor, x: Tensor) -> Tensor:
    tot = w.sum(1)
    return torch.where(tot > 0, (w * x.double()).sum(1) / tot.clamp_min(1e-300), torch.nan)


def _weighted_auroc(pos: Tensor, neg: Tensor, wp: Tensor, wn: Tensor) -> Tensor:
    """AUROC of each resample with example weights wp [B, n1], wn [B, n0] (ties count 1/2)."""
    cmp = (pos[:, None] > neg[None]).double() + 0.5 * (pos[:, None] == neg[None]).double()  # [n1, n0]
    num = ((wp @ cmp) * wn).sum(1)
    den = wp.sum(1) * wn.sum(1)
    return torch.where(den > 0, num / den.clamp_min(1e-300), torch.nan)


def _weighted_threshold(neg: Tensor, w: Tensor, fpr: float) -> Tensor:
    """threshold_at_fpr of the negatives repeated by their integer weights."""
    rep = neg.repeat_interleave(w.long())
    return threshold_batched(rep[None], fpr)[0] if rep.numel() else torch.tensor(torch.nan, dtype=torch.float64)


def evaluate_probe(probe: Probe, X_test, y_test, *, control=None, honest=None, fpr: float = 0.01,
                   ba_threshold: float = 0.0, train: tuple | None = None, fit_kwargs: dict | None = None,
                   groups=None, n_boot: int = 1000, n_random: int = 100, alpha: float = 0.05,
                   seed: int = 0) -> ProbeEvaluation:
    """Evaluate a probe with stratified bootstrap intervals and the random-direction and shuffled-label baselines.

    Args:
        X_test: float [n, d]; y_test: int [n] in {0, 1}, both present (>= 2 of each).
        control: float [n_c, d], activations of ordinary text to set the threshold at ``fpr``; None: the test
            negatives. honest: float [n_h, d], honest items whose flagged share is reported; None with a control
            set: the test negatives (the honest answers in context) are those items.
        train: (X_train, y_train) for the shuffled-label baseline (refit with ``fit_kwargs``, without pairs).
        groups: one group name per test example (e.g. the fact a pair of answers shares): the bootstrap then
            resamples groups, not examples (a clustered bootstrap), since the examples of a group are not
            independent; None resamples examples.
        n_boot: bootstrap resamples; without groups, positives, negatives and control items are resampled
            separately, so both classes are present in each resample; with groups, resamples that lack a
            class are left out of the interval.

    Raises:
        InputError: non-finite activations (names the site and count); one-class labels; fpr outside (0, 1);
            width mismatch; groups of the wrong length or fewer than 2 groups.

    References:
        Goldowsky-Dill et al. 2025, section 3.3; Efron & Tibshirani 1993, chapter 13 (percentile intervals);
        Field & Welsh 2007, "Bootstrapping clustered data" (resampling clusters).
    """
    check_fpr(fpr)
    s = probe.score(X_test)
    y = as_labels(y_test, s.shape[0])
    pos, neg = s[y == 1], s[y == 0]
    _check_boot(len(pos), len(neg), n_boot, alpha)
    ctrl = neg if control is None else probe.score(control)
    t = threshold_at_fpr(ctrl, fpr)
    ip = bootstrap_indices(len(pos), n_boot, seed)
    ineg = bootstrap_indices(len(neg), n_boot, seed + 1)
    ic = ineg if control is None else bootstrap_indices(len(ctrl), n_boot, seed + 2)
    bpos, bneg, bctrl = pos[ip], neg[ineg], ctrl[ic]
    n = len(s)
    t_boot = threshold_batched(bctrl, fpr)
    if groups is None:
        auc = auroc_ci(s, y, n_boot=n_boot, alpha=alpha, seed=seed)
        ba_boot = 0.5 * ((bpos > ba_threshold).double().mean(1) + (bneg <= ba_threshold).double().mean(1))
        rec_boot = (bpos > t_boot[:, None]).double().mean(1)
    else:
        w = _cluster_weights(list(groups), n, n_boot, seed)
        wp, wn = w[:, y == 1], w[:, y == 0]
        auc = _ci(auroc(s, y), _weighted_auroc(pos, neg, wp, wn), n, alpha)  # auroc_ci(groups=) on these weights
        ba_boot = 0.5 * (_weighted_mean(wp, pos[None] > ba_threshold) + _weighted_mean(wn, neg[None] <= ba_threshold))
        if control is None:  # the threshold moves with the resampled negatives
            t_boot = torch.stack([_weighted_threshold(neg, wn[b], fpr) for b in range(n_boot)])
        rec_boot = _weighted_mean(wp, pos[None] > t_boot[:, None])
    ba = _ci(balanced_accuracy(s, y, ba_threshold), ba_boot, n, alpha)
    rec = _ci(float((pos > t).double().mean()), rec_boot, n, alpha)
    if honest is None and control is not None:
        honest_fpr = float((neg > t).double().mean())
    else:
        honest_fpr = None if honest is None else float((probe.score(honest) > t).double().mean())

    g = torch.Generator().manual_seed(seed)
    z = (as_acts(X_test, probe.site) - probe.mean.double()) / probe.scale.double()
    dirs = torch.randn(n_random, z.shape[1], generator=g, dtype=torch.float64)
    rs = (z @ (dirs / dirs.norm(dim=1, keepdim=True)).T).T  # [n_random, n]
    rand = auroc_batched(rs[:, y == 1], rs[:, y == 0])

    shuffled = None
    if train is not None:
        Xtr, ytr = as_acts(train[0], probe.site, "X_train"), as_labels(train[1], len(train[0]))
        perm = ytr[torch.randperm(len(ytr), generator=g)]
        kw = {k: v for k, v in (fit_kwargs or {}).items() if k != "pairs"}
        shuffled = auroc(fit_probe(Xtr, perm, probe.method, site=probe.site, **kw).score(X_test), y)
    return ProbeEvaluation(probe.method, probe.site, len(pos), len(neg), auc, ba, rec, fpr, t, ba_threshold,
                           "test negatives" if control is None else "control set", honest_fpr,
                           float(rand.mean()), float(rand.std()), shuffled,
                           "stratified" if groups is None else "clustered")


__all__ = [
    "ProbeEvaluation",
    "auroc",
    "auroc_batched",
    "auroc_ci",
    "balanced_accuracy",
    "check_fpr",
    "evaluate_probe",
    "recall_at_fpr",
    "threshold_at_fpr",
    "threshold_batched",
]
