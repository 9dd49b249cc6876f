"""Latent-sharded (tensor-parallel) dictionaries: each of ``tp`` ranks holds ``d_sae / tp`` latents.

Shards (rank ``t`` of a ``tp`` group owns latents ``[t*m, (t+1)*m)``, ``m = d_sae / tp``):
``W_enc[:, shard]``, ``b_enc[shard]``, ``W_dec[shard]``, ``threshold[shard]`` and the latents' dead counters
and Adam moments; ``b_dec`` and ``W_skip`` are replicated. A forward moves only ``[B, d]`` activations and the
top-k candidates (Gemma Scope's "latent sharding"; Gao et al. 2024 section 5):

- encode: ``pre = copy(x - b_dec) @ W_enc[:, shard] + b_enc[shard]`` — ``copy`` is the identity forward and an
  all-reduce of the gradient backward, so ``b_dec`` gets the encoder-side gradient of every shard;
- **exact distributed TopK** (:func:`sharded_topk_mask`): local top-k per row, all-gather of values and global
  indices, global top-k per row with ties to the lowest global index; the latents equal the unsharded
  dictionary's and exactly ``k`` are selected per row (Llamascopium's threshold search does not guarantee
  ``k``; OpenAI's capacity factor approximates beyond 4 shards);
- BatchTopK: :func:`~mechscope.training.parallel.global_batchtopk_mask` over every rank;
- decode: ``recons = reduce(acts[:, shard] @ W_dec[shard]) + b_dec`` — ``reduce`` is an all-reduce forward and
  the identity backward, so each shard gets its own decoder gradient (Megatron's f/g pair, Shoeybi et al. 2019).

Every rank of a ``tp`` group then holds the same loss and the same gradients of the replicated parameters; a
training step equals the unsharded step to rounding (tested to 1e-6).
"""

from __future__ import annotations

import torch
import torch.distributed as tdist
from jaxtyping import Bool, Float
from torch import Tensor

from mechscope.core.errors import InputError
from mechscope.dictionaries.config import DictionaryConfig
from mechscope.dictionaries.io import state_tensors
from mechscope.dictionaries.model import JumpReLUFunction, SparseDictionary, StepFunction
from mechscope.scale.dist import guarded
from mechscope.training.losses import LossOutput
from mechscope.training.parallel import Layout, global_batchtopk_mask

#: Tensors split on the latent axis, and which axis that is.
LATENT_AXIS = {"W_enc": 1, "b_enc": 0, "W_dec": 0, "threshold": 0}


def shard_bounds(d_sae: int, tp_rank: int, tp_size: int) -> tuple[int, int]:
    """Latents ``[lo, hi)`` of shard ``tp_rank``.

    Raises:
        InputError: ``tp_size`` does not divide ``d_sae`` (names both and the fix).
    """
    if d_sae % tp_size:
        raise InputError(f"d_sae={d_sae} is not divisible by --tp {tp_size}: every shard must hold the same number "
                         f"of latents. Pick a width that is a multiple of {tp_size}, or another --tp.")
    m = d_sae // tp_size
    return tp_rank * m, (tp_rank + 1) * m


def shard_config(cfg: DictionaryConfig, tp_size: int) -> DictionaryConfig:
    """The configuration of one shard (``d_sae / tp`` latents; ``k`` capped at the shard's width — the full
    ``k`` is used by the sharded selection)."""
    shard_bounds(cfg.d_sae, 0, tp_size)
    m = cfg.d_sae // tp_size
    return cfg.replace(d_sae=m, k=None if cfg.k is None else min(cfg.k, m))


@torch.no_grad()
def shard_dictionary(full: SparseDictionary, layout: Layout) -> SparseDictionary:
    """This rank's shard of ``full`` (a new module; ``full`` is untouched)."""
    lo, hi = shard_bounds(full.cfg.d_sae, layout.tp_rank, layout.tp_size)
    d = SparseDictionary(shard_config(full.cfg, layout.tp_size))
    for name, v in state_tensors(full).items():
        axis = LATENT_AXIS.get(name)
        getattr(d, name).copy_(v if axis is None else v.narrow(axis, lo, hi - lo))
    d.train(full.training)
    d.batchtopk_use_threshold = full.batchtopk_use_threshold
    return d


