"""Norms with a frozen scale, and the model's own unembedding (private helpers of the analyses).

A norm ``y = g * (x - centre(x)) / scale(x) + b`` is linear in ``x`` once ``scale(x)`` is held at the
value it takes on the real input: that is what direct logit attribution needs to split a residual
stream into additive parts. The flavours follow :attr:`Adapter.norm`:

- ``"rms"``: ``y = w * x / sqrt(mean(x^2) + eps)`` (Llama, Mistral, Qwen);
- ``"rms1p"``: the same with gain ``1 + w`` (Gemma);
- ``"layer"``: ``y = w * (x - mean(x)) / sqrt(var(x) + eps) + b`` (GPT-2, GPT-NeoX).

Shape suffixes on locals: B batch, D d_model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mechscope.core.errors import MechscopeError


def _up(x: Tensor) -> Tensor:
    """float32, or float64 kept (a linearisation in float64 stays exact to float64 rounding)."""
    return x if x.dtype == torch.float64 else x.float()


@dataclass(frozen=True)
class FrozenNorm:
    """A norm linearised at one input: ``y = centre(x) * scale * gain + bias``.

    Attributes:
        scale: [..., 1] float32 (float64 for float64 input), 1 / sqrt(mean square (+eps)) of the real input
            (dimensionless per unit).
        gain: [d_model] float32 elementwise gain (``w``, or ``1 + w`` for Gemma).
        bias: [d_model] float32 additive bias, or None.
        centre: whether the norm subtracts the mean over d_model first (LayerNorm).
    """

    scale: Tensor
    gain: Tensor
    bias: Tensor | None
    centre: bool

    def linear(self, x: Tensor) -> Tensor:
        """The linear part applied to ``x`` [..., d_model] (no bias), float32 (float64 for float64 input)."""
        x = _up(x)
        if self.centre:
            x = x - x.mean(-1, keepdim=True)
        return x * self.scale * self.gain

    def __call__(self, x: Tensor) -> Tensor:
        y = self.linear(x)
        return y + self.bias if self.bias is not None else y

    def readout(self, direction: Tensor) -> Tensor:
        """The vector ``u`` with ``linear(x) . direction == x . u`` (direction [..., d_model])."""
        u = direction.float() * self.scale * self.gain
        return u - u.mean(-1, keepdim=True) if self.centre else u


def freeze_norm(model, module: nn.Module, x: Tensor, *, expected: Tensor | None = None) -> FrozenNorm:
    """Linearise ``module`` (a norm of the model's kind) at its real input ``x`` [..., d_model].

    Args:
        model: the HookedModel (its adapter says the norm flavour).
        module: the norm module itself (its weight, bias and epsilon are read).
        x: the real input of the norm.
        expected: the module's real output for ``x``; when given, the linearisation is checked
            against it.

    Raises:
        MechscopeError: if the re-computed norm does not reproduce ``expected`` (an adapter that
            names the wrong norm flavour); nothing is returned silently wrong.
    """
    kind = model.adapter.norm
    eps = getattr(module, "variance_epsilon", None)
    if eps is None:
        eps = getattr(module, "eps", 1e-5)
    d = x.shape[-1]
    xf = _up(x)
    w = getattr(module, "weight", None)
    w = torch.ones(d, dtype=xf.dtype, device=x.device) if w is None else w.detach().to(xf.dtype)
    b = getattr(module, "bias", None)
    b = None if b is None else b.detach().to(xf.dtype)
    if kind == "layer":
        var = xf.var(-1, keepdim=True, unbiased=False)
        frozen = FrozenNorm(torch.rsqrt(var + eps), w, b, centre=True)
    elif kind in ("rms", "rms1p"):
        ms = xf.pow(2).mean(-1, keepdim=True)
        frozen = FrozenNorm(torch.rsqrt(ms + eps), 1.0 + w if kind == "rms1p" else w, b, centre=False)
    else:  # pragma: no cover - adapters only use the three kinds
        raise MechscopeError(f"unknown norm kind {kind!r} in the {model.cfg.family} adapter.")
    if expected is not None:
        got, want = frozen(x), expected.float()
        tol = 1e-3 if x.dtype == torch.float32 else 5e-2
        err = (got - want).norm() / want.norm().clamp_min(1e-12)
        if err > tol:
            raise MechscopeError(
                f"re-computing {type(module).__name__} as a {kind!r} norm misses its real output by {float(err):.2e} "
                f"(relative). The {model.cfg.family} adapter's norm flavour does not describe this module; fix "
                "`norm` in mechscope/models/adapters.py."
            )
    return frozen


def softcap(model) -> float | None:
    """The final-logit tanh soft-cap of this model (Gemma 2), or None."""
    attr = model.adapter.logit_softcap_config
    return getattr(model.hf.config, attr, None) if attr else None


def unembed(model, normed: Tensor) -> Tensor:
    """Logits from a final-norm output [..., d_model] through the model's own lm_head and soft-cap."""
    logits = model.module(model.adapter.unembed)(normed.to(model.dtype)).float()
    cap = softcap(model)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits
