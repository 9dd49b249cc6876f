"""Token ids to draw random sequences from: a model's vocabulary less its special tokens, and its BOS id.

Used for repeated random tokens (induction scores, :mod:`mechscope.analysis.head_scores`) and the induction
task (:mod:`mechscope.data.task_builtins`), so both draw from the same tokens.
"""

from __future__ import annotations

import torch
from jaxtyping import Int
from torch import Tensor


def bos_id(model) -> int | None:
    """The model's BOS token id: its tokenizer's, else its config's (if it lies in the vocabulary), else None."""
    tok = model.tokenizer
    if tok is not None and tok.bos_token_id is not None:
        return int(tok.bos_token_id)
    bos = getattr(model.hf.config, "bos_token_id", None)
    return int(bos) if isinstance(bos, int) and 0 <= bos < model.cfg.d_vocab else None


def ordinary_token_ids(model, *, exclude_bos: bool = True) -> Int[Tensor, " n_tokens"]:
    """Ids a random sequence may use: the vocabulary (the tokenizer's, if smaller than the unembedding) less
    the tokenizer's special and special added tokens, and less BOS when ``exclude_bos``.

    Returns:
        int64 [n_tokens], ascending, on the CPU.
    """
    n_vocab = model.cfg.d_vocab
    special: set[int] = set()
    if model.tokenizer is not None:
        n_vocab = min(n_vocab, len(model.tokenizer))
        special = set(model.tokenizer.all_special_ids)
        added = getattr(model.tokenizer, "added_tokens_decoder", {}) or {}
        special |= {int(i) for i, t in added.items() if getattr(t, "special", False)}
    bos = bos_id(model)
    if exclude_bos and bos is not None:
        special.add(bos)
    return torch.tensor([i for i in range(n_vocab) if i not in special], dtype=torch.long)
