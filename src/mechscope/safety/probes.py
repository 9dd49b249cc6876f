"""Linear probes on activations: fitting (five methods), scoring, and their on-disk format.

A probe reads one vector per example (``X`` [n, d]: a site's activations aggregated over an example's
tokens, or one token's) and gives a logit, higher for the positive class (e.g. "deceptive"):

    score(x) = ((x - mean) / scale) @ direction + bias

``mean``/``scale`` standardise the features (logistic regression and CCS) or are the identity (0 and 1).
Every method is computed in float64 whatever the input dtype; the stored tensors are float32.

Methods (:data:`METHODS`), as in Goldowsky-Dill et al. 2025's probe families:

- ``logistic``: L2-regularised logistic regression on standardised features;
- ``diff_means``: difference of class means (the mass-mean probe);
- ``lda``: covariance-adjusted difference of means, with shrinkage;
- ``lat``: RepE's linear artificial tomography, the first principal component of paired differences;
- ``ccs``: contrast-consistent search (unsupervised; a baseline).

Files: a folder with ``cfg.json`` (``architecture: "linear_probe"``) beside ``probe.safetensors``
(``direction``, ``mean``, ``scale``), written whole or not at all; no pickle.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from mechscope.core.errors import CorruptFileError, InputError
from mechscope.core.io import (
    jsonable,
    load_safetensors,
    save_safetensors_atomic,
    write_folder_atomic,
    write_json_atomic,
)
from mechscope.core.names import parse

#: The probe families :func:`fit_probe` dispatches to.
METHODS = ("logistic", "diff_means", "lda", "lat", "ccs")
#: How a sequence's per-token scores become one score (Goldowsky-Dill et al. use the mean).
AGGREGATIONS = ("mean", "max", "last")
FORMAT_VERSION = 1
CFG, WEIGHTS = "cfg.json", "probe.safetensors"

Acts = Float[Tensor, "n d"] | Float[np.ndarray, "n d"]
Labels = Int[Tensor, " n"] | Int[np.ndarray, " n"]


def as_acts(X, site: str | None = None, what: str = "X") -> Float[Tensor, "n d"]:
    """``X`` as a float64 CPU tensor [n, d], checked.

    Raises:
        InputError: not 2-D floats; NaN or infinite values (message names the site and the count).
    """
    t = X if isinstance(X, Tensor) else torch.as_tensor(np.asarray(X))
    if t.dim() != 2 or not t.is_floating_point():
        raise InputError(f"{what} must be floats [n, d] (one vector per example), got {t.dtype} "
                         f"{tuple(t.shape)}; aggregate each example's tokens first (mean, max or last).")
    t = t.detach().to("cpu", torch.float64)
    bad = int((~torch.isfinite(t)).sum())
    if bad:
        raise InputError(f"{what} at site {site or '(unnamed)'} holds {bad} NaN or infinite values of {t.numel()}; "
                         "the activations are unusable. Recollect them (in float32 if half precision overflowed) "
                         "or drop the examples that hold them.")
    return t


def as_labels(y, n: int) -> Int[Tensor, " n"]:
    """``y`` as an int64 tensor [n] of 0/1 with both classes present.

    Raises:
        InputError: wrong length, values other than 0/1, or a single class.
    """
    t = (y if isinstance(y, Tensor) else torch.as_tensor(np.asarray(y))).detach().cpu()
    if t.dim() != 1 or t.shape[0] != n:
        raise InputError(f"labels must be [n] = [{n}] (one per row of X), got shape {tuple(t.shape)}.")
    if t.is_floating_point() or not bool(((t == 0) | (t == 1)).all()):
        raise InputError(f"labels must be integers 0 or 1 (1 = positive class), got values {t.unique()[:6].tolist()}.")
    t = t.long()
    counts = [int((t == c).sum()) for c in (0, 1)]
    if min(counts) == 0:
        raise InputError(f"labels hold one class only ({counts[0]} negatives, {counts[1]} positives); a probe "
                         "needs examples of both classes. Add examples of the missing class.")
    return t


@dataclass(frozen=True, eq=False)
class Probe:
    """A linear probe: ``score(x) = ((x - mean) / scale) @ direction + bias`` (a logit; higher = positive).

    Attributes:
        direction: float32 [d], in standardised units (divide by ``scale`` for activation space:
            :attr:`raw_direction`).
        bias: float, so that score 0 is the method's decision boundary.
        mean / scale: float32 [d], the standardisation (0 and 1 for methods without one).
        method: one of :data:`METHODS`.
        site: the hook name it reads (e.g. ``blocks.6.hook_resid_post``), or None when unknown.
        aggregation: how token scores become an example's score, one of :data:`AGGREGATIONS`.
        model_name: the model whose activations it reads, or None when unknown.
        d_model: the feature width d (the site's last axis: d_model for the residual stream).
        info: JSON-ready facts: hyperparameters, dataset fingerprint, split, training score statistics.
    """

    direction: Tensor
    bias: float
    mean: Tensor
    scale: Tensor
    method: str
    site: str | None = None
    aggregation: str = "mean"
    model_name: str | None = None
    d_model: int = 0
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        for k in ("direction", "mean", "scale"):
            v = torch.as_tensor(getattr(self, k)).detach().to("cpu", torch.float32)
            object.__setattr__(self, k, v)
        d = self.direction.shape[0] if self.direction.dim() == 1 else -1
        if d < 1 or self.mean.shape != (d,) or self.scale.shape != (d,):
            raise InputError(f"direction, mean and scale must each be [d], got {tuple(self.direction.shape)}, "
                             f"{tuple(self.mean.shape)}, {tuple(self.scale.shape)}.")
        if not self.d_model:
            object.__setattr__(self, "d_model", d)
        if self.d_model != d:
            raise InputError(f"d_model={self.d_model} but the direction has {d} entries; they must agree.")
        if self.method not in METHODS:
            raise InputError(f"method {self.method!r} is not one of {METHODS}.")
        if self.aggregation not in AGGREGATIONS:
            raise InputError(f"aggregation {self.aggregation!r} is not one of {AGGREGATIONS}.")
        if self.site is not None:
            parse(self.site)  # HookNameError naming the closest valid names
        if not math.isfinite(self.bias) or not all(bool(torch.isfinite(t).all()) for t in (self.direction, self.mean, self.scale)):
            raise InputError("the probe holds NaN or infinite values; refit it on finite activations.")
        if bool((self.scale <= 0).any()):
            raise InputError("scale must be > 0 in every feature (1 where a feature is not standardised).")
        object.__setattr__(self, "bias", float(self.bias))

    @property
    def raw_direction(self) -> Float[Tensor, " d"]:
        """float64 [d]: the direction in activation space (``direction / scale``): score = x @ raw + const."""
        return self.direction.double() / self.scale.double()

    def score(self, X: Acts) -> Float[Tensor, " n"]:
        """float64 [n] logits of examples X [n, d] (any float dtype). Raises InputError on width, NaN/inf."""
        x = as_acts(X, self.site)
        if x.shape[1] != self.d_model:
            raise InputError(f"X has width {x.shape[1]} but the probe reads {self.d_model} features at "
                             f"{self.site}; give activations of the site and model it was fitted on ({self.model_name}).")
        return ((x - self.mean.double()) / self.scale.double()) @ self.direction.double() + self.bias

    def score_tokens(self, acts: Float[Tensor, "pos d"]) -> Float[Tensor, " pos"]:
        """float64 [pos] per-token logits of one sequence's activations [pos, d]."""
        return self.score(acts)

    def aggregate(self, token_scores: Float[Tensor, " pos"]) -> float:
        """One example's score from its token scores, by :attr:`aggregation`. Raises InputError if empty."""
        if token_scores.numel() == 0:
            raise InputError("no token scores to aggregate: the sequence selected no tokens.")
        s = token_scores.double()
        return float({"mean": s.mean, "max": s.max, "last": lambda: s[-1]}[self.aggregation]())

    # -- files ---------------------------------------------------------------------------------
    def to_cfg(self) -> dict:
        """The JSON of ``cfg.json``."""
        return {"architecture": "linear_probe", "format_version": FORMAT_VERSION, "method": self.method,
                "site": self.site, "aggregation": self.aggregation, "model_name": self.model_name,
                "d_model": self.d_model, "bias": self.bias, "info": jsonable(self.info, digits=17)}

    def save(self, folder: str | Path) -> Path:
        """Write ``cfg.json`` + ``probe.safetensors`` into ``folder`` atomically (the whole folder is swapped in).

        Raises:
            InputError: the probe has no ``site`` or ``model_name`` (a file that does not say what it reads is
                unusable): pass them to :func:`fit_probe` or use ``dataclasses.replace(probe, site=..., model_name=...)``.
            DiskFullError: the disk filled up; an earlier probe in ``folder`` is intact.
        """
        if self.site is None or self.model_name is None:
            raise InputError(f"the probe has site={self.site!r}, model_name={self.model_name!r}; a saved probe must "
                             "say which model and site it reads. Pass site= and model_name= to fit_probe, or "
                             "dataclasses.replace(probe, site=..., model_name=...).")

        def write(tmp: Path) -> None:
            save_safetensors_atomic({"direction": self.direction, "mean": self.mean, "scale": self.scale},
                                    tmp / WEIGHTS, metadata={"format": "mechscope"})
            write_json_atomic(self.to_cfg(), tmp / CFG)
        return write_folder_atomic(folder, write)

    @classmethod
    def load(cls, folder: str | Path, *, model=None) -> Probe:
        """Read a probe folder; with ``model``, refuse a probe fitted for another model or width.

        Args:
            model: None, a model name (str), or a model with ``cfg.name`` and ``cfg.d_model`` (a HookedModel).
                The width checked is the site's last axis (``d_mlp`` for MLP hidden sites).

        Raises:
            InputError: no such folder; the probe is for another model or width (names both and the fix).
            CorruptFileError: unreadable JSON or safetensors, missing or unknown keys, tensors of the wrong shape.
        """
        folder = Path(folder)
        if not (folder / CFG).is_file():
            raise InputError(f"{folder} holds no probe: expected {CFG} beside {WEIGHTS} (written by Probe.save).")
        try:
            cfg = json.loads((folder / CFG).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CorruptFileError(f"{folder / CFG} is not valid JSON ({e}); re-save the probe.") from e
        keys = {"architecture", "format_version", "method", "site", "aggregation", "model_name", "d_model", "bias", "info"}
        if not isinstance(cfg, dict) or set(cfg) != keys or cfg["architecture"] != "linear_probe":
            got = sorted(cfg) if isinstance(cfg, dict) else type(cfg).__name__
            raise CorruptFileError(f"{folder / CFG} is not a linear-probe cfg: expected keys {sorted(keys)} with "
                                   f"architecture 'linear_probe', got {got}.")
        if cfg["format_version"] != FORMAT_VERSION:
            raise CorruptFileError(f"{folder / CFG} has format_version {cfg['format_version']}; this mechscope reads "
                                   f"{FORMAT_VERSION}. Upgrade mechscope or refit the probe.")
        tensors = load_safetensors(folder / WEIGHTS, "probe weights")
        d = cfg["d_model"]
        if set(tensors) != {"direction", "mean", "scale"} or any(tuple(v.shape) != (d,) for v in tensors.values()):
            raise CorruptFileError(f"{folder / WEIGHTS} must hold direction, mean and scale of shape [{d}], got "
                                   f"{ {k: tuple(v.shape) for k, v in tensors.items()} }.")
        if model is not None:
            _check_model(cfg, model, folder)
        try:
            return cls(tensors["direction"], cfg["bias"], tensors["mean"], tensors["scale"], cfg["method"],
                       cfg["site"], cfg["aggregation"], cfg["model_name"], d, cfg["info"])
        except InputError as e:
            raise CorruptFileError(f"{folder} holds an invalid probe: {e}") from e


def _check_model(cfg: dict, model, folder: Path) -> None:
    name = model if isinstance(model, str) else getattr(getattr(model, "cfg", None), "name", None)
    if name is not None and cfg["model_name"] is not None and name != cfg["model_name"]:
        raise InputError(f"the probe in {folder} was fitted on {cfg['model_name']!r} activations, not {name!r}: its "
                         f"direction means nothing for another model. Load it with {cfg['model_name']!r}, or refit "
                         f"it on {name!r} activations at {cfg['site']}.")
    mcfg = getattr(model, "cfg", None)
    if mcfg is None or cfg["site"] is None:
        return
    last = parse(cfg["site"])[0]
    axis = "d_mlp" if ".mlp.hook_" in last else "d_model"
    width = getattr(mcfg, axis, None)
    if last.endswith(("attn.hook_z", "attn.hook_q")):
        width = mcfg.n_heads * mcfg.d_head
    if width is not None and width != cfg["d_model"]:
        raise InputError(f"the probe in {folder} reads {cfg['d_model']} features at {cfg['site']} but {name!r} has "
                         f"{width} there ({axis}); it was fitted for another model width. Refit it on this model.")


# -- fitting --------------------------------------------------------------------------------------
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
