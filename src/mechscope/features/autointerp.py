"""Auto-interpretation: a chat model labels a latent from its top-activating contexts, and the label is
scored by how well a chat model, given only the label, tells held-out contexts where the latent is
active from contexts where it is not (detection scoring).

A label never travels without its provenance: :class:`Explanation` records the explainer, the exact
prompt, the raw reply and the date; :class:`DetectionScore` records the scorer, its prompt template and
every prediction; :class:`ScoredLabel` ties the two. All of them round-trip through JSON.

Backends (:mod:`mechscope.features.chat`) implement :class:`ChatBackend` (``complete``), and optionally ``logprobs``, which the scorer
then uses instead of the text reply: :class:`LocalChatBackend` wraps any local ``transformers`` chat
model; :class:`OpenAIChatBackend` talks to an OpenAI-compatible server that the user configures (the only
network access in this module).

References:
    Bills et al. 2023, "Language models can explain neurons in language models" (explain, then
    simulate and score). Paulo et al. 2024, "Automatically Interpreting Millions of Features in Large
    Language Models", sec. 3 (detection scoring: balanced accuracy on active vs. non-active contexts,
    positives sampled across activation quantiles).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from collections.abc import Sequence

import torch

from mechscope.core.errors import BackendError, InputError  # noqa: F401 (BackendError re-exported)
from mechscope.features.chat import ChatBackend, LocalChatBackend, Messages, OpenAIChatBackend  # noqa: F401


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _from_dict(cls, d: dict, what: str):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise InputError(f"unknown keys {sorted(unknown)} in a {what} record; expected {sorted(names)}.")
    return cls(**d)


# -- data -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Example:
    """One context and the per-token activations of one latent on it.

    Args:
        tokens: the context's token strings (each token's span of the exact text, leading spaces included;
            empty for leading bytes of a split character, see :mod:`mechscope.data.detokenize`); a tuple.
        acts: the latent's activation at each token (the dictionary's units); same length as ``tokens``.

    Raises:
        InputError: lengths differ, empty context, or a non-finite activation.
    """

    tokens: Sequence[str]
    acts: Sequence[float | int]

    def __post_init__(self):
        object.__setattr__(self, "tokens", tuple(str(t) for t in self.tokens))
        object.__setattr__(self, "acts", tuple(float(a) for a in self.acts))
        if len(self.tokens) != len(self.acts) or not self.tokens:
            raise InputError(f"Example needs one activation per token and at least one token; got "
                             f"{len(self.tokens)} tokens and {len(self.acts)} activations.")
        if not all(math.isfinite(a) for a in self.acts):
            raise InputError("Example.acts holds NaN or inf; pass finite activations.")

    @property
    def max_act(self) -> float:
        return max(self.acts)

    @property
    def text(self) -> str:
        return "".join(self.tokens)

    def fingerprint(self) -> str:
        """A 16-hex-digit hash of the token strings (identifies the text, not the activations)."""
        return hashlib.sha1(json.dumps(self.tokens).encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        return {"tokens": list(self.tokens), "acts": list(self.acts)}

    @classmethod
    def from_dict(cls, d: dict) -> Example:
        return _from_dict(cls, d, "Example")


@dataclass(frozen=True)
class Explanation:
    """A label for a latent and where it came from.

    Args:
        label: a short phrase.
        explainer: the backend that wrote it (``LocalChatBackend.name`` / ``OpenAIChatBackend.name``).
        prompt: the exact chat messages sent, as JSON.
        date: ISO 8601 UTC time of the call.
        latent: the latent's index, if known.
        extra: JSON-serialisable details: the raw reply, generation settings, fingerprints of the
            examples shown (:func:`score_detection` refuses to score on those).
    """

    label: str
    explainer: str
    prompt: str
    date: str
    latent: int | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        try:
            json.dumps(self.extra)
        except TypeError as e:
            raise InputError(f"Explanation.extra must be JSON-serialisable: {e}") from None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Explanation:
        return _from_dict(cls, d, "Explanation")

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> Explanation:
        return cls.from_dict(json.loads(text))


@dataclass(frozen=True)
class Prediction:
    """The scorer's verdict on one held-out context.

    Args:
        truth: the latent is active in the context (a positive).
        predicted: the scorer said it is.
        evidence: ``logp(yes) - logp(no)`` in nats (log-probability scorers), else None.
        reply: the scorer's text reply (text scorers), else None.
    """

    truth: bool
    predicted: bool
    evidence: float | None = None
    reply: str | None = None


@dataclass(frozen=True)
class DetectionScore:
    """Detection score of one explanation.

    Args:
        balanced_accuracy: ``(tpr + tnr) / 2``, dimensionless in [0, 1]; 0.5 is chance (or a constant
            answer), 1 is perfect.
        tpr: fraction of positives predicted active. tnr: fraction of negatives predicted not active.
        n_pos, n_neg: counts of held-out positives and negatives.
        scorer: the backend's name. prompt: the scorer's prompt template. date: ISO 8601 UTC.
        predictions: one :class:`Prediction` per context, positives first.
        auroc: area under the ROC curve of ``evidence`` (threshold-free; log-probability scorers only).
        margin: the decision threshold on ``evidence`` in nats (log-probability scorers).
    """

    balanced_accuracy: float
    tpr: float
    tnr: float
    n_pos: int
    n_neg: int
    scorer: str
    prompt: str
    date: str
    predictions: Sequence[Prediction] = ()
    auroc: float | None = None
    margin: float | None = None

    def __post_init__(self):
        object.__setattr__(self, "predictions", tuple(self.predictions))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> DetectionScore:
        preds = tuple(_from_dict(Prediction, p, "Prediction") for p in d.get("predictions", ()))
        return _from_dict(cls, {**d, "predictions": preds}, "DetectionScore")

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> DetectionScore:
        return cls.from_dict(json.loads(text))


@dataclass(frozen=True)
class ScoredLabel:
    """An explanation with its detection score."""

    explanation: Explanation
    score: DetectionScore

    @property
    def label(self) -> str:
        return self.explanation.label

    def to_dict(self) -> dict:
        return {"explanation": self.explanation.to_dict(), "score": self.score.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> ScoredLabel:
        if set(d) != {"explanation", "score"}:
            raise InputError(f"a ScoredLabel record has keys 'explanation' and 'score'; got {sorted(d)}.")
        return cls(Explanation.from_dict(d["explanation"]), DetectionScore.from_dict(d["score"]))

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> ScoredLabel:
        return cls.from_dict(json.loads(text))


# -- explaining -------------------------------------------------------------------------------------------
SYSTEM = "You are a careful AI researcher who studies the neurons of language models."
DEFAULT_EXPLAIN_TEMPLATE = (
    "Here are texts in which one neuron of a language model is active. In each text, the tokens where "
    "the neuron is most active are marked <<like this>>.\n\n{examples}\n\n"
    "What do the marked tokens have in common? Answer with a short phrase of at most 8 words, and nothing else."
)
#: A worked example shown before the real question (one-shot; small explainers copy its form).
DEMO_EXAMPLES = (
    "Example 1 (activation 8.10): The Treaty<< of>> Paris was signed in 1783.\n"
    "Example 2 (activation 6.42): a cup<< of>> tea and a slice<< of>> cake\n"
    "Example 3 (activation 5.97): the history<< of>> Rome is long"
)
DEMO_LABEL = 'the word "of" after a noun'
DEFAULT_DETECTION_TEMPLATE = (
    "A neuron of a language model is active on: {label}.\n\nText: \"{text}\"\n\n"
    "Is this neuron active on some token of the text? Answer Yes or No."
)


def _window(ex: Example, n: int) -> tuple[Sequence[str], Sequence[float]]:
    """At most ``n`` tokens around the example's peak (3/4 of them before it)."""
    if len(ex.tokens) <= n:
        return ex.tokens, ex.acts
    peak = max(range(len(ex.acts)), key=ex.acts.__getitem__)
    start = min(max(peak - (3 * n) // 4, 0), len(ex.tokens) - n)
    return ex.tokens[start:start + n], ex.acts[start:start + n]


def _clean(s: str) -> str:
    return s.replace("\n", "\\n")


def format_example(ex: Example, *, context_tokens: int = 32, mark_fraction: float = 0.5) -> str:
    """One example as text, tokens with activation >= ``mark_fraction`` x the example's peak marked <<so>>.

    Runs of marked tokens share one marker; a token's leading spaces stay outside it. A token with an empty
    span (leading bytes of a character another token completes, see :mod:`mechscope.data.detokenize`) is
    merged into the next token, which takes the larger of their activations.
    """
    toks, acts = _window(ex, context_tokens)
    thr = max(ex.max_act * mark_fraction, 1e-12)
    merged, carry = [], None
    for t, a in zip(toks, acts):
        a = a if carry is None else max(a, carry)
        carry = None
        if t == "":
            carry = a
        else:
            merged.append((t, a))
    out, open_ = [], False
    for t, a in merged:
        t = _clean(t)
        marked = ex.max_act > 0 and a >= thr
        if marked and not open_:
            rest = t.lstrip()
            out.append(t[:len(t) - len(rest)] + "<<" + rest)
        else:
            out.append((">>" if open_ and not marked else "") + t)
        open_ = marked
    return "".join(out) + (">>" if open_ else "")


def parse_label(reply: str, *, max_chars: int = 80) -> str:
    """A label from a chat reply: its first non-empty line, without list markers, a leading
    ``Label:``/``Answer:``, quotes, markdown emphasis or a final period; cut at ``max_chars`` on a word
    boundary. Returns "" when nothing is left."""
    line = next((ln.strip() for ln in reply.splitlines() if ln.strip()), "")
    quotes = "*_`\"'“”‘’ "
    line = re.sub(r"^(?:[-*•]|\d+[.)])\s+", "", line).strip(quotes)
    line = re.sub(r"^(?:label|answer|explanation|phrase)\s*:\s*", "", line, flags=re.I)
    line = line.strip(quotes).rstrip(".").strip(quotes)
    if len(line) > max_chars:
        line = line[:max_chars].rsplit(" ", 1)[0].rstrip(",;:")
    return line


def explain(backend: ChatBackend, examples: Sequence[Example], *, latent: int | None = None,
            max_examples: int = 10, prompt_template: str = DEFAULT_EXPLAIN_TEMPLATE, context_tokens: int = 32,
            max_new_tokens: int = 24, temperature: float | int = 0.0, seed: int = 0, few_shot: bool = False
            ) -> Explanation:
    """Ask ``backend`` for a short label of a latent from its top-activating examples.

    The ``max_examples`` examples with the highest peak activation are shown (a window of
    ``context_tokens`` tokens around each peak, peak tokens marked ``<<...>>``, with the peak activation).

    Args:
        prompt_template: the user message; must contain ``{examples}``.
        few_shot: precede the question with one worked example (:data:`DEMO_EXAMPLES` -> :data:`DEMO_LABEL`).
            Off by default: small explainers (SmolLM2-135M, measured) copy the demo label verbatim.
        max_new_tokens, temperature, seed: generation settings (greedy and deterministic at temperature 0).

    Returns:
        :class:`Explanation` with the label, the exact prompt, the raw reply, and fingerprints of the
        examples shown (``extra["example_fingerprints"]``).

    Raises:
        InputError: no examples, an example where the latent is never active, a template without
            ``{examples}``.
        BackendError: the reply holds no label (the raw reply is in the message), or the backend failed.

    References:
        Bills et al. 2023, sec. 2.1 (explanation from top-activating records); Paulo et al. 2024, sec. 3.1.
    """
    if "{examples}" not in prompt_template:
        raise InputError("prompt_template must contain '{examples}', where the formatted examples go.")
    top = sorted(examples, key=lambda e: -e.max_act)[:max_examples]
    if not top or top[-1].max_act <= 0:
        raise InputError("explain needs examples where the latent is active (max act > 0); pass its top-"
                         "activating contexts, e.g. DetectionSet.train from sample_detection_set.")
    body = "\n".join(f"Example {i + 1} (activation {e.max_act:.2f}): {format_example(e, context_tokens=context_tokens)}"
                     for i, e in enumerate(top))
    messages = [{"role": "system", "content": SYSTEM}]
    if few_shot:
        messages += [{"role": "user", "content": prompt_template.replace("{examples}", DEMO_EXAMPLES)},
                     {"role": "assistant", "content": DEMO_LABEL}]
    messages.append({"role": "user", "content": prompt_template.replace("{examples}", body)})
    reply = backend.complete(messages, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    label = parse_label(reply)
    if not label:
        raise BackendError(f"{backend.name} replied with no usable label: {reply!r}; try another explainer model "
                           f"or prompt_template.")
    extra = {"reply": reply, "max_new_tokens": max_new_tokens, "temperature": temperature, "seed": seed,
             "n_examples": len(top), "example_fingerprints": [e.fingerprint() for e in top]}
    return Explanation(label, backend.name, json.dumps(messages), _now(), latent, extra)


# -- detection scoring ------------------------------------------------------------------------------------
def balanced_accuracy(truth: Sequence[bool], predicted: Sequence[bool]) -> tuple[float, float, float]:
    """``(balanced_accuracy, tpr, tnr)``, dimensionless; balanced accuracy = (TPR + TNR) / 2.

    Raises:
        InputError: lengths differ, or no positives or no negatives.
    """
    if len(truth) != len(predicted):
        raise InputError(f"{len(truth)} labels but {len(predicted)} predictions.")
    n_pos = sum(map(bool, truth))
    n_neg = len(truth) - n_pos
    if not n_pos or not n_neg:
        raise InputError(f"balanced accuracy needs positives and negatives; got {n_pos} and {n_neg}.")
    tpr = sum(bool(t) and bool(p) for t, p in zip(truth, predicted)) / n_pos
    tnr = sum(not t and not p for t, p in zip(truth, predicted)) / n_neg
    return (tpr + tnr) / 2, tpr, tnr


def _auroc(truth: Sequence[bool], score: Sequence[float]) -> float:
    """P(score of a random positive > that of a random negative), ties counting 1/2."""
    pos = [s for t, s in zip(truth, score) if t]
    neg = [s for t, s in zip(truth, score) if not t]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def _yes_no(reply: str) -> bool:
    return re.match(r"\W*(yes|true|1)\b", reply.strip(), re.I) is not None


def score_detection(backend: ChatBackend, explanation: Explanation, positives: Sequence[Example],
                    negatives: Sequence[Example], *, prompt_template: str = DEFAULT_DETECTION_TEMPLATE,
                    context_tokens: int = 32, candidates: tuple[str, str] = ("Yes", "No"),
                    margin: float | int = 0.0) -> DetectionScore:
    """Detection score of an explanation on held-out contexts.

    For each context (no markers, a window of ``context_tokens`` tokens around its peak) the scorer is
    asked whether the latent described by the label is active. With ``backend.logprobs`` it predicts
    active when ``logp(yes) - logp(no) > margin`` (nats) and the AUROC of that difference is reported too;
    otherwise a reply starting with "yes" counts as active, anything else as not active.

    Args:
        positives: contexts where the latent is active (ideally sampled across activation quantiles).
        negatives: contexts where it is not active anywhere.
        prompt_template: the user message, with ``{label}`` and ``{text}``.
        candidates: the (yes, no) answers, single tokens for a log-probability scorer.

    Returns:
        :class:`DetectionScore`; balanced accuracy is chance (0.5) for a constant answer.

    Raises:
        InputError: no positives or negatives; a held-out context that was among the examples the
            label was written from (scoring on them would inflate the score); a template without the
            placeholders.
        BackendError: the backend failed.

    References:
        Paulo et al. 2024, sec. 3.2 ("detection"); Bills et al. 2023 (scoring on held-out records).
    """
    if "{label}" not in prompt_template or "{text}" not in prompt_template:
        raise InputError("prompt_template must contain '{label}' and '{text}'.")
    if not positives or not negatives:
        raise InputError(f"score_detection needs positives and negatives; got {len(positives)} and {len(negatives)}.")
    shown = set(explanation.extra.get("example_fingerprints", ()))
    reused = sum(e.fingerprint() in shown for e in (*positives, *negatives))
    if reused:
        raise InputError(f"{reused} held-out contexts were among the examples the label was written from; score "
                         f"on disjoint contexts (sample_detection_set returns disjoint train and held-out sets).")
    items = [(True, e) for e in positives] + [(False, e) for e in negatives]
    convs = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt_template.replace(
        "{label}", explanation.label).replace("{text}", _clean("".join(_window(e, context_tokens)[0])))}]
        for _, e in items]
    truth = [t for t, _ in items]
    auroc = None
    if callable(getattr(backend, "logprobs", None)):
        lps = backend.logprobs(convs, list(candidates))
        diff = [y - n for y, n in lps]
        preds = [Prediction(t, d > margin, evidence=d) for t, d in zip(truth, diff)]
        auroc = _auroc(truth, diff)
    else:
        replies = [backend.complete(c, max_new_tokens=3) for c in convs]
        preds = [Prediction(t, _yes_no(r), reply=r) for t, r in zip(truth, replies)]
        margin = None
    ba, tpr, tnr = balanced_accuracy(truth, [p.predicted for p in preds])
    return DetectionScore(ba, tpr, tnr, len(positives), len(negatives), backend.name, prompt_template, _now(),
                          tuple(preds), auroc, margin)


