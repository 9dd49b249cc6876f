"""Text sources as lists of documents: a built-in corpus name, a ``.txt`` / ``.jsonl`` / ``.parquet`` file, a
directory of those (sorted), or a HuggingFace dataset ``hf:NAME[:CONFIG]`` (hub id or a ``save_to_disk`` folder)."""

from __future__ import annotations

import os
from pathlib import Path

from mechscope.core.errors import InputError
from mechscope.data.corpora import CORPORA, _tail, _unknown_corpus, load_corpus
from mechscope.data.textfiles import FILE_SUFFIXES, read_jsonl, read_text_file


def _read_parquet(path: Path, text_field: str) -> list[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise InputError(f"reading {path} needs pyarrow: pip install pyarrow.") from e
    schema = pq.read_schema(path)
    if text_field not in schema.names:
        raise InputError(f"{path}: no column {text_field!r} (columns: {schema.names}). "
                         "Pass text_field= (--text-field on the command line) to name the column that holds the text.")
    values = pq.read_table(path, columns=[text_field]).column(text_field).to_pylist()
    bad = next((v for v in values if v is not None and not isinstance(v, str)), None)
    if bad is not None:
        raise InputError(f"{path}: column {text_field!r} holds {type(bad).__name__}, expected strings.")
    return [v for v in values if v and v.strip()]


def _read_file(path: Path, text_field: str, split_lines: bool) -> list[str]:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return read_text_file(path, split_lines)
    if suffix == ".jsonl":
        return read_jsonl(path, text_field)
    return _read_parquet(path, text_field)  # _local_files admits no other suffix


def _read_hf(spec: str, text_field: str, dataset_split: str, max_documents: int | None) -> list[str]:
    parts = spec[3:].split(":")
    if not parts[0] or len(parts) > 2:
        raise InputError(f"bad dataset spec {spec!r}: write 'hf:NAME' or 'hf:NAME:CONFIG'.")
    name, config = parts[0], (parts[1] if len(parts) == 2 else None)
    try:
        import datasets
    except ImportError as e:
        raise InputError(f"{spec!r} needs the HuggingFace `datasets` package: pip install datasets.") from e
    if Path(name).is_dir():
        try:
            ds = datasets.load_from_disk(name)
        except Exception as e:  # datasets raises FileNotFoundError or its own types
            raise InputError(f"{name} is not a dataset saved with save_to_disk ({e}).") from e
        if isinstance(ds, datasets.DatasetDict):
            if dataset_split not in ds:
                raise InputError(f"{spec!r} has splits {sorted(ds)}, not {dataset_split!r}; pass dataset_split=.")
            ds = ds[dataset_split]
    else:
        try:
            ds = datasets.load_dataset(name, config, split=dataset_split, streaming=max_documents is not None)
        except Exception as e:  # offline, unknown name, bad config: many exception types
            offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"
            why = " HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set, so the hub is not contacted." if offline else ""
            raise InputError(f"could not load dataset {name!r} (config {config!r}, split {dataset_split!r}): "
                             f"{type(e).__name__}: {_tail(str(e), 400)}.{why} Fix: check the name and network, or "
                             "save it locally with save_to_disk and pass 'hf:/path/to/dir'.") from e
    columns = ds.column_names
    if columns is not None and text_field not in columns:
        raise InputError(f"{spec!r}: no column {text_field!r} (columns: {columns}). Pass text_field=.")
    docs = []
    for i, row in enumerate(ds):
        if max_documents is not None and i >= max_documents:
            break
        value = row[text_field]
        if value is not None and not isinstance(value, str):
            raise InputError(f"{spec!r}: column {text_field!r} holds {type(value).__name__}, expected strings.")
        if value and value.strip():
            docs.append(value)
    return docs


def source_files(path: Path) -> list[Path]:
    """The text files a directory source reads: every .txt/.jsonl/.parquet below it, sorted by path."""
    return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in FILE_SUFFIXES)


