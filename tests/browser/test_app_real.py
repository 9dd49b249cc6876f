"""The web app in headless Chromium on real data: the default real model (SmolLM2-135M-Instruct), a TopK SAE
trained by the sparse-dictionary pipeline (the session's ``real_sae``), and a feature database built over
20,480 tokens of the ``pydoc`` corpus, with one latent labelled and scored by SmolLM2 itself.

The flows a researcher runs: search a feature by token and by label, open it and see its highlighted
contexts, label with score and provenance; inspect a prompt; run a steered generation beside the unsteered
one. Every page must finish without a JavaScript error.
"""

from __future__ import annotations

import re

import pytest
import torch

from mechscope.app import AppState, create_app, make_steer
from tests.browser.conftest import TEXTS, drawn_tokens, serve

pytestmark = [pytest.mark.browser, pytest.mark.real]
N_CONTEXTS, CONTEXT_LEN = 160, 128  # 20,480 tokens
SEARCH_TOKEN = " return"  # pydoc is full of "Return the ..."; some latent peaks on it


@pytest.fixture(scope="module")
def real_app(real_model, real_sae, tmp_path_factory):
    """(base URL, FeatureDB, labelled latent) of the app served over the real model, SAE and database."""
    from mechscope.data import corpus_tokens
    from mechscope.features.build import build_feature_db
    from mechscope.features.chat import LocalChatBackend
    from mechscope.features.db import FeatureDB
    from mechscope.features.labeling import label_latents
    from mechscope.features.sources import FeatureSource
    from mechscope.features.stats import StatsConfig

    torch.set_num_threads(1)
    d, _ = real_sae
    rows = corpus_tokens(["pydoc"], real_model.tokenizer, CONTEXT_LEN, "train").tokens
    path = tmp_path_factory.mktemp("real-db") / "features.duckdb"
    db = build_feature_db(FeatureSource(real_model, dictionary=d), rows[-N_CONTEXTS:], path, StatsConfig(top_k=10),
                          progress=False)
    latent = db.search_tokens(SEARCH_TOKEN, limit=1)[0]
    db.close()
    with FeatureDB(path, read_only=False) as rw:  # a label, scored on contexts the database was not built on
        result = label_latents(real_model, d, rw, [latent], rows[:120], explainer=LocalChatBackend(real_model),
                               n_train=5, n_pos=8, n_neg=8, progress=False)
    assert not isinstance(result[latent], str), result
    db = FeatureDB(path)
    url, stop = serve(create_app(AppState(model=real_model, dictionary=d, db=db, steer=make_steer(real_model, d))))
    yield url, db, latent
    stop()
    db.close()


def test_search_by_token_open_the_feature_and_see_highlighted_contexts(page, real_app):
    url, db, latent = real_app
    page.goto(url + "/")
    page.wait_for_selector("tr.lat-row")
    page.fill("#q", SEARCH_TOKEN.strip())
    page.select_option("#by", "token")
    page.click("button[type=submit]")
    page.wait_for_function("document.getElementById('title').textContent.startsWith('Search')")
    link = f"tr.lat-row a[href='/feature/{latent}']"
    page.wait_for_selector(link)
    assert page.locator("tr.lat-row").first.locator("a").first.get_attribute("href") == f"/feature/{latent}"
    page.click(link)
    page.wait_for_selector(".top-example")

    f = db.feature(latent)
    examples = page.locator(".top-example")
    assert examples.count() == len(f["top"]) == 10
    first = examples.first
    assert first.locator(".tok").evaluate_all(TEXTS) == drawn_tokens(f["top"][0]["tokens"])
    assert first.locator(".toks").evaluate("e => e.textContent") == f["top"][0]["text"]  # the exact text
    assert first.locator(".tok[style*='background']").count() == sum(a > 0 for a in f["top"][0]["acts"])
    peak = max(range(len(f["top"][0]["acts"])), key=f["top"][0]["acts"].__getitem__)
    assert f["top"][0]["tokens"][peak].strip().lower() == SEARCH_TOKEN.strip()  # it peaks where it was found
    assert first.locator(".tok.peak").inner_text().strip().lower() == SEARCH_TOKEN.strip()  # outlined, on screen
    assert first.locator(".tok.peak").is_visible()
    box = first.locator(".tok.peak").bounding_box()  # on screen without scrolling sideways
    assert box["x"] >= 0 and box["x"] + box["width"] <= page.viewport_size["width"]
    assert page.evaluate("document.documentElement.scrollWidth") <= page.viewport_size["width"]
    assert page.locator(".quantile-example").count() > 0
    assert page.locator("#up tr").count() > 0 and page.locator("#down tr").count() > 0  # logit effects
    page.wait_for_selector("#hist .main-svg")
    assert page.js_errors == []


