"""Fitting linear probes on activations: five methods, computed in float64 whatever the input dtype (the
stored tensors are float32). The probe itself (scoring, files) is :class:`mechscope.safety.probe.Probe`.

Methods (:data:`METHODS`), as in Goldowsky-Dill et al. 2025's probe families:

- ``logistic``: L2-regularised logistic regression on standardised features;
- ``diff_means``: difference of class means (the mass-mean probe);
- ``lda``: covariance-adjusted difference of means, with shrinkage;
- ``lat``: RepE's linear artificial tomography, the first principal component of paired differences;
- ``ccs``: contrast-consistent search (unsupervised; a baseline).
"""

from __future__ import annotations

import hashlib
import math
import warnings
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from mechscope.core.errors import InputError
from mechscope.safety.probe import (
    AGGREGATIONS,
    METHODS,
    Acts,
    Labels,
    Probe,
    as_acts,
    as_labels,
)


def _standardise(x: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and population std per feature; std 0 becomes 1 (as sklearn's StandardScaler)."""
    mean, std = x.mean(0), x.std(0, unbiased=False)
    return mean, torch.where(std > 1e-12 * (1 + mean.abs()), std, torch.ones_like(std))


def _midpoint_probe(x: Tensor, y: Tensor, w: Tensor, method: str, **meta) -> Probe:
    """A probe in activation space (no standardisation) with score 0 midway between the class means."""
    mid = 0.5 * (x[y == 1].mean(0) + x[y == 0].mean(0))
    d = x.shape[1]
    return Probe(w, float(-(mid @ w)), torch.zeros(d), torch.ones(d), method, **meta)


def fit_logistic(x: Tensor, y: Tensor, *, C: float = 0.1, fit_intercept: bool = False, max_iter: int = 1000,
                 tol: float = 1e-9, **meta) -> Probe:
    """L2-regularised logistic regression on standardised features (mean and std of the training rows).

    Minimises ``0.5 |w|^2 + C * sum_i log(1 + exp(-s_i (z_i @ w + b)))`` with ``s_i = 2 y_i - 1`` and
    ``z = (x - mean) / std`` (sklearn's objective; the intercept, if fitted, is not penalised), by
    float64 L-BFGS with a strong-Wolfe line search.

    Args:
        x: float64 [n, d]; y: int64 [n] in {0, 1}.
        C: inverse regularisation strength (> 0); 0.1 as Goldowsky-Dill et al. 2025.
        fit_intercept: fit b (default False, as their probes: the standardised data are centred).
        max_iter: L-BFGS iterations at most; tol: the largest gradient entry accepted as converged.

    Warns:
        UserWarning: L-BFGS stopped with a gradient entry above ``tol`` x 100 (``info["grad_max"]``).

    References:
        Goldowsky-Dill et al. 2025, "Detecting Strategic Deception Using Linear Probes", section 3.2.
    """
    if not C > 0:
        raise InputError(f"C must be > 0 (inverse regularisation strength; 0.1 is the usual), got {C}.")
    mean, scale = _standardise(x)
    z = (x - mean) / scale
    n, d = z.shape
    s = 2.0 * y.double() - 1.0
    params = torch.zeros(d + int(fit_intercept), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([params], lr=1, max_iter=max_iter, max_eval=2 * max_iter, tolerance_grad=tol,
                            tolerance_change=1e-16, history_size=50, line_search_fn="strong_wolfe")

    def objective():  # the sklearn objective divided by C n (better scaled)
        w = params[:d]
        margin = z @ w + (params[d] if fit_intercept else 0.0)
        return F.softplus(-s * margin).mean() + (w @ w) / (2 * C * n)

    def closure():
        opt.zero_grad()
        loss = objective()
        loss.backward()
        return loss

    opt.step(closure)
    params.grad = None
    objective().backward()
    grad_max = float(params.grad.abs().max())
    if grad_max > 100 * tol:
        warnings.warn(f"logistic probe: L-BFGS stopped after {max_iter} iterations with gradient {grad_max:.2g} "
                      f"(> {100 * tol:.2g}); raise max_iter or C's regularisation (lower C).", UserWarning, stacklevel=3)
    p = params.detach()
    info = {"C": C, "fit_intercept": fit_intercept, "grad_max": grad_max}
    return Probe(p[:d], float(p[d]) if fit_intercept else 0.0, mean, scale, "logistic",
                 info={**meta.pop("info", {}), **info}, **meta)


def fit_diff_means(x: Tensor, y: Tensor, **meta) -> Probe:
    """Difference of class means ``mu_1 - mu_0`` (the mass-mean probe), score 0 midway between the means.

    References:
        Marks & Tegmark 2023, "The Geometry of Truth", section 5 (mass-mean probing).
    """
    return _midpoint_probe(x, y, x[y == 1].mean(0) - x[y == 0].mean(0), "diff_means", **meta)


def ledoit_wolf_shrinkage(xc: Float[Tensor, "n d"]) -> float:
    """Ledoit-Wolf optimal shrinkage in [0, 1] of ``xc.T @ xc / n`` towards ``mean eigenvalue * I`` (xc centred).

    References:
        Ledoit & Wolf 2004, "A well-conditioned estimator for large-dimensional covariance matrices", lemma 3.1.
    """
    n, d = xc.shape
    gram = xc @ xc.T if n <= d else xc.T @ xc  # same squared Frobenius norm
    s_fro2 = float((gram ** 2).sum()) / n**2
    mu = float((xc ** 2).sum()) / (n * d)
    delta2 = s_fro2 - 2 * mu * mu * d + mu * mu * d  # |S - mu I|_F^2
    beta2 = (float(((xc ** 2).sum(1) ** 2).sum()) / n - s_fro2) / n
    return 0.0 if delta2 <= 0 else min(max(beta2, 0.0), delta2) / delta2


def fit_lda(x: Tensor, y: Tensor, *, shrinkage: float | str = "auto", **meta) -> Probe:
    """Covariance-adjusted difference of means ``Sigma^-1 (mu_1 - mu_0)``, score 0 midway between the means.

    ``Sigma = (1 - a) S + a (tr(S) / d) I`` with S the pooled within-class covariance (each class centred on
    its mean, divided by n - 2). ``shrinkage`` a in [0, 1], or "auto" for the Ledoit-Wolf estimate, which is
    > 0 when d >= n so the solve is defined.

    References:
        Goldowsky-Dill et al. 2025, section 3.2 (covariance-adjusted difference of means, after Fisher's LDA);
        Ledoit & Wolf 2004 for "auto".
    """
    xc = torch.cat([x[y == c] - x[y == c].mean(0) for c in (0, 1)])
    n, d = xc.shape
    if shrinkage == "auto":
        a = ledoit_wolf_shrinkage(xc)
    elif isinstance(shrinkage, (int, float)) and 0 <= shrinkage <= 1:
        a = float(shrinkage)
    else:
        raise InputError(f"shrinkage must be a number in [0, 1] or 'auto' (Ledoit-Wolf), got {shrinkage!r}.")
    S = xc.T @ xc / max(n - 2, 1)
    sigma = (1 - a) * S + a * (torch.trace(S) / d) * torch.eye(d, dtype=x.dtype)
    diff = x[y == 1].mean(0) - x[y == 0].mean(0)
    try:
        w = torch.linalg.solve(sigma, diff)
    except RuntimeError:
        raise InputError(f"the pooled covariance at shrinkage {a:.3g} is singular ({n} examples, {d} features); "
                         "use shrinkage='auto' or a value above 0.") from None
    info = {**meta.pop("info", {}), "shrinkage": a}
    return _midpoint_probe(x, y, w, "lda", info=info, **meta)


def make_pairs(y: Tensor, seed: int = 0) -> Int[Tensor, "m 2"]:
    """(positive, negative) index pairs: each of min(n_1, n_0) positives with a distinct random negative."""
    g = torch.Generator().manual_seed(seed)
    pos, neg = torch.nonzero(y == 1)[:, 0], torch.nonzero(y == 0)[:, 0]
    m = min(len(pos), len(neg))
    return torch.stack([pos[torch.randperm(len(pos), generator=g)[:m]], neg[torch.randperm(len(neg), generator=g)[:m]]], 1)


def _check_pairs(pairs, y: Tensor, *, oriented: bool) -> Tensor:
    p = torch.as_tensor(np.asarray(pairs) if not isinstance(pairs, Tensor) else pairs).long()
    if p.dim() != 2 or p.shape[1] != 2 or p.shape[0] < 2:
        raise InputError(f"pairs must be int [m, 2] (positive index, negative index), m >= 2; got {tuple(p.shape)}.")
    if bool(((p < 0) | (p >= len(y))).any()):
        raise InputError(f"pairs index rows outside 0..{len(y) - 1}; they index the rows of X.")
    if oriented and not (bool((y[p[:, 0]] == 1).all()) and bool((y[p[:, 1]] == 0).all())):
        raise InputError("pairs must be (positive, negative): column 0 indexes label-1 rows, column 1 label-0 rows.")
    return p


def fit_lat(x: Tensor, y: Tensor, *, pairs=None, seed: int = 0, **meta) -> Probe:
    """RepE's LAT: the first principal component of paired differences ``x[pos] - x[neg]``.

    The component is the top right singular vector of the uncentred difference matrix [m, d], which is PCA of
    the differences with random signs (RepE flips half of them, which centres them near 0). Its sign is set so
    that positives score higher (mean of the differences along it > 0); score 0 is midway between the class
    means.

    Args:
        pairs: int [m, 2] (positive index, negative index) into X, e.g. the honest/dishonest twins of one fact.
            Without pairs, each positive is paired with a random distinct negative (``seed``), m = min(n_1, n_0).

    References:
        Zou et al. 2023, "Representation Engineering", section 3.1 (LAT); Goldowsky-Dill et al. 2025, section 3.2.
    """
    p = make_pairs(y, seed) if pairs is None else _check_pairs(pairs, y, oriented=True)
    diffs = x[p[:, 0]] - x[p[:, 1]]
    v = torch.linalg.svd(diffs, full_matrices=False).Vh[0]
    if float((diffs @ v).mean()) < 0:
        v = -v
    info = {**meta.pop("info", {}), "n_pairs": int(p.shape[0]), "paired": pairs is not None, "seed": seed}
    return _midpoint_probe(x, y, v, "lat", info=info, **meta)


def fit_ccs(x: Tensor, y: Tensor, *, pairs=None, n_tries: int = 10, n_epochs: int = 1000, lr: float = 1e-3,
            weight_decay: float = 0.01, seed: int = 0, **meta) -> Probe:
    """Contrast-consistent search: an unsupervised probe on contrast pairs; a baseline.

    Each pair (x_a, x_b) is randomly oriented (``seed``) so that the side carries no label, each side is
    normalised by its own mean and std per feature, and ``p(x) = sigmoid(w @ x + b)`` is trained by AdamW
    (full batch) on ``mean (p(a) - (1 - p(b)))^2 + mean min(p(a), p(b))^2``, from ``n_tries`` random
    initialisations at once; the lowest final loss wins. The labels are used only to orient the sign (positives
    must score higher on the training rows, ``info["sign_flipped"]``) and, without ``pairs``, to build pairs,
    which makes it supervised: give pairs for the unsupervised setting. The stored standardisation is the mean
    of the two sides' means and the root-mean of their variances, so single vectors can be scored.

    Args:
        pairs: int [m, 2] (positive, negative) contrast partners; default: random pairs (:func:`make_pairs`).

    References:
        Burns et al. 2022, "Discovering Latent Knowledge in Language Models Without Supervision", section 2
        (loss, per-side normalisation; defaults from their code).
    """
    if n_tries < 1 or n_epochs < 1:
        raise InputError(f"n_tries and n_epochs must be >= 1, got {n_tries} and {n_epochs}.")
    p = make_pairs(y, seed) if pairs is None else _check_pairs(pairs, y, oriented=True)
    g = torch.Generator().manual_seed(seed)
    swap = torch.rand(p.shape[0], generator=g) < 0.5
    p = torch.where(swap[:, None], p.flip(1), p)
    a, b = x[p[:, 0]], x[p[:, 1]]
    (ma, sa), (mb, sb) = _standardise(a), _standardise(b)
    an, bn = (a - ma) / sa, (b - mb) / sb
    d = x.shape[1]
    bound = 1 / math.sqrt(d)  # nn.Linear's initialisation
    W = ((torch.rand(n_tries, d, generator=g, dtype=torch.float64) * 2 - 1) * bound).requires_grad_()
    B = ((torch.rand(n_tries, generator=g, dtype=torch.float64) * 2 - 1) * bound).requires_grad_()
    opt = torch.optim.AdamW([W, B], lr=lr, weight_decay=weight_decay)

    def losses():  # [n_tries]
        pa, pb = torch.sigmoid(an @ W.T + B), torch.sigmoid(bn @ W.T + B)
        return ((pa - (1 - pb)) ** 2).mean(0) + (torch.minimum(pa, pb) ** 2).mean(0)

    with torch.no_grad():
        first = losses()
    for _ in range(n_epochs):
        opt.zero_grad()
        loss = losses()
        loss.sum().backward()  # the tries are independent: each gets its own gradient
        opt.step()
    with torch.no_grad():
        final = losses()
    k = int(final.argmin())
    mean, scale = 0.5 * (ma + mb), torch.sqrt(0.5 * (sa**2 + sb**2))
    w, bias = W[k].detach(), float(B[k].detach())
    z = (x - mean) / scale @ w
    flipped = float(z[y == 1].mean()) < float(z[y == 0].mean())
    if flipped:
        w, bias = -w, -bias
    info = {**meta.pop("info", {}), "n_tries": n_tries, "n_epochs": n_epochs, "lr": lr, "weight_decay": weight_decay,
            "seed": seed, "loss_initial": float(first[k]), "loss_final": float(final[k]),
            "loss_final_all": final.tolist(), "sign_flipped": flipped, "paired": pairs is not None}
    return Probe(w, bias, mean, scale, "ccs", info=info, **meta)


_FITTERS = {"logistic": fit_logistic, "diff_means": fit_diff_means, "lda": fit_lda, "lat": fit_lat, "ccs": fit_ccs}


def fit_probe(X: Acts, y: Labels, method: str = "logistic", *, site: str | None = None, model_name: str | None = None,
              aggregation: str = "mean", info: dict | None = None, **kw) -> Probe:
    """Fit a linear probe of one of :data:`METHODS` on per-example activations.

    Args:
        X: float [n, d] (any float dtype; computed in float64), one vector per example.
        y: int64 [n] in {0, 1}, 1 = positive class (scores higher).
        method: "logistic" | "diff_means" | "lda" | "lat" | "ccs"; ``kw`` go to its ``fit_<method>``
            (C, fit_intercept; shrinkage; pairs, seed; n_tries, n_epochs, ...).
        site / model_name / aggregation / info: recorded in the probe (``info``: e.g. dataset and split).

    Returns:
        Probe; ``info`` also holds the hyperparameters, ``n_train``, the training-set class counts, a
        fingerprint of X and y, and ``train_score_mean``/``train_score_std`` (for :func:`~mechscope.safety.ensemble`).

    Raises:
        InputError: unknown method or keyword; X not finite (names the site and count); labels not 0/1 or of
            one class; bad hyperparameters.
    """
    if method not in _FITTERS:
        raise InputError(f"unknown probe method {method!r}; choose one of {METHODS}.")
    x = as_acts(X, site)
    yy = as_labels(y, x.shape[0])
    fp = hashlib.sha256(x.numpy().tobytes() + yy.numpy().tobytes()).hexdigest()[:16]
    base = {**(info or {}), "n_train": x.shape[0], "n_pos": int(yy.sum()), "n_neg": int((yy == 0).sum()),
            "fingerprint": fp}
    try:
        probe = _FITTERS[method](x, yy, site=site, model_name=model_name, aggregation=aggregation, info=base, **kw)
    except TypeError as e:
        if "unexpected keyword" not in str(e):
            raise
        raise InputError(f"{method} probes take no such option ({e}); see fit_{method}'s arguments.") from None
    s = probe.score(x)
    return replace(probe, info={**probe.info, "train_score_mean": float(s.mean()), "train_score_std": float(s.std())})


__all__ = [
    "AGGREGATIONS",
    "METHODS",
    "Probe",
    "as_acts",
    "as_labels",
    "fit_ccs",
    "fit_diff_means",
    "fit_lat",
    "fit_lda",
    "fit_logistic",
    "fit_probe",
    "ledoit_wolf_shrinkage",
    "make_pairs",
]
