"""Activation store: the in-memory stream and the on-disk shards (tiny random models, random contexts)."""

from __future__ import annotations

import contextlib
import errno
import json
import os

import pytest
import torch

from mechscope import InputError
from mechscope.core.errors import MemoryBudgetError
from mechscope.data import harvesting as shards_mod  # the writer: its _write_file and shutil are replaced below
from mechscope.data.harvesting import harvest
from mechscope.data.shards import ShardedActivations
from mechscope.data.store import ActivationStream, plan_memory
from tests.conftest import WRONG_TYPE, tiny_hooked

torch.set_num_threads(1)

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.attn.hook_z", "blocks.1.mlp.hook_post"]
N_CTX, CTX = 20, 17  # 16 rows per context after skipping BOS, 320 rows in all


def contexts(n=N_CTX, ctx=CTX, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (n, ctx), generator=g)


@pytest.fixture
def model():
    return tiny_hooked("llama")


def direct(model, hooks, toks):
    """{hook: [n, ctx, d_in]} from one plain run over all contexts."""
    cache = model.run(toks, cache=hooks).cache
    return {h: cache[h].reshape(toks.shape[0], toks.shape[1], -1) for h in hooks}


@contextlib.contextmanager
def count_forward(model):
    """Counts contexts the wrapped transformers model is run on (a forward pre-hook)."""
    seen = []
    handle = model.hf.register_forward_pre_hook(lambda mod, args, kwargs: seen.append(
        (args[0] if args else kwargs["input_ids"]).shape[0]), with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


def stream(model, toks=None, **kw):
    args = dict(batch_tokens=32, buffer_tokens=128, forward_batch_contexts=3, include_positions=True)
    return ActivationStream(model, HOOKS, contexts() if toks is None else toks, **{**args, **kw})


# -- stream ------------------------------------------------------------------------------------------------
def test_stream_rows_are_the_models_activations_aligned_across_hooks(model):
    toks = contexts()
    s = stream(model, toks)
    assert s.d_in == {HOOKS[0]: 64, HOOKS[1]: 64, HOOKS[2]: 96}  # hook_z: n_heads * d_head
    assert s.n_tokens_total == N_CTX * (CTX - 1)
    ref = direct(model, HOOKS, toks)
    batches = list(s)
    assert len(batches) == s.n_batches == 10
    ctx_idx = torch.cat([b["__context__"] for b in batches])
    pos = torch.cat([b["__pos__"] for b in batches]).long()
    # every (context, position) exactly once: nothing lost or repeated by the buffer
    assert len(set(zip(ctx_idx.tolist(), pos.tolist()))) == N_CTX * (CTX - 1)
    assert torch.equal(torch.cat([b["__token__"] for b in batches]).long(), toks[ctx_idx, pos])
    for h in HOOKS:
        rows = torch.cat([b[h] for b in batches])
        assert rows.shape == (320, s.d_in[h]) and rows.dtype == torch.float32
        # row i of every hook is the same token (ctx_idx[i], pos[i]); forward batches of 3 contexts
        # vs one of 20 may differ in the last bits
        torch.testing.assert_close(rows, ref[h][ctx_idx, pos], rtol=1e-5, atol=1e-5)


def test_stream_is_mixed_and_deterministic(model):
    a, b = list(stream(model)), list(stream(model))
    c = list(stream(model, seed=1))
    assert all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x)
    assert not torch.equal(a[0]["__context__"], c[0]["__context__"])
    # a batch mixes rows of several contexts (not one context's positions in order)
    assert len(set(a[0]["__context__"].tolist())) > 3


@pytest.mark.parametrize("start", [1, 3, 4, 7, 9, 10])
def test_stream_start_step_equals_the_tail(model, start):
    full = list(stream(model))
    s = stream(model)
    tail = list(s.batches(start_step=start))
    assert len(tail) == len(full) - start
    for x, y in zip(full[start:], tail):
        assert all(torch.equal(x[k], y[k]) for k in x)
    # the replay re-ran only the forward batches whose rows were still in the buffer, not everything
    assert s.n_forward_contexts <= N_CTX + 12


def test_skip_positions_drops_bos(model):
    toks = contexts(n=4, ctx=9)
    for skip in (0, 1, 3):
        s = ActivationStream(model, HOOKS[:1], toks, batch_tokens=4, buffer_tokens=8, skip_positions=skip,
                             include_positions=True)
        pos = torch.cat([b["__pos__"] for b in s])
        assert s.n_tokens_total == 4 * (9 - skip)
        assert int(pos.min()) == skip and len(pos) == 4 * (9 - skip)


