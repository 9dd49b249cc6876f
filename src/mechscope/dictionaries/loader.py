"""One loader for every dictionary folder: mechscope's own format (:mod:`mechscope.dictionaries.io`), and SAELens
and EleutherAI sparsify folders through their converters (:mod:`mechscope.dictionaries.interop`)."""

from __future__ import annotations

from pathlib import Path

from mechscope.core.io import load_safetensors
from mechscope.dictionaries.config import DictionaryConfig
from mechscope.dictionaries.interop import load_foreign
from mechscope.dictionaries.io import WEIGHTS, detect_format, from_tensors, read_cfg_json
from mechscope.dictionaries.model import SparseDictionary


def load_dictionary(folder: str | Path, *, device=None, hook: str | None = None) -> SparseDictionary:
    """Load a dictionary from a mechscope, SAELens or sparsify folder.

    Args:
        hook: for SAELens/sparsify files that do not record their hook name, the hook to attach
            (e.g. ``blocks.6.hook_resid_post``); overrides the recorded one if given.

    Returns:
        The dictionary, in eval mode; its ``source`` is ``folder`` (error messages name its cfg.json).

    Raises:
        InputError: unknown layout, a bad cfg.json.
        CorruptFileError: a truncated or corrupted weights file, or tensors that do not match the cfg.
    """
    folder = Path(folder)
    fmt = detect_format(folder)
    if fmt != "mechscope":
        d = load_foreign(folder, fmt, device=device, hook=hook)
    else:
        cfg = DictionaryConfig.from_dict(read_cfg_json(folder))
        if hook is not None:
            cfg = cfg.replace(hook_in=hook, hook_out=hook if cfg.is_sae else cfg.hook_out)
        tensors = load_safetensors(folder / WEIGHTS, what="dictionary weights")
        d = from_tensors(cfg, tensors, source=str(folder / WEIGHTS), device=device)
    d.source = str(folder)
    return d

