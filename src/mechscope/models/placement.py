"""Placement of a model across devices: ``device_map`` / ``max_memory`` / disk offload through accelerate.

A model loaded with ``device_map`` is split by accelerate: each block runs on its own device, and blocks that do
not fit the ``max_memory`` budget stay on disk (or in CPU memory, for a GPU run) with their parameters on the
``meta`` device until their forward, when accelerate's hook reads them in, runs the block on its *execution
device*, and drops them again. mechscope's hooks are plain PyTorch hooks on those same modules, so each site
fires on the execution device of the module it sits on; this module holds what the rest needs besides: checking
the arguments before a load, reading an offloaded weight outside a forward (``W_O``, ``W_U``, ...), the device
inputs go to, and a table of what runs where.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from mechscope.core.errors import InputError, ModelLoadError

#: The strategies accelerate accepts as a string ``device_map``.
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
#: Placements that hold weights without running them (the block runs on the main device).
OFFLOAD_PLACES = ("disk",)


def _available(kind: str) -> int:
    """Devices of ``kind`` this process can use (cuda, xpu, mps); 0 when the torch build lacks it."""
    mod = getattr(torch, kind, None)
    if kind == "mps":
        return int(torch.backends.mps.is_available())
    try:
        return mod.device_count() if mod is not None and mod.is_available() else 0
    except (AssertionError, RuntimeError):  # a torch build without that backend
        return 0


def check_device(device, what: str, *, allow_disk: bool = False) -> None:
    """Raise InputError unless ``device`` is a device this machine has (``disk`` too when ``allow_disk``).

    Accepts what accelerate accepts: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"``, an int or digit string (GPU N),
    a ``torch.device``, and ``"disk"`` where offload is meant.
    """
    if allow_disk and device == "disk":
        return
    spec = f"cuda:{device}" if isinstance(device, int) or (isinstance(device, str) and device.isdigit()) else device
    try:
        dev = torch.device(spec)
    except (RuntimeError, TypeError):
        places = "cpu, cuda:N (or just N), mps" + (", disk" if allow_disk else "")
        raise InputError(f"{what}: {device!r} is not a device; use one of {places}.") from None
    if dev.type == "meta":
        raise InputError(f"{what}: 'meta' holds no values; use cpu" + (" or disk (offload)." if allow_disk else "."))
    if dev.type == "cpu":
        return
    n = _available(dev.type)
    index = dev.index or 0
    if index >= n:
        have = f"{n} {dev.type} device(s)" if n else f"no {dev.type} device (or a torch build without it)"
        raise InputError(f"{what}: {device!r} is not on this machine, which has {have}; use cpu"
                         + (", disk" if allow_disk else "") + (f" or {dev.type}:0..{n - 1}." if n else "."))


def check_placement(device, device_map, max_memory, offload_folder) -> None:
    """Check the placement arguments of :func:`mechscope.load` before anything is read.

    Raises:
        InputError: ``device`` with ``device_map``; ``max_memory`` or ``offload_folder`` without ``device_map``; an
            unknown strategy or device; a ``max_memory`` value that is not a size.
    """
    if device_map is None:
        extra = [n for n, v in (("max_memory", max_memory), ("offload_folder", offload_folder)) if v is not None]
        if extra:
            raise InputError(f"{' and '.join(extra)} only apply to a split model; pass device_map='auto' as well "
                             "(accelerate then fills each device up to max_memory and puts the rest on disk).")
        return
    if device is not None:
        raise InputError(f"pass either device={device!r} or device_map, not both: device_map places every module "
                         "itself (use device_map={'': 'cuda:0'} to put the whole model on one device).")
    if isinstance(device_map, str):
        if device_map not in DEVICE_MAP_STRATEGIES:
            check_device(device_map, "device_map")
    elif isinstance(device_map, Mapping):
        if not device_map:
            raise InputError("device_map is empty; map module names to devices, e.g. {'': 'cpu'}, or pass 'auto'.")
        for name, dev in device_map.items():
            check_device(dev, f"device_map[{name!r}]", allow_disk=True)
    else:
        raise InputError(f"device_map must be a strategy ({', '.join(DEVICE_MAP_STRATEGIES)}), a device, or a dict "
                         f"module name -> device; got {type(device_map).__name__}.")
    if max_memory is not None:
        if not isinstance(max_memory, Mapping) or not max_memory:
            raise InputError("max_memory must be a dict device -> size, e.g. {0: '20GiB', 'cpu': '60GiB'}.")
        from accelerate.utils import convert_file_size_to_int

        for dev, size in max_memory.items():
            check_device(dev, f"max_memory[{dev!r}]", allow_disk=True)
            try:
                if convert_file_size_to_int(size) < 0:
                    raise ValueError
            except (ValueError, TypeError, AttributeError):  # AttributeError: a float
                raise InputError(f"max_memory[{dev!r}] = {size!r} is not a size; give bytes (an int) or a string "
                                 "such as '20GiB' or '500MB'.") from None


def load_kwargs(device_map, max_memory, offload_folder) -> dict:
    """The ``from_pretrained`` keyword arguments for a placement (empty without ``device_map``)."""
    if device_map is None:
        return {}
    kw = {"device_map": device_map}
    if max_memory is not None:  # accelerate wants GPU indices as ints; the CLI gives strings
        kw["max_memory"] = {int(k) if isinstance(k, str) and k.isdigit() else k: v for k, v in max_memory.items()}
    if offload_folder is not None:
        kw["offload_folder"] = str(offload_folder)
    return kw


def placement_error(e: Exception, source: str) -> ModelLoadError | None:
    """A ModelLoadError naming the fix for transformers' placement errors, or None for other errors."""
    text = str(e)
    if "offload_folder" in text:
        return ModelLoadError(
            f"{source}: part of the model goes to disk (the device_map or max_memory leaves it no room elsewhere), "
            "and its weights are not safetensors (e.g. a .bin or GGUF checkpoint), so they must be re-saved there "
            "first. Fix: pass offload_folder=<a folder with room for them> (CLI: --offload-folder), or raise "
            "max_memory so nothing goes to disk.")
    if "device_map" in text or "max_memory" in text or "not recognized" in text:
        return ModelLoadError(f"{source}: accelerate refused the placement ({text.splitlines()[0][:300]}). Fix: "
                              "pass device_map='auto' with max_memory={device: size} over the devices this "
                              "machine has (cpu, disk, GPU indices).")
    return None


