"""Attribution graphs (Ameisen et al. 2025, "Circuit Tracing"): a transcoder for every layer, the local replacement
model of a prompt, the graph of direct effects between its features, error nodes, tokens and target logits,
pruning with replacement and completeness scores.

- :class:`TranscoderSet`, :func:`load_transcoders`, :func:`save_transcoders`: one transcoder per layer, one folder.
- :func:`replacement_state`, :func:`frozen_forward`: the local replacement model on the real HF forward.
- :func:`attribute`: the graph of one prompt (:class:`AttributionGraph`); :func:`prune`, :func:`graph_scores`.
- :func:`suggest_supernodes` / :func:`steer_supernode`: features grouped by their signed edge profiles, each group
  checked by steering it together against random groups.
- :func:`task_graphs` / :func:`aggregate`: a graph per prompt of a circuit task, and the features and edges
  that recur among them.
- :func:`explain_attention`: a head's score split exactly into (query component, key component) pairs — the
  features that made it attend where it did.
- :func:`validate`: perturbations of sampled features against the graph's edges, frozen and in the real model.
- :func:`to_neuronpedia` / :func:`save_neuronpedia` / :func:`load_neuronpedia`: the viewer's graph JSON.
"""

from mechscope.graphs.aggregate import Aggregate, aggregate, task_graphs
from mechscope.graphs.attention import AttentionExplanation, ScorePair, explain_attention
from mechscope.graphs.attribution import attribute, logit_targets, prompt_tokens
from mechscope.graphs.graph import AttributionGraph
from mechscope.graphs.prune import Pruned, cumulative_threshold, graph_scores, influence, normalize_rows, prune
from mechscope.graphs.replacement import ActiveFeatures, ReplacementState, frozen_forward, replacement_state
from mechscope.graphs.supernodes import SteeringCheck, Supernode, steer_supernode, suggest_supernodes
from mechscope.graphs.validate import Agreement, Validation, validate
from mechscope.graphs.neuronpedia import load_neuronpedia, save_neuronpedia, to_neuronpedia
from mechscope.graphs.transcoders import (TranscoderSet, load_transcoders, read_manifest, save_transcoders,
                                          transcoder_configs, write_manifest)

__all__ = ["attribute", "logit_targets", "prompt_tokens", "AttributionGraph", "Pruned", "cumulative_threshold",
           "graph_scores", "influence", "normalize_rows", "prune", "ActiveFeatures", "ReplacementState",
           "frozen_forward", "replacement_state", "TranscoderSet", "load_transcoders", "read_manifest",
           "save_transcoders", "transcoder_configs", "write_manifest", "Agreement", "Validation", "validate",
           "load_neuronpedia", "save_neuronpedia", "to_neuronpedia", "SteeringCheck", "Supernode", "steer_supernode",
           "suggest_supernodes", "Aggregate", "aggregate", "task_graphs", "AttentionExplanation", "ScorePair",
           "explain_attention"]
