"""Crosscoders for model diffing: one sparse dictionary over the same site of two (or more) models.

Letter key for shape suffixes: B rows (tokens), M models, D d_in (the site's width), S d_sae.

A crosscoder reads the activations of every model at one site, stacked as ``x [B, M, D]`` (model 0 is
the base model, model 1 the fine-tuned one), and encodes them jointly into one set of latents; each model
has its own decoder::

    pre   = sum_m x[:, m] @ W_enc[m] + b_enc                       # [B, S]
    f     = BatchTopK(pre)   (training)  |  pre * (pre > threshold)  (inference)
    x_hat = f @ W_dec[m] + b_dec[m]   for each model m            # [B, M, D]

Weights follow the house orientation: ``W_enc [M, D, S]``, ``W_dec [M, S, D]``, ``b_enc [S]``,
``b_dec [M, D]``. A latent ``j`` has one decoder vector per model, ``W_dec[m, j]``; their norms say which
model uses it (see :mod:`mechscope.dictionaries.crosscoder_analysis`): a shared latent writes into both,
a model-specific latent into one only. The trainer keeps each latent's *joint* decoder norm
``sqrt(sum_m ||W_dec[m, j]||^2)`` at 1, so the split of that norm between the models is learned freely.

On disk: a folder with ``cfg.json`` (``architecture: "crosscoder"``) beside ``crosscoder.safetensors``,
written whole or not at all.

References:
    Lindsey et al. 2024, "Sparse Crosscoders for Cross-Layer Features and Model Diffing" (Transformer
    Circuits Thread); Bussmann et al. 2024, "BatchTopK Sparse Autoencoders"; Minder et al. 2025,
    "Overcoming Sparsity Artifacts in Crosscoders to Interpret Chat-Tuning" (arXiv 2504.02922; BatchTopK
    crosscoders, section 4).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

from mechscope.core.errors import CorruptFileError, InputError, ShapeError
from mechscope.core.io import (
    load_safetensors,
    save_safetensors_atomic,
    write_folder_atomic,
    write_json_atomic,
)
from mechscope.dictionaries.model import batchtopk_activation

WEIGHTS = "crosscoder.safetensors"
CFG = "cfg.json"
ARCHITECTURE = "crosscoder"
FORMAT_VERSION = 1
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class CrosscoderConfig:
    """What a crosscoder is; saved as ``cfg.json``.

    Attributes:
        d_in: width of the site (the same in every model).
        d_sae: number of latents.
        k: mean active latents per row (BatchTopK keeps ``k * rows`` over a training batch).
        hook: the site read in every model, e.g. ``blocks.6.hook_resid_post``.
        models: one name per model, base first (``("base", "tuned")``); at least two.
        dtype: storage dtype of the weights.
        metadata: free-form provenance (model ids, training rows, seconds); JSON values only.
    """

    d_in: int
    d_sae: int
    k: int
    hook: str = ""
    models: tuple[str, ...] = ("base", "tuned")
    dtype: str = "float32"
    metadata: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self):
        for name in ("d_in", "d_sae"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise InputError(f"{name} must be a positive int, got {v!r}.")
        if not isinstance(self.k, int) or isinstance(self.k, bool) or not 0 < self.k <= self.d_sae:
            raise InputError(f"k must be an int in 1..d_sae={self.d_sae} (active latents per row), got k={self.k!r}; "
                             "lower k or raise d_sae.")
        models = tuple(self.models)
        if len(models) < 2 or len(set(models)) != len(models) or not all(isinstance(m, str) and m for m in models):
            raise InputError(f"models must be two or more distinct non-empty names (base first), got {self.models!r}.")
        object.__setattr__(self, "models", models)
        if self.dtype not in _DTYPES:
            raise InputError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}.")

    @property
    def n_models(self) -> int:
        return len(self.models)

    def replace(self, **changes) -> CrosscoderConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["models"] = list(self.models)
        return {"architecture": ARCHITECTURE, "format_version": FORMAT_VERSION, **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CrosscoderConfig:
        """Build from a ``cfg.json`` dict.

        Raises:
            InputError: another architecture, a newer format version, an unknown key, or a bad value.
        """
        d = dict(d)
        arch = d.pop("architecture", None)
        if arch != ARCHITECTURE:
            raise InputError(f"cfg.json has architecture {arch!r}, not {ARCHITECTURE!r}; load SAEs and transcoders "
                             "with mechscope.dictionaries.load_dictionary.")
        version = d.pop("format_version", FORMAT_VERSION)
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise InputError(f"cfg.json has format_version {version!r}; this mechscope reads up to {FORMAT_VERSION}. "
                             "Upgrade mechscope.")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise InputError(f"cfg.json has unknown keys {unknown}; known keys are {sorted(known)}.")
        if isinstance(d.get("models"), list):  # JSON has no tuples
            d["models"] = tuple(d["models"])
        return cls(**d)


def stack_models(*acts: Tensor) -> Float[Tensor, "rows n_models d_in"]:
    """Stack per-model activations ``[rows, d]`` (base first) into a crosscoder input ``[rows, M, d]``.

    Raises:
        InputError: the models' activations differ in shape (they must be the same rows of the same site).
    """
    shapes = [tuple(a.shape) for a in acts]
    if len(set(shapes)) != 1 or len(shapes[0]) != 2:
        raise InputError(f"the models' activations must be [rows, d] of one shape each (the same tokens at the same "
                         f"site), got {shapes}. Collect them with paired_activations, which aligns the rows.")
    return torch.stack(acts, dim=1)


class Crosscoder(nn.Module):
    """A BatchTopK crosscoder (see the module docstring for the formulas and shapes).

    Parameters: ``W_enc [M, d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [M, d_sae, d_in]``, ``b_dec [M, d_in]``;
    buffer ``threshold [d_sae]``: the inference threshold, estimated while training (the running mean of the
    smallest kept activation per batch, Bussmann et al. 2024, section 3). In training mode the activation is
    the batch TopK; in eval mode (or with ``use_threshold``) the threshold.
    """

    def __init__(self, cfg: CrosscoderConfig, *, device=None):
        super().__init__()
        self.cfg = cfg
        kw = dict(device=device, dtype=_DTYPES[cfg.dtype])
        M, D, S = cfg.n_models, cfg.d_in, cfg.d_sae
        self.W_enc = nn.Parameter(torch.zeros(M, D, S, **kw))
        self.b_enc = nn.Parameter(torch.zeros(S, **kw))
        self.W_dec = nn.Parameter(torch.zeros(M, S, D, **kw))
        self.b_dec = nn.Parameter(torch.zeros(M, D, **kw))
        self.register_buffer("threshold", torch.zeros(S, **kw))
        #: Use the threshold even in training mode (set after training and on load).
        self.use_threshold = False

    @torch.no_grad()
    def initialize(self, seed: int = 0, *, same_init: bool = True) -> Crosscoder:
        """Random decoders of joint unit norm per latent, encoder = decoder transpose, zero biases.

        ``seed`` seeds a private generator (the global RNG is untouched). ``same_init``: each latent's decoder
        starts as one random direction shared by every model (relative norm 1/n_models, decoder cosine 1), so a
        latent stays shared unless the data pulls the models apart; with False each model's decoder is drawn
        independently (cosine near 0), and latents that training barely reaches keep cosines far from 1 and
        relative norms near 1/n_models, which then reads as neither shared nor model-specific.

        References:
            Gao et al. 2024, section 2.4 (encoder initialised to the decoder transpose).
        """
        g = torch.Generator(device="cpu").manual_seed(seed)
        M, S, D = self.cfg.n_models, self.cfg.d_sae, self.cfg.d_in
        w = torch.randn(1 if same_init else M, S, D, generator=g, dtype=torch.float32).expand(M, S, D)
        w = w / w.pow(2).sum((0, 2), keepdim=True).sqrt()
        self.W_dec.copy_(w)
        self.W_enc.copy_(w.transpose(1, 2))
        self.b_enc.zero_()
        self.b_dec.zero_()
        self.threshold.zero_()
        return self

    # -- the forward pass --------------------------------------------------------------------
    def _check(self, x: Tensor) -> None:
        M, D = self.cfg.n_models, self.cfg.d_in
        if x.dim() < 2 or tuple(x.shape[-2:]) != (M, D):
            raise ShapeError(
                f"a crosscoder input is [..., n_models={M}, d_in={D}] (the models' activations stacked on axis -2, "
                f"{' then '.join(self.cfg.models)}), got {tuple(x.shape)}. Build it with stack_models(base, tuned).")

    def encode_pre(self, x: Float[Tensor, "*rows n_models d_in"]) -> Float[Tensor, "*rows d_sae"]:
        """Pre-activations ``sum_m x[..., m, :] @ W_enc[m] + b_enc``."""
        self._check(x)
        x = x.to(self.W_enc.dtype)
        return torch.einsum("...md,mds->...s", x, self.W_enc) + self.b_enc

    def activate(self, pre: Float[Tensor, "*rows d_sae"]) -> Float[Tensor, "*rows d_sae"]:
        """BatchTopK over all rows (training) or the inference threshold (eval / ``use_threshold``)."""
        if self.use_threshold or not self.training:
            return pre * (pre > self.threshold).to(pre.dtype)
        rows = pre.reshape(-1, pre.shape[-1])
        return batchtopk_activation(rows, self.cfg.k).view_as(pre)

    def encode(self, x: Float[Tensor, "*rows n_models d_in"]) -> Float[Tensor, "*rows d_sae"]:
        """Latent activations ``[..., d_sae]`` (non-negative)."""
        return self.activate(self.encode_pre(x))

    def decode(self, acts: Float[Tensor, "*rows d_sae"]) -> Float[Tensor, "*rows n_models d_in"]:
        """Each model's reconstruction ``acts @ W_dec[m] + b_dec[m]``, stacked on axis -2."""
        return torch.einsum("...s,msd->...md", acts.to(self.W_dec.dtype), self.W_dec) + self.b_dec

    def forward(self, x: Float[Tensor, "*rows n_models d_in"]) -> Float[Tensor, "*rows n_models d_in"]:
        """The reconstruction of every model's activation."""
        return self.decode(self.encode(x))

    # -- decoder geometry --------------------------------------------------------------------
    def decoder_norms(self) -> Float[Tensor, "n_models d_sae"]:
        """``||W_dec[m, j]||`` for each model m and latent j."""
        return self.W_dec.detach().norm(dim=-1)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale each latent's decoder vectors so their joint norm ``sqrt(sum_m ||W_dec[m, j]||^2)`` is 1.

        The split between models is untouched, so relative decoder norms keep their meaning.
        """
        self.W_dec.div_(self.W_dec.pow(2).sum((0, 2), keepdim=True).sqrt().clamp_min(1e-12))

    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        """Project out the gradient along each latent's joint (unit) decoder vector (Gao et al. 2024, 2.4)."""
        if self.W_dec.grad is None:
            return
        w = self.W_dec / self.W_dec.pow(2).sum((0, 2), keepdim=True).sqrt().clamp_min(1e-12)
        self.W_dec.grad.sub_((self.W_dec.grad * w).sum((0, 2), keepdim=True) * w)

    @torch.no_grad()
    def fold_scaling(self, scale: float) -> Crosscoder:
        """Fold an input scale into the weights, in place: a crosscoder trained on ``x * scale`` becomes one that
        reads raw ``x`` with the same latents (``W_enc *= scale``, ``W_dec /= scale``, ``b_dec /= scale``).
        One scale for every model, so relative decoder norms are unchanged."""
        self.W_enc.mul_(scale)
        self.W_dec.div_(scale)
        self.b_dec.div_(scale)
        return self

    def extra_repr(self) -> str:
        c = self.cfg
        return f"batchtopk crosscoder k={c.k}: {c.hook} of {list(c.models)}, d_in={c.d_in}, d_sae={c.d_sae}"


# -- on disk ----------------------------------------------------------------------------------
def _tensors(cc: Crosscoder) -> dict[str, Tensor]:
    return {k: getattr(cc, k).detach() for k in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")}


def _shapes(cfg: CrosscoderConfig) -> dict[str, tuple[int, ...]]:
    M, D, S = cfg.n_models, cfg.d_in, cfg.d_sae
    return {"W_enc": (M, D, S), "b_enc": (S,), "W_dec": (M, S, D), "b_dec": (M, D), "threshold": (S,)}


def save_crosscoder(cc: Crosscoder, folder: str | Path) -> Path:
    """Save as ``cfg.json`` + ``crosscoder.safetensors``, atomically (an earlier crosscoder there stays intact
    until the new one is complete).

    Raises:
        DiskFullError: the disk filled up.
    """
    def write(tmp: Path):
        save_safetensors_atomic(_tensors(cc), tmp / WEIGHTS, metadata={"format": "mechscope-crosscoder"})
        write_json_atomic(cc.cfg.to_dict(), tmp / CFG)

    return write_folder_atomic(folder, write)


def load_crosscoder(folder: str | Path, *, device=None) -> Crosscoder:
    """Load a crosscoder saved by :func:`save_crosscoder` (eval mode, inference threshold on).

    Raises:
        InputError: the folder or its files are missing, or ``cfg.json`` is not a crosscoder's.
        CorruptFileError: unreadable JSON, or tensors missing, unexpected, misshapen or not finite.
    """
    folder = Path(folder)
    if not (folder / CFG).is_file() or not (folder / WEIGHTS).is_file():
        raise InputError(f"{folder} holds no crosscoder: expected {CFG} beside {WEIGHTS} (written by save_crosscoder).")
    try:
        raw = json.loads((folder / CFG).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptFileError(f"{folder / CFG} is not valid JSON ({e}); restore it or re-save the crosscoder.") from e
    cfg = CrosscoderConfig.from_dict(raw)
    tensors = load_safetensors(folder / WEIGHTS, what="crosscoder")
    want = _shapes(cfg)
    missing, extra = sorted(set(want) - set(tensors)), sorted(set(tensors) - set(want))
    if missing or extra:
        raise CorruptFileError(f"{folder / WEIGHTS} does not match its cfg: missing tensors {missing}, unexpected {extra}.")
    for k, shape in want.items():
        t = tensors[k]
        if tuple(t.shape) != shape:
            raise CorruptFileError(f"{folder / WEIGHTS}: {k} has shape {tuple(t.shape)} but the cfg says {shape}.")
        if not torch.isfinite(t).all():
            raise CorruptFileError(f"{folder / WEIGHTS}: {k} contains NaN or infinite values; the crosscoder is unusable.")
    cc = Crosscoder(cfg, device=device)
    with torch.no_grad():
        for k, v in tensors.items():
            getattr(cc, k).copy_(v)
    cc.use_threshold = True
    return cc.eval()


__all__ = ["Crosscoder", "CrosscoderConfig", "load_crosscoder", "save_crosscoder", "stack_models"]