def _local_files(source: str | os.PathLike) -> list[Path]:
    """The files a source that is neither ``hf:`` nor a corpus name reads (a file, or a directory's files).

    Raises:
        InputError: no such path (an unknown corpus name when it looks like one), an unsupported file type,
            an unreadable file, or a directory with no text files.
    """
    path = Path(source)
    if path.is_dir():
        files = source_files(path)
        if not files:
            raise InputError(f"directory {path} holds no {'/'.join(FILE_SUFFIXES)} files; put the text in such "
                             "files, or pass the files themselves.")
    elif path.is_file():
        if path.suffix.lower() not in FILE_SUFFIXES:
            raise InputError(f"{path}: unsupported file type {path.suffix!r}; use one of {list(FILE_SUFFIXES)} "
                             "(plain text must be UTF-8 .txt).")
        files = [path]
    elif isinstance(source, str) and os.sep not in source and not source.lower().endswith(FILE_SUFFIXES):
        raise _unknown_corpus(source)
    else:
        raise InputError(f"no such file or directory: {path}. Check the path, or pass a built-in corpus name "
                         f"({', '.join(sorted(CORPORA))}).")
    unreadable = next((f for f in files if not os.access(f, os.R_OK)), None)
    if unreadable is not None:
        raise InputError(f"{unreadable} is not readable by this user; fix its permissions (chmod a+r) or copy it.")
    return files


def check_source(source: str | os.PathLike) -> None:
    """Check a source as far as can be done without reading, fetching or downloading anything.

    A corpus name must be known, and cached or fetchable here (:func:`available_corpora`; the network is not
    checked); a path must exist and be (or hold) readable ``.txt``/``.jsonl``/``.parquet`` files; an ``hf:``
    spec must be well formed, with the ``datasets`` package installed. Cheap enough to run before loading a
    model, so that a typo costs no model load.

    Raises:
        InputError: what :func:`load_documents` would raise for these reasons, with the same messages.
        CorpusUnavailableError: a built-in corpus that is not cached and cannot be fetched here.
    """
    import importlib.util

    from mechscope.core.errors import CorpusUnavailableError
    from mechscope.data.corpora import available_corpora

    if isinstance(source, str) and source.startswith("hf:"):
        parts = source[3:].split(":")
        if not parts[0] or len(parts) > 2:
            raise InputError(f"bad dataset spec {source!r}: write 'hf:NAME' or 'hf:NAME:CONFIG'.")
        if importlib.util.find_spec("datasets") is None:
            raise InputError(f"{source!r} needs the HuggingFace `datasets` package: pip install datasets.")
    elif isinstance(source, str) and source in CORPORA:
        ok, why = available_corpora()[source]
        if not ok:
            raise CorpusUnavailableError(f"corpus {source!r} is {why}. Fix: install what it needs, or use 'pydoc' "
                                         "(always available) or your own .txt/.jsonl/.parquet files.")
    else:
        _local_files(source)


def load_documents(source: str | os.PathLike, *, text_field: str = "text", split_lines: bool = False,
                   dataset_split: str = "train", max_documents: int | None = None) -> list[str]:
    """Documents (non-empty strings) from a corpus name, a local file or directory, or a HuggingFace dataset.

    Args:
        source: one of

            * a built-in corpus name (:data:`CORPORA`), fetched on first use;
            * a ``.txt`` file: one document, or one per non-blank line with ``split_lines=True``;
            * a ``.jsonl`` file: one document per line, the string in field ``text_field``;
            * a ``.parquet`` file (needs ``pyarrow``): one document per row of column ``text_field``;
            * a directory: every ``.txt``/``.jsonl``/``.parquet`` file below it, in sorted path order;
            * ``"hf:NAME"`` or ``"hf:NAME:CONFIG"``: a HuggingFace dataset (needs ``datasets``), either a
              local directory written by ``save_to_disk`` or a hub id, split ``dataset_split``.

        text_field: the JSONL field / Parquet or dataset column holding the text.
        split_lines: for ``.txt`` files, one document per non-blank line.
        dataset_split: the split of a HuggingFace dataset.
        max_documents: keep only the first this many documents (a hub dataset is then streamed).

    Returns:
        The documents in a deterministic order. Blank documents (empty or whitespace) are dropped.

    Raises:
        InputError: a missing file, an unknown corpus name (with close names), an unsupported file type, a
            missing field or column, a non-string value, no documents at all, or a missing optional package.
        CorpusUnavailableError: a built-in corpus that cannot be fetched here.
    """
    if max_documents is not None and max_documents < 1:
        raise InputError(f"max_documents must be >= 1 or None, got {max_documents}.")
    if isinstance(source, str) and source.startswith("hf:"):
        docs = _read_hf(source, text_field, dataset_split, max_documents)
    elif isinstance(source, str) and source in CORPORA:
        docs = load_corpus(source)
    else:
        docs = [d for f in _local_files(source) for d in _read_file(f, text_field, split_lines)]
    if not docs:
        raise InputError(f"source {str(source)!r} holds no text (no non-blank documents).")
    return docs[:max_documents] if max_documents is not None else docs
