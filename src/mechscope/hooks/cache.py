"""ActivationCache: the values (and optionally gradients) recorded at hook sites during one run."""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Iterator, Mapping

import torch
from torch import Tensor

from mechscope.core.errors import HookNameError, InputError


class _Deferred:
    """A cached value computed on first read (``hook_result`` when only cached: see ``_Session.defer_result``)."""

    __slots__ = ("compute",)

    def __init__(self, compute):
        self.compute = compute


class ActivationCache(Mapping[str, Tensor]):
    """A read-only mapping hook name -> tensor, in forward order, plus gradients when requested.

    Tensors have the axes listed in :data:`mechscope.core.names.SITES`, sliced along ``pos`` when the
    run asked for ``cache_positions`` (then :attr:`positions` records the selector). A value no edit or hook
    function needed during the forward may be computed when first read (``hook_result``: per-head outputs,
    n_heads times the memory of the attention output); reading it gives the same tensor either way.
    """

    def __init__(self, positions=None):
        self._values: dict[str, Tensor] = {}
        self.grads: dict[str, Tensor] = {}
        self.positions = positions

    def _set(self, name: str, value: Tensor) -> None:
        self._values[name] = value

    def _defer(self, name: str, compute) -> None:
        self._values[name] = _Deferred(compute)

    def _get(self, name: str) -> Tensor:
        v = self._values[name]
        if isinstance(v, _Deferred):
            v = self._values[name] = v.compute()
        return v

    def __getitem__(self, name: str) -> Tensor:
        try:
            return self._get(name)
        except KeyError:
            close = difflib.get_close_matches(name, list(self._values), n=3, cutoff=0.5)
            raise HookNameError(
                f"{name!r} was not cached in this run. Cached: {len(self._values)} names"
                + (f"; closest: {close}" if close else "")
                + f". Ask for it with run(..., cache=[{name!r}])."
            ) from None

    def grad(self, name: str) -> Tensor:
        """Gradient of the run's backward metric w.r.t. the activation at ``name``."""
        if name not in self.grads:
            raise HookNameError(
                f"no gradient for {name!r}: pass backward=<metric fn> to run() and cache {name!r}."
            )
        return self.grads[name]

    def __contains__(self, name: object) -> bool:  # Mapping's default goes through __getitem__'s fuzzy error
        return name in self._values

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"ActivationCache({len(self)} names, grads for {len(self.grads)})"

    def stack(self, pattern: str) -> Tensor:
        """Stack every cached value whose name matches a glob into a new leading axis (forward order).

        Raises:
            HookNameError: if nothing cached matches.
            InputError: if the matches have different shapes, or lie on different devices (a model split with
                ``device_map`` keeps each value on its module's device unless ``run(cache_device=...)`` says where).
        """
        names = [n for n in self._values if fnmatch.fnmatch(n, pattern)]
        if not names:
            raise HookNameError(f"no cached name matches {pattern!r}; cached: {list(self._values)[:8]}...")
        values = [self._get(n) for n in names]
        shapes = {tuple(v.shape) for v in values}
        if len(shapes) > 1:
            raise InputError(f"cannot stack {pattern!r}: shapes differ {sorted(shapes)}.")
        devices = list(dict.fromkeys(str(v.device) for v in values))
        if len(devices) > 1:
            raise InputError(f"cannot stack {pattern!r}: the values lie on {', '.join(devices)} (a model split over "
                             "devices caches each value where its layer runs). Gather them with "
                             "run(..., cache_device='cpu') (or one GPU), or move them first.")
        return torch.stack(values)
