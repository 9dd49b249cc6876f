"""The web app's pages in headless Chromium, with its Content-Security-Policy enforced: every page loads and
draws its plots with no console error; the feature browser sorts, pages and says when a search finds
nothing; the steering page refuses an empty latent without sending anything, clears the previous run on a
new run and on an error, shows validation errors as readable lines, shows each latent's activation scale
and steers several latents; the inspector's attention heatmap is white at 0 and dark at 1 and grows with
the prompt; plotly.js is fetched once per browser, not once per page."""

from __future__ import annotations

import pytest
import torch

import mechscope
from mechscope.app import AppState, create_app, make_steer
from mechscope.dictionaries import DictionaryConfig, SparseDictionary
from tests.browser.conftest import serve
from tests.unit.test_app import tiny_model_dir  # noqa: F401 (fixture)

pytestmark = pytest.mark.browser
N_LATENTS = 64


def tiny_report() -> dict:
    """The parts of a report's results.json that the patching page reads."""
    layers, toks = ["L0", "L1"], ["<bos>", "w1", "w2"]
    return {"model": {"name": "tiny"}, "ioi": {"n_prompts": 2, "mean_logit_diff": 1.0, "accuracy": 1.0},
            "patching": {"n_prompts": 2, "metric_note": "clean = 1", "activation": {
                "resid_pre": {"values": [[0.5, -0.2, 0.1], [0.3, 0.0, 1.0]], "row_labels": layers, "col_labels": toks},
                "heads": {"values": [[0.1, 0.2, 0.0, -0.3], [0.5, 0.0, 0.2, 0.1]], "row_labels": layers,
                          "col_labels": ["H0", "H1", "H2", "H3"]}}}}


class CountPlotly:
    """ASGI wrapper counting the requests for plotly.js that reach the server (not served from cache)."""

    def __init__(self, app):
        self.app, self.n = app, 0

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] == "/plotly.min.js":
            self.n += 1
        await self.app(scope, receive, send)


@pytest.fixture(scope="module")
def app(tiny_model_dir, tmp_path_factory):
    """(base URL, FeatureDB, plotly request counter) of the app over a tiny model, a 64-latent dictionary,
    a feature database over random text, steering and a report."""
    from mechscope.features.build import build_feature_db
    from mechscope.features.sources import FeatureSource
    from mechscope.features.stats import StatsConfig

    model = mechscope.load(str(tiny_model_dir))
    d = SparseDictionary(DictionaryConfig("topk", 32, N_LATENTS, "blocks.1.hook_resid_post", k=4)).initialize(0)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(4, 128, (40, 16), generator=g)
    tokens[:, 0] = 1  # BOS
    db = build_feature_db(FeatureSource(model, dictionary=d), tokens, tmp_path_factory.mktemp("db") / "f.duckdb",
                          StatsConfig(top_k=5, batch_contexts=8), progress=False)
    counter = CountPlotly(create_app(AppState(model=model, dictionary=d, db=db, steer=make_steer(model, d),
                                              report=tiny_report())))
    url, stop = serve(counter)
    yield url, db, counter
    stop()
    db.close()


@pytest.fixture
def strict_page(browser):
    """A page with the app's CSP enforced. Console errors (a CSP violation is one) go to ``console_errors``,
    except Chromium's note on each 4xx response, which tests provoke on purpose: those go to ``failed``."""
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    pg = ctx.new_page()
    pg.js_errors, pg.console_errors, pg.failed = [], [], []

    def console(m):
        if m.type == "error" and not m.text.startswith("Failed to load resource"):
            pg.console_errors.append(m.text)

    pg.on("pageerror", lambda e: pg.js_errors.append(str(e)))
    pg.on("console", console)
    pg.on("response", lambda r: pg.failed.append(f"{r.status} {r.url}") if r.status >= 400 else None)
    pg.on("dialog", lambda d: (pg.js_errors.append("dialog: " + d.message), d.dismiss()))
    yield pg
    ctx.close()


def wait_until(page, js: str, timeout: float = 30_000):
    """Poll ``js`` (an expression) until truthy. wait_for_function compiles it with eval, which the CSP
    forbids; page.evaluate runs through the DevTools protocol, which the CSP does not govern."""
    import time

    end = time.monotonic() + timeout / 1000
    while not page.evaluate(js):
        if time.monotonic() > end:
            raise TimeoutError(f"never true: {js}")
        time.sleep(0.05)


