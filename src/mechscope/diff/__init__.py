"""Model diffing: what changed between a BASE model and a TUNED one (e.g. a fine-tune of it).

- :func:`check_comparable`: refuse pairs of different architecture or tokenizer (saying what differs);
- :func:`weight_deltas`: ||W_t - W_b||_F per parameter, aggregated per layer and per module kind;
- :func:`activation_diff`: norm ratio, cosine and relative difference of activations per layer and per head;
- :func:`token_kl`: per-token KL(P_tuned || P_base) with a bootstrap interval and the most-changed tokens;
- :func:`logit_lens_diff`: the same KL through each layer's logit lens;
- :func:`cross_model_patching`: patch the base's components into the tuned model, one at a time
  (:func:`logprob_metric` for the usual metric);
- :func:`dictionary_diff`: a crosscoder or diff-SAE on both models' activations, its tuned-specific latents;
- :func:`diff_models`: all of it as one :class:`DiffResult` (``save`` writes JSON). CLI: ``mechscope diff``.
"""

from mechscope.diff.activations import DEFAULT_SITES, ActivationDiff, activation_diff
from mechscope.diff.compat import check_comparable
from mechscope.diff.cross_patch import (
    CROSS_KINDS,
    CrossPatchResult,
    cross_model_patching,
    logprob_metric,
)
from mechscope.diff.dictionary import DICTIONARY_KINDS, DictionaryDiff, dictionary_diff
from mechscope.diff.kl import (
    LensDiff,
    TokenKL,
    kl_from_logits,
    logit_lens_diff,
    token_kl,
)
from mechscope.diff.run import DiffResult, diff_models
from mechscope.diff.weights import KINDS, ParamDelta, WeightDeltas, weight_deltas

__all__ = [
    "CROSS_KINDS",
    "DEFAULT_SITES",
    "DICTIONARY_KINDS",
    "KINDS",
    "ActivationDiff",
    "CrossPatchResult",
    "DictionaryDiff",
    "DiffResult",
    "LensDiff",
    "ParamDelta",
    "TokenKL",
    "WeightDeltas",
    "activation_diff",
    "check_comparable",
    "cross_model_patching",
    "dictionary_diff",
    "diff_models",
    "kl_from_logits",
    "logit_lens_diff",
    "logprob_metric",
    "token_kl",
    "weight_deltas",
]
