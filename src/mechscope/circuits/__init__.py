"""Circuit discovery: the edge graph of a model, edge attribution (EAP, EAP-IG), exact edge patching.

Stage: above ``analysis`` (it uses the model, its hooks and the task datasets); nothing below imports it.
"""

from mechscope.circuits.attribution import METHODS, EdgeScores, attribute, attribute_pairs, task_values
from mechscope.circuits.engine import capture_sources, patched_logits
from mechscope.circuits.graph import Graph, Receiver

__all__ = ["METHODS", "EdgeScores", "Graph", "Receiver", "attribute", "attribute_pairs", "capture_sources",
           "patched_logits", "task_values"]
