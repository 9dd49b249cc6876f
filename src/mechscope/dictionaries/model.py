"""Sparse dictionaries: one module for SAEs and transcoders of every architecture.

Letter key for shape suffixes: B tokens (batch rows), I d_in, O d_out, S d_sae.

Weights follow the house orientation (right-multiplication): ``W_enc [d_in, d_sae]``,
``W_dec [d_sae, d_out]``, ``W_skip [d_in, d_out]``. For an input ``x``::

    pre  = (x - b_dec if subtracts_b_dec else x) @ W_enc + b_enc
    acts = activation(pre)                 # relu | topk | batchtopk | jumprelu
    out  = acts @ W_dec + b_dec (+ x @ W_skip for a skip transcoder)

References:
    Bricken et al. 2023, "Towards Monosemanticity"; Anthropic, "Circuits Updates, April 2024" (L1 weighted
    by decoder norms); Gao et al. 2024, "Scaling and evaluating sparse autoencoders" (TopK, AuxK);
    Bussmann et al. 2024, "BatchTopK Sparse Autoencoders"; Rajamanoharan et al. 2024, "Jumping Ahead:
    Improving Reconstruction Fidelity with JumpReLU Sparse Autoencoders" (JumpReLU, STE, L0);
    Dunefsky et al. 2024, "Transcoders Find Interpretable LLM Feature Circuits"; Paulo et al. 2025,
    "Transcoders Beat Sparse Autoencoders for Interpretability" (skip transcoders).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from jaxtyping import Float
from torch import Tensor, nn

from mechscope.core.errors import InputError, ShapeError
from mechscope.dictionaries.config import DictionaryConfig

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def _rectangle(x: Tensor) -> Tensor:
    return ((x > -0.5) & (x < 0.5)).to(x.dtype)


class JumpReLUFunction(torch.autograd.Function):
    """``pre * H(pre - threshold)``; gradient to the threshold by the rectangle-kernel STE.

    d out / d pre = H(pre - threshold); d out / d threshold = -(threshold / eps) K((pre - threshold) / eps)
    (Rajamanoharan et al. 2024, eq. 11).
    """

    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_pre = grad * (pre > threshold).to(grad.dtype)
        ste = -(threshold / eps) * _rectangle((pre - threshold) / eps) * grad
        return grad_pre, ste.reshape(-1, pre.shape[-1]).sum(0), None


class StepFunction(torch.autograd.Function):
    """``H(pre - threshold)`` (counts active latents, for the L0 penalty); STE gradient to the threshold only.

    d H / d threshold = -(1 / eps) K((pre - threshold) / eps) (Rajamanoharan et al. 2024, eq. 12).
    """

    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        ste = -(1.0 / eps) * _rectangle((pre - threshold) / eps) * grad
        return None, ste.reshape(-1, pre.shape[-1]).sum(0), None


def topk_activation(pre: Float[Tensor, "*rows d_sae"], k: int) -> Float[Tensor, "*rows d_sae"]:
    """Keep the k largest pre-activations of each row, ReLU'd; zeros elsewhere (Gao et al. 2024, eq. 3)."""
    values, idx = pre.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(pre).scatter(-1, idx, values.relu())


def keep_largest(flat: Float[Tensor, "n"], n_keep: int) -> Tensor:
    """Boolean mask of the ``n_keep`` largest entries of ``flat``, a tie at the last kept value going to the
    lowest indices (so the choice is reproducible, and equal to the data-parallel selection's)."""
    if n_keep >= flat.numel():
        return torch.ones_like(flat, dtype=torch.bool)
    t = flat.topk(n_keep).values[-1]
    mask = flat > t
    need = n_keep - int(mask.sum())
    if need:
        mask[(flat == t).nonzero().squeeze(1)[:need]] = True
    return mask


def batchtopk_activation(pre: Float[Tensor, "rows d_sae"], k: int) -> Float[Tensor, "rows d_sae"]:
    """Keep the ``k * rows`` largest ReLU'd pre-activations over the whole batch (Bussmann et al. 2024); a tie
    at the threshold goes to the lowest flat index (rows first)."""
    flat = pre.relu().flatten()
    keep = keep_largest(flat.detach(), k * pre.shape[0])
    return (flat * keep.to(flat.dtype)).view_as(pre)


class Encoded(NamedTuple):
    """The intermediate values of one forward: pre-activations and latent activations, [*rows, d_sae]."""

    pre: Tensor
    acts: Tensor


