"""Fail-fast distributed start-up (:mod:`mechscope.scale.dist`) on gloo, two processes spawned by
``torch.multiprocessing`` on a free port (no fixed ports).

Claims tested: the self-test runs every collective and checks its result exactly; global-index ownership gives
every item to exactly one rank for sizes the world does not divide; a peer that never starts ends start-up within
the timeout with an error naming the rank and the fix; a peer that dies before a collective ends the survivor's
collective within the timeout, named; one process without torchrun's environment runs alone; bad environment is
refused.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from mechscope.scale import dist as D

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))


def _write(folder: str, rank: int, payload: dict) -> None:
    Path(folder, f"rank{rank}.json").write_text(json.dumps(payload))


def _worker_selftest(rank: int, world: int, port: int, folder: str) -> None:
    _env(rank, world, port)
    info = D.init_distributed("gloo", timeout_s=20)
    tested = D.self_test(info)
    mine = D.owned(7, info)
    import torch

    total = torch.tensor([len(mine)])
    D.guarded(info, "all_reduce", torch.distributed.all_reduce, total)
    _write(folder, rank, {"tested": tested, "owned": mine, "total": int(total), "world": info.world_size})
    D.shutdown()


def _worker_alone(rank: int, port: int, folder: str, timeout: float) -> None:
    _env(0, 2, port)  # a world of two, but the second rank never starts
    t0 = time.perf_counter()
    try:
        D.init_distributed("gloo", timeout_s=timeout)
        _write(folder, 0, {"error": None})
    except D.DistributedError as e:
        _write(folder, 0, {"error": str(e), "seconds": time.perf_counter() - t0})


def _worker_dead_peer(rank: int, world: int, port: int, folder: str) -> None:
    _env(rank, world, port)
    info = D.init_distributed("gloo", timeout_s=5)
    D.guarded(info, "barrier", torch_barrier)
    if rank == 1:
        os._exit(0)  # dies without joining the next collective
    import torch

    t0 = time.perf_counter()
    try:
        D.guarded(info, "all_reduce of the step's gradients", torch.distributed.all_reduce, torch.ones(3))
        _write(folder, rank, {"error": None})
    except D.DistributedError as e:
        _write(folder, rank, {"error": str(e), "seconds": time.perf_counter() - t0})
    os._exit(0)  # no teardown with a dead peer


def torch_barrier():
    import torch.distributed

    torch.distributed.barrier()


def test_self_test_and_ownership_on_two_ranks(tmp_path):
    mp.spawn(_worker_selftest, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(g["tested"] == list(D.COLLECTIVES) for g in got)
    assert got[0]["owned"] == [0, 2, 4, 6] and got[1]["owned"] == [1, 3, 5]  # 7 items: none padded, none dropped
    assert all(g["total"] == 7 and g["world"] == 2 for g in got)


def test_a_peer_that_never_starts_fails_start_up_within_the_timeout(tmp_path):
    t0 = time.perf_counter()
    mp.spawn(_worker_alone, args=(free_port(), str(tmp_path), 4.0), nprocs=1, join=True)
    got = json.loads((tmp_path / "rank0.json").read_text())
    assert got["error"] and "rank 0 of 2 could not join" in got["error"] and "torchrun" in got["error"]
    assert got["seconds"] < 30 and time.perf_counter() - t0 < 45


def test_a_dead_peer_ends_the_collective_within_the_timeout(tmp_path):
    mp.spawn(_worker_dead_peer, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    got = json.loads((tmp_path / "rank0.json").read_text())
    assert got["error"] and "rank 0 of 2: all_reduce of the step's gradients failed" in got["error"]
    assert "relaunch" in got["error"] and got["seconds"] < 30


def test_one_process_runs_alone_and_bad_environments_are_refused(monkeypatch):
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    info = D.init_distributed(device="cpu")
    assert (info.rank, info.world_size, info.backend) == (0, 1, None) and info.is_main
    assert D.self_test(info) == list(D.COLLECTIVES) and D.owned(5, info) == [0, 1, 2, 3, 4]
    with pytest.raises(D.DistributedError, match="unknown collectives"):
        D.self_test(info, ["all_reduce_prod"])
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "3")
    with pytest.raises(D.DistributedError, match="RANK=3 is not a rank of WORLD_SIZE=2"):
        D.init_distributed()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(D.DistributedError, match="not an integer"):
        D.init_distributed()
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(D.DistributedError, match="timeout_s"):
        D.init_distributed(timeout_s=0.0)
    with pytest.raises(D.DistributedError, match="backend"):
        D.init_distributed("mpi")


def test_torchrun_runs_the_selftest_on_every_rank():
    """The launcher users run: ``torchrun --standalone --nproc-per-node=2 -m mechscope dist selftest`` (torchrun
    picks a free port itself with --standalone)."""
    import subprocess
    import sys

    torchrun = Path(sys.executable).with_name("torchrun")
    r = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node=2", "-m", "mechscope", "dist", "selftest",
                        "--device", "cpu", "--timeout", "20"], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    for rank in (0, 1):
        assert f"rank {rank} of 2 (gloo, cpu): {len(D.COLLECTIVES)} collectives OK" in r.stdout
    assert "deprecated" not in r.stderr


def test_the_cli_names_a_missing_peer_in_one_red_line(monkeypatch):
    from typer.testing import CliRunner

    from mechscope.cli import app

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    t0 = time.perf_counter()
    r = CliRunner().invoke(app, ["dist", "selftest", "--device", "cpu", "--timeout", "3"], terminal_width=400)
    assert r.exit_code == 2 and "rank 0 of 2 could not join the process group" in r.output
    assert time.perf_counter() - t0 < 30
