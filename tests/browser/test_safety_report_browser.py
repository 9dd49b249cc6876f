"""The safety report in headless Chromium: the self-contained file opens offline with its CSP, fetches nothing,
raises no JS or console error, plotly draws every figure, and the hostile token strings show as text."""

from __future__ import annotations

import pytest

from tests.unit.test_safety_report import HOSTILE, make_claim, make_generation, make_run

pytestmark = pytest.mark.browser


def test_the_safety_report_opens_offline_and_draws_every_figure(browser, tmp_path):
    from mechscope.report.safety import safety_figures, write_safety_report

    runs = {"honesty pairs": make_run(), "old run": make_run(scores=False, seed=2)}
    gens = [make_generation(0), make_generation(1)]
    path = write_safety_report(tmp_path / "safety.html", runs=runs, generations=gens, claims=[make_claim()],
                               title=HOSTILE[0])
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})  # the page's own CSP stays on
    page = ctx.new_page()
    errors, console, requests = [], [], []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: console.append(m.text) if m.type == "error" else None)
    page.on("dialog", lambda d: (errors.append("dialog: " + d.message), d.dismiss()))  # alert() = injected script
    page.on("request", lambda r: requests.append(r.url))
    try:
        page.goto(path.as_uri())
        n = len(safety_figures(runs, gens))
        page.wait_for_function(f"document.querySelectorAll('.js-plotly-plot .main-svg').length >= {n}", timeout=20_000)
        assert page.locator(".js-plotly-plot").count() == n
        assert page.inner_text("h1") == HOSTILE[0]
        strip = page.locator("#gen-0 .strip .tok")
        assert strip.count() == len(gens[0]["tokens"])
        assert strip.nth(2).inner_text() == HOSTILE[0] and strip.nth(3).inner_text() == HOSTILE[1]
        assert page.locator("#gen-0 .strip .tok.alarm").count() == 2 and page.locator("img").count() == 0
        assert "run['scores']" in page.inner_text("#run-1")
        assert all(u.startswith(("file:", "data:", "blob:")) for u in requests), requests
        assert errors == [] and console == []
    finally:
        ctx.close()
