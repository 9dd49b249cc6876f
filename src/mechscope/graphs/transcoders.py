"""A transcoder for every layer, as one artefact: a folder of per-layer transcoders with a manifest.

Each transcoder reads a layer's MLP input (``blocks.{L}.ln2.hook_normalized``) and reconstructs its MLP
output (``blocks.{L}.hook_mlp_out``): a per-layer transcoder (PLT; Dunefsky et al. 2024), optionally with
a linear skip connection (Paulo et al. 2025). Together they replace every MLP of the model, which is what
an attribution graph needs (Ameisen et al. 2025, "Circuit Tracing").

On disk::

    transcoders.json          {"format_version": 1, "kind": "per-layer", "model_name": ..., "n_layers": 30,
                               "layers": {"0": "L00", ...}, "metadata": {...}}
    L00/cfg.json, L00/dictionary.safetensors, ...   (mechscope's dictionary format, one folder per layer)

A training run of :func:`train_transcoders` is such a folder (the trainer's run files sit beside the layers).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mechscope.core.errors import CorruptFileError, InputError
from mechscope.core.io import write_folder_atomic, write_json_atomic
from mechscope.dictionaries.config import DictionaryConfig
from mechscope.dictionaries.io import save_dictionary
from mechscope.dictionaries.loader import load_dictionary
from mechscope.dictionaries.model import SparseDictionary
from mechscope.dictionaries.splice import check_fits

MANIFEST = "transcoders.json"
FORMAT_VERSION = 1
HOOK_IN = "blocks.{L}.ln2.hook_normalized"
HOOK_OUT = "blocks.{L}.hook_mlp_out"


def layer_folder(layer: int) -> str:
    return f"L{layer:02d}"


@dataclass
class TranscoderSet:
    """One transcoder per layer (index = layer), for one model.

    Attributes:
        transcoders: ``transcoders[L]`` reads ``blocks.L.ln2.hook_normalized`` and writes ``blocks.L.hook_mlp_out``.
        model_name: the model they were trained on.
        kind: ``"per-layer"`` (cross-layer transcoders are not built yet).
        metadata: provenance (training tokens, corpus, evaluation), JSON values only.
        source: the folder it was loaded from, if any.

    Raises:
        InputError: no transcoders, or one that is not a transcoder of its layer's MLP.
    """

    transcoders: list[SparseDictionary]
    model_name: str
    kind: str = "per-layer"
    metadata: dict[str, Any] = field(default_factory=dict)
    source: str | None = None

    def __post_init__(self):
        if not self.transcoders:
            raise InputError("a TranscoderSet needs at least one transcoder.")
        for L, t in enumerate(self.transcoders):
            c = t.cfg
            if c.is_sae or c.hook_in != HOOK_IN.format(L=L) or c.hook_out != HOOK_OUT.format(L=L):
                raise InputError(f"transcoder {L} reads {c.hook_in} and writes {c.hook_out}; the transcoder of layer "
                                 f"{L} must read {HOOK_IN.format(L=L)} and write {HOOK_OUT.format(L=L)}.")

    def __len__(self) -> int:
        return len(self.transcoders)

    def __getitem__(self, layer: int) -> SparseDictionary:
        return self.transcoders[layer]

    @property
    def n_layers(self) -> int:
        return len(self.transcoders)

    @property
    def d_sae(self) -> list[int]:
        return [t.cfg.d_sae for t in self.transcoders]

    def check_model(self, model) -> None:
        """Check that these transcoders belong to ``model``: one per layer, trained on it, at its widths.

        Raises:
            InputError: a different number of layers, another model's name, or a width that does not fit.
        """
        where = f" ({self.source})" if self.source else ""
        if self.n_layers != model.cfg.n_layers:
            raise InputError(f"the transcoder set{where} has {self.n_layers} layers but {model.cfg.name} has "
                             f"{model.cfg.n_layers}: every MLP needs its transcoder. Train a set for this model "
                             "(mechscope transcoders train) or load the model they were trained on.")
        if self.model_name and self.model_name != model.cfg.name:
            raise InputError(f"the transcoder set{where} was trained on {self.model_name}, not {model.cfg.name}. "
                             f"Pass --model {self.model_name}, or train transcoders for {model.cfg.name}.")
        for t in self.transcoders:
            check_fits(model, t)

    @property
    def device(self) -> torch.device:
        """Where the transcoders' weights are (layer 0's; :meth:`check_device` checks every layer)."""
        return self.transcoders[0].W_enc.device

    def check_device(self, model) -> None:
        """Check that every transcoder sits where ``model`` runs (its input device): the graph code mixes their
        tensors with the model's activations and never moves weights itself.

        Raises:
            InputError: a transcoder on another device, naming both and the fix.
        """
        want = torch.device(model.device)
        for L, t in enumerate(self.transcoders):
            have = t.W_enc.device
            if have != want:
                raise InputError(f"transcoder {L} is on {have} but {model.cfg.name} runs on {want}; put the set where "
                                 f"the model is: ts.to({str(want)!r}) or load_transcoders(folder, "
                                 f"device={str(want)!r}) (on the command line, --device).")

    def to(self, *args, **kwargs) -> "TranscoderSet":
        for t in self.transcoders:
            t.to(*args, **kwargs)
        return self


def write_manifest(folder: str | Path, model_name: str, layers: dict[int, str], *,
                   metadata: dict[str, Any] | None = None) -> Path:
    """Write ``transcoders.json`` into a folder that already holds the per-layer dictionary folders."""
    folder = Path(folder)
    missing = [f"{L}: {sub}" for L, sub in sorted(layers.items()) if not (folder / sub).is_dir()]
    if missing:
        raise InputError(f"{folder} lacks the layer folders {missing[:5]}; the manifest would point at nothing.")
    body = {"format_version": FORMAT_VERSION, "kind": "per-layer", "model_name": model_name, "n_layers": len(layers),
            "layers": {str(L): sub for L, sub in sorted(layers.items())}, "metadata": metadata or {}}
    write_json_atomic(body, folder / MANIFEST)
    return folder / MANIFEST


def save_transcoders(ts: TranscoderSet, folder: str | Path) -> Path:
    """Save a set (one dictionary folder per layer and the manifest), all or nothing."""
    def write(tmp: Path):
        for L, t in enumerate(ts.transcoders):
            save_dictionary(t, tmp / layer_folder(L))
        write_manifest(tmp, ts.model_name, {L: layer_folder(L) for L in range(ts.n_layers)}, metadata=ts.metadata)

    return write_folder_atomic(folder, write)


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of a transcoder-set folder, checked.

    Raises:
        InputError: no folder, no manifest (with the fix), a newer format, layers that are not 0..n-1.
        CorruptFileError: a manifest that is not JSON.
    """
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder; a transcoder set is a folder with {MANIFEST} and a folder per "
                         "layer.")
    if not path.is_file():
        hint = ""
        if (folder / "cfg.json").is_file():
            hint = " It holds a single dictionary; an attribution graph needs one transcoder for every layer."
        raise InputError(f"{path} is missing: {folder} is not a transcoder set.{hint} Train one with "
                         "`mechscope transcoders train`, or write the manifest for existing per-layer transcoders with "
                         "mechscope.graphs.write_manifest.")
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptFileError(f"{path} is not valid JSON ({e}).") from e
    if not isinstance(m, dict) or not isinstance(m.get("layers"), dict):
        raise CorruptFileError(f"{path} has no 'layers' table; it is not a transcoder-set manifest.")
    if m.get("format_version", 1) > FORMAT_VERSION:
        raise InputError(f"{path} has format_version {m['format_version']}; this mechscope reads up to "
                         f"{FORMAT_VERSION}. Upgrade mechscope.")
    try:
        layers = sorted(int(k) for k in m["layers"])
    except ValueError:
        raise CorruptFileError(f"{path}: layer keys must be integers, got {sorted(m['layers'])[:5]}.") from None
    n = int(m.get("n_layers", len(layers)))
    missing = sorted(set(range(n)) - set(layers))
    if missing:
        raise InputError(f"{path} lists no transcoder for layer(s) {missing} of {n}: every MLP needs one. Train the "
                         "missing layers, or use a complete set.")
    return m


