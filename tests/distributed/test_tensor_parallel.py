"""Latent-sharded dictionaries (:mod:`mechscope.training.tensor_parallel`) on gloo ranks against one process.

Claims tested: the sharded TopK selects exactly k latents per row and the latents equal the unsharded
dictionary's bitwise (BatchTopK: exactly k·B over the batch, equal too); training with the latents split over 2
ranks (tp = 2) and over a 2 × 2 DeviceMesh (dp × tp, 4 ranks) ends within 1e-6 of one process for topk (AuxK
active), batchtopk, relu, jumprelu and a skip transcoder; a checkpoint written as shards resumes in one process
(and one process's at tp = 2) within 1e-6 of the uninterrupted run; a width tp does not divide, a tp that does
not divide the world size and a checkpoint missing a shard are refused with errors naming the fix.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from tests.distributed.test_dist import _env, free_port
from tests.distributed.test_training import (D, _assert_close, _assert_metrics_close, _final, _metrics, _specs,
                                             _stop_one_process_at, _train)


def _forward_worker(rank: int, world: int, port: int, folder: str) -> None:
    from mechscope.dictionaries import DictionaryConfig, SparseDictionary
    from mechscope.dictionaries.model import batchtopk_activation
    from mechscope.scale.dist import init_distributed
    from mechscope.training.parallel import global_batchtopk_mask, make_layout
    from mechscope.training.tensor_parallel import gather_dictionary, shard_dictionary, sharded_topk_mask

    torch.set_num_threads(1)
    _env(rank, world, port)
    lay = make_layout(init_distributed("gloo", timeout_s=30.0), tp=2)
    g = torch.Generator().manual_seed(3)
    full = SparseDictionary(DictionaryConfig("topk", 16, 64, "h", k=5)).initialize(seed=1)
    with torch.no_grad():
        full.b_enc.copy_(torch.randn(64, generator=g) * 0.1)
    x = torch.randn(40, 16, generator=g)
    shard = shard_dictionary(full, lay)
    pre = shard.encode_pre(x)
    mask = sharded_topk_mask(pre, 5, lay)
    acts = pre.relu() * mask
    gathered = torch.empty(80, 32)
    torch.distributed.all_gather_single(gathered, acts.detach().contiguous())
    got = gathered.view(2, 40, 32).permute(1, 0, 2).reshape(40, 64)
    picked = torch.empty(80, dtype=torch.int64)
    torch.distributed.all_gather_single(picked, mask.sum(-1))
    picked = picked.view(2, 40)
    n_keep = 5 * 40
    bmask = global_batchtopk_mask(pre, n_keep, lay)
    bacts = pre.relu() * bmask
    torch.distributed.all_gather_single(gathered, bacts.detach().contiguous())
    bgot = gathered.view(2, 40, 32).permute(1, 0, 2).reshape(40, 64)
    n_b = torch.tensor([int(bmask.sum())])
    torch.distributed.all_reduce(n_b)
    back = gather_dictionary(shard, full.cfg, lay)
    result = {
        "topk_equal": torch.equal(got, full.encode(x)),
        "per_row": picked.sum(0).tolist(),
        "batchtopk_equal": torch.equal(bgot, batchtopk_activation(full.encode_pre(x), 5)),
        "batchtopk_kept": int(n_b),
        "gathered_equal": all(torch.equal(getattr(back, n), getattr(full, n)) for n in ("W_enc", "b_enc", "W_dec")),
    }
    Path(folder, f"rank{rank}.txt").write_text(repr(result))
    os._exit(0)


def test_sharded_topk_selects_exactly_k_and_equals_the_unsharded_latents(tmp_path):
    mp.spawn(_forward_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    for r in range(2):
        res = eval((tmp_path / f"rank{r}.txt").read_text())
        assert res == {"topk_equal": True, "per_row": [5] * 40, "batchtopk_equal": True, "batchtopk_kept": 200,
                       "gathered_equal": True}, res


def _tp_worker(rank: int, world: int, port: int, out: str, tp: int, resume: bool, stop_at: int | None,
               kw: dict) -> None:
    from mechscope.scale.dist import init_distributed

    torch.set_num_threads(1)
    _env(rank, world, port)
    info = init_distributed("gloo", timeout_s=30.0)
    try:
        _train(out, info, resume=resume, tp=tp, die_at=stop_at, **kw)
    except SystemExit:
        pass
    os._exit(0)


def _spawn_tp(out: Path, world: int, tp: int, *, resume: bool = False, stop_at: int | None = None, **kw) -> None:
    out.mkdir(parents=True, exist_ok=True)
    mp.spawn(_tp_worker, args=(world, free_port(), str(out), tp, resume, stop_at, kw), nprocs=world, join=True)


def _merged_final(out: Path) -> dict:
    """The newest checkpoint's tensors with shard files merged (what a one-process checkpoint holds)."""
    from mechscope.dictionaries import SparseDictionary
    from mechscope.training.checkpoints import _merged

    ck = sorted((out / "checkpoints").glob("step_*[0-9]"))[-1]
    got = {}
    for s in _specs():
        names = [n for n, _ in SparseDictionary(s.dictionary).named_parameters()]
        got.update({f"{s.name}/{k}": v for k, v in _merged(ck, s.name, names).items()})
    import json

    got["state"] = json.loads((ck / "state.json").read_text())
    return got


