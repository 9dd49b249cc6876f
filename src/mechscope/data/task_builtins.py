"""The built-in circuit tasks: IOI, induction, greater-than and docstring (factual recall is in
:mod:`mechscope.data.task_facts`).

Each builder takes a HookedModel (for its tokenizer), a number of prompts and a seed, and returns a
:class:`~mechscope.data.task.Task` whose prompts all share one token length (prompts that tokenize to
another length are skipped), so a task runs as one batch. Builders are deterministic given the seed.
Every sentence, noun, fact and word list here is mechscope's own writing.

What SmolLM2-135M-Instruct does on each is measured by ``tests/real/test_tasks_real.py``; run
:func:`~mechscope.data.task.check_task` for another model.
"""

from __future__ import annotations

import random
from collections import Counter

import torch

from mechscope.core.errors import InputError
from mechscope.data.ioi import NAMES, make_ioi_dataset
from mechscope.data.random_tokens import bos_id, ordinary_token_ids
from mechscope.data.task import Task


def _ids(tok, word: str) -> list[int]:
    return tok(word, add_special_tokens=False)["input_ids"]


def _one_token(tok, words) -> list[str]:
    """The words that are one known token (not the unknown token) with their leading space."""
    return [w for w in words if len(ids := _ids(tok, " " + w)) == 1 and ids[0] != tok.unk_token_id]


def _most_common_length(lengths) -> int:
    """The length most items share (ties: the shortest)."""
    counts = Counter(lengths)
    return max(counts, key=lambda L: (counts[L], -L))


def _check_n(n: int, name: str) -> None:
    if n < 1:
        raise InputError(f"{name}: n must be >= 1 (number of prompts), got {n}.")


def _too_few(name: str, model, built: int, n: int, why: str) -> InputError:
    return InputError(
        f"{name}: could build only {built} prompts of one token length for {model.cfg.name}'s tokenizer, "
        f"asked for {n} ({why}); ask for fewer prompts (n={built}).")


# -- IOI ---------------------------------------------------------------------------------------------
def ioi_task(model, n: int = 64, seed: int = 0) -> Task:
    """Indirect-object identification: "When Mary and John went to the store, John gave the ball to" -> " Mary".

    Built from :func:`mechscope.data.ioi.make_ioi_dataset`: answer " IO", wrong " S"; the corrupted
    prompt names IO again in place of S2, which makes " S" the natural answer; groups are the templates;
    positions "IO", "S1", "S2", "end". Metric: logit difference.

    Args:
        model: a HookedModel with a tokenizer.
        n: number of prompts (half ABBA, half BABA).
        seed: seed of a private RNG.

    Returns:
        Task named "ioi".

    Raises:
        InputError: n < 1; no tokenizer; too few single-token names.

    References:
        Wang et al. 2022, "Interpretability in the Wild: a Circuit for Indirect Object Identification in
        GPT-2 small", section 2.
    """
    _check_n(n, "ioi_task")
    if len(_one_token(model._need_tokenizer(), NAMES)) < 2:
        raise InputError(f"ioi_task: fewer than two of mechscope's IOI names are known single tokens for "
                         f"{model.cfg.name}'s tokenizer; IOI needs names that are one token (with their leading space).")
    ds = make_ioi_dataset(model, n, seed=seed)
    return Task(
        name="ioi", clean_tokens=ds.clean_tokens, corrupt_tokens=ds.corrupt_tokens,
        answer=ds.answer_tokens[:, 0].contiguous(), wrong=ds.answer_tokens[:, 1].contiguous(),
        clean_text=tuple(ds.prompts), corrupt_text=tuple(ds.corrupt_prompts), groups=tuple(ds.templates),
        positions=dict(ds.word_idx),
    )