@torch.no_grad()
def gather_dictionary(shard: SparseDictionary, cfg: DictionaryConfig, layout: Layout) -> SparseDictionary:
    """The whole dictionary (config ``cfg``) from every shard of the ``tp`` group, on every rank of the group."""
    full = SparseDictionary(cfg)
    for name, v in state_tensors(shard).items():
        axis = LATENT_AXIS.get(name)
        if axis is None:
            getattr(full, name).copy_(v)
            continue
        t = v.movedim(axis, 0).contiguous()
        out = torch.empty((layout.tp_size * t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)
        guarded(layout.info, f"the shards' all-gather of {name}", tdist.all_gather_single, out, t, layout.tp_group)
        getattr(full, name).copy_(out.movedim(0, axis))
    full.train(shard.training)
    full.batchtopk_use_threshold = shard.batchtopk_use_threshold
    return full


class _CopyToShards(torch.autograd.Function):
    """Identity forward; all-reduce (SUM) of the gradient over the tp group backward."""

    @staticmethod
    def forward(ctx, x: Tensor, layout: Layout) -> Tensor:
        ctx.layout = layout
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous().clone()
        guarded(ctx.layout.info, "the shards' gradient all-reduce", tdist.all_reduce, grad, tdist.ReduceOp.SUM,
                ctx.layout.tp_group)
        return grad, None


class _ReduceFromShards(torch.autograd.Function):
    """All-reduce (SUM) over the tp group forward; identity backward."""

    @staticmethod
    def forward(ctx, x: Tensor, layout: Layout) -> Tensor:
        x = x.contiguous().clone()
        guarded(layout.info, "the shards' partial-sum all-reduce", tdist.all_reduce, x, tdist.ReduceOp.SUM,
                layout.tp_group)
        return x

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


def copy_to_shards(x: Tensor, layout: Layout) -> Tensor:
    return _CopyToShards.apply(x, layout)


def reduce_from_shards(x: Tensor, layout: Layout) -> Tensor:
    return _ReduceFromShards.apply(x, layout)


def sharded_topk_mask(pre: Float[Tensor, "rows m"], k: int, layout: Layout) -> Bool[Tensor, "rows m"]:
    """Which of this shard's latents are among each row's ``k`` largest pre-activations over every shard.

    Local top-``min(k, m)`` per row, all-gather of values and global indices over the tp group, global top-``k``
    per row; a tie goes to the lowest global latent index. Exactly ``k`` latents are selected per row (those
    with ``-inf`` pre-activation only when a row has fewer than ``k`` finite ones). Cost: ``tp * rows * k``
    values and indices gathered.
    """
    rows, m = pre.shape
    kl = min(k, m)
    vals, idx = pre.detach().topk(kl, dim=-1)
    idx = idx + layout.tp_rank * m
    T = layout.tp_size
    gv = torch.empty((T * rows, kl), dtype=vals.dtype, device=vals.device)
    gi = torch.empty((T * rows, kl), dtype=idx.dtype, device=idx.device)
    guarded(layout.info, "the TopK candidates' all-gather", tdist.all_gather_single, gv, vals.contiguous(),
            layout.tp_group)
    guarded(layout.info, "the TopK indices' all-gather", tdist.all_gather_single, gi, idx.contiguous(),
            layout.tp_group)
    cv = gv.view(T, rows, kl).permute(1, 0, 2).reshape(rows, T * kl)
    ci = gi.view(T, rows, kl).permute(1, 0, 2).reshape(rows, T * kl)
    by_index = ci.argsort(dim=-1)  # lowest global index first, then a stable sort by value keeps that order in ties
    cv, ci = cv.gather(-1, by_index), ci.gather(-1, by_index)
    order = cv.sort(dim=-1, descending=True, stable=True).indices[:, :k]
    chosen = ci.gather(-1, order) - layout.tp_rank * m
    mine = (chosen >= 0) & (chosen < m)
    row = torch.arange(rows, device=pre.device)[:, None].expand_as(chosen)
    mask = torch.zeros_like(pre, dtype=torch.bool)
    mask[row[mine], chosen[mine]] = True
    return mask


def compute_loss_sharded(d: SparseDictionary, x: Float[Tensor, "B d_in"], y: Float[Tensor, "B d_out"] | None,
                         layout: Layout, *, k: int | None, l1_coefficient: float = 0.0, l0_coefficient: float = 0.0,
                         aux_coefficient: float = 1 / 32, dead: Tensor | None = None, k_aux: int | None = None,
                         batch_rows: int) -> LossOutput:
    """:func:`~mechscope.training.losses.compute_loss` for one latent shard ``d`` (same terms and conventions).

    Args:
        d: this rank's shard (:func:`shard_dictionary`).
        x, y: this replica's rows (every rank of the tp group holds the same rows).
        k: the whole dictionary's k (topk/batchtopk).
        dead: this shard's dead-latent mask ``[d_sae / tp]``.
        batch_rows: rows of the global batch (every term divides its sum over rows by it).

    Returns:
        LossOutput whose ``total``, ``terms`` and ``recons`` are the whole dictionary's (equal on every rank of
        the tp group) and whose ``pre``/``dense_acts`` are this shard's columns.
    """
    y = x if y is None else y
    arch = d.cfg.architecture
    xin = x.to(d.W_enc.dtype)
    if d.cfg.subtracts_b_dec:
        xin = xin - d.b_dec
    pre = copy_to_shards(xin, layout) @ d.W_enc + d.b_enc
    if arch == "topk":
        acts = pre.relu() * sharded_topk_mask(pre, k, layout).to(pre.dtype)
    elif arch == "batchtopk":
        acts = pre.relu() * global_batchtopk_mask(pre, k * batch_rows, layout).to(pre.dtype)
    elif arch == "relu":
        acts = pre.relu()
    else:
        acts = JumpReLUFunction.apply(pre, d.threshold, d.cfg.jumprelu_bandwidth)
    recons = reduce_from_shards(acts @ d.W_dec, layout) + d.b_dec
    if d.W_skip is not None:
        recons = recons + x.to(d.W_skip.dtype) @ d.W_skip
    acc = torch.promote_types(recons.dtype, torch.float32)
    terms = {"mse": (recons.to(acc) - y.to(acc)).pow(2).sum(-1).sum() / batch_rows}
    if arch == "relu":
        per_row = reduce_from_shards((acts * d.decoder_norms()).sum(-1), layout)
        terms["l1"] = l1_coefficient * per_row.sum() / batch_rows
    elif arch == "jumprelu":
        steps = StepFunction.apply(pre, d.threshold, d.cfg.jumprelu_bandwidth)
        terms["l0"] = l0_coefficient * reduce_from_shards(steps.sum(-1), layout).sum() / batch_rows
    elif dead is not None and aux_coefficient:
        terms["aux"] = aux_coefficient * _aux_sharded(d, pre, (y.to(acc) - recons.to(acc)).detach(), dead, k_aux,
                                                      batch_rows, layout)
    return LossOutput(sum(terms.values()), terms, recons, pre, acts)


def _aux_sharded(d: SparseDictionary, pre: Tensor, residual: Tensor, dead: Tensor, k_aux: int | None,
                 batch_rows: int, layout: Layout) -> Tensor:
    """AuxK over the shards (:func:`~mechscope.training.losses.topk_aux_loss`): the ``k_aux`` largest dead
    pre-activations of each row over every shard, decoded without bias, against the live latents' residual."""
    n_dead = dead.sum().reshape(1).to(torch.int64)
    guarded(layout.info, "the dead-latent count all-reduce", tdist.all_reduce, n_dead, tdist.ReduceOp.SUM,
            layout.tp_group)
    n_dead = int(n_dead)
    if n_dead == 0:
        return pre.new_zeros(())
    k_aux = k_aux or d.cfg.d_out // 2
    scale = min(n_dead / k_aux, 1.0)
    masked = pre.detach().masked_fill(~dead, float("-inf"))
    pick = sharded_topk_mask(masked, min(k_aux, n_dead), layout) & dead
    e_hat = reduce_from_shards((pre * pick.to(pre.dtype)) @ d.W_dec, layout)
    return scale * (e_hat - residual).pow(2).sum(-1).sum() / batch_rows


@torch.no_grad()
def clip_grad_norm_sharded(d: SparseDictionary, max_norm: float, layout: Layout) -> float:
    """``clip_grad_norm_`` over the whole dictionary: the shards' squared norms summed over the tp group, the
    replicated parameters' counted once. Returns the total norm before clipping."""
    sharded = torch.zeros((), dtype=torch.float64, device=d.W_enc.device)
    replicated = torch.zeros((), dtype=torch.float64, device=d.W_enc.device)
    for name, p in d.named_parameters():
        if p.grad is not None:
            sq = p.grad.double().pow(2).sum()
            if name in LATENT_AXIS:
                sharded += sq
            else:
                replicated += sq
    sharded = sharded.reshape(1)
    layout.over_tp("the gradient norm all-reduce", sharded)
    total = float((sharded[0] + replicated).sqrt())
    coef = max_norm / (total + 1e-6)
    if coef < 1:
        for p in d.parameters():
            if p.grad is not None:
                p.grad.mul_(coef)
    return total
