"""The probe page in headless Chromium with its Content-Security-Policy enforced, on a tiny model whose
tokenizer holds hostile token strings: scoring a prompt draws one coloured token per token with its exact
score in the title (red above the threshold, blue below), hostile tokens show as text and inject nothing, the
monitor section draws the generated tokens with the alarm outlined and the verdict badge, and a server
without probes says how to load one."""

from __future__ import annotations

import pytest
import torch

import mechscope
from mechscope.app import AppState, create_app
from mechscope.app.probe_routes import load_probes
from mechscope.safety.probes import fit_probe
from tests.browser.conftest import TEXTS, serve
from tests.browser.test_app_browser import HOSTILE, hostile_model_dir  # noqa: F401 (fixture)
from tests.browser.test_app_pages_browser import strict_page, wait_until  # noqa: F401 (fixture)

pytestmark = pytest.mark.browser
SITE = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def model(hostile_model_dir):  # noqa: F811
    return mechscope.load(str(hostile_model_dir))


@pytest.fixture(scope="module")
def app_url(model, tmp_path_factory):
    """The app over the hostile tiny model with two probes (``first`` at layer 1, ``second`` at layer 0)."""
    root = tmp_path_factory.mktemp("probes")
    for name, site, seed in (("first", SITE, 0), ("second", "blocks.0.hook_resid_post", 1)):
        g = torch.Generator().manual_seed(seed)
        fit_probe(torch.randn(40, 32, generator=g), torch.arange(40) % 2, "diff_means", site=site,
                  model_name=model.cfg.name).save(root / name)
    url, stop = serve(create_app(AppState(model=model, probes=load_probes([root / "first", root / "second"], model))))
    yield url
    stop()


@pytest.fixture(scope="module")
def bare_url(model):
    url, stop = serve(create_app(AppState(model=model)))
    yield url
    stop()


def api(page, url: str, path: str, body: dict) -> dict:
    r = page.request.post(url + path, data=body)
    assert r.ok, r.text()
    return r.json()


def clean(pg) -> None:
    assert pg.js_errors == [] and pg.console_errors == [] and pg.failed == []
    assert pg.locator("main script").count() == 0 and pg.locator("main .strip b").count() == 0  # no markup injected


def test_scores_draw_one_coloured_token_per_token(strict_page, app_url):  # noqa: F811
    pg = strict_page
    r = pg.goto(app_url + "/probe")
    assert "script-src 'self';" in r.headers["content-security-policy"]
    wait_until(pg, "document.querySelectorAll('#probe option').length === 3")
    pg.fill("#text", HOSTILE)
    pg.click("#f button[type=submit]")
    pg.wait_for_selector(".probe-result .strip .tok")
    want = api(pg, app_url, "/api/probe", {"text": HOSTILE})
    assert "<script>alert(1)</script>" in [t.strip() for t in want["tokens"]]
    results = pg.locator(".probe-result")
    assert results.count() == 2
    for k, p in enumerate(want["probes"]):
        box = results.nth(k)
        assert box.locator("h2").inner_text() == p["name"]
        toks = box.locator(".strip .tok")
        assert toks.evaluate_all(TEXTS) == want["tokens"]  # the exact token strings, as text
        titles = toks.evaluate_all("els => els.map(e => e.title)")
        scores = toks.evaluate_all("els => els.map(e => Number(e.dataset.score))")
        assert scores == pytest.approx(p["scores"], abs=1e-9)
        for i, (title, s) in enumerate(zip(titles, p["scores"])):
            assert title.startswith(f"position {i}: score {s:+.4f}") and "threshold +0.0000" in title
        above = toks.evaluate_all("els => els.map(e => e.classList.contains('above'))")
        assert above == [s > p["threshold"] for s in p["scores"]]
        colours = toks.evaluate_all("els => els.map(e => getComputedStyle(e).backgroundColor)")
        assert all(("214, 39, 40" if a else "47, 111, 223") in c for c, a in zip(colours, above)), colours
        assert f"{p['aggregation']} over tokens 0..4: {p['aggregate']:+.4f}" in box.locator(".note").inner_text()
    assert "<script>alert(1)</script>" in results.first.inner_text()  # shown as text
    pg.select_option("#probe", "second")
    pg.click("#f button[type=submit]")
    wait_until(pg, "document.querySelectorAll('.probe-result').length === 1")
    assert pg.locator(".probe-result h2").inner_text() == "second"
    clean(pg)


def test_monitor_draws_generated_tokens_and_marks_the_alarm(strict_page, app_url):  # noqa: F811
    pg = strict_page
    pg.goto(app_url + "/probe")
    wait_until(pg, "document.querySelectorAll('#mprobe option').length === 2")
    body = {"prompt": HOSTILE, "probe": "first", "max_new_tokens": 8, "rule": "ema", "threshold": -1000}
    want = api(pg, app_url, "/api/monitor", body)
    assert want["flagged"] and len(want["alarms"]) == 1  # every value is above: one excursion, at the first new token
    pg.fill("#prompt", HOSTILE)
    pg.fill("#n", "8")
    pg.fill("#threshold", "-1000")
    pg.click("#mf button[type=submit]")
    pg.wait_for_selector("#mon .strip .tok")
    toks = pg.locator("#mon .strip .tok")
    assert toks.evaluate_all(TEXTS) == want["tokens"] and len(want["tokens"]) == want["prompt_len"] + 8
    assert pg.locator("#mon .tok.prompt").count() == want["prompt_len"]
    alarm = pg.locator("#mon .strip .tok.alarm")
    assert alarm.count() == 1 and alarm.get_attribute("data-pos") == str(want["alarms"][0]["position"]) == str(want["prompt_len"])
    assert pg.locator("#mon .badge").inner_text() == "flagged"
    assert pg.locator("#alarms tr").count() == 2
    pg.fill("#threshold", "1000")  # nothing alarms
    pg.click("#mf button[type=submit]")
    wait_until(pg, "document.querySelector('#mon .badge') && document.querySelector('#mon .badge').textContent === 'not flagged'")
    assert pg.locator("#mon .tok.alarm").count() == 0 and "No alarm." in pg.locator("#mon").inner_text()
    pg.fill("#n", "500")  # refused in the page, nothing sent
    pg.click("#mf button[type=submit]")
    wait_until(pg, "document.querySelector('#mon .err') !== null")
    assert "1..200" in pg.locator("#mon .err").inner_text()
    clean(pg)


def test_without_probes_the_page_says_how_to_load_one(strict_page, bare_url):  # noqa: F811
    pg = strict_page
    pg.goto(bare_url + "/probe")
    pg.wait_for_selector("#info .err")
    assert "mechscope serve --probe DIR" in pg.locator("#info").inner_text()
    assert pg.locator("#f button[type=submit]").is_disabled() and pg.locator("#mf button[type=submit]").is_disabled()
    assert pg.locator("header a.on").inner_text() == "probes"
    clean(pg)