# -- induction ---------------------------------------------------------------------------------------
def induction_task(model, n: int = 64, seed: int = 0, seq_len: int = 20) -> Task:
    """Induction on repeated random tokens: ``[BOS] r_0 .. r_{L-1} r_0 .. r_{L-2}`` -> ``r_{L-1}``.

    The clean prompt is a random sequence r of ``seq_len`` distinct tokens followed by r again without
    its last token; the answer is that last token, which only copying from the first copy can predict.
    The corrupted prompt replaces the first copy by other random tokens r' (none of them in r), so
    nothing earlier in the prompt predicts the answer. The wrong token is ``r'_{L-1}``, the token at the
    answer's place in the corrupted first copy: what a head that copies by relative position (rather
    than by matching the current token) would predict on the corrupted prompt; on the clean prompt it
    does not occur. BOS comes first when the model has one. No groups (each prompt is its own draw); no
    texts (random ids do not survive decoding and re-encoding).

    Positions: "end" (the last token, r_{L-2}), "first_current" (r_{L-2} in the first copy) and
    "first_answer" (r_{L-1} in the first copy, the token an induction head attends to).

    Args:
        model: a HookedModel (a tokenizer is optional).
        n: number of prompts.
        seed: seed of a private generator.
        seq_len: L, the length of the random sequence (the prompt has 2L tokens with BOS, 2L - 1 without).

    Returns:
        Task named "induction", metric logit difference.

    Raises:
        InputError: n < 1; seq_len < 3; a vocabulary with fewer than 2 * seq_len ordinary tokens; a prompt
            longer than the model's context.

    References:
        Olsson et al. 2022, "In-context Learning and Induction Heads", section "Per-head metrics" (repeated
        random tokens).
    """
    _check_n(n, "induction_task")
    if seq_len < 3:
        raise InputError(f"induction_task: seq_len must be >= 3, got {seq_len}.")
    pool = ordinary_token_ids(model)
    if len(pool) < 2 * seq_len:
        raise InputError(
            f"induction_task: {model.cfg.name} has {len(pool)} ordinary tokens, fewer than the 2 * seq_len = "
            f"{2 * seq_len} distinct tokens a prompt draws; use a smaller seq_len.")
    g = torch.Generator().manual_seed(seed)
    draws = torch.stack([pool[torch.randperm(len(pool), generator=g)[:2 * seq_len]] for _ in range(n)])
    r, r2 = draws[:, :seq_len], draws[:, seq_len:]
    bos = bos_id(model)
    head = [torch.full((n, 1), bos, dtype=torch.long)] if bos is not None else []
    clean = torch.cat([*head, r, r[:, :-1]], dim=1)
    corrupt = torch.cat([*head, r2, r[:, :-1]], dim=1)
    model._check_length(clean)
    off = len(head)
    at = {"end": clean.shape[1] - 1, "first_current": off + seq_len - 2, "first_answer": off + seq_len - 1}
    return Task(
        name="induction", clean_tokens=clean.to(model.device), corrupt_tokens=corrupt.to(model.device),
        answer=r[:, -1].contiguous(), wrong=r2[:, -1].contiguous(),
        positions={k: torch.full((n,), v, dtype=torch.long) for k, v in at.items()},
    )


# -- greater-than ------------------------------------------------------------------------------------
#: Events that last years; mechscope's own list.
EVENT_NOUNS: tuple[str, ...] = (
    "war", "drought", "siege", "famine", "voyage", "expedition", "festival", "plague", "strike", "rebellion",
    "blockade", "reign", "occupation", "truce", "boycott", "exhibition", "trial", "journey", "feud", "embargo",
    "migration", "revolt", "campaign", "excavation", "monopoly", "partnership", "alliance", "experiment",
    "restoration", "mission", "epidemic", "conflict", "dispute", "uprising", "flood", "survey", "friendship",
    "marriage", "project", "crisis", "dynasty", "boom", "recession", "treaty", "construction", "tour",
    "exile", "apprenticeship", "quarrel", "scandal",
)

#: Sentences ending where the next token starts the end year's last two digits; ``{c}`` is the century.
GREATER_THAN_TEMPLATES: tuple[str, ...] = (
    "The {noun} lasted from the year {c}{yy} to the year {c}",
    "The {noun} went on from the year {c}{yy} until the year {c}",
    "The {noun} ran from the year {c}{yy} to the year {c}",
)


