"""Exact text of token sequences (mechscope.data.detokenize) on tokenizers built here, no download: a
byte-level BPE (the GPT-2 / SmolLM2 kind, where a character of several UTF-8 bytes is split over tokens),
a SentencePiece-style BPE with byte fallback and a leading-space-stripping decoder (the Llama 2 kind), and
a word-level tokenizer whose decoder joins tokens with spaces. Properties checked on random Unicode text:
the spans join to the whole decode exactly, the whole decode is the original text, and each token's span
ends where the decode of the prefix up to that token stops growing (what the model has seen)."""

from __future__ import annotations

import functools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mechscope.data.detokenize import decode_spans, token_bytes, token_label, token_labels
from tests.conftest import make_tokenizer

#: Text a new user's corpus holds: emoji and a ZWJ family, Hebrew with an RTL override, e + combining
#: acute, zero-width space, fullwidth brackets, CJK, HTML.
HOSTILE = ["Hello 😀 world", "שלום עולם", "cafe\u0301 and café", "a\u202eevil\u202c b", "zero\u200bwidth",
           "＜script＞alert(1)＜/script＞", "👨\u200d👩\u200d👧 family", "日本語のテキスト", "<b>&amp;</b>", "tab\there\nnew"]


@functools.cache
def byte_level():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=330, special_tokens=["<bos>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    t.train_from_iterator(["the quick brown fox jumps over the lazy dog " * 20, "hello world " * 10], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<bos>", eos_token="<eos>")


@functools.cache
def byte_fallback():
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for c in "▁abcdefghijklmnopqrstuvwxyzHWé":
        vocab.setdefault(c, len(vocab))
    vocab["▁t"], vocab["he"] = len(vocab), len(vocab) + 1
    t = Tokenizer(models.BPE(vocab, [("▁", "t"), ("h", "e")], unk_token="<unk>", byte_fallback=True))
    t.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    t.pre_tokenizer = pre_tokenizers.Split("\x00", "isolated")  # nothing: the whole text is one word
    t.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                   decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


TOKENIZERS = {"byte_level": byte_level, "byte_fallback": byte_fallback}


def check(tok, ids):
    """The invariants of decode_spans on one row; returns its DecodedText."""
    (d,) = decode_spans(tok, [ids])
    assert d.text == tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    assert "".join(d.pieces) == d.text and len(d.starts) == len(ids)
    assert list(d.starts) == sorted(d.starts)
    # token i's span ends at the longest prefix of the text that ids[:i + 1] has decoded to (what the model
    # has seen by then); the last token ends the text
    seen = [tok.decode(ids[:j + 1], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            for j in range(len(ids))]
    for i in range(len(ids) - 1):
        end = d.starts[i + 1]
        assert any(s.startswith(d.text[:end]) for s in seen[:i + 1])
        assert end == len(d.text) or not any(s.startswith(d.text[:end + 1]) for s in seen[:i + 1])
    return d


@pytest.mark.parametrize("name", list(TOKENIZERS))
@pytest.mark.parametrize("text", HOSTILE)
def test_hostile_text_survives_exactly(name, text):
    tok = TOKENIZERS[name]()
    ids = tok(text, add_special_tokens=False)["input_ids"]
    d = check(tok, [tok.bos_token_id, *ids, tok.eos_token_id])
    assert text in d.text and "\ufffd" not in d.text
    assert any(tok.decode([i]) != p for i, p in zip(ids, d.pieces[1:])) or text.isascii()  # split characters exist


def test_split_character_goes_to_the_token_that_completes_it():
    tok = byte_level()
    ids = tok(" 😀", add_special_tokens=False)["input_ids"]
    assert len(ids) > 1 and all("\ufffd" in tok.decode([i]) or tok.decode([i]).isspace() for i in ids)
    d = check(tok, ids)
    assert d.pieces[-1].endswith("😀") and all("😀" not in p for p in d.pieces[:-1])
    assert "".join(d.pieces) == " 😀"


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40),
       st.integers(0, 10), st.integers(0, 10))
def test_random_unicode_and_cut_contexts(text, lo, hi):
    """Any text, and any window of its tokens (a context that starts or ends inside a character)."""
    tok = byte_level()
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert check(tok, ids).text == text
    window = ids[lo:max(lo + 1, len(ids) - hi)]
    if window:
        check(tok, window)


@settings(max_examples=40, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs", "Zs", "Cc")), min_size=1, max_size=20))
def test_random_unicode_byte_fallback(text):
    tok = byte_fallback()
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if 0 in ids:  # <unk>
        return
    check(tok, ids)


def test_word_level_tokenizer_takes_the_prefix_path():
    """Its decoder puts spaces between tokens, so single-token decodes do not join to the text."""
    tok = make_tokenizer()
    ids = [1, 10, 11, 12, 2, 13]
    d = check(tok, ids)
    assert d.text == "<bos> w6 w7 w8 <eos> w9" and d.pieces == ["<bos>", " w6", " w7", " w8", " <eos>", " w9"]


def test_no_tokenizer_and_empty_rows():
    (d,) = decode_spans(None, [[5, 7]])
    assert d.text == "#5#7" and d.pieces == ["#5", "#7"]
    assert decode_spans(byte_level(), []) == []
    assert token_label(None, 3) == "#3"


def test_token_labels_show_byte_fragments_as_escapes():
    tok = byte_level()
    ids = tok(" 😀 שלום", add_special_tokens=False)["input_ids"]
    labels = token_labels(tok, ids)
    assert all("\ufffd" not in s for s in labels.values())
    raw = b"".join(token_bytes(tok, i) for i in ids)
    assert raw == " 😀 שלום".encode()  # the bytes of the tokens are the text's bytes
    frag = next(i for i in ids if "\ufffd" in tok.decode([i]))
    assert "\\x" in labels[frag] and labels[frag] == token_bytes(tok, frag).decode("utf-8", "backslashreplace")
    clean = tok(" the", add_special_tokens=False)["input_ids"][0]
    assert token_label(tok, clean) == " the"
    assert token_bytes(tok, tok.bos_token_id) is None  # special tokens have no bytes
    fb = byte_fallback()
    emoji = fb("😀", add_special_tokens=False)["input_ids"]
    assert [token_label(fb, i) for i in emoji if token_label(fb, i).startswith("\\x")]  # <0xF0> -> '\\xf0'
