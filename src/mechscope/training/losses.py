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

from typing import NamedTuple

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from mechscope.dictionaries.model import SparseDictionary, StepFunction


class LossOutput(NamedTuple):
    """One batch's loss. ``total`` is the scalar to back-propagate; ``terms`` its parts (scalars)."""

    total: Tensor
    terms: dict[str, Tensor]
    recons: Tensor
    acts: Tensor
    pre: Tensor


def topk_aux_loss(d: SparseDictionary, pre: Float[Tensor, "B d_sae"], residual: Float[Tensor, "B d_out"],
                  dead: Bool[Tensor, "d_sae"], k_aux: int | None = None) -> Tensor:
    """AuxK: dead latents reconstruct the residual of the live ones (Gao et al. 2024, appendix A.2).

    Returns ``min(n_dead / k_aux, 1) * mean_t ||e_hat_t - e_t||^2`` (0 when no latent is dead).
    """
    n_dead = int(dead.sum())
    if n_dead == 0:
        return pre.new_zeros(())
    k_aux = k_aux or d.cfg.d_out // 2
    scale = min(n_dead / k_aux, 1.0)
    k = min(k_aux, n_dead)
    masked = torch.where(dead, pre, torch.full_like(pre, float("-inf")))
    top = masked.topk(k, dim=-1, sorted=False)
    acts = torch.zeros_like(pre).scatter(-1, top.indices, top.values)
    e_hat = acts @ d.W_dec
    return scale * (e_hat - residual).pow(2).sum(-1).mean()


def compute_loss(d: SparseDictionary, x: Float[Tensor, "B d_in"], y: Float[Tensor, "B d_out"] | None = None, *,
                 l1_coefficient: float = 0.0, l0_coefficient: float = 0.0, aux_coefficient: float = 1 / 32,
                 dead: Tensor | None = None, k_aux: int | None = None) -> LossOutput:
    """The training loss of one batch for the dictionary's architecture (see the module docstring).

    Args:
        x: input activations (already normalised if the trainer normalises).
        y: target activations; None means ``x`` (an SAE).
        dead: boolean mask of dead latents [d_sae] for AuxK; None or all-False disables it.

    Returns:
        LossOutput with terms ``mse`` and, by architecture, ``l1``, ``l0`` or ``aux``.
    """
    y = x if y is None else y
    pre = d.encode_pre(x)
    acts = d.activate(pre)
    recons = d.decode(acts, x)
    acc = torch.promote_types(recons.dtype, torch.float32)  # fp32 under bf16 autocast; fp64 stays fp64
    mse = (recons.to(acc) - y.to(acc)).pow(2).sum(-1).mean()
    terms = {"mse": mse}
    arch = d.cfg.architecture
    if arch == "relu":
        terms["l1"] = l1_coefficient * (acts * d.decoder_norms()).sum(-1).mean()
    elif arch == "jumprelu":
        steps = StepFunction.apply(pre, d.threshold, d.cfg.jumprelu_bandwidth)
        terms["l0"] = l0_coefficient * steps.sum(-1).mean()
    elif dead is not None and aux_coefficient:
        residual = (y.to(acc) - recons.to(acc)).detach()
        terms["aux"] = aux_coefficient * topk_aux_loss(d, pre, residual, dead, k_aux)
    total = sum(terms.values())
    return LossOutput(total, terms, recons, acts, pre)
