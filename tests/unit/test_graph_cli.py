"""``mechscope transcoders train|eval`` and ``mechscope graph`` on a tiny random Llama with a word tokenizer.

Claims tested: ``transcoders train`` trains one transcoder per layer from a text file in one pass, writes the
manifest and ``eval.json`` (per-layer rows and the whole set's CE loss recovered) and the set loads in one call;
``graph`` writes a graph equal to the library's ``attribute`` on the same prompt and a Neuronpedia JSON that
validates against the schema, and prints both scores; ``graph validate`` writes validation.json with the frozen
model's exact agreement; bad input (no transcoders, another model's set, a multi-token target) is one red line.
"""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import mechscope
from mechscope.cli import app
from tests.unit.test_cli import tiny_model_dir  # noqa: F401 (fixture)

runner = CliRunner()


def invoke(*args, code: int = 0):
    r = runner.invoke(app, [str(a) for a in args], terminal_width=400)
    assert r.exit_code == code, (r.output, r.exception)
    return r


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("graphs")
    rng = torch.Generator().manual_seed(0)
    words = [" ".join(f"w{int(i)}" for i in torch.randint(3, 120, (40,), generator=rng)) for _ in range(60)]
    (root / "text.txt").write_text("\n".join(words) + "\n")
    invoke("transcoders", "train", "--model", tiny_model_dir, "--dtype", "float32", "--corpus", root / "text.txt",
           "--tokens", 1024, "--batch-tokens", 256, "--width", 64, "--k", 4, "--eval-tokens", 128,
           "--buffer-tokens", 512, "--context-len", 32, "--out", root / "tc", "--threads", "1")
    return root


def test_train_writes_a_loadable_set_with_its_evaluation(trained, tiny_model_dir):  # noqa: F811
    from mechscope.graphs import load_transcoders

    ts = load_transcoders(trained / "tc")
    m = mechscope.load(str(tiny_model_dir))
    ts.check_model(m)
    assert ts.n_layers == 2 and ts[0].cfg.d_sae == 64 and ts[0].cfg.k == 4 and ts[0].cfg.skip
    ev = json.loads((trained / "tc" / "eval.json").read_text())
    assert [r["layer"] for r in ev["layers"]] == [0, 1]
    s = ev["set"]
    # eval.json keeps 6 significant digits; the random model's CE differences are ~1e-4, so the ratio is loose
    ratio = (s["ce_zero"] - s["ce_spliced"]) / (s["ce_zero"] - s["ce_clean"])
    assert s["ce_loss_recovered"] == pytest.approx(ratio, abs=0.02) and s["n_tokens"] > 100
    assert ts.metadata["eval"] == s and ts.metadata["tokens"] == 1024


def test_graph_writes_the_librarys_graph_and_validates(trained, tiny_model_dir, tmp_path):  # noqa: F811
    import jsonschema_rs

    from mechscope.graphs import AttributionGraph, attribute, load_transcoders
    from mechscope.graphs.neuronpedia import schema

    prompt = "w5 w9 w13 w5 w9"
    r = invoke("graph", prompt, "--transcoders", trained / "tc", "--out", tmp_path / "g", "--model", tiny_model_dir,
               "--threads", "1", "--batch-size", 8)
    assert "replacement score" in r.stdout and "pruned (0.8 / 0.98)" in r.stdout
    g = AttributionGraph.load(tmp_path / "g")
    m = mechscope.load(str(tiny_model_dir))
    want = attribute(m, load_transcoders(trained / "tc"), prompt, batch_size=8, progress=False)
    assert torch.allclose(g.edges, want.edges, atol=1e-6) and torch.equal(g.selected, want.selected)
    d = json.loads((tmp_path / "g" / "neuronpedia.json").read_text())
    jsonschema_rs.validator_for(schema()).validate(d)
    assert d["metadata"]["slug"] == "w5-w9-w13-w5-w9" and d["metadata"]["prompt"] == prompt
    page = (tmp_path / "g" / "graph.html").read_text()
    assert prompt in page and "Content-Security-Policy" in page
    r = invoke("graph", "validate", tmp_path / "g", "--model", tiny_model_dir, "--n-features", 10, "--threads", "1")
    v = json.loads((tmp_path / "g" / "validation.json").read_text())
    assert v["frozen_features"]["rel_error"] < 1e-4 and v["n_perturbed"] == min(10, g.n_features)
    assert isinstance(v["supernodes"], list) and all(len(s["steering"]["random_effects"]) == 8 for s in v["supernodes"])
    assert "Frozen replacement model" in r.stdout


def test_bad_graph_input_is_one_red_line(trained, tiny_model_dir, tmp_path):  # noqa: F811
    r = invoke("graph", "w5 w9", "--out", tmp_path / "g", code=2)
    assert "needs --transcoders DIR" in r.stderr
    r = invoke("graph", "w5 w9", "--transcoders", tmp_path, "--out", tmp_path / "g", "--model", tiny_model_dir, code=2)
    assert "is not a transcoder set" in r.stderr
    r = invoke("graph", "w5 w9", "--transcoders", trained / "tc", "--out", tmp_path / "g", "--model", tiny_model_dir,
               "--target", "w5 w9", code=2)
    lines = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "is 2 tokens" in lines[0] and "Traceback" not in r.output
    r = invoke("graph", "validate", tmp_path, code=2)
    assert "holds no attribution graph" in r.stderr
    r = invoke("graph", "w5", "--transcoders", trained / "tc", "--out", tmp_path / "g", "--node-threshold", 2, code=2)
    assert "--node-threshold must lie in [0, 1]" in r.stderr