def text(page, selector: str) -> str:
    return page.locator(selector).inner_text()


# -- the CSP breaks nothing ---------------------------------------------------------------------------------
def test_every_page_works_under_the_csp(strict_page, app):
    url, db, _ = app
    pg = strict_page
    for path, ready in [("/", ["tr.lat-row"]), ("/steer", ["#lat"]),
                        ("/patching", ["#resid .main-svg", "#heads .main-svg"]), ("/inspect", ["#text"])]:
        r = pg.goto(url + path)
        csp = r.headers["content-security-policy"]
        assert "script-src 'self';" in csp and r.headers["x-content-type-options"] == "nosniff", path
        for selector in ready:
            pg.wait_for_selector(selector)
    pg.click("button[type=submit]")
    pg.wait_for_selector("#attn .main-svg")
    assert pg.js_errors == [] and pg.console_errors == [] and pg.failed == []
    pg.goto(url + "/feature/5")
    pg.wait_for_selector("#hist .main-svg")
    pg.wait_for_selector(".top-example")
    assert pg.locator("a#steer-link").get_attribute("href") == "/steer?latent=5"
    pg.click("a#steer-link")
    pg.wait_for_selector(".steer-row")
    assert pg.input_value("#lat") == "5"
    assert pg.js_errors == [] and pg.console_errors == [] and pg.failed == []


def test_plotly_is_fetched_once_per_browser(strict_page, app):
    url, _, counter = app
    before = counter.n
    for path in ("/patching", "/feature/3", "/inspect", "/feature/4"):
        strict_page.goto(url + path)
        wait_until(strict_page, "window.Plotly !== undefined")
    assert counter.n - before == 1  # immutable at its versioned URL: later pages take it from the cache


# -- the feature browser ------------------------------------------------------------------------------------
def ids_shown(page) -> list[int]:
    return [int(h.split("/")[-1]) for h in page.locator("tr.lat-row a.lat").evaluate_all("els => els.map(e => e.getAttribute('href'))")]


def test_feature_browser_sorts_pages_and_says_when_nothing_matches(strict_page, app):
    url, db, _ = app
    pg = strict_page
    rows = db.list_latents(order_by="id", limit=N_LATENTS)
    by_max = [r["id"] for r in sorted(rows, key=lambda r: (-r["max_act"], r["id"]))]
    by_rare = [r["id"] for r in sorted(rows, key=lambda r: (r["density"], r["id"]))]

    pg.goto(url + "/")
    pg.wait_for_selector("tr.lat-row")
    assert ids_shown(pg) == by_max[:50] and text(pg, "#range") == f"latents 1–50 of {N_LATENTS}"
    tops = pg.locator("tr.lat-row").first.locator("td:nth-child(5) .pill").all_inner_texts()
    want = list(dict.fromkeys(ex["max_token"] for ex in db.feature(by_max[0])["top"]))[:5]
    assert tops == [t.replace("\n", "\\n") for t in want] and tops  # the top-tokens column is filled
    assert pg.locator("#prev").is_disabled()

    pg.click("#next")
    wait_until(pg, "document.getElementById('range').textContent.startsWith('latents 51')")
    assert ids_shown(pg) == by_max[50:] and text(pg, "#range") == f"latents 51–{N_LATENTS} of {N_LATENTS}"
    assert pg.locator("#next").is_disabled() and not pg.locator("#prev").is_disabled()

    pg.select_option("#order", "density_asc")  # a new sort starts at the first page
    wait_until(pg, "location.search.includes('density_asc')")
    wait_until(pg, "document.getElementById('range').textContent.startsWith('latents 1–')")
    assert ids_shown(pg) == by_rare[:50]
    pg.select_option("#limit", "25")
    wait_until(pg, "document.querySelectorAll('tr.lat-row').length === 25")
    assert ids_shown(pg) == by_rare[:25] and text(pg, "#range") == f"latents 1–25 of {N_LATENTS}"
    pg.click("#next")
    wait_until(pg, "document.getElementById('range').textContent.startsWith('latents 26')")
    pg.reload()  # the view lives in the URL
    pg.wait_for_selector("tr.lat-row")
    assert ids_shown(pg) == by_rare[25:50] and pg.input_value("#order") == "density_asc"

    pg.fill("#q", "no such token anywhere")
    pg.click("button[type=submit]")
    wait_until(pg, "!document.getElementById('empty').hidden")
    assert "no latent's top examples peak on the token “no such token anywhere”" in text(pg, "#empty")
    assert pg.locator("tr.lat-row").count() == 0 and pg.locator("#pager").is_hidden()
    pg.select_option("#by", "label")
    pg.click("button[type=submit]")
    wait_until(pg, "document.getElementById('empty').textContent.startsWith('no label')")
    pg.click("#clear")  # back to the list
    pg.wait_for_selector("tr.lat-row")
    assert pg.locator("#empty").is_hidden() and pg.locator("#pager").is_visible()
    assert pg.js_errors == [] and pg.console_errors == []


