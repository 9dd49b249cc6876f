"""Feature export: Neuronpedia's upload format (every key its importer reads, values that agree with the
database, labels with score and provenance) and the offline dashboard (data escaped inside its script
element, no network)."""

from __future__ import annotations

import json
import re

import pytest
import torch

import mechscope
from mechscope.dictionaries import DictionaryConfig, SparseDictionary, load_dictionary, save_dictionary
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
    save_dictionary(d, path.parent / "sae")
    return FeatureDB(path)


# The keys Neuronpedia's importer reads with ``[...]`` (so a missing one is a KeyError there), from its
# utils/neuronpedia-utils/neuronpedia_utils/convert-saedashboard-to-neuronpedia-export.py (process_data).
BATCH_KEYS = {"model_id", "layer", "sae_id_suffix", "features"}
FEATURE_KEYS = {
    "feature_index", "neuron_alignment_indices", "neuron_alignment_values", "neuron_alignment_l1",
    "correlated_neurons_indices", "correlated_neurons_pearson", "correlated_neurons_l1",
    "correlated_features_indices", "correlated_features_pearson", "correlated_features_l1", "neg_str", "neg_values",
    "pos_str", "pos_values", "frac_nonzero", "freq_hist_data_bar_heights", "freq_hist_data_bar_values",
    "logits_hist_data_bar_heights", "logits_hist_data_bar_values", "decoder_weights_dist", "activations"}
ACTIVATION_KEYS = {"tokens", "values", "bin_contains", "bin_max", "bin_min", "qualifying_token_index"}


def _strict(path):
    def refuse(c):
        raise ValueError(f"{path} holds {c}, which is not JSON")
    return json.loads(path.read_text(), parse_constant=refuse)


def test_neuronpedia_batch_has_every_key_neuronpedias_importer_reads(db, tmp_path):
    d_model = 32
    vectors = torch.randn(db.n_latents, d_model, generator=torch.Generator().manual_seed(1))
    out = export_neuronpedia(db, [3, 5, 7], tmp_path / "np", model_id="tiny", sae_set="res-topk-24", layer=1,
                             vectors=vectors, batch_size=2)
    assert sorted(p.name for p in out.iterdir()) == ["batch-0.json", "batch-1.json", "explanations.json"]
    batches = [_strict(out / f"batch-{k}.json") for k in (0, 1)]
    assert [[f["feature_index"] for f in b["features"]] for b in batches] == [[3, 5], [7]]
    for b in batches:
        assert BATCH_KEYS <= set(b) and b["layer"] == 1 and b["model_id"] == "tiny" and b["sae_set"] == "res-topk-24"
        for rec in b["features"]:
            assert FEATURE_KEYS <= set(rec), FEATURE_KEYS - set(rec)
            f = db.feature(rec["feature_index"])
            assert rec["frac_nonzero"] == pytest.approx(f["density"], rel=1e-5)
            assert len(rec["freq_hist_data_bar_heights"]) == len(rec["freq_hist_data_bar_values"])  # parallel lists
            assert sum(rec["freq_hist_data_bar_heights"]) == f["n_fired"]
            assert rec["pos_str"] == [r["token"] for r in f["logits"]["up"]]
            assert rec["neg_values"] == pytest.approx([r["value"] for r in f["logits"]["down"]], rel=1e-5)
            assert rec["vector"] == pytest.approx(vectors[rec["feature_index"]].tolist(), rel=1e-5)
            assert rec["n_tokens_in_prompt"] == db.meta["context_len"] and rec["n_prompts_total"] == 30
            assert len(rec["activations"]) == len(f["top"]) + len(f["quantiles"])
            for a in rec["activations"]:
                assert ACTIVATION_KEYS <= set(a) and len(a["tokens"]) == len(a["values"])
                assert a["values"][a["qualifying_token_index"]] == max(a["values"])
            # the importer's maxActApprox is the largest value over the activations: our max_act
            assert max(max(a["values"]) for a in rec["activations"]) == pytest.approx(f["max_act"], rel=1e-5)
            top = [a for a in rec["activations"] if a["bin_min"] == -1]
            assert [a["tokens"] for a in top] == [e["tokens"] for e in f["top"]]
            for a in rec["activations"]:
                if a["bin_min"] != -1:  # quantile examples lie in their bin
                    assert a["bin_min"] - 1e-6 <= max(a["values"]) <= a["bin_max"] + 1e-6
    (e,) = _strict(out / "explanations.json")  # latent 3's label, with its score and provenance
    assert e["modelId"] == "tiny" and e["layer"] == "1-res-topk-24" and e["index"] == "3"
    assert e["description"] == "</script><script>alert(1)</script>" and e["explanationModelName"] == "fake"
    assert e["score"] == 0.75 and "detection balanced accuracy 0.750 on 40" in e["notes"] and e["prompt"] == "p"


def test_neuronpedia_export_refuses_bad_input_before_writing(db, tmp_path):
    for bad, match in (([999], "does not exist"), ([], "no latents")):
        with pytest.raises(mechscope.InputError, match=match):
            export_neuronpedia(db, bad, tmp_path / "np2", model_id="tiny", sae_set="x")
    with pytest.raises(mechscope.InputError, match="batch_size"):
        export_neuronpedia(db, [1], tmp_path / "np2", model_id="tiny", sae_set="x", batch_size=0)
    assert not (tmp_path / "np2").exists()
    out = export_neuronpedia(db, [1], tmp_path / "np3", model_id="tiny", sae_set="x")  # layer from the hook
    assert _strict(out / "batch-0.json")["layer"] == 1 and "vector" not in _strict(out / "batch-0.json")["features"][0]


def test_cli_export_writes_both_formats_with_decoder_vectors(db, tmp_path):
    from typer.testing import CliRunner

    from mechscope.cli import app

    sae = db.path.parent / "sae"
    r = CliRunner().invoke(app, ["features", "export", str(db.path), "--latents", "2-4,6", "--neuronpedia",
                                 str(tmp_path / "np"), "--sae", str(sae), "--dashboard", str(tmp_path / "d.html")])
    assert r.exit_code == 0, r.output
    b = _strict(tmp_path / "np" / "batch-0.json")
    assert b["sae_set"] == "res-topk-24" and b["layer"] == 1  # defaults read from the database
    assert [f["feature_index"] for f in b["features"]] == [2, 3, 4, 6]
    w_dec = load_dictionary(sae).W_dec.detach()
    assert b["features"][1]["vector"] == pytest.approx(w_dec[3].tolist(), rel=1e-5, abs=1e-7)
    assert (tmp_path / "d.html").is_file()
    wrong = tmp_path / "wrong"
    save_dictionary(SparseDictionary(DictionaryConfig("topk", 32, 48, "blocks.1.hook_resid_post", k=4)).initialize(0),
                    wrong)
    r = CliRunner().invoke(app, ["features", "export", str(db.path), "--neuronpedia", str(tmp_path / "np9"),
                                 "--sae", str(wrong)])
    assert r.exit_code == 2 and "48 latents but the database has 24" in r.output and not (tmp_path / "np9").exists()


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
