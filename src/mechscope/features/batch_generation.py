"""Greedy or sampled generation of many prompts in left-padded batches, through ``transformers``' own
``generate``, with mechscope interventions active on every forward.

:func:`~mechscope.features.generation.generate` is the one-prompt reference (its own loop, per-step logits,
interventions from a chosen position); this module is for rates over many prompts (attack success, refusal
rate, extraction), where one prompt at a time would take minutes on a CPU. Interventions here act at every
position of every forward (``positions=None``), which is what a directional ablation or a steering vector
means; position-specific edits would shift with the left padding and are refused.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Int
from torch import Tensor

from mechscope.core.errors import InputError
from mechscope.data.labelled_render import user_prompt_ids
from mechscope.features.generation import eos_ids


def _ids(model, prompt, chat: bool) -> list[int]:
    if isinstance(prompt, Tensor):
        if prompt.dim() == 2 and prompt.shape[0] == 1:
            prompt = prompt[0]
        if prompt.dim() != 1 or not len(prompt):
            raise InputError(f"a token prompt must be a non-empty [pos] or [1, pos] tensor, got shape {tuple(prompt.shape)}.")
        return [int(t) for t in prompt]
    if not isinstance(prompt, str):
        raise InputError(f"prompts are strings or token id tensors, got {type(prompt).__name__}.")
    if chat:
        return user_prompt_ids(model, prompt)[0].tolist()
    return model.to_tokens(prompt)[0].tolist()


@torch.no_grad()
def generate_texts(model, prompts: Sequence[str | Int[Tensor, " _pos"]], *, chat: bool = True,
                   max_new_tokens: int = 40, batch_size: int = 16, interventions: Sequence = (),
                   temperature: float = 0.0, seed: int = 0, progress: bool = True) -> list[str]:
    """Continuations of ``prompts``, decoded with special tokens skipped, in input order.

    Args:
        model: a HookedModel with a tokenizer.
        prompts: user messages (rendered through the chat template with the assistant's generation prompt when
            ``chat``; else tokenized as plain text with the model's BOS rule) or token id tensors used as given.
        chat: render string prompts as a user turn of the chat template.
        max_new_tokens: at most this many new tokens each; a row stops at an end-of-sequence token.
        batch_size: prompts per ``generate`` call (left-padded; the attention mask hides the pads and the
            position ids count real tokens only, so a row's tokens equal its unpadded generation up to float
            rounding).
        interventions: mechscope interventions (Add, Replace, Ablate, ...) with ``positions=None``, active on every
            forward of every step.
        temperature: 0 for greedy decoding; > 0 samples (``torch.manual_seed(seed)`` first).
        progress: a tqdm bar over batches.

    Returns:
        One string per prompt.

    Raises:
        InputError: an intervention with positions; a bad prompt; batch_size < 1; negative max_new_tokens or
            temperature; a string prompt for a model without a chat template while ``chat`` is True.
    """
    from tqdm.auto import tqdm

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be an int >= 1, got {batch_size!r}.")
    if max_new_tokens < 0 or temperature < 0:
        raise InputError(f"max_new_tokens and temperature must be >= 0, got {max_new_tokens}, {temperature}.")
    for iv in interventions:
        if getattr(iv, "positions", None) is not None:
            raise InputError(f"{type(iv).__name__} at {getattr(iv, 'site', '?')} has positions; batched generation "
                             "left-pads prompts, so give positions=None (every position) or use "
                             "mechscope.features.generation.generate one prompt at a time.")
    tok = model._need_tokenizer()
    ids = [_ids(model, p, chat) for p in prompts]
    if max_new_tokens == 0:
        return [""] * len(ids)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    eos = sorted(eos_ids(model)) or None
    device = model.device
    out: list[str] = [""] * len(ids)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths share a batch: less padding
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if temperature > 0:
        torch.manual_seed(seed)
    with model.hooks(interventions=list(interventions)):
        for batch in tqdm(batches, desc="generate", unit="batch", disable=not progress, dynamic_ncols=True):
            longest = max(len(ids[i]) for i in batch)
            inp = torch.full((len(batch), longest), pad, dtype=torch.long)
            att = torch.zeros(len(batch), longest, dtype=torch.long)
            for row, i in enumerate(batch):
                inp[row, longest - len(ids[i]):] = torch.tensor(ids[i])
                att[row, longest - len(ids[i]):] = 1
            kw = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature > 0 \
                else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
            gen = model.hf.generate(input_ids=inp.to(device), attention_mask=att.to(device),
                                    max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=eos, **kw)
            for row, i in enumerate(batch):
                new = gen[row, longest:].tolist()
                if eos:
                    for k, t in enumerate(new):
                        if t in eos:
                            new = new[:k + 1]
                            break
                out[i] = tok.decode(new, skip_special_tokens=True)
    return out


__all__ = ["generate_texts"]
