"""Claims files: read and write :class:`~mechscope.safety.claim.Claim` records as strict JSON.

A file holds one claim object, a list of them, or ``{"claims": [...]}`` (what :func:`write_claims` writes).
Reading names the file, the claim's index and id, the field and the fix for anything invalid; a NaN or
Infinity parses and is then refused by the number field that holds it. JSON only, never pickle.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mechscope.core.errors import InputError
from mechscope.core.io import write_json_atomic
from mechscope.safety.claim import Claim


def claims_from_json(doc: Any, where: str = "claims") -> list[Claim]:
    """Claims from parsed JSON: one claim object, a list of them, or ``{"claims": [...]}``.

    Raises:
        InputError: naming ``where``, the claim's index and id, the field and the fix.
    """
    if isinstance(doc, dict) and "claims" in doc and "behaviour" not in doc:
        extra = sorted(set(doc) - {"claims"})
        if extra:
            raise InputError(f"{where}: unknown top-level keys {extra}; a claims file is one claim object, a list of "
                             "them, or {\"claims\": [...]}.")
        doc = doc["claims"]
        if not isinstance(doc, list):
            raise InputError(f"{where}: \"claims\" must be a list of claim objects, got {type(doc).__name__}.")
    if isinstance(doc, dict):
        return [Claim.from_dict(doc, where)]
    if not isinstance(doc, list):
        raise InputError(f"{where}: expected a claim object, a list of them or {{\"claims\": [...]}}, got "
                         f"{type(doc).__name__}.")
    claims = [Claim.from_dict(d, f"{where}: claim {i}") for i, d in enumerate(doc)]
    ids = [c.id for c in claims]
    twice = sorted({i for i in ids if ids.count(i) > 1})
    if twice:
        raise InputError(f"{where}: claim ids {twice} appear more than once; give each claim its own id.")
    return claims


def read_claims(path: str | Path) -> list[Claim]:
    """Read a claims file (one claim object, a list, or ``{"claims": [...]}``).

    Raises:
        InputError: no such file; not JSON; any invalid claim (a NaN or Infinity in a number field too) (names the file,
            the claim's index and id, the field and the fix).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path} does not exist{' (it is a folder)' if path.is_dir() else ''}; pass a claims JSON "
                         "file (write one with mechscope.safety.claim.write_claims).")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))  # NaN parses; the fields refuse it by name
    except UnicodeDecodeError as e:
        raise InputError(f"{path} is not UTF-8 text ({e}); pass a claims JSON file.") from None
    except ValueError as e:
        raise InputError(f"{path} is not valid JSON ({e}); fix the file or re-create it with write_claims.") from None
    return claims_from_json(doc, str(path))


def write_claims(path: str | Path, claims) -> Path:
    """Write claims as ``{"claims": [...]}`` atomically (a temporary file renamed into place).

    Args:
        claims: a :class:`Claim` or a sequence of them.

    Raises:
        InputError: something other than claims, or two claims with one id.
        DiskFullError: the disk filled up (the old file is intact).
    """
    claims = [claims] if isinstance(claims, Claim) else list(claims)
    bad = [type(c).__name__ for c in claims if not isinstance(c, Claim)]
    if bad:
        raise InputError(f"write_claims takes Claim objects, got {bad[:3]}; build them with Claim(...) or the "
                         "producers of mechscope.safety.claims_from.")
    ids = [c.id for c in claims]
    twice = sorted({i for i in ids if ids.count(i) > 1})
    if twice:
        raise InputError(f"claim ids {twice} appear more than once; give each claim its own id.")
    path = Path(path)
    write_json_atomic({"claims": [c.to_dict() for c in claims]}, path)
    return path


__all__ = ["claims_from_json", "read_claims", "write_claims"]
