"""Steer features of an attribution graph in the real model and see the output change (the graph viewer's
steering panel).

A feature node ``(layer, latent, pos)`` with activation ``a`` is steered to ``scale * a``: its transcoder is
spliced into layer ``layer`` with its error term, so the MLP output changes by exactly ``(scale - 1) a W_dec[latent]``
at position ``pos`` and by nothing else; everything downstream (attention, later MLPs, norms) is the real,
unfrozen model. ``scale = 0`` ablates the feature, ``-1`` flips it, ``2`` doubles it; several nodes are steered
together (a hand-made supernode). Reported: the next-token distribution before and after (top tokens, the
graph's target logits, KL), and a greedy continuation of each (the steering held at the prompt's positions).

References:
    Ameisen et al. 2025, "Circuit Tracing" (interventions on features to validate a graph's mechanism).
"""

from __future__ import annotations

import math

import torch

from mechscope.core.errors import InputError
from mechscope.hooks.interventions import Add

MAX_NEW_TOKENS = 32


def parse_feature_node(node_id: str, nodes: dict[str, dict]) -> tuple[int, int, int, float]:
    """``(layer, latent, pos, activation)`` of a feature node of the graph JSON (``"{layer}_{latent}_{pos}"``).

    Raises:
        InputError: an id not in the graph, or a node that is not a feature (error nodes, tokens and logits
            have no decoder direction to steer).
    """
    n = nodes.get(node_id)
    if n is None:
        raise InputError(f"node {node_id!r} is not in this graph; click a node of the graph to get its id.")
    if n["feature_type"] != "cross layer transcoder":
        raise InputError(f"node {node_id!r} is a {n['feature_type']} node; only transcoder features can be steered.")
    from mechscope.graphs.edge_heads import json_node

    j = json_node(n)
    return j["layer"], j["feature"], j["pos"], j["activation"]


def _interventions(model, transcoders, steered: list[tuple[int, int, int, float]], scale: float) -> list[Add]:
    out = []
    for layer, latent, pos, act in steered:
        w = transcoders[layer].W_dec[latent].detach().to(device=model.device, dtype=model.dtype)
        out.append(Add(f"blocks.{layer}.hook_mlp_out", direction=(scale - 1.0) * act * w, positions=[pos]))
    return out


@torch.no_grad()
def _greedy(model, tokens: torch.Tensor, interventions: list[Add], n: int) -> tuple[list[int], torch.Tensor]:
    """Greedy continuation without a KV cache (each forward sees every position, so the interventions' prompt
    positions stay where they are); the first step's last-position log-probabilities [d_vocab] float64."""
    seq, first = tokens[None].to(model.device), None
    new = []
    for _ in range(max(n, 1)):
        lg = model.run(seq, logits_to_keep=1, interventions=interventions).logits[0, -1].double()
        if first is None:
            first = lg.log_softmax(-1)
            if n == 0:
                break
        t = int(lg.argmax())
        new.append(t)
        seq = torch.cat([seq, torch.tensor([[t]], device=seq.device)], dim=1)
    return new, first


def steer_graph_features(model, transcoders, graph_json: dict, node_ids: list[str], *, scale: float = 0.0,
                         max_new_tokens: int = 8, top: int = 10) -> dict:
    """Steer the feature nodes ``node_ids`` of a graph (its Neuronpedia JSON) to ``scale`` times their activation.

    Args:
        model: the HookedModel the graph was computed on. transcoders: the graph's transcoder set.
        graph_json: the graph JSON (:func:`~mechscope.graphs.neuronpedia.load_neuronpedia`); its
            ``metadata.mechscope.tokens`` is the prompt.
        node_ids: feature node ids, each once. scale: the activation multiplier (0 ablates).
        max_new_tokens: greedy tokens generated before and after (0..32). top: tokens listed per distribution.

    Returns:
        JSON-able dict: ``scale, nodes`` (each ``id, layer, latent, pos, activation``), ``top_before`` /
        ``top_after`` (``token, id, prob``), ``targets`` (each graph target logit: ``token, id, prob_before,
        prob_after, logit_diff`` = the change of its demeaned logit), ``kl`` (nats, KL(before || after) of the
        next-token distribution), ``continuation_before`` / ``continuation_after`` (text).

    Raises:
        InputError: no nodes, a node twice, a non-feature or unknown node, a graph without its prompt tokens, a
            transcoder set of another model, ``max_new_tokens`` outside 0..32, a non-finite scale.
    """
    if not node_ids:
        raise InputError("give at least one feature node to steer.")
    if len(set(node_ids)) != len(node_ids):
        raise InputError("a node is listed twice; list each feature once.")
    if not math.isfinite(scale):
        raise InputError(f"scale must be a finite number, got {scale}.")
    if not 0 <= max_new_tokens <= MAX_NEW_TOKENS:
        raise InputError(f"max_new_tokens must be 0..{MAX_NEW_TOKENS}, got {max_new_tokens}.")
    ms = graph_json["metadata"].get("mechscope") or {}
    if "tokens" not in ms:
        raise InputError("this graph JSON has no metadata.mechscope.tokens (it was not written by mechscope), so its "
                         "prompt cannot be re-run; compute the graph with `mechscope graph`.")
    transcoders.check_model(model)
    nodes = {n["node_id"]: n for n in graph_json["nodes"]}
    steered = [parse_feature_node(i, nodes) for i in node_ids]
    tokens = torch.tensor(ms["tokens"], dtype=torch.long)
    before_new, before = _greedy(model, tokens, [], max_new_tokens)
    after_new, after = _greedy(model, tokens, _interventions(model, transcoders, steered, scale), max_new_tokens)
    tok = model.tokenizer

    def name(i: int) -> str:
        return tok.decode([i]) if tok is not None else f"#{i}"

    def tops(lp):
        p, ids = lp.exp().topk(top)
        return [{"token": name(int(i)), "id": int(i), "prob": float(v)} for v, i in zip(p, ids)]

    demeaned = lambda lp: lp - lp.mean()  # noqa: E731 (log-probs and logits differ by a constant per row)
    targets = []
    for n in graph_json["nodes"]:
        if n["feature_type"] == "logit":
            t = int(n["feature"])
            targets.append({"token": name(t), "id": t, "prob_before": float(before[t].exp()),
                            "prob_after": float(after[t].exp()),
                            "logit_diff": float(demeaned(after)[t] - demeaned(before)[t])})
    kl = float((before.exp() * (before - after)).sum())
    return {"scale": scale, "nodes": [dict(zip(("id", "layer", "latent", "pos", "activation"), (i, *s)))
                                      for i, s in zip(node_ids, steered)],
            "top_before": tops(before), "top_after": tops(after), "targets": targets, "kl": max(kl, 0.0),
            "continuation_before": tok.decode(before_new) if tok is not None else str(before_new),
            "continuation_after": tok.decode(after_new) if tok is not None else str(after_new)}
