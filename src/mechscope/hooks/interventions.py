"""Interventions as data: frozen dataclasses that say *what* to do at a hook site.

Each intervention names a ``site`` (a concrete hook name) and optional selectors:

- ``positions``: query positions (int, list of ints, slice, or None for all);
- ``heads``: heads, for sites with a head axis (``n_heads`` or ``n_kv_heads``);
- ``batch``: batch rows (used by sweeps that stack many patched variants in one forward).

They are applied by :meth:`HookedModel.hooks` / :meth:`HookedModel.run`. Selection is done with a
broadcast boolean mask over the site's axes, so any combination of selectors has outer-product
semantics (rows x positions x heads) and the unselected entries are left bit-identical.

References:
    Activation patching: Meng et al. 2022 (ROME), "Locating and Editing Factual Associations in GPT";
    Wang et al. 2022, "Interpretability in the Wild" (IOI). Resample ablation: Chan et al. 2022,
    "Causal Scrubbing". Activation addition: Turner et al. 2023.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch
from torch import Tensor

from mechscope.core.errors import InputError, ShapeError
from mechscope.core.names import axes as site_axes

Selector = Union[int, Sequence[int], slice, None]


def _axis_mask(sel: Selector, size: int, what: str, site: str, device) -> Tensor | None:
    if sel is None:
        return None
    mask = torch.zeros(size, dtype=torch.bool, device=device)
    if isinstance(sel, slice):  # through range(): negative steps work as in Python
        mask[torch.as_tensor(range(size)[sel], dtype=torch.long, device=device)] = True
        return mask
    idx = [sel] if isinstance(sel, int) else list(sel)
    for i in idx:
        if not -size <= int(i) < size:
            raise InputError(f"{what} index {i} is out of range for {site} (size {size}).")
    mask[torch.as_tensor(idx, dtype=torch.long, device=device)] = True
    return mask


@dataclass(frozen=True)
class _Intervention:
    site: str
    positions: Selector = None
    heads: Selector = None
    batch: Selector = None

    def mask(self, value: Tensor) -> Tensor | None:
        """Boolean mask broadcastable to ``value`` selecting batch x positions x heads, or None for all."""
        names = site_axes(self.site)
        if value.dim() != len(names):
            raise ShapeError(f"{self.site}: expected {len(names)} axes {names}, got shape {tuple(value.shape)}.")
        full = None
        picks = {"batch": self.batch, "pos": self.positions}
        for axis_name, sel in picks.items():
            if sel is not None:
                if axis_name == "pos" and "pos" not in names:
                    axis_name = "kv_pos"  # keys and values: positions select the key positions
                d = names.index(axis_name)
                m = _axis_mask(sel, value.shape[d], axis_name, self.site, value.device)
                shape = [1] * value.dim()
                shape[d] = value.shape[d]
                m = m.view(shape)
                full = m if full is None else full & m
        if self.heads is not None:
            head_axes = [a for a in names if a in ("n_heads", "n_kv_heads")]
            if not head_axes:
                raise InputError(
                    f"{self.site} has no head axis (axes {names}); drop heads= or use a per-head site "
                    "such as attn.hook_z or attn.hook_result."
                )
            d = names.index(head_axes[0])
            m = _axis_mask(self.heads, value.shape[d], "head", self.site, value.device)
            shape = [1] * value.dim()
            shape[d] = value.shape[d]
            m = m.view(shape)
            full = m if full is None else full & m
        return full

    def _select(self, value: Tensor, new: Tensor) -> Tensor:
        """Return ``new`` where selected, ``value`` elsewhere (shapes validated, clear errors)."""
        try:
            new = torch.broadcast_to(new, value.shape)
        except RuntimeError:
            raise ShapeError(
                f"{type(self).__name__} at {self.site}: a value of shape {tuple(new.shape)} does not fit the "
                f"site's tensor of shape {tuple(value.shape)} (axes {site_axes(self.site)})."
            ) from None
        new = new.to(dtype=value.dtype, device=value.device)
        m = self.mask(value)
        return new if m is None else torch.where(m, new, value)

    def _batch_rows(self, value: Tensor, source: Tensor) -> Tensor:
        """Align a source with fewer batch rows to the selected rows of ``value`` (for stacked sweeps)."""
        if self.batch is None or source.dim() != value.dim() or source.shape[0] == value.shape[0]:
            return source
        rows = torch.arange(value.shape[0], device=value.device)[self.batch]
        rows = rows.reshape(-1)
        if rows.numel() != source.shape[0]:
            raise ShapeError(
                f"{type(self).__name__} at {self.site}: batch selects {rows.numel()} rows but the source "
                f"has {source.shape[0]}."
            )
        full = value.detach().clone()
        full[rows] = source.to(dtype=value.dtype, device=value.device)
        return full

    def apply(self, value: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


def _source_tensor(source: Any, site: str) -> Tensor:
    if isinstance(source, Tensor):
        return source
    if hasattr(source, "__getitem__"):  # ActivationCache or dict
        try:
            return source[site]
        except KeyError:
            raise InputError(
                f"the patch source has no value for {site}; cache it in the source run "
                f"(run(..., cache=[{site!r}]))."
            ) from None
    raise InputError(f"patch source for {site} must be a Tensor or an ActivationCache, got {type(source).__name__}.")


@dataclass(frozen=True)
class Patch(_Intervention):
    """Overwrite the selected entries with the same entries of another run.

    Attributes:
        source: a tensor of the site's full shape, or an ActivationCache / dict holding ``site``.

    Raises:
        ShapeError: if the source does not have the site's shape (e.g. clean and corrupted prompts of
            different token length).
    """

    source: Any = None

    def apply(self, value: Tensor) -> Tensor:
        src = _source_tensor(self.source, self.site)
        src = self._batch_rows(value, src)
        if tuple(src.shape) != tuple(value.shape):
            raise ShapeError(
                f"Patch at {self.site}: source shape {tuple(src.shape)} != activation shape "
                f"{tuple(value.shape)} (axes {site_axes(self.site)}). Clean and corrupted inputs must have "
                "the same number of tokens, and the source cache must not be position-sliced."
            )
        return self._select(value, src)


@dataclass(frozen=True)
class Ablate(_Intervention):
    """Ablate the selected entries.

    Attributes:
        method: ``"zero"``; ``"mean"`` (mean of ``reference`` over its batch axis, per position; with
            ``mean_over_positions=True`` also over positions); or ``"resample"`` (the value from a
            randomly drawn row of ``reference``, seeded by ``seed``).
        reference: tensor of the site's axes with any batch size (or an ActivationCache holding the site).
    """

    method: str = "zero"
    reference: Any = None
    mean_over_positions: bool = False
    seed: int = 0

    def __post_init__(self):
        if self.method not in ("zero", "mean", "resample"):
            raise InputError(f"Ablate.method must be 'zero', 'mean' or 'resample', got {self.method!r}.")
        if self.method != "zero" and self.reference is None:
            raise InputError(f"Ablate(method={self.method!r}) needs reference= activations (a tensor or cache).")

    def apply(self, value: Tensor) -> Tensor:
        if self.method == "zero":
            return self._select(value, torch.zeros((), dtype=value.dtype, device=value.device))
        ref = _source_tensor(self.reference, self.site).to(device=value.device)
        names = site_axes(self.site)
        if self.method == "mean":
            dims = [0] + ([names.index("pos")] if self.mean_over_positions and "pos" in names else [])
            new = ref.float().mean(dim=dims, keepdim=True).to(value.dtype)
        else:
            g = torch.Generator(device="cpu").manual_seed(self.seed)
            rows = torch.randint(ref.shape[0], (value.shape[0],), generator=g)
            new = ref[rows.to(ref.device)]
        return self._select(value, new)


@dataclass(frozen=True)
class Add(_Intervention):
    """Add ``scale * direction`` to the selected entries (activation steering).

    Attributes:
        direction: tensor broadcastable to the site (e.g. [d_model] for residual sites).
        scale: multiplier (same units as the activation per unit of direction).
    """

    direction: Any = None
    scale: float = 1.0

    def __post_init__(self):
        if not isinstance(self.direction, Tensor):
            raise InputError(f"Add at {self.site} needs direction= a Tensor, got {type(self.direction).__name__}.")

    def apply(self, value: Tensor) -> Tensor:
        d = self.direction.to(device=value.device, dtype=value.dtype)
        try:
            new = value + self.scale * d
        except RuntimeError:
            raise ShapeError(
                f"Add at {self.site}: direction of shape {tuple(d.shape)} does not broadcast to "
                f"{tuple(value.shape)} (axes {site_axes(self.site)})."
            ) from None
        return self._select(value, new)


@dataclass(frozen=True)
class Replace(_Intervention):
    """Replace the selected entries with a tensor, or with ``fn(value)``.

    Attributes:
        value: a tensor broadcastable to the site, or a callable ``Tensor -> Tensor`` of the same shape.
    """

    value: Tensor | Callable[[Tensor], Tensor] | None = None

    def __post_init__(self):
        if self.value is None:
            raise InputError(f"Replace at {self.site} needs value= a Tensor or a callable.")

    def apply(self, value: Tensor) -> Tensor:
        new = self.value(value) if callable(self.value) else self.value
        if not isinstance(new, Tensor):
            raise InputError(f"Replace at {self.site}: the callable returned {type(new).__name__}, not a Tensor.")
        return self._select(value, new)


Intervention = Union[Patch, Ablate, Add, Replace]
