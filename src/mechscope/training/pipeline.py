"""From real text to trained dictionaries in one call: pack a corpus, harvest activations, train, evaluate.

This is what ``mechscope sae train`` and ``mechscope sae eval`` run. The harvested activations live in
``cache_dir()/activations/<key>`` (key: model, hooks, tokens, dtype), so a second run with the same data
reuses them, and a killed harvest resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mechscope.core.errors import InputError
from mechscope.core.io import jsonable, write_json_atomic
from mechscope.data.packing import PackedTokens, corpus_tokens
from mechscope.data.harvesting import harvest
from mechscope.data.store import ActivationStream
from mechscope.dictionaries.model import SparseDictionary
from mechscope.evals.dictionary_eval import DictionaryEval, evaluate_dictionary
from mechscope.models.loading import cache_dir
from mechscope.training.config import DictionarySpec, TrainConfig
from mechscope.training.trainer import Trainer

#: INFO when training repeats its text (the CLI shows it as a note).
log = logging.getLogger(__name__)

DEFAULT_CORPORA = ("pydoc", "wikipedia", "austen", "shakespeare")


@dataclass(frozen=True)
class CorpusConfig:
    """Which text, and how it is cut.

    Attributes:
        sources: corpus names, files, folders or ``hf:`` datasets (see ``mechscope.data.load_documents``).
        context_len: tokens per context, BOS included.
        eval_fraction: fraction of documents held out for evaluation (never trained on).
        seed: split and shuffle seed.
        text_field: the JSONL field / Parquet or dataset column that holds the text.
        split_lines: ``.txt`` files hold one document per non-blank line (else one per file).
    """

    sources: tuple[str, ...] | list[str] = DEFAULT_CORPORA
    context_len: int = 128
    eval_fraction: float = 0.05
    seed: int = 0
    text_field: str = "text"
    split_lines: bool = False

    def __post_init__(self):
        object.__setattr__(self, "sources", tuple(self.sources))
        if not self.sources:
            raise InputError("sources is empty; name at least one corpus or file.")
        if not isinstance(self.context_len, int) or self.context_len < 3:
            raise InputError(f"context_len must be an int >= 3, got {self.context_len!r}.")
        if not isinstance(self.text_field, str) or not self.text_field:
            raise InputError(f"text_field must name a field or column, got {self.text_field!r}.")


def contexts_for(model, corpus: CorpusConfig, split: str, n_tokens: int | None,
                 cache: bool = True) -> tuple[PackedTokens, int]:
    """Packed contexts of a split with at least ``n_tokens`` trainable positions (BOS excluded), if the text has them
    (``cache``: read and write the packed-token cache; one rank of a distributed job does).

    Returns:
        (packed tokens, number of contexts to use).
    """
    if model.tokenizer is None:
        raise InputError("this model has no tokenizer; corpora need one (load with mechscope.load()).")
    per_ctx = corpus.context_len - 1
    max_tokens = None if n_tokens is None else int(n_tokens * 1.02) + corpus.context_len * 4
    packed = corpus_tokens(list(corpus.sources), model.tokenizer, corpus.context_len, split,
                           eval_fraction=corpus.eval_fraction, seed=corpus.seed, max_tokens=max_tokens,
                           text_field=corpus.text_field, split_lines=corpus.split_lines, cache=cache)
    n_ctx = packed.tokens.shape[0] if n_tokens is None else min(packed.tokens.shape[0], math.ceil(n_tokens / per_ctx))
    if n_ctx == 0:
        raise InputError(f"the {split} split of {list(corpus.sources)} has no full context of {corpus.context_len} tokens.")
    return packed, n_ctx


def activations_dir(model, hooks: Sequence[str], packed: PackedTokens, n_ctx: int, dtype: str) -> Path:
    key = json.dumps([model.cfg.name, model.cfg.dtype, list(hooks), packed.fingerprint, n_ctx, dtype])
    return cache_dir() / "activations" / hashlib.blake2b(key.encode(), digest_size=8).hexdigest()


def train_on_corpus(model, specs: Sequence[DictionarySpec], cfg: TrainConfig, out_dir: str | Path, *,
                    corpus: CorpusConfig = CorpusConfig(), activation_dtype: str = "bfloat16",
                    forward_batch_contexts: int = 8, resume: bool = False, progress: bool = True,
                    harvest_dir: str | Path | None = None, stream: bool = False,
                    buffer_tokens: int = 2**18, dist=None, tp: int = 1,
                    device: str | None = None) -> dict[str, SparseDictionary]:
    """Harvest the hooks the dictionaries need over the train split, then train them all in one pass.

    If the train split has fewer tokens than ``cfg.n_tokens``, training runs several epochs over it
    (``data.json`` records ``unique_tokens``; an INFO log of ``mechscope.training.pipeline`` says how many
    passes before training starts).

    Args:
        stream: read activations from the model while training, through a shuffle buffer of
            ``buffer_tokens`` rows, instead of harvesting them to disk first (no disk needed; a resume
            replays the stream up to the checkpoint, costing forward passes).
        dist: the :class:`~mechscope.scale.dist.DistInfo` of a torchrun job: the harvest splits its shards over
            the ranks (:func:`~mechscope.data.harvest`), training is data parallel (each rank reads its rows of
            every batch; :class:`~mechscope.training.Trainer`), rank 0 writes. Streaming is refused (every rank
            would run the model on every token): harvest.
        tp: latent shards per dictionary (the world size must be a multiple; see the Trainer).
        device: where the dictionaries train (default: the model's device).

    Raises:
        InputError: bad hooks, a corpus that cannot be loaded (says which and why), bad configs.
        MemoryBudgetError: a harvest plan over ``cfg.memory_budget_bytes``.
    """
    parallel = dist is not None and dist.world_size > 1
    if parallel and stream:
        raise InputError("--stream under torchrun would run the model on every token on every rank; drop --stream "
                         "(the harvest is split over the ranks) or run one process.")
    hooks = sorted({h for s in specs for h in (s.dictionary.hook_in, s.dictionary.hook_out)})
    model.resolve(hooks)
    from mechscope.dictionaries.splice import Splice

    for s in specs:
        Splice(SparseDictionary(s.dictionary)).check_model(model)
    packed, n_ctx = contexts_for(model, corpus, "train", cfg.n_tokens, cache=not parallel or dist.rank == 0)
    import torch

    if stream:
        folder, per_row = None, corpus.context_len - 1
        store = ActivationStream(model, hooks, packed.tokens[:n_ctx], batch_tokens=cfg.batch_tokens,
                                 # no larger than the text itself (a bigger buffer would cycle to fill)
                                 buffer_tokens=max(2 * cfg.batch_tokens, min(buffer_tokens, n_ctx * per_row)),
                                 forward_batch_contexts=forward_batch_contexts, dtype=getattr(torch, activation_dtype),
                                 seed=cfg.seed, epochs=None, memory_budget_bytes=cfg.memory_budget_bytes)
        unique = store.n_tokens_total
    else:
        folder = Path(harvest_dir) if harvest_dir else activations_dir(model, hooks, packed, n_ctx, activation_dtype)
        store = harvest(model, hooks, packed.tokens[:n_ctx], folder, dtype=getattr(torch, activation_dtype),
                        forward_batch_contexts=forward_batch_contexts, memory_budget_bytes=cfg.memory_budget_bytes,
                        progress=progress and (not parallel or dist.is_main), dist=dist if parallel else None)
        unique = store.n_tokens
    if unique < cfg.n_tokens_trained:
        log.info("the train split of %s holds %s tokens; training on %s makes %.1f passes over it (add text with "
                 "--corpus for fewer repeats)", ", ".join(corpus.sources), f"{unique:,}", f"{cfg.n_tokens_trained:,}",
                 cfg.n_tokens_trained / unique)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not parallel or dist.is_main:
        write_json_atomic(jsonable({"model": model.cfg.name, "model_dtype": model.cfg.dtype, "hooks": hooks,
                                    "corpus": corpus, "unique_tokens": unique, "train_tokens": cfg.n_tokens,
                                    "train_tokens_used": cfg.n_tokens_trained,
                                    "activations": str(folder) if folder else "streamed",
                                    "tokens_fingerprint": packed.fingerprint}),
                          out / "data.json")
    specs = [s if s.dictionary.model_name else
             DictionarySpec(**{**{f: getattr(s, f) for f in s.__dataclass_fields__},
                               "dictionary": s.dictionary.replace(model_name=model.cfg.name)}) for s in specs]
    return Trainer(specs, cfg, out, progress=progress, dist=dist if parallel else None, tp=tp,
                   device=device or model.device).fit(store, resume=resume)


def evaluate_on_corpus(model, dictionary: SparseDictionary, *, corpus: CorpusConfig = CorpusConfig(),
                       n_tokens: int = 25_000, batch_contexts: int = 8, progress: bool = True,
                       dist=None) -> DictionaryEval:
    """Evaluate a dictionary on the held-out (eval) split of a corpus, about ``n_tokens`` positions.

    ``dist``: a :class:`~mechscope.scale.dist.DistInfo` splits the batches over ranks
    (:func:`~mechscope.evals.dictionary_eval.evaluate_dictionary`).

    Returns:
        The metrics; ``n_tokens`` is what was evaluated and ``n_tokens_requested`` what was asked: fewer when
        the split holds fewer tokens (the held-out split is ``eval_fraction`` of the documents).
    """
    import dataclasses

    packed, n_ctx = contexts_for(model, corpus, "eval", n_tokens, cache=dist is None or dist.rank == 0)
    e = evaluate_dictionary(model, dictionary, packed.tokens[:n_ctx], batch_contexts=batch_contexts,
                            progress=progress, dist=dist)
    return dataclasses.replace(e, n_tokens_requested=n_tokens)
