"""Circuit discovery: the edge graph of a model, edge attribution (EAP, EAP-IG), exact edge patching.

Stage: above ``analysis`` (it uses the model, its hooks and the task datasets); nothing below imports it.
"""

from mechscope.circuits.graph import Graph, Receiver

__all__ = ["Graph", "Receiver"]
