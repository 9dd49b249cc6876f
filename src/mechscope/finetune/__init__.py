"""Fine-tuning of whole models: full or LoRA (the ``peft`` library) on labelled text or chat examples, with the
loss on the scored (assistant) tokens, gradient accumulation, bf16 autocast, checkpoints with exact resume and a
metrics log; the result is a transformers model folder that :func:`mechscope.load` opens."""

from mechscope.finetune.config import METHODS, SCHEDULES, FinetuneConfig
from mechscope.finetune.train import (
    FinetuneDiverged,
    FinetuneResult,
    default_targets,
    finetune,
)

__all__ = ["METHODS", "SCHEDULES", "FinetuneConfig", "FinetuneDiverged", "FinetuneResult", "default_targets", "finetune"]
