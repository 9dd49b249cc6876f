"""A Unicode round trip without a browser: a corpus of emoji and ZWJ sequences, right-to-left text and bidi
controls, combining accents, zero-width and fullwidth characters goes through ``mechscope features build``
(a tiny Llama with a byte-level BPE tokenizer, which splits every multi-byte character over several
tokens), the DuckDB feature database, and the web API; the exact text comes out and text search finds
each sample. The page (Chromium) and the exported dashboard are checked in tests/browser on the same
database (:func:`unicode_db`)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

#: The samples (written for this test), each a string the corpus holds and search must find.
SAMPLES = {
    "emoji": "😀",
    "zwj family": "👨\u200d👩\u200d👧",
    "hebrew": "שלום",
    "rtl override": "\u202eevil\u202c",
    "combining accent": "cafe\u0301",
    "zero-width space": "zero\u200bwidth",
    "fullwidth": "＜script＞",
    "arabic with a mark": "\u200fمرحبا",
}
SENTENCES = [
    "I liked the {} at the end of her note.",
    "He wrote {} twice and then stopped.",
    "Nobody expected {} in a shopping list, yet there it was.",
    "The label read {} in small letters.",
]
LONG_WORD = "x" * 300  # a token run with no space: must wrap, not widen the page


def corpus_documents() -> list[str]:
    docs = [s.format(v) for v in SAMPLES.values() for s in SENTENCES]
    docs += [f"A plain line number {i} about apples, rivers and the {LONG_WORD if i == 3 else 'weather'}."
             for i in range(8)]
    return docs


def save_byte_level_model(path):
    """A tiny random Llama whose tokenizer is the byte-level BPE of tests/unit/test_detokenize.py."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.unit.test_detokenize import byte_level

    tok = byte_level()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def unicode_db(root) -> tuple:
    """Build (model folder, dictionary folder, corpus file, database path) under ``root`` with the CLI
    (packed tokens cached under ``root``, not in the user's cache)."""
    from mechscope.cli import app
    from mechscope.dictionaries import DictionaryConfig, SparseDictionary, save_dictionary

    mdir = save_byte_level_model(root / "model")
    d = SparseDictionary(DictionaryConfig("topk", 32, 48, "blocks.1.hook_resid_post", k=6)).initialize(seed=0)
    ddir = save_dictionary(d, root / "sae")
    corpus = root / "hostile.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in corpus_documents()),
                      encoding="utf-8")
    db_path = root / "features.duckdb"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MECHSCOPE_CACHE", str(root / "cache"))
        r = CliRunner().invoke(app, ["features", "build", str(ddir), "--out", str(db_path), "--model", str(mdir),
                                     "--dtype", "float32", "--corpus", str(corpus), "--tokens", "4000",
                                     "--context-len", "128", "--split", "train", "--top-k", "20", "--threads", "1"])
    assert r.exit_code == 0, r.output
    return mdir, ddir, corpus, db_path


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return unicode_db(tmp_path_factory.mktemp("unicode"))


def _strip_cut(part: str) -> str:
    return part.strip("\ufffd")  # a character cut by the context's own boundary is the decoder's U+FFFD


def test_stored_text_is_the_corpus_text_exactly(built):
    from mechscope.features.db import FeatureDB

    *_, db_path = built
    docs = corpus_documents()
    with FeatureDB(db_path) as db:
        contexts = db.table("contexts")
        assert db.format_version == 2 and len(contexts) > 0
        for text, pieces, offsets in zip(contexts["text"], contexts["str_tokens"], contexts["offsets"]):
            assert "".join(pieces) == text and list(offsets) == [sum(map(len, pieces[:i])) for i in range(len(pieces))]
            assert text.startswith("<bos>")
            parts = text[len("<bos>"):].split("<eos>")
            for k, part in enumerate(parts):  # whole documents inside, a suffix first and a prefix last
                part = _strip_cut(part)
                if 0 < k < len(parts) - 1:
                    assert part in docs, part
                elif part:
                    assert any(part in doc for doc in docs), part
            assert "\ufffd" not in text[len("<bos>") + 1:-1]  # U+FFFD only where the context cuts a character
        held = " ".join(contexts["text"])
        for name, sample in SAMPLES.items():
            assert sample in held, name  # every sample is stored whole somewhere
            found = db.search_text(sample, limit=100)
            assert found, name
            f = db.feature(found[0])
            assert any(sample in ex["text"] for ex in f["top"]), name


def test_the_api_returns_the_exact_text_and_finds_each_sample(built):
    from fastapi.testclient import TestClient

    import mechscope
    from mechscope.app import AppState, create_app
    from mechscope.features.db import FeatureDB

    mdir, _, _, db_path = built
    with FeatureDB(db_path) as db:
        client = TestClient(create_app(AppState(model=mechscope.load(str(mdir)), db=db)), raise_server_exceptions=False)
        for name, sample in SAMPLES.items():
            r = client.get("/api/search", params={"q": sample, "by": "text"})
            assert r.status_code == 200, r.text
            ids = [x["id"] for x in r.json()["latents"]]
            assert ids == db.search_text(sample, limit=50) and ids, name
            ex = next(e for e in client.get(f"/api/feature/{ids[0]}").json()["top"] if sample in e["text"])
            assert "".join(ex["tokens"]) == ex["text"] and len(ex["tokens"]) == len(ex["acts"]) == 128
        # the prompt inspector decodes the same way: a sample typed in comes back whole
        body = client.post("/api/inspect", json={"text": "a " + SAMPLES["zwj family"] + " b", "layer": 0}).json()
        assert body["text"].endswith("a " + SAMPLES["zwj family"] + " b") and "".join(body["tokens"]) == body["text"]
        assert all("\ufffd" not in label for label in body["labels"])  # byte fragments shown as escapes


def test_logit_effect_and_max_tokens_have_no_replacement_characters(built):
    from mechscope.features.db import FeatureDB

    *_, db_path = built
    with FeatureDB(db_path) as db:
        assert not any("\ufffd" in t for t in db.table("logit_effects")["token_str"])
        assert not any(t == "" for t in db.table("examples")["max_token"])