# -- the steering page --------------------------------------------------------------------------------------
def steer_requests(page) -> list:
    sent = []
    page.on("request", lambda r: sent.append(r.post_data) if r.url.endswith("/api/steer") else None)
    return sent


def run_steer(page):
    page.click("button[type=submit]")
    wait_until(page, "document.getElementById('effect').textContent.length > 0 || !!document.querySelector('#steered .err')",
               timeout=60_000)


def test_an_empty_latent_sends_nothing_and_says_so(strict_page, app):
    url, _, _ = app
    pg = strict_page
    sent = steer_requests(pg)
    pg.goto(url + "/steer")
    pg.wait_for_selector(".steer-row")
    assert pg.input_value("#lat") == ""
    run_steer(pg)
    assert "latent: empty; enter a latent id (a whole number from 0 to 63)" in text(pg, "#steered .err")
    pg.fill("#lat", "abc")
    pg.fill("#val", "NaN")
    run_steer(pg)
    err = text(pg, "#steered .err")
    assert "“abc” is not a latent id" in err and "value: “NaN” is not a number" in err
    assert sent == [] and text(pg, "#plain") == "" and text(pg, "#effect") == ""  # latent 0 was not steered
    assert pg.js_errors == [] and pg.console_errors == []


def test_an_error_clears_the_previous_run(strict_page, app):
    url, _, _ = app
    pg = strict_page
    pg.goto(url + "/steer?latent=5")
    pg.wait_for_selector(".steer-row")
    pg.fill("#prompt", "w1 w2 w3")
    pg.fill("#val", "40")
    pg.fill("#n", "4")
    run_steer(pg)
    assert text(pg, "#plain") and text(pg, "#steered") and text(pg, "#effect")

    pg.fill("#prompt", "w1 " * 700)  # the client does not check the length; the server refuses it (422)
    run_steer(pg)
    err = text(pg, "#steered .err")
    assert err.startswith("error: prompt: String should have at most 2000 characters") and "[{" not in err
    assert text(pg, "#plain") == "" and text(pg, "#effect") == ""  # nothing of the earlier run is left

    pg.fill("#prompt", "w1 w2 w3")
    run_steer(pg)
    assert text(pg, "#effect") and pg.locator("#steered .err").count() == 0
    pg.fill("#lat", "")  # an error caught in the page clears the earlier run too
    run_steer(pg)
    assert pg.locator("#steered .err").count() == 1 and text(pg, "#plain") == "" and text(pg, "#effect") == ""
    assert pg.js_errors == [] and pg.console_errors == []


