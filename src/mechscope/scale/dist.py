"""PyTorch's own distributed engine, made to fail fast: process-group start-up with a short timeout, a start-up
self-test of every collective a plan uses, and errors that name the rank and the fix.

mechscope never runs its own launcher or transport: jobs start under ``torchrun`` (or
``torch.multiprocessing.spawn``) and talk through ``torch.distributed`` (gloo on CPUs, nccl on GPUs; the code
path is the same). What this module adds is what the anchors leave out (``../shared/SCALE.md``):

- **a short timeout** (60 s by default, not torch's 30 minutes or sparsify's week): a peer that never arrives
  ends :func:`init_distributed` with :class:`DistributedError` naming this rank, the world size and the
  rendezvous address; the same timeout bounds every collective afterwards (gloo enforces it per operation), and
  :func:`guarded` turns a dead peer's "Connection closed" or a timeout into an error naming the collective,
  the rank and what to do;
- **a self-test** (:func:`self_test`): every collective the run will use is run once on small tensors and its
  result checked exactly (e.g. older gloo builds lacked ``reduce_scatter``), before any model is loaded;
- **global-index ownership** (:func:`owned`): item ``i`` of ``n`` belongs to rank ``i % world_size``, so what
  a rank produces depends on global indices only; an ``n`` that the world size does not divide neither pads
  (``DistributedSampler`` repeats items) nor drops (``drop_last``).

Environment (set by torchrun): ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``.
Without ``WORLD_SIZE`` (or with 1) everything runs as one process and no group is created.
"""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from mechscope.core.errors import MechscopeError

DEFAULT_TIMEOUT_S = 60.0
COLLECTIVES = ("barrier", "broadcast", "all_reduce_sum", "all_reduce_max", "all_reduce_min", "all_gather_single",
               "reduce_scatter_single", "all_to_all_single")  # no *_object collectives: they pickle


class DistributedError(MechscopeError):
    """A distributed job cannot go on: a peer is missing or dead, or the backend lacks a collective."""


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``rank`` of ``world_size`` (``local_rank`` on its node), its ``device``, the
    ``backend`` (None: one process, no group) and the collective ``timeout_s``."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None
    timeout_s: float

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    if v is None or v == "":
        return default
    try:
        return int(v)
    except ValueError:
        raise DistributedError(f"{name}={v!r} is not an integer; launch with torchrun, which sets it.") from None


def init_distributed(backend: str | None = None, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                     device: str | None = None) -> DistInfo:
    """Join the job's process group (or run alone), failing within ``timeout_s`` when a peer is missing.

    Args:
        backend: ``"gloo"`` or ``"nccl"``; default nccl when CUDA is available and ``device`` is not ``cpu``,
            else gloo.
        timeout_s: start-up and per-collective timeout in seconds.
        device: ``"cpu"``, ``"cuda"`` (this rank's ``cuda:LOCAL_RANK``) or None (cuda when available).

    Returns:
        :class:`DistInfo`. With ``WORLD_SIZE`` unset or 1: rank 0 of 1, no group.

    Raises:
        DistributedError: bad environment (a rank outside the world), a peer that did not join within
            ``timeout_s`` (names this rank, the world size, the rendezvous address and the fix), a group
            already initialised with another world size.
    """
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world:
        raise DistributedError(f"RANK={rank} is not a rank of WORLD_SIZE={world}; launch with torchrun.")
    if not timeout_s > 0:
        raise DistributedError(f"timeout_s must be > 0 seconds, got {timeout_s}.")
    use_cuda = device != "cpu" and torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    if device is not None and device.startswith("cuda") and not torch.cuda.is_available():
        raise DistributedError(f"device {device!r} asked but CUDA is not available on rank {rank}; use --device cpu.")
    dev = torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu")
    backend = backend or ("nccl" if use_cuda else "gloo")
    if backend not in ("gloo", "nccl"):
        raise DistributedError(f"backend must be gloo or nccl, got {backend!r}.")
    if world == 1:
        return DistInfo(0, 1, 0, dev, None, float(timeout_s))
    if dist.is_initialized():
        if dist.get_world_size() != world:
            raise DistributedError(f"a process group of {dist.get_world_size()} ranks is already running, but "
                                   f"WORLD_SIZE={world}.")
        return DistInfo(rank, world, local, dev, dist.get_backend(), float(timeout_s))
    if use_cuda:
        torch.cuda.set_device(dev)
    where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    try:
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=_dt.timedelta(seconds=timeout_s))
    except Exception as e:  # torch raises DistStoreError / RuntimeError / ValueError here
        raise DistributedError(
            f"rank {rank} of {world} could not join the process group at {where} within {timeout_s:g} s: "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. A peer did not start or died; check "
            "every rank's log, and launch all of them with the same torchrun command (--nnodes, --rdzv-endpoint)."
        ) from None
    return DistInfo(rank, world, local, dev, backend, float(timeout_s))


