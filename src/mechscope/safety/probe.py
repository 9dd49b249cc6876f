"""A linear probe: its scoring and its on-disk format (the fitting methods are in :mod:`mechscope.safety.probes`).

A probe reads one vector per example (``X`` [n, d]: a site's activations aggregated over an example's
tokens, or one token's) and gives a logit, higher for the positive class (e.g. "deceptive"):

    score(x) = ((x - mean) / scale) @ direction + bias

``mean``/``scale`` standardise the features (logistic regression and CCS) or are the identity (0 and 1).

Files: a folder with ``cfg.json`` (``architecture: "linear_probe"``) beside ``probe.safetensors``
(``direction``, ``mean``, ``scale``), written whole or not at all; no pickle.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
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

#: The probe families :func:`mechscope.safety.probes.fit_probe` dispatches to.
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


__all__ = ["AGGREGATIONS", "CFG", "FORMAT_VERSION", "METHODS", "WEIGHTS", "Probe", "as_acts", "as_labels"]
