"""Circuit discovery: the edge graph of a model, edge attribution (EAP, EAP-IG), exact edge patching, ACDC,
path patching, and ROC curves against a known circuit.

Stage: above ``analysis`` (it uses the model, its hooks and the task datasets); nothing below imports it.
"""

from mechscope.circuits.acdc import ACDCResult, ACDCStep, ACDCSweep, acdc, acdc_sweep
from mechscope.circuits.attribution import METHODS, EdgeScores, attribute, attribute_pairs, task_values
from mechscope.circuits.engine import capture_sources, patched_logits
from mechscope.circuits.graph import Graph, Receiver
from mechscope.circuits.path_patching import PathPatchingResult, PathPatchingSweep, path_patching, path_patching_sweep
from mechscope.circuits.roc import ROC, roc_auc, roc_of_circuits

__all__ = ["ACDCResult", "ACDCStep", "ACDCSweep", "METHODS", "EdgeScores", "Graph", "PathPatchingResult",
           "PathPatchingSweep", "ROC", "Receiver", "acdc", "acdc_sweep", "attribute", "attribute_pairs",
           "capture_sources", "patched_logits", "path_patching", "path_patching_sweep", "roc_auc", "roc_of_circuits",
           "task_values"]