def guarded(info: DistInfo, what: str, fn: Callable, *args, **kwargs):
    """Run the collective call ``fn(*args, **kwargs)``; a dead peer or a timeout becomes a
    :class:`DistributedError` naming ``what``, this rank and the fix (never a long hang: the group's timeout)."""
    try:
        return fn(*args, **kwargs)
    except (RuntimeError, dist.DistError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DistributedError(
            f"rank {info.rank} of {info.world_size}: {what} failed ({msg}); a peer died or stalled for more than "
            f"{info.timeout_s:g} s. See the other ranks' logs; relaunch the same command to resume."
        ) from None


def owned(n: int, info: DistInfo) -> list[int]:
    """The items of ``range(n)`` this rank owns: ``i % world_size == rank`` (every item exactly once across
    ranks, whatever ``n``; none padded, none dropped)."""
    if n < 0:
        raise DistributedError(f"n must be >= 0, got {n}.")
    return list(range(info.rank, n, info.world_size))


def _check(name: str, ok: bool, got, want) -> None:
    if not ok:
        raise DistributedError(f"the backend's {name} returned {got}, expected {want}: this torch/backend build "
                               "computes it wrongly; pin a torch release whose backend passes the self-test.")


def self_test(info: DistInfo, collectives: Sequence[str] = COLLECTIVES) -> list[str]:
    """Run each named collective once on small tensors and check its result exactly (see :data:`COLLECTIVES`).

    Returns:
        The collectives tested (all of them on one process, where each is trivially its identity).

    Raises:
        DistributedError: an unknown name; a collective the backend lacks (names it and the backend) or
            computes wrongly; a dead peer (as :func:`guarded`).
    """
    unknown = [c for c in collectives if c not in COLLECTIVES]
    if unknown:
        raise DistributedError(f"unknown collectives {unknown}; known: {', '.join(COLLECTIVES)}.")
    if info.world_size == 1:
        return list(collectives)
    W, r, dev = info.world_size, info.rank, info.device

    def run(name: str, fn: Callable, *args):
        try:
            return guarded(info, name, fn, *args)
        except DistributedError as e:
            if "not supported" in str(e) or "not implemented" in str(e).lower():
                raise DistributedError(f"the {info.backend} backend lacks {name} (rank {r}); use a torch build whose "
                                       f"{info.backend} supports it, or a plan that does not need it.") from None
            raise

    for name in collectives:
        if name == "barrier":
            run(name, dist.barrier)
        elif name == "broadcast":
            t = torch.full((3,), float(r + 7), device=dev)
            run(name, dist.broadcast, t, 0)
            _check(name, bool((t == 7).all()), t.tolist(), [7.0] * 3)
        elif name in ("all_reduce_sum", "all_reduce_max", "all_reduce_min"):
            t = torch.arange(4, dtype=torch.float32, device=dev) + r
            op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[name[-3:]]
            run(name, dist.all_reduce, t, op)
            base = torch.arange(4, dtype=torch.float32, device=dev)
            want = {"sum": base * W + W * (W - 1) / 2, "max": base + (W - 1), "min": base}[name[-3:]]
            _check(name, torch.equal(t, want), t.tolist(), want.tolist())
        elif name == "all_gather_single":
            out = torch.empty(W * 2, device=dev)
            run(name, dist.all_gather_single, out, torch.full((2,), float(r), device=dev))
            want = torch.arange(W, device=dev, dtype=torch.float32).repeat_interleave(2)
            _check(name, torch.equal(out, want), out.tolist(), want.tolist())
        elif name == "reduce_scatter_single":
            out = torch.empty(2, device=dev)
            run(name, dist.reduce_scatter_single, out, torch.arange(W * 2, dtype=torch.float32, device=dev))
            want = torch.arange(2 * r, 2 * r + 2, dtype=torch.float32, device=dev) * W
            _check(name, torch.equal(out, want), out.tolist(), want.tolist())
        elif name == "all_to_all_single":
            out = torch.empty(W, device=dev)
            run(name, dist.all_to_all_single, out, torch.arange(W, dtype=torch.float32, device=dev) + 10 * r)
            want = torch.arange(W, dtype=torch.float32, device=dev) * 10 + r
            _check(name, torch.equal(out, want), out.tolist(), want.tolist())
    return list(collectives)


def shutdown() -> None:
    """Leave the process group, if any (call at the end of a job)."""
    if dist.is_initialized():
        dist.destroy_process_group()
