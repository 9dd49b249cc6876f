"""A second device for CPU-only machines: ``fakegpu``, whose tensors hold CPU data and raise the error CUDA raises
when an op mixes them with CPU tensors. Code that runs on it without error keeps every tensor where its model is,
as it must to run on a GPU; its numbers are the CPU's (the same kernels run underneath).

How: PyTorch's PrivateUse1 backend renamed ``fakegpu`` with a Python device guard (so the bindings that guard a
device accept it), a wrapper tensor subclass that says it is on ``fakegpu:0`` and holds a CPU tensor, a dispatch
mode that runs every op on the CPU tensors and re-wraps the results (factories with ``device="fakegpu"``
included), and a function mode for the few Python bindings that never reach the dispatcher (``Tensor.to``,
``copy_``, ``tolist``, ``torch.tensor(..., device=)``, list indices; a vector's matmul, whose in-place squeeze a
wrapper's fixed shape cannot follow).

The rules follow CUDA's: a non-scalar CPU tensor beside a device tensor is an error except in copies and as an
index; a 0-dim CPU tensor is a scalar for elementwise ops but not for ``cat``, ``searchsorted``, matmuls,
``index_add``, ``equal``; ``.numpy()`` of a device tensor is an error. Autocast on the device is accepted but casts
nothing (no autocast kernels exist for a Python backend), so bf16-autocast code runs there in float32.

Import this module before anything runs a backward pass in the process (the autograd engine counts devices once),
in a fresh interpreter: it changes the process for good (PrivateUse1 can be renamed once). Uses PyTorch's private
backend-registration API (``torch.utils.backend_registration``), checked on torch 2.13.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.backend_registration import _setup_privateuseone_for_python_backend

NAME = "fakegpu"
aten = torch.ops.aten

#: What was refused, in order (a test asserts it stays empty).
violations: list[str] = []

_CROSS = {aten.copy_.default, aten._to_copy.default, aten.lift_fresh.default, aten.detach.default}
_INDEXING = {aten.index.Tensor, aten.index_put_.default, aten.index_put.default, aten._index_put_impl_.default}
_NO_SCALAR = {aten.searchsorted.Tensor, aten.cat.default, aten.stack.default, aten.mm.default, aten.bmm.default,
              aten.matmul.default, aten.addmm.default, aten.index_add_.default, aten.index_add.default,
              aten.equal.default}
_SCALAR_OUT = {aten._local_scalar_dense.default, aten.equal.default, aten.is_nonzero.default}


class _Guard(torch._C._acc.DeviceGuard):
    def type_(self):
        return torch._C._autograd.DeviceType.PrivateUse1

    def device_count(self):
        return 1


class _Module:
    """``torch.fakegpu``: what torch asks of a backend's module (availability, seeding, autocast dtypes)."""

    @staticmethod
    def is_available() -> bool:
        return True

    @staticmethod
    def is_initialized() -> bool:
        return True

    @staticmethod
    def device_count() -> int:
        return 1

    @staticmethod
    def current_device() -> int:
        return 0

    @staticmethod
    def _is_in_bad_fork() -> bool:
        return False

    @staticmethod
    def manual_seed_all(seed: int) -> None:
        pass

    @staticmethod
    def get_amp_supported_dtype() -> list:
        return [torch.bfloat16, torch.float16]


_setup_privateuseone_for_python_backend(rename=NAME, backend_module=_Module(), device_guard=_Guard())
# autocast on the device is accepted and does nothing (PyTorch registers no autocast kernels for a Python backend):
# code that autocasts runs, in its input dtypes
_AUTOCAST = torch.library.Library("_", "IMPL", "AutocastPrivateUse1")
_AUTOCAST.fallback(torch.library.fallthrough_kernel)
DEVICE = torch.device(NAME, 0)


class DeviceTensor(torch.Tensor):
    """A tensor on ``fakegpu:0`` holding the CPU tensor ``elem``."""

    elem: torch.Tensor

    @staticmethod
    def __new__(cls, elem: torch.Tensor):
        r = torch.Tensor._make_wrapper_subclass(cls, elem.shape, strides=elem.stride(),
                                                storage_offset=elem.storage_offset(), dtype=elem.dtype,
                                                layout=elem.layout, device=DEVICE, requires_grad=elem.requires_grad)
        r.elem = elem
        return r

    def __repr__(self):
        return f"DeviceTensor({self.elem!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return _run(func, args, kwargs or {})


def _on_device(d) -> bool:
    return d is not None and torch.device(d).type == NAME


def _unwrap(x):
    return x.elem if isinstance(x, DeviceTensor) else x


