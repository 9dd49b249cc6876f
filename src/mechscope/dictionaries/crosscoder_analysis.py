"""Reading a crosscoder for model diffing: decoder norms, latent classes, Latent Scaling, top contexts.

Letter key: N rows (tokens), K latents studied, D d_in, S d_sae.

- :func:`relative_norms`: ``r_j = ||d_j^tuned|| / (||d_j^base|| + ||d_j^tuned||)``: about 0.5 for a shared
  latent, 1 for a tuned-only one, 0 for a base-only one (Lindsey et al. 2024; Minder et al. 2025 eq. 4 use
  the same quantity as ``Delta_norm``). :func:`decoder_cosines`: the cosine of the two decoder vectors.
- :func:`classify_latents`: shared / tuned-only / base-only / other by thresholds on ``r``.
- :func:`latent_scaling`: for latents claimed specific to one model (the *owner*), the closed-form
  least-squares scalar ``beta`` with which ``f_j(x) d_j^owner`` best explains a target, for four targets:
  each model's reconstruction (``beta^r``) and each model's reconstruction error with latent j's own
  contribution added back (``beta^eps``). ``nu^r = beta^r_other / beta^r_owner`` and
  ``nu^eps = beta^eps_other / beta^eps_owner``: near 0, the latent is truly specific to its owner; near 1,
  the other model carries the same direction (through other latents, "Latent Decoupling", seen by
  ``nu^r``; or left in its error, "Complete Shrinkage", seen by ``nu^eps``).
- :func:`latent_activations`, :func:`top_contexts`, :func:`model_specific_latents`, :func:`diff_sae_latents`:
  where latents fire, with their strongest contexts.

References:
    Lindsey et al. 2024, "Sparse Crosscoders for Cross-Layer Features and Model Diffing" (relative decoder
    norms); Minder et al. 2025, "Overcoming Sparsity Artifacts in Crosscoders to Interpret Chat-Tuning",
    arXiv 2504.02922, section 3 (Latent Scaling: eq. for beta, nu^eps and nu^r).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from jaxtyping import Float
from torch import Tensor

from mechscope.core.errors import InputError
from mechscope.dictionaries.crosscoder import Crosscoder, stack_models


def _model_index(cc: Crosscoder, model: str | int) -> int:
    names = cc.cfg.models
    if isinstance(model, int) and not isinstance(model, bool):
        if not 0 <= model < len(names):
            raise InputError(f"model index {model} is out of range; this crosscoder has models {list(names)}.")
        return model
    if model not in names:
        raise InputError(f"model {model!r} is not one of this crosscoder's models {list(names)}.")
    return names.index(model)


def relative_norms(cc: Crosscoder, *, base: str | int = 0, tuned: str | int = 1) -> Float[Tensor, d_sae]:
    """``r_j = ||W_dec[tuned, j]|| / (||W_dec[base, j]|| + ||W_dec[tuned, j]||)`` in [0, 1] (0.5 if both are 0)."""
    n = cc.decoder_norms()
    b, t = n[_model_index(cc, base)], n[_model_index(cc, tuned)]
    total = b + t
    return torch.where(total > 0, t / total.clamp_min(1e-30), torch.full_like(t, 0.5))


def decoder_cosines(cc: Crosscoder, *, base: str | int = 0, tuned: str | int = 1) -> Float[Tensor, d_sae]:
    """Cosine between each latent's base and tuned decoder vectors (0 where either is zero)."""
    W = cc.W_dec.detach()
    b, t = W[_model_index(cc, base)], W[_model_index(cc, tuned)]
    return torch.nn.functional.cosine_similarity(b, t, dim=-1, eps=1e-12)


@dataclass
class LatentClasses:
    """Latent indices (int64) by class, from relative decoder norms ``r``.

    Attributes:
        tuned_only: ``r > specific``; base_only: ``r < 1 - specific``; shared: ``shared[0] <= r <= shared[1]``;
        other: the rest (partly shifted latents); relative_norm: ``r`` of every latent ``[d_sae]``.
    """

    tuned_only: Tensor
    base_only: Tensor
    shared: Tensor
    other: Tensor
    relative_norm: Tensor

    def counts(self) -> dict[str, int]:
        return {k: int(getattr(self, k).numel()) for k in ("tuned_only", "base_only", "shared", "other")}