class SparseDictionary(nn.Module):
    """A sparse autoencoder or transcoder.

    Parameters (fp32 unless ``cfg.dtype`` says otherwise): ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``,
    ``W_dec [d_sae, d_out]``, ``b_dec [d_out]``; ``W_skip [d_in, d_out]`` for skip transcoders;
    ``threshold [d_sae]`` for jumprelu (a parameter) and batchtopk (a buffer: the inference threshold,
    estimated while training).

    Inputs are activations of ``cfg.hook_in`` with any leading axes, ``[..., d_in]`` (hook_z sites
    flattened to ``n_heads * d_head``), in activation units of the model. Use :meth:`forward` for the
    reconstruction, :meth:`encode` / :meth:`decode` for the parts.
    """

    def __init__(self, cfg: DictionaryConfig, *, device=None):
        super().__init__()
        self.cfg = cfg
        dtype = _DTYPES[cfg.dtype]
        kw = dict(device=device, dtype=dtype)
        self.W_enc = nn.Parameter(torch.zeros(cfg.d_in, cfg.d_sae, **kw))
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, **kw))
        self.W_dec = nn.Parameter(torch.zeros(cfg.d_sae, cfg.d_out, **kw))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_out, **kw))
        self.W_skip = nn.Parameter(torch.zeros(cfg.d_in, cfg.d_out, **kw)) if cfg.skip else None
        if cfg.architecture == "jumprelu":
            self.threshold = nn.Parameter(torch.zeros(cfg.d_sae, **kw))
        elif cfg.architecture == "batchtopk":
            self.register_buffer("threshold", torch.zeros(cfg.d_sae, **kw))
        else:
            self.threshold = None
        #: BatchTopK's inference threshold: while training, the running mean of the smallest kept
        #: activation per batch (Bussmann et al. 2024, section 3); used instead of the batch TopK in eval mode.
        self.batchtopk_use_threshold = False
        #: The folder it was loaded from (set by ``load_dictionary``), so that errors can name its cfg.json.
        self.source: str | None = None

    # -- initialisation ----------------------------------------------------------------------
    @torch.no_grad()
    def initialize(self, seed: int = 0, *, decoder_norm: float | None = None,
                   jumprelu_init_threshold: float = 0.001) -> "SparseDictionary":
        """Random decoder rows of fixed norm, encoder = decoder transpose, zero biases.

        Args:
            seed: seeds a private generator (the global RNG is untouched).
            decoder_norm: norm of each decoder row; default 1 for topk/batchtopk/jumprelu (unit-norm
                decoders) and 0.1 for relu (Anthropic's April 2024 update).
            jumprelu_init_threshold: initial threshold of every JumpReLU latent.

        References:
            Gao et al. 2024, section 2.4 (encoder initialised to the decoder transpose).
        """
        g = torch.Generator(device="cpu").manual_seed(seed)
        cfg = self.cfg
        if decoder_norm is None:
            decoder_norm = 0.1 if cfg.architecture == "relu" else 1.0
        w = torch.randn(cfg.d_sae, cfg.d_out, generator=g, dtype=torch.float32)
        w = w / w.norm(dim=-1, keepdim=True) * decoder_norm
        self.W_dec.copy_(w)
        if cfg.d_in == cfg.d_out:
            self.W_enc.copy_(w.T)
        else:  # transcoder: no transpose to copy; a scaled random encoder
            self.W_enc.copy_(torch.randn(cfg.d_in, cfg.d_sae, generator=g) / math.sqrt(cfg.d_in))
        self.b_enc.zero_()
        self.b_dec.zero_()
        if self.W_skip is not None:
            self.W_skip.zero_()
        if cfg.architecture == "jumprelu":
            self.threshold.fill_(jumprelu_init_threshold)
        return self

    # -- the forward pass --------------------------------------------------------------------
    def _check(self, x: Tensor, d: int, what: str):
        if x.shape[-1] != d:
            raise ShapeError(
                f"{what} has {x.shape[-1]} features but this dictionary ({self.cfg.hook_in} -> {self.cfg.hook_out}) "
                f"expects {d}. Is it the right hook and model?"
            )

    def encode_pre(self, x: Float[Tensor, "*rows d_in"]) -> Float[Tensor, "*rows d_sae"]:
        """Pre-activations ``(x - b_dec) @ W_enc + b_enc`` (SAEs) or ``x @ W_enc + b_enc`` (transcoders)."""
        self._check(x, self.cfg.d_in, "the input")
        x = x.to(self.W_enc.dtype)
        if self.cfg.subtracts_b_dec:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def activate(self, pre: Float[Tensor, "*rows d_sae"]) -> Float[Tensor, "*rows d_sae"]:
        """Latent activations from pre-activations, by the architecture's activation function."""
        arch = self.cfg.architecture
        if arch == "relu":
            return pre.relu()
        if arch == "topk":
            return topk_activation(pre, self.cfg.k)
        if arch == "jumprelu":
            return JumpReLUFunction.apply(pre, self.threshold, self.cfg.jumprelu_bandwidth)
        # batchtopk
        if self.batchtopk_use_threshold or not self.training:
            return pre * (pre > self.threshold).to(pre.dtype)
        rows = pre.reshape(-1, pre.shape[-1])
        return batchtopk_activation(rows, self.cfg.k).view_as(pre)

    def encode_full(self, x: Float[Tensor, "*rows d_in"]) -> Encoded:
        pre = self.encode_pre(x)
        return Encoded(pre, self.activate(pre))

    def encode(self, x: Float[Tensor, "*rows d_in"]) -> Float[Tensor, "*rows d_sae"]:
        """Latent activations ``[..., d_sae]`` (non-negative, in the dictionary's units)."""
        return self.encode_full(x).acts

    def decode(self, acts: Float[Tensor, "*rows d_sae"], x: Tensor | None = None) -> Float[Tensor, "*rows d_out"]:
        """Reconstruction ``acts @ W_dec + b_dec`` (plus ``x @ W_skip`` for skip transcoders, which need ``x``)."""
        out = acts @ self.W_dec + self.b_dec
        if self.W_skip is not None:
            if x is None:
                raise InputError("a skip transcoder's decode needs the input x for its skip connection.")
            out = out + x.to(self.W_skip.dtype) @ self.W_skip
        return out

    def forward(self, x: Float[Tensor, "*rows d_in"]) -> Float[Tensor, "*rows d_out"]:
        """The reconstruction of ``hook_out`` from ``hook_in`` activations."""
        return self.decode(self.encode(x), x)

    # -- helpers -----------------------------------------------------------------------------
    def as_intervention(self, error_term: bool = False, positions=None):
        """A :class:`~mechscope.dictionaries.splice.Splice` of this dictionary (what ``run(saes=[d])`` uses)."""
        from mechscope.dictionaries.splice import Splice

        return Splice(self, error_term=error_term, positions=positions)

    def decoder_norms(self) -> Float[Tensor, "d_sae"]:
        return self.W_dec.norm(dim=-1)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale decoder rows to unit norm (topk/batchtopk/jumprelu keep unit-norm decoders)."""
        self.W_dec.div_(self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        """Project out the gradient component along each (unit) decoder row (Gao et al. 2024, section 2.4)."""
        if self.W_dec.grad is None:
            return
        w = self.W_dec / self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        self.W_dec.grad.sub_((self.W_dec.grad * w).sum(-1, keepdim=True) * w)

    @torch.no_grad()
    def fold_scaling(self, scale_in: float, scale_out: float) -> "SparseDictionary":
        """Fold input normalisation into the weights, in place; returns self.

        A dictionary trained on ``x * scale_in`` predicting ``y * scale_out`` becomes one that reads raw
        ``x`` and writes raw ``y`` with the same latents: ``W_enc *= scale_in``, ``W_dec /= scale_out``,
        ``b_dec /= scale_out``, ``W_skip *= scale_in / scale_out``. Pre-activations (and so thresholds)
        are unchanged. For SAEs ``scale_in == scale_out``.
        """
        if self.cfg.is_sae and scale_in != scale_out:
            raise InputError("an SAE has one scale for input and output.")
        self.W_enc.mul_(scale_in)
        self.W_dec.div_(scale_out)
        self.b_dec.div_(scale_out)
        if self.W_skip is not None:
            self.W_skip.mul_(scale_in / scale_out)
        return self

    def extra_repr(self) -> str:
        c = self.cfg
        kind = "SAE" if c.is_sae else ("skip transcoder" if c.skip else "transcoder")
        k = f", k={c.k}" if c.k else ""
        return f"{kind} {c.architecture}{k}: {c.hook_in} -> {c.hook_out}, d_in={c.d_in}, d_sae={c.d_sae}"
