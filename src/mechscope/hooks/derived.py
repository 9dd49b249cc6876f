"""Derived hook sites that no module returns: per-head results and masked attention scores (and the deferral
of the scores and pattern to their first read).

Both are recomputed from values the model produced (the output projection's input, the attention's q and k)
with the same operations the naive definitions use, so the parity tests' independent recomputations match.
"""

from __future__ import annotations

import torch
from torch import Tensor


def head_results(z_flat: Tensor, W_O: Tensor, n_heads: int, d_head: int) -> Tensor:
    """Per-head outputs of the output projection, ``hook_result``.

    Args:
        z_flat: the projection's input, [batch, pos, n_heads * d_head].
        W_O: [n_heads, d_head, d_model] (any strides).

    Returns:
        [batch, pos, n_heads, d_model] in z's dtype (W_O is cast to it), ``result[b, p, h] = z[b, p, h] @ W_O[h]``:
        one batched matmul over heads, stored [n_heads, batch * pos, d_model] and returned as a permuted view (the
        same values as ``einsum("bphd,hdm->bphm")``, without its per-call contraction planning).
    """
    b, p = z_flat.shape[:-1]
    z = z_flat.reshape(b * p, n_heads, d_head).transpose(0, 1)  # [n_heads, batch * pos, d_head]
    res = torch.bmm(z, W_O.to(z.dtype))  # [n_heads, batch * pos, d_model]
    return res.transpose(0, 1).unflatten(0, (b, p))


def masked_scores(query: Tensor, key: Tensor, attention_mask: Tensor | None, scaling: float,
                  softcap: float | None) -> tuple[Tensor, bool]:
    """Masked attention scores, [batch, n_heads, q_pos, kv_pos] in the query dtype, -inf where not allowed.

    Args:
        query: [batch, n_heads, q_pos, d_head]; key: [batch, n_kv_heads, kv_pos, d_head] (grouped-query
            attention: head ``h`` reads kv head ``h // (n_heads // n_kv_heads)``).
        attention_mask: what transformers passes the attention function: None (causal), bool
            [batch|1, 1, q_pos, >=kv_pos] (True = allowed), or an additive float mask of that shape.
        scaling: multiplier of q . k (1/sqrt(d_head), or the family's configured value).
        softcap: Gemma 2's attention logit soft-cap (``tanh(s / cap) * cap`` before masking), or None.

    Returns:
        (scores, may_have_empty_rows): scores in the query's dtype, a fresh tensor; the second is False when every
        query row keeps at least one key, so the softmax needs no NaN clean-up.

    The values equal ``(query @ repeat_kv(key)^T) * scaling`` masked to -inf. Masking is one broadcast add
    of a 0/-inf mask rather than a negated bool mask and ``masked_fill_`` (same values; an allowed score of
    -0.0 reads +0.0, equal under ``==``).
    """
    q_len, kv_len = query.shape[2], key.shape[2]
    groups = query.shape[1] // key.shape[1]
    # (a grouped [batch, n_kv, groups * q_pos, d_head] matmul skips the repeat but is not bit-identical for
    # small shapes: the BLAS picks another kernel; the repeat costs ~0.1 ms of 3 per layer at 8 x 128 tokens)
    k_rep = key.repeat_interleave(groups, dim=1) if groups > 1 else key
    # in-place steps act on fresh tensors no autograd node saved (same values, fewer allocations)
    scores = torch.matmul(query, k_rep.transpose(2, 3)).mul_(scaling)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    neg_inf = float("-inf")
    if attention_mask is None:
        blocked = torch.full((q_len, kv_len), neg_inf, dtype=scores.dtype, device=scores.device)
        return scores.add_(blocked.triu_(kv_len - q_len + 1)), kv_len < q_len
    mask = attention_mask[..., :kv_len]
    if mask.dtype == torch.bool:
        blocked = torch.zeros(mask.shape, dtype=scores.dtype, device=scores.device).masked_fill_(~mask, neg_inf)
        return scores.add_(blocked), True
    return (scores + mask).masked_fill_(mask <= torch.finfo(mask.dtype).min / 2, neg_inf), True


def defer_pattern(wanted, query: Tensor, key: Tensor, attention_mask, scaling: float, softcap) -> None:
    """Cache ``hook_attn_scores`` / ``hook_pattern`` of every session in ``wanted`` (``(session, scores name,
    pattern name)``, each only cached) to be computed on first read, from references to this forward's
    q, k and mask: the same operations as the eager path (:func:`masked_scores`, then a float32 softmax), so the
    values read are the same; the scores are computed once for both."""
    q, k = query.detach(), key.detach()
    mask = attention_mask.detach() if isinstance(attention_mask, Tensor) else attention_mask
    memo: dict[str, tuple[Tensor, bool]] = {}

    def scores() -> Tensor:
        if "s" not in memo:
            memo["s"] = masked_scores(q, k, mask, scaling, softcap)
        return memo["s"][0]

    def pattern() -> Tensor:
        p = torch.softmax(scores(), dim=-1, dtype=torch.float32).to(q.dtype)
        return p.nan_to_num_() if memo["s"][1] else p  # fully masked rows (padding) -> 0

    for session, scores_name, pattern_name in wanted:
        if scores_name in session.specs:
            session.defer(scores_name, scores)
        if pattern_name in session.specs:
            session.defer(pattern_name, pattern)
