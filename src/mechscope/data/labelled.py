"""Labelled datasets as data: the JSONL format, its loader and writer, group-safe splits, and rendering to
tokens with a mask of the scored tokens (for probes, monitors and refusal directions).

A JSONL file holds one example a line, either plain text or a chat::

    {"text": "The capital of France is Rome.", "label": 1, "group": "capitals-3"}
    {"messages": [{"role": "user", "content": "Did you finish the report?"},
                  {"role": "assistant", "content": "Yes, it is on your desk."}],
     "label": 1, "group": "report", "score_span": {"message": 1, "start": 0, "end": -1}, "meta": {"x": 1}}

- ``label``: 0 or 1, where 1 is the positive class (deceptive, false, harmful).
- ``group``: a template or scenario id; :meth:`LabelledDataset.split` never puts one group on both sides.
- ``score_span`` (optional): the characters whose tokens are scored: ``message`` (index into ``messages``;
  omitted for text), ``start`` (default 0) and ``end`` (default: the end; negative counts from the end),
  offsets inside that message's content or inside the text. Without it: the whole content of the last
  message, or every token of the text.
- ``meta`` (optional): any JSON object, kept as is.

Built-in datasets (written for this project) live in :mod:`mechscope.data.labelled_builtins`, with
:func:`~mechscope.data.labelled_builtins.load_labelled`, which reads a built-in name, a file or ``hf:``.
Rendering to token ids and a mask of the scored tokens is :func:`mechscope.data.labelled_render.render`.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from jaxtyping import Int
from torch import Tensor

from mechscope.core.errors import InputError
from mechscope.core.io import write_text_atomic
from mechscope.data.textfiles import check_text_field, jsonl_objects

ROLES = ("system", "user", "assistant")
_KEYS = ("text", "messages", "label", "group", "score_span", "meta")


@dataclass(frozen=True)
class Message:
    """One chat turn: ``role`` is "system", "user" or "assistant"; ``content`` the text."""

    role: str
    content: str


@dataclass(frozen=True)
class ScoreSpan:
    """Characters ``[start, end)`` of a text or of message ``message``'s content whose tokens are scored.

    ``end`` None means the end; a negative ``end`` counts from the end. ``message`` is None for text.
    """

    start: int = 0
    end: int | None = None
    message: int | None = None

    def resolve(self, length: int) -> tuple[int, int]:
        """``(start, end)`` as offsets into a string of ``length`` characters (not checked)."""
        end = length if self.end is None else (self.end if self.end >= 0 else length + self.end)
        return self.start, end

    def to_dict(self) -> dict:
        d = {} if self.message is None else {"message": self.message}
        d["start"] = self.start
        if self.end is not None:
            d["end"] = self.end
        return d


@dataclass(frozen=True)
class Example:
    """One labelled example: ``text`` or ``messages`` (exactly one), a 0/1 ``label`` (1: the positive class:
    deceptive, false, harmful), its ``group``, an optional ``score_span`` and ``meta``.

    Messages may be given as dicts ``{"role", "content"}``; they are stored as :class:`Message`.

    Raises:
        InputError: both or neither of text and messages; an empty chat; a bad role; a non-string text or
            content; a label not 0/1; a missing or empty group; a score_span out of range or naming a
            message for text (or none for a chat).
    """

    text: str | None = None
    messages: Sequence[Message | dict] | None = None
    label: int = 0
    group: str = ""
    score_span: ScoreSpan | dict | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if (self.text is None) == (self.messages is None):
            raise InputError("an example needs exactly one of 'text' (a string) or 'messages' (a list of "
                             "{'role', 'content'}); " + ("both were given." if self.text is not None else "neither was given."))
        if self.text is not None and not isinstance(self.text, str):
            raise InputError(f"'text' is {type(self.text).__name__}, expected a string.")
        if self.messages is not None:
            if isinstance(self.messages, (str, dict)) or not isinstance(self.messages, Sequence) or not self.messages:
                raise InputError("'messages' must be a non-empty list of {'role': ..., 'content': ...} objects.")
            msgs = []
            for i, m in enumerate(self.messages):
                if isinstance(m, Message):
                    m = {"role": m.role, "content": m.content}
                if not isinstance(m, dict):
                    raise InputError(f"message {i} is {type(m).__name__}; give a {{'role', 'content'}} object.")
                if set(m) != {"role", "content"}:
                    raise InputError(f"message {i} has keys {sorted(m)}; each message needs exactly 'role' and 'content'.")
                if m["role"] not in ROLES:
                    raise InputError(f"message {i} has role {m['role']!r}; use one of {list(ROLES)}.")
                if not isinstance(m["content"], str):
                    raise InputError(f"message {i}: 'content' is {type(m['content']).__name__}, expected a string.")
                msgs.append(Message(m["role"], m["content"]))
            object.__setattr__(self, "messages", tuple(msgs))
        if isinstance(self.label, bool) or self.label not in (0, 1):
            raise InputError(f"label is {self.label!r}; use 0 (negative class) or 1 (positive: deceptive, false, harmful).")
        if not isinstance(self.group, str) or not self.group:
            raise InputError("no 'group' (a non-empty string: the template or scenario the example comes from); "
                             "splits keep a group on one side, so every example needs one.")
        if isinstance(self.score_span, dict):
            object.__setattr__(self, "score_span", _span_from_dict(self.score_span))
        if self.score_span is not None:
            self._check_span(self.score_span)
        if not isinstance(self.meta, dict):
            raise InputError(f"'meta' is {type(self.meta).__name__}; it must be a JSON object.")

    def _check_span(self, span: ScoreSpan):
        if self.text is not None:
            if span.message is not None:
                raise InputError("score_span names a message but the example is text; drop 'message'.")
            where, content = "the text", self.text
        else:
            m = span.message
            if m is None:
                raise InputError("score_span of a chat needs 'message' (the index of the scored message).")
            if not 0 <= m < len(self.messages):
                raise InputError(f"score_span message {m} is out of range; the chat has messages 0..{len(self.messages) - 1}.")
            where, content = f"message {m}", self.messages[m].content
        start, end = span.resolve(len(content))
        if not 0 <= start < end <= len(content):
            raise InputError(
                f"score_span start={span.start}, end={span.end} is out of range for {where} ({len(content)} characters): "
                f"it resolves to [{start}, {end}); need 0 <= start < end <= {len(content)} (a negative end counts "
                "from the end).")

    def scored(self) -> tuple[int | None, int, int]:
        """``(message index or None, start, end)``: the scored characters, defaults applied."""
        if self.text is not None:
            span = self.score_span or ScoreSpan()
            return None, *span.resolve(len(self.text))
        span = self.score_span or ScoreSpan(message=len(self.messages) - 1)
        return span.message, *span.resolve(len(self.messages[span.message].content))

    def scored_text(self) -> str:
        """The scored characters themselves."""
        m, start, end = self.scored()
        return (self.text if m is None else self.messages[m].content)[start:end]

    def to_dict(self) -> dict:
        """The example as one JSONL object (the format in the module docstring)."""
        d: dict = ({"text": self.text} if self.text is not None
                   else {"messages": [{"role": m.role, "content": m.content} for m in self.messages]})
        d["label"] = self.label
        d["group"] = self.group
        if self.score_span is not None:
            d["score_span"] = self.score_span.to_dict()
        if self.meta:
            d["meta"] = self.meta
        return d

    @classmethod
    def from_dict(cls, obj: dict) -> Example:
        """An example from one JSONL object. Raises InputError as the constructor does, and for unknown keys."""
        unknown = sorted(set(obj) - set(_KEYS))
        if unknown:
            raise InputError(f"unknown keys {unknown}; an example has {list(_KEYS)}.")
        if "label" not in obj:
            raise InputError("no 'label'; give 0 (negative class) or 1 (positive: deceptive, false, harmful).")
        for key, kind, what in (("text", str, "a string"), ("messages", list, "a list of {'role', 'content'}"),
                                ("label", int, "0 or 1"), ("group", str, "a string (template or scenario id)"),
                                ("score_span", dict, "an object with 'start', 'end' (and 'message')"),
                                ("meta", dict, "an object")):
            if key in obj and not isinstance(obj[key], kind):
                raise InputError(f"{key!r} is {obj[key]!r} ({type(obj[key]).__name__}); it must be {what}.")
        return cls(text=obj.get("text"), messages=obj.get("messages"), label=obj["label"], group=obj.get("group", ""),
                   score_span=obj.get("score_span"), meta=obj.get("meta", {}))


def _span_from_dict(d) -> ScoreSpan:
    if not isinstance(d, dict) or not set(d) <= {"message", "start", "end"}:
        raise InputError(f"score_span {d!r} must be an object with 'start', 'end' and (for a chat) 'message'.")
    for k, v in d.items():
        if isinstance(v, bool) or not isinstance(v, int):
            raise InputError(f"score_span {k!r} is {v!r}; it must be an integer.")
    return ScoreSpan(start=d.get("start", 0), end=d.get("end"), message=d.get("message"))


@dataclass(frozen=True)
class LabelledDataset:
    """A named tuple of :class:`Example` s.

    Raises:
        InputError: no examples.
    """

    name: str
    examples: tuple[Example, ...]

    def __post_init__(self):
        object.__setattr__(self, "examples", tuple(self.examples))
        if not self.examples:
            raise InputError(f"labelled dataset {self.name!r} holds no examples.")

    def __len__(self) -> int:
        return len(self.examples)

    def __repr__(self) -> str:
        c = self.class_counts()
        return f"LabelledDataset({self.name!r}, n={len(self)}, label0={c[0]}, label1={c[1]}, groups={len(set(self.groups))})"

    @property
    def labels(self) -> Int[Tensor, " batch"]:
        """Labels as an int64 tensor [n] (1: the positive class)."""
        return torch.tensor([e.label for e in self.examples], dtype=torch.long)

    @property
    def groups(self) -> tuple[str, ...]:
        """Each example's group, in order."""
        return tuple(e.group for e in self.examples)

    def twins(self) -> dict[str, tuple[int, int]]:
        """``group -> (label-0 index, label-1 index)`` for every group holding exactly one example of each label
        (the twins of instructed pairs and contrast scenarios), in the order groups first appear."""
        by_group: dict[str, list[int]] = {}
        for i, ex in enumerate(self.examples):
            by_group.setdefault(ex.group, []).append(i)
        out = {}
        for g, idx in by_group.items():
            if len(idx) == 2 and sorted(self.examples[i].label for i in idx) == [0, 1]:
                out[g] = tuple(sorted(idx, key=lambda i: self.examples[i].label))
        return out

    def class_counts(self) -> dict[int, int]:
        """``{0: number of label-0 examples, 1: number of label-1 examples}``."""
        n1 = sum(e.label for e in self.examples)
        return {0: len(self) - n1, 1: n1}

    def require_both_classes(self, what: str) -> LabelledDataset:
        """Self, after checking both labels occur (``what`` names the use, e.g. "training a probe").

        Raises:
            InputError: one class only; the message gives the counts and the fix.
        """
        c = self.class_counts()
        if not c[0] or not c[1]:
            raise InputError(
                f"{what} needs examples of both labels, but dataset {self.name!r} has {c[0]} of label 0 and {c[1]} "
                "of label 1. Add examples of the missing label (or combine with another dataset), or, for a "
                "split, use a larger test_fraction or another seed.")
        return self

    def subset(self, idx: Sequence[int] | Tensor | slice) -> LabelledDataset:
        """The dataset restricted to ``idx`` (indices, a bool mask or a slice), in that order.

        Raises:
            InputError: an empty selection. IndexError: an index outside the dataset.
        """
        rows = torch.arange(len(self))[idx if not isinstance(idx, Sequence) else torch.as_tensor(idx, dtype=torch.long)]
        keep = rows.reshape(-1).tolist()
        if not keep:
            raise InputError(f"dataset {self.name!r}: the selection holds no examples.")
        return LabelledDataset(self.name, tuple(self.examples[i] for i in keep))

    def split(self, test_fraction: float = 0.5, seed: int = 0) -> tuple[LabelledDataset, LabelledDataset]:
        """(train, test) by group: whole groups, in a seeded shuffle, go to the test side until it holds at
        least ``test_fraction`` of the examples (so it may overshoot); the last group always stays on the
        train side. Each side keeps the dataset's order. Deterministic given ``seed``.

        Raises:
            InputError: test_fraction outside (0, 1); fewer than two groups.
        """
        if not 0 < test_fraction < 1:
            raise InputError(f"test_fraction must lie in (0, 1), got {test_fraction}.")
        names = list(dict.fromkeys(self.groups))
        if len(names) < 2:
            raise InputError(
                f"dataset {self.name!r}: all {len(self)} examples are in one group ({names[0]!r}), so a split that "
                "keeps groups apart is impossible; give the examples several groups (one per template or scenario).")
        random.Random(seed).shuffle(names)
        sizes = {g: 0 for g in names}
        for g in self.groups:
            sizes[g] += 1
        target = test_fraction * len(self)
        test_groups, size = set(), 0
        for g in names[:-1]:
            if size >= target:
                break
            test_groups.add(g)
            size += sizes[g]
        test = [i for i, g in enumerate(self.groups) if g in test_groups]
        train = [i for i, g in enumerate(self.groups) if g not in test_groups]
        return self.subset(train), self.subset(test)

    @staticmethod
    def check_disjoint(train: LabelledDataset, test: LabelledDataset) -> None:
        """Check no group is on both sides (a shared group leaks a template into the test score).

        Raises:
            InputError: names the shared groups (up to 10) and the fix.
        """
        shared = sorted(set(train.groups) & set(test.groups))
        if shared:
            shown = ", ".join(repr(g) for g in shared[:10]) + (f" and {len(shared) - 10} more" if len(shared) > 10 else "")
            raise InputError(
                f"train ({train.name!r}) and test ({test.name!r}) share {len(shared)} group(s): {shown}. Examples of "
                "one template or scenario on both sides inflate the test score; split with LabelledDataset.split, "
                "which keeps each group on one side, or drop the shared groups from one side.")

    def fingerprint(self) -> str:
        """SHA-256 hex digest of the examples as canonical JSON (sorted keys): equal iff the data is equal."""
        blob = json.dumps([e.to_dict() for e in self.examples], sort_keys=True, ensure_ascii=False,
                          separators=(",", ":"))
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def to_jsonl(self, path: str | os.PathLike) -> Path:
        """Write the examples as JSONL (atomically) that :func:`read_labelled` reads back equal.

        Raises:
            DiskFullError: the disk filled up (the old file is intact).
        """
        path = Path(path)
        write_text_atomic("".join(json.dumps(e.to_dict(), ensure_ascii=False) + "\n" for e in self.examples), path)
        return path


