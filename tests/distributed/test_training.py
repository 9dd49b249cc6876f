"""Data-parallel dictionary training (``Trainer(..., dist=)``) on two gloo ranks against one process.

Claims tested: every architecture (relu, topk, batchtopk with its global threshold, jumprelu, a skip transcoder)
trained at world size 2 on an odd global batch (37 rows: 18 + 19) ends within 1e-6 of one process with the same
global batch (fp32), with the dead-latent counters (AuxK's dead set) exactly equal and the ranks' parameters
bitwise equal to each other; harvested shards feed each rank only its rows; a rank killed mid-run stops its
peer within the timeout, naming it, and a relaunch from the last checkpoint ends bitwise equal to an uninterrupted
run; a checkpoint written at world size 2 resumes at world size 1 and one written at world size 1 resumes at
world size 2 (same step, same data cursor), ending within 1e-6 of the uninterrupted run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from tests.distributed.test_dist import _env, free_port
from tests.unit.test_cli import tiny_model_dir  # noqa: F401 (fixture)

D, B = 12, 37


def _source(start: int):
    """Batch t (37 rows): sparse non-negative mixtures of 24 fixed directions, a pure function of t."""
    g0 = torch.Generator().manual_seed(5)
    feats = torch.randn(24, D, generator=g0)
    mix = torch.randn(D, D, generator=g0) / D**0.5
    t = start
    while True:
        g = torch.Generator().manual_seed(100 + t)
        x = (torch.rand(B, 24, generator=g) * (torch.rand(B, 24, generator=g) < 0.15)) @ feats + 0.2
        yield {"h": x, "h_out": x @ mix}
        t += 1


def _specs():
    from mechscope.dictionaries import DictionaryConfig
    from mechscope.training import DictionarySpec

    return [
        DictionarySpec("relu", DictionaryConfig("relu", D, 40, "h"), lr=3e-3, l1_coefficient=0.3),
        DictionarySpec("topk", DictionaryConfig("topk", D, 40, "h", k=3), lr=3e-3, k_aux=6),
        DictionarySpec("batchtopk", DictionaryConfig("batchtopk", D, 40, "h", k=3), lr=3e-3, k_aux=6),
        DictionarySpec("jumprelu", DictionaryConfig("jumprelu", D, 40, "h"), lr=3e-3, l0_coefficient=0.05,
                       jumprelu_init_threshold=0.05),
        DictionarySpec("skip", DictionaryConfig("topk", D, 40, "h", "h_out", k=3, skip=True), lr=3e-3),
    ]


def _cfg(steps: int = 24, **kw):
    from mechscope.training import TrainConfig

    return TrainConfig(n_tokens=B * steps, batch_tokens=B, dead_after_tokens=B * 2, log_every_steps=4,
                       norm_estimation_batches=3, **kw)


def _train(out: str, dist=None, *, resume: bool = False, die_at: int | None = None, tp: int = 1, **kw):
    from mechscope.training import Trainer

    def on_step(step: int):
        if step == die_at:
            os._exit(0)  # no teardown: the peer finds the rank gone at its next collective

    t = Trainer(_specs(), _cfg(**kw), out, progress=False, dist=dist, on_step=on_step, tp=tp)
    return t.fit(_source, resume=resume)


def _worker(rank: int, world: int, port: int, out: str, resume: bool, die_at: int | None, kw: dict) -> None:
    from safetensors.torch import save_file

    from mechscope.dictionaries.io import state_tensors
    from mechscope.scale.dist import DistributedError, init_distributed

    torch.set_num_threads(1)
    _env(rank, world, port)
    info = init_distributed("gloo", timeout_s=6.0 if die_at else 30.0)
    try:
        res = _train(out, info, resume=resume, die_at=die_at if rank == 1 else None, **kw)
        flat = {f"{n}.{k}": v.contiguous() for n, d in res.items() for k, v in state_tensors(d).items()}
        save_file(flat, str(Path(out, f"rank{rank}.safetensors")))
    except DistributedError as e:
        Path(out, f"rank{rank}.error").write_text(str(e))
    os._exit(0)


def _spawn(out: Path, world: int = 2, *, resume: bool = False, die_at: int | None = None, **kw) -> None:
    out.mkdir(parents=True, exist_ok=True)
    mp.spawn(_worker, args=(world, free_port(), str(out), resume, die_at, kw), nprocs=world, join=True)


def _final(out: Path) -> dict[str, torch.Tensor]:
    """Everything the newest checkpoint holds: weights, Adam moments and steps, dead-latent counters."""
    from safetensors.torch import load_file

    ck = sorted((out / "checkpoints").glob("step_*"))[-1]
    got = {f"{p.stem}/{k}": v for p in sorted(ck.glob("*.safetensors")) for k, v in load_file(p).items()}
    got["state"] = json.loads((ck / "state.json").read_text())
    return got


def _assert_close(a: dict, b: dict, atol: float) -> None:
    assert set(a) == set(b)
    for k in a:
        if k == "state":
            assert a[k]["step"] == b[k]["step"]
            for name, m in a[k]["members"].items():
                for f, v in m.items():
                    w = b[k]["members"][name][f]
                    assert (v is None and w is None) or v == pytest.approx(w, rel=1e-6), (name, f)
        elif "tokens_since_fired" in k or not a[k].is_floating_point():
            assert torch.equal(a[k], b[k]), k
        else:
            assert (a[k] - b[k]).abs().max() <= atol, (k, float((a[k] - b[k]).abs().max()))


def _metrics(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


def _assert_metrics_close(got: list[dict], want: list[dict], keys) -> None:
    """Line by line, each of ``keys`` the expected line has, to 1e-4 relative."""
    for a, b in zip(got, want):
        for k in keys:
            if k in b:
                assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), (a["name"], k)


def _stop_one_process_at(out: Path, step: int, **kw) -> None:
    """One process trains to ``step`` (its checkpoints written) and is interrupted there."""
    from mechscope.training import Trainer

    def stop(s):
        if s == step:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Trainer(_specs(), _cfg(**kw), out, progress=False, on_step=stop).fit(_source)


def test_every_architecture_at_world_size_2_matches_one_process(tmp_path):
    from safetensors.torch import load_file

    torch.set_num_threads(1)
    _train(str(tmp_path / "one"))
    _spawn(tmp_path / "two")
    one, two = _final(tmp_path / "one"), _final(tmp_path / "two")
    _assert_close(one, two, atol=1e-6)
    assert one["state"]["members"]["batchtopk"]["threshold_ema"] > 0
    r0, r1 = load_file(tmp_path / "two" / "rank0.safetensors"), load_file(tmp_path / "two" / "rank1.safetensors")
    assert all(torch.equal(r0[k], r1[k]) for k in r0)  # replicated: the same bits on both ranks
    lines, want = _metrics(tmp_path / "two"), _metrics(tmp_path / "one")
    assert len(lines) == len(want) == 6 * 5  # rank 0 alone writes the metrics
    assert all(a.keys() == b.keys() for a, b in zip(lines, want))
    _assert_metrics_close(lines, want, ("mse", "loss", "fvu", "l0", "dead_fraction", "aux"))
    for name in ("topk", "batchtopk", "skip"):  # AuxK had dead latents to work with (the same set on both)
        assert any(r["aux"] > 0 for r in want if r["name"] == name), name


def test_a_killed_rank_stops_its_peer_and_a_relaunch_ends_bitwise_equal(tmp_path):
    _spawn(tmp_path / "full", steps=12, checkpoint_every_steps=5)
    out = tmp_path / "killed"
    _spawn(out, die_at=7, steps=12, checkpoint_every_steps=5)
    err = (out / "rank0.error").read_text()
    assert "rank 0 of 2" in err and "relaunch" in err
    assert not (out / "relu").exists()  # nothing exported from the broken run
    _spawn(out, resume=True, steps=12, checkpoint_every_steps=5)
    a, b = _final(tmp_path / "full"), _final(out)
    assert set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a if k != "state"), "not bitwise equal"
    assert json.loads((out / "relu" / "cfg.json").read_text())["metadata"]["resumed_from_step"] == 5


def test_checkpoints_reshard_between_world_sizes(tmp_path):
    torch.set_num_threads(1)
    _train(str(tmp_path / "full"), steps=16)
    two_to_one = tmp_path / "2to1"  # saved at world size 2 (step 10), resumed by one process
    _spawn(two_to_one, die_at=12, steps=16, checkpoint_every_steps=10)
    _train(str(two_to_one), resume=True, steps=16, checkpoint_every_steps=10)
    one_to_two = tmp_path / "1to2"  # saved by one process (step 10), resumed at world size 2
    _stop_one_process_at(one_to_two, 12, steps=16, checkpoint_every_steps=10)
    _spawn(one_to_two, resume=True, steps=16, checkpoint_every_steps=10)
    full = _final(tmp_path / "full")
    for out in (two_to_one, one_to_two):
        _assert_close(full, _final(out), atol=1e-6)
        assert json.loads((out / "topk" / "cfg.json").read_text())["metadata"]["resumed_from_step"] == 10


def test_sae_train_under_torchrun_equals_one_process(tmp_path, tiny_model_dir):  # noqa: F811
    """``torchrun --standalone --nproc-per-node=2 -m mechscope sae train ...`` (harvest split over the ranks, data
    parallel training, evaluation split too) against the same command as one process."""
    import subprocess
    import sys

    from typer.testing import CliRunner

    from mechscope.cli import app

    g = torch.Generator().manual_seed(2)
    words = [" ".join(f"w{int(i)}" for i in torch.randint(3, 120, (30,), generator=g)) for _ in range(60)]
    (tmp_path / "text.txt").write_text("\n".join(words) + "\n")
    args = ["sae", "train", "--hook", "blocks.1.hook_resid_post", "--arch", "batchtopk", "--k", "4", "--width", "48",
            "--model", str(tiny_model_dir), "--dtype", "float32", "--compute-dtype", "float32", "--corpus",
            str(tmp_path / "text.txt"), "--tokens", str(37 * 12), "--batch-tokens", "37", "--context-len", "16",
            "--checkpoint-every", "0", "--eval-tokens", "120", "--threads", "1"]
    r = CliRunner().invoke(app, args + ["--out", str(tmp_path / "one")], terminal_width=300)
    assert r.exit_code == 0, r.output
    torchrun = Path(sys.executable).with_name("torchrun")
    env = dict(os.environ, MECHSCOPE_CACHE=str(tmp_path / "cache2"))  # its own harvest, split over the ranks
    p = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node=2", "-m", "mechscope", *args, "--out",
                        str(tmp_path / "two")], capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    _assert_close(_final(tmp_path / "one"), _final(tmp_path / "two"), atol=1e-6)
    name = "batchtopk_L1_resid_post_w48_k4"
    e1, e2 = (json.loads((tmp_path / d / name / "eval.json").read_text()) for d in ("one", "two"))
    assert e1["n_tokens"] == e2["n_tokens"] > 0
    assert e2["fvu"] == pytest.approx(e1["fvu"], rel=1e-4) and e2["l0"] == pytest.approx(e1["l0"], rel=1e-4)