def classify_latents(cc: Crosscoder, *, specific: float = 0.9, shared: tuple[float, float] = (0.3, 0.7),
                     base: str | int = 0, tuned: str | int = 1) -> LatentClasses:
    """Split latents into tuned-only, base-only, shared and other by their relative decoder norm.

    Args:
        specific: ``r`` above this is tuned-only, below ``1 - specific`` base-only (Minder et al. use 0.9).
        shared: the closed interval of ``r`` called shared.

    Raises:
        InputError: ``specific`` not in (0.5, 1], or ``shared`` not an interval inside [1 - specific, specific].
    """
    lo, hi = shared
    if not 0.5 < specific <= 1:
        raise InputError(f"specific must be in (0.5, 1], got {specific}; e.g. 0.9.")
    if not 1 - specific <= lo <= hi <= specific:
        raise InputError(f"shared must be an interval (lo, hi) with {1 - specific:.3g} <= lo <= hi <= {specific:.3g} "
                         f"so that the classes do not overlap, got {shared}.")
    r = relative_norms(cc, base=base, tuned=tuned)
    t, b = r > specific, r < 1 - specific
    s = (r >= lo) & (r <= hi)

    def idx(mask):
        return mask.nonzero().squeeze(1)

    return LatentClasses(idx(t), idx(b), idx(s), idx(~(t | b | s)), r)


# -- Latent Scaling ---------------------------------------------------------------------------
def scaling_betas(acts: Float[Tensor, "N K"], directions: Float[Tensor, "K D"],
                  target: Float[Tensor, "_N _D"] | Float[Tensor, "K N D"]) -> Float[Tensor, K]:
    """Closed-form least squares: for each latent k, ``beta_k = argmin_b sum_i ||b f_k(x_i) d_k - y_i||^2``.

    ``beta_k = <d_k, sum_i f_k(x_i) y_i> / (||d_k||^2 sum_i f_k(x_i)^2)`` (Minder et al. 2025, section 3).
    NaN for a latent that never fires (or a zero direction).

    Args:
        acts: latent activations ``f_k(x_i)``.
        directions: one vector ``d_k`` per latent.
        target: one target ``y_i`` for all latents, or one per latent (``[K, N, D]``).
    """
    num, den = _beta_terms(acts, directions, target)
    return num / den


def _beta_terms(acts: Tensor, directions: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    acts, directions, target = acts.double(), directions.double(), target.double()
    if target.dim() == 2:
        num = ((acts.T @ target) * directions).sum(-1)  # <d_k, sum_i f_ik y_i>
    else:
        num = torch.einsum("nk,knd,kd->k", acts, target, directions)
    den = acts.pow(2).sum(0) * directions.pow(2).sum(-1)
    return num, torch.where(den > 0, den, torch.full_like(den, float("nan")))


@dataclass
class LatentScaling:
    """Latent Scaling of some latents, all claimed specific to one model (the owner).

    Attributes:
        latents: their indices (int64 ``[K]``).
        owner, other: model names.
        betas: ``"<model>_recon"`` and ``"<model>_error"`` for both models -> float64 ``[K]``.
        n_active: rows on which each latent fired (int64 ``[K]``).
    """

    latents: Tensor
    owner: str
    other: str
    betas: dict[str, Tensor] = field(default_factory=dict)
    n_active: Tensor | None = None

    @property
    def nu_r(self) -> Tensor:
        """``beta^r_other / beta^r_owner``: near 0 truly specific; near 1 the other model reconstructs it too."""
        return self.betas[f"{self.other}_recon"] / self.betas[f"{self.owner}_recon"]

    @property
    def nu_eps(self) -> Tensor:
        """``beta^eps_other / beta^eps_owner``: near 0 truly specific; near 1 the other model has it (in its error)."""
        return self.betas[f"{self.other}_error"] / self.betas[f"{self.owner}_error"]

    def rows(self) -> list[dict]:
        """One JSON-ready dict per latent: index, both ratios, the four betas, rows active."""
        out = []
        for i, j in enumerate(self.latents.tolist()):
            row = {"latent": j, "nu_r": float(self.nu_r[i]), "nu_eps": float(self.nu_eps[i])}
            row.update({f"beta_{k}": float(v[i]) for k, v in self.betas.items()})
            row["n_active"] = int(self.n_active[i]) if self.n_active is not None else None
            out.append(row)
        return out


def _check_pair(cc: Crosscoder, base_acts: Tensor, tuned_acts: Tensor) -> None:
    if base_acts.shape != tuned_acts.shape or base_acts.dim() != 2:
        raise InputError(f"base and tuned activations must be [rows, d] of one shape (the same tokens), got "
                         f"{tuple(base_acts.shape)} and {tuple(tuned_acts.shape)}.")
    if base_acts.shape[-1] != cc.cfg.d_in:
        raise InputError(f"the activations have width {base_acts.shape[-1]} but the crosscoder reads d_in={cc.cfg.d_in}.")
    if cc.cfg.n_models != 2:
        raise InputError(f"this analysis compares two models; the crosscoder has {cc.cfg.n_models}.")


def _latents(cc: Crosscoder, latents) -> Tensor:
    idx = torch.as_tensor(latents, dtype=torch.long).reshape(-1)
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= cc.cfg.d_sae):
        raise InputError(f"latent indices must lie in 0..{cc.cfg.d_sae - 1}, got {idx.tolist()[:10]}.")
    return idx


