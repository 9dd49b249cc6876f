"""HTTP plumbing of the web app: readable error responses, security headers and caching.

- **Errors**: every error body is ``{"detail": "<readable text>"}``. FastAPI's own validation response
  echoes the offending input, and that echo cannot be JSON-encoded when the input is NaN, Infinity or a
  string holding a lone surrogate, so a malformed request became a 500. Here each validation error is one
  line ``field: message (got <input>)``, the input ASCII-escaped and truncated.
  A string holding a lone surrogate (``"\\ud800"`` is valid JSON, but not Unicode text) is refused by
  pydantic; its message here says so. Floats are declared with ``allow_inf_nan=False`` where they are used.
- **Headers**: every response carries ``X-Content-Type-Options: nosniff``; every HTML response a
  Content-Security-Policy: scripts, fetches and images from this origin only, so no inline script runs
  (each page's script is a file in ``static/``); inline styles are allowed, which plotly.js needs.
- **Caching**: pages refer to assets by versioned URLs (``/static/app.js?v=<content hash>``,
  ``/plotly.min.js?v=<plotly version>``). A request carrying the current version is cached for a year as
  immutable; any other is revalidated (``no-cache`` with an ETag; 304 when unchanged). Pages themselves
  are ``no-cache``, so a new version's page names its new assets.
"""

from __future__ import annotations

import functools
import hashlib
import re
from pathlib import Path
from typing import Any

from mechscope.core.errors import MechscopeError

STATIC = Path(__file__).parent / "static"
CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
       "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
       "frame-ancestors 'none'")
IMMUTABLE = "public, max-age=31536000, immutable"
REVALIDATE = "no-cache"
_ASSET = re.compile(r'(src|href)="/static/([A-Za-z0-9_.-]+)"')


# -- errors --------------------------------------------------------------------------------------------
def printable(s: str) -> str:
    """``s`` safe to encode as UTF-8 JSON: lone surrogates become ``\\udXXX`` escapes."""
    return s.encode("utf-8", "backslashreplace").decode("utf-8")


def _shown(value: Any, limit: int = 60) -> str:
    """A short ASCII repr of an offending input (NaN as ``nan``), or '' for objects and lists."""
    if not isinstance(value, (str, int, float)):  # bool is an int
        return ""
    r = ascii(value)
    return r if len(r) <= limit else r[:limit - 3] + "..."


def _where(loc: tuple | list) -> str:
    """``("body", "latents", 0, "value")`` -> ``latents[0].value``; ``("query", "offset")`` -> ``offset``."""
    name = ""
    for part in loc[1:]:
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else str(part))
    if not name:
        return "request body" if loc and loc[0] == "body" else "request"
    return printable(name)


def validation_message(errors: list[dict]) -> str:
    """FastAPI/pydantic validation errors as readable lines ``field: message (got <input>)``."""
    lines = []
    for e in errors:
        loc = tuple(e.get("loc") or ())
        msg = str(e.get("msg", "invalid")).removeprefix("Value error, ")
        if e.get("type") == "json_invalid":
            pos = loc[1] if len(loc) > 1 else "?"
            why = (e.get("ctx") or {}).get("error", "")
            lines.append(f"request body: not valid JSON at character {pos} ({why}); send a JSON object.")
            continue
        if e.get("type") == "missing":
            lines.append(f"{_where(loc)}: required, and missing.")
            continue
        if e.get("type") == "string_unicode":  # pydantic refuses lone surrogates; its message does not say so
            msg = ("holds a lone UTF-16 surrogate, which is not Unicode text; send the character itself, or both "
                   "halves of its surrogate pair")
        got = _shown(e.get("input"))
        lines.append(f"{_where(loc)}: {printable(msg)}" + (f" (got {got})" if got else "") + ".")
    return "\n".join(lines) or "the request is malformed."


