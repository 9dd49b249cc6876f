"""Data of the induction-head toy: the text rows (a BPE trained on the corpora, or SmolLM2's tokens mapped
onto a small vocabulary), the synthetic repeated trigram-language sequences, and the repeated-random-token
probe of the head scores. Split from :mod:`mechscope.toys.induction`, which re-exports every name."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from jaxtyping import Int
from torch import Tensor

from mechscope.core.errors import InputError

if TYPE_CHECKING:
    from mechscope.toys.induction_config import InductionConfig


def remap_vocab(train: Int[Tensor, "n pos"], vocab: int) -> Tensor:
    """A lookup table ``[max id + 1]``: the ``vocab - 1`` most frequent ids of ``train`` to 1..vocab-1 (most
    frequent first), every other id to 0 ("other")."""
    counts = torch.bincount(train.reshape(-1))
    keep = counts.argsort(descending=True)[:vocab - 1]
    keep = keep[counts[keep] > 0]
    table = torch.zeros(counts.numel(), dtype=torch.long)
    table[keep] = torch.arange(1, keep.numel() + 1)
    return table


def train_bpe(corpus: tuple[str, ...], vocab: int, seed: int = 0):
    """A byte-level BPE tokenizer with ``vocab`` ids trained on the train split of ``corpus`` (the split
    :func:`~mechscope.data.corpus_tokens` uses with ``seed``), as a ``transformers`` fast tokenizer.

    Id 0 is ``<|endoftext|>``, the BOS of every row and the separator between documents; ids 1..256 are the
    256 bytes, so every text is encoded without an "other" id. Training is deterministic (HF ``tokenizers``)
    and takes a few seconds on the default corpora.

    Raises:
        InputError: ``vocab`` < 258 (the special id and the 256 bytes need 257, and BPE needs a merge).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from mechscope.data.packing import split_documents
    from mechscope.data.sources import load_documents

    if vocab < 258:
        raise InputError(f"a BPE vocabulary needs >= 258 ids (1 special + 256 bytes + merges), got {vocab}; "
                         "raise --vocab or use --tokenizer smollm2.")
    docs = [d for src in corpus for d in split_documents(load_documents(src), "train", seed=seed)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(docs, trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   name_or_path=f"bpe{vocab}-" + "-".join(corpus))


def text_data(cfg: InductionConfig) -> tuple[Tensor, Tensor, float]:
    """(train rows, eval rows, share of train tokens that have their own id) from the corpora.

    ``cfg.tokenizer == "bpe"``: a BPE trained on the train split (:func:`train_bpe`; share 1.0).
    ``"smollm2"``: the default model's tokenizer, remapped onto its ``vocab - 1`` most frequent training
    tokens plus one "other" id (:func:`remap_vocab`).
    """
    from mechscope.data import corpus_tokens

    if cfg.tokenizer == "bpe":
        tok = train_bpe(cfg.corpus, cfg.vocab, cfg.seed)
    else:
        import mechscope
        tok = mechscope.load("smollm2-135m", dtype="float32").tokenizer
    tr = corpus_tokens(list(cfg.corpus), tok, cfg.context_len, "train", seed=cfg.seed).tokens
    ev = corpus_tokens(list(cfg.corpus), tok, cfg.context_len, "eval", seed=cfg.seed).tokens[:cfg.eval_contexts]
    if cfg.tokenizer == "bpe":
        return tr, ev, 1.0
    table = remap_vocab(tr, cfg.vocab)
    big = max(int(tr.max()), int(ev.max())) + 1
    table = torch.cat([table, torch.zeros(big - table.numel(), dtype=torch.long)]) if big > table.numel() else table
    tr, ev = table[tr], table[ev]
    return tr, ev, float((tr != 0).float().mean())


def repeated_tokens(n: int, seq_len: int, vocab: int, generator: torch.Generator, bos: int = 0) -> Int[Tensor, "n pos"]:
    """``n`` rows: ``bos`` (the place a head can attend to when it has nothing to do), then ``seq_len``
    random ids in 1..vocab-1 other than ``bos``, then the same ids again: ``[n, 1 + 2 * seq_len]``."""
    if bos == 0:
        seq = torch.randint(1, vocab, (n, seq_len), generator=generator)
    else:
        seq = torch.randint(1, vocab - 1, (n, seq_len), generator=generator)
        seq = seq + (seq >= bos).long()  # every id but 0 and the BOS
    return torch.cat([torch.full((n, 1), bos, dtype=torch.long), seq, seq], 1)


def trigram_sequences(n: int, seq_len: int, vocab: int, generator: torch.Generator, table_seed: int,
                      branching: int = 2) -> Int[Tensor, "n seq_len"]:
    """Sequences of a random trigram language: the next id is one of ``branching`` ids fixed (by
    ``table_seed``) for each pair of the two previous ids, chosen uniformly.

    Predicting the next id needs the previous id as well as the current one, which is what makes a
    previous-token head useful early in training (as on real text), the half an induction head builds on.
    """
    t = torch.randint(1, vocab, (vocab, vocab, branching), generator=torch.Generator().manual_seed(table_seed))
    x = torch.empty(n, seq_len, dtype=torch.long)
    x[:, :2] = torch.randint(1, vocab, (n, 2), generator=generator)
    for i in range(2, seq_len):
        pick = torch.randint(0, branching, (n,), generator=generator)
        x[:, i] = t[x[:, i - 2], x[:, i - 1], pick]
    return x


def _synthetic_batch(cfg: InductionConfig, g: torch.Generator) -> Tensor:
    """BOS, a trigram-language filler, then a trigram-language sequence followed by itself.

    The sequence length (``repeat_len // 2 .. 2 * repeat_len``) and the filler length (0 .. the sequence
    length) are drawn per batch, so neither the place nor the period of the repeat can be read from
    positions: only copying by content (an induction circuit) predicts the second copy beyond what the
    trigram rule gives.
    """
    hi = min(2 * cfg.repeat_len, (cfg.context_len - 1) // 3)
    length = int(torch.randint(max(2, min(cfg.repeat_len // 2, hi)), hi + 1, (1,), generator=g))
    filler = int(torch.randint(0, length + 1, (1,), generator=g))
    seq = trigram_sequences(cfg.batch, filler + length, cfg.vocab, g, table_seed=cfg.seed + 7)
    return torch.cat([torch.zeros(cfg.batch, 1, dtype=torch.long), seq, seq[:, filler:]], 1)


def probe_tokens(cfg: InductionConfig, train_rows: Tensor | None) -> Tensor:
    """The head-score prompts: ``repeat_batch`` random sequences of ``repeat_len`` ids repeated once, after
    the training rows' BOS id (0 for synthetic runs), seeded by ``cfg.seed + 1``.

    With text, the ids are drawn uniformly from those that occur in ``train_rows`` (a trained BPE's
    alphabet holds bytes the corpora never use; their embeddings are never trained).
    """
    g = torch.Generator().manual_seed(cfg.seed + 1)
    if train_rows is None:
        return repeated_tokens(cfg.repeat_batch, cfg.repeat_len, cfg.vocab, g, bos=0)
    bos = int(train_rows[0, 0])
    seen = torch.bincount(train_rows.reshape(-1).cpu(), minlength=cfg.vocab) > 0
    seen[bos] = False
    pool = seen.nonzero().flatten()
    if pool.numel() < 2:
        raise InputError(f"the training rows hold {pool.numel()} distinct ids besides BOS; the head scores need more text.")
    seq = pool[torch.randint(0, pool.numel(), (cfg.repeat_batch, cfg.repeat_len), generator=g)]
    return torch.cat([torch.full((cfg.repeat_batch, 1), bos, dtype=torch.long), seq, seq], 1)