def _year_tokens(model, prompt: str) -> tuple[str, list[int]]:
    """How the tokenizer continues ``prompt`` (ending in the century) with two more year digits.

    Returns ("pair", ids of "00".."99") when each two-digit ending is one token (GPT-2), or ("digit", ids of
    "0".."9") when each digit is its own token (SmolLM2, Llama 3 and others split numbers into digits).

    Raises:
        InputError: any other tokenization.
    """
    base = model.to_tokens(prompt)[0].tolist()
    new = []
    for xx in range(100):
        ids = model.to_tokens(prompt + f"{xx:02d}")[0].tolist()
        new.append(ids[len(base):] if ids[:len(base)] == base else None)
    tok = model._need_tokenizer()
    if all(x is not None and len(x) == 1 for x in new) and len({x[0] for x in new}) == 100:
        return "pair", [x[0] for x in new]
    digits = [_ids(tok, str(d)) for d in range(10)]
    if all(len(d) == 1 for d in digits) and all(
        x is not None and x == [digits[xx // 10][0], digits[xx % 10][0]] for xx, x in enumerate(new)
    ):
        return "digit", [d[0] for d in digits]
    raise InputError(
        f"greater_than_task: {model.cfg.name}'s tokenizer neither keeps a year's last two digits as one token "
        "nor splits them into single digits (e.g. '1732' as '17' '32' or '1' '7' '3' '2'), so the sets of "
        "years after and before the start year are not sets of next tokens; use another task.")


def greater_than_task(model, n: int = 64, seed: int = 0, century: int = 17) -> Task:
    """Greater-than: "The war lasted from the year 1732 to the year 17" -> an end year after 1732.

    The metric is ``prob_mass``: probability on next tokens that make the end year later than the start
    year minus probability on those that make it earlier or equal. What the next token is depends on the
    tokenizer, so the sets do too:

    - a tokenizer that keeps two-digit endings as one token (GPT-2; Hanna et al.'s setting): the next
      token is the end year's "YY"; answer set = YY' > YY, wrong set = YY' <= YY; start years YY 02..98;
    - a tokenizer that splits numbers into digits (SmolLM2): the next token is the end year's tens
      digit t; answer set = t > d (the start year's tens digit), wrong set = t < d. The digit t = d is in
      neither set: the units digit, one token later, decides whether that year is later. So the metric is
      P(a later decade) - P(an earlier decade); start years 10..89 (d from 1 to 8, so both sets exist).

    The single-token answer and wrong are the nearest tokens on either side (YY+1 / YY-1, or d+1 / d-1).
    The corrupted prompt starts in year "01" (Hanna et al.'s 01-00 corruption), which makes every later
    end year possible. Groups are the nouns.

    Args:
        model: a HookedModel with a tokenizer.
        n: number of prompts (distinct noun, template and start year).
        seed: seed of a private RNG.
        century: the first two digits of both years (10..99).

    Returns:
        Task named "greater_than".

    Raises:
        InputError: n < 1 or more prompts than distinct combinations; a century outside 10..99; a
            tokenizer that splits years otherwise.

    References:
        Hanna, Liu & Variengien 2023, "How does GPT-2 compute greater-than?: Interpreting mathematical
        abilities in a pre-trained language model", section 2 (task, probability difference, 01-00
        corruption).
    """
    _check_n(n, "greater_than_task")
    if not 10 <= century <= 99:
        raise InputError(f"greater_than_task: century must be two digits (10..99), got {century}.")
    c = str(century)
    nouns = _one_token(model._need_tokenizer(), EVENT_NOUNS)
    if not nouns:
        raise InputError(f"greater_than_task: none of the event nouns is one token for {model.cfg.name}'s tokenizer.")
    mode, cont = _year_tokens(model, GREATER_THAN_TEMPLATES[0].format(noun=nouns[0], c=c, yy="32"))
    years = range(2, 99) if mode == "pair" else range(10, 90)
    length = {t: model.to_tokens(t.format(noun=nouns[0], c=c, yy="32")).shape[1] for t in GREATER_THAN_TEMPLATES}
    target = _most_common_length(length.values())
    combos = [(noun, t, yy) for noun in nouns for t in GREATER_THAN_TEMPLATES if length[t] == target for yy in years]
    rng = random.Random(seed)
    rng.shuffle(combos)
    rows = []
    for noun, t, yy in combos:
        if len(rows) == n:
            break
        clean, corrupt = t.format(noun=noun, c=c, yy=f"{yy:02d}"), t.format(noun=noun, c=c, yy="01")
        if model.to_tokens(clean).shape[1] == target == model.to_tokens(corrupt).shape[1]:
            rows.append((noun, clean, corrupt, yy))
    if len(rows) < n:
        raise _too_few("greater_than_task", model, len(rows), n, f"{len(nouns)} nouns x templates x start years")
    key = (lambda yy: yy) if mode == "pair" else (lambda yy: yy // 10)
    answer_sets = tuple(tuple(cont[k] for k in range(len(cont)) if k > key(yy)) for *_, yy in rows)
    if mode == "pair":
        wrong_sets = tuple(tuple(cont[k] for k in range(len(cont)) if k <= key(yy)) for *_, yy in rows)
    else:
        wrong_sets = tuple(tuple(cont[k] for k in range(len(cont)) if k < key(yy)) for *_, yy in rows)
    return Task(
        name="greater_than", clean_tokens=model.to_tokens([r[1] for r in rows]),
        corrupt_tokens=model.to_tokens([r[2] for r in rows]),
        answer=torch.tensor([cont[key(r[3]) + 1] for r in rows]), wrong=torch.tensor([cont[key(r[3]) - 1] for r in rows]),
        metric="prob_mass", clean_text=tuple(r[1] for r in rows), corrupt_text=tuple(r[2] for r in rows),
        groups=tuple(r[0] for r in rows), answer_sets=answer_sets, wrong_sets=wrong_sets,
    )


# -- docstring ---------------------------------------------------------------------------------------
#: Parameter names, descriptions words and function names of the docstring task; mechscope's own lists.
PARAM_NAMES: tuple[str, ...] = (
    "load", "size", "files", "last", "user", "name", "data", "path", "mode", "key", "value", "text", "line",
    "count", "index", "item", "node", "port", "host", "token", "color", "shape", "width", "height", "depth",
    "speed", "price", "rate", "score", "level", "state", "flag", "limit", "offset", "start", "stop", "step",
    "table", "field", "query", "result", "error", "image", "label", "title", "source", "target", "parent",
    "child", "order", "group", "point",
)
DOC_WORDS: tuple[str, ...] = (
    "oil", "column", "piece", "crime", "population", "unit", "dark", "river", "stone", "glass", "paper",
    "music", "bread", "winter", "summer", "market", "garden", "silver", "cotton", "horse", "cloud", "forest",
    "engine", "window", "letter", "island", "mountain", "village", "candle", "mirror",
)
FUNCTION_NAMES: tuple[str, ...] = ("port", "run", "check", "build", "parse", "update", "render", "apply",
                                   "merge", "fetch", "load", "scan", "sort", "draw", "send")
DOCSTRING_TEMPLATE = ('def {fn}(self, {a}, {b}, {c}, {d}):\n    """{w0} {w1} {w2}\n\n'
                      '    :param {a}: {w3} {w4}\n    :param {b}: {w5} {w6}\n    :param')


def docstring_task(model, n: int = 64, seed: int = 0) -> Task:
    """Docstring completion: after ``:param a:`` and ``:param b:``, the next ``:param`` is the signature's c.

    The clean prompt is a method ``def fn(self, a, b, c, d):`` whose docstring documents a and b and
    then opens ``:param``; the answer is " c", the next parameter of the signature. The corrupted prompt
    swaps c and d in the signature (``def fn(self, a, b, d, c):``), so the next parameter is " d", which
    is the wrong token. Both are in both prompts, so only the signature's order tells them apart. Names,
    description words and function names are drawn without repeats within a prompt. No groups.

    SmolLM2-135M-Instruct solves it (see ``tests/real/test_tasks_real.py``); :func:`check_task` says
    whether another model does.

    Positions: "def_a" .. "def_d" (the names in the signature), "doc_a", "doc_b" (in the docstring), "end".

    Args:
        model: a HookedModel with a tokenizer.
        n: number of prompts.
        seed: seed of a private RNG.

    Returns:
        Task named "docstring", metric logit difference.

    Raises:
        InputError: n < 1; fewer than 4 single-token names for this tokenizer; too few prompts of one length.

    References:
        Heimersheim & Janiak 2023, "A circuit for Python docstrings in a 4-layer attention-only transformer"
        (the task, the corruptions of the signature's names).
    """
    _check_n(n, "docstring_task")
    tok = model._need_tokenizer()
    names = _one_token(tok, PARAM_NAMES)
    words = [w for w in _one_token(tok, DOC_WORDS) if w not in names]
    if len(names) < 4 or len(words) < 5:
        raise InputError(f"docstring_task: {model.cfg.name}'s tokenizer keeps only {len(names)} parameter names and "
                         f"{len(words)} description words as single tokens (needs 4 and 5).")
    rng = random.Random(seed)
    rows, seen = [], set()
    for _ in range(50 * n):  # distinct candidates, more than n: those of another token length are dropped
        if len(rows) == 2 * n + 16:
            break
        a, b, c, d = rng.sample(names, 4)
        fill = dict(fn=rng.choice([f for f in FUNCTION_NAMES if f not in (a, b, c, d)]), a=a, b=b, c=c, d=d,
                    **{f"w{k}": w for k, w in enumerate(rng.sample(words, 7))})
        clean = DOCSTRING_TEMPLATE.format(**fill)
        if clean not in seen:
            seen.add(clean)
            rows.append((clean, DOCSTRING_TEMPLATE.format(**{**fill, "c": d, "d": c}), (a, b, c, d)))
    lengths = [model.to_tokens(r[0]).shape[1] for r in rows]
    target = _most_common_length(lengths)
    rows = [r for r, L in zip(rows, lengths) if L == target and model.to_tokens(r[1]).shape[1] == target][:n]
    if len(rows) < n:
        raise _too_few("docstring_task", model, len(rows), n, f"prompts of {target} tokens")
    clean_tokens = model.to_tokens([r[0] for r in rows])
    positions: dict[str, list[int]] = {k: [] for k in ("def_a", "def_b", "def_c", "def_d", "doc_a", "doc_b", "end")}
    for row, (_, _, abcd) in zip(clean_tokens.tolist(), rows):
        for key, name in zip("abcd", abcd):
            where = [p for p, t in enumerate(row) if t == _ids(tok, " " + name)[0]]
            positions[f"def_{key}"].append(where[0])
            if key in "ab":
                positions[f"doc_{key}"].append(where[1])
        positions["end"].append(len(row) - 1)
    return Task(
        name="docstring", clean_tokens=clean_tokens, corrupt_tokens=model.to_tokens([r[1] for r in rows]),
        answer=torch.tensor([_ids(tok, " " + r[2][2])[0] for r in rows]),
        wrong=torch.tensor([_ids(tok, " " + r[2][3])[0] for r in rows]),
        clean_text=tuple(r[0] for r in rows), corrupt_text=tuple(r[1] for r in rows),
        positions={k: torch.tensor(v, dtype=torch.long) for k, v in positions.items()},
    )


__all__ = [
    "ioi_task", "induction_task", "greater_than_task", "docstring_task",
    "EVENT_NOUNS", "GREATER_THAN_TEMPLATES", "PARAM_NAMES", "DOC_WORDS", "FUNCTION_NAMES",
]