def test_several_latents_with_their_activation_scale(strict_page, app):
    import httpx

    url, db, _ = app
    pg = strict_page
    pg.goto(url + "/steer?latent=5")
    pg.wait_for_selector(".steer-row")
    f5, f9 = db.feature(5), db.feature(9)
    wait_until(pg, "document.querySelector('.scale').textContent.startsWith('typical')")
    assert text(pg, ".steer-row >> nth=0 >> .scale").startswith(
        f"typical activation {f5['mean_act']:.2f} (mean when active) · max {f5['max_act']:.2f}")
    pg.click("#add")
    pg.click("#add")
    assert pg.locator(".steer-row").count() == 3
    pg.locator(".steer-row").nth(1).locator(".remove").click()
    assert pg.locator(".steer-row").count() == 2
    pg.fill("#lat1", "9")
    pg.fill("#val1", "0")
    pg.select_option("#mode1", "clamp")
    wait_until(pg, "document.querySelectorAll('.scale')[1].textContent.startsWith('typical')")
    assert f"max {f9['max_act']:.2f}" in text(pg, ".steer-row >> nth=1 >> .scale")
    pg.fill("#lat1", "999")
    wait_until(pg, "document.querySelectorAll('.scale')[1].textContent.includes('does not exist')")
    pg.fill("#lat1", "9")
    pg.fill("#prompt", "w1 w2 w3")
    pg.fill("#val", "40")
    pg.fill("#n", "4")
    run_steer(pg)
    body = {"prompt": "w1 w2 w3", "max_new_tokens": 4,
            "latents": [{"id": 5, "value": 40, "mode": "add"}, {"id": 9, "value": 0, "mode": "clamp"}]}
    want = httpx.post(url + "/api/steer", json=body, timeout=60).json()
    assert text(pg, "#steered") == want["steered"] and text(pg, "#plain") == want["unsteered"]
    assert pg.js_errors == [] and pg.console_errors == []


# -- the prompt inspector -----------------------------------------------------------------------------------
CELL_COLOUR = """([row, col]) => new Promise(done => {
  const gd = document.getElementById('attn'), n = gd.data[0].z.length;
  const img = gd.querySelector('image'), pic = new Image();
  pic.onload = () => {
    const c = document.createElement('canvas');
    c.width = pic.naturalWidth; c.height = pic.naturalHeight;
    const ctx = c.getContext('2d');
    ctx.drawImage(pic, 0, 0);
    const x = Math.floor((col + 0.5) / n * c.width), y = Math.floor((row + 0.5) / n * c.height);
    done(Array.from(ctx.getImageData(x, y, 1, 1).data.slice(0, 3)));
  };
  pic.src = img.getAttribute('href');
})"""


def luminance(rgb) -> float:
    r, g, b = rgb
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def test_attention_heatmap_is_dark_where_attention_is_high(strict_page, app):
    url, _, _ = app
    pg = strict_page
    pg.goto(url + "/inspect")
    pg.fill("#text", "w1 w2 w3 w4")
    pg.click("button[type=submit]")
    pg.wait_for_selector("#attn .main-svg")
    trace = pg.evaluate("""() => { const t = document.getElementById('attn')._fullData[0];
      return {scale: t.colorscale, reverse: t.reversescale, zmin: t.zmin, zmax: t.zmax, title: t.colorbar.title.text}; }""")
    assert (trace["zmin"], trace["zmax"], trace["title"], trace["reverse"]) == (0, 1, "attention", False)
    assert trace["scale"][0] == [0, "#ffffff"] and trace["scale"][-1][0] == 1
    # the BOS query attends only to itself: cell (0, 0) is 1 and (0, 1) is 0 (causal mask)
    z = pg.evaluate("document.getElementById('attn').data[0].z[0]")
    assert z[0] == pytest.approx(1) and z[1] == 0
    one, zero = pg.evaluate(CELL_COLOUR, [0, 0]), pg.evaluate(CELL_COLOUR, [0, 1])
    assert luminance(zero) > 245 and luminance(one) < 80, (one, zero)  # white at 0, dark at 1

    small = pg.evaluate("document.getElementById('attn')._fullLayout.height")
    pg.fill("#text", " ".join(f"w{i % 100}" for i in range(90)))
    pg.click("button[type=submit]")
    wait_until(pg, "document.getElementById('attn').data[0].z.length === 91")
    layout = pg.evaluate("(() => { const l = document.getElementById('attn')._fullLayout; return [l.width, l.height]; })()")
    assert layout[1] > 3 * small and layout[0] > 1000  # it grows with the prompt ...
    assert pg.locator("#attn g.xtick text").count() == 91 and pg.locator("#attn g.ytick text").count() == 91  # ... every token labelled
    box = pg.evaluate("(() => { const e = document.getElementById('attn'); return [e.scrollHeight > e.clientHeight, "
                      "getComputedStyle(e).overflow]; })()")
    assert box == [True, "auto"]  # and scrolls inside its section
    assert pg.js_errors == [] and pg.console_errors == []
