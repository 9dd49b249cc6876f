"""Tokenize documents and pack them into fixed-length rows for SAE training: :func:`pack`,
:func:`corpus_tokens` (several sources, mixed, cached on disk) and :class:`PackedTokens`.

Layout of a row (``context_len`` positions)::

    [BOS] t t t t <eos> t t t ... t        (bos: one BOS, then context_len - 1 tokens of the stream)

The stream is every selected document tokenized *without* special tokens, each followed by the
tokenizer's EOS id as a separator (its SEP id if it has no EOS; nothing if it has neither), concatenated in
order and cut into rows; the last partial row is dropped. Rows are then shuffled (rows, never tokens).

Train/eval split (by document, so eval text never appears in train):

* a document goes to eval when ``u(text) < eval_fraction``, where ``u`` is the BLAKE2b hash of its UTF-8
  text keyed by ``seed``, read as a number in [0, 1). The split depends on the text alone: not on
  document order, on the other documents, on ``max_tokens`` or on the tokenizer; identical documents
  always land on the same side.
* Fallback for corpora with few documents (e.g. Austen's 6 novels), used only when the rule above
  leaves eval or train empty: every document is cut at blank lines into chunks of about
  ``CHUNK_CHARS`` characters, and the same hash rule is applied to chunks (if it still leaves a side
  empty, the chunk(s) with the smallest hash go to eval, or with the largest to train). Consecutive chunks
  on the same side are joined back into one document, so train and eval are disjoint spans of text and
  no token of the corpus is in both. (Text repeated verbatim in two places can of course occur in both.)

BOS and SAE training: a model's residual stream at the BOS position (or at any first position) has a
norm many times that of other positions (an attention sink); SAE training and evaluation should exclude
position 0 of rows that start with BOS (``PackedTokens.first_text_position``), as SAELens and sparsify do.

References:
    Bricken et al. 2023, "Towards Monosemanticity", section "Problem setup" (dataset of contexts);
    Bloom et al., SAELens ``TokenizedDataset``/``concat_and_batch_sequences`` (BOS per row, EOS between
    documents), which this packing follows.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor

from mechscope.core.errors import InputError
from mechscope.data.corpora import CORPORA
from mechscope.data.sources import load_documents, source_files
from mechscope.data.textfiles import first_surrogate

#: Target size of the chunks of the fallback split (characters, about 1,000 tokens of English).
CHUNK_CHARS = 4000
#: Documents per tokenizer call, and a cap on characters per call (keeps memory flat on long documents).
BATCH_DOCUMENTS, BATCH_CHARS = 64, 1 << 20
_FORMAT = 1  # bump when the packing rule changes: invalidates cached packed tokens

Split = Literal["train", "eval", "all"]


@dataclass(frozen=True, eq=False)  # eq=False: == on a tensor field is ambiguous; compare .tokens and .fingerprint
class PackedTokens:
    """Token rows of a corpus, ready for a model, plus where they came from.

    Attributes:
        tokens: ``[n_contexts, context_len]`` int64 token ids, rows shuffled.
        sources: the sources the documents came from (corpus names, paths, ``hf:`` specs).
        n_documents: documents (or fallback-split pieces) that contributed at least one token.
        n_tokens: non-BOS positions in ``tokens`` (text plus separator tokens).
        context_len: positions per row, BOS included.
        bos_token_id: the id at position 0 of every row, or None when rows have no BOS.
        sep_token_id: the separator between documents (the EOS id), or None.
        split: ``"train"``, ``"eval"`` or ``"all"``.
        eval_fraction: fraction of documents hashed into eval (dimensionless, in (0, 1)).
        seed: seed of the split hash and of the row shuffle.
        tokenizer: the tokenizer's name or path.
        fingerprint: BLAKE2b hex digest of the token ids and the fields above.
    """

    tokens: Int[Tensor, "n_contexts context_len"]
    sources: tuple[str, ...]
    n_documents: int
    n_tokens: int
    context_len: int
    bos_token_id: int | None
    sep_token_id: int | None
    split: str
    eval_fraction: float
    seed: int
    tokenizer: str
    fingerprint: str = ""

    def __post_init__(self) -> None:
        t = self.tokens
        if not isinstance(t, Tensor) or t.dtype != torch.long or t.ndim != 2:
            raise InputError("PackedTokens.tokens must be a 2-D int64 tensor [n_contexts, context_len], got "
                             f"{getattr(t, 'dtype', type(t).__name__)} of shape {tuple(getattr(t, 'shape', ()))}.")
        if t.shape[1] != self.context_len:
            raise InputError(f"PackedTokens.context_len={self.context_len} but tokens have {t.shape[1]} columns.")
        if self.split not in ("train", "eval", "all"):
            raise InputError(f"PackedTokens.split must be 'train', 'eval' or 'all', got {self.split!r}.")
        if self.n_tokens != t.shape[0] * (t.shape[1] - (self.bos_token_id is not None)):
            raise InputError(f"PackedTokens.n_tokens={self.n_tokens} does not match tokens of shape {tuple(t.shape)}.")
        if not self.fingerprint:
            object.__setattr__(self, "fingerprint", self._digest())
        elif self.fingerprint != self._digest():
            raise InputError("PackedTokens.fingerprint does not match its tokens and metadata: the data is corrupt "
                             "or was edited. Delete the cached folder and pack again.")

    @property
    def n_contexts(self) -> int:
        """Number of rows."""
        return self.tokens.shape[0]

    @property
    def first_text_position(self) -> int:
        """First position that holds text: 1 when rows start with BOS (exclude position 0 from SAE training), else 0."""
        return int(self.bos_token_id is not None)

    def metadata(self) -> dict:
        """Every field except ``tokens``, JSON-ready."""
        meta = asdict(self) | {"sources": list(self.sources)}
        del meta["tokens"]
        return meta

    def _digest(self) -> str:
        h = hashlib.blake2b(digest_size=16)
        h.update(self.tokens.contiguous().numpy().tobytes())
        h.update(json.dumps({k: v for k, v in self.metadata().items() if k != "fingerprint"}, sort_keys=True).encode())
        return h.hexdigest()

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``tokens.safetensors`` and ``meta.json`` into ``directory``, atomically (a temporary folder
        renamed into place; an existing folder is replaced). Returns the folder.

        Raises:
            DiskFullError: the disk filled up; nothing is left behind.
        """
        from mechscope.core.io import make_temp_dir, save_safetensors_atomic, write_json_atomic

        out = Path(directory)
        tmp = make_temp_dir(out.parent, prefix=out.name + ".tmp-")  # mode follows the umask
        try:
            save_safetensors_atomic({"tokens": self.tokens}, tmp / "tokens.safetensors")
            write_json_atomic(self.metadata(), tmp / "meta.json")
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return out

    @classmethod
    def load(cls, directory: str | os.PathLike) -> PackedTokens:
        """Read a folder written by :meth:`save`.

        Raises:
            InputError: if a file is missing, a metadata key is unknown or missing, or the fingerprint does not
                match (corrupt data).
            CorruptFileError: ``tokens.safetensors`` cannot be read (truncated or corrupted).
        """
        from mechscope.core.io import load_safetensors

        d = Path(directory)
        if not (d / "tokens.safetensors").is_file() or not (d / "meta.json").is_file():
            raise InputError(f"{d} is not a packed-tokens folder (needs tokens.safetensors and meta.json).")
        meta = json.loads((d / "meta.json").read_text(encoding="utf-8"))
        fields = {f for f in cls.__dataclass_fields__ if f != "tokens"}
        if set(meta) != fields:
            raise InputError(f"{d / 'meta.json'}: unknown keys {sorted(set(meta) - fields)}, missing keys "
                             f"{sorted(fields - set(meta))}. Was it written by another mechscope version? Pack again.")
        tokens = load_safetensors(d / "tokens.safetensors", "packed tokens")["tokens"]
        return cls(tokens=tokens, **(meta | {"sources": tuple(meta["sources"])}))


