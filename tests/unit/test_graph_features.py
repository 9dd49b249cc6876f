"""Feature databases of a transcoder set, and the graph page's feature details and steering, on a tiny Llama.

Claims tested: the set's databases come from one pass and equal each layer's single-source build; they open
against the set and refuse a set with other weights; steering a graph's feature to 0 equals clamping that latent
to 0 with the transcoder spliced (error term kept) through the independent LatentSteer path, scale 1 changes
nothing, and the continuation before steering is plain greedy generation; the API serves a clicked feature's
contexts and label, steers, splits an edge over heads (keeping the prompt's replacement state), and answers bad
node ids and a server without transcoders with a readable 4xx.
"""

from __future__ import annotations

import pytest
import torch

from mechscope.core.errors import InputError
from tests.conftest import random_tokens
from tests.unit.test_graphs import random_set, tiny64


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from mechscope.features.build import build_feature_db
    from mechscope.features.sources import FeatureSource
    from mechscope.features.stats import StatsConfig
    from mechscope.graphs import attribute, prune, to_neuronpedia
    from mechscope.graphs.features import build_set_features

    root = tmp_path_factory.mktemp("setfeatures")
    m = tiny64()
    ts = random_set(m)
    tokens = random_tokens(24, 12, seed=1)
    cfg = StatsConfig(top_k=4, per_bin=2, n_quantile_bins=2, batch_contexts=8)
    paths = build_set_features(m, ts, tokens, folder=root, cfg=cfg, progress=False)
    single = build_feature_db(FeatureSource(m, dictionary=ts[1], dictionary_path=str(root.resolve() / "L01")), tokens,
                              root / "single.duckdb", cfg, progress=False)
    g = attribute(m, ts, random_tokens(1, 8, seed=3)[0], max_feature_nodes=None, progress=False)
    d = to_neuronpedia(g, slug="tiny", pruned=prune(g, 0.95, 0.99))
    return root, m, ts, paths, single, g, d


def test_the_sets_databases_equal_single_builds_and_check_their_weights(built):
    from mechscope.graphs.features import open_set_features
    from tests.unit.test_feature_stats import _db_content

    root, m, ts, paths, single, *_ = built
    assert sorted(paths) == [0, 1] and all(p.parent == root / "features" for p in paths.values())
    dbs = open_set_features(root, ts)
    a, b = _db_content(dbs[1]), _db_content(single)
    for name in a:
        if name != "meta":
            assert a[name].equals(b[name]), name
    assert dbs[0].meta["layer"] == 0 and dbs[1].n_latents == ts[1].cfg.d_sae
    other = random_set(m)
    with torch.no_grad():
        other[1].W_dec.mul_(2)
    with pytest.raises(InputError, match="other weights"):
        open_set_features(root, other)
    assert set(open_set_features(root)) == {0, 1}  # without a set: whatever databases are there


def _feature_nodes(d):
    return [n for n in d["nodes"] if n["feature_type"] == "cross layer transcoder"]


def test_steering_a_node_to_zero_equals_clamping_its_latent(built):
    from mechscope.features.generation import generate
    from mechscope.features.steering import steer_latents
    from mechscope.graphs.steer import steer_graph_features

    _, m, ts, _, _, g, d = built
    node = max(_feature_nodes(d), key=lambda n: n["activation"])
    layer, latent, pos = (int(x) for x in node["node_id"].split("_"))
    r = steer_graph_features(m, ts, d, [node["node_id"]], scale=0.0, max_new_tokens=3)
    steer = steer_latents(ts[layer], {latent: 0.0}, mode="clamp", positions=[pos])
    with torch.no_grad():
        want = m.run(g.tokens[None], **steer.run_kwargs()).logits[0, -1].double().softmax(-1)
        plain = m.run(g.tokens[None]).logits[0, -1].double().softmax(-1)
    assert r["targets"] and all(abs(t["prob_after"] - float(want[t["id"]])) < 1e-9 for t in r["targets"])
    assert all(abs(t["prob_before"] - float(plain[t["id"]])) < 1e-9 for t in r["targets"])
    assert r["top_after"][0]["id"] == int(want.argmax()) and r["kl"] > 0
    assert r["continuation_before"] == str(generate(m, g.tokens, max_new_tokens=3).new_tokens.tolist())
    same = steer_graph_features(m, ts, d, [node["node_id"]], scale=1.0, max_new_tokens=0)
    assert same["kl"] < 1e-12 and all(abs(t["logit_diff"]) < 1e-9 for t in same["targets"])
    error = next(n["node_id"] for n in d["nodes"] if n["feature_type"] == "mlp reconstruction error")
    with pytest.raises(InputError, match="only transcoder features"):
        steer_graph_features(m, ts, d, [error])
    with pytest.raises(InputError, match="not in this graph"):
        steer_graph_features(m, ts, d, ["0_9999_0"])
    with pytest.raises(InputError, match="twice"):
        steer_graph_features(m, ts, d, [node["node_id"]] * 2)


