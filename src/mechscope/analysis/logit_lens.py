"""The logit lens: read each layer's residual stream through the model's own final norm and unembedding."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechscope.analysis._norm import unembed
from mechscope.core.errors import InputError


@dataclass(frozen=True)
class LogitLensResult:
    """Top next-token predictions read from every layer at one position.

    Attributes:
        labels: row labels "L0".."L{n_layers-1}" (row L reads ``blocks.L.hook_resid_post``).
        top_tokens: [n_layers][k] decoded top tokens per layer.
        top_probs: float32 [n_layers, k] their probabilities (0..1).
        target_token: the decoded target token, or None.
        target_prob: float32 [n_layers] probability of the target per layer, or None.
        target_rank: int64 [n_layers] rank of the target per layer (0 = top), or None.
        logprobs: float32 [n_layers, d_vocab] full log-probabilities per layer (natural log).
    """

    labels: list[str]
    top_tokens: list[list[str]]
    top_probs: Tensor
    target_token: str | None
    target_prob: Tensor | None
    target_rank: Tensor | None
    logprobs: Tensor


def _target_id(model, target) -> int:
    if isinstance(target, Tensor):
        target = int(target.reshape(-1)[0]) if target.numel() == 1 else target
    if isinstance(target, int):
        if not 0 <= target < model.cfg.d_vocab:
            raise InputError(f"target id {target} is outside the vocabulary [0, {model.cfg.d_vocab}).")
        return target
    if isinstance(target, str):
        tok = model._need_tokenizer()
        ids = tok(target, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise InputError(
                f"target {target!r} is {len(ids)} tokens ({[tok.decode([i]) for i in ids]}); give one token, e.g. "
                "with its leading space (' Paris'), or pass a token id."
            )
        return ids[0]
    raise InputError(f"target must be a token string or an id, got {type(target).__name__}.")


def _decode(model, ids: list[int]) -> list[str]:
    if model.tokenizer is None:
        return [str(i) for i in ids]
    return [model.tokenizer.decode([i]) for i in ids]


def logit_lens(
    model,
    inputs: str | Int[Tensor, "1 pos"],
    *,
    position: int = -1,
    target: str | int | None = None,
    k: int = 5,
) -> LogitLensResult:
    """Decode the residual stream after every layer as if it were the last.

    Each ``blocks.L.hook_resid_post`` at ``position`` goes through the model's own final norm module
    (with its real, input-dependent scale) and unembedding (and Gemma 2's final soft-cap), so the
    last row equals the model's real output distribution.

    Args:
        model: a HookedModel.
        inputs: one text, or token ids [1, pos] / [pos].
        position: position whose next-token prediction is read (-1: the last).
        target: a token (string of exactly one token, e.g. " Paris") or id whose probability and rank
            are tracked across layers.
        k: number of top tokens per layer.

    Returns:
        LogitLensResult (float32 tensors on CPU).

    Raises:
        InputError: more than one prompt, an empty prompt, a position out of range, a multi-token target, k < 1.

    References:
        nostalgebraist 2020, "interpreting GPT: the logit lens" (LessWrong).
    """
    tokens = model._tokens(inputs, None)
    if tokens.shape[0] != 1:
        raise InputError(f"logit_lens reads one prompt; got a batch of {tokens.shape[0]}. Pass one text or [1, pos] ids.")
    n_pos = tokens.shape[1]
    if n_pos == 0:
        raise InputError("the prompt is empty (0 tokens), so there is no position to read; pass some text, e.g. "
                         "'The capital of France is'.")
    if not -n_pos <= position < n_pos:
        raise InputError(f"position {position} is outside the prompt of {n_pos} tokens; use a position in "
                         f"{-n_pos}..{n_pos - 1} (-1: the last token).")
    if k < 1:
        raise InputError(f"k must be >= 1, got {k}.")
    target_id = _target_id(model, target) if target is not None else None
    n_layers = model.cfg.n_layers
    _, cache = model.run(tokens, cache=["blocks.*.hook_resid_post"], cache_positions=position, logits_to_keep=1)
    resid = torch.stack([cache[f"blocks.{L}.hook_resid_post"][0] for L in range(n_layers)])  # [n_layers, d_model]
    with torch.no_grad():
        normed = model.module(model.adapter.final_norm)(resid)
        logprobs = torch.log_softmax(unembed(model, normed), dim=-1).cpu()
    k = min(k, logprobs.shape[-1])
    top_lp, top_ids = logprobs.topk(k, dim=-1)
    target_prob = target_rank = None
    if target_id is not None:
        lp = logprobs[:, target_id]
        target_prob = lp.exp()
        target_rank = (logprobs > lp[:, None]).sum(-1)
    return LogitLensResult(
        labels=[f"L{L}" for L in range(n_layers)],
        top_tokens=[_decode(model, row.tolist()) for row in top_ids],
        top_probs=top_lp.exp(),
        target_token=None if target_id is None else _decode(model, [target_id])[0],
        target_prob=target_prob,
        target_rank=target_rank,
        logprobs=logprobs,
    )
