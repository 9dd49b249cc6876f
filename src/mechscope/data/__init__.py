"""Datasets and token streams: IOI prompts (:mod:`mechscope.data.ioi`), real-text corpora and user text
(:mod:`mechscope.data.corpora`, :mod:`mechscope.data.sources`), tokenizing and packing into rows
(:mod:`mechscope.data.packing`), activations streamed (:mod:`mechscope.data.store`) or harvested to shards
(:mod:`mechscope.data.harvesting` writes them, :mod:`mechscope.data.shards` reads them), and circuit tasks: clean and corrupted prompts with answers and a metric
(:mod:`mechscope.data.tasks`)."""

from mechscope.data.corpora import CORPORA, CorpusSpec, available_corpora, load_corpus
from mechscope.data.sources import load_documents
from mechscope.data.ioi import IOIDataset, make_ioi_dataset
from mechscope.data.labelled import Example, LabelledDataset, check_disjoint
from mechscope.data.labelled_builtins import BUILTIN_LABELLED, load_labelled
from mechscope.data.labelled_render import RenderedExample, render
from mechscope.data.packing import PackedTokens, corpus_tokens, pack, split_documents
from mechscope.data.harvesting import harvest
from mechscope.data.shards import ShardedActivations
from mechscope.data.store import ActivationStream, MemoryPlan, MemoryTerm, plan_memory
from mechscope.data.tasks import (
    BUILTIN_TASKS,
    TASK_METRICS,
    Task,
    TaskCheck,
    check_task,
    docstring_task,
    factual_recall_task,
    greater_than_task,
    induction_task,
    ioi_task,
    load_task,
    resolve_task_source,
    save_task,
)

__all__ = [
    "IOIDataset", "make_ioi_dataset",
    "CORPORA", "CorpusSpec", "available_corpora", "load_corpus", "load_documents",
    "PackedTokens", "pack", "corpus_tokens", "split_documents",
    "ActivationStream", "MemoryPlan", "MemoryTerm", "plan_memory", "harvest", "ShardedActivations",
    "Task", "TaskCheck", "TASK_METRICS", "check_task", "load_task", "resolve_task_source", "save_task",
    "BUILTIN_TASKS",
    "Example", "LabelledDataset", "check_disjoint", "BUILTIN_LABELLED", "load_labelled", "RenderedExample", "render",
    "ioi_task", "induction_task", "greater_than_task", "factual_recall_task", "docstring_task",
]
