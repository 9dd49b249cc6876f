"""Refusal-style prefixes as twin pairs, so that :func:`~mechscope.safety.causal.causal_check` measures whether a
direction moves a model towards refusing.

Each request becomes one twin group: the same prompt answered by a refusal prefix (label 1, e.g. "I'm sorry,
but I can't help with that.") and by a compliance prefix (label 0, e.g. "Sure, here is"). The causal check's
pair metric is then ``log P(refusal prefix | request) - log P(compliance prefix | request)`` (nats, by teacher
forcing), a refusal score in the spirit of Arditi et al. 2024, who read refusal from the probability of refusal
tokens; steering along a harmfulness direction (e.g. a probe trained on ``harmfulness``) should raise it if the
model uses that direction to refuse.

References:
    Arditi et al. 2024, "Refusal in Language Models Is Mediated by a Single Direction" (sec. 2.3, refusal score).
"""

from __future__ import annotations

from collections.abc import Sequence

from mechscope.core.errors import InputError
from mechscope.data.labelled import Example, LabelledDataset

REFUSAL = "I'm sorry, but I can't help with that."
COMPLIANCE = "Sure, here is"


def _request(e: Example, i: int) -> tuple[dict, ...] | str:
    """The prompt of an example: its text, or its chat up to (not including) a final assistant turn."""
    if e.text is not None:
        return e.text
    msgs = tuple({"role": m.role, "content": m.content} if not isinstance(m, dict) else dict(m) for m in e.messages)
    if msgs and msgs[-1]["role"] == "assistant":
        msgs = msgs[:-1]
    if not msgs or msgs[-1]["role"] != "user":
        raise InputError(f"example {i} (group {e.group!r}) does not end with a user turn (before any final assistant "
                         "answer); a refusal pair answers a request.")
    return msgs


def refusal_pairs(requests: str | LabelledDataset | Sequence[str], *, label: int | None = 1, refusal: str = REFUSAL,
                  compliance: str = COMPLIANCE, chat: bool = True, name: str | None = None) -> LabelledDataset:
    """Twin groups (refusal prefix = label 1, compliance prefix = label 0) for :func:`causal_check`.

    Args:
        requests: plain request strings, a :class:`LabelledDataset`, or a built-in name / ``.jsonl`` path /
            ``hf:`` source (e.g. ``"harmfulness"``).
        label: of a dataset, keep only the examples with this label (1: the harmful requests of
            ``harmfulness``); None keeps all.
        refusal / compliance: the two answer prefixes, scored by teacher forcing.
        chat: answer as an assistant turn of a chat (the model's chat template renders it); False appends the
            answer to the request text after a space (models without a chat template).
        name: the pairs' dataset name (default ``"refusal:<source name>"``).

    Returns:
        A LabelledDataset with two examples per request, in one group each (``r0``, ``r1``, ...), the answer
        scored (the assistant turn, or the appended span).

    Raises:
        InputError: no requests; empty prefixes or equal prefixes (the metric would be 0 by construction); a
            chat example that does not end with a user turn; an unknown dataset.
    """
    if not refusal.strip() or not compliance.strip() or refusal.strip() == compliance.strip():
        raise InputError(f"refusal and compliance prefixes must be two different non-empty texts, got {refusal!r} and "
                         f"{compliance!r}.")
    if isinstance(requests, str):
        from mechscope.data.labelled_builtins import load_labelled

        requests = load_labelled(requests)
    if isinstance(requests, LabelledDataset):
        source = requests.name
        prompts = [_request(e, i) for i, e in enumerate(requests.examples) if label is None or e.label == label]
    else:
        source = "requests"
        prompts = list(requests)
        bad = [i for i, p in enumerate(prompts) if not isinstance(p, str) or not p.strip()]
        if bad:
            raise InputError(f"requests {bad[:5]} are not non-empty strings; give the requests' texts.")
    if not prompts:
        raise InputError(f"no requests{'' if label is None else f' with label {label}'} in {source!r}; give requests, "
                         "or label=None to keep every example.")
    examples = []
    for g, p in enumerate(prompts):
        for lab, answer in ((1, refusal), (0, compliance)):
            if chat:
                turns = ({"role": "user", "content": p},) if isinstance(p, str) else p
                examples.append(Example(messages=(*turns, {"role": "assistant", "content": answer}), label=lab,
                                        group=f"r{g}", meta={"answer": "refusal" if lab else "compliance"}))
            else:
                text = (p if isinstance(p, str) else p[-1]["content"]) + " " + answer
                examples.append(Example(text=text, label=lab, group=f"r{g}",
                                        score_span={"start": len(text) - len(answer), "end": len(text)},
                                        meta={"answer": "refusal" if lab else "compliance"}))
    return LabelledDataset(name or f"refusal:{source}", tuple(examples))


__all__ = ["COMPLIANCE", "REFUSAL", "refusal_pairs"]
