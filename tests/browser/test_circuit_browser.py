"""The circuit page in headless Chromium: the self-contained file opens offline with no JS error and fetches
nothing, draws the graph and the curve, shows hostile strings as text, and a click on a node (a real mouse
click on its marker) lists that node's edges; the web app's /circuit does the same under its CSP."""

from __future__ import annotations

import json

import pytest

from tests.browser.conftest import serve
from tests.browser.test_app_pages_browser import strict_page, wait_until  # noqa: F401 (fixture)
from tests.unit.test_circuit_cli import run, tiny_model_dir  # noqa: F401 (fixtures)
from tests.unit.test_circuit_page import hostile
from tests.unit.test_cli import NASTY

pytestmark = [pytest.mark.browser, pytest.mark.filterwarnings("ignore::UserWarning")]


@pytest.fixture()
def ev(run):  # noqa: F811
    return hostile(json.loads((run["root"] / "ev" / "evaluation.json").read_text()))


def click_node(page, plot: str, name: str, shown: str | None = None) -> None:
    """Click node ``name``'s marker where plotly drew it (its data coordinates through the axes).

    The mouse first leaves the plot, so a hover label left from an earlier click cannot pass for this node's,
    and the label must be the node's own (edge labels name their nodes too). With ``shown`` (a JS expression
    true once the page shows the node), the click is retried up to three times: under a loaded CPU plotly
    can attribute a click to the point hovered before."""
    for attempt in range(3):
        page.mouse.move(0, 0)
        x, y = page.evaluate("""([id, name]) => {
          const gd = document.getElementById(id);
          gd.scrollIntoView({block: "center"});
          const fl = gd._fullLayout, r = gd.getBoundingClientRect();
          const t = gd.data.find(d => d.name === "nodes"), i = t.customdata.indexOf(name);
          return [r.left + fl.xaxis._offset + fl.xaxis.l2p(t.x[i]), r.top + fl.yaxis._offset + fl.yaxis.l2p(t.y[i])];
        }""", [plot, name])
        page.mouse.move(x, y)
        hover = (f"[...document.querySelectorAll('#{plot} .hoverlayer .hovertext')]"
                 f".some(e => e.textContent.includes({name!r}) && e.textContent.includes('click for its edges'))")
        wait_until(page, hover)  # plotly has picked this node as the point under the mouse
        page.mouse.click(x, y)
        if shown is None:
            return
        try:
            wait_until(page, shown, timeout=10_000)
            return
        except TimeoutError:
            if attempt == 2:
                raise


def check_click(page, plot: str, info: str, ev: dict) -> None:
    name = "logits"
    click_node(page, plot, name, shown=f"[...document.querySelectorAll('{info} h2, {info} h3')]"
                                       f".some(e => e.textContent.startsWith({name!r}))")
    text = page.inner_text(info)
    assert text.startswith(name) and "edges in" in text
    into = [e["name"] for e in ev["circuit"]["edges"] if e["receiver"] == "logits"]
    assert all(e in text for e in into) and len(into) > 0


def test_the_circuit_page_opens_offline_and_a_click_shows_a_node(page, ev, tmp_path):
    from mechscope.report.circuit import write_circuit_page

    path = write_circuit_page(ev, tmp_path)
    requests = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto(path.as_uri())
    page.wait_for_selector("#fig-graph .main-svg")
    page.wait_for_selector("#fig-curve .main-svg")
    assert page.locator("#fig-graph .scatterlayer .trace").count() > 5
    assert page.inner_text("h1") == f"{NASTY[0]} circuit of {ev['model']['name']}"
    assert NASTY[0] in page.locator("details.notes li").all_inner_texts()
    assert NASTY[0] in page.inner_text("#roles")
    check_click(page, "fig-graph", "#node-info", ev)
    head = next(n for n in ev["circuit"]["nodes"] if n.startswith("a"))
    click_node(page, "fig-graph", head, shown=f"document.querySelector('#node-info h3')?.textContent === {head!r}")
    assert "name mover" in page.inner_text("#node-info") and NASTY[0] in page.inner_text("#node-info")
    assert all(u.startswith(("file:", "data:", "blob:")) for u in requests), requests
    assert page.js_errors == []


def test_the_app_serves_the_circuit_page_under_its_csp(strict_page, ev):  # noqa: F811
    from mechscope.app import AppState, create_app

    url, stop = serve(create_app(AppState(circuit=ev)))
    try:
        pg = strict_page
        r = pg.goto(url + "/circuit")
        assert "script-src 'self';" in r.headers["content-security-policy"]
        pg.wait_for_selector("#graph .main-svg")
        pg.wait_for_selector("#curve .main-svg")
        pg.wait_for_selector("#table-settings table")
        assert pg.inner_text("#title") == f"{NASTY[0]} circuit of {ev['model']['name']}"
        assert NASTY[0] in pg.inner_text("#table-roles") and pg.locator("header a.on").inner_text() == "circuit"
        check_click(pg, "graph", "#node-info", ev)
        assert pg.js_errors == [] and pg.console_errors == [] and pg.failed == []
    finally:
        stop()