def load_transcoders(folder: str | Path, *, device=None) -> TranscoderSet:
    """Load a transcoder set in one call, onto ``device`` (default: the CPU; give the model's device, e.g.
    ``"cuda"``, to run graphs there).

    Raises:
        InputError: not a set (no manifest), a layer missing from the manifest or from disk, or a dictionary
            that is not its layer's MLP transcoder.
        CorruptFileError: a bad manifest or weights file.
    """
    folder = Path(folder)
    m = read_manifest(folder)
    out = []
    for L in range(int(m.get("n_layers", len(m["layers"])))):
        sub = folder / m["layers"][str(L)]
        if not sub.is_dir():
            raise InputError(f"layer {L}'s transcoder folder {sub} is missing; the set in {folder} is incomplete.")
        out.append(load_dictionary(sub, device=device))
    ts = TranscoderSet(out, model_name=str(m.get("model_name", "")), kind=str(m.get("kind", "per-layer")),
                       metadata=m.get("metadata") or {}, source=str(folder))
    return ts


def transcoder_configs(model, *, d_sae: int, k: int, skip: bool = True, layers: Sequence[int] | None = None,
                       architecture: str = "topk") -> list[DictionaryConfig]:
    """One transcoder config per layer of ``model`` (MLP input -> MLP output), TopK by default."""
    c = model.cfg
    layers = range(c.n_layers) if layers is None else layers
    return [DictionaryConfig(architecture, c.d_model, d_sae, HOOK_IN.format(L=L), hook_out=HOOK_OUT.format(L=L),
                             d_out=c.d_model, k=k if architecture in ("topk", "batchtopk") else None, skip=skip,
                             model_name=c.name) for L in layers]
