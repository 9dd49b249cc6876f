"""Training losses of sparse dictionaries.

Conventions (shared with SAELens, so losses are comparable): the reconstruction loss is the squared
error summed over features and averaged over tokens; every penalty is averaged over tokens.

- all: ``mse = mean_t ||y_t - y_hat_t||^2``
- relu: ``+ l1_coefficient * mean_t sum_i f_i(x_t) ||W_dec[i]||`` (Anthropic, April 2024 update)
- jumprelu: ``+ l0_coefficient * mean_t sum_i H(pre_i - theta_i)``, gradient to theta by the STE
  (Rajamanoharan et al. 2024, eq. 10-12)
- topk, batchtopk: ``+ aux_coefficient * min(n_dead / k_aux, 1) * mean_t ||e_t - e_hat_t||^2`` where
  ``e = (y - y_hat).detach()`` and ``e_hat`` decodes (without bias) the ``k_aux`` largest pre-activations
  among dead latents; ``k_aux = d_out // 2`` (Gao et al. 2024, appendix A.2 and B.1).

Shapes: x [B, d_in], y [B, d_out]; B = tokens of the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float
from torch import Tensor

from mechscope.dictionaries.model import SparseDictionary, StepFunction
from mechscope.training.parallel import global_batchtopk_mask, is_parallel


@dataclass
class LossOutput:
    """One batch's loss. ``total`` is the scalar to back-propagate; ``terms`` its parts (scalars).

    TopK keeps its latents sparse (``top_idx``/``top_vals`` [B, k]); ``acts`` is then built on first access.
    """

    total: Tensor
    terms: dict[str, Tensor]
    recons: Tensor
    pre: Tensor
    dense_acts: Tensor | None = None
    top_idx: Tensor | None = None
    top_vals: Tensor | None = None

    @property
    def acts(self) -> Tensor:
        """Latent activations [B, d_sae]."""
        if self.dense_acts is None:
            self.dense_acts = torch.zeros_like(self.pre).scatter(-1, self.top_idx, self.top_vals.to(self.pre.dtype))
        return self.dense_acts

    def fired(self) -> Tensor:
        """Boolean [d_sae]: latents active on at least one token of the batch (no gradient)."""
        if self.dense_acts is None:
            mask = torch.zeros(self.pre.shape[-1], dtype=torch.bool, device=self.pre.device)
            mask[self.top_idx[self.top_vals > 0]] = True
            return mask
        return (self.dense_acts.detach() > 0).any(0)

    def l0(self) -> float:
        """Mean number of active latents per token."""
        if self.dense_acts is None:
            return float((self.top_vals.detach() > 0).sum(-1).float().mean())
        return float((self.dense_acts.detach() > 0).float().sum(-1).mean())


def _decode_sparse(d: SparseDictionary, idx: Tensor, vals: Tensor) -> Tensor:
    """``sum_j vals[:, j] * W_dec[idx[:, j]]`` without building the dense [B, d_sae] activations (no bias)."""
    return F.embedding_bag(idx, d.W_dec, per_sample_weights=vals.to(d.W_dec.dtype), mode="sum")


def topk_aux_loss(d: SparseDictionary, pre: Float[Tensor, "B d_sae"], residual: Float[Tensor, "B d_out"],
                  dead: Bool[Tensor, "d_sae"], k_aux: int | None = None, batch_rows: int | None = None) -> Tensor:
    """AuxK: dead latents reconstruct the residual of the live ones (Gao et al. 2024, appendix A.2).

    Returns ``min(n_dead / k_aux, 1) * mean_t ||e_hat_t - e_t||^2`` (0 when no latent is dead). Only the
    dead columns are searched and decoded, so the cost follows the number of dead latents, not d_sae.
    ``batch_rows``: divide the sum over these rows by the global batch's rows instead (data parallel).
    """
    n_dead = int(dead.sum())
    if n_dead == 0:
        return pre.new_zeros(())
    k_aux = k_aux or d.cfg.d_out // 2
    scale = min(n_dead / k_aux, 1.0)
    dead_idx = dead.nonzero().squeeze(1)
    top = pre[:, dead_idx].topk(min(k_aux, n_dead), dim=-1, sorted=False)
    e_hat = _decode_sparse(d, dead_idx[top.indices], top.values)
    per_row = (e_hat - residual).pow(2).sum(-1)
    return scale * (per_row.mean() if batch_rows is None else per_row.sum() / batch_rows)


def compute_loss(d: SparseDictionary, x: Float[Tensor, "B d_in"], y: Float[Tensor, "B d_out"] | None = None, *,
                 l1_coefficient: float = 0.0, l0_coefficient: float = 0.0, aux_coefficient: float = 1 / 32,
                 dead: Tensor | None = None, k_aux: int | None = None, batch_rows: int | None = None,
                 dist=None) -> LossOutput:
    """The training loss of one batch for the dictionary's architecture (see the module docstring).

    Args:
        x: input activations (already normalised if the trainer normalises).
        y: target activations; None means ``x`` (an SAE).
        dead: boolean mask of dead latents [d_sae] for AuxK; None or all-False disables it.
        batch_rows: rows of the global batch when ``x`` is one rank's part of it (data parallel): every term
            is then this part's sum over rows divided by ``batch_rows``, so the ranks' terms (and gradients)
            add up to the whole batch's. None: ``x.shape[0]``.
        dist: the DistInfo (or :class:`~mechscope.training.parallel.Layout`) of a data-parallel job; BatchTopK keeps the
            ``k * batch_rows`` largest activations of the whole batch over all ranks (an all-gather).

    Returns:
        LossOutput with terms ``mse`` and, by architecture, ``l1``, ``l0`` or ``aux``.
    """
    y = x if y is None else y
    arch = d.cfg.architecture
    rows = x.shape[0] if batch_rows is None else batch_rows

    def mean(v: Tensor) -> Tensor:  # per-row values -> their sum / the global batch's rows
        return v.sum() / rows if batch_rows is not None else v.mean()
    dense_acts = top_idx = top_vals = None
    if arch == "topk":  # sparse path: b_dec folded into the encoder bias, decode by gathering k rows
        d._check(x, d.cfg.d_in, "the input")
        x = x.to(d.W_enc.dtype)
        bias = d.b_enc - d.b_dec @ d.W_enc if d.cfg.subtracts_b_dec else d.b_enc
        pre = torch.addmm(bias, x, d.W_enc)
        vals, idx = pre.topk(d.cfg.k, dim=-1, sorted=False)
        vals = vals.relu()
        recons = _decode_sparse(d, idx, vals) + d.b_dec
        if d.W_skip is not None:
            recons = recons + x @ d.W_skip
        top_idx, top_vals = idx, vals
    else:
        pre = d.encode_pre(x)
        if arch == "batchtopk" and is_parallel(dist) and d.training and not d.batchtopk_use_threshold:
            mask = global_batchtopk_mask(pre, d.cfg.k * rows, dist)
            dense_acts = pre.relu() * mask.to(pre.dtype)
        else:
            dense_acts = d.activate(pre)
        recons = d.decode(dense_acts, x)
    acc = torch.promote_types(recons.dtype, torch.float32)  # fp32 under bf16 autocast; fp64 stays fp64
    mse = mean((recons.to(acc) - y.to(acc)).pow(2).sum(-1))
    terms = {"mse": mse}
    if arch == "relu":
        terms["l1"] = l1_coefficient * mean((dense_acts * d.decoder_norms()).sum(-1))
    elif arch == "jumprelu":
        steps = StepFunction.apply(pre, d.threshold, d.cfg.jumprelu_bandwidth)
        terms["l0"] = l0_coefficient * mean(steps.sum(-1))
    elif dead is not None and aux_coefficient:
        residual = (y.to(acc) - recons.to(acc)).detach()
        terms["aux"] = aux_coefficient * topk_aux_loss(d, pre, residual, dead, k_aux, batch_rows)
    return LossOutput(sum(terms.values()), terms, recons, pre, dense_acts, top_idx, top_vals)
