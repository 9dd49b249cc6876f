"""Rendering labelled examples to what the model reads: token ids and a mask of the tokens to score.

A text is tokenized with the tokenizer's special tokens; a chat goes through the tokenizer's chat template
(or plain ``"role: content"`` lines). The scored characters of :class:`~mechscope.data.labelled.Example`
map to tokens through the fast tokenizer's character offsets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from mechscope.core.errors import InputError
from mechscope.data.labelled import LabelledDataset, Message

@dataclass(frozen=True)
class RenderedExample:
    """An example as the model sees it.

    Attributes:
        text: the rendered string (chat template applied for messages).
        tokens: int64 [pos] token ids of ``text``.
        score_mask: bool [pos]; True at tokens whose character span overlaps the scored characters.
    """

    text: str
    tokens: Int[Tensor, " pos"]
    score_mask: Bool[Tensor, " pos"]


def _tokenizer(obj):
    if hasattr(obj, "_need_tokenizer"):
        return obj._need_tokenizer()
    if not callable(obj):
        raise InputError(f"render needs a tokenizer or a HookedModel, got {type(obj).__name__}.")
    return obj


def _render_chat(tok, messages: tuple[Message, ...], chat_template: bool) -> tuple[str, list[int]]:
    """The rendered chat and the character offset of each message's content in it."""
    dicts = [{"role": m.role, "content": m.content} for m in messages]
    if chat_template and getattr(tok, "chat_template", None):
        text = tok.apply_chat_template(dicts, tokenize=False)
        marks = [f"\x00MSG{i}\x00" for i in range(len(messages))]
        blank = tok.apply_chat_template([{"role": m.role, "content": k} for m, k in zip(messages, marks)], tokenize=False)
        starts, rebuilt, cursor = [], [], 0
        for m, k in zip(messages, marks):  # exact when the template copies each content verbatim
            at = blank.find(k, cursor)
            if at < 0:
                break
            rebuilt.append(blank[cursor:at])
            starts.append(sum(map(len, rebuilt)))
            rebuilt.append(m.content)
            cursor = at + len(k)
        if len(starts) == len(messages) and "".join(rebuilt) + blank[cursor:] == text:
            return text, starts
        starts, cursor = [], 0
        for i, m in enumerate(messages):  # the template changes contents: search them in order
            at = text.find(m.content, cursor)
            if at < 0:
                raise InputError(f"the tokenizer's chat template changed message {i} ({m.role}) so its content is not "
                                 "in the rendered text; pass chat_template=False, or strip the content as the "
                                 "template does.")
            starts.append(at)
            cursor = at + len(m.content)
        return text, starts
    text, starts = "", []
    for m in messages:
        text += f"{m.role}: "
        starts.append(len(text))
        text += m.content + "\n"
    return text, starts


def render(tokenizer_or_model, dataset: LabelledDataset, *, chat_template: bool = True) -> list[RenderedExample]:
    """Render every example to tokens and a mask of the scored tokens.

    Text is tokenized with the tokenizer's special tokens (as ``model.to_tokens`` does); a chat is rendered
    with the tokenizer's chat template (no generation prompt) when it has one and ``chat_template`` is
    True, else as ``"role: content"`` lines, and tokenized without adding special tokens (the template
    holds them). Scored characters map to tokens through the fast tokenizer's offsets: a token is scored
    when its characters overlap the scored ones (so a token straddling the boundary counts).

    Args:
        tokenizer_or_model: a fast HF tokenizer, or a HookedModel (its tokenizer).
        dataset: the examples.
        chat_template: False renders chats as plain "role: content" lines.

    Returns:
        One RenderedExample per example, in order: tokens int64 [pos], score_mask bool [pos].

    Raises:
        InputError: a model without a tokenizer; a slow tokenizer (no offsets); a chat template that drops
            a message's content; a scored span that covers no token (names the example index).
    """
    tok = _tokenizer(tokenizer_or_model)
    if not getattr(tok, "is_fast", False):
        raise InputError(f"render needs a fast tokenizer (for character offsets); {type(tok).__name__} is slow. "
                         "Load it with AutoTokenizer.from_pretrained(..., use_fast=True).")
    out = []
    for i, ex in enumerate(dataset.examples):
        m, start, end = ex.scored()
        if ex.text is not None:
            text, offset, special = ex.text, 0, True
        else:
            text, starts = _render_chat(tok, ex.messages, chat_template)
            offset, special = starts[m], False
        enc = tok(text, add_special_tokens=special, return_offsets_mapping=True)
        a, b = offset + start, offset + end
        mask = [s < b and e > a and e > s for s, e in enc["offset_mapping"]]
        if not any(mask):
            raise InputError(f"dataset {dataset.name!r}, example {i}: the scored characters {text[a:b]!r} cover no "
                             "token; widen its score_span.")
        out.append(RenderedExample(text, torch.tensor(enc["input_ids"], dtype=torch.long),
                                   torch.tensor(mask, dtype=torch.bool)))
    return out



def user_prompt_ids(model, text: str, *, generation_prompt: bool = True):
    """int64 [1, pos]: ``text`` as one user message through the model's chat template (with the assistant's
    generation prompt), tokenized as the rendered string (no extra BOS), as :func:`render` tokenizes chats.

    Raises:
        InputError: the model has no tokenizer or its tokenizer no chat template.
    """
    tok = _tokenizer(model)
    if not getattr(tok, "chat_template", None):
        raise InputError(f"{getattr(getattr(model, 'cfg', None), 'name', 'this model')}'s tokenizer has no chat "
                         "template; tokenize the text as it is.")
    rendered = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                       add_generation_prompt=generation_prompt)
    return model.to_tokens(rendered, prepend_bos=False)

__all__ = ["RenderedExample", "render", "user_prompt_ids"]