def _run(func, args, kwargs):
    flat, _ = tree_flatten((args, kwargs))
    dev = [t for t in flat if isinstance(t, DeviceTensor)]
    cpu = [t for t in flat if isinstance(t, torch.Tensor) and not isinstance(t, DeviceTensor)]
    if dev and cpu and func not in _CROSS:
        if func in _INDEXING:  # CPU index tensors are allowed; self and values must be on the device
            bad = [t for t in cpu if not any(t is i for i in args[1] if i is not None)]
        else:
            bad = [t for t in cpu if t.dim() > 0 or func in _NO_SCALAR]
        if bad:
            msg = f"{func} mixes {NAME} tensors with CPU tensors of shapes {[tuple(t.shape) for t in bad]}"
            violations.append(msg)
            raise RuntimeError(f"Expected all tensors to be on the same device: {msg}")
    a, kw = tree_map(_unwrap, args), tree_map(_unwrap, kwargs)
    if "device" in kw:
        wrap = _on_device(kw["device"])
        if wrap:
            kw = {**kw, "device": torch.device("cpu")}
    else:
        wrap = bool(dev)
    with _disable_current_modes():
        out = func(*a, **kw)
    if func is aten.copy_.default:
        return args[0]  # the destination keeps its device
    if func in _SCALAR_OUT or not wrap:
        return out
    return tree_map(lambda t: DeviceTensor(t) if type(t) is torch.Tensor else t, out)


class _DispatchMode(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat, _ = tree_flatten((args, kwargs))
        if any(isinstance(t, DeviceTensor) for t in flat) or _on_device(kwargs.get("device")):
            return _run(func, args, kwargs)
        return func(*args, **kwargs)


def _to_args(args, kwargs):
    device, dtype = kwargs.get("device"), kwargs.get("dtype")
    for x in args:
        if isinstance(x, torch.dtype):
            dtype = x
        elif isinstance(x, torch.Tensor):
            device, dtype = x.device, x.dtype
        elif isinstance(x, (str, torch.device)) or (isinstance(x, int) and not isinstance(x, bool)):
            device = x
    if isinstance(device, int):
        device = torch.device(NAME, device)
    return (torch.device(device) if device is not None else None), dtype


class _FunctionMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.copy_:
            return aten.copy_.default(args[0], args[1])
        if func is torch.Tensor.to:
            x = args[0]
            device, dtype = _to_args(args[1:], kwargs)
            device = x.device if device is None else device
            dtype = x.dtype if dtype is None else dtype
            if device.type == x.device.type and dtype == x.dtype and not kwargs.get("copy", False):
                return x
            return aten._to_copy.default(x, dtype=dtype, **({} if device.type == x.device.type else
                                                             {"device": device}))
        if func in (torch.tensor, torch.as_tensor) and _on_device(kwargs.get("device")):
            return aten._to_copy.default(func(*args, **{**kwargs, "device": "cpu"}), device=DEVICE)
        if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__) and isinstance(args[0], DeviceTensor):
            # a list index becomes a tensor on the indexed tensor's device inside the binding, past the modes; as a
            # CPU index tensor it means the same and reaches them
            idx = args[1] if isinstance(args[1], tuple) else (args[1],)
            if any(isinstance(i, list) for i in idx):
                idx = tuple(torch.tensor(i) if isinstance(i, list) else i for i in idx)
                return func(args[0], idx, *args[2:])
        if func in (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.Tensor.__rmatmul__):
            a, b = (args[1], args[0]) if func is torch.Tensor.__rmatmul__ else (args[0], args[1])
            if DeviceTensor in (type(a), type(b)) and 1 in (a.dim(), b.dim()):
                # matmul of a vector squeezes its result in place (squeeze_), which a wrapper tensor's fixed
                # shape cannot follow: the same product out of place
                if a.dim() == 1 and b.dim() == 1:
                    return (a * b).sum()
                if a.dim() == 1:
                    return torch.matmul(a.unsqueeze(0), b).squeeze(-2)
                return torch.matmul(a, b.unsqueeze(-1)).squeeze(-1)
        if func is torch.Tensor.tolist and isinstance(args[0], DeviceTensor):
            return args[0].elem.tolist()
        if func in (torch.Tensor.numpy, torch.Tensor.__array__) and isinstance(args[0], DeviceTensor):
            violations.append("numpy() of a device tensor")
            raise TypeError(f"can't convert {NAME}:0 device type tensor to numpy. Use Tensor.cpu() first.")
        return func(*args, **kwargs)


def enable() -> None:
    """Turn the device on for the rest of the process (both modes stay entered)."""
    _DispatchMode().__enter__()
    _FunctionMode().__enter__()
