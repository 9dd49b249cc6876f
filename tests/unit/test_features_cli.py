"""``mechscope features build`` end to end on a tiny model: a dictionary folder and a text corpus in, a
feature database out whose statistics equal the library call's, with the encoder precision chosen from the
model dtype (``--encode-dtype auto``) and bad options refused before any work."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from mechscope.cli import app
from mechscope.dictionaries import DictionaryConfig, SparseDictionary, save_dictionary
from mechscope.features import FeatureDB
from tests.unit.test_cli import tiny_model_dir  # noqa: F401 (fixture)

runner = CliRunner()


@pytest.fixture(scope="module")
def inputs(tiny_model_dir, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("fcli")
    save_dictionary(SparseDictionary(DictionaryConfig("topk", 32, 24, "blocks.1.hook_resid_post", k=4)).initialize(0),
                    root / "sae")
    g = torch.Generator().manual_seed(0)
    docs = [" ".join(f"w{int(i)}" for i in torch.randint(4, 124, (60,), generator=g)) for _ in range(40)]
    (root / "corpus.txt").write_text("\n\n".join(docs))
    return root, tiny_model_dir


def _build(root, model_dir, name, *extra):
    args = ["features", "build", str(root / "sae"), "--out", str(root / name), "--model", str(model_dir),
            "--corpus", str(root / "corpus.txt"), "--tokens", "1200", "--context-len", "16", "--top-k", "3",
            "--threads", "1", *extra]
    return runner.invoke(app, args)


def test_build_writes_a_database_and_encode_dtype_follows_the_model(inputs):
    root, model_dir = inputs
    r = _build(root, model_dir, "f32.duckdb", "--dtype", "float32")
    assert r.exit_code == 0, r.output
    import mechscope
    from mechscope.data import corpus_tokens
    from mechscope.dictionaries import load_dictionary
    from mechscope.features import FeatureSource, StatsConfig, build_feature_db

    m = mechscope.load(str(model_dir), dtype="float32")
    toks = corpus_tokens([str(root / "corpus.txt")], m.tokenizer, 16, "train", max_tokens=1200).tokens
    lib = build_feature_db(FeatureSource(m, dictionary=load_dictionary(root / "sae")), toks, root / "lib.duckdb",
                           StatsConfig(top_k=3), progress=False)
    with FeatureDB(root / "f32.duckdb") as db:
        assert db.n_latents == 24 and db.meta["n_tokens"] == lib.meta["n_tokens"] >= 1000
        assert db.meta["dtype"] == "float32" and "encode_dtype" not in db.meta["source"]  # fp32 model: exact encode
        for i in range(24):  # the CLI computes what the library call computes
            a, b = db.feature(i), lib.feature(i)
            assert (a["n_fired"], a["max_act"]) == (b["n_fired"], b["max_act"])
            assert [e["tokens"] for e in a["top"]] == [e["tokens"] for e in b["top"]]
        assert sum(db.feature(i)["n_fired"] for i in range(24)) > 0
    lib.close()
    r = _build(root, model_dir, "bf16.duckdb", "--dtype", "bfloat16")
    assert r.exit_code == 0, r.output
    with FeatureDB(root / "bf16.duckdb") as db:
        assert db.meta["source"]["encode_dtype"] == "bfloat16"  # auto: bf16 model -> bf16 encoder matmul
    r = _build(root, model_dir, "bf16x.duckdb", "--dtype", "bfloat16", "--encode-dtype", "float32")
    assert r.exit_code == 0, r.output
    with FeatureDB(root / "bf16x.duckdb") as db:
        assert "encode_dtype" not in db.meta["source"]


def test_bad_encode_dtype_is_refused_before_any_work(inputs):
    root, model_dir = inputs
    r = _build(root, model_dir, "bad.duckdb", "--encode-dtype", "float16")
    assert r.exit_code == 2 and "--encode-dtype must be auto, float32 or bfloat16" in r.output
    assert not (root / "bad.duckdb").exists()
