"""Reading the user's text files as documents: ``.txt`` and ``.jsonl`` (``.parquet`` is in :mod:`.sources`).

Text must be UTF-8. A file that is not, and a JSONL string that holds a lone surrogate (``"\\ud800"`` is
valid JSON but not Unicode text: it cannot be encoded or tokenized), are refused at reading, with the file,
the line and byte offset, and the fix; nothing downstream ever sees such a string.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

from mechscope.core.errors import InputError

#: The file types a text source may hold.
FILE_SUFFIXES = (".txt", ".jsonl", ".parquet")
_SURROGATE = re.compile("[\ud800-\udfff]")


def first_surrogate(text: str) -> int | None:
    """Index of the first lone surrogate code point (U+D800..U+DFFF) in ``text``, or None."""
    m = _SURROGATE.search(text)
    return None if m is None else m.start()


def _not_utf8(path: Path, where: str, e: UnicodeDecodeError) -> InputError:
    """The error for a byte of ``path`` that is not UTF-8; ``where`` says which (line and byte offset)."""
    quoted = shlex.quote(str(path))
    converted = shlex.quote(str(path.with_name(path.stem + ".utf8" + path.suffix)))
    return InputError(
        f"{path} is not UTF-8 text: {where} is 0x{e.object[e.start:e.start + 1].hex()} ({e.reason}). mechscope "
        f"reads text files as UTF-8; convert the file, e.g. `iconv -f latin1 -t utf-8 {quoted} > {converted}` "
        f"(latin1 if it came from an older Windows or Western-European system; `file -i {quoted}` guesses the "
        "encoding), and pass the converted file.")


def read_text_file(path: Path, split_lines: bool = False) -> list[str]:
    """A ``.txt`` file as documents: the whole file, or one per non-blank line with ``split_lines``.

    Raises:
        InputError: the file is not UTF-8 (names the byte offset and line, and how to convert it).
    """
    path = Path(path)
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise _not_utf8(path, f"line {line}, byte {e.start:,}", e) from None
    if split_lines:
        return [line for line in text.splitlines() if line.strip()]
    return [text] if text.strip() else []


def jsonl_objects(path: Path):
    """The JSON objects of a JSONL file with their 1-based line numbers; blank lines are skipped.

    Yields:
        (line number, dict) per non-blank line.

    Raises:
        InputError: a line that is not UTF-8 (with its byte offset), not valid JSON or not a JSON object;
            each names the file, the line and the fix.
    """
    path = Path(path)
    offset = 0
    with open(path, "rb") as f:
        for i, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _not_utf8(path, f"line {i}, byte {offset + e.start:,}", e) from None
            offset += len(raw)
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}, line {i}: not valid JSON ({e}). Each line must be one JSON object.") from e
            if not isinstance(row, dict):
                raise InputError(f"{path}, line {i}: a JSON {type(row).__name__}, not an object. Each line must be "
                                 "one JSON object, e.g. {\"text\": \"...\"}.")
            yield i, row


def check_text_field(path: Path, line: int, field: str, text) -> str:
    """``text`` if it is a string of Unicode text; else an InputError naming the file, line and field.

    Raises:
        InputError: a non-string, or a string holding a lone surrogate (valid JSON, not Unicode text).
    """
    if not isinstance(text, str):
        raise InputError(f"{path}, line {line}: field {field!r} is {type(text).__name__}, expected a string.")
    at = first_surrogate(text)
    if at is not None:
        raise InputError(
            f"{path}, line {line}: field {field!r} holds a lone surrogate \\u{ord(text[at]):04x} at "
            f"character {at}: valid JSON, but not Unicode text, so it cannot be encoded or tokenized "
            "(a writer leaves one when it cuts text inside a UTF-16 pair, or decodes bytes with "
            "errors='surrogateescape'). Fix the line "
            "(e.g. re-encode the text with errors='replace') or remove it, and pass the file again.")
    return text


def read_jsonl(path: Path, text_field: str) -> list[str]:
    """Documents of a JSONL file: one JSON object per line, the text in field ``text_field``; blank lines and
    blank texts are skipped.

    Raises:
        InputError: a line that is not UTF-8 (with its byte offset), not a JSON object, lacks the field, holds
            a non-string, or a string with a lone surrogate; each names the file, the line and the fix.
    """
    docs = []
    for i, row in jsonl_objects(path):
        if text_field not in row:
            raise InputError(f"{path}, line {i}: no field {text_field!r} (found {sorted(row)}). "
                             "Pass text_field= (--text-field on the command line) to name the field that "
                             "holds the text.")
        text = check_text_field(path, i, text_field, row[text_field])
        if text.strip():
            docs.append(text)
    return docs
