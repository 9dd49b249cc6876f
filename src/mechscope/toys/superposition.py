"""Toy Models of Superposition (Elhage et al. 2022), reproduced: the ReLU-output toy model, the sparsity
sweep with n = 20 features in m = 5 dimensions, and the phase diagram of 2 features in 1 dimension.

Model: ``h = W x``, ``x' = ReLU(W^T h + b)``; loss ``mean_batch sum_i I_i (x_i - x'_i)^2``; data: each feature
is 0 with probability S (the sparsity), else uniform on [0, 1]. Many models ("instances") train at once as
one batched tensor, each with its own sparsity and importance vector.

Weights keep the paper's orientation, ``W [m, n]`` with column ``W_i`` the direction of feature i (not
mechscope's usual ``x @ W``), so every formula reads as in the paper. Axes: instances, batch, n (features),
m (hidden dimensions).

References:
    Elhage et al. 2022, "Toy Models of Superposition", https://transformer-circuits.pub/2022/toy_model/index.html
    (sections "Demonstrating Superposition", "Superposition as a Phase Change", "Feature Dimensionality").
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from mechscope.core.errors import InputError
from mechscope.toys.common import figure, finish, seed_everything

PAPER = {"cite": "Elhage et al. 2022, Toy Models of Superposition (Transformer Circuits Thread)",
         "url": "https://transformer-circuits.pub/2022/toy_model/index.html"}
#: Outcomes of the 2-features-in-1-dimension model, indexed by :func:`classify_pair`'s codes.
PAIR_CLASSES = ("none", "only feature 1", "only feature 2", "superposition (antipodal)", "both, same sign")
_PAIR_COLOURS = ("#d9d9d9", "#4c78a8", "#f58518", "#54a24b", "#e45756")


@dataclass(frozen=True)
class SuperpositionConfig:
    """The whole reproduction. The defaults take the paper's n, m, importances, sparsities and batch; steps and
    learning rate are chosen to converge in a few minutes on one CPU thread (the paper: 10,000 steps at 1e-3).

    Attributes:
        seed: seeds initialisation and data (a ``torch.Generator``); the same seed gives the same numbers.
        n, m: features and hidden dimensions of the sparsity sweep (paper: 20 and 5); ``m < n``.
        decay: feature importance ``I_i = decay**i`` (paper: 0.7).
        sparsities: probabilities S that a feature is zero, one model per value, each in [0, 1).
        replicas: models trained per sparsity from different initialisations; the one with the lowest
            held-out loss is analysed (toy training can stop in local minima).
        steps, batch, lr: Adam steps, examples per step, peak learning rate of the sweep.
        warmup_steps: linear warm-up steps, then cosine decay to 0 (both phases of the run).
        eval_batch: held-out examples that pick the best replica.
        norm_threshold: feature i is "represented" when ``||W_i||`` exceeds it (paper: 0.5).
        interference_threshold: a represented feature is "in superposition" when
            ``sum_{j != i} (W^_i . W_j)^2`` exceeds it.
        phase_importance_points, phase_importance_range: relative importance r of feature 2 (feature 1
            has importance 1), log-spaced over the closed range.
        phase_density_points, phase_density_range: common feature density 1 - S, log-spaced.
        phase_replicas, phase_steps, phase_batch, phase_lr: training of the 2-in-1 models (per cell).
        warm_start_check: at the largest sparsity, also train ``replicas`` models first with equal
            importances (every feature represented), then with the real ones, and compare their loss with
            the sweep's model: says whether unrepresented features are the loss's choice (``2 * steps`` more
            steps of ``replicas`` models).
    """

    seed: int = 0
    n: int = 20
    m: int = 5
    decay: float = 0.7
    sparsities: tuple[float, ...] = (0.0, 0.7, 0.9, 0.97, 0.99, 0.997, 0.999)
    replicas: int = 4
    steps: int = 6_000
    batch: int = 1024
    lr: float = 3e-3
    warmup_steps: int = 200
    eval_batch: int = 32_768
    norm_threshold: float = 0.5
    interference_threshold: float = 0.05
    phase_importance_points: int = 9
    phase_importance_range: tuple[float, float] = (0.1, 10.0)
    phase_density_points: int = 9
    phase_density_range: tuple[float, float] = (0.01, 1.0)
    phase_replicas: int = 4
    phase_steps: int = 3_000
    phase_batch: int = 1024
    phase_lr: float = 3e-3
    warm_start_check: bool = True

    def __post_init__(self):
        for f in ("n", "m", "replicas", "steps", "batch", "eval_batch", "phase_importance_points",
                  "phase_density_points", "phase_replicas", "phase_steps", "phase_batch"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise InputError(f"SuperpositionConfig.{f} must be a positive int, got {v!r}.")
        if self.m >= self.n:
            raise InputError(f"SuperpositionConfig needs fewer hidden dimensions than features (m < n) for "
                             f"superposition to be possible, got m={self.m}, n={self.n}: lower m or raise n.")
        if not 0 <= self.warmup_steps < min(self.steps, self.phase_steps):
            raise InputError(f"SuperpositionConfig.warmup_steps must be >= 0 and below both steps ({self.steps}) "
                             f"and phase_steps ({self.phase_steps}), got {self.warmup_steps}: lower it.")
        if not self.sparsities or any(not 0 <= s < 1 for s in self.sparsities):
            raise InputError(f"SuperpositionConfig.sparsities must be a non-empty tuple of values in [0, 1) "
                             f"(S = 1 means a feature is never active), got {self.sparsities!r}.")
        for f in ("decay", "lr", "phase_lr", "norm_threshold", "interference_threshold"):
            if not getattr(self, f) > 0:
                raise InputError(f"SuperpositionConfig.{f} must be > 0, got {getattr(self, f)!r}.")
        (r0, r1), (d0, d1) = self.phase_importance_range, self.phase_density_range
        if not 0 < r0 <= r1:
            raise InputError(f"phase_importance_range must be (low, high) with 0 < low <= high, got {(r0, r1)}.")
        if not 0 < d0 <= d1 <= 1:
            raise InputError(f"phase_density_range must be (low, high) with 0 < low <= high <= 1 (density is "
                             f"1 - S), got {(d0, d1)}.")


# -- the model ---------------------------------------------------------------------------------------------
def importance(n: int, decay: float) -> Float[Tensor, "n"]:
    """Feature importance ``I_i = decay**i``, i = 0..n-1 (dimensionless; paper: decay 0.7)."""
    return decay ** torch.arange(n, dtype=torch.float32)


def sample_features(sparsity: Float[Tensor, "instances"], batch: int, n: int, generator: torch.Generator, *,
                    shared: bool = False) -> Float[Tensor, "instances batch n"]:
    """Synthetic data: each feature independently 0 with probability ``sparsity`` (per instance), else
    uniform on [0, 1] (dimensionless).

    One uniform draw ``u`` per entry serves both: the feature is active when ``u >= S``, and then
    ``(u - S) / (1 - S)`` is uniform on [0, 1] (half the random numbers of two draws, same distribution).
    ``shared``: one ``u [batch, n]`` for all instances, so instances with equal sparsity see equal data."""
    u = torch.rand(1 if shared else sparsity.shape[0], batch, n, generator=generator)
    S = sparsity[:, None, None]
    return torch.relu(u - S) / (1 - S)


def forward(W: Float[Tensor, "instances m n"], b: Float[Tensor, "instances n"],
            x: Float[Tensor, "instances batch n"]) -> Float[Tensor, "instances batch n"]:
    """The ReLU-output model ``x' = ReLU(W^T W x + b)``, each instance with its own ``W`` and ``b``."""
    h = x @ W.transpose(-1, -2)  # [instances, batch, m]: h = W x
    return torch.relu(h @ W + b[:, None, :])


