"""Browser tests: the web app served by a real uvicorn server on loopback, driven by Playwright in
Debian's headless Chromium (``executable_path``; Playwright's own browser download is not used)."""

from __future__ import annotations

import shutil
import socket
import threading
import time

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def browser():
    if CHROMIUM is None:
        pytest.skip("no chromium on this machine (apt-get install chromium; scripts/setup.sh --dev does it as root)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


@pytest.fixture
def page(browser):
    # bypass_csp: Playwright's wait_for_function compiles its predicate with eval, which the app's
    # Content-Security-Policy forbids; test_app_pages_browser.py's strict_page keeps the CSP and checks it
    ctx = browser.new_context(viewport={"width": 1280, "height": 900}, bypass_csp=True)
    pg = ctx.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.on("dialog", lambda d: (errors.append("dialog: " + d.message), d.dismiss()))  # an alert() = injected script
    pg.js_errors = errors
    yield pg
    ctx.close()


def serve(app) -> tuple[str, callable]:
    """Start ``app`` on a free loopback port in a thread; returns (base URL, stop function)."""
    import uvicorn

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)

    def stop():
        server.should_exit = True
        t.join(timeout=10)

    return f"http://127.0.0.1:{port}", stop


def drawn_tokens(tokens: list[str]) -> list[str]:
    """What the page draws for a context's token spans: a token with an empty span (leading bytes of a
    character) merged with the tokens up to the one that completes it, as app.js's ``ms.groups`` does."""
    out, pending = [], ""
    for i, t in enumerate(tokens):
        pending += t
        if t != "" or i == len(tokens) - 1:
            out.append(pending)
            pending = ""
    return out


TEXTS = "els => els.map(e => e.textContent)"