# ------------------------------------------------------------------------------------------------ split


def _unit(text: str, seed: int) -> float:
    """Stable hash of a text, keyed by seed, as a number in [0, 1)."""
    h = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=str(seed).encode(), person=b"mechscope-split")
    return int.from_bytes(h.digest(), "big") / 2.0**64


def _chunks(doc: str) -> tuple[str, list[str]]:
    """Cut a document at blank lines (else at newlines) into chunks of about CHUNK_CHARS characters."""
    sep = "\n\n" if "\n\n" in doc else "\n"
    chunks, cur, size = [], [], 0
    for para in doc.split(sep):
        cur.append(para)
        size += len(para) + len(sep)
        if size >= CHUNK_CHARS:
            chunks.append(sep.join(cur))
            cur, size = [], 0
    if cur:
        chunks.append(sep.join(cur))
    return sep, chunks


def split_documents(documents: Sequence[str], split: str, *, eval_fraction: float = 0.05,
                    seed: int = 0) -> list[str]:
    """The documents of one side of the train/eval split (see the module docstring for the rule).

    Args:
        documents: the corpus, in any order.
        split: ``"train"``, ``"eval"`` or ``"all"`` (everything, unchanged).
        eval_fraction: expected fraction of documents (or of fallback chunks) in eval, in (0, 1).
        seed: key of the hash; another seed gives another split.

    Returns:
        The selected documents, in their input order (fallback: pieces of documents, in text order).

    Raises:
        InputError: a bad split or eval_fraction, or text too short to split (a single chunk).
    """
    if split not in ("train", "eval", "all"):
        raise InputError(f"split must be 'train', 'eval' or 'all', got {split!r}.")
    if not 0.0 < eval_fraction < 1.0:
        raise InputError(f"eval_fraction must be in (0, 1), got {eval_fraction}.")
    if split == "all":
        return list(documents)
    want_eval = split == "eval"
    is_eval = [_unit(d, seed) < eval_fraction for d in documents]
    if any(is_eval) and not all(is_eval):
        return [d for d, e in zip(documents, is_eval) if e == want_eval]
    # fallback: split inside documents, by chunk
    cut = [_chunks(d) for d in documents]
    units = [[_unit(c, seed) for c in chunks] for _, chunks in cut]
    flat = [u for us in units for u in us]
    if len(flat) < 2:
        raise InputError(f"too little text to hold out an eval split ({sum(map(len, documents))} characters in one "
                         f"chunk of ~{CHUNK_CHARS}); use split='all' or add text.")
    lo, hi = min(flat), max(flat)
    n_eval = sum(u < eval_fraction for u in flat)
    side = [[(u <= lo) if n_eval == 0 else (u < eval_fraction and not (n_eval == len(flat) and u >= hi))
             for u in us] for us in units]
    out = []
    for (sep, chunks), sides in zip(cut, side):
        run: list[str] = []
        for chunk, e in zip(chunks, sides):
            if e == want_eval:
                run.append(chunk)
            elif run:
                out.append(sep.join(run))
                run = []
        if run:
            out.append(sep.join(run))
    return out


