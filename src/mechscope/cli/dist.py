"""``mechscope dist selftest``: a distributed job's start-up check, run under torchrun on every rank.

    torchrun --standalone --nproc-per-node=2 -m mechscope dist selftest
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 -m mechscope dist selftest

Each rank joins the process group with a short timeout, runs every collective once and checks the results, and
prints one line; a missing or dead peer ends it within the timeout with an error naming the rank.
"""

from __future__ import annotations

import typer

from mechscope.cli.common import clean_errors, out

dist_app = typer.Typer(no_args_is_help=True, help="Distributed jobs (torchrun): start-up checks.")


@dist_app.callback()
def _group() -> None:
    """Distributed jobs (torchrun): start-up checks."""


@dist_app.command("selftest")
@clean_errors
def selftest_cmd(
    backend: str | None = typer.Option(None, "--backend", help="gloo or nccl (default: nccl with CUDA, else gloo)"),
    device: str | None = typer.Option(None, "--device", help="cpu or cuda (default: cuda when available)"),
    timeout: float = typer.Option(60.0, "--timeout", help="seconds a peer may be missing or silent"),
) -> None:
    """Join the process group, run every collective once and check it; one line per rank."""
    import time

    from mechscope.scale.dist import init_distributed, self_test, shutdown

    t0 = time.perf_counter()
    info = init_distributed(backend, timeout_s=timeout, device=device)
    tested = self_test(info)
    out.print(f"rank {info.rank} of {info.world_size} ({info.backend or 'one process'}, {info.device}): "
              f"{len(tested)} collectives OK in {time.perf_counter() - t0:.1f} s", soft_wrap=True)
    shutdown()
