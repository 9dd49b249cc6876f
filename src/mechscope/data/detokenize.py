"""The exact text of token sequences, and which part of it each token holds.

Decoding each token on its own loses text: a byte-level BPE (GPT-2, SmolLM2, Llama 3, Qwen) splits a
character that is several UTF-8 bytes (😀, ש, é written as e + U+0301, fullwidth ＜) over several
tokens, and each piece alone decodes to U+FFFD. :func:`decode_spans` decodes the whole sequence once
(the exact text) and gives every token the span of that text it completes:

* a token's span holds the characters whose last byte it supplies, so the spans of a sequence join to
  its text exactly, and the span at position ``i`` is what the model has seen by position ``i``;
* a token that supplies only leading bytes of a character gets an empty span; a reader shows it merged
  with the token that completes the character (the web app and the dashboard do);
* a character cut by the sequence's own boundary (a context that starts or ends inside it) stays the
  decoder's U+FFFD: its other bytes are not in the sequence.

:func:`token_label` is for a token shown alone (logit effects, a top token): its text, or for a byte
fragment its bytes as visible escapes (``' \\xf0\\x9f'``) instead of U+FFFD.

Offsets are in Unicode code points (Python ``str`` indices), not bytes and not UTF-16 units.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class DecodedText:
    """One token sequence decoded exactly.

    Attributes:
        text: the whole sequence decoded at once (special tokens kept, no clean-up of spaces).
        starts: ``[n_tokens]`` the code-point offset in ``text`` where each token's span starts; the span
            of token ``i`` is ``text[starts[i]:starts[i + 1]]`` (the last ends at ``len(text)``).
    """

    text: str
    starts: tuple[int, ...]

    @property
    def pieces(self) -> list[str]:
        """Each token's span of ``text`` (``"".join(pieces) == text``; empty for a leading byte fragment)."""
        ends = (*self.starts[1:], len(self.text))
        return [self.text[s:e] for s, e in zip(self.starts, ends)]


def _batch_decode(tokenizer, rows: list[list[int]]) -> list[str]:
    return tokenizer.batch_decode(rows, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def decode_spans(tokenizer, rows: Sequence[Sequence[int]]) -> list[DecodedText]:
    """The exact text of each row of token ids, and each token's span of it (see the module docstring).

    Fast path: when the tokens decoded one by one join to the whole decode (true of every row without
    split characters for byte-level BPE tokenizers), those are the spans. Otherwise each prefix of the
    row is decoded (one batched call) and token ``i`` ends where the decode of ``ids[:i + 1]`` stops
    agreeing with the whole text, which holds for any tokenizer whose decoder is consistent on prefixes.

    Args:
        tokenizer: a ``transformers`` tokenizer; None gives ``"#<id>"`` per token.
        rows: token-id sequences (lists, tuples, or 1-D tensors / arrays), e.g. contexts with their BOS.

    Returns:
        One :class:`DecodedText` per row, ``len(starts) == len(row)``.
    """
    rows = [[int(i) for i in r] for r in rows]
    if tokenizer is None:
        out = []
        for r in rows:
            pieces = [f"#{i}" for i in r]
            out.append(DecodedText("".join(pieces), _starts(pieces)))
        return out
    full = _batch_decode(tokenizer, rows) if rows else []
    vocab = sorted({i for r in rows for i in r})
    single = dict(zip(vocab, _batch_decode(tokenizer, [[i] for i in vocab]))) if vocab else {}
    out = []
    for r, text in zip(rows, full):
        pieces = [single[i] for i in r]
        if "".join(pieces) == text:
            out.append(DecodedText(text, _starts(pieces)))
            continue
        prefixes = _batch_decode(tokenizer, [r[:n + 1] for n in range(len(r))])
        ends, m = [], 0
        for p in prefixes:
            m = max(m, len(os.path.commonprefix([p, text])))
            ends.append(m)
        if ends:
            ends[-1] = len(text)
        out.append(DecodedText(text, tuple([0, *ends[:-1]]) if ends else ()))
    return out


def _starts(pieces: list[str]) -> tuple[int, ...]:
    starts, at = [], 0
    for p in pieces:
        starts.append(at)
        at += len(p)
    return tuple(starts)


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """The inverse of the byte-level BPE alphabet (GPT-2's bytes-to-unicode map): printable Latin-1 bytes
    stand for themselves, the other 68 bytes for code points 256 + n in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def token_bytes(tokenizer, token_id: int) -> bytes | None:
    """The raw bytes a token stands for, for byte-level BPE and SentencePiece byte-fallback tokenizers;
    None for other tokenizers and for special tokens."""
    if tokenizer is None:
        return None
    if token_id in set(getattr(tokenizer, "all_special_ids", []) or []):
        return None
    piece = tokenizer.convert_ids_to_tokens(int(token_id))
    if not isinstance(piece, str):
        return None
    m = _BYTE_FALLBACK.fullmatch(piece)
    if m:
        return bytes([int(m.group(1), 16)])
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    if type(decoder).__name__ == "ByteLevel":
        table = _byte_decoder()
        if all(c in table for c in piece):
            return bytes(table[c] for c in piece)
    return None


def token_label(tokenizer, token_id: int) -> str:
    """A token's text when shown alone: its decode, or, where that holds U+FFFD (a byte fragment of a
    character), its bytes with the undecodable ones as visible escapes (``' \\xf0\\x9f'``).

    Args:
        tokenizer: a ``transformers`` tokenizer; None gives ``"#<id>"``.
        token_id: the token id.
    """
    return token_labels(tokenizer, [token_id])[int(token_id)]


def token_labels(tokenizer, ids: Iterable[int]) -> dict[int, str]:
    """:func:`token_label` of many ids (one batched decode): id -> label."""
    ids = sorted({int(i) for i in ids})
    if tokenizer is None:
        return {i: f"#{i}" for i in ids}
    out = dict(zip(ids, _batch_decode(tokenizer, [[i] for i in ids]))) if ids else {}
    for i, s in out.items():
        if "\ufffd" in s:
            raw = token_bytes(tokenizer, i)
            if raw is not None:
                out[i] = raw.decode("utf-8", errors="backslashreplace")
    return out
