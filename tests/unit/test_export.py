"""Feature export: Neuronpedia-style JSON (parallel histogram lists, labels with provenance) and the
offline dashboard (data escaped inside its script element, no network)."""

from __future__ import annotations

import json
import re

import pytest
import torch

import mechscope
from mechscope.dictionaries import DictionaryConfig, SparseDictionary
from mechscope.features import FeatureDB, FeatureSource, StatsConfig, build_feature_db
from mechscope.features.export import export_dashboard, export_neuronpedia
from tests.unit.test_cli import tiny_model_dir  # noqa: F401 (fixture)


@pytest.fixture(scope="module")
def db(tiny_model_dir, tmp_path_factory):  # noqa: F811
    model = mechscope.load(str(tiny_model_dir))
    d = SparseDictionary(DictionaryConfig("topk", 32, 24, "blocks.1.hook_resid_post", k=4)).initialize(0)
    tokens = torch.randint(4, 128, (30, 10), generator=torch.Generator().manual_seed(0))
    tokens[:, 0] = 1
    path = tmp_path_factory.mktemp("db") / "f.duckdb"
    build_feature_db(FeatureSource(model, dictionary=d), tokens, path, StatsConfig(top_k=4), progress=False).con.close()
    w = FeatureDB(path, read_only=False)
    w.add_label(3, "</script><script>alert(1)</script>", score=0.75, score_kind="detection balanced accuracy",
                explainer="fake", prompt="p", n_scored=40)
    w.con.close()
    return FeatureDB(path)


def test_neuronpedia_json(db, tmp_path):
    out = export_neuronpedia(db, [3, 5], tmp_path / "np", model_id="tiny", layer="1-res-topk")
    rec = json.loads((out / "3.json").read_text())
    f = db.feature(3)
    assert rec["modelId"] == "tiny" and rec["layer"] == "1-res-topk" and rec["index"] == "3"
    assert rec["maxActApprox"] == pytest.approx(f["max_act"]) and rec["frac_nonzero"] == pytest.approx(f["density"])
    assert len(rec["freq_hist_data_bar_heights"]) == len(rec["freq_hist_data_bar_values"])  # parallel lists
    assert sum(rec["freq_hist_data_bar_heights"]) == f["n_fired"]
    assert rec["pos_str"] == [r["token"] for r in f["logits"]["up"]]
    top = rec["activations"][0]
    assert top["tokens"] == f["top"][0]["tokens"] and top["maxValue"] == pytest.approx(max(f["top"][0]["acts"]))
    assert top["values"][top["maxValueTokenIndex"]] == top["maxValue"]
    (e,) = rec["explanations"]
    assert e["scores"][0]["value"] == 0.75 and e["explanationModelName"] == "fake"
    assert len(json.loads((out / "batch.json").read_text())) == 2
    with pytest.raises(mechscope.InputError, match="does not exist"):
        export_neuronpedia(db, [999], tmp_path / "np2", model_id="tiny", layer="x")


def test_dashboard_is_offline_and_escapes_its_data(db, tmp_path):
    path = export_dashboard(db, [3, 5, 7], tmp_path / "dash.html", title="<b>tiny</b>")
    page = path.read_text()
    scripts = re.findall(r"<script[^>]*>(.*?)</script>", page, flags=re.S)
    assert len(scripts) == 4  # plotly, app.js, the data, the renderer: the label cannot close its element
    data = json.loads(scripts[2])
    assert [f["id"] for f in data] == [3, 5, 7] and data[0]["labels"][0]["label"] == "</script><script>alert(1)</script>"
    assert "<b>tiny</b>" not in page and "&lt;b&gt;tiny&lt;/b&gt;" in page
    assert "default-src 'none'" in page  # the CSP forbids every fetch
    assert not re.search(r"<script[^>]+src=", page) and not re.search(r"<link[^>]+href=", page)
