"""How differently the two models predict the next token: per-token KL, and the same through the logit lens.

``KL(P_tuned || P_base) = sum_v p_t(v) (log p_t(v) - log p_b(v))`` in nats, of the next-token distributions at
every real (unpadded) position of every text, both models reading the same token ids. It is large where the
tuned model puts mass the base model did not expect (what the tuning taught), and is the expected excess
log-loss of coding the tuned model's samples with the base model.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from mechscope.analysis._norm import unembed
from mechscope.analysis.bootstrap import CI, bootstrap_ci
from mechscope.core.errors import InputError
from mechscope.diff.activations import pad_id, padded_batches, token_rows


def kl_from_logits(logits_t: Tensor, logits_b: Tensor) -> Tensor:
    """KL(softmax(logits_t) || softmax(logits_b)) over the last axis, in nats (float32 computation)."""
    lt = torch.log_softmax(logits_t.float(), dim=-1)
    lb = torch.log_softmax(logits_b.float(), dim=-1)
    return (lt.exp() * (lt - lb)).sum(-1).clamp_min(0.0)


def _decode(model, ids: Sequence[int]) -> str:
    tok = model.tokenizer
    if tok is None:
        return " ".join(str(int(i)) for i in ids)
    return tok.decode([int(i) for i in ids])


def _top(model, logits: Tensor, k: int) -> list[dict]:
    p = torch.softmax(logits.float(), -1)
    v, i = p.topk(min(k, p.shape[-1]))
    return [{"token": _decode(model, [int(t)]), "id": int(t), "prob": float(q)} for q, t in zip(v, i)]


@dataclass(frozen=True)
class TokenKL:
    """Per-token KL(P_tuned || P_base) of next-token distributions.

    Attributes:
        mean: the mean over all scored tokens (each token weighs the same), nats.
        ci: its 95% percentile bootstrap interval over texts (the statistic is sum / count over a resample of
            texts, so long texts weigh as many tokens as they have); None with fewer than 2 texts.
        per_text: mean KL of each text (float64 [n_texts]).
        n_tokens: tokens scored per text (int64 [n_texts]).
        top: the ``top_n`` positions with the largest KL, largest first, each a dict with ``text``, ``position``,
            ``kl``, ``context`` (the last ``context_tokens`` tokens up to and including the position),
            ``next`` (the actual next token, or None at a text's end), and ``base_top`` / ``tuned_top`` (each
            model's top 3 predictions with probabilities).
    """

    mean: float
    ci: CI | None
    per_text: Tensor
    n_tokens: Tensor
    top: list[dict]

    def to_dict(self) -> dict:
        return {"mean": self.mean, "ci": None if self.ci is None else self.ci.to_dict(),
                "per_text": self.per_text.tolist(), "n_tokens": self.n_tokens.tolist(), "top": self.top}


def token_kl(
    base,
    tuned,
    inputs,
    *,
    top_n: int = 20,
    context_tokens: int = 12,
    batch_size: int = 8,
    max_len: int | None = 256,
    n_boot: int = 1000,
    progress: bool = True,
) -> TokenKL:
    """Per-token KL(P_tuned || P_base) at every real position of every text, with its mean, CI and top tokens.

    Args:
        base / tuned: HookedModels of one architecture and tokenizer.
        inputs: texts (cut to ``max_len`` tokens), 1-D token-id rows, or a [batch, pos] tensor.
        top_n: how many of the most-changed positions to describe.
        context_tokens: tokens of context shown for each of them.
        batch_size: texts per forward pass (right-padded, padding masked).
        n_boot: bootstrap resamples of the interval over texts (>= 10).

    Returns:
        TokenKL.
    """
    from tqdm.auto import tqdm

    rows = token_rows(base, inputs, max_len)
    n = len(rows)
    sums = torch.zeros(n, dtype=torch.float64)
    counts = torch.zeros(n, dtype=torch.long)
    heap: list[tuple[float, int, int, list]] = []
    batches = list(padded_batches(rows, batch_size, pad_id(base)))
    for idx, ids, mask in tqdm(batches, desc="token KL", unit="batch", disable=not progress or len(batches) < 2,
                               leave=False):
        lb = base.run(ids.to(base.device), attention_mask=mask.to(base.device)).logits.cpu()
        lt = tuned.run(ids.to(tuned.device), attention_mask=mask.to(tuned.device)).logits.cpu()
        kl = kl_from_logits(lt, lb).double()  # [b, P]
        for j, i in enumerate(idx):
            L = rows[i].numel()
            sums[i] = kl[j, :L].sum()
            counts[i] = L
            for p in torch.topk(kl[j, :L], min(top_n, L)).indices.tolist():
                key = (float(kl[j, p]), -i, -p)  # ties: the earlier text and position first
                if len(heap) < top_n or key > heap[0][:3]:
                    item = (*key, [lb[j, p].clone(), lt[j, p].clone()])
                    (heapq.heappush if len(heap) < top_n else heapq.heapreplace)(heap, item)
    top = []
    for value, mi, mp, (b_logits, t_logits) in sorted(heap, key=lambda t: t[:3], reverse=True):
        i, p = -mi, -mp
        r = rows[i]
        top.append({"text": i, "position": p, "kl": value,
                    "context": _decode(base, r[max(0, p - context_tokens + 1):p + 1].tolist()),
                    "next": _decode(base, [int(r[p + 1])]) if p + 1 < r.numel() else None,
                    "base_top": _top(base, b_logits, 3), "tuned_top": _top(tuned, t_logits, 3)})
    mean = float(sums.sum() / counts.sum())
    ci = None
    if n >= 2:
        ci = bootstrap_ci((sums, counts.double()), statistic=lambda s, c: s.sum(1) / c.sum(1), n_boot=n_boot)
    return TokenKL(mean, ci, sums / counts, counts, top)


@dataclass(frozen=True)
class LensDiff:
    """KL(P_tuned^L || P_base^L) of the two models' logit-lens distributions after each layer L.

    Attributes:
        kl: float64 [n_layers], the mean over every real position of every text (nats). The last layer's
            lens is each model's real output, so ``kl[-1]`` equals :func:`token_kl`'s mean.
        n_tokens: positions averaged.
        top_increased / top_decreased: at the final layer, the tokens whose probability rose / fell most
            on average over positions, as dicts ``token``, ``id``, ``delta_prob`` (tuned - base), ``base_prob``,
            ``tuned_prob`` (means over positions).
    """

    kl: Tensor
    n_tokens: int
    top_increased: list[dict]
    top_decreased: list[dict]

    def to_dict(self) -> dict:
        return {"kl": self.kl.tolist(), "n_tokens": self.n_tokens, "top_increased": self.top_increased,
                "top_decreased": self.top_decreased}


def _lens_logprobs(model, resid: Tensor) -> Tensor:
    """Log-probs of residual vectors [N, d_model] read through ``model``'s own final norm and unembedding, as
    :func:`mechscope.analysis.logit_lens` reads them."""
    normed = model.module(model.adapter.final_norm)(resid.to(model.device, model.dtype))
    return torch.log_softmax(unembed(model, normed), dim=-1).cpu()


@torch.no_grad()
def logit_lens_diff(
    base,
    tuned,
    inputs,
    *,
    top_n: int = 10,
    batch_size: int = 8,
    max_len: int | None = 256,
    chunk_tokens: int = 256,
    progress: bool = True,
) -> LensDiff:
    """Per layer, the mean KL between the two models' logit-lens distributions, and the final layer's top changes.

    Each model's ``blocks.L.hook_resid_post`` goes through that model's own final norm and unembedding (the
    reading of :func:`mechscope.analysis.logit_lens`, at every position rather than one).

    Args:
        base / tuned: HookedModels of one architecture and tokenizer.
        inputs: texts (cut to ``max_len`` tokens), 1-D token-id rows, or a [batch, pos] tensor.
        top_n: tokens listed in top_increased / top_decreased.
        chunk_tokens: positions unembedded at once (bounds memory at about chunk_tokens x d_vocab floats).

    Returns:
        LensDiff.
    """
    from tqdm.auto import tqdm

    n_layers = base.cfg.n_layers
    rows = token_rows(base, inputs, max_len)
    sites = [f"blocks.{L}.hook_resid_post" for L in range(n_layers)]
    kl_sum = torch.zeros(n_layers, dtype=torch.float64)
    dprob = pb_sum = pt_sum = None
    n_tok = 0
    batches = list(padded_batches(rows, batch_size, pad_id(base)))
    for _, ids, mask in tqdm(batches, desc="logit-lens diff", unit="batch", disable=not progress or len(batches) < 2,
                             leave=False):
        cb = base.run(ids.to(base.device), cache=sites, attention_mask=mask.to(base.device), logits_to_keep=1).cache
        ct = tuned.run(ids.to(tuned.device), cache=sites, attention_mask=mask.to(tuned.device),
                       logits_to_keep=1).cache
        real = mask.bool()
        n_tok += int(real.sum())
        for L, s in enumerate(sites):
            rb, rt = cb[s].cpu()[real], ct[s].cpu()[real]  # [N, d_model]
            for c in range(0, rb.shape[0], chunk_tokens):
                lpb = _lens_logprobs(base, rb[c:c + chunk_tokens])
                lpt = _lens_logprobs(tuned, rt[c:c + chunk_tokens])
                kl_sum[L] += (lpt.exp() * (lpt - lpb)).sum(-1).clamp_min(0.0).double().sum()
                if L == n_layers - 1:
                    pb, pt = lpb.exp().double().sum(0), lpt.exp().double().sum(0)
                    pb_sum = pb if pb_sum is None else pb_sum + pb
                    pt_sum = pt if pt_sum is None else pt_sum + pt
    if n_tok == 0:
        raise InputError("no token positions to compare; pass non-empty texts.")
    mb, mt = pb_sum / n_tok, pt_sum / n_tok
    dprob = mt - mb
    k = min(top_n, dprob.numel())

    def rows_of(ids: Tensor) -> list[dict]:
        return [{"token": _decode(base, [int(i)]), "id": int(i), "delta_prob": float(dprob[i]),
                 "base_prob": float(mb[i]), "tuned_prob": float(mt[i])} for i in ids]

    return LensDiff(kl_sum / n_tok, n_tok, rows_of(dprob.topk(k).indices), rows_of((-dprob).topk(k).indices))


__all__ = ["LensDiff", "TokenKL", "kl_from_logits", "logit_lens_diff", "token_kl"]
