"""Circuit discovery and evaluation: the edge graph of a model, edge attribution (EAP, EAP-IG), exact edge
patching, ACDC, path patching, ROC curves against a known circuit, circuits chosen from edge scores (with
their file formats), and their faithfulness under every ablation with bootstrap intervals (MIB's CPR/CMD,
Wang et al.'s completeness and minimality).

Stage: above ``analysis`` (it uses the model, its hooks, the task datasets and the bootstrap); nothing below
imports it.
"""

from mechscope.circuits.ablation import ABLATIONS, LEVELS, mean_sources
from mechscope.circuits.acdc import ACDCResult, ACDCStep, ACDCSweep, acdc, acdc_sweep
from mechscope.circuits.attribution import METHODS, EdgeScores, attribute, attribute_pairs, task_values
from mechscope.circuits.circuit import Circuit
from mechscope.circuits.criteria import Completeness, Minimality, completeness, minimality
from mechscope.circuits.engine import capture_sources, patched_logits
from mechscope.circuits.evaluate import (MIB_PERCENTS, CircuitEvaluation, FaithfulnessCurve, RobustnessTable,
                                         evaluate_circuit, faithfulness_curve, robustness_table)
from mechscope.circuits.graph import Graph, Receiver
from mechscope.circuits.path_patching import PathPatchingResult, PathPatchingSweep, path_patching, path_patching_sweep
from mechscope.circuits.roc import ROC, roc_auc, roc_of_circuits

__all__ = ["ABLATIONS", "LEVELS", "METHODS", "MIB_PERCENTS", "ROC", "ACDCResult", "ACDCStep", "ACDCSweep", "Circuit",
           "CircuitEvaluation", "Completeness", "EdgeScores", "FaithfulnessCurve", "Graph", "Minimality",
           "PathPatchingResult", "PathPatchingSweep", "Receiver", "RobustnessTable", "acdc", "acdc_sweep", "attribute",
           "attribute_pairs", "capture_sources", "completeness", "evaluate_circuit", "faithfulness_curve",
           "mean_sources", "minimality", "patched_logits", "path_patching", "path_patching_sweep", "robustness_table",
           "roc_auc", "roc_of_circuits", "task_values"]
