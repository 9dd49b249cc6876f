"""Attention-head scores on repeated random tokens: induction, previous-token, duplicate-token heads."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechscope.core.errors import InputError
from mechscope.data.random_tokens import bos_id as _bos_id
from mechscope.data.random_tokens import ordinary_token_ids

SCORE_KINDS = ("induction", "previous_token", "duplicate_token")


def repeated_random_tokens(
    model, *, batch: int = 4, seq_len: int = 50, seed: int = 0, prepend_bos: bool = True
) -> Int[Tensor, "batch pos"]:
    """BOS, then a uniformly random sequence of ``seq_len`` non-special tokens, then the same sequence again.

    Args:
        model: a HookedModel (its tokenizer's special and special added tokens are never drawn).
        batch: number of independent sequences.
        seq_len: length of the random sequence (the prompt has ``1 + 2 * seq_len`` tokens with BOS).
        seed: seed of a private generator (the global RNG is untouched).
        prepend_bos: put the BOS token first.

    Returns:
        int64 [batch, 1 + 2 * seq_len] (or [batch, 2 * seq_len] without BOS) on the model's device.

    Raises:
        InputError: seq_len < 2 or batch < 1; a sequence longer than the context; prepend_bos with a
            model that has no BOS token (pass prepend_bos=False).

    References:
        Olsson et al. 2022, "In-context Learning and Induction Heads", section "Per-head metrics"
        (repeated random tokens).
    """
    if seq_len < 2 or batch < 1:
        raise InputError(f"need seq_len >= 2 and batch >= 1, got seq_len={seq_len}, batch={batch}.")
    bos = _bos_id(model) if prepend_bos else None
    if prepend_bos and bos is None:
        raise InputError(f"{model.cfg.name} has no BOS token; call repeated_random_tokens(..., prepend_bos=False).")
    allowed = ordinary_token_ids(model, exclude_bos=prepend_bos)
    g = torch.Generator().manual_seed(seed)
    seq = allowed[torch.randint(len(allowed), (batch, seq_len), generator=g)]
    parts = [seq, seq]
    if prepend_bos:
        parts.insert(0, torch.full((batch, 1), bos, dtype=torch.long))
    tokens = torch.cat(parts, dim=1)
    model._check_length(tokens)
    return tokens.to(model.device)


def _repeat_layout(tokens: Tensor) -> tuple[int, int]:
    """(offset, seq_len) of tokens laid out as [optional BOS] + seq + seq."""
    n = tokens.shape[1]
    for offset in (1, 0):
        half = (n - offset) // 2
        if (n - offset) % 2 == 0 and half >= 2 and torch.equal(
            tokens[:, offset:offset + half], tokens[:, offset + half:]
        ):
            return offset, half
    raise InputError(
        "head_scores needs tokens made of a sequence repeated once (optionally after BOS), as made by "
        f"repeated_random_tokens; got shape {tuple(tokens.shape)} whose halves differ. Pass tokens=None."
    )


def head_scores(
    model,
    tokens: Int[Tensor, "batch pos"] | None = None,
    *,
    seq_len: int = 50,
    batch: int = 4,
    seed: int = 0,
    interventions: Sequence = (),
) -> dict[str, Float[Tensor, "n_layers n_heads"]]:
    """Score every head as an induction, previous-token and duplicate-token head.

    On a random sequence repeated once, for each query token in the second copy (position ``i``, its
    earlier copy at ``i - seq_len``), the mean attention probability (over queries and prompts) to:

    - ``"induction"``: the token after the earlier copy, ``i - seq_len + 1``;
    - ``"previous_token"``: the previous token, ``i - 1``;
    - ``"duplicate_token"``: the earlier copy itself, ``i - seq_len``.

    Scores lie in [0, 1]; 1 means the head puts all its attention there.

    Args:
        model: a HookedModel.
        tokens: [batch, pos] laid out as [optional BOS] + seq + seq; None draws
            ``repeated_random_tokens(model, batch=batch, seq_len=seq_len, seed=seed)``.
        seq_len / batch / seed: used only when ``tokens`` is None.
        interventions: applied during the scoring run (e.g. a Replace on ``hook_pattern``, or ablations).

    Returns:
        dict kind -> float32 [n_layers, n_heads] on CPU, kinds ``SCORE_KINDS``.

    Raises:
        InputError: tokens that are not a repeated sequence.

    References:
        Olsson et al. 2022, "In-context Learning and Induction Heads", section "Per-head metrics"
        (prefix-matching score); Elhage et al. 2021 (previous-token heads).
    """
    if tokens is None:
        tokens = repeated_random_tokens(model, batch=batch, seq_len=seq_len, seed=seed)
    tokens = model._tokens(tokens, None)
    offset, half = _repeat_layout(tokens)
    first_query = offset + half
    _, cache = model.run(tokens, cache=["blocks.*.attn.hook_pattern"], cache_positions=slice(first_query, None),
                         interventions=interventions, logits_to_keep=1)
    q = torch.arange(half)
    qpos = q + first_query
    keys = {"induction": qpos - half + 1, "previous_token": qpos - 1, "duplicate_token": qpos - half}
    out = {kind: torch.empty(model.cfg.n_layers, model.cfg.n_heads) for kind in SCORE_KINDS}
    for L in range(model.cfg.n_layers):
        pattern = cache[f"blocks.{L}.attn.hook_pattern"].float().cpu()  # [batch, n_heads, half, kv_pos]
        for kind, k in keys.items():
            out[kind][L] = pattern[:, :, q, k].mean(dim=(0, 2))
    return out
