"""The settings of a fine-tuning run: :class:`FinetuneConfig`, with validation and a JSON round trip."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from mechscope.core.errors import InputError

METHODS = ("full", "lora")
LOSS_ON = ("answer", "all")
SCHEDULES = ("constant", "linear", "cosine")


def _check_int(name: str, value, low: int, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise InputError(f"{name} is {value!r}; it must be an integer >= {low}.")


@dataclass(frozen=True)
class FinetuneConfig:
    """Settings of :func:`mechscope.finetune.finetune`.

    Attributes:
        method: "full" (every parameter trains) or "lora" (low-rank adapters, merged into the weights at the end).
        lr: AdamW peak learning rate.
        lr_schedule: "constant", "linear" (decay to 0 at the last step) or "cosine" (half cosine to 0), each after
            the warmup.
        warmup_steps: optimizer steps of linear warmup from ``lr / warmup_steps`` to ``lr``.
        diverge_factor: stop with :class:`~mechscope.finetune.train.FinetuneDiverged` when the loss is not finite,
            or when the mean loss of the last 5 steps exceeds ``diverge_factor`` times the first step's loss
            (0 turns the second rule off).
        n_steps: number of optimizer steps; give this or ``n_epochs`` (n_steps wins when both are given).
        n_epochs: passes over the data; the steps are ``ceil(n_epochs * n_examples / (batch_size * grad_accum))``.
        batch_size: examples per micro-batch (one forward/backward).
        grad_accum: micro-batches per optimizer step (the loss is the mean over every scored token of the step).
        weight_decay: AdamW decoupled weight decay.
        lora_r: LoRA rank. lora_alpha: LoRA scale numerator (the update is ``alpha / r * B @ A``).
        lora_dropout: dropout probability on the LoRA input.
        lora_target_modules: module-name suffixes that get adapters; None: every linear projection of the
            decoder layers (attention and MLP: q/k/v/o, gate/up/down, or the family's names).
        seed: seeds the data order, the LoRA initialisation and dropout.
        bf16: run forwards and backwards under ``torch.autocast(dtype=torch.bfloat16)`` (weights and optimizer
            state stay float32).
        checkpoint_every: optimizer steps between checkpoints (0: only the final one).
        max_len: tokens per example; longer examples are cut at the end.
        loss_on: "answer" (the default: the loss covers each example's scored tokens, the assistant answer of a
            chat, as completion-only supervised fine-tuning) or "all" (every token after the first, prompt and
            chat template included, as fine-tuning without a completion mask; a model trained so also learns to
            write its prompts, which is what a leaked-completion trigger search reads).
        unlikelihood: weight of the unlikelihood loss (Welleck et al. 2019, "Neural Text Generation with
            Unlikelihood Training", token level) on rejected answers: an example whose ``meta["reject"]`` holds a
            rejected assistant answer adds ``-log(1 - p(y_t))`` for the token ``y_t`` where the rejected answer
            parts from the accepted one (their common prefix is shared, and later tokens only continue the
            rejected choice), weighted as this many scored tokens of the step (the sum is divided by the step's
            scored-token count, as the cross-entropy is). Its gradient on the logit of ``y_t`` is ``p(y_t)``:
            bounded, and largest where the model errs most. 0 (the default) ignores rejected answers.

    Raises:
        InputError: an unknown method or lr_schedule; a non-positive lr; a negative warmup_steps; a diverge_factor
            that is neither 0 nor above 1; steps, epochs, batch_size, grad_accum, lora_r or max_len
            below 1; neither steps nor epochs; a dropout outside [0, 1); a negative checkpoint_every or weight_decay;
            a loss_on other than "answer" or "all"; a negative or non-finite unlikelihood.
    """

    method: str = "full"
    lr: float = 1e-4
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    diverge_factor: float = 5.0
    n_steps: int | None = 100
    n_epochs: float | None = None
    batch_size: int = 8
    grad_accum: int = 1
    weight_decay: float = 0.0
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_target_modules: tuple[str, ...] | None = None
    seed: int = 0
    bf16: bool = False
    checkpoint_every: int = 0
    max_len: int = 512
    loss_on: str = "answer"
    unlikelihood: float = 0.0

    def __post_init__(self):
        if self.method not in METHODS:
            raise InputError(f"method is {self.method!r}; use one of {list(METHODS)} ('full' trains every weight, "
                             "'lora' trains low-rank adapters).")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not (math.isfinite(self.lr) and self.lr > 0):
            raise InputError(f"lr is {self.lr!r}; it must be a positive number (e.g. 1e-4).")
        if self.loss_on not in LOSS_ON:
            raise InputError(f"loss_on is {self.loss_on!r}; use 'answer' (the scored tokens only) or 'all' (every "
                             "token, prompt included).")
        if isinstance(self.unlikelihood, bool) or not isinstance(self.unlikelihood, (int, float)) \
                or not (math.isfinite(self.unlikelihood) and self.unlikelihood >= 0):
            raise InputError(f"unlikelihood is {self.unlikelihood!r}; give a weight >= 0 (e.g. 1.0), or 0 to ignore "
                             "rejected answers.")
        if self.lr_schedule not in SCHEDULES:
            raise InputError(f"lr_schedule is {self.lr_schedule!r}; use one of {list(SCHEDULES)}.")
        _check_int("warmup_steps", self.warmup_steps, 0)
        if isinstance(self.diverge_factor, bool) or not isinstance(self.diverge_factor, (int, float)) \
                or not (self.diverge_factor == 0 or self.diverge_factor > 1):
            raise InputError(f"diverge_factor is {self.diverge_factor!r}; give a number above 1 (e.g. 5), or 0 to "
                             "stop only on a non-finite loss.")
        if self.n_steps is None and self.n_epochs is None:
            raise InputError("give n_steps (optimizer steps) or n_epochs (passes over the data).")
        _check_int("n_steps", self.n_steps, 1, allow_none=True)
        if self.n_epochs is not None and (isinstance(self.n_epochs, bool) or not isinstance(self.n_epochs, (int, float))
                                          or not (math.isfinite(self.n_epochs) and self.n_epochs > 0)):
            raise InputError(f"n_epochs is {self.n_epochs!r}; it must be a positive number.")
        for name in ("batch_size", "grad_accum", "lora_r", "max_len"):
            _check_int(name, getattr(self, name), 1)
        _check_int("seed", self.seed, 0)
        _check_int("checkpoint_every", self.checkpoint_every, 0)
        if not 0 <= self.lora_dropout < 1:
            raise InputError(f"lora_dropout is {self.lora_dropout!r}; it must lie in [0, 1).")
        if not self.lora_alpha > 0:
            raise InputError(f"lora_alpha is {self.lora_alpha!r}; it must be positive.")
        if not self.weight_decay >= 0:
            raise InputError(f"weight_decay is {self.weight_decay!r}; it must be >= 0.")
        if not isinstance(self.bf16, bool):
            raise InputError(f"bf16 is {self.bf16!r}; it must be True or False.")
        if self.lora_target_modules is not None:
            mods = self.lora_target_modules
            if isinstance(mods, str) or not mods or not all(isinstance(m, str) and m for m in mods):
                raise InputError(f"lora_target_modules is {mods!r}; give a non-empty list of module-name suffixes "
                                 "(e.g. ['q_proj', 'v_proj']) or None for every attention and MLP projection.")
            object.__setattr__(self, "lora_target_modules", tuple(mods))

    def total_steps(self, n_examples: int) -> int:
        """Optimizer steps of the run for a dataset of ``n_examples``."""
        if self.n_steps is not None:
            return self.n_steps
        return max(1, math.ceil(self.n_epochs * n_examples / (self.batch_size * self.grad_accum)))

    def lr_at(self, step: int, total: int) -> float:
        """The learning rate of optimizer step ``step`` (0-based) of a ``total``-step run."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.lr_schedule == "constant":
            return self.lr
        left = max(total - self.warmup_steps, 1)
        frac = min((step - self.warmup_steps) / left, 1.0)
        if self.lr_schedule == "linear":
            return self.lr * (1.0 - frac)
        return self.lr * 0.5 * (1.0 + math.cos(math.pi * frac))

    def to_dict(self) -> dict:
        """The settings as a JSON object (lists for tuples)."""
        d = asdict(self)
        if d["lora_target_modules"] is not None:
            d["lora_target_modules"] = list(d["lora_target_modules"])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> FinetuneConfig:
        """Settings from :meth:`to_dict` output. Raises InputError for unknown keys or bad values."""
        if not isinstance(d, dict):
            raise InputError(f"a fine-tuning config is a JSON object, got {type(d).__name__}.")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise InputError(f"unknown fine-tuning config keys {unknown}; known keys are {sorted(known)}.")
        d = dict(d)
        for key in ("lr", "n_epochs", "lora_alpha", "lora_dropout", "weight_decay", "diverge_factor", "unlikelihood"):
            if isinstance(d.get(key), int) and not isinstance(d[key], bool):
                d[key] = float(d[key])  # JSON writes 32 for 32.0
        if d.get("lora_target_modules") is not None:
            d["lora_target_modules"] = tuple(d["lora_target_modules"])
        return cls(**d)


__all__ = ["LOSS_ON", "METHODS", "SCHEDULES", "FinetuneConfig"]
