"""The web app in a real headless Chromium on a tiny model: the prompt inspector runs and shows tokens and
latents, hostile token strings (``<script>``, HTML entities) render as text and run nothing, and a steered
generation appears beside the unsteered one with its measured effect."""

from __future__ import annotations

import pytest

import mechscope
from mechscope.app import AppState, create_app, make_steer
from mechscope.dictionaries import DictionaryConfig, SparseDictionary
from tests.browser.conftest import TEXTS, drawn_tokens, serve

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def hostile_model_dir(tmp_path_factory):
    """A tiny Llama whose tokenizer has hostile token strings: '<script>alert(1)</script>', '&amp;', '<b>'."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<pad>", "<bos>", "<eos>", "<unk>", "<script>alert(1)</script>", "&amp;", "<b>bold</b>"]
    words += [f"w{i}" for i in range(128 - len(words))]
    t = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                  unk_token="<unk>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    path = tmp_path_factory.mktemp("hostile-llama")
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def base_url(hostile_model_dir, tmp_path_factory):
    """The app over the tiny model, a dictionary, and a feature database built over text full of hostile tokens."""
    import torch

    from mechscope.features.build import build_feature_db
    from mechscope.features.sources import FeatureSource
    from mechscope.features.stats import StatsConfig

    model = mechscope.load(str(hostile_model_dir))
    d = SparseDictionary(DictionaryConfig("topk", 32, 64, "blocks.1.hook_resid_post", k=4)).initialize(0)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(4, 128, (40, 16), generator=g)
    tokens[:, 0] = 1  # BOS
    tokens[::3, 5] = 4  # '<script>alert(1)</script>' in a third of the contexts
    db_path = tmp_path_factory.mktemp("db") / "features.duckdb"
    db = build_feature_db(FeatureSource(model, dictionary=d), tokens, db_path, StatsConfig(top_k=5, batch_contexts=8),
                          progress=False)
    url, stop = serve(create_app(AppState(model=model, dictionary=d, db=db, steer=make_steer(model, d))))
    yield url, db
    stop()


def test_search_a_feature_open_it_and_see_highlighted_contexts(page, base_url):
    url, db = base_url
    script_latent = db.search_tokens("<script>alert(1)</script>", limit=1)[0]  # a latent peaking on that token
    page.goto(url + "/")
    page.wait_for_selector("tr.lat-row")
    page.fill("#q", "<script>alert(1)</script>")
    page.select_option("#by", "token")
    page.click("button[type=submit]")
    page.wait_for_function("document.getElementById('title').textContent.startsWith('Search')")
    page.wait_for_selector(f"tr.lat-row a[href='/feature/{script_latent}']")
    page.click(f"tr.lat-row a[href='/feature/{script_latent}']")
    page.wait_for_selector(".top-example")
    f = db.feature(script_latent)
    assert page.locator(".top-example").count() == len(f["top"])
    first = page.locator(".top-example").first
    assert first.locator(".tok").evaluate_all(TEXTS) == drawn_tokens(f["top"][0]["tokens"])
    assert first.locator(".toks").evaluate("e => e.textContent") == f["top"][0]["text"]  # the exact text
    highlighted = first.locator(".tok[style*='background']").count()
    assert highlighted == sum(1 for a in f["top"][0]["acts"] if a > 0)  # exactly the active tokens are coloured
    assert "<script>alert(1)</script>" in page.inner_text("#top")  # shown as text
    assert page.locator("main script").count() == 0 and page.js_errors == []
    page.wait_for_selector("#hist .main-svg")


HOSTILE = "w1 <script>alert(1)</script> &amp; <b>bold</b> w2"


def test_prompt_inspector_shows_hostile_tokens_as_text(page, base_url):
    page.goto(base_url[0] + "/inspect")
    page.fill("#text", HOSTILE)
    page.click("button[type=submit]")
    page.wait_for_selector("tr.tok-row")
    cells = page.locator("tr.tok-row td:nth-child(2)").evaluate_all(TEXTS)
    assert cells == ["<bos>", "w1", "<script>alert(1)</script>", "&amp;", "<b>bold</b>", "w2"]
    assert page.locator("tr.tok-row b").count() == 0 and page.locator("main script").count() == 0  # no markup injected
    assert page.locator("tr.tok-row a.lat").count() > 0  # latents fire and link to their pages
    page.wait_for_selector("#attn .main-svg")  # the attention heatmap is drawn
    assert page.locator("#head option").count() == 4
    assert page.js_errors == []


def test_steered_generation_beside_unsteered(page, base_url):
    page.goto(base_url[0] + "/steer?latent=5")
    page.fill("#prompt", "w1 w2 w3")
    page.fill("#val", "40")
    page.fill("#n", "6")
    page.click("button[type=submit]")
    page.wait_for_function("document.getElementById('effect').textContent.length > 0")
    plain, steered = page.inner_text("#plain"), page.inner_text("#steered")
    assert plain and steered and plain != steered
    assert "log-probability" in page.inner_text("#effect")
    assert page.js_errors == []


def test_bad_input_shows_the_servers_message(page, base_url):
    page.goto(base_url[0] + "/steer")
    page.fill("#prompt", "w1")
    page.fill("#lat", "9999")
    page.click("button[type=submit]")
    page.wait_for_selector("#steered .err")
    assert "does not exist" in page.inner_text("#steered")


def test_static_dashboard_opens_offline_and_shows_text(page, base_url, tmp_path):
    """The exported dashboard is a file: no server, no network; its hostile token strings render as text."""
    from mechscope.features.export import export_dashboard

    _, db = base_url
    latent = db.search_tokens("<script>alert(1)</script>", limit=1)[0]
    path = export_dashboard(db, [latent, 0], tmp_path / "dash.html")
    requests = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto(path.as_uri())
    page.wait_for_selector(".top-example")
    assert "<script>alert(1)</script>" in page.inner_text("#top")
    page.wait_for_selector("#hist .main-svg")
    assert all(u.startswith("file:") or u.startswith("data:") for u in requests), requests
    assert page.js_errors == []
