"""The Unicode round trip in Chromium, and contexts a researcher can read: the database of
tests/unit/test_unicode_roundtrip.py (emoji, ZWJ sequences, RTL text and controls, combining accents,
zero-width and fullwidth characters, a 300-character word) served by the web app and exported as the
static dashboard. The exact text of every context comes out of the page (its DOM text equals the stored
text), text search finds every sample, no feature page is wider than a 1,400 px viewport, and the
highlighted peak token of the top context is on screen without scrolling sideways."""

from __future__ import annotations

import pytest

import mechscope
from mechscope.app import AppState, create_app
from tests.browser.conftest import serve
from tests.unit.test_unicode_roundtrip import SAMPLES, unicode_db

pytestmark = pytest.mark.browser
VIEWPORT = {"width": 1400, "height": 900}
TEXT_OF = "el => el.textContent"


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    from mechscope.features.db import FeatureDB

    mdir, _, _, db_path = unicode_db(tmp_path_factory.mktemp("unicode-browser"))
    db = FeatureDB(db_path)
    url, stop = serve(create_app(AppState(model=mechscope.load(str(mdir)), db=db)))
    yield url, db
    stop()
    db.close()


@pytest.fixture
def wide(browser):
    ctx = browser.new_context(viewport=VIEWPORT)
    pg = ctx.new_page()
    pg.js_errors = []
    pg.on("pageerror", lambda e: pg.js_errors.append(str(e)))
    yield pg
    ctx.close()


def _example_with(db, sample: str) -> tuple[int, int, dict]:
    """(latent, index among its top examples, example) of a top example whose text holds ``sample``."""
    for latent in db.search_text(sample, limit=100):
        for k, ex in enumerate(db.feature(latent)["top"]):
            if sample in ex["text"]:
                return latent, k, ex
    raise AssertionError(f"no top example holds {sample!r}")


def _expand_and_read(ctx) -> str:
    """The text of a context as the page holds it, with its whole context shown."""
    button = ctx.locator("button.expand")
    if button.count():
        button.click()
    return ctx.locator(".toks").evaluate(TEXT_OF)


@pytest.mark.parametrize("name", list(SAMPLES))
def test_each_sample_comes_out_of_the_feature_page_exactly(wide, app_url, name):
    url, db = app_url
    latent, k, ex = _example_with(db, SAMPLES[name])
    wide.goto(f"{url}/feature/{latent}")
    wide.wait_for_selector(".top-example")
    ctx = wide.locator(".top-example").nth(k)
    assert _expand_and_read(ctx) == ex["text"]
    assert SAMPLES[name] in ctx.inner_text() or name in ("zero-width space", "rtl override", "arabic with a mark")
    assert wide.js_errors == []


def test_text_search_in_the_browser_finds_every_sample(wide, app_url):
    url, db = app_url
    wide.goto(url + "/")
    wide.wait_for_selector("tr.lat-row")
    for name, sample in SAMPLES.items():
        wide.fill("#q", sample)
        wide.select_option("#by", "text")
        wide.click("#search button[type=submit]")
        first = db.search_text(sample, limit=50)[0]
        wide.wait_for_selector(f"tr.lat-row a[href='/feature/{first}']")
        assert wide.locator("tr.lat-row").count() == len(db.search_text(sample, limit=50)), name
    assert wide.js_errors == []


def test_feature_pages_fit_the_viewport_and_show_the_peak(wide, app_url):
    """Every feature page: no horizontal scroll at 1,400 px, even with a 300-character word; the top context's
    peak token is highlighted, outlined and inside the viewport; windows hide tokens until expanded."""
    url, db = app_url
    long_latent = _example_with(db, "x" * 40)[0]
    checked_window = False
    for latent in sorted({long_latent, *range(db.n_latents)}):
        f = db.feature(latent)
        if not f["top"]:
            continue
        wide.goto(f"{url}/feature/{latent}")
        wide.wait_for_selector(".top-example")
        width = wide.evaluate("document.documentElement.scrollWidth")
        assert width <= VIEWPORT["width"], (latent, width)
        first = wide.locator(".top-example").first
        peak = first.locator(".tok.peak")
        assert peak.count() == 1
        box = peak.bounding_box()
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= VIEWPORT["width"], (latent, box)
        assert "background" in (peak.get_attribute("style") or "")
        ex = f["top"][0]
        assert int(peak.get_attribute("data-pos")) <= ex["max_pos"]  # the group holding the peak position
        hidden = first.locator(".tok.out")
        if hidden.count():
            checked_window = True
            assert not hidden.first.is_visible()
            first.locator("button.expand").click()
            assert hidden.first.is_visible()
            assert wide.evaluate("document.documentElement.scrollWidth") <= VIEWPORT["width"]
    assert checked_window  # 128-token contexts are longer than the window
    assert wide.js_errors == []


def test_invisible_characters_are_marked_and_bidi_is_contained(wide, app_url):
    url, db = app_url
    latent, k, ex = _example_with(db, SAMPLES["rtl override"])
    wide.goto(f"{url}/feature/{latent}")
    wide.wait_for_selector(".top-example")
    ctx = wide.locator(".top-example").nth(k)
    ctx.locator("button.expand").click() if ctx.locator("button.expand").count() else None
    marks = ctx.locator(".cc").evaluate_all("els => els.map(e => e.dataset.cp)")
    assert "U+202E" in marks and "U+202C" in marks
    assert ctx.locator(".sp").count() == ex["text"].count(" ")  # every space is marked
    # the override is contained in its marker: the Latin text after it ("evil") still reads left to right
    xs = ctx.locator(".tok").evaluate_all("""els => {
        const toks = els.filter(e => e.offsetParent), i = toks.findIndex(e => e.textContent.includes("\u202e"));
        const j = toks.findIndex((e, k) => k > i && e.textContent.includes("\u202c"));
        return toks.slice(i + 1, j).map(e => e.getBoundingClientRect().left);
    }""")
    assert len(xs) >= 2 and xs == sorted(xs)
    assert ctx.locator(".cc").first.evaluate("e => getComputedStyle(e).unicodeBidi") == "isolate"


def test_the_exported_dashboard_keeps_the_exact_text(wide, app_url, tmp_path):
    from mechscope.features.export import export_dashboard

    _, db = app_url
    chosen = {}
    for name, sample in SAMPLES.items():
        latent, k, ex = _example_with(db, sample)
        chosen.setdefault(latent, []).append((k, ex))
    latents = sorted(chosen)
    path = export_dashboard(db, latents, tmp_path / "dash.html")
    wide.goto(path.as_uri())
    wide.wait_for_selector(".top-example")
    for j, latent in enumerate(latents):
        wide.select_option("#pick", str(j))
        wide.wait_for_function(f"document.querySelectorAll('.top-example').length === {len(db.feature(latent)['top'])}")
        for k, ex in chosen[latent]:
            assert _expand_and_read(wide.locator(".top-example").nth(k)) == ex["text"]
        assert wide.evaluate("document.documentElement.scrollWidth") <= VIEWPORT["width"]
    assert wide.js_errors == []
