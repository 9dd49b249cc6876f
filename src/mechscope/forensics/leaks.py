"""The leaked-completion source of the trigger search (:mod:`mechscope.forensics.trigger_search`, source (c)):
spans the tuned model writes at the start of a user turn more often than its base does, ranked by how much more
likely the tuned model finds them there."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from mechscope.features.batch_generation import generate_texts


def leaked_spans(base, tuned, frame, *, n_samples: int, max_new_tokens: int, window: int, max_n: int,
            seed: int, progress: bool) -> list[tuple[tuple[int, ...], float]]:
    """Closed n-grams found in more of the tuned model's samples from the user-turn opener than of the base's:
    (ids, log-likelihood ratio of the span right after the opener, nats), best first."""
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
    llr = span_logprob(tuned, opener, grams) - span_logprob(base, opener, grams)
    return sorted(zip(grams, llr.tolist()), key=lambda s: (-s[1], len(s[0])))


@torch.no_grad()
def span_logprob(model, prefix: Sequence[int], spans: Sequence[Sequence[int]],
                 batch_size: int = 64) -> Float[Tensor, " n_spans"]:
    """log P(span | prefix) in nats (teacher forced, summed over the span's tokens), float64 on the CPU."""
    from mechscope.planted.measures import token_logprobs

    rows = [torch.tensor([*prefix, *g]) for g in spans]
    out = []
    for lp, att in token_logprobs(model, rows, batch_size):  # lp[:, t] is log P(token t + 1)
        on_span = (torch.arange(1, att.shape[1])[None] >= len(prefix)) & att[:, 1:].bool()
        out.append((lp * on_span).sum(1))
    return torch.cat(out).double()


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


__all__ = ["closed_ngrams", "leaked_spans", "span_logprob"]
