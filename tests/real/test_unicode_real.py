"""The Unicode round trip on the default model: SmolLM2's byte-level BPE splits emoji, Hebrew, fullwidth
characters, combining accents and zero-width characters over several tokens. A feature database built over a
corpus of them keeps the exact text (the old per-token decodes turned every such character into U+FFFD)
and text search finds each sample. The dictionary is random: text fidelity does not depend on training."""

from __future__ import annotations

import pytest
import torch

from tests.unit.test_unicode_roundtrip import SAMPLES, corpus_documents

pytestmark = pytest.mark.real


def test_feature_database_on_smollm2_keeps_every_character(real_model, tmp_path):
    from mechscope.data import pack
    from mechscope.dictionaries import DictionaryConfig, SparseDictionary
    from mechscope.features.build import build_feature_db
    from mechscope.features.sources import FeatureSource
    from mechscope.features.stats import StatsConfig

    torch.set_num_threads(1)
    tok = real_model.tokenizer
    docs = corpus_documents() * 3
    packed = pack(docs, tok, context_len=64, split="all", seed=0)
    d = SparseDictionary(DictionaryConfig("topk", 576, 256, "blocks.3.hook_resid_post", k=16)).initialize(seed=0)
    db = build_feature_db(FeatureSource(real_model, dictionary=d), packed.tokens, tmp_path / "f.duckdb",
                          StatsConfig(top_k=20), progress=False)
    contexts = db.table("contexts")
    texts = list(contexts["text"])
    assert all("".join(p) == t for p, t in zip(contexts["str_tokens"], texts))
    # per-token decodes, as format 1 stored them, against the exact text
    old = [[tok.decode([i]) for i in ids] for ids in contexts["token_ids"]]
    lossy = sum("\ufffd" in "".join(r) for r in old)
    cut = sum("\ufffd" in t for t in texts)
    print(f"\n{len(texts)} contexts: {lossy} held U+FFFD with per-token decodes, {cut} with exact decoding "
          "(a character cut by the context's own boundary)")
    assert lossy > len(texts) // 2
    for t in texts:
        body = t[len("<|im_start|>"):]
        assert "\ufffd" not in body.strip("\ufffd")  # U+FFFD only where the context starts or ends inside a character
        assert all(part.strip("\ufffd") in " ".join(docs) for part in body.split("<|im_end|>"))
    held = " ".join(texts)
    for name, sample in SAMPLES.items():
        assert sample in held, name
        assert db.search_text(sample, limit=10), name
    assert not any("\ufffd" in t for t in db.table("logit_effects")["token_str"])
    db.close()