def toy_loss(x: Float[Tensor, "instances batch n"], x_hat: Float[Tensor, "instances batch n"],
             imp: Float[Tensor, "instances n"]) -> Float[Tensor, "instances"]:
    """Importance-weighted squared error ``mean_batch sum_i I_i (x_i - x'_i)^2``, one value per instance."""
    return ((x - x_hat) ** 2 * imp[:, None, :]).sum(-1).mean(-1)


@dataclass(frozen=True)
class TrainedToys:
    """Trained instances: ``W [instances, m, n]``, ``b [instances, n]``, held-out loss ``[instances]``."""

    W: Tensor
    b: Tensor
    eval_loss: Tensor


def xavier_init(instances: int, m: int, n: int, generator: torch.Generator) -> Float[Tensor, "instances m n"]:
    """Xavier-normal ``W [m, n]`` per instance: standard deviation ``sqrt(2 / (m + n))``."""
    return torch.randn(instances, m, n, generator=generator) * math.sqrt(2.0 / (m + n))


def train_toys(sparsity: Float[Tensor, "instances"], imp: Float[Tensor, "instances n"], m: int, *, steps: int,
               batch: int, lr: float, warmup_steps: int, eval_batch: int, generator: torch.Generator,
               W_init: Float[Tensor, "instances m n"] | None = None,
               b_init: Float[Tensor, "instances n"] | None = None, progress: bool = False,
               desc: str = "toy models") -> TrainedToys:
    """Train one toy model per instance, then measure its loss on held-out data.

    Adam (linear warm-up over ``warmup_steps``, then cosine decay to 0) from ``W_init`` (default
    :func:`xavier_init`) and ``b_init`` (default 0); the loss summed over instances, so each instance follows its own
    gradient. The held-out loss uses ``eval_batch`` fresh examples shared by all instances of equal
    sparsity, so replicas compare fairly. Deterministic given ``generator``'s state.

    Args:
        sparsity: S per instance, in [0, 1). imp: feature importance per instance. m: hidden dimensions.
        steps, batch, lr: optimiser steps, examples per step, peak learning rate.

    Returns:
        ``TrainedToys``: ``W [instances, m, n]``, ``b [instances, n]``, ``eval_loss [instances]`` (the
        :func:`toy_loss`, importance-weighted squared error per example).
    """
    from tqdm.auto import tqdm

    inst, n = imp.shape
    W = (xavier_init(inst, m, n, generator) if W_init is None else W_init.clone()).requires_grad_()
    b = (torch.zeros(inst, n) if b_init is None else b_init.clone()).requires_grad_()
    opt = torch.optim.Adam([W, b], lr=lr)

    def schedule(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / (steps - warmup_steps)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    for _ in tqdm(range(steps), desc=desc, disable=not progress, mininterval=1.0):
        x = sample_features(sparsity, batch, n, generator)
        loss = toy_loss(x, forward(W, b, x), imp).sum()  # sum: each instance gets its own loss's gradient
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    W, b = W.detach(), b.detach()
    return TrainedToys(W, b, held_out_loss(W, b, sparsity, imp, eval_batch, generator))


@torch.no_grad()
def held_out_loss(W: Float[Tensor, "instances m n"], b: Float[Tensor, "instances n"],
                  sparsity: Float[Tensor, "instances"], imp: Float[Tensor, "instances n"], eval_batch: int,
                  generator: torch.Generator) -> Float[Tensor, "instances"]:
    """:func:`toy_loss` of each instance on ``eval_batch`` fresh examples, drawn in chunks of 4,096 and
    shared by all instances of equal sparsity (``sample_features(shared=True)``)."""
    total, chunk = torch.zeros(W.shape[0]), 4096
    for start in range(0, eval_batch, chunk):
        x = sample_features(sparsity, min(chunk, eval_batch - start), W.shape[-1], generator, shared=True)
        total += toy_loss(x, forward(W, b, x), imp) * x.shape[1]
    return total / eval_batch


# -- analyses ----------------------------------------------------------------------------------------------
def feature_norms(W: Float[Tensor, "*inst m n"]) -> Float[Tensor, "*inst n"]:
    """``||W_i||``, the length of feature i's direction (column i of W); ~1 for a feature fully represented,
    ~0 for one the model ignores (paper, "Demonstrating Superposition")."""
    return W.norm(dim=-2)


def represented(W: Float[Tensor, "*inst m n"], threshold: float = 0.5) -> Bool[Tensor, "*inst n"]:
    """Feature i is represented when ``||W_i|| > threshold`` (the paper's bar charts use 0.5)."""
    return feature_norms(W) > threshold


def _overlaps(W: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """``(||W_i||, O)`` with ``O[..., i, j] = W^_i . W_j``; a zero column has ``W^_i = 0``."""
    norms = feature_norms(W)
    unit = W / norms.clamp_min(eps)[..., None, :] * (norms > eps)[..., None, :]
    return norms, unit.transpose(-1, -2) @ W


def interference(W: Float[Tensor, "*inst m n"], eps: float = 1e-8) -> Float[Tensor, "*inst n"]:
    """Superposition of feature i, ``sum_{j != i} (W^_i . W_j)^2`` with ``W^_i = W_i / ||W_i||``: how much
    of the other features leaks onto i's direction (dimensionless; 0 when i is orthogonal to every other
    feature; 0 for an unrepresented, zero column). The paper colours its ``||W_i||`` bars by this quantity
    ("Demonstrating Superposition")."""
    _, overlap = _overlaps(W, eps)
    return (overlap ** 2).sum(-1) - torch.diagonal(overlap, dim1=-2, dim2=-1) ** 2


def in_superposition(W: Float[Tensor, "*inst m n"], norm_threshold: float = 0.5,
                     interference_threshold: float = 0.05) -> Bool[Tensor, "*inst n"]:
    """Represented features (``||W_i|| > norm_threshold``) whose :func:`interference` exceeds
    ``interference_threshold``: they share their direction with other features."""
    return represented(W, norm_threshold) & (interference(W) > interference_threshold)


def dimensionality(W: Float[Tensor, "*inst m n"], eps: float = 1e-8) -> Float[Tensor, "*inst n"]:
    """Feature dimensionality ``D_i = ||W_i||^2 / sum_j (W^_i . W_j)^2`` (j over all features, i included):
    the fraction of a dimension feature i owns (dimensions; 1 for a feature orthogonal to all others, 1/2
    for each of an antipodal pair, 0 for a zero column). Paper section "Feature Dimensionality"."""
    norms, overlap = _overlaps(W, eps)
    den = (overlap ** 2).sum(-1)
    return torch.where(norms > eps, norms ** 2 / den.clamp_min(eps ** 2), torch.zeros_like(norms))


def gram(W: Float[Tensor, "*inst m n"]) -> Float[Tensor, "*inst n n"]:
    """``W^T W [n, n]``: entry (i, j) is ``W_i . W_j``; the diagonal is ``||W_i||^2`` and off-diagonal
    entries show which features share directions (the paper's heatmaps)."""
    return W.transpose(-1, -2) @ W


def classify_pair(W: Float[Tensor, "*inst m 2"], threshold: float = 0.5) -> Int[Tensor, "*inst"]:
    """Outcome of a 2-feature model, as an index into :data:`PAIR_CLASSES`: 0 none represented, 1 only
    feature 1, 2 only feature 2, 3 both in antipodal superposition (``W_1 . W_2 < 0``; opposite signs in
    one dimension), 4 both with ``W_1 . W_2 >= 0`` (not a solution the paper reports). Paper section
    "Superposition as a Phase Change"."""
    rep = represented(W, threshold)
    both = torch.where((W[..., 0] * W[..., 1]).sum(-1) < 0, 3, 4)
    return torch.where(rep[..., 0] & rep[..., 1], both, rep[..., 0].long() + 2 * rep[..., 1].long())


# -- the reproduction --------------------------------------------------------------------------------------
def _best(trained: TrainedToys, groups: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Group consecutive instances into ``groups`` settings; keep each one's lowest-loss replica:
    ``(W, b, its loss, all losses [groups, replicas])``."""
    losses = trained.eval_loss.view(groups, -1)
    pick = losses.argmin(-1) + torch.arange(groups) * losses.shape[1]
    return trained.W[pick], trained.b[pick], losses.min(-1).values, losses


def _sweep(cfg: SuperpositionConfig, g: torch.Generator, progress: bool) -> dict:
    S = torch.tensor(cfg.sparsities).repeat_interleave(cfg.replicas)
    imp = importance(cfg.n, cfg.decay).expand(len(S), cfg.n)
    trained = train_toys(S, imp, cfg.m, steps=cfg.steps, batch=cfg.batch, lr=cfg.lr, warmup_steps=cfg.warmup_steps,
                         eval_batch=cfg.eval_batch, generator=g, progress=progress, desc="superposition sweep")
    W, b, loss, losses = _best(trained, len(cfg.sparsities))
    rep, sup = represented(W, cfg.norm_threshold), in_superposition(W, cfg.norm_threshold, cfg.interference_threshold)
    rows = [{"sparsity": s, "density": 1 - s, "represented": int(rep[k].sum()), "in_superposition": int(sup[k].sum()),
             "norms": feature_norms(W[k]), "interference": interference(W[k]), "dimensionality": dimensionality(W[k]),
             "dims_per_feature": cfg.m / float((W[k] ** 2).sum()), "eval_loss": float(loss[k]),
             "replica_losses": losses[k]} for k, s in enumerate(cfg.sparsities)]
    return {"rows": rows, "gram": gram(W), "W": W, "b": b}


def _warm_start(cfg: SuperpositionConfig, sweep: dict, g: torch.Generator, progress: bool) -> dict:
    """Is the sparsest model's count of represented features the loss's choice or a training failure?
    Train with equal importances (every feature gets a direction), continue with the real ones, and compare
    held-out losses with the sweep's model on the same examples."""
    k, s = cfg.replicas, max(cfg.sparsities)
    S, imp = torch.full((k,), s), importance(cfg.n, cfg.decay).expand(k, cfg.n)
    kw = dict(steps=cfg.steps, batch=cfg.batch, lr=cfg.lr, warmup_steps=cfg.warmup_steps, eval_batch=cfg.eval_batch,
              generator=g, progress=progress)
    pre = train_toys(S, torch.ones(k, cfg.n), cfg.m, desc="warm start: equal importance", **kw)
    post = train_toys(S, imp, cfg.m, W_init=pre.W, b_init=pre.b, desc=f"warm start: {cfg.decay}^i", **kw)
    i = cfg.sparsities.index(s)
    W, b = torch.cat([post.W, sweep["W"][i:i + 1]]), torch.cat([post.b, sweep["b"][i:i + 1]])
    loss = held_out_loss(W, b, torch.full((k + 1,), s), imp[:1].expand(k + 1, cfg.n), cfg.eval_batch * 4, g)
    best = int(loss[:k].argmin())
    return {"sparsity": s, "represented_before": represented(pre.W, cfg.norm_threshold).sum(-1).tolist(),
            "represented_after": int(represented(W[best], cfg.norm_threshold).sum()), "loss": float(loss[best]),
            "sweep_loss": float(loss[k]), "sweep_represented": int(represented(W[k], cfg.norm_threshold).sum())}


def _phase(cfg: SuperpositionConfig, g: torch.Generator, progress: bool) -> dict:
    r = torch.logspace(*map(math.log10, cfg.phase_importance_range), cfg.phase_importance_points)
    dens = torch.logspace(*map(math.log10, cfg.phase_density_range[::-1]), cfg.phase_density_points)  # dense first
    nd, nr, k = len(dens), len(r), cfg.phase_replicas
    S = (1 - dens).repeat_interleave(nr * k)
    imp = torch.stack([torch.ones(nr), r], -1).repeat_interleave(k, 0).repeat(nd, 1)
    # In one dimension the initial signs pick the basin: same signs rarely reach the antipodal pair. Half
    # the replicas start with opposite signs, half with equal signs, so the best of them finds either.
    W0 = xavier_init(len(S), 1, 2, g)
    flip = torch.tensor([1.0, -1.0]).repeat((k + 1) // 2)[:k].repeat(nd * nr)
    W0[..., 1] = W0[..., 1].abs() * W0[..., 0].sign() * flip[:, None]
    trained = train_toys(S, imp, 1, steps=cfg.phase_steps, batch=cfg.phase_batch, lr=cfg.phase_lr,
                         warmup_steps=cfg.warmup_steps, eval_batch=cfg.eval_batch, generator=g, W_init=W0,
                         progress=progress, desc="2-in-1 phase diagram")
    W, _, _, _ = _best(trained, nd * nr)
    classes = classify_pair(W, cfg.norm_threshold).view(nd, nr)
    return {"relative_importance": r, "density": dens, "classes": classes, "W": W[:, 0, :].view(nd, nr, 2),
            "class_names": list(PAIR_CLASSES)}


def _grid_layout(k: int, gap: float = 0.02, **axis) -> dict:
    """Layout of ``k`` side-by-side panels: axes x, x2, ... over equal horizontal domains."""
    layout = {}
    for i in range(k):
        s = "" if i == 0 else str(i + 1)
        layout[f"xaxis{s}"] = {"domain": [i / k + gap, (i + 1) / k - gap], "anchor": f"y{s}", **axis.get("x", {})}
        layout[f"yaxis{s}"] = {"anchor": f"x{s}", "showticklabels": i == 0, **axis.get("y", {})}
    return layout


def _titles(labels: list[str]) -> list[dict]:
    k = len(labels)
    return [{"text": t, "x": (i + 0.5) / k, "y": 1.0, "xref": "paper", "yref": "paper", "showarrow": False,
             "yanchor": "bottom"} for i, t in enumerate(labels)]


def _figures(cfg: SuperpositionConfig, sweep: dict, phase: dict) -> list[dict]:
    rows, k = sweep["rows"], len(sweep["rows"])
    labels = [f"1-S = {1 - r['sparsity']:.3g}" for r in rows]
    ax = lambda i: "" if i == 0 else str(i + 1)  # noqa: E731
    heat = [{"type": "heatmap", "z": sweep["gram"][i], "xaxis": f"x{ax(i)}", "yaxis": f"y{ax(i)}",
             "coloraxis": "coloraxis", "hovertemplate": "W_%{y} . W_%{x} = %{z:.3f}<extra></extra>"}
            for i in range(k)]
    figs = [figure("gram", "W^T W across sparsity", heat, {
        **_grid_layout(k, y={"autorange": "reversed"}), "height": 300, "annotations": _titles(labels),
        "coloraxis": {"colorscale": "RdBu", "cmin": -1, "cmax": 1, "colorbar": {"title": {"text": "W_i . W_j"}}}},
        caption=f"n = {cfg.n} features in m = {cfg.m} dimensions, importance {cfg.decay}^i. Dense data: the m "
                "most important features take orthogonal directions (identity block); sparser data: more "
                "features share directions (off-diagonal entries).")]
    bars = [{"type": "bar", "orientation": "h", "x": r["norms"], "y": list(range(cfg.n)), "xaxis": f"x{ax(i)}",
             "yaxis": f"y{ax(i)}", "marker": {"color": [min(v, 1.0) for v in r["interference"].tolist()],
                                              "coloraxis": "coloraxis"}, "customdata": r["interference"],
             "hovertemplate": "feature %{y}: ||W_i|| = %{x:.3f}, interference %{customdata:.3f}<extra></extra>"}
            for i, r in enumerate(rows)]
    figs.append(figure("norms", "Feature norms ||W_i||, coloured by interference", bars, {
        **_grid_layout(k, x={"range": [0, 1.3]}, y={"autorange": "reversed", "title": {"text": "feature i"}}),
        "height": 360, "showlegend": False, "annotations": _titles(labels),
        "coloraxis": {"colorscale": "Viridis", "cmin": 0, "cmax": 1,
                      "colorbar": {"title": {"text": "sum_j≠i (Ŵ_i·W_j)^2"}}}},
        caption=f"A feature is represented when ||W_i|| > {cfg.norm_threshold} and in superposition when its "
                f"interference exceeds {cfg.interference_threshold} (dark: alone in its direction)."))
    reps = [r["norms"] > cfg.norm_threshold for r in rows]
    pts = [{"type": "scatter", "mode": "markers", "name": labels[i], "x": [1 / (1 - r["sparsity"])] * int(rep.sum()),
            "y": r["dimensionality"][rep], "customdata": torch.nonzero(rep).flatten(),
            "hovertemplate": "feature %{customdata}: D = %{y:.3f}<extra></extra>"}
           for i, (r, rep) in enumerate(zip(rows, reps))]
    pts.append({"type": "scatter", "mode": "lines+markers", "name": "m / ||W||_F^2 (dimensions per feature)",
                "x": [1 / (1 - r["sparsity"]) for r in rows], "y": [r["dims_per_feature"] for r in rows],
                "line": {"color": "#333333", "dash": "dot"}})
    figs.append(figure("dimensionality", "Feature dimensionality vs 1/(1-S)", pts, {
        "xaxis": {"type": "log", "title": {"text": "1 / (1 - S)"}},
        "yaxis": {"title": {"text": "D_i (represented features)"}, "range": [0, 1.1]}, "height": 380},
        caption="D_i = ||W_i||^2 / sum_j (Ŵ_i·W_j)^2: 1 for a feature with a dimension of its own, 1/2 for an "
                "antipodal pair, 2/5 for a pentagon. The dotted line is the average, m / ||W||_F^2."))
    nc = len(PAIR_CLASSES)
    scale = [[c / nc + e / nc, _PAIR_COLOURS[c]] for c in range(nc) for e in (0, 1)]
    text = [[f"{PAIR_CLASSES[c]}<br>W = ({w[0]:.2f}, {w[1]:.2f})" for c, w in zip(cr, wr)]
            for cr, wr in zip(phase["classes"].tolist(), phase["W"].tolist())]
    figs.append(figure("phase", "2 features in 1 dimension: phase diagram", [{
        "type": "heatmap", "z": phase["classes"], "x": [f"{v:.3g}" for v in phase["relative_importance"].tolist()],
        "y": [f"{v:.3g}" for v in phase["density"].tolist()], "zmin": -0.5, "zmax": nc - 0.5, "colorscale": scale,
        "text": text, "hovertemplate": "r = %{x}, 1-S = %{y}<br>%{text}<extra></extra>",
        "colorbar": {"tickvals": list(range(nc)), "ticktext": list(PAIR_CLASSES)}}], {
        "xaxis": {"type": "category", "title": {"text": "relative importance r of feature 2"}},
        "yaxis": {"type": "category", "title": {"text": "feature density 1 - S"}}, "height": 420},
        caption=f"Best of {cfg.phase_replicas} models per cell. Legend: " + "; ".join(
            f"{c} = {name}" for c, name in zip(("grey", "blue", "orange", "green", "red"), PAIR_CLASSES)) +
        ". Paper: dense data gives the more important feature its own dimension; sparse data with comparable "
        "importance gives an antipodal pair."))
    return figs


def _compare(cfg: SuperpositionConfig, sweep: dict, phase: dict, warm: dict | None) -> tuple[list[dict], list[str]]:
    rows = {r["sparsity"]: r for r in sweep["rows"]}
    lo, hi = rows[min(rows)], rows[max(rows)]
    rep0 = lo["norms"] > cfg.norm_threshold
    dense, sparse = lo["sparsity"] == 0, hi["sparsity"] >= 0.999  # the paper's values hold at these ends only
    comps = [
        {"quantity": f"features represented at S={lo['sparsity']:g}", "paper": cfg.m if dense else None,
         "ours": lo["represented"], "note": "dense data: the m most important features, like PCA"},
        {"quantity": f"features in superposition at S={lo['sparsity']:g}", "paper": 0 if dense else None,
         "ours": lo["in_superposition"], "note": "represented features are orthogonal"},
        {"quantity": f"mean dimensionality D_i of represented features at S={lo['sparsity']:g}",
         "paper": 1.0 if dense else None, "ours": float(lo["dimensionality"][rep0].mean()) if rep0.any() else None,
         "note": "one dimension each"},
        {"quantity": f"features represented at S={hi['sparsity']:g}",
         "paper": f"more than m = {cfg.m}, rising with sparsity" if sparse else None,
         "ours": hi["represented"], "note": "very sparse data: most features get a direction (see the notes)"},
        {"quantity": f"features in superposition at S={hi['sparsity']:g}",
         "paper": "the represented ones beyond m share dimensions" if sparse else None,
         "ours": hi["in_superposition"], "note": f"sharing {cfg.m} dimensions"},
    ]
    cls, r, dens = phase["classes"], phase["relative_importance"], phase["density"]
    names = lambda cells: ", ".join(f"{PAIR_CLASSES[c]}: {int((cells == c).sum())}"  # noqa: E731
                                    for c in range(len(PAIR_CLASSES)) if (cells == c).any())
    mid = int(r.log().abs().argmin())
    comps += [
        {"quantity": f"2-in-1, densest row (1-S={dens[0]:.3g}), r < 1", "paper": "only feature 1",
         "ours": names(cls[0][r < 1]), "note": "the more important feature takes the dimension"},
        {"quantity": f"2-in-1, densest row (1-S={dens[0]:.3g}), r > 1", "paper": "only feature 2",
         "ours": names(cls[0][r > 1]), "note": "the more important feature takes the dimension"},
        {"quantity": f"2-in-1, sparsest row (1-S={dens[-1]:.3g}), r = {r[mid]:.3g}", "paper": PAIR_CLASSES[3],
         "ours": PAIR_CLASSES[int(cls[-1, mid])], "note": "comparable importance, sparse data"},
        {"quantity": "2-in-1 cells in superposition, per density (dense to sparse)",
         "paper": "none when dense, a band around r = 1 widening with sparsity",
         "ours": ", ".join(str(int((row == 3).sum())) for row in cls), "note": f"out of {len(r)} values of r"},
    ]
    notes = [f"Each model reported is the lowest held-out-loss of {cfg.replicas} (sweep) or {cfg.phase_replicas} "
             f"(phase diagram) trained from different initialisations: toy training can stop in local minima.",
             f"Adam with {cfg.warmup_steps} warm-up steps and cosine decay to 0 (the paper used a constant-rate "
             f"Adam); represented means ||W_i|| > {cfg.norm_threshold}, in superposition means interference > "
             f"{cfg.interference_threshold}."]
    if lo["sparsity"] == 0 and (lo["represented"] != cfg.m or lo["in_superposition"]):
        notes.append(f"At S=0 the model represents {lo['represented']} features ({lo['in_superposition']} in "
                     f"superposition); the paper's dense solution represents exactly m={cfg.m}, orthogonally.")
    if hi["represented"] < cfg.n:
        first = int(torch.nonzero(hi["norms"] <= cfg.norm_threshold)[0])
        notes.append(f"At S={hi['sparsity']:g} {cfg.n - hi['represented']} of {cfg.n} features stay unrepresented "
                     f"(||W_i|| <= {cfg.norm_threshold}), all among the less important features i >= {first} "
                     f"(importance {cfg.decay}^i <= {cfg.decay ** first:.2g}).")
    if warm is not None:
        ratio = warm["loss"] / warm["sweep_loss"]
        verdict = ("so keeping fewer features is the lower loss here, not a training failure" if ratio > 1.05 else
                   "so the sweep's training stopped in a worse minimum" if ratio < 0.95 else "equal within noise")
        lo_b, hi_b = min(warm["represented_before"]), max(warm["represented_before"])
        notes.append(f"Warm-start check at S={warm['sparsity']:g}: models trained first with equal importances "
                     f"represent {lo_b if lo_b == hi_b else f'{lo_b}-{hi_b}'} of {cfg.n} features; trained on with importance "
                     f"{cfg.decay}^i, the best keeps {warm['represented_after']} at held-out loss {warm['loss']:.3g}, "
                     f"against {warm['sweep_loss']:.3g} for the sweep's model with {warm['sweep_represented']} (same "
                     f"examples): {verdict}.")
    if (cls == 4).any():
        notes.append(f"{int((cls == 4).sum())} phase-diagram cells represent both features with the same sign, a "
                     "solution the paper does not report.")
    if (cls == 0).any():
        notes.append(f"{int((cls == 0).sum())} phase-diagram cells represent neither feature.")
    return comps, notes


def run_superposition(cfg: SuperpositionConfig = SuperpositionConfig(), *, progress: bool = True) -> dict:
    """Reproduce the paper's superposition sweep and 2-in-1 phase diagram; return a JSON-ready result.

    Returns:
        The toy result of :mod:`mechscope.toys.common` (render it with ``mechscope.report.toys``).
        ``metrics["sweep"]``: per sparsity, counts of represented / in-superposition features, ``norms``,
        ``interference``, ``dimensionality`` [n], ``dims_per_feature`` (m / ||W||_F^2), held-out losses.
        ``metrics["phase"]``: ``classes [density, r]`` (indices into ``class_names``), ``W [density, r, 2]``.

    Raises:
        InputError: ``cfg`` is not a :class:`SuperpositionConfig` (its own checks run when it is built).

    References:
        Elhage et al. 2022, sections "Demonstrating Superposition" and "Superposition as a Phase Change".
    """
    if not isinstance(cfg, SuperpositionConfig):
        raise InputError(f"run_superposition takes a SuperpositionConfig, got {type(cfg).__name__}: build one "
                         f"with SuperpositionConfig(...).")
    t0 = time.perf_counter()
    g = seed_everything(cfg.seed)
    sweep, phase = _sweep(cfg, g, progress), _phase(cfg, g, progress)
    warm = _warm_start(cfg, sweep, g, progress) if cfg.warm_start_check else None
    comparisons, notes = _compare(cfg, sweep, phase, warm)
    return finish({
        "toy": "superposition", "title": "Toy Models of Superposition", "paper": PAPER, "seed": cfg.seed,
        "settings": dataclasses.asdict(cfg),
        "metrics": {"sweep": sweep["rows"], "phase": phase, "warm_start": warm},
        "comparisons": comparisons, "figures": _figures(cfg, sweep, phase), "notes": notes,
        "command": f"mechscope toy superposition --seed {cfg.seed}",
    }, t0)