def test_the_app_serves_a_graph_view_and_says_when_it_has_none(trained, tiny_model_dir, tmp_path):  # noqa: F811
    from fastapi.testclient import TestClient

    from mechscope.app import AppState, create_app
    from mechscope.graphs.neuronpedia import load_neuronpedia

    invoke("graph", "w5 w9 w13 w5 w9", "--transcoders", trained / "tc", "--out", tmp_path / "g", "--model",
           tiny_model_dir, "--threads", "1")
    d = load_neuronpedia(tmp_path / "g" / "neuronpedia.json")
    view = TestClient(create_app(AppState(graph=d))).get("/api/graph").json()["view"]
    assert set(view["nodes"]) == {n["node_id"] for n in d["nodes"]} and view["figure"]["data"]
    r = TestClient(create_app(AppState())).get("/api/graph")
    assert r.status_code >= 400 and "--graph" in r.json()["detail"]
    r = invoke("serve", "--graph", tmp_path / "nope", code=2)
    assert "does not exist" in r.stderr


def test_transcoders_features_builds_a_database_per_layer(trained, tiny_model_dir, tmp_path):  # noqa: F811
    from mechscope.graphs import load_transcoders
    from mechscope.graphs.features import open_set_features

    r = invoke("transcoders", "features", trained / "tc", "--model", tiny_model_dir, "--dtype", "float32",
               "--corpus", trained / "text.txt", "--tokens", 512, "--context-len", 16, "--layers", "1",
               "--threads", "1")
    assert "1 feature databases" in r.stdout
    ts = load_transcoders(trained / "tc")
    assert set(open_set_features(trained / "tc", ts)) == {1}
    invoke("transcoders", "features", trained / "tc", "--model", tiny_model_dir, "--dtype", "float32",
           "--corpus", trained / "text.txt", "--tokens", 512, "--context-len", 16, "--threads", "1")
    dbs = open_set_features(trained / "tc", ts)
    meta = dbs[0].meta
    assert set(dbs) == {0, 1} and meta["n_tokens"] == meta["n_contexts"] * 15 >= 480
    assert meta["corpus"] == [str(trained / "text.txt")] and meta["layer"] == 0
    r = invoke("transcoders", "features", trained / "tc", "--layers", "2", "--model", tiny_model_dir, code=2)
    assert "has layers 0-1" in r.stderr
    r = invoke("serve", "--transcoders", trained / "tc", "--model", tiny_model_dir, code=2)
    assert "give the graph too" in r.stderr


def test_graph_heads_splits_an_edge_over_heads(trained, tiny_model_dir, tmp_path):  # noqa: F811
    invoke("graph", "w5 w9 w13 w5 w9", "--transcoders", trained / "tc", "--out", tmp_path / "g", "--model",
           tiny_model_dir, "--threads", "1")
    d = json.loads((tmp_path / "g" / "neuronpedia.json").read_text())
    kinds = {n["node_id"]: n["feature_type"] for n in d["nodes"]}
    pos = {n["node_id"]: n["ctx_idx"] for n in d["nodes"]}
    e = max((e for e in d["links"] if kinds[e["source"]] == "embedding" and pos[e["source"]] < pos[e["target"]]),
            key=lambda e: abs(e["weight"]))
    r = invoke("graph", "heads", tmp_path / "g", e["source"], e["target"], "--model", tiny_model_dir, "--threads", "1")
    assert "heads that carry it" in r.stdout and f"{e['weight']:+.4f}"[:6] in r.stdout and "attends" in r.stdout
    r = invoke("graph", "heads", tmp_path / "g", "nope", e["target"], "--model", tiny_model_dir, code=2)
    assert "is not in this graph" in r.stderr
    r = invoke("graph", "heads", tmp_path / "g", e["source"], code=2)
    assert "usage: mechscope graph heads" in r.stderr


def test_a_device_this_machine_lacks_is_one_red_line(tmp_path):
    """--device is checked before anything loads (a GPU index past the machine's, or no device at all)."""
    for args in (["graph", "w5", "--transcoders", tmp_path, "--out", tmp_path / "g"], ["graph", "validate", tmp_path],
                 ["transcoders", "train", "--out", tmp_path / "tc"], ["transcoders", "eval", tmp_path],
                 ["transcoders", "features", tmp_path]):
        for device, says in (("cuda:99", "'cuda:99' is not on this machine"), ("gpu", "'gpu' is not a device")):
            r = invoke(*args, "--device", device, code=2)
            lines = [x for x in r.stderr.splitlines() if x.startswith("error:")]
            assert len(lines) == 1 and f"--device: {says}" in lines[0], (args, r.stderr)