# -- sampling ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DetectionSet:
    """Disjoint examples of one latent: ``train`` (top-activating, to explain from), ``positives``
    (held out, active) and ``negatives`` (held out, never active); ``*_idx`` are context indices."""

    train: Sequence[Example]
    positives: Sequence[Example]
    negatives: Sequence[Example]
    train_idx: Sequence[int]
    pos_idx: Sequence[int]
    neg_idx: Sequence[int]


def sample_detection_set(acts: torch.Tensor, str_tokens: Sequence[Sequence[str]], *, n_train: int = 10,
                         n_pos: int = 20, n_neg: int = 20, n_quantiles: int = 5, seed: int = 0) -> DetectionSet:
    """Split the contexts of one latent into explaining and held-out scoring sets, deterministically.

    ``train``: the ``n_train`` contexts with the highest peak activation. ``positives``: ``n_pos`` other
    active contexts, drawn evenly from ``n_quantiles`` equal-count bins of peak activation (so weak
    activations are scored too). ``negatives``: ``n_neg`` contexts where the latent is 0 at every token.
    Contexts whose text repeats an earlier one are skipped, so no text appears in two sets.

    Args:
        acts: ``[n_ctx, ctx_len]`` activations of the latent (drop a BOS column first: it is no evidence).
        str_tokens: ``n_ctx`` lists of ``ctx_len`` token strings.
        seed: seeds the draws; same inputs and seed give the same sets.

    Raises:
        InputError: shapes that do not match, or too few active / inactive contexts (the message gives
            the counts; lower ``n_pos``/``n_neg`` or pass more contexts).

    References:
        Paulo et al. 2024, sec. 3 (positives sampled across activation quantiles, random negatives).
    """
    acts = torch.as_tensor(acts).detach().float().cpu()
    if acts.ndim != 2 or len(str_tokens) != acts.shape[0] or any(len(t) != acts.shape[1] for t in str_tokens):
        raise InputError(f"acts must be [n_ctx, ctx_len] with one token string per entry; got acts "
                         f"{tuple(acts.shape)} and {len(str_tokens)} token lists.")
    peak = acts.max(1).values.tolist()
    seen, keep = set(), []
    for i, toks in enumerate(str_tokens):
        key = tuple(toks)
        if key not in seen:
            seen.add(key)
            keep.append(i)
    active = sorted((i for i in keep if peak[i] > 0), key=lambda i: (-peak[i], i))
    inactive = [i for i in keep if peak[i] <= 0 and bool((acts[i] == 0).all())]
    if len(active) < n_train + n_pos or len(inactive) < n_neg:
        raise InputError(f"need {n_train} + {n_pos} active and {n_neg} inactive distinct contexts; have "
                         f"{len(active)} and {len(inactive)}; lower n_train/n_pos/n_neg or pass more contexts.")
    rng = random.Random(seed)
    train, rest = active[:n_train], active[n_train:]
    bins = [rest[len(rest) * q // n_quantiles: len(rest) * (q + 1) // n_quantiles] for q in range(n_quantiles)]
    pos: list[int] = []
    for q, b in enumerate(bins):  # spread n_pos over the bins; leftovers come from the remaining contexts
        pos += rng.sample(b, min(len(b), n_pos * (q + 1) // n_quantiles - n_pos * q // n_quantiles))
    pos += rng.sample(sorted(set(rest) - set(pos)), n_pos - len(pos))
    neg = rng.sample(inactive, n_neg)

    def ex(i: int) -> Example:
        return Example(str_tokens[i], acts[i].tolist())

    return DetectionSet(tuple(map(ex, train)), tuple(map(ex, pos)), tuple(map(ex, neg)),
                        tuple(train), tuple(pos), tuple(neg))


def explain_and_score(explainer: ChatBackend, scorer: ChatBackend, data: DetectionSet, *,
                      latent: int | None = None, **explain_kwargs) -> ScoredLabel:
    """:func:`explain` on ``data.train``, then :func:`score_detection` on its held-out sets."""
    e = explain(explainer, data.train, latent=latent, **explain_kwargs)
    return ScoredLabel(e, score_detection(scorer, e, data.positives, data.negatives))
