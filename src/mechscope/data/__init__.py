"""Datasets and token streams: IOI prompts (:mod:`mechscope.data.ioi`), real-text corpora and user text
(:mod:`mechscope.data.corpora`), tokenizing and packing into rows (:mod:`mechscope.data.packing`)."""

from mechscope.data.corpora import CORPORA, CorpusSpec, available_corpora, load_corpus, load_documents
from mechscope.data.ioi import IOIDataset, make_ioi_dataset
from mechscope.data.packing import PackedTokens, corpus_tokens, pack, split_documents

__all__ = [
    "IOIDataset", "make_ioi_dataset",
    "CORPORA", "CorpusSpec", "available_corpora", "load_corpus", "load_documents",
    "PackedTokens", "pack", "corpus_tokens", "split_documents",
]

# activation store: in-memory stream (:mod:`mechscope.data.store`) and on-disk shards (:mod:`mechscope.data.shards`)
from mechscope.data.shards import ShardedActivations, harvest  # noqa: E402
from mechscope.data.store import ActivationStream, MemoryPlan, MemoryTerm, plan_memory  # noqa: E402

__all__ += ["ActivationStream", "MemoryPlan", "MemoryTerm", "plan_memory", "harvest", "ShardedActivations"]
