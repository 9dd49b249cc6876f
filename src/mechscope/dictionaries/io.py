"""mechscope's on-disk format for dictionaries: a folder with ``cfg.json`` beside ``dictionary.safetensors``.

``cfg.json`` is :meth:`DictionaryConfig.to_dict` (it has an ``architecture`` key and a ``format_version``);
``dictionary.safetensors`` holds ``W_enc [d_in, d_sae]``, ``b_enc``, ``W_dec [d_sae, d_out]``, ``b_dec`` and,
where the architecture has them, ``W_skip`` and ``threshold``. Input normalisation is folded into the
weights before saving (see :meth:`SparseDictionary.fold_scaling`), so the file reads raw activations.

A folder is written whole or not at all: into a temporary sibling folder, then renamed into place.
SAELens and EleutherAI sparsify folders are read and written by :mod:`mechscope.dictionaries.interop`;
:func:`detect_format` says which a folder holds, and :func:`mechscope.dictionaries.loader.load_dictionary`
reads any of them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mechscope.core.errors import CorruptFileError, InputError
from mechscope.core.io import save_safetensors_atomic, write_folder_atomic, write_json_atomic
from mechscope.dictionaries.config import DictionaryConfig
from mechscope.dictionaries.model import SparseDictionary

WEIGHTS = "dictionary.safetensors"
CFG = "cfg.json"


def state_tensors(d: SparseDictionary) -> dict[str, torch.Tensor]:
    """The tensors that define a dictionary (parameters and the batchtopk threshold buffer)."""
    out = {"W_enc": d.W_enc, "b_enc": d.b_enc, "W_dec": d.W_dec, "b_dec": d.b_dec}
    if d.W_skip is not None:
        out["W_skip"] = d.W_skip
    if d.threshold is not None:
        out["threshold"] = d.threshold
    return {k: v.detach() for k, v in out.items()}


def expected_shapes(cfg: DictionaryConfig) -> dict[str, tuple[int, ...]]:
    shapes = {"W_enc": (cfg.d_in, cfg.d_sae), "b_enc": (cfg.d_sae,), "W_dec": (cfg.d_sae, cfg.d_out),
              "b_dec": (cfg.d_out,)}
    if cfg.skip:
        shapes["W_skip"] = (cfg.d_in, cfg.d_out)
    if cfg.architecture in ("jumprelu", "batchtopk"):
        shapes["threshold"] = (cfg.d_sae,)
    return shapes


def from_tensors(cfg: DictionaryConfig, tensors: dict[str, torch.Tensor], *, source: str = "the file",
                 device=None) -> SparseDictionary:
    """Build a dictionary from a config and its tensors, checking names and shapes.

    Raises:
        CorruptFileError: a tensor is missing, unexpected, or of the wrong shape for the config.
    """
    want = expected_shapes(cfg)
    missing = sorted(set(want) - set(tensors))
    extra = sorted(set(tensors) - set(want))
    if missing or extra:
        raise CorruptFileError(f"{source} does not match its cfg ({cfg.architecture}, d_in={cfg.d_in}, "
                               f"d_sae={cfg.d_sae}): missing tensors {missing}, unexpected {extra}.")
    for k, shape in want.items():
        if tuple(tensors[k].shape) != shape:
            raise CorruptFileError(f"{source}: {k} has shape {tuple(tensors[k].shape)} but the cfg says {shape}.")
        if tensors[k].is_floating_point() and not torch.isfinite(tensors[k]).all():
            raise CorruptFileError(f"{source}: {k} contains NaN or infinite values; the dictionary is unusable.")
    d = SparseDictionary(cfg, device=device)
    with torch.no_grad():
        for k, v in tensors.items():
            getattr(d, k).copy_(v)
    if cfg.architecture == "batchtopk":
        d.batchtopk_use_threshold = True
    return d.eval()


def save_dictionary(d: SparseDictionary, folder: str | Path) -> Path:
    """Save in mechscope's format (``cfg.json`` + ``dictionary.safetensors``), atomically.

    Raises:
        DiskFullError: the disk filled up; an earlier dictionary in ``folder`` is left intact.
    """
    def write(tmp: Path):
        save_safetensors_atomic(state_tensors(d), tmp / WEIGHTS, metadata={"format": "mechscope"})
        write_json_atomic(d.cfg.to_dict(), tmp / CFG)

    return write_folder_atomic(folder, write)


def detect_format(folder: str | Path) -> str:
    """``"mechscope"``, ``"saelens"`` or ``"sparsify"``, from the files in a folder.

    Raises:
        InputError: the folder is missing or holds none of the known layouts.
    """
    folder = Path(folder)
    if not folder.is_dir():
        stranded = sorted(folder.parent.glob(folder.name + ".old-*")) if folder.parent.is_dir() else []
        if stranded:  # a save was killed between its two renames: the previous dictionary is intact there
            raise InputError(f"{folder} is missing, but {stranded[-1]} holds the dictionary that was there: a save "
                             f"was interrupted while replacing it. Restore it with: mv '{stranded[-1]}' '{folder}'")
        raise InputError(f"{folder} is not a folder; a dictionary is a folder with cfg.json and *.safetensors.")
    if (folder / WEIGHTS).exists():
        return "mechscope"
    if (folder / "sae_weights.safetensors").exists():
        return "saelens"
    if (folder / "sae.safetensors").exists():
        return "sparsify"
    subs = sorted(p.name for p in folder.iterdir() if p.is_dir() and (p / "sae.safetensors").exists())
    hint = f" It holds sparsify hookpoint folders {subs[:5]}: pass one of them." if subs else ""
    raise InputError(
        f"{folder} holds no dictionary: expected cfg.json with {WEIGHTS} (mechscope), sae_weights.safetensors "
        f"(SAELens) or sae.safetensors (sparsify).{hint}"
    )


def read_cfg_json(folder: Path) -> dict:
    path = Path(folder) / CFG
    if not path.is_file():
        raise InputError(f"{path} is missing; a dictionary folder needs its cfg.json.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptFileError(f"{path} is not valid JSON ({e}); restore it or re-save the dictionary.") from e