def test_search_by_label_shows_the_label_with_its_score_and_provenance(page, real_app):
    url, db, latent = real_app
    label = db.feature(latent)["labels"][0]
    page.goto(url + "/")
    page.wait_for_selector("tr.lat-row")
    page.fill("#q", label["label"][:12])
    page.select_option("#by", "label")
    page.click("button[type=submit]")
    page.wait_for_selector(f"tr.lat-row a[href='/feature/{latent}']")
    row = page.locator("tr.lat-row", has=page.locator(f"a[href='/feature/{latent}']"))
    assert "detection balanced accuracy" in row.inner_text() and "SmolLM2" in row.inner_text()

    page.goto(f"{url}/feature/{latent}")
    page.wait_for_selector(".label-row")
    text = page.inner_text(".label-row")
    assert label["label"] in text
    assert f"detection balanced accuracy {label['score']:.2f} on 16 held-out contexts" in text
    assert "explainer local:SmolLM2-135M-Instruct" in text and label["date"] in text
    assert page.js_errors == []


def test_prompt_inspector_on_the_real_model(page, real_app, real_model):
    url, db, _ = real_app
    text = "def area(r):\n    return 3.14 * r * r"
    page.goto(url + "/inspect")
    page.fill("#text", text)
    page.click("button[type=submit]")
    page.wait_for_selector("tr.tok-row")
    shown = page.locator("tr.tok-row td:nth-child(2)").evaluate_all(TEXTS)
    assert shown == real_model.to_str_tokens(real_model.to_tokens(text, prepend_bos=True))  # ASCII: no fragments
    assert page.locator("tr.tok-row .nl").count() == 1  # the newline is marked
    ret = shown.index(" return")
    lat_links = page.locator("tr.tok-row").nth(ret).locator("a.lat").all_inner_texts()
    assert len(lat_links) == 5  # top 5 of the k=32 firing latents
    assert page.locator("#lens tr").count() > real_model.cfg.n_layers // 2  # logit lens, a row per layer
    page.wait_for_selector("#attn .main-svg")
    assert page.locator("#head option").count() == real_model.cfg.n_heads
    assert page.js_errors == []


def test_steered_generation_beside_the_unsteered_one(page, real_app):
    url, db, latent = real_app
    value = 8 * db.feature(latent)["max_act"]
    page.goto(f"{url}/steer?latent={latent}")
    page.fill("#prompt", "The weather today is")
    page.fill("#val", f"{value:.1f}")
    page.fill("#n", "8")
    page.click("button[type=submit]")
    page.wait_for_function("document.getElementById('effect').textContent.length > 0", timeout=120_000)
    plain, steered = page.inner_text("#plain"), page.inner_text("#steered")
    assert plain and steered and plain != steered
    effect = page.inner_text("#effect")
    assert f"latent #{latent} promotes most (direct path)" in effect
    kl = float(re.search(r"KL\(steered \|\| unsteered\) (\d+\.\d+) nats", effect).group(1))
    raised = re.search(r"probability rose most for (.*?) ·", effect).group(1)
    assert kl > 0.05 and len(re.findall(r" \+\d\.\d{3}", raised)) == 3, effect  # steering moved the next-token distribution
    assert page.js_errors == []
