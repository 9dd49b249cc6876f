"""Feature databases of several sources from one pass (:func:`mechscope.features.multi.build_feature_dbs`).

Claims tested: every database equals the one the single-source build writes for that source alone (all tables,
meta but the creation time); a build killed mid-pass, or between writing two databases, resumes to the same
databases and keeps the ones already written; bad input (different models, paths not one per source, a state
over the memory budget, a stale checkpoint without resume) is refused before any forward.
"""

from __future__ import annotations

import pytest

import mechscope
from mechscope.core.errors import InputError
from mechscope.dictionaries import DictionaryConfig, SparseDictionary
from mechscope.features.build import build_feature_db
from mechscope.features.db import FeatureDB
from mechscope.features.multi import build_feature_dbs
from mechscope.features.sources import FeatureSource
from mechscope.features.stats import StatsConfig
from tests.unit.test_feature_stats import CFG, _db_content, model, sae, tokens  # noqa: F401 (fixtures)


@pytest.fixture(scope="module")
def sources(model, sae):  # noqa: F811
    relu = SparseDictionary(DictionaryConfig("relu", 64, 24, "blocks.0.hook_resid_post")).initialize(seed=5)
    return [FeatureSource(model, dictionary=sae), FeatureSource(model, dictionary=relu),
            FeatureSource(model, neurons="blocks.0.mlp.hook_post")]


@pytest.fixture(scope="module")
def singles(sources, tokens, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("singles")
    out = []
    for i, s in enumerate(sources):
        with build_feature_db(s, tokens, root / f"{i}.duckdb", CFG, progress=False) as db:
            out.append(_db_content(db))
    return out


def _same(paths, singles):
    for p, want in zip(paths, singles):
        with FeatureDB(p) as db:
            got = _db_content(db)
        for name in want:
            assert want[name].equals(got[name]), (p, name)


def test_one_pass_writes_what_each_single_build_writes(sources, tokens, singles, tmp_path):  # noqa: F811
    calls = []
    orig = sources[0].model.run

    def counting(*a, **k):
        calls.append(1)
        return orig(*a, **k)

    sources[0].model.run = counting
    try:
        paths = build_feature_dbs(sources, tokens, [tmp_path / f"{i}.duckdb" for i in range(3)], CFG, progress=False)
    finally:
        del sources[0].model.run
    assert len(calls) == -(-len(tokens) // CFG.batch_contexts)  # one forward per batch for all three sources
    _same(paths, singles)
    assert not list(tmp_path.glob("*.partial"))


def test_killed_builds_resume_to_the_same_databases(sources, tokens, singles, tmp_path, monkeypatch):  # noqa: F811
    outs = [tmp_path / f"{i}.duckdb" for i in range(3)]
    n = {"calls": 0}
    orig = FeatureSource.from_hook

    def dying(self, x, shape):
        n["calls"] += 1
        if n["calls"] == 3 * 4 + 2:  # during batch index 4 (checkpoint_every=2: the last one after batch 3)
            raise KeyboardInterrupt
        return orig(self, x, shape)

    monkeypatch.setattr(FeatureSource, "from_hook", dying)
    with pytest.raises(KeyboardInterrupt):
        build_feature_dbs(sources, tokens, outs, CFG, progress=False)
    monkeypatch.setattr(FeatureSource, "from_hook", orig)
    assert not any(o.exists() for o in outs) and all(o.with_name(o.name + ".partial").exists() for o in outs)
    with pytest.raises(InputError, match="resume"):
        build_feature_dbs(sources, tokens, outs, CFG, progress=False)
    # second kill: while writing the databases, after the first one is written
    created = []
    orig_create = FeatureDB.create.__func__

    def failing_create(cls, path, *a, **k):
        if created:
            raise OSError("disk full")
        created.append(path)
        return orig_create(cls, path, *a, **k)

    monkeypatch.setattr(FeatureDB, "create", classmethod(failing_create))
    with pytest.raises(OSError):
        build_feature_dbs(sources, tokens, outs, CFG, resume=True, progress=False)
    monkeypatch.undo()
    assert outs[0].exists() and not outs[1].exists()
    mtime = outs[0].stat().st_mtime_ns
    build_feature_dbs(sources, tokens, outs, CFG, resume=True, progress=False)
    assert outs[0].stat().st_mtime_ns == mtime  # kept, not rebuilt
    _same(outs, singles)


def test_bad_input_is_refused_before_any_forward(sources, tokens, tmp_path, model):  # noqa: F811
    other = mechscope.HookedModel(model.hf, tokenizer=model.tokenizer, name="another")
    with pytest.raises(InputError, match="same loaded model"):
        build_feature_dbs([sources[0], FeatureSource(other, neurons="blocks.0.mlp.hook_post")], tokens,
                          [tmp_path / "a.duckdb", tmp_path / "b.duckdb"], CFG, progress=False)
    with pytest.raises(InputError, match="one distinct output path"):
        build_feature_dbs(sources[:2], tokens, [tmp_path / "a.duckdb", tmp_path / "a.duckdb"], CFG, progress=False)
    with pytest.raises(InputError, match="memory_budget_bytes"):
        build_feature_dbs(sources, tokens, [tmp_path / f"{i}.duckdb" for i in range(3)],
                          StatsConfig(**{**CFG.__dict__, "memory_budget_bytes": 10_000}), progress=False)
    with pytest.raises(InputError, match="no feature sources"):
        build_feature_dbs([], tokens, [], CFG)
    with pytest.raises(InputError, match="int64 tensor"):
        build_feature_dbs(sources[:1], tokens.float(), [tmp_path / "a.duckdb"], CFG)
    assert not list(tmp_path.iterdir())