def test_epochs_and_bf16_and_final_norm(model):
    toks = contexts(n=4, ctx=9)
    two = list(ActivationStream(model, "ln_final.hook_normalized", toks, batch_tokens=8, buffer_tokens=16,
                                epochs=2, dtype=torch.bfloat16, include_positions=True))
    assert len(two) == 8 and two[0]["ln_final.hook_normalized"].dtype == torch.bfloat16
    ref = direct(model, ["ln_final.hook_normalized"], toks)["ln_final.hook_normalized"]
    for b in two:
        torch.testing.assert_close(b["ln_final.hook_normalized"],
                                   ref[b["__context__"], b["__pos__"].long()].to(torch.bfloat16))
    forever = ActivationStream(model, HOOKS[0], toks, batch_tokens=8, buffer_tokens=16, epochs=None)
    assert forever.n_batches is None
    it = iter(forever)
    assert len([next(it) for _ in range(20)]) == 20  # 2.5 passes over 32 rows


@pytest.mark.parametrize("kw, field", [
    (dict(buffer_tokens=40), "buffer_tokens"), (dict(batch_tokens=0), "batch_tokens"),
    (dict(skip_positions=17), "skip_positions"), (dict(dtype=torch.int8), "dtype"),
    (dict(forward_batch_contexts=0), "forward_batch_contexts"), (dict(epochs=0), "epochs"),
])
def test_stream_rejects_bad_arguments(model, kw, field):
    with pytest.raises(InputError, match=field):
        stream(model, **kw)


def test_stream_rejects_bad_contexts_and_sites(model):
    with pytest.raises(WRONG_TYPE):  # jaxtyping's check under pytest, mechscope's InputError otherwise
        ActivationStream(model, HOOKS, contexts().float())
    with pytest.raises(InputError, match="vocabulary"):
        ActivationStream(model, HOOKS, contexts() + 1000)
    with pytest.raises(InputError, match="one row per token"):
        ActivationStream(model, "blocks.0.attn.hook_pattern", contexts())


# -- memory budget -------------------------------------------------------------------------------------------
def test_budget_refused_before_any_forward(model, tmp_path):
    plan = plan_memory(model, HOOKS, context_len=CTX, forward_batch_contexts=3, buffer_tokens=128)
    assert {t.name for t in plan.terms} == {"forward", "cache", "buffer", "shuffle copy"}
    assert plan.terms[2].n_bytes == (128 + 3 * 16) * ((64 + 64 + 96) * 4 + 8)
    with count_forward(model) as seen:
        with pytest.raises(MemoryBudgetError, match=r"(?s)buffer: .* MiB.*lower buffer_tokens"):
            stream(model, memory_budget_bytes=plan.total_bytes - 1)
        with pytest.raises(MemoryBudgetError, match="staging"):
            harvest(model, HOOKS, contexts(), tmp_path / "h", memory_budget_bytes=1000, progress=False)
        stream(model, memory_budget_bytes=plan.total_bytes)  # fits exactly
    assert seen == [] and not (tmp_path / "h").exists()


# -- NaN / inf ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def poison(model, row, value):
    """Make block 0's output ``value`` at batch row ``row``, position 5 (a plain torch hook)."""
    def hook(mod, args, out):
        h = out[0] if isinstance(out, tuple) else out
        if h.shape[0] > row:
            h[row, 5] = value
    handle = model.layers[0].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def test_nan_is_an_error_naming_hook_context_position(model, tmp_path):
    with poison(model, 1, float("nan")):
        with pytest.raises(InputError, match=r"blocks\.0\.hook_resid_post, context 1, position 5.*bfloat16"):
            list(stream(model))
        with pytest.raises(InputError, match="context 1, position 5"):
            harvest(model, HOOKS, contexts(), tmp_path / "h", shard_tokens=64, progress=False)
    m = json.loads((tmp_path / "h" / "manifest.json").read_text())
    assert m["shards"] == [] and not list((tmp_path / "h").glob("shard_*"))
    with poison(model, 0, 1e6):  # finite in the model, inf in float16 storage
        with pytest.raises(InputError, match="overflow the storage dtype"):
            list(stream(model, dtype=torch.float16))