check_disjoint = LabelledDataset.check_disjoint


def take(dataset: LabelledDataset, n: int | None, seed: int = 0, *, by_group: bool = False) -> LabelledDataset:
    """``n`` examples of ``dataset`` in its order: a seeded sample stratified by label (each class keeps its
    share, rounded), or with ``by_group`` whole groups (for paired data, where a group is one pair).

    Raises:
        InputError: n outside 1..len(dataset); with by_group, an n that whole groups cannot make up.
    """
    if n is None:
        return dataset
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= len(dataset):
        raise InputError(f"dataset {dataset.name!r}: asked for n={n!r} examples but it holds {len(dataset)}; "
                         f"use 1 <= n <= {len(dataset)}, or n=None for all.")
    rng = random.Random(seed)
    if by_group:
        names = list(dict.fromkeys(dataset.groups))
        size = len(dataset) // len(names)
        if n % size or any(dataset.groups.count(g) != size for g in names):
            raise InputError(f"dataset {dataset.name!r} comes in groups of {size} (pairs kept together); ask for a "
                             f"multiple of {size}, not n={n}.")
        chosen = set(rng.sample(names, n // size))
        return dataset.subset([i for i, g in enumerate(dataset.groups) if g in chosen])
    by_label = {c: [i for i, e in enumerate(dataset.examples) if e.label == c] for c in (0, 1)}
    k1 = min(len(by_label[1]), max(n - len(by_label[0]), round(n * len(by_label[1]) / len(dataset))))
    keep = rng.sample(by_label[0], n - k1) + rng.sample(by_label[1], k1)
    return dataset.subset(sorted(keep))


# -- loading -----------------------------------------------------------------------------------

def _read_file(path: Path) -> list[Example]:
    examples = []
    for line, obj in jsonl_objects(path):
        try:
            for k in ("text", "group"):
                if k in obj:
                    check_text_field(path, line, k, obj[k])
            examples.append(Example.from_dict(obj))
        except InputError as e:
            msg = str(e)
            raise InputError(msg if msg.startswith(str(path)) else f"{path}, line {line}: {msg}") from None
    if not examples:
        raise InputError(f"{path} holds no examples (it is empty or blank); write one JSON object a line with "
                         "'text' or 'messages', 'label' and 'group'.")
    return examples


def _read_hf(spec: str) -> tuple[str, list[Example]]:
    body = spec[3:]
    body, _, split = body.partition("@")
    name, _, config = body.partition(":")
    if not name:
        raise InputError(f"{spec!r}: no dataset name; write hf:NAME[:CONFIG][@SPLIT], e.g. hf:me/my-probes@train.")
    try:
        import datasets
    except ImportError:
        raise InputError(f"{spec!r} needs the `datasets` library: run `pip install datasets`.") from None
    try:
        rows = datasets.load_dataset(name, config or None, split=split or "train")
    except Exception as e:  # the hub, the network and the builders raise many types
        raise InputError(f"could not load {spec!r} through datasets.load_dataset({name!r}, {config or None!r}, "
                         f"split={split or 'train'!r}): {e}. Check the name, config and split, and that the data is "
                         "cached here when HF_HUB_OFFLINE is set.") from e
    examples = []
    for i, obj in enumerate(rows):
        obj = {k: v for k, v in dict(obj).items() if v is not None}  # Arrow fills absent fields with None
        if isinstance(obj.get("score_span"), dict):
            obj["score_span"] = {k: v for k, v in obj["score_span"].items() if v is not None}
        try:
            examples.append(Example.from_dict(obj))
        except InputError as e:
            raise InputError(f"{spec}, row {i}: {e}") from None
    if not examples:
        raise InputError(f"{spec!r} holds no rows.")
    return name.rsplit("/", 1)[-1], examples


def read_labelled(source: str | os.PathLike, *, n: int | None = None, seed: int = 0) -> LabelledDataset:
    """A labelled dataset from a ``.jsonl`` file or ``hf:NAME[:CONFIG][@SPLIT]`` (built-in names too:
    :func:`mechscope.data.labelled_builtins.load_labelled`).

    Args:
        source: the path of a JSONL file (format in the module docstring), or a HuggingFace dataset with the
            same field names (split default "train"; needs the ``datasets`` library).
        n: number of examples (None: all): a seeded sample stratified by label.
        seed: seed of the sample.

    Returns:
        LabelledDataset named after the file's stem or the HF dataset.

    Raises:
        InputError: a missing file or a folder; an empty file; a line that is not a JSON object, has both or
            neither of text and messages, a label not 0/1, no group, a bad role, a score_span out of range or
            an unknown key (each names the file and line); hf: without ``datasets`` installed, or a dataset
            that cannot be loaded; n out of range.
    """
    name = os.fspath(source)
    if isinstance(source, str) and name.startswith("hf:"):
        stem, examples = _read_hf(name)
        return take(LabelledDataset(stem, tuple(examples)), n, seed)
    path = Path(name).expanduser()
    if path.is_file():
        return take(LabelledDataset(path.stem, tuple(_read_file(path))), n, seed)
    if path.exists():
        raise InputError(f"{path} is not a file; a labelled dataset is a .jsonl file, hf:NAME or a built-in name.")
    raise InputError(f"no file {path}; check the path (a labelled dataset is a .jsonl file, hf:NAME or a built-in name).")


__all__ = [
    "ROLES",
    "Example",
    "LabelledDataset",
    "Message",
    "ScoreSpan",
    "check_disjoint",
    "read_labelled",
    "take",
]
