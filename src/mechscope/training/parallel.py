"""Parallel dictionary training: the rank layout (data parallel × latent sharded) and how the ranks agree, exactly.

**Layout** (:func:`make_layout`): ``W`` ranks form a ``dp × tp`` DeviceMesh (``tp`` divides ``W``; rank
``= dp_rank * tp + tp_rank``). Ranks of one ``tp`` group hold the latent shards of one dictionary
(:mod:`mechscope.training.tensor_parallel`) and read the same rows; the ``dp`` replicas read different rows.

**Data parallel.** A global batch of ``B`` rows (the same batch one process would train on, ``batch t`` a pure
function of ``t``) is split by row: replica ``r`` of ``dp`` takes rows ``[B*r//dp, B*(r+1)//dp)`` (any ``B``:
no padding, no dropped row). Every loss term is a sum over rows divided by the *global* ``B``, so the sum over
replicas of the local gradients is the one-process gradient; it is all-reduced (SUM) over the ``dp`` group
once per step and every replica applies the same Adam step. What else must be global is made global:

- BatchTopK keeps the ``k * B`` largest activations of the *whole* batch (Bussmann et al. 2024): each rank
  sends its local top ``min(k*B, numel)`` values, the global ``k*B``-th value is the threshold, and a tie at
  the threshold goes to the lower (rank, flat index) — :func:`global_batchtopk_mask` (over every rank: rows
  are split over ``dp``, latents over ``tp``);
- dead-latent counters (AuxK's dead set, the dead fraction) advance by ``B`` and reset where a latent fired on
  *any* replica (all-reduce MAX of the fired mask), so they stay identical on every replica;
- BatchTopK's inference threshold takes the global minimum kept activation (all-reduce MIN);
- the logged metrics (loss terms, FVU around the global mean, L0) are all-reduced in float64.

The result matches one process with the same global batch to rounding (the order of the gradient sum
differs: ~1e-8 in fp32, see ``tests/distributed/test_training.py``), not bitwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as tdist
from jaxtyping import Bool, Float
from torch import Tensor

from mechscope.core.errors import InputError
from mechscope.scale.dist import DistInfo, guarded


@dataclass(frozen=True)
class Layout:
    """Where this rank sits in a ``dp × tp`` job: its replica (``dp_rank`` of ``dp_size``) and its latent shard
    (``tp_rank`` of ``tp_size``); ``dp_group``/``tp_group`` are the process groups (None: the whole world for
    ``dp`` when ``tp_size == 1``; no group for a size of 1)."""

    info: DistInfo
    dp_rank: int
    dp_size: int
    tp_rank: int
    tp_size: int
    dp_group: object = None
    tp_group: object = None
    mesh: object = None

    @property
    def is_main(self) -> bool:
        return self.info.rank == 0

    def over_dp(self, what: str, t: Tensor, op=tdist.ReduceOp.SUM) -> Tensor:
        """All-reduce ``t`` in place over this rank's replicas (the ranks holding the same latents)."""
        return all_reduce_(self, what, t, op, self.dp_group) if self.dp_size > 1 else t

    def over_tp(self, what: str, t: Tensor, op=tdist.ReduceOp.SUM) -> Tensor:
        """All-reduce ``t`` in place over this rank's latent shards (the ranks holding the same rows)."""
        return all_reduce_(self, what, t, op, self.tp_group) if self.tp_size > 1 else t

    def over_all(self, what: str, t: Tensor, op=tdist.ReduceOp.SUM) -> Tensor:
        """All-reduce ``t`` in place over every rank."""
        return all_reduce_(self, what, t, op)


def check_tp(world: int, tp: int) -> None:
    """Refuse a ``tp`` that does not divide the world size (InputError naming both and the fix)."""
    if not isinstance(tp, int) or tp < 1 or world % tp:
        raise InputError(f"--tp {tp} does not divide the world size {world}: the ranks form a dp x tp grid. Launch a "
                         f"multiple of {tp} processes (torchrun --nproc-per-node), or pick a --tp that divides {world}.")