def _place_of(param: str, device_map: Mapping):
    """The device_map entry that holds a parameter: its longest module-name prefix."""
    best = None
    for k in device_map:
        if (k == "" or param == k or param.startswith(k + ".")) and (best is None or len(k) > len(best)):
            best = k
    return None if best is None else device_map[best]


def check_device_map_modules(hf: nn.Module, device_map) -> None:
    """Check a dict ``device_map`` against the loaded model.

    Raises:
        InputError: it names modules the model lacks (accelerate would ignore them), or it puts the two ends of a
            tied weight (e.g. GPT-2's unembedding, which is its embedding) in different places, one of them disk
            (accelerate cannot read the offloaded end: the forward would fail with a KeyError).
    """
    if not isinstance(device_map, Mapping):
        return
    names = dict(hf.named_modules())
    unknown = [k for k in device_map if k not in names]
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(names), n=3, cutoff=0.5)
        raise InputError(f"device_map names modules this model lacks: {unknown[:4]}"
                         + (f"; closest: {close}" if close else "")
                         + ". Use names from model.named_modules() ('' is the whole model), or device_map='auto'.")
    for target, source in (getattr(hf, "all_tied_weights_keys", None) or {}).items():
        places = {_device_of(_place_of(target, device_map)), _device_of(_place_of(source, device_map))}
        if len(places) > 1 and "disk" in places:
            t, s = target.rsplit(".", 1)[0], source.rsplit(".", 1)[0]
            raise InputError(f"device_map puts {t!r} and {s!r} in different places ({' and '.join(sorted(places))}), "
                             f"but they share one tied weight ({target} is {source}), which cannot be read from disk "
                             f"for one and from memory for the other. Map both to the same device, or use "
                             "device_map='auto' (it keeps tied modules together).")


def _align_hook(module: nn.Module):
    """accelerate's AlignDevicesHook on ``module`` (also inside a SequentialHook), or None."""
    hook = getattr(module, "_hf_hook", None)
    for h in getattr(hook, "hooks", (hook,)):
        if h is not None and hasattr(h, "execution_device"):
            return h
    return None


def materialized(module: nn.Module, name: str) -> Tensor | None:
    """``module.<name>`` (a parameter or buffer) with real values, also when accelerate offloaded it.

    An offloaded tensor sits on ``meta`` outside its module's forward; this reads it from accelerate's weights map
    (disk or CPU memory) onto the module's execution device, in the parameter's dtype. Other tensors are returned
    as they are (no copy).

    Raises:
        ModelLoadError: a ``meta`` tensor with no accelerate hook to read it from (a model built on meta and never
            loaded).
    """
    t = getattr(module, name, None)
    if t is None or t.device.type != "meta":
        return t
    hook = _align_hook(module)
    weights = getattr(hook, "weights_map", None)
    if weights is None:
        raise ModelLoadError(f"{type(module).__name__}.{name} is on the meta device with no offloaded copy to read: "
                             "the model was built without weights. Load it with mechscope.load (device_map='auto' "
                             "to offload) instead.")
    value = weights[name]
    return value.to(device=torch.device(_device_of(hook.execution_device)), dtype=t.dtype)


def _device_of(d):
    return f"cuda:{d}" if isinstance(d, int) else d


def input_device(hf: nn.Module) -> torch.device:
    """Where token ids go and logits come back: accelerate's main device for a split model, else the first
    parameter's device."""
    hook = _align_hook(hf)
    if hook is not None and hook.execution_device is not None:
        return torch.device(_device_of(hook.execution_device))
    for p in hf.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def placement(hf: nn.Module) -> dict[str, str]:
    """What runs where: module name -> ``"cpu"``, ``"cuda:N"``, or ``"disk -> cpu"`` (stored on disk, run on cpu);
    ``{"": device}`` for a model that was not split."""
    dm = getattr(hf, "hf_device_map", None)
    if not dm:
        return {"": str(input_device(hf))}
    main = str(input_device(hf))
    out = {}
    for name, dev in dm.items():
        dev = _device_of(dev)
        out[name] = f"{dev} -> {main}" if dev in OFFLOAD_PLACES or (dev == "cpu" and main != "cpu") else str(dev)
    return out
