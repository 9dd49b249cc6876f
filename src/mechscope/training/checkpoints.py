"""Training checkpoints that reshard: safetensors + JSON only, written by one rank per latent shard, read back at
any world size and any ``tp``.

A checkpoint folder ``checkpoints/step_XXXXXXXX/`` holds ``state.json`` (step, data cursor ``tokens =
step * batch_tokens``, the run record, scales, BatchTopK threshold) and, per dictionary, either one file
``<name>.safetensors`` (one process or data parallel: the replicas are identical, rank 0 writes) or ``tp`` files
``<name>.shard{t}-of{T}.safetensors`` (latent sharded: the first replica's rank of each shard writes its own
weights, Adam moments and dead-latent counters). Keys: ``dict.<tensor>``, ``adam.<param index>.<state>``,
``tokens_since_fired``.

Loading merges the shards along the latent axis (:data:`~mechscope.training.tensor_parallel.LATENT_AXIS`;
Adam's moments follow their parameter) and slices them for the loading rank's shard, so a run saved at
``dp × tp = 2 × 1`` resumes at ``1 × 1`` or ``1 × 2`` with identical tensors. ``torch.distributed.checkpoint``
is not used: its metadata is a pickle.

The folder appears complete or not at all: shard files go to ``step_XXXXXXXX.shards/`` first, then rank 0
moves them, with ``state.json``, into place atomically after a barrier.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from torch import Tensor

from mechscope.core.errors import CorruptFileError, InputError
from mechscope.core.io import load_safetensors, save_safetensors_atomic, write_folder_atomic, write_json_atomic
from mechscope.dictionaries.io import state_tensors
from mechscope.training.tensor_parallel import LATENT_AXIS, shard_bounds

_SHARD = re.compile(r"^(?P<name>.+)\.shard(?P<t>\d+)-of(?P<T>\d+)\.safetensors$")


def member_tensors(m) -> dict[str, Tensor]:
    """A member's checkpoint tensors (its shard's, under latent sharding)."""
    tensors = {f"dict.{k}": v for k, v in state_tensors(m.dictionary).items()}
    for idx, st in m.optimizer.state_dict()["state"].items():
        for k, v in st.items():
            tensors[f"adam.{idx}.{k}"] = v if isinstance(v, Tensor) else torch.tensor(v)
    tensors["tokens_since_fired"] = m.tokens_since_fired
    return {k: v.detach().cpu() for k, v in tensors.items()}


def _axis(key: str, param_names: list[str]) -> int | None:
    """The latent axis of a checkpoint tensor (None: replicated)."""
    if key == "tokens_since_fired":
        return 0
    if key.startswith("dict."):
        return LATENT_AXIS.get(key[5:])
    _, idx, state = key.split(".", 2)
    return None if state == "step" else LATENT_AXIS.get(param_names[int(idx)])


def save_checkpoint(root: Path, members, step: int, state: dict, layout, keep: int) -> Path | None:
    """Write ``root/step_XXXXXXXX`` (see the module docstring); returns it on rank 0, None elsewhere.

    Every rank must call it (a barrier under latent sharding); ``state`` is ``state.json``'s content.
    """
    folder = root / f"step_{step:08d}"
    tp = 1 if layout is None else layout.tp_size
    if tp == 1:
        if layout is not None and not layout.is_main:
            return None

        def write(tmp: Path):
            for m in members:
                save_safetensors_atomic(member_tensors(m), tmp / f"{m.spec.name}.safetensors")
            write_json_atomic(state, tmp / "state.json")

        write_folder_atomic(folder, write)
    else:
        staging = root / f"step_{step:08d}.shards"
        if layout.dp_rank == 0:
            staging.mkdir(parents=True, exist_ok=True)
            for m in members:
                name = f"{m.spec.name}.shard{layout.tp_rank}-of{tp}.safetensors"
                save_safetensors_atomic(member_tensors(m), staging / name)
        from mechscope.scale.dist import guarded

        guarded(layout.info, "the barrier after writing checkpoint shards", torch.distributed.barrier)
        if not layout.is_main:
            return None

        def write(tmp: Path):
            for f in staging.glob("*.safetensors"):
                shutil.move(str(f), tmp / f.name)
            write_json_atomic(state, tmp / "state.json")

        write_folder_atomic(folder, write)
        shutil.rmtree(staging, ignore_errors=True)
    for old in sorted(root.glob("step_*[0-9]"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob("step_*.shards"):  # staging left by a save that a failure interrupted
        shutil.rmtree(stale, ignore_errors=True)
    return folder


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint folder under ``root``, or None."""
    done = [p for p in sorted(root.glob("step_*[0-9]")) if (p / "state.json").is_file()]
    return done[-1] if done else None


