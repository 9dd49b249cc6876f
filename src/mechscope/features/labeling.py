"""Labelling latents of a feature database: explain each from its top contexts, score the label by
detection on held-out contexts, and store label, score and provenance together (``FeatureDB.add_label``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Int
from torch import Tensor

from mechscope.core.errors import InputError
from mechscope.data.detokenize import decode_spans
from mechscope.features.autointerp import ScoredLabel, explain_and_score, sample_detection_set


@torch.no_grad()
def latent_activations(model, dictionary, contexts: Int[Tensor, "n_ctx ctx_len"], latents: Sequence[int], *,
                       batch_contexts: int = 8) -> Tensor:
    """Activations of ``latents`` at every token of ``contexts``: float32 [n_latents, n_ctx, ctx_len - 1] (BOS dropped)."""
    hook = dictionary.cfg.hook_in
    idx = torch.as_tensor(list(latents), dtype=torch.long)
    if idx.numel() == 0 or int(idx.min()) < 0 or int(idx.max()) >= dictionary.cfg.d_sae:
        raise InputError(f"latents must be ids in 0..{dictionary.cfg.d_sae - 1}, got {list(latents)[:8]}.")
    from mechscope.core.names import parse

    layer = parse(hook)[1]
    out = []
    for s in range(0, contexts.shape[0], batch_contexts):
        toks = contexts[s:s + batch_contexts]
        _, cache = model.run(toks, cache=[hook], stop_at_layer=None if layer is None else layer + 1)
        x = cache[hook][:, 1:]
        out.append(dictionary.encode(x.reshape(*x.shape[:2], -1)).float()[..., idx])
    return torch.cat(out).permute(2, 0, 1).contiguous()


def label_latents(model, dictionary, db, latents: Sequence[int], contexts: Int[Tensor, "n_ctx ctx_len"], *,
                  explainer, scorer=None, n_train: int = 10, n_pos: int = 20, n_neg: int = 20, seed: int = 0,
                  progress: bool = True) -> dict[int, ScoredLabel | str]:
    """Explain and score each latent, and store the result in ``db`` (opened with ``read_only=False``).

    Args:
        contexts: held-out token ids (e.g. the eval split), BOS at position 0.
        explainer / scorer: chat backends (``LocalChatBackend`` / ``OpenAIChatBackend``); scorer defaults to
            the explainer.

    Returns:
        latent -> ScoredLabel, or the reason it was skipped (too few active or inactive contexts).
    """
    scorer = scorer or explainer
    acts = latent_activations(model, dictionary, contexts, latents)
    str_tokens = [d.pieces[1:] for d in decode_spans(model.tokenizer, contexts.tolist())]  # exact text, BOS dropped
    from tqdm.auto import tqdm

    results: dict[int, ScoredLabel | str] = {}
    for j, latent in enumerate(tqdm(list(latents), desc="labelling", unit="latent", disable=not progress)):
        try:
            data = sample_detection_set(acts[j], str_tokens, n_train=n_train, n_pos=n_pos, n_neg=n_neg, seed=seed)
        except InputError as e:
            results[int(latent)] = f"skipped: {e}"
            continue
        sl = explain_and_score(explainer, scorer, data, latent=int(latent))
        e, sc = sl.explanation, sl.score
        db.add_label(int(latent), e.label, score=sc.balanced_accuracy, score_kind="detection balanced accuracy",
                     explainer=e.explainer, prompt=e.prompt, date=e.date, n_scored=sc.n_pos + sc.n_neg)
        results[int(latent)] = sl
    return results
