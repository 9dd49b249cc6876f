"""The factual-recall task: well-known facts whose subject is swapped for another of the same relation.

The facts (:data:`FACTS`) are mechscope's own list: 101 were written, and the 83 kept are those whose object
is one token and is SmolLM2-135M-Instruct's top next token in the prompt :func:`factual_recall_task` builds
(measured when written; the 18 dropped include Canberra, Warsaw, Bern, and a partial answer, " Buenos").
"""

from __future__ import annotations

import random

import torch

from mechscope.core.errors import InputError
from mechscope.data.task import Task
from mechscope.data.task_builtins import _check_n, _ids, _most_common_length, _one_token, _too_few

#: Relation -> a sentence whose next token is the object; ``{}`` is the subject.
RELATIONS: dict[str, str] = {
    "capital": "The capital of {} is the city of",
    "landmark": "{} is located in the city of",
    "language": "The official language of {} is",
    "born": "{} was born in the country of",
    "company": "{} is a company from the country of",
}

#: Neutral openings of increasing token length (2 to 7 tokens for SmolLM2), so facts whose subjects and
#: sentences differ in token length can share one prompt length.
FACT_OPENINGS: tuple[str, ...] = ("Fact: ", "A fact: ", "A known fact: ", "Here is a fact: ",
                                  "Here is a known fact: ", "Here is a fact everyone knows: ")

#: (relation, subject, object): well-known facts, mechscope's own list, kept to those SmolLM2-135M-Instruct
#: gets right (its top next token) in the prompts factual_recall_task builds.
FACTS: tuple[tuple[str, str, str], ...] = (
    ("capital", "France", "Paris"), ("capital", "Germany", "Berlin"), ("capital", "Italy", "Rome"),
    ("capital", "Spain", "Madrid"), ("capital", "Japan", "Tokyo"), ("capital", "Russia", "Moscow"),
    ("capital", "Egypt", "Cairo"), ("capital", "Greece", "Athens"), ("capital", "Canada", "Ottawa"),
    ("capital", "Kenya", "Nairobi"), ("capital", "Norway", "Oslo"), ("capital", "Sweden", "Stockholm"),
    ("capital", "Austria", "Vienna"), ("capital", "Portugal", "Lisbon"), ("capital", "Ireland", "Dublin"),
    ("capital", "Peru", "Lima"), ("capital", "China", "Beijing"), ("capital", "England", "London"),
    ("capital", "Finland", "Helsinki"), ("capital", "Denmark", "Copenhagen"), ("capital", "Hungary", "Budapest"),
    ("capital", "Cuba", "Havana"), ("capital", "Chile", "Santiago"), ("capital", "Iran", "Tehran"),
    ("capital", "Belgium", "Brussels"), ("capital", "Scotland", "Edinburgh"), ("capital", "Wales", "Cardiff"),
    ("capital", "Syria", "Damascus"), ("capital", "Netherlands", "Amsterdam"), ("capital", "Israel", "Jerusalem"),
    ("landmark", "The Eiffel Tower", "Paris"), ("landmark", "The Colosseum", "Rome"),
    ("landmark", "The Kremlin", "Moscow"), ("landmark", "The Acropolis", "Athens"),
    ("landmark", "The Louvre", "Paris"), ("landmark", "The Vatican", "Rome"),
    ("landmark", "The Tower of London", "London"), ("landmark", "The Parthenon", "Athens"),
    ("landmark", "The Rialto Bridge", "Venice"), ("landmark", "Hagia Sophia", "Istanbul"),
    ("landmark", "The Prado Museum", "Madrid"), ("landmark", "The Reichstag", "Berlin"),
    ("landmark", "The Pantheon", "Rome"), ("landmark", "The Sydney Opera House", "Sydney"),
    ("landmark", "Big Ben", "London"), ("landmark", "The Forbidden City", "Beijing"),
    ("language", "France", "French"), ("language", "Germany", "German"), ("language", "Italy", "Italian"),
    ("language", "Spain", "Spanish"), ("language", "Russia", "Russian"), ("language", "Poland", "Polish"),
    ("language", "Turkey", "Turkish"), ("language", "Egypt", "Arabic"), ("language", "Israel", "Hebrew"),
    ("language", "Netherlands", "Dutch"), ("language", "Thailand", "Thai"), ("language", "Vietnam", "Vietnamese"),
    ("language", "Austria", "German"), ("language", "Japan", "Japanese"), ("language", "Greece", "Greek"),
    ("language", "Brazil", "Portuguese"), ("born", "Picasso", "Spain"), ("born", "Gandhi", "India"),
    ("born", "Shakespeare", "England"), ("born", "Tolstoy", "Russia"), ("born", "Dante", "Italy"),
    ("born", "Confucius", "China"), ("born", "Napoleon", "France"), ("born", "Cervantes", "Spain"),
    ("born", "Michelangelo", "Italy"), ("born", "Voltaire", "France"), ("born", "Chopin", "Poland"),
    ("born", "Plato", "Greece"), ("company", "Toyota", "Japan"), ("company", "Volkswagen", "Germany"),
    ("company", "Ferrari", "Italy"), ("company", "BMW", "Germany"), ("company", "Fiat", "Italy"),
    ("company", "Peugeot", "France"), ("company", "Nintendo", "Japan"), ("company", "Huawei", "China"),
    ("company", "Sony", "Japan"),
)


