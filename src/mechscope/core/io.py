"""Files written so that a kill at any moment leaves the old file or the new one, never half of one.

Every artefact mechscope writes (JSON, text, safetensors) goes through a temporary file in the same
folder, is fsync'd, then renamed over the target. A full disk raises :class:`DiskFullError` with the
numbers, and the previous file stays intact.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from mechscope.core.errors import DiskFullError


def jsonable(x: Any, digits: int = 6) -> Any:
    """Tensors, numpy values, dataclasses and paths to plain JSON types; floats to ``digits`` significant
    digits; NaN and infinities to None (JSON has no such numbers)."""
    if isinstance(x, torch.Tensor):
        return jsonable(x.detach().float().cpu().tolist() if x.is_floating_point() else x.cpu().tolist(), digits)
    if hasattr(x, "tolist") and not isinstance(x, (str, bytes)):  # numpy
        return jsonable(x.tolist(), digits)
    if isinstance(x, bool) or x is None or isinstance(x, (int, str)):
        return x
    if isinstance(x, float):
        return float(f"{x:.{digits}g}") if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): jsonable(v, digits) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v, digits) for v in x]
    if isinstance(x, Path):
        return str(x)
    if hasattr(x, "__dataclass_fields__"):
        return jsonable(asdict(x), digits)
    return str(x)


def current_umask() -> int:
    """The process's umask (e.g. 0o022), read without changing it where the platform allows."""
    try:  # Linux: no window in which another thread sees a zero umask
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def shared_mode(*, is_dir: bool) -> int:
    """The mode ``mkdir``/``open`` would give a new folder (0o777) or file (0o666) under the user's umask.

    ``tempfile.mkdtemp``/``mkstemp`` create 0o700/0o600 whatever the umask, which leaves an artefact renamed
    into place from them unreadable to collaborators; chmod such a folder or file to this mode.
    """
    return (0o777 if is_dir else 0o666) & ~current_umask()


def make_temp_dir(parent: Path, prefix: str, suffix: str = "") -> Path:
    """A new empty folder in ``parent`` (created if needed) with a unique name, to be filled and then renamed
    into place; unlike ``tempfile.mkdtemp`` its mode follows the umask (:func:`shared_mode`)."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=prefix, suffix=suffix))
    os.chmod(tmp, shared_mode(is_dir=True))
    return tmp


def write_folder_atomic(folder: str | os.PathLike, write) -> Path:
    """Write a folder of files all at once: ``write(tmp)`` fills a temporary sibling folder, which then replaces
    ``folder`` (an existing one is moved aside first and removed after). On any error the temporary folder is
    removed and ``folder`` is left as it was.

    Returns:
        The folder's path.
    """
    folder = Path(folder)
    tmp = make_temp_dir(folder.parent, prefix=folder.name + ".", suffix=".tmp")  # mode follows the umask
    try:
        write(tmp)
        old = None
        if folder.exists():
            old = folder.with_name(folder.name + f".old-{os.getpid()}")
            os.replace(folder, old)
        os.replace(tmp, folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def write_atomic(path: Path, write, *, mode: str = "text") -> None:
    """Write through a temporary file in the same folder, then rename: readers see the old or the new file.

    Args:
        write: ``fn(file)`` that writes the content, or ``fn(tmp_path)`` when ``mode`` is ``"path"``
            (for writers that take a file name, e.g. safetensors).
        mode: ``"text"`` (UTF-8), ``"binary"`` or ``"path"``.

    Raises:
        DiskFullError: the disk filled up (ENOSPC/EDQUOT); says how much is free. The old file is intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        if mode == "path":
            os.close(fd)
            write(tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        else:
            binary = mode == "binary"
            with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, shared_mode(is_dir=False))  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            free = shutil.disk_usage(path.parent).free
            raise DiskFullError(
                f"the disk filled up while writing {path} ({free / 2**20:.1f} MiB free now); nothing was "
                "replaced and earlier files are intact. Free some space (or choose another folder) and re-run."
            ) from e
        raise


def write_json_atomic(obj: Any, path: Path) -> None:
    """Write strict JSON (no NaN) to ``path`` atomically (temporary file + rename).

    Raises:
        ValueError: a NaN or infinity in ``obj`` (pass it through :func:`jsonable` first); the old
            file, if any, is left as it was.
        DiskFullError: the disk filled up.
    """
    text = json.dumps(obj, indent=1, ensure_ascii=False, allow_nan=False)
    write_atomic(path, lambda f: f.write(text))


def write_text_atomic(text: str, path: Path) -> None:
    """Write text to ``path`` atomically. Raises DiskFullError if the disk fills up."""
    write_atomic(path, lambda f: f.write(text))


def save_safetensors_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Save tensors as safetensors atomically (contiguous CPU copies). Raises DiskFullError if the disk fills up."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=metadata), mode="path")


def load_safetensors(path: Path, what: str = "file") -> dict[str, torch.Tensor]:
    """Load a safetensors file, turning a truncated or corrupted file into a clear error.

    Raises:
        FileNotFoundError: the file does not exist.
        CorruptFileError: the header or data cannot be read (truncated download, disk error, not safetensors).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from mechscope.core.errors import CorruptFileError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist.")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CorruptFileError(
            f"{what} {path} ({path.stat().st_size} bytes) is not a readable safetensors file: {e}. It may be "
            "truncated or corrupted; restore it from a checkpoint or re-create it."
        ) from e
