"""Metrics of a model's output for patching: logit difference, answer probability, KL divergence.

A :class:`Metric` is a differentiable callable ``metric(logits) -> scalar`` built from one clean and
one corrupted run, so the same object drives activation patching (evaluated on patched logits) and
attribution patching (back-propagated from the corrupted run).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechscope.core.errors import InputError, ShapeError

METRIC_KINDS = ("logit_diff", "prob", "kl")


def _check_answers(answer_tokens: Tensor, batch: int) -> Tensor:
    if not isinstance(answer_tokens, Tensor):
        answer_tokens = torch.as_tensor(answer_tokens)
    if answer_tokens.dim() == 1 and answer_tokens.shape[0] == 2:
        answer_tokens = answer_tokens.unsqueeze(0)
    if answer_tokens.dim() != 2 or answer_tokens.shape[1] != 2 or answer_tokens.dtype not in (torch.int64, torch.int32):
        raise ShapeError(
            f"answer_tokens must be integer token ids of shape [batch, 2] (correct, wrong); got "
            f"{tuple(answer_tokens.shape)} {answer_tokens.dtype}."
        )
    if answer_tokens.shape[0] != batch:
        raise ShapeError(
            f"answer_tokens has {answer_tokens.shape[0]} rows but the logits have batch {batch}; give one "
            "(correct, wrong) pair per prompt."
        )
    return answer_tokens.long()


def _at(logits: Tensor, position: int) -> Tensor:
    """Logits [batch, d_vocab] at ``position`` (negative positions also fit truncated logits)."""
    if logits.dim() != 3:
        raise ShapeError(f"logits must be [batch, pos, d_vocab], got shape {tuple(logits.shape)}.")
    if not -logits.shape[1] <= position < logits.shape[1]:
        raise InputError(
            f"position {position} is outside logits with {logits.shape[1]} positions; with "
            "logits_to_keep=k only the last k positions exist (use a negative position)."
        )
    at = logits[:, position]
    return at.to(torch.promote_types(at.dtype, torch.float32))  # float32 at least (float64 stays)


def logit_diff(
    logits: Float[Tensor, "batch pos d_vocab"], answer_tokens: Int[Tensor, "batch 2"], position: int = -1
) -> Float[Tensor, " batch"]:
    """logit(correct) - logit(wrong) at one position, per prompt (natural-log units, differentiable).

    Args:
        logits: model output; with ``logits_to_keep`` only the last positions may be present.
        answer_tokens: [batch, 2] token ids (correct, wrong).
        position: the position whose prediction is scored (-1: the last).

    Returns:
        float32 [batch].

    Raises:
        ShapeError: answer_tokens not [batch, 2] integers matching the logits' batch.
        InputError: position outside the logits.

    References:
        Wang et al. 2022, "Interpretability in the Wild" (IOI), section 2: the logit difference metric.
    """
    answers = _check_answers(answer_tokens, logits.shape[0]).to(logits.device)
    at = _at(logits, position)
    picked = at.gather(1, answers)
    return picked[:, 0] - picked[:, 1]


@dataclass(frozen=True, eq=False)
class Metric:
    """A scalar, differentiable metric of logits, normalised against a clean and a corrupted run.

    Call it on logits ``[batch, pos, d_vocab]`` of the same prompts (any number of trailing positions
    that includes ``position``); it returns a 0-dim float32 tensor.

    Attributes:
        name: the kind ("logit_diff", "prob" or "kl"), shown in reports.
        position: scored position as a negative index (-1 is the last), so truncated logits fit.
        answer_tokens: [batch, 2] (correct, wrong).
        clean_value / corrupt_value: the metric on the clean and corrupted logits (1.0 / 0.0 for the
            normalised logit difference).
        raw_clean / raw_corrupt: the un-normalised value on each run (mean logit difference, mean
            probability, mean KL).
        clean_logprobs: ``kl`` only: the clean run's log-probabilities at ``position``, [batch, d_vocab].
        clean_values / corrupt_values: the un-normalised value per prompt on each run, float32 [batch]
            (their means are raw_clean / raw_corrupt); what bootstrap intervals resample
            (``activation_patching(..., ci=True)``). None for a Metric built by hand.
    """

    name: str
    position: int
    answer_tokens: Tensor
    raw_clean: float
    raw_corrupt: float
    clean_logprobs: Tensor | None = None
    clean_values: Tensor | None = None
    corrupt_values: Tensor | None = None

    def __call__(self, logits: Float[Tensor, "batch pos d_vocab"]) -> Float[Tensor, ""]:
        if logits.shape[0] != self.answer_tokens.shape[0]:
            raise ShapeError(
                f"metric {self.name!r} was built for {self.answer_tokens.shape[0]} prompts but got logits with "
                f"batch {logits.shape[0]}; call it on one set of prompts at a time."
            )
        raw = self.raw(logits)
        if self.name == "logit_diff":
            return (raw - self.raw_corrupt) / (self.raw_clean - self.raw_corrupt)
        return raw

    def raw(self, logits: Tensor) -> Tensor:
        """The un-normalised value (mean over prompts) as a 0-dim tensor."""
        return self.per_prompt(logits).mean()

    def per_prompt(self, logits: Float[Tensor, "batch pos d_vocab"]) -> Float[Tensor, " batch"]:
        """The un-normalised value of each prompt: logit difference (natural-log units), probability of
        the correct answer, or KL(clean || logits) (nats); float32 at least, differentiable.

        The normalised logit difference of a set of prompts is (mean - raw_corrupt) / (raw_clean -
        raw_corrupt) of these values; for "prob" and "kl" the metric is their mean.
        """
        if self.name == "logit_diff":
            return logit_diff(logits, self.answer_tokens, self.position)
        logprobs = torch.log_softmax(_at(logits, self.position), dim=-1)
        if self.name == "prob":
            correct = self.answer_tokens[:, :1].to(logprobs.device)
            return logprobs.gather(1, correct).exp()[:, 0]
        ref = self.clean_logprobs.to(logprobs.device)
        return (ref.exp() * (ref - logprobs)).sum(-1)

    @property
    def clean_value(self) -> float:
        return 1.0 if self.name == "logit_diff" else self.raw_clean

    @property
    def corrupt_value(self) -> float:
        return 0.0 if self.name == "logit_diff" else self.raw_corrupt

    def __repr__(self) -> str:
        return (f"Metric({self.name!r}, position={self.position}, prompts={self.answer_tokens.shape[0]}, "
                f"clean={self.raw_clean:.4g}, corrupt={self.raw_corrupt:.4g})")


def make_metric(
    kind: str,
    clean_logits: Float[Tensor, "batch pos d_vocab"],
    corrupt_logits: Float[Tensor, "batch pos d_vocab"],
    answer_tokens: Int[Tensor, "batch 2"],
    position: int = -1,
) -> Metric:
    """Build a patching metric from a clean and a corrupted run of the same prompts.

    Kinds:
        - ``"logit_diff"``: mean logit difference normalised as (m - m_corrupt) / (m_clean - m_corrupt),
          so the clean run scores 1 and the corrupted run 0 (dimensionless);
        - ``"prob"``: mean probability of the correct answer (0..1);
        - ``"kl"``: mean KL(clean || patched) of the next-token distribution at ``position``
          (nats; 0 for the clean run).

    Args:
        kind: one of the kinds above.
        clean_logits / corrupt_logits: [batch, pos, d_vocab] (or only the last positions, as with
            ``logits_to_keep``), natural-log units.
        answer_tokens: [batch, 2] (correct, wrong) token ids.
        position: scored position; stored as a negative index so the metric also fits logits of only
            the last positions.

    Returns:
        A :class:`Metric`.

    Raises:
        InputError: an unknown kind; a logit difference that is equal on the clean and corrupted runs
            (the normalisation would divide by zero); a position outside the logits.
        ShapeError: logits of different shapes, or answer_tokens not [batch, 2].

    References:
        Normalised patching metric: Wang et al. 2022 (IOI), section 3; Heimersheim & Nanda 2024, "How to
        use and interpret activation patching", section 4 (choice of metric).
    """
    if kind not in METRIC_KINDS:
        raise InputError(f"unknown metric kind {kind!r}; use one of {METRIC_KINDS}.")
    if clean_logits.shape != corrupt_logits.shape:
        raise ShapeError(
            f"clean logits {tuple(clean_logits.shape)} and corrupted logits {tuple(corrupt_logits.shape)} differ; "
            "run the same number of prompts of equal token length."
        )
    n_pos = clean_logits.shape[1]
    if not -n_pos <= position < n_pos:
        raise InputError(f"position {position} is outside logits with {n_pos} positions.")
    neg = position - n_pos if position >= 0 else position
    answers = _check_answers(answer_tokens, clean_logits.shape[0]).detach().cpu()
    clean_lp = None
    if kind == "kl":
        clean_lp = torch.log_softmax(_at(clean_logits.detach(), neg), dim=-1).cpu()
    proto = Metric(kind, neg, answers, 0.0, 0.0, clean_lp)
    with torch.no_grad():
        clean_values = proto.per_prompt(clean_logits).detach().float().cpu()
        corrupt_values = proto.per_prompt(corrupt_logits).detach().float().cpu()
        raw_clean = float(proto.raw(clean_logits))
        raw_corrupt = float(proto.raw(corrupt_logits))
    if kind == "logit_diff" and abs(raw_clean - raw_corrupt) < 1e-6:
        raise InputError(
            f"the mean logit difference is the same on the clean and corrupted runs ({raw_clean:.4g}), so the "
            "normalised metric is undefined; use corrupted prompts that change the answer, or kind='prob'/'kl'."
        )
    return Metric(kind, neg, answers, raw_clean, raw_corrupt, clean_lp, clean_values, corrupt_values)