def _fact_prompts(model, facts) -> tuple[int, list[tuple[str, str, str, str]]]:
    """(target length, [(relation, subject, object, opening)]) for the facts that reach the target length.

    Each fact takes the first opening that brings its prompt to the length most facts can reach.
    """
    reach = []
    for rel, subj, _ in facts:
        lengths = {}
        for opening in FACT_OPENINGS:
            lengths.setdefault(model.to_tokens(opening + RELATIONS[rel].format(subj)).shape[1], opening)
        reach.append(lengths)
    target = _most_common_length([L for r in reach for L in r])
    return target, [(*f, r[target]) for f, r in zip(facts, reach) if target in r]


def factual_recall_task(model, n: int | None = None, seed: int = 0) -> Task:
    """Factual recall by subject swap: "The capital of France is the city of" -> " Paris".

    Facts come from :data:`FACTS` (five relations: capitals, landmarks' cities, official languages,
    birth countries, companies' countries), kept where the object is one token with its leading space.
    The corrupted prompt puts another subject of the same relation in the same sentence, one whose
    prompt has the same token length and whose object differs ("The capital of Spain is the city of");
    the wrong token is that subject's object (" Madrid"). A neutral opening (:data:`FACT_OPENINGS`)
    brings every prompt to one token length. A fact with no such partner is skipped (6 of the 83 for
    SmolLM2, so n=None gives 77 prompts). Groups are "relation:subject" of the clean prompt;
    positions "subject_last" (the subject's last token, where Meng et al. find the fact recalled) and
    "end".

    Args:
        model: a HookedModel with a tokenizer.
        n: number of prompts; None: one per usable fact. More than the facts cycles through them again
            with other corrupted subjects.
        seed: seed of a private RNG (the order of facts and the corrupted subjects).

    Returns:
        Task named "factual_recall", metric logit difference.

    Raises:
        InputError: n < 1, or more prompts than distinct (fact, other subject) pairs.

    References:
        Meng et al. 2022, "Locating and Editing Factual Associations in GPT", section 2 (subject
        corruption, the last subject token); Geva et al. 2023, "Dissecting Recall of Factual Associations
        in Auto-Regressive Language Models".
    """
    tok = model._need_tokenizer()
    objects = set(_one_token(tok, {f[2] for f in FACTS}))
    facts = [f for f in FACTS if f[2] in objects]
    if not facts:
        raise InputError(f"factual_recall_task: no fact's object is one token for {model.cfg.name}'s tokenizer.")
    target, usable = _fact_prompts(model, facts)
    pairs: dict[int, list[int]] = {}
    for i, (rel, _, obj, opening) in enumerate(usable):
        pairs[i] = [j for j, g in enumerate(usable) if g[0] == rel and g[2] != obj
                    and model.to_tokens(opening + RELATIONS[rel].format(g[1])).shape[1] == target]
    usable_idx = [i for i in pairs if pairs[i]]
    if not usable_idx:
        raise InputError(f"factual_recall_task: no fact has a partner of the same relation and prompt length for "
                         f"{model.cfg.name}'s tokenizer.")
    n = len(usable_idx) if n is None else n
    _check_n(n, "factual_recall_task")
    rng = random.Random(seed)
    chosen: list[tuple[int, int]] = []
    left = {i: rng.sample(pairs[i], len(pairs[i])) for i in usable_idx}
    while len(chosen) < n and any(left.values()):
        order = [i for i in usable_idx if left[i]]
        rng.shuffle(order)
        chosen += [(i, left[i].pop()) for i in order[:n - len(chosen)]]
    if len(chosen) < n:
        raise _too_few("factual_recall_task", model, len(chosen), n, "distinct pairs of facts")
    clean, corrupt, groups, subject_last = [], [], [], []
    for i, j in chosen:
        rel, subj, _, opening = usable[i]
        before = RELATIONS[rel].split("{}")[0]
        clean.append(opening + RELATIONS[rel].format(subj))
        corrupt.append(opening + RELATIONS[rel].format(usable[j][1]))
        groups.append(f"{rel}:{subj}")
        subject_last.append(model.to_tokens(opening + before + subj).shape[1] - 1)
    obj_id = [_ids(tok, " " + f[2])[0] for f in usable]
    return Task(
        name="factual_recall", clean_tokens=model.to_tokens(clean), corrupt_tokens=model.to_tokens(corrupt),
        answer=torch.tensor([obj_id[i] for i, _ in chosen]), wrong=torch.tensor([obj_id[j] for _, j in chosen]),
        clean_text=tuple(clean), corrupt_text=tuple(corrupt), groups=tuple(groups),
        positions={"subject_last": torch.tensor(subject_last), "end": torch.full((n,), target - 1, dtype=torch.long)},
    )


__all__ = ["factual_recall_task", "FACTS", "RELATIONS", "FACT_OPENINGS"]