# -------------------------------------------------------------------------------------------------- pack


def _bos_id(tokenizer, bos) -> int | None:
    if bos == "auto":
        return tokenizer.bos_token_id
    if bos is True:
        if tokenizer.bos_token_id is None:
            raise InputError(f"bos=True but tokenizer {_tok_name(tokenizer)} has no BOS token; use bos=False or 'auto'.")
        return tokenizer.bos_token_id
    if bos is False:
        return None
    raise InputError(f"bos must be 'auto', True or False, got {bos!r}.")


def _tok_name(tokenizer) -> str:
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__


def _batches(docs: Sequence[str]):
    batch, chars = [], 0
    for d in docs:
        batch.append(d)
        chars += len(d)
        if len(batch) >= BATCH_DOCUMENTS or chars >= BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _encode(tokenizer, batch: list[str]) -> list[list[int]]:
    """Token ids of each text, no special tokens: the Rust backend's ``encode_batch_fast`` (no offsets; about
    1.5x faster) when there is one, else the tokenizer's ``__call__``. Both give the same ids."""
    fast = getattr(getattr(tokenizer, "backend_tokenizer", None), "encode_batch_fast", None)
    if fast is not None:
        return [e.ids for e in fast(batch, add_special_tokens=False)]
    return tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]


def _pack(docs: Sequence[str], tokenizer, *, context_len: int, bos, split: str, eval_fraction: float, seed: int,
          max_tokens: int | None, shuffle: bool, sources: tuple[str, ...]) -> PackedTokens:
    from tqdm.auto import tqdm

    if not isinstance(context_len, int) or isinstance(context_len, bool) or context_len < 2:
        raise InputError(f"context_len must be an int >= 2, got {context_len!r}.")
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
        raise InputError(f"max_tokens must be a positive int or None, got {max_tokens!r}.")
    if not callable(tokenizer) or not hasattr(tokenizer, "bos_token_id"):
        raise InputError(f"tokenizer must be a transformers tokenizer, got {type(tokenizer).__name__}.")
    bos_id = _bos_id(tokenizer, bos)
    sep_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else getattr(tokenizer, "sep_token_id", None)
    body = context_len - (bos_id is not None)
    budget = None if max_tokens is None else (max_tokens // body) * body
    if budget == 0:
        raise InputError(f"max_tokens={max_tokens} is less than one row ({body} tokens); raise it or lower context_len.")
    pieces, ends, total = [], [], 0
    sep = [] if sep_id is None else [sep_id]
    with tqdm(total=len(docs), unit="doc", desc="tokenizing", disable=None, leave=False) as bar:
        for batch in _batches(docs):
            for ids in _encode(tokenizer, batch):
                pieces.append(np.asarray(ids + sep, dtype=np.int64))
                total += len(pieces[-1])
                ends.append(total)
            bar.update(len(batch))
            if budget is not None and total >= budget:
                break
    n_rows = total // body if budget is None else min(total, budget) // body
    if n_rows == 0:
        raise InputError(f"{total} tokens from {len(docs)} documents of {list(sources)} ({split!r} split) do not fill "
                         f"one row of {context_len}; add text, lower context_len, or use another split.")
    stream = torch.from_numpy(np.concatenate(pieces)[:n_rows * body]).view(n_rows, body)
    if bos_id is not None:
        stream = torch.cat([torch.full((n_rows, 1), bos_id, dtype=torch.long), stream], dim=1)
    if shuffle:
        stream = stream[torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed))]
    n_docs = int(np.searchsorted(np.asarray(ends), n_rows * body - 1, side="right")) + 1
    return PackedTokens(tokens=stream.contiguous(), sources=sources, n_documents=min(n_docs, len(ends)),
                        n_tokens=n_rows * body, context_len=context_len, bos_token_id=bos_id, sep_token_id=sep_id,
                        split=split, eval_fraction=eval_fraction, seed=seed, tokenizer=_tok_name(tokenizer))


