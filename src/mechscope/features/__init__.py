"""Features: statistics of dictionary latents and MLP neurons over a corpus (a DuckDB feature database),
steering with latents and contrastive vectors, and auto-interpretation scored by detection.

- :func:`build_feature_db` / :class:`FeatureDB` (:mod:`.stats`, :mod:`.build`, :mod:`.db`);
- :mod:`.steering`: :func:`steer_latents`, :func:`contrastive_direction`, :func:`measure_steering`;
  :mod:`.generation`: :func:`generate` with steering from an absolute position under the KV cache;
- :mod:`.autointerp`: :func:`explain`, :func:`score_detection`, :class:`LocalChatBackend`, :class:`OpenAIChatBackend`.
"""

from mechscope.features.autointerp import (
    BackendError,
    DetectionScore,
    Example,
    Explanation,
    LocalChatBackend,
    OpenAIChatBackend,
    ScoredLabel,
    explain,
    explain_and_score,
    sample_detection_set,
    score_detection,
)
from mechscope.features.build import build_feature_db
from mechscope.features.db import FeatureDB
from mechscope.features.sources import FeatureSource
from mechscope.features.stats import StatsConfig
from mechscope.features.generation import Generation, compare_generations, generate
from mechscope.features.steering import (
    LatentSteer,
    SteeringEffect,
    add_directions,
    contrastive_direction,
    decoder_direction,
    measure_steering,
    promoted_tokens,
    steer_latents,
)

__all__ = [
    "BackendError", "DetectionScore", "Example", "Explanation", "LocalChatBackend", "OpenAIChatBackend", "ScoredLabel",
    "explain", "explain_and_score", "sample_detection_set", "score_detection", "build_feature_db", "FeatureDB",
    "FeatureSource", "StatsConfig", "Generation", "LatentSteer", "SteeringEffect", "add_directions",
    "compare_generations", "contrastive_direction", "decoder_direction", "generate", "measure_steering",
    "promoted_tokens", "steer_latents",
]
