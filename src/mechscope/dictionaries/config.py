"""The configuration of a sparse dictionary (SAE or transcoder): one frozen dataclass, one JSON file.

A dictionary reads ``hook_in`` and reconstructs ``hook_out``. With ``hook_out`` equal to ``hook_in``
(the default) it is a sparse autoencoder; otherwise a transcoder (e.g. ``blocks.6.ln2.hook_normalized``
to ``blocks.6.hook_mlp_out``), optionally with a linear skip connection.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from mechscope.core.errors import InputError

#: architecture -> one-line description (the registry of activation functions lives in model.py)
ARCHITECTURES: dict[str, str] = {
    "relu": "ReLU, L1 penalty weighted by decoder norms (Anthropic, 'Towards Monosemanticity' April 2024 update)",
    "topk": "TopK: the k largest pre-activations per token (Gao et al. 2024, 'Scaling and evaluating SAEs')",
    "batchtopk": "BatchTopK: the k x batch largest over the batch while training, a threshold at inference "
                 "(Bussmann et al. 2024)",
    "jumprelu": "JumpReLU: per-latent threshold, straight-through estimator, L0 penalty "
                "(Rajamanoharan et al. 2024, 'Jumping Ahead')",
}

FORMAT_VERSION = 1


@dataclass(frozen=True)
class DictionaryConfig:
    """What a dictionary is; saved as ``cfg.json`` beside its ``*.safetensors``.

    Attributes:
        architecture: one of :data:`ARCHITECTURES`.
        d_in: width of the input activation (features of ``hook_in``; hook_z is flattened to n_heads*d_head).
        d_sae: number of latents.
        hook_in: hook name the dictionary reads, e.g. ``blocks.6.hook_resid_post``.
        hook_out: hook name it reconstructs; None means ``hook_in`` (an SAE).
        d_out: width of ``hook_out``; None means ``d_in``.
        k: latents kept per token (topk, batchtopk); None otherwise.
        skip: a transcoder with a linear skip connection ``x @ W_skip`` (Paulo et al. 2025).
        apply_b_dec_to_input: subtract ``b_dec`` from the input before encoding (SAEs only; the
            convention of Anthropic, OpenAI and SAELens).
        jumprelu_bandwidth: width of the rectangle kernel of the straight-through estimator
            (activation units of the normalised input).
        model_name: the model it was trained on (informational).
        dtype: storage dtype name of the weights.
        metadata: free-form provenance (training tokens, corpus, command); JSON values only.
    """

    architecture: str
    d_in: int
    d_sae: int
    hook_in: str
    hook_out: str | None = None
    d_out: int | None = None
    k: int | None = None
    skip: bool = False
    apply_b_dec_to_input: bool = True
    jumprelu_bandwidth: float = 0.05
    model_name: str = ""
    dtype: str = "float32"
    metadata: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise InputError(f"architecture={self.architecture!r} is unknown; choose one of {sorted(ARCHITECTURES)}.")
        for name in ("d_in", "d_sae"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise InputError(f"{name} must be a positive int, got {v!r}.")
        if self.hook_out is None:
            object.__setattr__(self, "hook_out", self.hook_in)
        if self.d_out is None:
            object.__setattr__(self, "d_out", self.d_in)
        if not isinstance(self.d_out, int) or self.d_out <= 0:
            raise InputError(f"d_out must be a positive int, got {self.d_out!r}.")
        if self.is_sae and self.d_out != self.d_in:
            raise InputError(f"an SAE (hook_out == hook_in) needs d_out == d_in, got {self.d_out} != {self.d_in}.")
        if self.architecture in ("topk", "batchtopk"):
            if not isinstance(self.k, int) or not 0 < self.k <= self.d_sae:
                raise InputError(f"{self.architecture} needs k in 1..d_sae={self.d_sae}, got k={self.k!r}.")
        elif self.k is not None:
            raise InputError(f"k is only used by topk and batchtopk, not {self.architecture}; drop k.")
        if self.skip and self.is_sae:
            raise InputError("skip=True is for transcoders (hook_out != hook_in); an SAE has no skip connection.")
        if not self.jumprelu_bandwidth > 0:
            raise InputError(f"jumprelu_bandwidth must be > 0, got {self.jumprelu_bandwidth}.")
        if self.dtype not in ("float32", "bfloat16", "float16", "float64"):
            raise InputError(f"dtype must be float32, bfloat16, float16 or float64, got {self.dtype!r}.")

    @property
    def is_sae(self) -> bool:
        """True for an autoencoder (reconstructs its own input), False for a transcoder."""
        return self.hook_out == self.hook_in

    @property
    def subtracts_b_dec(self) -> bool:
        return self.is_sae and self.apply_b_dec_to_input

    def replace(self, **changes) -> "DictionaryConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {"format_version": FORMAT_VERSION, **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DictionaryConfig":
        """Build from a ``cfg.json`` dict.

        Raises:
            InputError: a missing ``architecture``, an unknown key, a newer format version, or a bad value.
        """
        d = dict(d)
        version = d.pop("format_version", FORMAT_VERSION)
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise InputError(f"cfg.json has format_version {version!r}; this mechscope reads up to {FORMAT_VERSION}. "
                             "Upgrade mechscope.")
        if "architecture" not in d:
            raise InputError("cfg.json has no 'architecture' key; it is not a mechscope dictionary (for SAELens or "
                             "sparsify files use mechscope.dictionaries.load_dictionary, which detects them).")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise InputError(f"cfg.json has unknown keys {unknown}; known keys are {sorted(known)}.")
        return cls(**d)