@pytest.mark.parametrize("world,tp", [(2, 2), (4, 2)], ids=["tp2", "dp2xtp2"])
def test_latent_sharded_training_matches_one_process(tmp_path, world, tp):
    torch.set_num_threads(1)
    _train(str(tmp_path / "one"), steps=12)
    _spawn_tp(tmp_path / "tp", world, tp, steps=12)
    ck = sorted((tmp_path / "tp" / "checkpoints").glob("step_*[0-9]"))[-1]
    assert (ck / "topk.shard1-of2.safetensors").is_file() and not (ck / "topk.safetensors").exists()
    _assert_close(_final(tmp_path / "one"), _merged_final(tmp_path / "tp"), atol=1e-6)
    from mechscope.dictionaries import load_dictionary

    a, b = load_dictionary(tmp_path / "one" / "topk"), load_dictionary(tmp_path / "tp" / "topk")  # exported whole
    assert (a.W_dec - b.W_dec).abs().max() <= 1e-6 and b.cfg.d_sae == 40
    got, want = _metrics(tmp_path / "tp"), _metrics(tmp_path / "one")
    assert len(got) == len(want) > 0
    _assert_metrics_close(got, want, ("mse", "loss", "fvu", "l0", "dead_fraction"))  # the whole dictionary's


def test_sharded_checkpoints_resume_in_one_process_and_back(tmp_path):
    torch.set_num_threads(1)
    _train(str(tmp_path / "full"), steps=12)
    shards_to_one = tmp_path / "s2o"  # saved as 2 shards at step 5, resumed by one process
    _spawn_tp(shards_to_one, 2, 2, stop_at=7, steps=12, checkpoint_every_steps=5)
    assert (sorted((shards_to_one / "checkpoints").glob("step_*[0-9]"))[-1] / "relu.shard0-of2.safetensors").is_file()
    _train(str(shards_to_one), resume=True, steps=12, checkpoint_every_steps=5)
    one_to_shards = tmp_path / "o2s"
    _stop_one_process_at(one_to_shards, 7, steps=12, checkpoint_every_steps=5)
    _spawn_tp(one_to_shards, 2, 2, resume=True, steps=12, checkpoint_every_steps=5)
    full = _final(tmp_path / "full")
    _assert_close(full, _final(shards_to_one), atol=1e-6)
    _assert_close(full, _merged_final(one_to_shards), atol=1e-6)


def test_bad_layouts_and_a_missing_shard_are_refused(tmp_path):
    from mechscope.core.errors import CorruptFileError, InputError
    from mechscope.dictionaries import DictionaryConfig
    from mechscope.scale.dist import DistInfo
    from mechscope.training import DictionarySpec, Trainer
    from mechscope.training.checkpoints import _merged
    from mechscope.training.parallel import make_layout
    from tests.distributed.test_training import _cfg

    three = DistInfo(0, 3, 0, torch.device("cpu"), "gloo", 30.0)
    with pytest.raises(InputError, match=r"--tp 2 does not divide the world size 3"):
        make_layout(three, tp=2)
    with pytest.raises(InputError, match=r"--tp 2 does not divide the world size 1"):
        Trainer(_specs(), _cfg(), tmp_path / "x", tp=2)
    spec = DictionarySpec("odd", DictionaryConfig("topk", D, 41, "h", k=3))
    with pytest.raises(InputError, match=r"d_sae=41 is not divisible by --tp 2"):
        from mechscope.training.tensor_parallel import shard_bounds

        shard_bounds(spec.dictionary.d_sae, 0, 2)
    _spawn_tp(tmp_path / "run", 2, 2, steps=4)
    ck = sorted((tmp_path / "run" / "checkpoints").glob("step_*[0-9]"))[-1]
    (ck / "relu.shard1-of2.safetensors").unlink()
    with pytest.raises(CorruptFileError, match=r"lacks shards of 'relu'.*Delete this folder"):
        _merged(ck, "relu", ["W_enc", "b_enc", "W_dec", "b_dec"])
    with pytest.raises(CorruptFileError, match=r"lacks shards of 'relu'"):
        _train(str(tmp_path / "run"), resume=True, steps=4)


def test_sae_train_refuses_a_tp_that_does_not_fit_before_loading_a_model(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from mechscope.cli import app

    base = ["sae", "train", "--hook", "blocks.1.hook_resid_post", "--model", "no-such-model", "--out",
            str(tmp_path / "o")]
    r = CliRunner().invoke(app, base + ["--width", "41", "--tp", "1"] + ["--tp", "2"], terminal_width=300)
    assert r.exit_code == 2 and "--tp 2 does not divide the world size 1" in r.output, r.output
    monkeypatch.setenv("WORLD_SIZE", "2")
    r = CliRunner().invoke(app, base + ["--width", "41", "--tp", "2"], terminal_width=300)
    assert r.exit_code == 2 and "d_sae=41 is not divisible by --tp 2" in r.output, r.output