# -- harvest and shards ------------------------------------------------------------------------------------
def do_harvest(model, out, toks=None, **kw):
    args = dict(shard_tokens=64, forward_batch_contexts=3, progress=False)
    return harvest(model, HOOKS, contexts() if toks is None else toks, out, **{**args, **kw})


def test_harvest_round_trip(model, tmp_path):
    toks = contexts()
    sa = do_harvest(model, tmp_path / "h")
    assert sa.n_tokens == 320 and sa.dtype == torch.bfloat16 and sa.hooks == HOOKS and len(sa._shards) == 5
    m = sa.manifest
    assert m["complete"] and m["n_tokens"] == 320 and [s["contexts"] for s in m["shards"]][-1] == [16, 20]
    ref = direct(model, HOOKS, toks)
    ci, pos = sa.tensor("__context__"), sa.tensor("__pos__").long()
    assert torch.equal(ci, torch.arange(20).repeat_interleave(16)) and torch.equal(pos, torch.arange(1, 17).repeat(20))
    assert torch.equal(sa.tensor("__token__").long(), toks[:, 1:].reshape(-1))
    for h in HOOKS:
        got = sa.tensor(h)
        assert got.dtype == torch.bfloat16 and got.shape == (320, sa.d_in[h])
        # bf16 keeps 8 bits: at most one rounding step (2**-8 relative) from the fp32 value
        torch.testing.assert_close(got.float(), ref[h][ci, pos], rtol=2**-8, atol=1e-6)
    assert ShardedActivations(tmp_path / "h", verify_checksums=True).n_tokens == 320


def test_shard_batches_are_epoch_permutations_and_resume_exactly(model, tmp_path):
    sa = do_harvest(model, tmp_path / "h")
    it = sa.batches(32, seed=3, include_index=True)
    first = [next(it) for _ in range(25)]  # 10 per epoch: 2.5 epochs
    for e in range(2):
        ep = first[10 * e:10 * (e + 1)]
        rows = torch.cat([b["__context__"] * 100 + b["__pos__"] for b in ep])
        assert len(set(rows.tolist())) == 320  # every row once per epoch
    assert not torch.equal(first[0]["__context__"], first[10]["__context__"])  # fresh permutation per epoch
    b = first[0]
    full = {h: sa.tensor(h, torch.float32) for h in HOOKS}
    row = b["__context__"] * 16 + b["__pos__"].long() - 1  # file order
    for h in HOOKS:
        assert b[h].dtype == torch.float32 and torch.equal(b[h], full[h][row])
    for start in (1, 9, 10, 17):
        resumed = sa.batches(32, seed=3, start_step=start, include_index=True)
        for t in range(start, 25):
            x = next(resumed)
            assert all(torch.equal(x[k], first[t][k]) for k in x)
    rows = torch.tensor([300, 5, 64, 63, 200])  # any order, across shards
    got = sa.gather(rows, [HOOKS[1], "__pos__"])
    assert torch.equal(got[HOOKS[1]], sa.tensor(HOOKS[1])[rows]) and torch.equal(got["__pos__"], sa.tensor("__pos__")[rows])
    with pytest.raises(InputError, match="row indices"):
        sa.gather(torch.tensor([320]), HOOKS)
    sub = next(sa.batches(32, hooks=[HOOKS[2]], dtype=torch.bfloat16))
    assert set(sub) == {HOOKS[2]} and sub[HOOKS[2]].dtype == torch.bfloat16
    short = sa.batches(300, drop_last=False)
    assert [len(next(short)[HOOKS[0]]) for _ in range(3)] == [300, 20, 300]
    with pytest.raises(InputError, match="drop_last"):
        sa.batches(1000)


class Killed(BaseException):
    """Stands in for SIGKILL (not an Exception, so nothing catches it on the way)."""


