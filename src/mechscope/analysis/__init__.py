"""Analyses: free functions over a HookedModel (and the caches it returns).

- :func:`logit_lens`: each layer's residual stream read through the final norm and unembedding;
- :func:`direct_logit_attribution`: a logit difference split into embedding, heads, MLPs, biases;
- :func:`head_scores` / :func:`repeated_random_tokens`: induction, previous- and duplicate-token heads;
- :func:`logit_diff` / :func:`make_metric`: patching metrics;
- :func:`activation_patching` / :func:`attribution_patching`: patching maps over layers, positions, heads
  (with ``ci=True``, bootstrap intervals over prompts);
- :func:`bootstrap_ci`: percentile bootstrap confidence intervals over prompts (:class:`CI`).
"""

from mechscope.analysis.bootstrap import CI, bootstrap_ci, bootstrap_indices
from mechscope.analysis.dla import DLAResult, direct_logit_attribution
from mechscope.analysis.head_scores import SCORE_KINDS, head_scores, repeated_random_tokens
from mechscope.analysis.logit_lens import LogitLensResult, logit_lens
from mechscope.analysis.metrics import METRIC_KINDS, Metric, logit_diff, make_metric
from mechscope.analysis.patching import PATCH_KINDS, PatchingResult, activation_patching, attribution_patching

__all__ = [
    "logit_lens", "LogitLensResult", "direct_logit_attribution", "DLAResult", "repeated_random_tokens",
    "head_scores", "SCORE_KINDS", "logit_diff", "make_metric", "Metric", "METRIC_KINDS", "activation_patching",
    "attribution_patching", "PatchingResult", "PATCH_KINDS", "bootstrap_ci", "bootstrap_indices", "CI",
]
