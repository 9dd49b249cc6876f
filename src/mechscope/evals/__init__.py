"""Evaluations of sparse dictionaries: L0, FVU, CE loss recovered, KL, dead and dense latents."""

from mechscope.evals.dictionary_eval import DictionaryEval, evaluate_dictionary

__all__ = ["DictionaryEval", "evaluate_dictionary"]