@torch.no_grad()
def latent_scaling(cc: Crosscoder, base_acts: Float[Tensor, "_N _D"], tuned_acts: Float[Tensor, "_N _D"], latents, *,
                   owner: str | int = 1, batch_rows: int = 4096) -> LatentScaling:
    """Latent Scaling (Minder et al. 2025, section 3) of ``latents``, claimed specific to ``owner``.

    For latent j with owner decoder vector ``d = W_dec[owner, j]`` and activation ``f_j(x)`` (inference
    threshold), the closed-form ``beta`` (:func:`scaling_betas`) of ``f_j(x) d`` against, for each model m:

    - ``m_recon``: the crosscoder's reconstruction of model m from its latents, ``f(x) @ W_dec[m]`` (no bias);
    - ``m_error``: model m's reconstruction error with latent j's own contribution added back,
      ``x_m - x_hat_m + f_j(x) W_dec[m, j]`` (``x_hat_m`` with its bias).

    Then ``nu_r = beta_other_recon / beta_owner_recon`` and ``nu_eps = beta_other_error / beta_owner_error``.

    Args:
        base_acts, tuned_acts: the same rows of both models, raw units ``[N, d_in]``.
        latents: indices to study (typically :func:`classify_latents` ``.tuned_only``).
        owner: the model they are claimed specific to (name or index; default the tuned model).
        batch_rows: rows per chunk (memory: ``K * batch_rows * d_in`` floats for the error targets).

    Returns:
        :class:`LatentScaling`. Betas are NaN for latents that never fire on these rows.

    Raises:
        InputError: the two tensors differ in shape, or their width is not the crosscoder's.
        InputError: latent indices out of range, an unknown owner, a crosscoder of more than two models.
    """
    _check_pair(cc, base_acts, tuned_acts)
    idx = _latents(cc, latents)
    o = _model_index(cc, owner)
    other = 1 - o
    names = cc.cfg.models
    K, dev = idx.numel(), cc.W_dec.device
    d_owner = cc.W_dec[o, idx].double()  # [K, D]
    keys = [f"{names[m]}_{kind}" for m in (0, 1) for kind in ("recon", "error")]
    num = {k: torch.zeros(K, dtype=torch.float64, device=dev) for k in keys}
    den = torch.zeros(K, dtype=torch.float64, device=dev)
    n_active = torch.zeros(K, dtype=torch.long, device=dev)
    was_training = cc.training
    cc.eval()
    try:
        for s in range(0, base_acts.shape[0], batch_rows):
            x = stack_models(base_acts[s:s + batch_rows], tuned_acts[s:s + batch_rows]).to(dev, cc.W_enc.dtype)
            f = cc.encode(x)  # [N, S]
            fk = f[:, idx].double()  # [N, K]
            n_active += (fk > 0).sum(0)
            recon = torch.einsum("ns,msd->nmd", f, cc.W_dec).double()  # without bias
            err = (x.double() - recon - cc.b_dec.double())  # [N, M, D]
            for m in (0, 1):
                a, _ = _beta_terms(fk, d_owner, recon[:, m])
                num[f"{names[m]}_recon"] += a
                # error with latent j's contribution added back: err_m + f_j W_dec[m, j], per latent
                own = fk.T @ err[:, m]  # sum_i f_ik err_i  [K, D]
                own = own + fk.pow(2).sum(0)[:, None] * cc.W_dec[m, idx].double()
                num[f"{names[m]}_error"] += (own * d_owner).sum(-1)
            den += fk.pow(2).sum(0)
    finally:
        cc.train(was_training)
    den = den * d_owner.pow(2).sum(-1)
    den = torch.where(den > 0, den, torch.full_like(den, float("nan")))
    return LatentScaling(idx, names[o], names[other], {k: (v / den).cpu() for k, v in num.items()}, n_active.cpu())


