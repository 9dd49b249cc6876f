"""Labelling latents into the feature database: label, detection score and provenance are stored together,
and the feature page's JSON carries them (a label is never shown without its score and provenance)."""

from __future__ import annotations

import torch

import mechscope
from mechscope.dictionaries import DictionaryConfig, SparseDictionary
from mechscope.features import FeatureDB, FeatureSource, StatsConfig, build_feature_db
from mechscope.features.labeling import label_latents, latent_activations
from tests.unit.test_cli import tiny_model_dir  # noqa: F401 (fixture)


class KeywordBackend:
    """A deterministic stand-in chat model: labels every latent 'w7', and says yes when 'w7' is in the context."""

    name = "fake:keyword"

    def complete(self, messages, *, max_new_tokens=32, temperature=0.0, seed=0):
        text = messages[-1]["content"]
        if "Examples" in text or "examples" in text and "Context" not in text:
            return "w7"
        tail = text.rsplit("Explanation", 1)[-1]
        return "Yes" if " w7" in tail.split("\n", 2)[-1] else "No"


def test_labels_are_stored_with_score_and_provenance(tiny_model_dir, tmp_path):  # noqa: F811
    torch.manual_seed(0)
    model = mechscope.load(str(tiny_model_dir))
    d = SparseDictionary(DictionaryConfig("topk", 32, 48, "blocks.1.hook_resid_post", k=6)).initialize(0)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(4, 128, (60, 12), generator=g)
    tokens[:, 0] = 1
    build_feature_db(FeatureSource(model, dictionary=d), tokens, tmp_path / "f.duckdb",
                     StatsConfig(top_k=5, batch_contexts=8), progress=False).con.close()
    acts = latent_activations(model, d, tokens, [0, 1, 2])
    _, cache = model.run(tokens, cache=["blocks.1.hook_resid_post"])
    assert torch.allclose(acts[1], d.encode(cache["blocks.1.hook_resid_post"][:, 1:])[..., 1], atol=1e-5)
    density = (acts > 0).float().mean((1, 2))
    latents = [i for i in range(3) if 0.05 < density[i] < 0.6][:2]
    db = FeatureDB(tmp_path / "f.duckdb", read_only=False)
    res = label_latents(model, d, db, latents, tokens, explainer=KeywordBackend(), n_train=3, n_pos=4, n_neg=4,
                        progress=False)
    for latent in latents:
        r = res[latent]
        if isinstance(r, str):
            assert r.startswith("skipped")
            continue
        stored = db.feature(latent)["labels"][-1]
        assert stored["label"] == r.label
        assert stored["score"] == r.score.balanced_accuracy and 0 <= stored["score"] <= 1
        assert stored["explainer"] == "fake:keyword" and stored["prompt"] and stored["date"]
        assert stored["n_scored"] == r.score.n_pos + r.score.n_neg
    assert any(not isinstance(r, str) for r in res.values()), res  # at least one latent was labelled
    db.con.close()

    # the app never shows a label without its score and provenance, in lists and searches too
    from fastapi.testclient import TestClient

    from mechscope.app import AppState, create_app

    c = TestClient(create_app(AppState(db=FeatureDB(tmp_path / "f.duckdb"))))
    labelled = [latent for latent, r in res.items() if not isinstance(r, str)]
    found = c.get("/api/search", params={"q": res[labelled[0]].label, "by": "label"}).json()["latents"]
    row = next(r for r in found if r["id"] == labelled[0])
    assert row["label_score"] == res[labelled[0]].score.balanced_accuracy and row["label_explainer"] == "fake:keyword"
    listed = c.get("/api/features", params={"limit": 48}).json()["latents"]
    assert all(r["label_explainer"] == "fake:keyword" for r in listed if r["label"])
