"""Feature databases built by two gloo ranks (``build_feature_db(..., dist=)``) against one process.

Claims tested: with 7 batches over 2 ranks (a count 2 does not divide), the merged statistics write the same
database as one process — contexts, examples (top and quantile: the same contexts, positions and per-token
activations), histograms, firing counts, logit effects and co-activation exactly; the mean activation (a float64
sum added in another order) to 1e-12; only rank 0 writes, the per-rank checkpoints are removed.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch.multiprocessing as mp

from tests.distributed.test_dist import _env, free_port
from tests.unit.test_cli import tiny_model_dir  # noqa: F401 (fixture)


def _inputs():
    import torch

    import mechscope
    from mechscope.dictionaries import DictionaryConfig, SparseDictionary
    from tests.conftest import make_tokenizer, tiny_hooked
    from tests.unit.test_feature_stats import CFG, D_SAE, N_CTX, P

    torch.set_num_threads(1)
    model = mechscope.HookedModel(tiny_hooked("llama").hf, tokenizer=make_tokenizer(), name="tiny-llama-words")
    d = SparseDictionary(DictionaryConfig("topk", 64, D_SAE, "blocks.1.hook_resid_post", k=4)).initialize(seed=3)
    with torch.no_grad():
        d.b_enc.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    t = torch.randint(4, 128, (N_CTX, P), generator=g)
    t[:, 0] = 1
    return model, d, t, CFG


def _worker(rank: int, world: int, port: int, out: str) -> None:
    from mechscope.features.build import build_feature_db
    from mechscope.features.sources import FeatureSource
    from mechscope.scale.dist import init_distributed

    _env(rank, world, port)
    model, d, toks, cfg = _inputs()
    info = init_distributed("gloo", timeout_s=30.0)
    db = build_feature_db(FeatureSource(model, dictionary=d), toks, out, cfg, progress=False, dist=info)
    Path(out + f".rank{rank}").write_text("db" if db is not None else "none")
    if db is not None:
        db.close()
    os._exit(0)


def test_two_ranks_write_the_database_one_process_writes(tmp_path):
    import numpy as np

    from mechscope.features.build import build_feature_db
    from mechscope.features.db import FeatureDB
    from mechscope.features.sources import FeatureSource
    from tests.unit.test_feature_stats import _db_content

    model, d, toks, cfg = _inputs()
    assert -(-len(toks) // cfg.batch_contexts) == 7
    with build_feature_db(FeatureSource(model, dictionary=d), toks, tmp_path / "one.duckdb", cfg,
                          progress=False) as db:
        want = _db_content(db)
    out = str(tmp_path / "two.duckdb")
    mp.spawn(_worker, args=(2, free_port(), out), nprocs=2, join=True)
    assert Path(out + ".rank0").read_text() == "db" and Path(out + ".rank1").read_text() == "none"
    assert not Path(out + ".partial").exists()
    with FeatureDB(out) as db:
        got = _db_content(db)
    for name in want:
        if name == "latents":
            a, b = want[name], got[name]
            assert a.drop(columns=["mean_act"]).equals(b.drop(columns=["mean_act"]))
            assert np.allclose(a["mean_act"], b["mean_act"], rtol=1e-12, atol=0)
        elif name != "meta":
            assert want[name].equals(got[name]), name


def test_features_build_under_torchrun_equals_one_process(tmp_path, tiny_model_dir):  # noqa: F811
    """``torchrun --standalone --nproc-per-node=2 -m mechscope features build ...`` against the same command alone."""
    import json
    import subprocess
    import sys

    import numpy as np
    from typer.testing import CliRunner

    from mechscope.cli import app
    from mechscope.dictionaries import DictionaryConfig, SparseDictionary, save_dictionary
    from mechscope.features.db import FeatureDB
    from tests.unit.test_feature_stats import _db_content

    small = SparseDictionary(DictionaryConfig("topk", 32, 24, "blocks.1.hook_resid_post", k=4)).initialize(seed=0)
    ddir = save_dictionary(small, tmp_path / "sae")
    rng = np.random.default_rng(0)
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": " ".join(f"w{i}" for i in rng.integers(0, 120, 40))}) + "\n"
                              for _ in range(40)))
    args = ["features", "build", str(ddir), "--model", str(tiny_model_dir), "--dtype", "float32", "--corpus",
            str(corpus), "--tokens", "600", "--context-len", "16", "--batch-contexts", "4", "--threads", "1"]
    r = CliRunner().invoke(app, args + ["--out", str(tmp_path / "one.duckdb")], terminal_width=300)
    assert r.exit_code == 0, r.output
    torchrun = Path(sys.executable).with_name("torchrun")
    p = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node=2", "-m", "mechscope", *args, "--out",
                        str(tmp_path / "two.duckdb")], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "(2 ranks)" in p.stdout
    with FeatureDB(tmp_path / "one.duckdb") as a, FeatureDB(tmp_path / "two.duckdb") as b:
        want, got = _db_content(a), _db_content(b)
    for name in ("contexts", "examples", "logit_effects", "coactivation"):
        assert want[name].equals(got[name]), name
    assert want["latents"].drop(columns=["mean_act"]).equals(got["latents"].drop(columns=["mean_act"]))


def _sources(model, d):
    from mechscope.dictionaries import DictionaryConfig, SparseDictionary
    from mechscope.features.sources import FeatureSource

    relu = SparseDictionary(DictionaryConfig("relu", 64, 24, "blocks.0.hook_resid_post")).initialize(seed=5)
    return [FeatureSource(model, dictionary=d), FeatureSource(model, dictionary=relu),
            FeatureSource(model, neurons="blocks.0.mlp.hook_post")]


def _worker_multi(rank: int, world: int, port: int, folder: str) -> None:
    from mechscope.features.multi import build_feature_dbs
    from mechscope.scale.dist import init_distributed

    _env(rank, world, port)
    model, d, toks, cfg = _inputs()
    info = init_distributed("gloo", timeout_s=30.0)
    build_feature_dbs(_sources(model, d), toks, [Path(folder, f"{i}.duckdb") for i in range(3)], cfg, progress=False,
                      dist=info)
    os._exit(0)


def test_several_sources_from_one_pass_on_two_ranks(tmp_path):
    """The transcoder set's path (one forward per batch, several sources) split over two ranks: each database
    equals its one-process build."""
    import numpy as np

    from mechscope.features.db import FeatureDB
    from mechscope.features.multi import build_feature_dbs
    from tests.unit.test_feature_stats import _db_content

    model, d, toks, cfg = _inputs()
    build_feature_dbs(_sources(model, d), toks, [tmp_path / f"one{i}.duckdb" for i in range(3)], cfg, progress=False)
    (tmp_path / "two").mkdir()
    mp.spawn(_worker_multi, args=(2, free_port(), str(tmp_path / "two")), nprocs=2, join=True)
    for i in range(3):
        with FeatureDB(tmp_path / f"one{i}.duckdb") as a, FeatureDB(tmp_path / "two" / f"{i}.duckdb") as b:
            want, got = _db_content(a), _db_content(b)
        for name in ("contexts", "examples", "logit_effects", "coactivation"):
            assert want[name].equals(got[name]), (i, name)
        assert want["latents"].drop(columns=["mean_act"]).equals(got["latents"].drop(columns=["mean_act"]))
        assert np.allclose(want["latents"]["mean_act"], got["latents"]["mean_act"], rtol=1e-12, atol=0)
    assert not list((tmp_path / "two").glob("*.partial"))
