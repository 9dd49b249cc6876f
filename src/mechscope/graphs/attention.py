"""Why a head attended where it did: its attention score split into pairs of query-side and key-side components.

Attribution graphs freeze attention patterns, so their edges say what a head moved but not why it attended there
(circuit-tracer issue #53 asks for these "QK attributions"). With the query position's norm scale frozen (as in the
replacement model), a head's pre-softmax score is bilinear in the residual streams at the two positions::

    score(q, k) = scaling * (R_q W_Q ln1(x_q)) . (R_k W_K ln1(x_k))    (R: the rotary rotation at each position)

and each residual stream is a sum of components — the token embedding, and for every earlier layer its attention
output, its active transcoder features (activation x decoder row), its error node and the rest of its MLP output
(the decoder bias and skip connection). So the score is exactly the sum over (query component, key component)
pairs, plus a bias term where the projections have biases; the largest pairs say which features set it.

The queries and keys of each component are computed by the model's own code (projections, rotary embeddings),
one component per batch row placed at its position, read at ``hook_q`` / ``hook_k``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from mechscope.core.errors import InputError
from mechscope.graphs.replacement import ReplacementState, _apply_frozen, _module, replacement_state


@dataclass
class ScorePair:
    """One (query component, key component) term of a score."""

    query: str
    key: str
    value: float


@dataclass
class AttentionExplanation:
    """The score of head ``head`` of ``layer`` from ``query_pos`` to ``key_pos``, split into component pairs.

    Attributes:
        score: the real pre-softmax score (scaled, as the model computes it); pattern: its attention probability.
        total: the sum of every pair (plus ``bias``): equals ``score`` up to float rounding.
        pairs: the largest |pairs|, largest first.
        query_totals / key_totals: each component's summed pairs (its share of the score), largest |.| first.
        bias: the part from the projections' biases (0 for bias-free models).
    """

    layer: int
    head: int
    query_pos: int
    key_pos: int
    score: float
    pattern: float
    total: float
    bias: float
    pairs: list[ScorePair]
    query_totals: list[tuple[str, float]]
    key_totals: list[tuple[str, float]]

    def to_dict(self) -> dict:
        return asdict(self)


def residual_components(model, transcoders, state: ReplacementState, attn_out: Tensor, resid_pre: Tensor,
                        layer: int, pos: int, str_tokens: list[str]) -> tuple[list[str], Tensor]:
    """(names, vectors ``[n, D]``) of the residual stream entering ``layer`` at ``pos``: the embedding, each earlier
    layer's attention output, active features, error node and MLP rest, and whatever else (position embeddings,
    biases) as ``other``; the vectors sum to the residual stream."""
    tok = repr(str_tokens[pos]) if pos < len(str_tokens) else str(pos)
    names, vecs = [f"token {tok}@{pos}"], [state.embed[pos]]
    idx = state.features.index
    for L in range(layer):
        names.append(f"attn L{L}@{pos}")
        vecs.append(attn_out[L, pos])
        mask = (idx[:, 0] == L) & (idx[:, 1] == pos)
        feat_sum = torch.zeros_like(state.embed[pos])
        for r in mask.nonzero().flatten().tolist():
            f = int(idx[r, 2])
            row = transcoders[L].W_dec[f].detach().to(state.embed.device, state.embed.dtype)
            v = float(state.features.values[r]) * row
            names.append(f"L{L} #{f}@{pos}")
            vecs.append(v)
            feat_sum = feat_sum + v
        names.append(f"error L{L}@{pos}")
        vecs.append(state.errors[L, pos])
        names.append(f"mlp L{L} bias+skip@{pos}")
        vecs.append(state.mlp_out[L, pos] - feat_sum - state.errors[L, pos])
    rest = resid_pre[pos] - torch.stack(vecs).sum(0)
    names.append(f"other@{pos}")
    vecs.append(rest)
    return names, torch.stack(vecs)


def explain_attention(model, transcoders, tokens: Tensor, layer: int, head: int, query_pos: int, key_pos: int, *,
                      top: int = 20, str_tokens: list[str] | None = None,
                      state: ReplacementState | None = None) -> AttentionExplanation:
    """Split head ``head`` of ``layer``'s score from ``query_pos`` to ``key_pos`` into component pairs (see the
    module docstring).

    Args:
        tokens: the prompt's token ids ``[P]`` (an :class:`AttributionGraph`'s ``tokens``).
        top: pairs and per-side totals kept.
        state: the prompt's :func:`replacement_state`, when the caller has it (saves a forward).

    Raises:
        InputError: a layer, head or position out of range, a key after the query, a model with query/key norms
            (their scales would need freezing too) or a soft-capped score; a ``state`` of other tokens.
    """
    c = model.cfg
    tokens = tokens.reshape(-1)
    P = len(tokens)
    if not 0 <= layer < c.n_layers or not 0 <= head < c.n_heads:
        raise InputError(f"layer {layer} / head {head} do not exist ({c.n_layers} layers, {c.n_heads} heads).")
    if not 0 <= key_pos <= query_pos < P:
        raise InputError(f"positions must satisfy 0 <= key_pos <= query_pos < {P}, got key {key_pos}, query "
                         f"{query_pos}.")
    attn = model.layer_module(layer, model.adapter.attn)
    if any(hasattr(attn, n) for n in ("q_norm", "k_norm")) or getattr(model.hf.config, "attn_logit_softcapping", None):
        raise InputError(f"{c.name}'s attention normalises queries/keys or soft-caps scores, so its score is not "
                         "bilinear in the residual stream; explain_attention supports plain dot-product attention.")
    st = state if state is not None else replacement_state(model, transcoders, tokens)
    if not torch.equal(st.tokens.cpu(), tokens.cpu()):
        raise InputError("state= is the replacement state of another prompt; pass the state of these tokens.")
    L = f"blocks.{layer}."
    names_all = ["blocks.*.hook_attn_out", f"{L}hook_resid_pre", f"{L}attn.hook_attn_scores", f"{L}attn.hook_pattern"]
    with torch.no_grad():
        res = model.run(tokens[None].to(model.device), cache=names_all)
    cache = res.cache
    attn_out = torch.stack([cache[f"blocks.{i}.hook_attn_out"][0] for i in range(c.n_layers)])
    resid = cache[f"{L}hook_resid_pre"][0]
    strs = str_tokens or [str(int(t)) for t in tokens]
    q_names, q_vecs = residual_components(model, transcoders, st, attn_out, resid, layer, query_pos, strs)
    k_names, k_vecs = residual_components(model, transcoders, st, attn_out, resid, layer, key_pos, strs)
    # queries and keys of each component by the model's own code: one component per row at its position, the
    # layer's input norm frozen at the prompt's scales, plus an all-zero row (the projections' bias terms)
    D = c.d_model
    rows = torch.zeros(len(q_vecs) + len(k_vecs) + 1, P, D, dtype=resid.dtype, device=resid.device)
    rows[:len(q_vecs), query_pos] = q_vecs
    rows[len(q_vecs):-1, key_pos] = k_vecs
    frozen = st.norms[(model.adapter.ln1, layer)]
    handle = _module(model, model.adapter.ln1, layer).register_forward_hook(
        lambda mod, args, out: _apply_frozen(frozen, args[0]).to(out.dtype))
    try:
        with torch.no_grad():
            got = model.run(torch.zeros(len(rows), P, dtype=torch.long, device=model.device),
                            functions={f"{L}hook_resid_pre": lambda x: rows.to(x.dtype)},
                            cache=[f"{L}attn.hook_q", f"{L}attn.hook_k"], stop_at_layer=layer + 1).cache
    finally:
        handle.remove()
    g = head // (c.n_heads // c.n_kv_heads)
    q = got[f"{L}attn.hook_q"][:, query_pos, head].double()  # [rows, d_head]
    k = got[f"{L}attn.hook_k"][:, key_pos, g].double()
    q0, k0 = q[-1], k[-1]
    Q = q[:len(q_vecs)] - q0
    K = k[len(q_vecs):-1] - k0
    score = float(cache[f"{L}attn.hook_attn_scores"][0, head, query_pos, key_pos])
    scaling = float(getattr(attn, "scaling", c.d_head ** -0.5))  # the module's own (transformers sets .scaling)
    pairs = scaling * (Q @ K.T)  # [n_q, n_k]
    bias = float(scaling * (q0 @ K.sum(0) + Q.sum(0) @ k0 + q0 @ k0))
    total = float(pairs.sum()) + bias
    flat = pairs.flatten()
    order = flat.abs().argsort(descending=True)[:top]
    nk = len(k_names)
    top_pairs = [ScorePair(q_names[int(i) // nk], k_names[int(i) % nk], float(flat[i])) for i in order]
    qt, kt = pairs.sum(1), pairs.sum(0)
    q_tot = [(q_names[int(i)], float(qt[i])) for i in qt.abs().argsort(descending=True)[:top]]
    k_tot = [(k_names[int(i)], float(kt[i])) for i in kt.abs().argsort(descending=True)[:top]]
    return AttentionExplanation(layer, head, query_pos, key_pos, score,
                                float(cache[f"{L}attn.hook_pattern"][0, head, query_pos, key_pos]), total, bias,
                                top_pairs, q_tot, k_tot)
