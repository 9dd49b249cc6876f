"""An attribution graph: nodes (features, error nodes, token embeddings, target logits) and the direct,
linear effect of every source node on every target node in the local replacement model of one prompt.

Node order (as in circuit-tracer)::

    [selected features (layer, pos, feature order) | errors (layer-major, then position) | tokens | logits]

Only features and logits are targets and only features, errors and tokens are sources, so the graph stores the
block :attr:`AttributionGraph.edges` ``[n_features + n_logits, n_features + n_errors + n_tokens]``: rows are the
feature nodes then the logit nodes, columns are node ids. ``edges[r, s]`` is the direct effect of source ``s`` on
target row ``r``: for a feature, on its pre-activation; for a logit, on its demeaned logit (``logit - mean over
the vocabulary``). :attr:`AttributionGraph.adjacency` is the square node x node matrix (zero rows for errors and
tokens, zero logit columns), built on demand for small graphs. The block is what keeps a 1,000-token graph in a
few GB: the square matrix of 7,500 features and 1,024 tokens would be 6 GB, the block 1.2 GB.

Saved as a folder: ``graph.safetensors`` (tensors) beside ``graph.json`` (prompt, tokens, targets, settings).
:func:`~mechscope.graphs.attribute` returns the tensors on the CPU wherever the model ran; pruning and the scores
follow the tensors' device (``graph.edges.cuda()`` etc. prunes a large graph on a GPU).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mechscope.core.errors import CorruptFileError, InputError
from mechscope.core.io import load_safetensors, save_safetensors_atomic, write_folder_atomic, write_json_atomic

FORMAT_VERSION = 1
TENSORS = "graph.safetensors"
META = "graph.json"


@dataclass
class AttributionGraph:
    """The attribution graph of one prompt (see the module docstring for the node order).

    Attributes:
        prompt: the text (``""`` when built from token ids).
        tokens: int64 ``[P]``; str_tokens: their strings.
        active_features: int64 ``[n_active, 3]`` every active feature ``(layer, pos, feature)``.
        activations: ``[n_active]`` float32 their activations.
        selected: int64 ``[n_sel]`` rows of ``active_features`` that are graph nodes (ascending).
        edges: float32 ``[n_sel + n_logits, n_sel + L*P + P]`` target x source direct effects (see above).
        logit_tokens: int64 ``[n_logits]``; logit_probs: float32 ``[n_logits]`` their probabilities;
            logit_strs: their strings.
        n_layers: layers of the model.
        model_name / transcoders: what it was computed with (model name, transcoder folder).
        info: settings and timings (JSON values).
    """

    prompt: str
    tokens: Tensor
    str_tokens: list[str]
    active_features: Tensor
    activations: Tensor
    selected: Tensor
    edges: Tensor
    logit_tokens: Tensor
    logit_probs: Tensor
    logit_strs: list[str]
    n_layers: int
    model_name: str = ""
    transcoders: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    # -- layout --------------------------------------------------------------------------------------------
    @property
    def n_pos(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def n_features(self) -> int:
        return int(self.selected.shape[0])

    @property
    def n_errors(self) -> int:
        return self.n_layers * self.n_pos

    @property
    def n_logits(self) -> int:
        return int(self.logit_tokens.shape[0])

    @property
    def n_nodes(self) -> int:
        return self.n_features + self.n_errors + self.n_pos + self.n_logits

    @property
    def error_start(self) -> int:
        return self.n_features

    @property
    def token_start(self) -> int:
        return self.n_features + self.n_errors

    @property
    def logit_start(self) -> int:
        return self.token_start + self.n_pos

    @property
    def n_sources(self) -> int:
        return self.logit_start

    def row_node(self, r: int) -> int:
        """The node id of row ``r`` of :attr:`edges` (features, then logits)."""
        return r if r < self.n_features else self.logit_start + r - self.n_features

    def node_row(self, i: int) -> int:
        """The row of :attr:`edges` of node ``i`` (a feature or a logit).

        Raises:
            InputError: an error or token node (they have no row: nothing is attributed to them).
        """
        kind = self.node_kind(i)
        if kind == "feature":
            return i
        if kind == "logit":
            return self.n_features + i - self.logit_start
        raise InputError(f"node {i} is a {kind} node; only features and logits have incoming edges.")

    @property
    def adjacency(self) -> Tensor:
        """The square ``[N, N]`` target x source matrix (zero rows for errors and tokens, zero logit columns)."""
        A = torch.zeros(self.n_nodes, self.n_nodes, dtype=self.edges.dtype, device=self.edges.device)
        A[:self.n_features, :self.n_sources] = self.edges[:self.n_features]
        A[self.logit_start:, :self.n_sources] = self.edges[self.n_features:]
        return A

    def node_kind(self, i: int) -> str:
        """``"feature"``, ``"error"``, ``"token"`` or ``"logit"``."""
        if not 0 <= i < self.n_nodes:
            raise InputError(f"node {i} does not exist; the graph has {self.n_nodes} nodes.")
        return ("feature" if i < self.error_start else "error" if i < self.token_start else
                "token" if i < self.logit_start else "logit")

    def node(self, i: int) -> dict[str, Any]:
        """What node ``i`` is: kind, layer, position, and feature / token id and activation where it has them."""
        kind = self.node_kind(i)
        if kind == "feature":
            L, p, f = (int(v) for v in self.active_features[self.selected[i]])
            return {"kind": kind, "layer": L, "pos": p, "feature": f,
                    "activation": float(self.activations[self.selected[i]])}
        if kind == "error":
            j = i - self.error_start
            return {"kind": kind, "layer": j // self.n_pos, "pos": j % self.n_pos}
        if kind == "token":
            p = i - self.token_start
            return {"kind": kind, "layer": -1, "pos": p, "token": int(self.tokens[p]), "str": self.str_tokens[p]}
        j = i - self.logit_start
        return {"kind": kind, "layer": self.n_layers, "pos": self.n_pos - 1, "token": int(self.logit_tokens[j]),
                "str": self.logit_strs[j], "prob": float(self.logit_probs[j])}

    def feature_node(self, layer: int, pos: int, feature: int) -> int:
        """The node index of a selected feature.

        Raises:
            InputError: the feature is not active there, or was not selected as a node.
        """
        hit = ((self.active_features[:, 0] == layer) & (self.active_features[:, 1] == pos)
               & (self.active_features[:, 2] == feature)).nonzero().flatten()
        if not len(hit):
            raise InputError(f"feature {feature} of layer {layer} is not active at position {pos}.")
        where = (self.selected == hit[0]).nonzero().flatten()
        if not len(where):
            raise InputError(f"feature {feature} of layer {layer} at position {pos} is active but not a node of this "
                             "graph (raise max_feature_nodes).")
        return int(where[0])

    def error_node(self, layer: int, pos: int) -> int:
        return self.error_start + layer * self.n_pos + pos

    def token_node(self, pos: int) -> int:
        return self.token_start + pos

    def logit_weights(self) -> Tensor:
        """``[N]`` zeros except the target logits' probabilities (the weights of influence)."""
        w = torch.zeros(self.n_nodes, dtype=torch.float32, device=self.logit_probs.device)
        w[self.logit_start:] = self.logit_probs.float()
        return w

    def row_weights(self) -> Tensor:
        """``[n_features + n_logits]``: :meth:`logit_weights` on the rows of :attr:`edges`."""
        w = torch.zeros(self.n_features + self.n_logits, dtype=torch.float32, device=self.logit_probs.device)
        w[self.n_features:] = self.logit_probs.float()
        return w

    # -- files ---------------------------------------------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        """Write ``graph.safetensors`` and ``graph.json`` into ``folder`` (all or nothing)."""
        tensors = {"tokens": self.tokens, "active_features": self.active_features, "activations": self.activations,
                   "selected": self.selected, "edges": self.edges, "logit_tokens": self.logit_tokens,
                   "logit_probs": self.logit_probs}
        meta = {"format_version": FORMAT_VERSION, "prompt": self.prompt, "str_tokens": self.str_tokens,
                "logit_strs": self.logit_strs, "n_layers": self.n_layers, "model_name": self.model_name,
                "transcoders": self.transcoders, "info": self.info}

        def write(tmp: Path):
            save_safetensors_atomic({k: v.contiguous().cpu() for k, v in tensors.items()}, tmp / TENSORS,
                                    metadata={"format": "mechscope-attribution-graph"})
            write_json_atomic(meta, tmp / META)

        return write_folder_atomic(folder, write)

    @classmethod
    def load(cls, folder: str | Path) -> "AttributionGraph":
        """Read a graph folder written by :meth:`save`.

        Raises:
            InputError: no such folder, or not a graph folder.
            CorruptFileError: unreadable or inconsistent files.
        """
        folder = Path(folder)
        if not (folder / META).is_file() or not (folder / TENSORS).is_file():
            raise InputError(f"{folder} holds no attribution graph ({META} and {TENSORS}); make one with "
                             "`mechscope graph PROMPT --transcoders DIR --out DIR`.")
        try:
            meta = json.loads((folder / META).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CorruptFileError(f"{folder / META} is not valid JSON ({e}).") from e
        if meta.get("format_version", 1) > FORMAT_VERSION:
            raise InputError(f"{folder / META} has format_version {meta['format_version']}; upgrade mechscope.")
        t = load_safetensors(folder / TENSORS, what="attribution graph")
        g = cls(prompt=meta["prompt"], tokens=t["tokens"], str_tokens=meta["str_tokens"],
                active_features=t["active_features"], activations=t["activations"], selected=t["selected"],
                edges=t["edges"], logit_tokens=t["logit_tokens"], logit_probs=t["logit_probs"],
                logit_strs=meta["logit_strs"], n_layers=int(meta["n_layers"]), model_name=meta.get("model_name", ""),
                transcoders=meta.get("transcoders", ""), info=meta.get("info", {}))
        want = (g.n_features + g.n_logits, g.n_sources)
        if tuple(g.edges.shape) != want:
            raise CorruptFileError(f"{folder / TENSORS}: edges is {tuple(g.edges.shape)} but the graph's nodes need "
                                   f"{want}.")
        return g
