"""The web app in a real headless Chromium on a tiny model: the prompt inspector runs and shows tokens and
latents, hostile token strings (``<script>``, HTML entities) render as text and run nothing, and a steered
generation appears beside the unsteered one with its measured effect."""

from __future__ import annotations

import pytest

import mechscope
from mechscope.app import AppState, create_app, make_steer
from mechscope.dictionaries import DictionaryConfig, SparseDictionary
from tests.browser.conftest import serve

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
def base_url(hostile_model_dir):
    model = mechscope.load(str(hostile_model_dir))
    d = SparseDictionary(DictionaryConfig("topk", 32, 64, "blocks.1.hook_resid_post", k=4)).initialize(0)
    url, stop = serve(create_app(AppState(model=model, dictionary=d, steer=make_steer(model, d))))
    yield url
    stop()


HOSTILE = "w1 <script>alert(1)</script> &amp; <b>bold</b> w2"


def test_prompt_inspector_shows_hostile_tokens_as_text(page, base_url):
    page.goto(base_url + "/inspect")
    page.fill("#text", HOSTILE)
    page.click("button[type=submit]")
    page.wait_for_selector("tr.tok-row")
    cells = page.locator("tr.tok-row td:nth-child(2)").all_inner_texts()
    assert cells == ["<bos>", "w1", "<script>alert(1)</script>", "&amp;", "<b>bold</b>", "w2"]
    assert page.locator("tr.tok-row b").count() == 0 and page.locator("main script").count() == 0  # no markup injected
    assert page.locator("tr.tok-row a.lat").count() > 0  # latents fire and link to their pages
    page.wait_for_selector("#attn .main-svg")  # the attention heatmap is drawn
    assert page.locator("#head option").count() == 4
    assert page.js_errors == []


def test_steered_generation_beside_unsteered(page, base_url):
    page.goto(base_url + "/steer?latent=5")
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
    page.goto(base_url + "/steer")
    page.fill("#prompt", "w1")
    page.fill("#lat", "9999")
    page.click("button[type=submit]")
    page.wait_for_selector("#steered .err")
    assert "does not exist" in page.inner_text("#steered")