def pack(documents: Iterable[str], tokenizer, *, context_len: int, bos: Literal["auto"] | bool = "auto",
         split: Split = "train", eval_fraction: float = 0.05, seed: int = 0, max_tokens: int | None = None,
         shuffle: bool = True, sources: Sequence[str] = ("<documents>",)) -> PackedTokens:
    """Tokenize documents and pack them into shuffled rows of ``context_len`` tokens.

    Args:
        documents: the texts (e.g. from :func:`~mechscope.data.sources.load_documents`), used in this order.
        tokenizer: a ``transformers`` tokenizer (a fast one tokenizes in batches on all cores).
        context_len: positions per row, BOS included.
        bos: ``"auto"`` prepends the tokenizer's BOS id to every row if it has one (also when BOS == EOS,
            as in GPT-2, like TransformerLens and SAELens; SmolLM2's BOS ``<|im_start|>`` is id 1); True
            requires one; False gives rows of text only.
        split: ``"train"``, ``"eval"`` or ``"all"``; split by document hash (module docstring).
        eval_fraction: fraction of documents in eval, in (0, 1).
        seed: key of the split hash and seed of the row shuffle.
        max_tokens: at most this many non-BOS tokens (text and separators) in the rows; tokenizing stops
            once enough documents are read. The split does not depend on it.
        shuffle: shuffle the rows (a ``torch.Generator`` seeded with ``seed``); tokens within a row keep
            their order.
        sources: names recorded in the result's metadata.

    Returns:
        :class:`PackedTokens` whose ``tokens`` are ``[n_contexts, context_len]`` int64. Same inputs give an
        identical tensor.

    Raises:
        InputError: a single string instead of a list, a bad argument, ``bos=True`` without a BOS token, a
            document with a lone surrogate (names its index), or too little text for one row.
    """
    if isinstance(documents, (str, bytes)):
        raise InputError("pack() takes a list of documents, got one string; use load_documents(source) for a corpus "
                         "name or path, or corpus_tokens(...), or wrap a single text in a list.")
    docs = list(documents)
    bad = next((d for d in docs if not isinstance(d, str)), None)
    if bad is not None:
        raise InputError(f"documents must be strings, got {type(bad).__name__}.")
    if not docs:
        raise InputError("pack() got no documents.")
    for i, d in enumerate(docs):
        at = first_surrogate(d)
        if at is not None:
            raise InputError(f"document {i} holds a lone surrogate \\u{ord(d[at]):04x} at character {at}: not Unicode "
                             "text, so it can be neither hashed for the split nor tokenized. Repair it (e.g. "
                             "text.encode('utf-8', 'replace').decode('utf-8')) or leave the document out.")
    chosen = split_documents(docs, split, eval_fraction=eval_fraction, seed=seed)
    return _pack(chosen, tokenizer, context_len=context_len, bos=bos, split=split, eval_fraction=eval_fraction,
                 seed=seed, max_tokens=max_tokens, shuffle=shuffle, sources=tuple(map(str, sources)))


# ------------------------------------------------------------------------------------------ corpus_tokens


