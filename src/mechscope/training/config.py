"""Training configuration: the shared schedule (:class:`TrainConfig`) and each dictionary's objective
(:class:`DictionarySpec`). Several dictionaries train from one pass over the activations."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

from mechscope.core.errors import InputError
from mechscope.dictionaries.config import DictionaryConfig

_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass(frozen=True)
class DictionarySpec:
    """One dictionary to train and its objective.

    Attributes:
        name: folder name of the result (letters, digits, ``_ . -``).
        dictionary: its :class:`DictionaryConfig`.
        lr: Adam learning rate; None picks ``2e-4 / sqrt(d_sae / 2**14)`` (Gao et al. 2024, section 2.4).
        l1_coefficient: relu only: weight of the decoder-norm-weighted L1 penalty.
        l1_warmup_steps: relu only: the L1 weight rises linearly from 0 over this many steps
            (Anthropic's April 2024 update: 5% of training); None = 5% of the steps.
        l0_coefficient: jumprelu only: weight of the L0 penalty.
        aux_coefficient: topk/batchtopk only: weight of the AuxK loss (Gao et al.: 1/32).
        k_aux: dead latents used by AuxK; None = d_out // 2.
        jumprelu_init_threshold: initial JumpReLU threshold (normalised activation units).
        decoder_init_norm: initial norm of decoder rows; None = 0.1 for relu, 1 otherwise.
    """

    name: str
    dictionary: DictionaryConfig
    lr: float | None = None
    l1_coefficient: float = 5.0
    l1_warmup_steps: int | None = None
    l0_coefficient: float = 1.0
    aux_coefficient: float = 1 / 32
    k_aux: int | None = None
    jumprelu_init_threshold: float = 0.001
    decoder_init_norm: float | None = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise InputError(f"name must use letters, digits, '_', '.', '-' only (it names a folder), got {self.name!r}.")
        if not isinstance(self.dictionary, DictionaryConfig):
            raise InputError(f"dictionary must be a DictionaryConfig, got {type(self.dictionary).__name__}.")
        if self.lr is not None and not self.lr > 0:
            raise InputError(f"lr must be > 0, got {self.lr}.")
        for f in ("l1_coefficient", "l0_coefficient", "aux_coefficient"):
            if not getattr(self, f) >= 0:
                raise InputError(f"{f} must be >= 0, got {getattr(self, f)}.")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else 2e-4 / math.sqrt(self.dictionary.d_sae / 2**14)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "dictionary"}
        d["dictionary"] = self.dictionary.to_dict()
        d["dictionary"].pop("metadata", None)
        return d


@dataclass(frozen=True)
class TrainConfig:
    """The schedule shared by every dictionary trained in one run.

    Attributes:
        n_tokens: training tokens (activation rows) asked for; each dictionary sees :attr:`n_tokens_trained`,
            this rounded down to whole steps of ``batch_tokens``.
        batch_tokens: tokens per optimizer step.
        lr_warmup_steps: linear warm-up from 0; None = 1% of the steps (at least 1).
        lr_decay_fraction: linear decay to 0 over this final fraction of steps (Anthropic: 0.2).
        adam_betas, adam_eps: Adam's hyper-parameters.
        dead_after_tokens: a latent that has not fired for this many tokens is dead (for AuxK and
            the dead fraction); None = min(10M, n_tokens // 5).
        normalize_inputs: scale inputs (and targets) so their mean norm is sqrt(d) while training; the
            scale is folded into the saved weights (SAELens's "expected_average_only_in").
        norm_estimation_batches: batches used to estimate that scale and b_dec's initial value (the mean).
        dtype: compute dtype: "float32", or "bfloat16" (autocast; fp32 master weights and Adam state).
        seed: initialisation and data order.
        checkpoint_every_steps: 0 = only at the end; keep_checkpoints: how many to keep.
        log_every_steps: steps between lines of ``metrics.jsonl``.
        grad_clip_norm: clip each dictionary's gradient norm (None: no clipping).
        memory_budget_bytes: refuse a run whose planned memory exceeds this (None: no check).
        wandb_project: log to Weights & Biases under this project when ``wandb`` is installed.
    """

    n_tokens: int
    batch_tokens: int = 4096
    lr_warmup_steps: int | None = None
    lr_decay_fraction: float = 0.2
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    dead_after_tokens: int | None = None
    normalize_inputs: bool = True
    norm_estimation_batches: int = 8
    dtype: str = "float32"
    seed: int = 0
    checkpoint_every_steps: int = 0
    keep_checkpoints: int = 2
    log_every_steps: int = 10
    grad_clip_norm: float | None = None
    memory_budget_bytes: int | None = None
    wandb_project: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self):
        for f in ("n_tokens", "batch_tokens", "norm_estimation_batches", "log_every_steps", "keep_checkpoints"):
            v = getattr(self, f)
            if not isinstance(v, int) or v <= 0:
                raise InputError(f"{f} must be a positive int, got {v!r}.")
        if self.n_tokens < self.batch_tokens:
            raise InputError(f"n_tokens={self.n_tokens} is less than one batch (batch_tokens={self.batch_tokens}); "
                             "raise n_tokens (--tokens) or lower batch_tokens (--batch-tokens).")
        if not 0 <= self.lr_decay_fraction <= 1:
            raise InputError(f"lr_decay_fraction must be in [0, 1], got {self.lr_decay_fraction}.")
        if self.dtype not in ("float32", "bfloat16"):
            raise InputError(f"dtype must be 'float32' or 'bfloat16' (fp16 is slow and unstable on CPU), got {self.dtype!r}.")
        if not isinstance(self.checkpoint_every_steps, int) or self.checkpoint_every_steps < 0:
            raise InputError(f"checkpoint_every_steps must be an int >= 0, got {self.checkpoint_every_steps!r}.")
        object.__setattr__(self, "adam_betas", tuple(self.adam_betas))

    @property
    def n_steps(self) -> int:
        return self.n_tokens // self.batch_tokens

    @property
    def n_tokens_trained(self) -> int:
        """Tokens actually trained on: whole steps only, ``n_steps * batch_tokens`` (<= ``n_tokens``)."""
        return self.n_steps * self.batch_tokens

    @property
    def warmup_steps(self) -> int:
        return self.lr_warmup_steps if self.lr_warmup_steps is not None else max(1, self.n_steps // 100)

    @property
    def dead_tokens(self) -> int:
        return self.dead_after_tokens if self.dead_after_tokens is not None else min(10_000_000, self.n_tokens // 5)

    def lr_factor(self, step: int) -> float:
        """Multiplier of the learning rate at ``step`` (0-based): linear warm-up, flat, linear decay to 0."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        decay_steps = int(self.n_steps * self.lr_decay_fraction)
        start = self.n_steps - decay_steps
        if decay_steps and step >= start:
            return max(0.0, (self.n_steps - step) / decay_steps)
        return 1.0

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("extra")
        for k in ("checkpoint_every_steps", "keep_checkpoints", "log_every_steps", "memory_budget_bytes",
                  "wandb_project"):
            d.pop(k)  # may change between a run and its resume without changing the result
        return d