def read_state(folder: Path) -> dict:
    try:
        return json.loads((folder / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CorruptFileError(f"checkpoint {folder} has an unreadable state.json ({e}); delete that folder "
                               "to resume from the one before.") from e


def _merged(folder: Path, name: str, param_names: list[str]) -> dict[str, Tensor]:
    """A dictionary's whole checkpoint tensors, its shards (if any) concatenated along the latent axis."""
    whole = folder / f"{name}.safetensors"
    if whole.is_file():
        return load_safetensors(whole, what="checkpoint")
    shards = {int(mt["t"]): (int(mt["T"]), f) for f in folder.glob(f"{name}.shard*-of*.safetensors")
              if (mt := _SHARD.match(f.name)) and mt["name"] == name}
    T = {t for t, _ in shards.values()}
    if not shards or len(T) != 1 or sorted(shards) != list(range(next(iter(T)))):
        raise CorruptFileError(f"checkpoint {folder} lacks shards of {name!r} (found {sorted(shards)} of "
                               f"{sorted(T) or '?'}); a rank did not write its part. Delete this folder to resume "
                               "from the one before.")
    parts = [load_safetensors(shards[t][1], what="checkpoint") for t in sorted(shards)]
    out = {}
    for key in parts[0]:
        axis = _axis(key, param_names)
        out[key] = parts[0][key] if axis is None else torch.cat([p[key] for p in parts], dim=axis)
    return out


def load_checkpoint(folder: Path, members, run_record: dict, layout) -> dict:
    """Load every member's tensors from ``folder`` (any saved layout) into this rank's shard; returns state.json.

    Raises:
        InputError: the checkpoint was made with another configuration (names the fix).
        CorruptFileError: an unreadable state.json, a missing or damaged shard file.
    """
    state = read_state(folder)
    if state["run"] != json.loads(json.dumps(run_record)):
        raise InputError(
            f"the checkpoint in {folder} was made with another configuration; resume with the same dictionaries "
            "and TrainConfig (checkpointing, logging and the number of ranks may differ), or use a new out_dir."
        )
    tp, t = (1, 0) if layout is None else (layout.tp_size, layout.tp_rank)
    for m in members:
        names = [n for n, _ in m.dictionary.named_parameters()]
        full = _merged(folder, m.spec.name, names)
        lo, hi = shard_bounds(m.spec.dictionary.d_sae, t, tp)

        def mine(key: str) -> Tensor:
            v, axis = full[key], _axis(key, names)
            return v if axis is None or tp == 1 else v.narrow(axis, lo, hi - lo).clone()

        with torch.no_grad():
            for k in state_tensors(m.dictionary):
                getattr(m.dictionary, k).copy_(mine(f"dict.{k}"))
        opt_state = m.optimizer.state_dict()
        new_state: dict[int, dict] = {}
        for key in full:
            if key.startswith("adam."):
                _, idx, k = key.split(".", 2)
                new_state.setdefault(int(idx), {})[k] = mine(key)
        opt_state["state"] = new_state
        m.optimizer.load_state_dict(opt_state)
        m.tokens_since_fired = mine("tokens_since_fired").to(m.dictionary.W_enc.device, copy=True)
        ms = state["members"][m.spec.name]
        m.scale_in, m.scale_out, m.threshold_ema = ms["scale_in"], ms["scale_out"], ms["threshold_ema"]
    return state