def test_the_graph_api_serves_features_and_steering(built):
    from fastapi.testclient import TestClient

    from mechscope.app import AppState, create_app
    from mechscope.graphs.features import open_set_features

    root, m, ts, _, _, _, d = built
    state = AppState(model=m, graph=d, graph_transcoders=ts, graph_features=open_set_features(root, ts))
    c = TestClient(create_app(state))
    r = c.get("/api/graph").json()
    assert r["steering"]["available"] and r["features"]["available"] == [0, 1]
    node = max(_feature_nodes(d), key=lambda n: n["activation"])
    layer, latent, _ = (int(x) for x in node["node_id"].split("_"))
    f = c.get(f"/api/graph/node/{node['node_id']}").json()
    want = state.graph_features[layer].feature(latent)
    assert f["feature"]["max_act"] == want["max_act"] and f["feature"]["top"][0]["tokens"] == want["top"][0]["tokens"]
    assert f["feature"]["label"] is None  # no label until `features explain`
    s = c.post("/api/graph/steer", json={"nodes": [node["node_id"]], "scale": 0, "max_new_tokens": 2})
    assert s.status_code == 200 and s.json()["nodes"][0]["latent"] == latent
    error = next(n["node_id"] for n in d["nodes"] if n["feature_type"] == "mlp reconstruction error")
    assert c.get(f"/api/graph/node/{error}").status_code == 404
    bad = c.post("/api/graph/steer", json={"nodes": [error]})
    assert bad.status_code == 400 and "only transcoder features" in bad.json()["detail"]
    assert c.post("/api/graph/steer", json={"nodes": []}).status_code == 422
    link = max(d["links"], key=lambda e: abs(e["weight"]))
    e = c.get("/api/graph/edge", params={"source": link["source"], "target": link["target"]})
    assert e.status_code == 200 and e.json()["edge"] == pytest.approx(link["weight"], rel=1e-4, abs=1e-6)
    assert "replacement" in state.graph_cache  # kept for the next edge
    assert c.get("/api/graph/edge", params={"source": link["source"], "target": link["target"]}).json() == e.json()
    assert c.get("/api/graph/edge", params={"source": "x", "target": link["target"]}).status_code == 400
    x = c.post("/api/graph/export", json={"pinned": [node["node_id"]], "supernodes": [["g", node["node_id"], error]]})
    assert x.status_code == 200 and "attachment" in x.headers["content-disposition"]
    assert x.json()["qParams"]["supernodes"] == [["g", node["node_id"], error]] and x.json()["nodes"] == d["nodes"]
    bad = c.post("/api/graph/export", json={"pinned": ["nope"]})
    assert bad.status_code == 400 and "'nope' is not in this graph" in bad.json()["detail"]
    assert c.post("/api/graph/export", json={"supernodes": [["only one", error]]}).status_code == 400
    bare = TestClient(create_app(AppState(model=m, graph=d)))
    assert "--transcoders" in bare.get("/api/graph/edge", params={"source": link["source"],
                                                                  "target": link["target"]}).json()["detail"]
    r = bare.get("/api/graph").json()
    assert not r["steering"]["available"] and "--transcoders" in r["steering"]["why"]
    assert bare.get(f"/api/graph/node/{node['node_id']}").json()["feature"] is None
    r = bare.post("/api/graph/steer", json={"nodes": [node["node_id"]]})
    assert r.status_code == 404 and "--transcoders" in r.json()["detail"]
