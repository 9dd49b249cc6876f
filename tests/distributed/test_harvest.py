"""Distributed harvest (:func:`mechscope.data.harvesting.harvest` with ``dist=``) on two gloo ranks.

Claims tested: a 2-rank harvest of 7 shards (a count 2 does not divide) writes the same directory as one process,
byte for byte, manifest included; a rank killed mid-harvest ends the survivor within the timeout with an error
naming the barrier, nothing unfinished is listed, and a relaunch (here at world size 1) recomputes only the
missing shards and ends byte-identical to the uninterrupted harvest.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch.multiprocessing as mp

from tests.distributed.test_dist import _env, free_port
from tests.unit.test_cli import tiny_model_dir  # noqa: F401 (fixture)

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.attn.hook_z"]
KW = dict(shard_tokens=48, forward_batch_contexts=2, progress=False)  # 16 rows per context: 3 per shard, 7 shards


def _inputs():
    import torch

    from tests.conftest import tiny_hooked

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    return tiny_hooked("llama"), torch.randint(3, 128, (20, 17), generator=g)


def _worker(rank: int, world: int, port: int, out: str, kill_after: int) -> None:
    from mechscope.data import harvesting
    from mechscope.data.harvesting import harvest
    from mechscope.scale.dist import DistributedError, init_distributed

    _env(rank, world, port)
    model, toks = _inputs()
    info = init_distributed("gloo", timeout_s=5.0 if kill_after else 30.0)
    if kill_after and rank == 1:
        real, writes = harvesting._atomic_write, []

        def dying(path, data):
            real(path, data)
            writes.append(path)
            if len(writes) == 2 * kill_after:  # a shard and its sidecar, kill_after times
                os._exit(0)
        harvesting._atomic_write = dying
    try:
        harvest(model, HOOKS, toks, out, dist=info, **KW)
        Path(out, f"rank{rank}.done").write_text("ok")
    except DistributedError as e:
        Path(out, f"rank{rank}.error").write_text(str(e))
    os._exit(0)  # no teardown beside a dead peer


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if not p.name.startswith("rank")}


def test_two_ranks_write_the_same_bytes_as_one_process(tmp_path):
    from mechscope.data.harvesting import harvest

    model, toks = _inputs()
    harvest(model, HOOKS, toks, tmp_path / "one", **KW)
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path / "two"), 0), nprocs=2, join=True)
    assert (tmp_path / "two" / "rank0.done").exists() and (tmp_path / "two" / "rank1.done").exists()
    one, two = _files(tmp_path / "one"), _files(tmp_path / "two")
    assert sorted(one) == sorted(two) == ["manifest.json"] + [f"shard_{s:05d}.safetensors" for s in range(7)]
    assert one == two
    assert json.loads(one["manifest.json"])["complete"]


def test_a_killed_rank_is_recovered_by_relaunching(tmp_path):
    from mechscope.data.harvesting import harvest

    model, toks = _inputs()
    harvest(model, HOOKS, toks, tmp_path / "ref", **KW)
    out = tmp_path / "run"
    mp.spawn(_worker, args=(2, free_port(), str(out), 1), nprocs=2, join=True)  # rank 1 dies after one shard
    err = (out / "rank0.error").read_text()
    assert "rank 0 of 2: the barrier before the end of the harvest failed" in err and "relaunch" in err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["shards"] == [] and not manifest["complete"]  # nothing listed before every shard is written
    written = {p.name: p.stat().st_mtime_ns for p in out.glob("shard_*.safetensors")}
    assert sorted(written) == [f"shard_{s:05d}.safetensors" for s in (0, 1, 2, 4, 6)]  # rank 0's four, rank 1's first
    for f in out.glob("rank*"):
        f.unlink()
    harvest(model, HOOKS, toks, out, **KW)  # relaunched, here as one process
    assert _files(out) == _files(tmp_path / "ref")
    assert all(out.joinpath(n).stat().st_mtime_ns == t for n, t in written.items())  # not recomputed


def test_sae_harvest_under_torchrun_equals_one_process(tmp_path, tiny_model_dir):  # noqa: F811
    """``torchrun --standalone --nproc-per-node=2 -m mechscope sae harvest ...`` against the same command without
    torchrun: the same files, byte for byte."""
    import subprocess
    import sys

    import torch
    from typer.testing import CliRunner

    from mechscope.cli import app

    g = torch.Generator().manual_seed(1)
    words = [" ".join(f"w{int(i)}" for i in torch.randint(3, 120, (30,), generator=g)) for _ in range(40)]
    (tmp_path / "text.txt").write_text("\n".join(words) + "\n")
    args = ["sae", "harvest", "--hook", "blocks.0.hook_resid_post", "--hook", "blocks.1.hook_mlp_out", "--model",
            str(tiny_model_dir), "--dtype", "float32", "--corpus", str(tmp_path / "text.txt"), "--tokens", "600",
            "--context-len", "16", "--shard-tokens", "60", "--batch-contexts", "2", "--device", "cpu",
            "--threads", "1"]
    r = CliRunner().invoke(app, args + ["--out", str(tmp_path / "one")], terminal_width=300)
    assert r.exit_code == 0, r.output
    torchrun = Path(sys.executable).with_name("torchrun")
    p = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node=2", "-m", "mechscope", *args, "--out",
                        str(tmp_path / "two"), "--timeout", "30"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "(2 ranks)" in p.stdout
    one, two = _files(tmp_path / "one"), _files(tmp_path / "two")
    assert len(one) > 3 and one == two
