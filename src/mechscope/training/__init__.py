"""Training sparse dictionaries: losses, schedules, the trainer with checkpoints and exact resume."""

from mechscope.training.config import DictionarySpec, TrainConfig
from mechscope.training.losses import LossOutput, compute_loss
from mechscope.training.trainer import Trainer, TrainingDivergedError, train

__all__ = ["DictionarySpec", "TrainConfig", "LossOutput", "compute_loss", "Trainer", "TrainingDivergedError", "train"]
from mechscope.training.crosscoder import (CrosscoderTrainConfig, CrosscoderTrainResult, PairedActivations,
                                           paired_activations, train_crosscoder, train_diff_sae)

__all__ += ["CrosscoderTrainConfig", "CrosscoderTrainResult", "PairedActivations", "paired_activations",
            "train_crosscoder", "train_diff_sae"]