# -- where latents fire -----------------------------------------------------------------------
@torch.no_grad()
def latent_activations(cc: Crosscoder, base_acts: Tensor, tuned_acts: Tensor, latents=None, *,
                       batch_rows: int = 4096) -> Float[Tensor, "N K"]:
    """Activations (inference threshold) of ``latents`` (default: all) on paired rows, float32 ``[N, K]``."""
    _check_pair(cc, base_acts, tuned_acts)
    idx = _latents(cc, latents) if latents is not None else torch.arange(cc.cfg.d_sae)
    was_training = cc.training
    cc.eval()
    try:
        out = [cc.encode(stack_models(base_acts[s:s + batch_rows], tuned_acts[s:s + batch_rows])
                         .to(cc.W_enc.device, cc.W_enc.dtype))[:, idx.to(cc.W_enc.device)].float().cpu()
               for s in range(0, base_acts.shape[0], batch_rows)]
    finally:
        cc.train(was_training)
    return torch.cat(out)


@dataclass
class Context:
    """One strong activation of a latent: where it is and the tokens around it.

    Attributes:
        doc, pos: document index and position of the token; activation: the latent's value there.
        token_ids: the window's ids; focus: the index of the active token in the window.
        text: the window decoded, the active token in ``«»`` (ids in ``[]`` without a tokenizer).
    """

    doc: int
    pos: int
    activation: float
    token_ids: list[int]
    focus: int
    text: str


def _render(ids: list[int], focus: int, tokenizer) -> str:
    parts = [tokenizer.decode([i]) if tokenizer is not None else f"[{i}]" for i in ids]
    parts[focus] = f"«{parts[focus]}»"
    return "".join(parts)


def top_contexts(acts: Float[Tensor, N], paired, *, n: int = 5, window: int = 8, tokenizer=None) -> list[Context]:
    """The ``n`` rows where ``acts`` is largest (positive only), each with ``window`` tokens before it and 2 after.

    Args:
        acts: one latent's activation on every row of ``paired``.
        paired: rows with ``doc``, ``pos`` and ``tokens`` (a :class:`~mechscope.training.crosscoder.PairedActivations`).
        tokenizer: decodes the tokens (``model.tokenizer``); None shows ids.
    """
    if acts.dim() != 1 or acts.shape[0] != len(paired.doc):
        raise InputError(f"acts must be [rows={len(paired.doc)}] (one value per row of the paired activations), "
                         f"got {tuple(acts.shape)}.")
    vals, rows = acts.float().topk(min(n, acts.numel()))
    out = []
    for v, r in zip(vals.tolist(), rows.tolist()):
        if v <= 0:
            break
        d, p = int(paired.doc[r]), int(paired.pos[r])
        toks = paired.tokens[d]
        lo, hi = max(0, p - window), min(toks.numel(), p + 3)
        ids = toks[lo:hi].tolist()
        out.append(Context(d, p, v, ids, p - lo, _render(ids, p - lo, tokenizer)))
    return out