def install_error_handlers(app, pages: str) -> None:
    """Every error as ``{"detail": text}``: validation 422, mechscope's own errors 400, other HTTP errors with a
    hint, and an unexpected exception as a 500 that says it is a bug (never a bare "Internal Server Error").

    Args:
        pages: the app's pages, named in the message of a 404 for an unknown path.
    """
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        return JSONResponse(status_code=422, content={"detail": validation_message(list(exc.errors()))})

    @app.exception_handler(MechscopeError)
    async def mechscope_error(request, exc: MechscopeError):
        return JSONResponse(status_code=400, content={"detail": printable(" ".join(str(exc).split()))})

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        detail = exc.detail if isinstance(exc.detail, str) and exc.detail else None
        path = printable(request.url.path)[:200]
        if exc.status_code == 404 and detail in (None, "Not Found"):
            detail = f"nothing at {path}; pages: {pages}; the JSON API is under /api (schema: /openapi.json)."
        elif exc.status_code == 405:
            detail = f"{request.method} is not allowed on {path}; see /openapi.json for each endpoint's method."
        return JSONResponse(status_code=exc.status_code, content={"detail": printable(detail or str(exc.status_code))},
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def bug(request, exc: Exception):
        return JSONResponse(status_code=500, content={"detail": printable(
            f"internal error ({type(exc).__name__}: {exc}); this is a bug in mechscope, please report it "
            "with the request that caused it.")})


# -- headers -------------------------------------------------------------------------------------------
class SecurityHeaders:
    """ASGI middleware: ``nosniff`` on every response, :data:`CSP` on every HTML response."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                names = {k.lower() for k, _ in headers}
                if b"x-content-type-options" not in names:
                    headers.append((b"x-content-type-options", b"nosniff"))
                ctype = dict((k.lower(), v) for k, v in headers).get(b"content-type", b"")
                if ctype.startswith(b"text/html") and b"content-security-policy" not in names:
                    headers.append((b"content-security-policy", CSP.encode()))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


# -- pages and assets ------------------------------------------------------------------------------------
def asset_version(name: str) -> str | None:
    """The version tag of ``static/<name>`` (first 12 hex digits of its SHA-256), or None if there is no such file."""
    p = STATIC / name
    if p.parent != STATIC or not p.is_file():
        return None
    return hashlib.sha256(p.read_bytes()).hexdigest()[:12]


@functools.lru_cache(maxsize=1)
def plotly_version() -> str:
    from importlib.metadata import version

    return version("plotly")


def page_html(name: str) -> str:
    """A static page with its asset URLs versioned (see the module docstring)."""
    html = (STATIC / f"{name}.html").read_text(encoding="utf-8")
    html = _ASSET.sub(lambda m: f'{m[1]}="/static/{m[2]}?v={asset_version(m[2]) or "missing"}"', html)
    return html.replace('src="/plotly.min.js"', f'src="/plotly.min.js?v={plotly_version()}"')


def page_response(html: str):
    from fastapi.responses import HTMLResponse

    return HTMLResponse(html, headers={"Cache-Control": REVALIDATE})  # the CSP comes from SecurityHeaders


def _version_asked(scope) -> str | None:
    from urllib.parse import parse_qs

    return (parse_qs(scope.get("query_string", b"").decode("latin-1")).get("v") or [None])[0]


def make_static_files():
    """``StaticFiles`` over ``static/`` whose responses carry Cache-Control (immutable for the current version)."""
    from fastapi.staticfiles import StaticFiles

    class CachedStatic(StaticFiles):
        def file_response(self, full_path, stat_result, scope, status_code=200):
            response = super().file_response(full_path, stat_result, scope, status_code)
            current = asset_version(Path(full_path).name)
            response.headers["Cache-Control"] = IMMUTABLE if current and _version_asked(scope) == current else REVALIDATE
            return response

    return CachedStatic(directory=str(STATIC))


@functools.lru_cache(maxsize=1)
def _plotly() -> tuple[bytes, str]:
    from mechscope.report.render import plotly_js

    body = plotly_js().encode("utf-8")
    return body, '"' + hashlib.sha256(body).hexdigest()[:24] + '"'


def plotly_response(request):
    """plotly.js with an ETag (304 on a matching ``If-None-Match``), immutable when asked for by its version."""
    from fastapi.responses import Response

    body, etag = _plotly()
    cache = IMMUTABLE if request.query_params.get("v") == plotly_version() else REVALIDATE
    headers = {"ETag": etag, "Cache-Control": cache}
    asked = request.headers.get("if-none-match", "")
    if asked.strip() == "*" or etag in [t.strip().removeprefix("W/") for t in asked.split(",")]:
        return Response(status_code=304, headers=headers)
    return Response(body, media_type="application/javascript", headers=headers)


def best_label(f: dict) -> dict:
    """The best-scored label with its score and provenance (a label is never shown without them)."""
    labels = sorted(f.get("labels") or [], key=lambda lab: -(lab["score"] if lab["score"] is not None else -1))
    if not labels:
        return {"label": None}
    b = labels[0]
    return {"label": b["label"], "label_score": b["score"], "label_score_kind": b["score_kind"],
            "label_explainer": b["explainer"], "label_date": b["date"]}
