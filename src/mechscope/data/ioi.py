"""Indirect-object identification (IOI) prompts with their corrupted counterparts.

A prompt names two people, mentions one again as the subject (S) of a giving event, and ends where
the other, the indirect object (IO), is the natural next token:
"When Mary and John went to the store, John gave the ball to" -> " Mary". The order of the first two
names is ABBA (IO first) or BABA (S first). The corrupted prompt replaces the second subject mention
(S2) by the IO name, which makes S the natural answer and keeps the token length.

The templates here are mechscope's own wording of the IOI task of Wang et al. 2022.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from torch import Tensor

from mechscope.core.errors import InputError

TEMPLATES: tuple[str, ...] = (
    "When {A} and {B} went to the {PLACE}, {S} gave the {OBJECT} to",
    "After {A} and {B} arrived at the {PLACE}, {S} handed the {OBJECT} to",
    "While {A} and {B} were at the {PLACE}, {S} passed the {OBJECT} to",
    "Then {A} and {B} walked into the {PLACE}. {S} offered the {OBJECT} to",
    "When {A} and {B} got to the {PLACE}, {S} showed the {OBJECT} to",
    "Once {A} and {B} had reached the {PLACE}, {S} brought the {OBJECT} to",
    "As {A} and {B} left the {PLACE}, {S} lent a new {OBJECT} to",
    "Later {A} and {B} ate at the {PLACE}. {S} sent the {OBJECT} to",
    "The day {A} and {B} visited the {PLACE}, {S} threw the {OBJECT} to",
    "Since {A} and {B} worked at the {PLACE}, {S} gave the {OBJECT} to",
    "When {A} and {B} returned from the {PLACE}, {S} handed the {OBJECT} to",
    "Yesterday {A} and {B} met at the {PLACE}. {S} sold the {OBJECT} to",
)

NAMES: tuple[str, ...] = (
    "Mary", "John", "Alice", "Bob", "Tom", "James", "Sarah", "Michael", "David", "Emma", "Anna", "Daniel",
    "Laura", "Kevin", "Rachel", "Paul", "Lisa", "Mark", "Jessica", "Peter", "Susan", "Robert", "Linda",
    "George", "Kate", "Brian", "Amy", "Eric", "Helen", "Jack", "Lucy", "Henry", "Grace", "Adam", "Claire",
    "Sam", "Jane", "Steven", "Nancy", "Frank", "Julia", "Andrew", "Rose", "Chris", "Sophie", "Ben", "Emily",
    "Ryan", "Olivia", "Luke", "Karen", "Tim", "Alex", "Anne", "Jason", "Victoria", "Scott", "Kelly",
)

PLACES: tuple[str, ...] = (
    "store", "park", "school", "beach", "office", "restaurant", "hospital", "station", "garden", "library",
    "market", "house", "museum", "zoo", "church", "farm", "bank", "hotel", "airport",
)

OBJECTS: tuple[str, ...] = (
    "ball", "book", "drink", "key", "letter", "bag", "ring", "pen", "gift", "phone", "apple", "hat", "card",
    "box", "cake", "bottle", "ticket", "basket", "necklace", "flower",
)


@dataclass(frozen=True)
class IOIDataset:
    """IOI prompts of equal token length, their corrupted counterparts, answers and word positions.

    Attributes:
        prompts / corrupt_prompts: n texts; the corrupted one has the IO name in place of S2.
        clean_tokens / corrupt_tokens: int64 [n, pos] (BOS only where the tokenizer adds one).
        answer_tokens: int64 [n, 2] token ids of (" IO", " S") (correct, wrong for the clean prompt).
        io_names / s_names: the names, without the leading space.
        templates: the template each prompt came from.
        orders: "ABBA" (IO named first) or "BABA" (S named first), per prompt.
        word_idx: "IO", "S1", "S2", "end" -> int64 [n] token positions (end: the last token, whose
            next-token prediction is scored).
        pos_labels: str tokens of prompt 0.
    """

    prompts: list[str]
    corrupt_prompts: list[str]
    clean_tokens: Tensor
    corrupt_tokens: Tensor
    answer_tokens: Tensor
    io_names: list[str]
    s_names: list[str]
    templates: list[str]
    orders: list[str]
    word_idx: dict[str, Tensor]
    pos_labels: list[str]

    def __len__(self) -> int:
        return len(self.prompts)


def _single_tokens(tok, words) -> list[str]:
    return [w for w in words if len(tok(" " + w, add_special_tokens=False)["input_ids"]) == 1]


def _fill(template: str, io: str, s: str, order: str, place: str, obj: str, s2: str | None = None) -> str:
    a, b = (io, s) if order == "ABBA" else (s, io)
    return template.format(A=a, B=b, S=s if s2 is None else s2, PLACE=place, OBJECT=obj)


def make_ioi_dataset(model, n_prompts: int = 60, *, seed: int = 0) -> IOIDataset:
    """Build ``n_prompts`` IOI prompts (half ABBA, half BABA) for this model's tokenizer.

    Names, places and objects are kept only where they are one token with their leading space, so every
    prompt from one template has the same token length. Templates whose length differs from the
    length shared by most templates are skipped. Deterministic given ``seed``.

    Args:
        model: a HookedModel with a tokenizer.
        n_prompts: number of prompts (>= 1).
        seed: seed of a private RNG (the global one is untouched).

    Returns:
        IOIDataset; ``clean_tokens`` and ``corrupt_tokens`` differ only at the S2 position.

    Raises:
        InputError: no tokenizer; n_prompts < 1; fewer than two single-token names for this tokenizer.

    References:
        Wang et al. 2022, "Interpretability in the Wild: a Circuit for Indirect Object Identification in
        GPT-2 small", section 2 (the task, ABBA/BABA templates, the logit-difference metric).
    """
    tok = model._need_tokenizer()
    if n_prompts < 1:
        raise InputError(f"n_prompts must be >= 1, got {n_prompts}.")
    names = _single_tokens(tok, NAMES)
    places = _single_tokens(tok, PLACES) or ["store"]
    objects = _single_tokens(tok, OBJECTS) or ["ball"]
    if len(names) < 2:
        raise InputError(
            f"only {len(names)} of mechscope's IOI names are single tokens for {model.cfg.name}'s tokenizer; the "
            "IOI dataset needs names that are one token (with their leading space)."
        )

    def n_tokens(text: str) -> int:
        return model.to_tokens(text).shape[1]

    probe = {t: n_tokens(_fill(t, names[0], names[1], "ABBA", places[0], objects[0])) for t in TEMPLATES}
    lengths = [probe[t] for t in TEMPLATES]
    target = max(lengths, key=lambda n: (lengths.count(n), -lengths.index(n)))
    templates = [t for t in TEMPLATES if probe[t] == target]

    rng = random.Random(seed)
    rows: list[tuple[str, str, str, str, str, str]] = []
    attempts = 0
    while len(rows) < n_prompts:
        attempts += 1
        if attempts > 100 * n_prompts:
            raise InputError(
                f"could not build {n_prompts} IOI prompts of {target} tokens for {model.cfg.name}'s tokenizer "
                f"(built {len(rows)}); use fewer prompts."
            )
        order = "ABBA" if len(rows) % 2 == 0 else "BABA"
        template = rng.choice(templates)
        io, s = rng.sample(names, 2)
        place, obj = rng.choice(places), rng.choice(objects)
        clean = _fill(template, io, s, order, place, obj)
        corrupt = _fill(template, io, s, order, place, obj, s2=io)
        if n_tokens(clean) != target or n_tokens(corrupt) != target:
            continue  # a tokenizer that merges a name with its neighbours
        rows.append((clean, corrupt, io, s, template, order))

    prompts = [r[0] for r in rows]
    corrupt_prompts = [r[1] for r in rows]
    clean_tokens = model.to_tokens(prompts)
    corrupt_tokens = model.to_tokens(corrupt_prompts)
    io_ids = [tok(" " + r[2], add_special_tokens=False)["input_ids"][0] for r in rows]
    s_ids = [tok(" " + r[3], add_special_tokens=False)["input_ids"][0] for r in rows]
    idx: dict[str, list[int]] = {"IO": [], "S1": [], "S2": [], "end": []}
    for i, (io_id, s_id) in enumerate(zip(io_ids, s_ids)):
        row = clean_tokens[i].tolist()
        io_pos = [p for p, t in enumerate(row) if t == io_id]
        s_pos = [p for p, t in enumerate(row) if t == s_id]
        if len(io_pos) != 1 or len(s_pos) != 2:  # pragma: no cover - guarded by single-token names
            raise InputError(f"IOI prompt {prompts[i]!r}: expected IO once and S twice as tokens; got {io_pos}, {s_pos}.")
        idx["IO"].append(io_pos[0])
        idx["S1"].append(s_pos[0])
        idx["S2"].append(s_pos[1])
        idx["end"].append(len(row) - 1)
    return IOIDataset(
        prompts=prompts,
        corrupt_prompts=corrupt_prompts,
        clean_tokens=clean_tokens,
        corrupt_tokens=corrupt_tokens,
        answer_tokens=torch.tensor([io_ids, s_ids], dtype=torch.long).T.contiguous().to(clean_tokens.device),
        io_names=[r[2] for r in rows],
        s_names=[r[3] for r in rows],
        templates=[r[4] for r in rows],
        orders=[r[5] for r in rows],
        word_idx={k: torch.tensor(v, dtype=torch.long) for k, v in idx.items()},
        pos_labels=model.to_str_tokens(clean_tokens[0]),
    )


__all__ = ["IOIDataset", "make_ioi_dataset", "TEMPLATES", "NAMES"]