def make_layout(info: DistInfo | None, tp: int = 1) -> Layout | None:
    """The layout of a job of ``info.world_size`` ranks with ``tp`` latent shards per dictionary.

    Returns None for one process (``tp`` must then be 1).

    Raises:
        InputError: ``tp`` < 1 or not a divisor of the world size (names both and the fix).
    """
    world = 1 if info is None else info.world_size
    check_tp(world, tp)
    if world == 1:
        return None
    if tp == 1:
        return Layout(info, info.rank, world, 0, 1)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(info.device.type, (world // tp, tp), mesh_dim_names=("dp", "tp"))
    return Layout(info, mesh.get_local_rank("dp"), world // tp, mesh.get_local_rank("tp"), tp,
                  mesh.get_group("dp") if world // tp > 1 else None, mesh.get_group("tp"), mesh)


def is_parallel(info) -> bool:
    """True when ``info`` (a DistInfo or Layout) is a job of more than one rank."""
    if isinstance(info, Layout):
        return True
    return info is not None and info.world_size > 1


def local_rows(n: int, info) -> slice:
    """The rows of an ``n``-row global batch this rank trains on: ``[n*r//R, n*(r+1)//R)`` for replica ``r`` of
    ``R`` (``info``: a DistInfo — every rank a replica — or a Layout)."""
    if not is_parallel(info):
        return slice(0, n)
    r, w = (info.dp_rank, info.dp_size) if isinstance(info, Layout) else (info.rank, info.world_size)
    return slice(n * r // w, n * (r + 1) // w)


def _info(x) -> DistInfo:
    return x.info if isinstance(x, Layout) else x


def all_reduce_(info, what: str, t: Tensor, op=tdist.ReduceOp.SUM, group=None) -> Tensor:
    """All-reduce ``t`` in place over ``group`` (None: every rank); a dead peer becomes a DistributedError."""
    guarded(_info(info), what, tdist.all_reduce, t, op, group)
    return t


def all_reduce_gradients(params: list[Tensor], info, name: str, group=None) -> None:
    """Sum every parameter's gradient over ``group`` (the data-parallel replicas), in one flat buffer.

    A parameter without a gradient (unused this step) contributes zeros, and gets a gradient only if some
    rank has one, so every rank ends with the same ``.grad`` on the same parameters.
    """
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=params[0].device)
    all_reduce_(info, f"{name}: the gradient presence all-reduce", has, tdist.ReduceOp.MAX, group)
    live = [p for p, h in zip(params, has.tolist()) if h]
    if not live:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in live])
    all_reduce_(info, f"{name}: the gradient all-reduce", flat, group=group)
    off = 0
    for p in live:
        n = p.numel()
        g = flat[off:off + n].view_as(p)
        if p.grad is None:
            p.grad = g.clone()
        else:
            p.grad.copy_(g)
        off += n


def global_batchtopk_mask(pre: Float[Tensor, "rows d_sae"], n_keep: int, info) -> Bool[Tensor, "rows d_sae"]:
    """Which of this rank's ``relu(pre)`` entries are among the ``n_keep`` largest over every rank.

    Exact: local top-``min(n_keep, numel)`` values are all-gathered (padded with -inf to ``n_keep``), the global
    ``n_keep``-th largest value ``t`` is found, entries ``> t`` are kept, and entries ``== t`` are kept in
    (rank, flat index) order until ``n_keep`` entries are kept in all. Cost: ``W * n_keep`` values gathered.

    Args:
        pre: this rank's pre-activations (its rows, and under latent sharding its latents; any float dtype).
        n_keep: ``k * B`` with ``B`` the global batch rows.
        info: the job (DistInfo or Layout); the selection runs over all its ranks.

    Returns:
        Boolean mask shaped like ``pre``; over all ranks exactly ``n_keep`` True (fewer only when the whole
        batch has fewer entries).
    """
    info = _info(info)
    flat = pre.detach().relu().flatten().float()
    n_loc = min(n_keep, flat.numel())
    top = flat.topk(n_loc, sorted=False).values if n_loc else flat[:0]
    send = torch.full((n_keep,), float("-inf"), device=flat.device)
    send[:n_loc] = top
    W = info.world_size
    got = torch.empty(W * n_keep, device=flat.device)
    guarded(info, "the BatchTopK threshold all-gather", tdist.all_gather_single, got, send)
    finite = got[torch.isfinite(got)]
    if finite.numel() <= n_keep:  # the whole batch is kept
        return torch.ones_like(flat, dtype=torch.bool).view_as(pre)
    t = finite.topk(n_keep).values[-1]
    above = flat > t
    need = n_keep - int((finite > t).sum())  # ties at t still to keep, over all ranks
    eq = flat == t
    counts = torch.zeros(W, dtype=torch.int64, device=flat.device)
    counts[info.rank] = int(eq.sum())
    all_reduce_(info, "the BatchTopK tie count all-reduce", counts)
    before = int(counts[:info.rank].sum())
    mine = max(0, min(int(counts[info.rank]), need - before))
    mask = above
    if mine:
        idx = eq.nonzero().squeeze(1)[:mine]
        mask = mask.clone()
        mask[idx] = True
    return mask.view_as(pre)