def _source_identity(source) -> list:
    """What the cache key records of a source: a corpus's version, or the names, sizes and mtimes of files."""
    s = str(source)
    if isinstance(source, str) and s in CORPORA:
        return ["corpus", s, CORPORA[s].version]
    path = Path(s[3:].split(":")[0] if s.startswith("hf:") else s)
    if path.exists():
        files = source_files(path) if path.is_dir() and not s.startswith("hf:") else (
            sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path])
        stats = [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
        return ["files", s, str(path.resolve()), stats]
    return ["other", s]  # a hub dataset (not re-checked) or a missing path (load_documents will raise)


def _tokenizer_identity(tokenizer) -> list:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest = hashlib.blake2b(backend.to_str().encode(), digest_size=16).hexdigest()
    else:
        digest = hashlib.blake2b(json.dumps(sorted(tokenizer.get_vocab().items())).encode(), digest_size=16).hexdigest()
    return [_tok_name(tokenizer), len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, digest]


def packed_cache_dir() -> Path:
    """Where :func:`corpus_tokens` caches packed tokens: ``cache_dir() / "tokens"``."""
    from mechscope.models.loading import cache_dir

    return cache_dir() / "tokens"


def corpus_tokens(sources: str | os.PathLike | Sequence[str | os.PathLike], tokenizer, context_len: int,
                  split: Split = "train", *, bos: Literal["auto"] | bool = "auto", eval_fraction: float = 0.05,
                  seed: int = 0, max_tokens: int | None = None, shuffle: bool = True, text_field: str = "text",
                  split_lines: bool = False, dataset_split: str = "train", max_documents: int | None = None,
                  cache: bool = True) -> PackedTokens:
    """Packed tokens of one or several sources, mixed deterministically, cached on disk.

    Each source is loaded with :func:`~mechscope.data.sources.load_documents` and split into train/eval
    on its own (so a small corpus gets its fallback split without affecting the others). The selected
    documents of all sources are then ordered by a seeded hash of their text, which interleaves the
    sources (with ``max_tokens``, the rows hold a mixture rather than the first source), and packed as by
    :func:`pack`.

    The result is cached under ``cache_dir() / "tokens" / <key>`` (``tokens.safetensors`` + ``meta.json``),
    the key hashing the sources (corpus versions; file names, sizes and mtimes), the tokenizer (name, vocab
    size, special ids and its full serialized form) and every argument; a second call loads it in
    milliseconds. A hub dataset is not re-checked: pass ``cache=False`` to re-read it.

    Args:
        sources: a source or a list of them (see ``load_documents``), e.g. ``["pydoc", "wikipedia", "austen",
            "shakespeare"]``.
        tokenizer, context_len, split, bos, eval_fraction, seed, max_tokens, shuffle: as in :func:`pack`.
        text_field, split_lines, dataset_split, max_documents: as in ``load_documents`` (per source).
        cache: read and write the on-disk cache.

    Returns:
        :class:`PackedTokens`, ``tokens`` ``[n_contexts, context_len]`` int64.

    Raises:
        InputError: as ``load_documents`` and :func:`pack`; no sources.
        CorpusUnavailableError: a built-in corpus that cannot be fetched here.
    """
    srcs = [sources] if isinstance(sources, (str, os.PathLike)) else list(sources)
    if not srcs:
        raise InputError("corpus_tokens() got no sources; pass a corpus name, a path, or a list of them.")
    names = tuple(str(s) for s in srcs)
    key_data = [_FORMAT, [_source_identity(s) for s in srcs], _tokenizer_identity(tokenizer), context_len, str(bos),
                split, eval_fraction, seed, max_tokens, shuffle, text_field, split_lines, dataset_split, max_documents]
    key = hashlib.blake2b(json.dumps(key_data).encode(), digest_size=16).hexdigest()
    where = packed_cache_dir() / key
    if cache and where.is_dir():
        return PackedTokens.load(where)
    mixed = []
    for i, src in enumerate(srcs):
        docs = load_documents(src, text_field=text_field, split_lines=split_lines, dataset_split=dataset_split,
                              max_documents=max_documents)
        chosen = split_documents(docs, split, eval_fraction=eval_fraction, seed=seed)
        mixed += [(_unit(d, seed + 1), i, j, d) for j, d in enumerate(chosen)]
    mixed.sort(key=lambda x: x[:3])
    packed = _pack([d for *_, d in mixed], tokenizer, context_len=context_len, bos=bos, split=split,
                   eval_fraction=eval_fraction, seed=seed, max_tokens=max_tokens, shuffle=shuffle, sources=names)
    if cache:
        packed.save(where)
    return packed
