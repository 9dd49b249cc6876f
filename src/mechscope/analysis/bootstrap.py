"""Bootstrap confidence intervals over prompts.

A measurement averaged over prompts (a logit difference, a patching effect, a circuit's faithfulness)
varies with the prompts drawn. :func:`bootstrap_ci` resamples the prompts with replacement, recomputes
the statistic on each resample and reports the percentile interval, for one number or for a whole map of
cells at once (every cell resampled with the same prompts), and for ratios whose numerator and
denominator must be resampled together.

Percentile intervals: the interval is the alpha/2 and 1 - alpha/2 quantiles of the resampled statistic
(linear interpolation, as ``numpy.percentile``'s default). They are simple and transformation-respecting,
and run slightly narrow at small n: a nominal 95% interval of the mean of 50 normal values covered the true
mean in 93% of 200 repetitions (``tests/unit/test_bootstrap.py``). BCa intervals are not implemented.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor

from mechscope.core.errors import InputError, ShapeError

#: Elements of resampled data held at once; resamples are processed in chunks below this.
CHUNK_ELEMENTS = 2**24


@dataclass(frozen=True)
class CI:
    """A bootstrap confidence interval (of one number, or of each cell of a map).

    Attributes:
        estimate: the statistic on the original prompts (float, or a float64 CPU tensor of the cells' shape).
        low / high: the interval's ends, same type and shape as ``estimate``.
        n: number of prompts.
        n_boot: number of resamples.
        alpha: 1 - confidence level (0.05: a 95% interval).
        method: "percentile".
    """

    estimate: float | Tensor
    low: float | Tensor
    high: float | Tensor
    n: int
    n_boot: int
    alpha: float
    method: str = "percentile"

    @property
    def width(self) -> float | Tensor:
        """high - low, in the statistic's units."""
        return self.high - self.low

    def to_dict(self) -> dict:
        """JSON-ready: floats, or nested lists for a map."""
        def plain(x):
            return x.tolist() if isinstance(x, Tensor) else x

        return {"estimate": plain(self.estimate), "low": plain(self.low), "high": plain(self.high),
                "width": plain(self.width), "n": self.n, "n_boot": self.n_boot, "alpha": self.alpha,
                "method": self.method}

    def warn_if_wide(self, threshold: float = 0.1, what: str = "the estimate") -> CI:
        """Warn when the interval (any cell's, for a map) is wider than ``threshold``; returns ``self``.

        Args:
            threshold: the widest acceptable interval, in the statistic's units.
            what: the quantity's name, for the message (e.g. "normalised faithfulness").

        Warns:
            UserWarning: naming the quantity, the width (the widest and how many cells, for a map), the
                number of prompts and the fix.
        """
        width = torch.as_tensor(self.width, dtype=torch.float64)
        wide = (width > threshold) | width.isnan()
        if bool(wide.any()):
            level = f"{1 - self.alpha:.0%}"
            if width.dim() == 0:
                where = f"its {level} interval [{float(self.low):.4g}, {float(self.high):.4g}] is {float(width):.3g} wide"
            else:
                where = (f"{int(wide.sum())} of {wide.numel()} cells have {level} intervals wider than {threshold:g} "
                         f"(widest {float(width.nan_to_num(math.inf).max()):.3g})")
            warnings.warn(
                f"{what} is uncertain: {where}, more than {threshold:g}, over {self.n} prompts ({self.n_boot} "
                "bootstrap resamples). Use more prompts (the width shrinks about as 1/sqrt(n)) before reading "
                "differences smaller than the width.", UserWarning, stacklevel=2)
        return self


def bootstrap_indices(n: int, n_boot: int, seed: int = 0) -> Int[Tensor, "n_boot n"]:
    """The resamples :func:`bootstrap_ci` draws: ``n_boot`` rows of ``n`` prompt indices with replacement.

    Returns:
        int64 [n_boot, n] on the CPU, the same for the same (n, n_boot, seed).
    """
    g = torch.Generator().manual_seed(seed)
    return torch.randint(n, (n_boot, n), generator=g)


def _as_tensor(x, i: int) -> Tensor:
    try:
        t = x if isinstance(x, Tensor) else torch.as_tensor(np.asarray(x, dtype=np.float64))
    except (TypeError, ValueError) as e:
        raise InputError(f"values[{i}] is not numbers ({e}); give per-prompt numbers, [n] or [n, ...].") from None
    if t.dim() == 0:
        raise ShapeError(f"values[{i}] is a scalar; give per-prompt values, [n] or [n, ...].")
    if t.is_complex():
        raise InputError(f"values[{i}] is complex; give real per-prompt numbers.")
    return t.detach().to("cpu", torch.float64)


def _mean(*arrays: Tensor) -> Tensor:
    if len(arrays) != 1:
        raise InputError(
            f"the default statistic (the mean over prompts) takes one array, got {len(arrays)}; pass statistic= "
            "to combine several, e.g. statistic=lambda a, b: a.mean(1) / b.mean(1).")
    return arrays[0].mean(1)


def _quantiles(boot: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    """The alpha/2 and 1 - alpha/2 quantiles over axis 0 (linear interpolation), NaN resamples left out."""
    q = torch.tensor([alpha / 2, 1 - alpha / 2], dtype=torch.float64)
    flat = boot.reshape(boot.shape[0], -1)
    flat = torch.where(flat.isfinite(), flat, torch.nan)
    step = max(1, CHUNK_ELEMENTS // max(1, flat.shape[0]))
    out = torch.cat([torch.nanquantile(flat[:, j:j + step], q, dim=0) for j in range(0, flat.shape[1], step)], dim=1)
    return out[0].reshape(boot.shape[1:]), out[1].reshape(boot.shape[1:])


def bootstrap_ci(
    values,
    *,
    statistic: Callable[..., Tensor] | None = None,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> CI:
    """Percentile bootstrap confidence interval of a statistic over prompts.

    Args:
        values: per-prompt values, prompts on axis 0: an array or tensor [n] or [n, ...] (many cells at
            once, all resampled with the same prompts), or a tuple of such arrays with the same n,
            resampled together (for ratios).
        statistic: ``statistic(*arrays) -> Tensor``, called on a batch of resamples: each array arrives
            as float64 [B, n, ...] (B resamples; prompts on axis 1) and the result must be [B] or
            [B, ...]. The estimate is the statistic on the original prompts (B = 1). Default: the mean
            over prompts (one array). A ratio such as normalised faithfulness
            (mean(m_C) - mean(m_0)) / (mean(m_M) - mean(m_0)) is
            ``bootstrap_ci((m_C, m_0, m_M), statistic=lambda c, z, m: (c.mean(1) - z.mean(1)) / (m.mean(1) - z.mean(1)))``.
        n_boot: number of resamples (>= 10).
        alpha: 1 - confidence level, in (0, 1).
        seed: seed of the resampling (:func:`bootstrap_indices`); the result is deterministic given it.

    Returns:
        CI: floats for a scalar statistic, float64 CPU tensors of the cells' shape otherwise. Resamples
        where the statistic is not finite (a zero denominator) are left out of the quantiles.

    Raises:
        InputError: fewer than 2 prompts; n_boot < 10; alpha outside (0, 1); non-numeric values; several
            arrays without a statistic.
        ShapeError: arrays with different numbers of prompts; a statistic whose result does not have the
            resamples on axis 0.

    References:
        Efron & Tibshirani 1993, "An Introduction to the Bootstrap", chapters 6 (bootstrap estimate of a
        statistic's distribution) and 13 (percentile intervals).
    """
    arrays = tuple(_as_tensor(v, i) for i, v in enumerate(values if isinstance(values, tuple) else (values,)))
    n = arrays[0].shape[0]
    if any(a.shape[0] != n for a in arrays):
        raise ShapeError(f"the arrays have different numbers of prompts {[a.shape[0] for a in arrays]}; resampled "
                         "together, they need one value per prompt each.")
    if n < 2:
        raise InputError(f"a bootstrap needs at least 2 prompts, got {n}.")
    if n_boot < 10:
        raise InputError(f"n_boot must be >= 10 resamples (1000 is usual), got {n_boot}.")
    if not 0 < alpha < 1:
        raise InputError(f"alpha must lie in (0, 1) (0.05 for a 95% interval), got {alpha}.")
    stat = statistic or _mean

    def run(idx: Tensor) -> Tensor:
        out = torch.as_tensor(stat(*(a[idx] for a in arrays)), dtype=torch.float64)
        if out.dim() == 0 or out.shape[0] != idx.shape[0]:
            raise ShapeError(
                f"the statistic returned shape {tuple(out.shape)} for {idx.shape[0]} resamples; it gets arrays "
                "[B, n, ...] and must reduce axis 1 (the prompts), returning [B] or [B, ...].")
        return out

    estimate = run(torch.arange(n)[None])[0]
    per_resample = max(1, sum(a[0].numel() for a in arrays) * n)
    step = max(1, CHUNK_ELEMENTS // per_resample)
    idx = bootstrap_indices(n, n_boot, seed)
    boot = torch.cat([run(idx[i:i + step]) for i in range(0, n_boot, step)])
    low, high = _quantiles(boot, alpha)
    if estimate.dim() == 0:
        return CI(float(estimate), float(low), float(high), n, n_boot, alpha)
    return CI(estimate, low, high, n, n_boot, alpha)


__all__ = ["CI", "bootstrap_ci", "bootstrap_indices"]