def model_specific_latents(cc: Crosscoder, paired, *, which: str = "tuned", specific: float = 0.9,
                           n_contexts: int = 5, tokenizer=None, scaling: bool = True,
                           batch_rows: int = 4096) -> list[dict]:
    """The latents specific to one model, with their decoder geometry, Latent Scaling and top contexts.

    Args:
        cc: a two-model crosscoder.
        paired: the paired activations (``base``, ``tuned``, ``doc``, ``pos``, ``tokens``).
        which: ``"tuned"`` (``r > specific``) or ``"base"`` (``r < 1 - specific``).
        scaling: also compute ``nu_r`` and ``nu_eps`` (:func:`latent_scaling`).

    Returns:
        One dict per latent, most frequent first: ``latent, relative_norm, cosine, norm_base, norm_tuned,
        frequency`` (fraction of rows active), ``max_activation``, ``nu_r``/``nu_eps`` (with ``scaling``)
        and ``contexts`` (:class:`Context` list).

    Raises:
        InputError: ``which`` is neither ``"tuned"`` nor ``"base"``.
    """
    if which not in ("tuned", "base"):
        raise InputError(f"which must be 'tuned' or 'base', got {which!r}.")
    classes = classify_latents(cc, specific=specific, shared=(1 - specific, specific))
    idx = classes.tuned_only if which == "tuned" else classes.base_only
    if idx.numel() == 0:
        return []
    acts = latent_activations(cc, paired.base, paired.tuned, idx, batch_rows=batch_rows)
    norms, cos = cc.decoder_norms().cpu(), decoder_cosines(cc).cpu()
    ls = latent_scaling(cc, paired.base, paired.tuned, idx, owner=1 if which == "tuned" else 0,
                        batch_rows=batch_rows) if scaling else None
    out = []
    for i, j in enumerate(idx.tolist()):
        a = acts[:, i]
        row = {"latent": j, "relative_norm": float(classes.relative_norm[j]), "cosine": float(cos[j]),
               "norm_base": float(norms[0, j]), "norm_tuned": float(norms[1, j]),
               "frequency": float((a > 0).float().mean()), "max_activation": float(a.max())}
        if ls is not None:
            row.update(nu_r=float(ls.nu_r[i]), nu_eps=float(ls.nu_eps[i]))
        row["contexts"] = top_contexts(a, paired, n=n_contexts, tokenizer=tokenizer)
        out.append(row)
    return sorted(out, key=lambda r: -r["frequency"])


@torch.no_grad()
def diff_sae_latents(sae, paired, *, top: int | None = 20, sort_by: str = "frequency", n_contexts: int = 5,
                     tokenizer=None, batch_rows: int = 4096) -> list[dict]:
    """List a diff-SAE's latents (an SAE on ``tuned - base``) with their frequency, strength and top contexts.

    Args:
        sae: a :class:`~mechscope.dictionaries.SparseDictionary` trained on the difference.
        paired: the paired activations it is read on.
        top: keep this many latents (None: all that fire).
        sort_by: ``"frequency"`` (fraction of rows active) or ``"norm"`` (mean over rows of the latent's
            contribution norm ``f_j(x) ||W_dec[j]||``: how much of the difference it writes).

    Returns:
        Dicts ``latent, frequency, mean_contribution, max_activation, decoder_norm, contexts``; latents that
        never fire are left out.

    Raises:
        InputError: an unknown ``sort_by``.
        InputError: the SAE's width is not the activations'.
    """
    if sort_by not in ("frequency", "norm"):
        raise InputError(f"sort_by must be 'frequency' or 'norm', got {sort_by!r}.")
    diff = paired.tuned - paired.base
    was_training = sae.training
    sae.eval()
    try:
        acts = torch.cat([sae.encode(diff[s:s + batch_rows].to(sae.W_enc.device)).float().cpu()
                          for s in range(0, diff.shape[0], batch_rows)])
    finally:
        sae.train(was_training)
    dnorm = sae.decoder_norms().detach().float().cpu()
    freq = (acts > 0).float().mean(0)
    contrib = (acts * dnorm).mean(0)
    key = freq if sort_by == "frequency" else contrib
    order = [j for j in key.argsort(descending=True).tolist() if freq[j] > 0]
    out = []
    for j in order[:top] if top is not None else order:
        out.append({"latent": j, "frequency": float(freq[j]), "mean_contribution": float(contrib[j]),
                    "max_activation": float(acts[:, j].max()), "decoder_norm": float(dnorm[j]),
                    "contexts": top_contexts(acts[:, j], paired, n=n_contexts, tokenizer=tokenizer)})
    return out


__all__ = [
    "Context",
    "LatentClasses",
    "LatentScaling",
    "classify_latents",
    "decoder_cosines",
    "diff_sae_latents",
    "latent_activations",
    "latent_scaling",
    "model_specific_latents",
    "relative_norms",
    "scaling_betas",
    "top_contexts",
]
