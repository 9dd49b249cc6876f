"""Error types. Every message says what went wrong, why, and how to fix it."""

from __future__ import annotations


class MechscopeError(Exception):
    """Base class of every error mechscope raises on purpose."""


class HookNameError(MechscopeError, KeyError):
    """A hook name that does not exist for this model (message lists the closest valid names)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class SiteUnavailableError(MechscopeError):
    """A canonical hook site that this architecture does not have (e.g. hook_resid_mid with parallel attention)."""


class ShapeError(MechscopeError, ValueError):
    """A tensor whose shape does not fit the hook site or the other input it must match."""


class InputError(MechscopeError, ValueError):
    """Bad user input: prompts, token lengths, context overflow, arguments."""


class ModelLoadError(MechscopeError):
    """A model name, folder or file that cannot be loaded; says which sources were tried."""


class UnsupportedArchitectureError(ModelLoadError):
    """A transformers architecture with no mechscope adapter; lists the supported ones."""


class HookDidNotFireError(MechscopeError):
    """A requested hook site never ran during the forward pass (nothing fails silently)."""


class DiskFullError(MechscopeError, OSError):
    """The disk filled up while writing; the previous version of the file is intact."""


class CorruptFileError(MechscopeError, ValueError):
    """A file that exists but cannot be read: truncated, corrupted, or of another format."""


class MemoryBudgetError(InputError):
    """A planned activation stream or harvest needs more memory than ``memory_budget_bytes`` allows.

    Raised before any forward pass; the message lists each term of the plan in MiB and what lowers it.
    """


class CorpusUnavailableError(InputError):
    """A built-in corpus that cannot be fetched here: says which corpus, the failing command and its error,
    and the fix (another corpus, your own files, or what to install)."""


class BackendError(MechscopeError):
    """A chat backend that failed: unreachable server, HTTP error, malformed reply, unusable answer."""
