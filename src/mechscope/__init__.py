"""mechscope: mechanistic interpretability on real HuggingFace models, exact and fast."""

from mechscope.core.errors import (
    HookDidNotFireError,
    HookNameError,
    InputError,
    MechscopeError,
    ModelLoadError,
    ShapeError,
    SiteUnavailableError,
    UnsupportedArchitectureError,
)
from mechscope.hooks.cache import ActivationCache
from mechscope.hooks.interventions import Ablate, Add, Patch, Replace
from mechscope.models.hooked import HookedModel, ModelConfig, RunResult
from mechscope.models.loading import DEFAULT_MODEL, load

__version__ = "0.1.0"

__all__ = [
    "load", "HookedModel", "ModelConfig", "RunResult", "ActivationCache", "Patch", "Ablate", "Add", "Replace",
    "DEFAULT_MODEL", "MechscopeError", "HookNameError", "SiteUnavailableError", "ShapeError", "InputError",
    "ModelLoadError", "UnsupportedArchitectureError", "HookDidNotFireError",
]
