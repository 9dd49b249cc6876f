"""Weight deltas between a base model and a tuned copy: per parameter, per layer and per module kind.

For each parameter W: ``delta = ||W_t - W_b||_F``, ``base = ||W_b||_F`` and ``relative = delta / base``,
computed in float64 (so a parameter the tuning left untouched has a delta of exactly 0). Aggregates over
a layer or a module kind combine parameters as a single concatenated vector would: the square root of the
summed squares of the deltas (and of the base norms), and their ratio.

Tied weights (SmolLM2's embedding and unembedding are one tensor) are counted once, under the first name
PyTorch lists (the embedding); the parameter's ``tied`` field names the other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

#: Module kinds, in display order.
KINDS: tuple[str, ...] = ("embed", "pos_embed", "attn_q", "attn_k", "attn_v", "attn_qkv", "attn_o", "mlp_gate",
                          "mlp_up", "mlp_in", "mlp_down", "ln1", "ln2", "norm_other", "ln_final", "unembed", "other")


def _under(path: str, module: str | None) -> bool:
    return module is not None and (path == module or path.startswith(module + "."))


def classify(model, name: str) -> tuple[int | None, str]:
    """``(layer or None, module kind)`` of a parameter name of ``model.hf`` (a key of :data:`KINDS`)."""
    a = model.adapter
    prefix = a.layers + "."
    if name.startswith(prefix):
        layer_s, _, rel = name[len(prefix):].partition(".")
        layer = int(layer_s)
        if len(a.qkv) == 3:
            for kind, path in zip(("attn_q", "attn_k", "attn_v"), a.qkv):
                if _under(rel, path):
                    return layer, kind
        elif _under(rel, a.qkv[0]):
            return layer, "attn_qkv"
        for kind, path in (("attn_o", a.o_proj), ("mlp_up", a.mlp_in_linear), ("mlp_down", a.mlp_out_proj),
                           ("mlp_gate" if a.mlp_in_linear else "mlp_in", a.mlp_in), ("ln1", a.ln1), ("ln2", a.ln2)):
            if _under(rel, path):
                return layer, kind
        return layer, "norm_other" if "norm" in rel or "ln" in rel.split(".")[0] else "other"
    for kind, path in (("embed", a.embed), ("pos_embed", a.pos_embed), ("ln_final", a.final_norm),
                       ("unembed", a.unembed)):
        if _under(name, path):
            return None, kind
    return None, "other"


@dataclass(frozen=True)
class ParamDelta:
    """One parameter's change. Norms are Frobenius norms in float64; ``relative`` is delta / base (inf if the
    base is zero and the delta is not, 0 if both are zero)."""

    name: str
    layer: int | None
    kind: str
    shape: tuple[int, ...]
    delta: float
    base: float
    relative: float
    tied: tuple[str, ...] = ()


def _ratio(delta: float, base: float) -> float:
    if base > 0:
        return delta / base
    return 0.0 if delta == 0 else math.inf


def _combine(items: list[ParamDelta]) -> dict[str, float]:
    d = math.sqrt(sum(p.delta ** 2 for p in items))
    b = math.sqrt(sum(p.base ** 2 for p in items))
    return {"delta": d, "base": b, "relative": _ratio(d, b), "n_params": len(items)}


@dataclass(frozen=True)
class WeightDeltas:
    """Weight deltas: per parameter, and aggregated per layer, per module kind and per (layer, kind).

    Attributes:
        params: one :class:`ParamDelta` per distinct parameter tensor, in the model's order.
        by_layer: one dict (delta, base, relative, n_params) per layer, index = layer.
        by_kind: module kind -> the same dict, over all layers (global parameters under their own kinds).
        by_layer_kind: per layer, kind -> dict (the kinds that layer has).
        global_params: the aggregate of the parameters outside the layers (embeddings, final norm, unembedding).
    """

    params: list[ParamDelta]
    by_layer: list[dict[str, float]]
    by_kind: dict[str, dict[str, float]]
    by_layer_kind: list[dict[str, dict[str, float]]]
    global_params: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> dict[str, float]:
        """The aggregate over every parameter."""
        return _combine(self.params)

    def top_layers(self, k: int = 5, by: str = "relative") -> list[tuple[int, float]]:
        """The ``k`` layers with the largest ``by`` ("relative" or "delta"), as (layer, value), largest first."""
        vals = [(i, row[by]) for i, row in enumerate(self.by_layer)]
        return sorted(vals, key=lambda t: -t[1])[:k]

    def changed(self) -> list[ParamDelta]:
        """The parameters whose delta is not zero."""
        return [p for p in self.params if p.delta != 0]

    def to_dict(self) -> dict:
        return {
            "total": self.total, "global": self.global_params, "by_layer": self.by_layer, "by_kind": self.by_kind,
            "by_layer_kind": self.by_layer_kind,
            "params": [{"name": p.name, "layer": p.layer, "kind": p.kind, "shape": list(p.shape), "delta": p.delta,
                        "base": p.base, "relative": p.relative, "tied": list(p.tied)} for p in self.params],
        }


def _named(model) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
    """Distinct parameter tensors by their first name, and for each the other names that share it."""
    first: dict[int, str] = {}
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, list[str]] = {}
    for name, p in model.hf.named_parameters(remove_duplicate=False):
        key = id(p)
        if key in first:
            aliases[first[key]].append(name)
            continue
        first[key] = name
        tensors[name] = p
        aliases[name] = []
    return tensors, aliases


@torch.no_grad()
def weight_deltas(base, tuned) -> WeightDeltas:
    """Per-parameter Frobenius norms of ``W_tuned - W_base`` and of ``W_base``, aggregated by layer and kind.

    Args:
        base / tuned: HookedModels of one architecture (see :func:`~mechscope.diff.check_comparable`).

    Returns:
        WeightDeltas. A parameter tied in the base (one tensor under two names) is reported once; if the
        tuned model unties it, the tuned model's second tensor is compared with the base's shared one under
        the second name.

    Raises:
        InputError: a parameter present in one model only, or of different shapes.
    """
    from mechscope.core.errors import InputError

    tb, alias_b = _named(base)
    tt, _ = _named(tuned)
    all_t = dict(tuned.hf.named_parameters(remove_duplicate=False))
    all_b = dict(base.hf.named_parameters(remove_duplicate=False))
    names = list(tb) + [n for n in tt if n not in tb]  # a name tied in the base, untied in the tuned model
    params: list[ParamDelta] = []
    for name in names:
        if name not in all_t or name not in all_b:
            raise InputError(f"parameter {name} exists in the {'base' if name in all_b else 'tuned'} model only; "
                             "diff models of one architecture.")
        wb, wt = all_b[name], all_t[name]
        if wb.shape != wt.shape:
            raise InputError(f"parameter {name} has shape {tuple(wb.shape)} in the base model and {tuple(wt.shape)} "
                             "in the tuned model; diff models of one architecture.")
        b64 = wb.detach().to(torch.float64)
        d = float((wt.detach().to(b64.device, torch.float64) - b64).norm())
        bn = float(b64.norm())
        layer, kind = classify(base, name)
        tied = tuple(a for a in alias_b.get(name, []) if a not in tt)
        params.append(ParamDelta(name, layer, kind, tuple(wb.shape), d, bn, _ratio(d, bn), tied))
    n_layers = base.cfg.n_layers
    by_layer = [_combine([p for p in params if p.layer == L]) for L in range(n_layers)]
    kinds = [k for k in KINDS if any(p.kind == k for p in params)]
    by_kind = {k: _combine([p for p in params if p.kind == k]) for k in kinds}
    by_layer_kind = [{k: _combine(ps) for k in kinds if (ps := [p for p in params if p.layer == L and p.kind == k])}
                     for L in range(n_layers)]
    glob = _combine([p for p in params if p.layer is None])
    return WeightDeltas(params, by_layer, by_kind, by_layer_kind, glob)


__all__ = ["KINDS", "ParamDelta", "WeightDeltas", "classify", "weight_deltas"]
