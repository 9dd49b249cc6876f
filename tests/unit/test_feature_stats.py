"""Feature statistics and the feature database on a tiny Llama: every statistic of the streaming pass
equals a naive computation on all activations at once, a resumed build equals an uninterrupted one, and
the database returns what was stored."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import mechscope

from mechscope.core.errors import InputError
from mechscope.dictionaries import DictionaryConfig, SparseDictionary
from mechscope.features.db import FeatureDB, write_feature_db
from mechscope.features.sources import FeatureSource, final_norm_gain
from mechscope.features.build import build_feature_db, finalize
from mechscope.features.stats import StatsConfig, compute_feature_stats
from tests.conftest import make_tokenizer, tiny_hooked

torch.set_num_threads(1)
N_CTX, P, D_SAE = 26, 12, 40
CFG = StatsConfig(top_k=5, n_quantile_bins=3, per_bin=2, n_logits=4, n_coact=3, batch_contexts=4,
                  checkpoint_every=2, seed=1)


@pytest.fixture(scope="module")
def model():
    """Its own HookedModel over the cached tiny Llama: the shared tiny_hooked("llama") has no tokenizer,
    and other tests rely on that (setting one on it would leak into them)."""
    return mechscope.HookedModel(tiny_hooked("llama").hf, tokenizer=make_tokenizer(), name="tiny-llama-words")


@pytest.fixture(scope="module")
def sae():
    cfg = DictionaryConfig("topk", 64, D_SAE, "blocks.1.hook_resid_post", k=4)
    d = SparseDictionary(cfg).initialize(seed=3)
    with torch.no_grad():
        d.b_enc.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    return d


@pytest.fixture(scope="module")
def tokens():
    g = torch.Generator().manual_seed(0)
    t = torch.randint(4, 128, (N_CTX, P), generator=g)
    t[:, 0] = 1  # BOS
    t[3, 2:5] = torch.tensor([t[3, 2], 7, 7])
    return t


def naive_acts(source, tokens, cfg=CFG):
    """All activations [n, P, N] at once, from a plain cached forward and the dictionary's own dense encode
    (same batching as the pass, so the forwards are bit-identical)."""
    out = []
    for s in range(0, len(tokens), cfg.batch_contexts):
        x = source.model.run(tokens[s:s + cfg.batch_contexts], cache=[source.hook]).cache[source.hook]
        out.append(x if source.dictionary is None else source.dictionary.encode(x))
    acts = torch.cat(out).float().detach()
    acts[:, 0] = 0
    return acts


@pytest.fixture(scope="module")
def computed(model, sae, tokens):
    src = FeatureSource(model, dictionary=sae)
    stats = compute_feature_stats(src, tokens, CFG, progress=False)
    return src, finalize(stats, src, CFG), naive_acts(src, tokens)


def test_density_max_mean_hist_equal_naive(computed):
    _, final, acts = computed
    flat = acts[:, 1:].reshape(-1, D_SAE)
    assert final.n_tokens == flat.shape[0]
    fired = (flat > 0).sum(0)
    assert torch.equal(final.fired, fired)
    torch.testing.assert_close(final.density, fired.double() / flat.shape[0])
    torch.testing.assert_close(final.act_max, torch.where(fired > 0, flat.amax(0), 0.0))
    mean = torch.where(fired > 0, flat.clamp_min(0).sum(0) / fired.clamp_min(1), 0.0)
    torch.testing.assert_close(final.act_mean, mean.float(), rtol=1e-5, atol=1e-6)
    assert torch.equal(final.hist.sum(1), fired)
    edges = torch.tensor(final.hist_edges)
    for i in range(D_SAE):  # each positive value in its fixed log10 bin
        v = flat[:, i][flat[:, i] > 0].log10()
        b = (torch.bucketize(v, edges, right=True) - 1).clamp(0, len(edges) - 2)
        assert torch.equal(torch.bincount(b, minlength=len(edges) - 1), final.hist[i])


def test_top_examples_equal_naive_sort(computed, tokens):
    _, final, acts = computed
    cmax, cpos = acts.max(dim=1)  # [n, N]
    for i in range(D_SAE):
        firing = (cmax[:, i] > 0).nonzero().flatten()
        order = firing[cmax[firing, i].argsort(descending=True, stable=True)][:CFG.top_k]  # ties: earlier first
        got = final.top["ctx"][i]
        # values equal exactly; contexts too, except a tie at the k-th value may keep either context
        assert final.top["val"][i, : len(order)].tolist() == cmax[order, i].tolist()
        last = cmax[order[-1], i] if len(order) else None
        same = (cmax[got[: len(order)], i] != last) if len(order) else got[:0].bool()
        assert got[: len(order)][same].tolist() == order[same].tolist()
        order = got[: len(order)]
        assert (got[len(order):] == -1).all()
        for r, c in enumerate(order.tolist()):
            assert final.top["pos"][i, r] == cpos[c, i]
            assert torch.equal(final.top["acts"][i, r], acts[c, :, i])  # exact per-token activations
            assert final.top["val"][i, r] == cmax[c, i]


def test_quantile_examples_lie_in_their_bins(computed):
    _, final, acts = computed
    q = final.quant
    cmax = acts.max(dim=1).values
    n_checked = 0
    for i in range(D_SAE):
        edges = q["edges"][i]
        assert (edges[1:] >= edges[:-1]).all()
        for j in (q["ctx"][i] >= 0).nonzero().flatten().tolist():
            c, b, v = int(q["ctx"][i, j]), int(q["bin"][i, j]), float(q["val"][i, j])
            assert v == float(cmax[c, i]) > 0
            assert float(edges[b]) <= v <= float(edges[b + 1])
            assert torch.equal(q["acts"][i, j], acts[c, :, i])
            n_checked += 1
        # within a latent a context appears at most once
        ids = q["ctx"][i][q["ctx"][i] >= 0]
        assert len(set(ids.tolist())) == len(ids)
    assert n_checked > D_SAE


def test_coactivation_equals_dense_count(computed, tokens):
    src, final, acts = computed
    on = (acts[:, 1:].reshape(-1, D_SAE) > 0).double()
    C = (on.T @ on).long()
    stats = compute_feature_stats(src, tokens, CFG, progress=False)
    assert torch.equal(stats.tensors["coact"].long(), C.triu(1))  # the pass counts the upper triangle
    d = C.diagonal()
    jac = C.double() / (d[:, None] + d[None, :] - C).clamp_min(1)
    jac.fill_diagonal_(-1)
    for i in range(D_SAE):
        got = final.coact["ids"][i]
        valid = got >= 0
        assert torch.allclose(final.coact["jaccard"][i][valid].double(), jac[i, got[valid]], atol=1e-6)
        assert torch.equal(final.coact["count"][i][valid], C[i, got[valid]])
        assert abs(float(final.coact["jaccard"][i, 0]) - max(float(jac[i].max()), 0.0)) < 1e-6


def test_logit_effects_equal_naive(computed, model, sae):
    _, final, _ = computed
    norm_w = model.module("model.norm").weight.detach().float()
    logits = (sae.W_dec.detach() * norm_w) @ model.W_U.detach().float()
    up_v, up_i, down_v, down_i = final.logits
    torch.testing.assert_close(up_v, logits.topk(CFG.n_logits, dim=1).values)
    assert torch.equal(up_i, logits.topk(CFG.n_logits, dim=1).indices)
    assert torch.equal(down_i, logits.topk(CFG.n_logits, dim=1, largest=False).indices)
    assert torch.equal(final_norm_gain(model), norm_w)


def test_neurons_source(model, tokens):
    src = FeatureSource(model, neurons="blocks.0.mlp.hook_post")
    cfg = StatsConfig(top_k=3, n_quantile_bins=2, per_bin=2, batch_contexts=8, checkpoint_every=0)
    final = finalize(compute_feature_stats(src, tokens, cfg, progress=False), src, cfg)
    acts = naive_acts(src, tokens, cfg)
    assert final.density.shape == (model.cfg.d_mlp,)
    torch.testing.assert_close(final.act_max, acts[:, 1:].reshape(-1, model.cfg.d_mlp).amax(0).clamp_min(0))
    down = model.layer_module(0, "mlp.down_proj").weight.detach().float().T  # [d_mlp, d_model]
    logits = (down * model.module("model.norm").weight.float()) @ model.W_U.float()
    assert torch.equal(final.logits[1], logits.topk(10, dim=1).indices)
    with pytest.raises(InputError, match="mlp.hook_post"):
        FeatureSource(model, neurons="blocks.0.hook_resid_post")


def test_bad_inputs(model, sae, tokens):
    with pytest.raises(InputError, match="no contexts"):
        compute_feature_stats(FeatureSource(model, dictionary=sae), tokens[:0], CFG, progress=False)
    other = SparseDictionary(DictionaryConfig("topk", 64, 8, "blocks.7.hook_resid_post", k=2))
    with pytest.raises(InputError, match="does not have"):
        FeatureSource(model, dictionary=other)
    with pytest.raises(InputError, match="sample_size"):
        StatsConfig(sample_size=3)
    with pytest.raises(InputError, match="Lower top_k"):
        compute_feature_stats(FeatureSource(model, dictionary=sae), tokens, StatsConfig(memory_budget_bytes=1000),
                              progress=False)


def _db_content(db: FeatureDB) -> dict:
    out = {}
    for name in ("latents", "contexts", "examples", "logit_effects", "coactivation"):
        out[name] = db.table(name)
    meta = db.table("meta")
    out["meta"] = meta[meta.key != "created"].reset_index(drop=True)
    return out


def test_resume_after_kill_gives_identical_db(model, sae, tokens, tmp_path):
    src = FeatureSource(model, dictionary=sae)
    ref = build_feature_db(src, tokens, tmp_path / "ref.duckdb", CFG, progress=False)
    out = tmp_path / "killed.duckdb"

    def kill(bi):
        if bi == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_feature_db(src, tokens, out, CFG, progress=False, on_batch=kill)
    assert not out.exists() and (tmp_path / "killed.duckdb.partial" / "state.json").exists()
    assert not list(tmp_path.glob("killed.duckdb.*.building"))
    with pytest.raises(InputError, match="resume"):
        build_feature_db(src, tokens, out, CFG, progress=False)
    with pytest.raises(InputError, match="other settings"):
        build_feature_db(src, tokens, out, StatsConfig(**{**CFG.__dict__, "top_k": 6}), resume=True, progress=False)
    seen = []
    db = build_feature_db(src, tokens, out, CFG, resume=True, progress=False, on_batch=seen.append)
    assert seen[0] == 4  # batches 0..3 came from the checkpoint (saved after batch index 3)
    a, b = _db_content(ref), _db_content(db)
    for name in a:
        assert a[name].equals(b[name]), name
    assert not (tmp_path / "killed.duckdb.partial").exists()


def test_db_queries_return_what_was_stored(model, sae, tokens, tmp_path, computed):
    _, final, acts = computed
    src = FeatureSource(model, dictionary=sae)
    db = build_feature_db(src, tokens, tmp_path / "f.duckdb", CFG, progress=False, meta={"corpus": ["x"]})
    assert db.n_latents == D_SAE and db.meta["corpus"] == ["x"] and db.meta["n_tokens"] == final.n_tokens
    i = int(final.fired.argmax())
    f = db.feature(i)
    assert f["n_fired"] == int(final.fired[i]) and f["density"] == pytest.approx(float(final.density[i]))
    assert [e["context_id"] for e in f["top"]] == [c for c in final.top["ctx"][i].tolist() if c >= 0]
    e = f["top"][0]
    c = e["context_id"]
    # the exact text of the context, and each token's span of it (this word-level tokenizer joins with spaces)
    assert e["text"] == model.tokenizer.decode(tokens[c].tolist(), skip_special_tokens=False)
    assert "".join(e["tokens"]) == e["text"] and len(e["tokens"]) == tokens.shape[1]
    assert [t.strip() for t in e["tokens"]] == [model.tokenizer.decode([t]) for t in tokens[c].tolist()]
    assert np.allclose(e["acts"], acts[c, :, i].numpy()) and e["max_token"] == e["tokens"][e["max_pos"]]
    assert len(f["quantiles"]) == int((final.quant["ctx"][i] >= 0).sum())
    assert [x["token_id"] for x in f["logits"]["up"]] == final.logits[1][i].tolist()
    assert [x["id"] for x in f["coactivation"]] == [o for o in final.coact["ids"][i].tolist() if o >= 0]
    assert i in db.search_tokens(e["max_token"], limit=D_SAE)
    up = f["logits"]["up"][0]["token"]
    assert i in db.search_tokens(up, limit=D_SAE)
    snippet = "".join(e["tokens"][3:5])
    assert i in db.search_text(snippet.upper(), limit=D_SAE)
    page = db.list_latents("density", 0, 5)
    assert [p["density"] for p in page] == sorted([p["density"] for p in page], reverse=True)
    assert page[0]["id"] == i or page[0]["density"] >= f["density"]
    assert [p["id"] for p in db.list_latents("id", 10, 3)] == [10, 11, 12]
    with pytest.raises(InputError, match="latents 0..39"):
        db.feature(D_SAE)
    with pytest.raises(InputError, match="order_by"):
        db.list_latents("nope")
    with pytest.raises(InputError, match="read-only"):
        db.add_label(i, "numbers")
    db.close()
    with FeatureDB(tmp_path / "f.duckdb", read_only=False) as w:
        w.add_label(i, "the <script>alert(1)</script> feature", score=0.8, score_kind="detection", explainer="x")
    with FeatureDB(tmp_path / "f.duckdb") as r:
        assert r.search_labels("<SCRIPT>", 5) == [i]
        assert r.feature(i)["labels"][0]["label"] == "the <script>alert(1)</script> feature"
        assert r.list_latents("id", i, 1)[0]["label"].startswith("the <script>")


def test_script_tokens_round_trip(tmp_path):
    import pyarrow as pa

    strs = ["<script>", "alert('x')", "</script>", " &amp;", "\u00e9\u20ac"]
    tables = {"contexts": pa.table({"context_id": pa.array([0], pa.int32()),
                                    "token_ids": pa.array([list(range(5))], pa.list_(pa.int32())),
                                    "str_tokens": pa.array([strs], pa.list_(pa.string())),
                                    "text": ["".join(strs)]}),
              "latents": pa.table({"id": pa.array([0], pa.int32()), "density": [0.5], "max_act": pa.array([1.0], pa.float32()),
                                   "mean_act": pa.array([1.0], pa.float32()), "n_fired": [1],
                                   "histogram": pa.array([[1]], pa.list_(pa.int32())),
                                   "quantile_edges": pa.array([[0.0, 1.0]], pa.list_(pa.float32()))}),
              "examples": pa.table({"latent_id": pa.array([0], pa.int32()), "kind": ["top"], "bin": pa.array([-1], pa.int16()),
                                    "rank": pa.array([0], pa.int16()), "context_id": pa.array([0], pa.int32()),
                                    "max_pos": pa.array([0], pa.int16()), "max_token": ["<script>"],
                                    "max_act": pa.array([1.0], pa.float32()),
                                    "acts": pa.array([[1.0, 0, 0, 0, 0]], pa.list_(pa.float32()))})}
    write_feature_db(tmp_path / "s.duckdb", tables, {"model": "x"})
    with FeatureDB(tmp_path / "s.duckdb") as db:
        f = db.feature(0)
        assert f["top"][0]["tokens"] == strs and f["top"][0]["max_token"] == "<script>"
        assert db.search_tokens("<script>", 3) == [0] and db.search_text("</script> &amp;", 3) == [0]
        assert math.isclose(f["density"], 0.5)


def test_many_changed_slots_use_the_transposed_gather(model, sae, tokens, monkeypatch, computed):
    import mechscope.features.stats as stats_mod

    monkeypatch.setattr(stats_mod, "_TRANSPOSE_ROWS", 0)
    src = FeatureSource(model, dictionary=sae)
    final = finalize(compute_feature_stats(src, tokens, CFG, progress=False), src, CFG)
    ref = computed[1]
    assert torch.equal(final.top["acts"], ref.top["acts"]) and torch.equal(final.quant["acts"], ref.quant["acts"])


def test_cli_build(tmp_path, monkeypatch):
    import json

    from typer.testing import CliRunner

    from mechscope.cli.features import features_app
    from mechscope.dictionaries import save_dictionary
    from tests.unit.test_cli import _save_tiny_llama

    monkeypatch.setenv("MECHSCOPE_CACHE", str(tmp_path / "cache"))
    mdir = _save_tiny_llama(tmp_path / "model", make_tokenizer())
    small = SparseDictionary(DictionaryConfig("topk", 32, 24, "blocks.1.hook_resid_post", k=4)).initialize(seed=0)
    ddir = save_dictionary(small, tmp_path / "sae")
    corpus = tmp_path / "docs.jsonl"
    rng = np.random.default_rng(0)
    corpus.write_text("".join(json.dumps({"text": " ".join(f"w{i}" for i in rng.integers(0, 124, 40))}) + "\n"
                              for _ in range(40)))
    common = ["--model", str(mdir), "--dtype", "float32", "--corpus", str(corpus), "--tokens", "600",
              "--context-len", "16", "--threads", "1"]
    runner = CliRunner()
    r = runner.invoke(features_app, ["build", str(ddir), "--out", str(tmp_path / "f.duckdb"), *common])
    assert r.exit_code == 0, r.output
    with FeatureDB(tmp_path / "f.duckdb") as db:
        assert db.n_latents == 24 and db.meta["corpus"] == [str(corpus)] and db.meta["n_tokens"] > 0
        f = db.feature(int(db.list_latents("density", 0, 1)[0]["id"]))
        assert f["top"] and all(t.strip().startswith(("w", "<bos>", "<eos>")) for t in f["top"][0]["tokens"])
    r = runner.invoke(features_app, ["build", "--neurons", "blocks.1.mlp.hook_post", "--out", str(tmp_path / "n.duckdb"),
                                     *common])
    assert r.exit_code == 0, r.output
    with FeatureDB(tmp_path / "n.duckdb") as db:
        assert db.n_latents == 48 and db.meta["source"]["kind"] == "neurons"
    r = runner.invoke(features_app, ["build", "--out", str(tmp_path / "x.duckdb"), *common])
    assert r.exit_code == 2 and "exactly one" in r.output


def test_bf16_encode_is_close(model, sae, tokens):
    src = FeatureSource(model, dictionary=sae, encode_dtype="bfloat16")
    acts, _ = src.activations(tokens[:4])
    ref = naive_acts(FeatureSource(model, dictionary=sae), tokens[:4])
    assert (acts - ref).abs().max() < 0.05 * ref.abs().max()