def faulty_writer(monkeypatch, fail_at_shard, exc):
    """Make the write of shard ``fail_at_shard`` write half its bytes to the tmp file, then raise ``exc``."""
    real = shards_mod._write_file
    def write(path, data):
        if path.name == f".shard_{fail_at_shard:05d}.safetensors.tmp":
            with open(path, "wb") as f:
                f.write(data[: len(data) // 2])
            raise exc
        real(path, data)
    monkeypatch.setattr(shards_mod, "_write_file", write)


def test_kill_and_resume_gives_the_same_bytes(model, tmp_path, monkeypatch):
    clean = do_harvest(model, tmp_path / "clean")
    faulty_writer(monkeypatch, 2, Killed())
    with pytest.raises(Killed):
        do_harvest(model, tmp_path / "h")
    monkeypatch.undo()
    m = json.loads((tmp_path / "h" / "manifest.json").read_text())
    assert len(m["shards"]) == 2 and not m["complete"]
    (tmp_path / "h" / ".shard_00002.safetensors.tmp").write_bytes(b"partial")  # as a real kill leaves it
    with pytest.raises(InputError, match="unfinished harvest.*re-run harvest"):
        ShardedActivations(tmp_path / "h")
    assert ShardedActivations(tmp_path / "h", allow_incomplete=True).n_tokens == 128
    with count_forward(model) as seen:
        sa = do_harvest(model, tmp_path / "h")
    assert sum(seen) == 12  # contexts 8..19 only
    assert sorted(os.listdir(tmp_path / "h")) == sorted(os.listdir(tmp_path / "clean"))
    for f in os.listdir(tmp_path / "clean"):
        assert (tmp_path / "h" / f).read_bytes() == (tmp_path / "clean" / f).read_bytes(), f
    assert sa.n_tokens == clean.n_tokens
    with count_forward(model) as seen:  # complete: returns at once
        do_harvest(model, tmp_path / "h")
    assert seen == []


def test_resume_with_other_settings_is_refused(model, tmp_path):
    do_harvest(model, tmp_path / "h")
    with pytest.raises(InputError, match=r"(?s)dtype: on disk bfloat16, now float32.*new out_dir"):
        do_harvest(model, tmp_path / "h", dtype=torch.float32)
    with pytest.raises(InputError, match="contexts_sha256"):
        do_harvest(model, tmp_path / "h", toks=contexts(seed=1))
    with pytest.raises(InputError, match="hooks"):
        harvest(model, HOOKS[:1], contexts(), tmp_path / "h", shard_tokens=64, forward_batch_contexts=3,
                progress=False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not empty"):
        do_harvest(model, tmp_path / "other")


def test_damaged_shards_are_named_and_repaired_by_harvest(model, tmp_path):
    out = tmp_path / "h"
    do_harvest(model, out)
    good = (out / "shard_00003.safetensors").read_bytes()
    with open(out / "shard_00003.safetensors", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(InputError, match=r"shard_00003\.safetensors has 1,000 bytes.*Re-run harvest"):
        ShardedActivations(out)
    (out / "shard_00001.safetensors").write_bytes(b"\xff" * 8 + (out / "shard_00001.safetensors").read_bytes()[8:])
    with pytest.raises(InputError, match=r"shard_00001\.safetensors has a corrupted safetensors header"):
        ShardedActivations(out)
    with pytest.warns(UserWarning, match="shard_00001"):
        do_harvest(model, out)
    assert (out / "shard_00003.safetensors").read_bytes() == good
    assert ShardedActivations(out, verify_checksums=True).n_tokens == 320
    (out / "shard_00004.safetensors").unlink()
    with pytest.raises(InputError, match="shard_00004.safetensors is missing"):
        ShardedActivations(out)


def test_disk_full_leaves_a_loadable_directory(model, tmp_path, monkeypatch):
    out = tmp_path / "h"
    faulty_writer(monkeypatch, 2, OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(OSError, match=r"disk full while writing shard_00002.*needs [\d,]+ bytes.*free") as e:
        do_harvest(model, out)
    assert e.value.errno == errno.ENOSPC
    monkeypatch.undo()
    # the finished shards, listed, with their sidecars (removed once the harvest completes)
    assert sorted(os.listdir(out)) == [".shard_00000.json", ".shard_00001.json", "manifest.json",
                                       "shard_00000.safetensors", "shard_00001.safetensors"]
    sa = ShardedActivations(out, allow_incomplete=True, verify_checksums=True)
    assert sa.n_tokens == 128 and next(sa.batches(32))[HOOKS[0]].shape == (32, 64)
    assert do_harvest(model, out).n_tokens == 320  # space freed: resumes
    assert not list(out.glob(".shard_*"))


def test_disk_too_small_is_refused_before_any_forward(model, tmp_path, monkeypatch):
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shards_mod.shutil, "disk_usage", lambda p: usage(10**6, 10**6 - 5000, 5000))
    with count_forward(model) as seen:
        with pytest.raises(OSError, match=r"needs about [\d,]+ bytes .* has 5,000 bytes free"):
            do_harvest(model, tmp_path / "h")
    assert seen == []
