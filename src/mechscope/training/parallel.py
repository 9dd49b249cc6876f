"""Data-parallel dictionary training: what each rank computes and how the ranks agree, exactly.

A global batch of ``B`` rows (the same batch one process would train on, ``batch t`` a pure function of ``t``)
is split by row: rank ``r`` of ``W`` takes rows ``[B*r//W, B*(r+1)//W)`` (any ``B``: no padding, no dropped
row). Every loss term is a sum over rows divided by the *global* ``B``, so the sum over ranks of the local
gradients is the one-process gradient; it is all-reduced (SUM) once per step and every rank applies the same
Adam step, keeping the parameters replicated. What else must be global is made global:

- BatchTopK keeps the ``k * B`` largest activations of the *whole* batch (Bussmann et al. 2024): each rank
  sends its local top ``min(k*B, rows*d_sae)`` values, the global ``k*B``-th value is the threshold, and a tie
  at the threshold goes to the lower (rank, flat index) — :func:`global_batchtopk_mask`;
- dead-latent counters (AuxK's dead set, the dead fraction) advance by ``B`` and reset where a latent fired on
  *any* rank (all-reduce MAX of the fired mask), so they stay identical on every rank;
- BatchTopK's inference threshold takes the global minimum kept activation (all-reduce MIN);
- the logged metrics (loss terms, FVU around the global mean, L0) are all-reduced in float64.

The result matches one process with the same global batch to rounding (the order of the gradient sum
differs: ~1e-8 in fp32, see ``tests/distributed/test_training.py``), not bitwise.
"""

from __future__ import annotations

import torch
import torch.distributed as tdist
from jaxtyping import Bool, Float
from torch import Tensor

from mechscope.scale.dist import DistInfo, guarded


def is_parallel(info: DistInfo | None) -> bool:
    """True when ``info`` is a job of more than one rank."""
    return info is not None and info.world_size > 1


def local_rows(n: int, info: DistInfo | None) -> slice:
    """The rows of an ``n``-row global batch this rank trains on: ``[n*r//W, n*(r+1)//W)``."""
    if not is_parallel(info):
        return slice(0, n)
    r, w = info.rank, info.world_size
    return slice(n * r // w, n * (r + 1) // w)


def all_reduce_(info: DistInfo, what: str, t: Tensor, op=tdist.ReduceOp.SUM) -> Tensor:
    """All-reduce ``t`` in place (any dtype the backend supports); a dead peer becomes a DistributedError."""
    guarded(info, what, tdist.all_reduce, t, op)
    return t


def all_reduce_gradients(params: list[Tensor], info: DistInfo, name: str) -> None:
    """Sum every parameter's gradient over the ranks, in one flat fp32 (or the grads' dtype) buffer.

    A parameter without a gradient (unused this step) contributes zeros, and gets a gradient only if some
    rank has one, so every rank ends with the same ``.grad`` on the same parameters.
    """
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=params[0].device)
    all_reduce_(info, f"{name}: the gradient presence all-reduce", has, tdist.ReduceOp.MAX)
    live = [p for p, h in zip(params, has.tolist()) if h]
    if not live:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in live])
    all_reduce_(info, f"{name}: the gradient all-reduce", flat)
    off = 0
    for p in live:
        n = p.numel()
        g = flat[off:off + n].view_as(p)
        if p.grad is None:
            p.grad = g.clone()
        else:
            p.grad.copy_(g)
        off += n


def global_fired(fired: Bool[Tensor, "d_sae"], info: DistInfo | None, name: str) -> Bool[Tensor, "d_sae"]:
    """Latents that fired on any rank's rows (identity on one process)."""
    if not is_parallel(info):
        return fired
    t = fired.to(torch.uint8)
    all_reduce_(info, f"{name}: the fired-latents all-reduce", t, tdist.ReduceOp.MAX)
    return t.bool()


def global_batchtopk_mask(pre: Float[Tensor, "rows d_sae"], n_keep: int, info: DistInfo) -> Bool[Tensor, "rows d_sae"]:
    """Which of this rank's ``relu(pre)`` entries are among the ``n_keep`` largest of the whole batch.

    Exact: local top-``min(n_keep, numel)`` values are all-gathered (padded with -inf to ``n_keep``), the global
    ``n_keep``-th largest value ``t`` is found, entries ``> t`` are kept, and entries ``== t`` are kept in
    (rank, flat index) order until ``n_keep`` entries are kept in all. Cost: ``W * n_keep`` values gathered.

    Args:
        pre: this rank's pre-activations (any float dtype).
        n_keep: ``k * B`` with ``B`` the global batch rows.
        info: the job.

    Returns:
        Boolean mask shaped like ``pre``; over all ranks exactly ``n_keep`` True (fewer only when the whole
        batch has fewer entries).
    """
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
