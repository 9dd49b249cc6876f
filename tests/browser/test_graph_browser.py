"""The attribution-graph page in headless Chromium: the self-contained file opens offline with no JS error and
fetches nothing, draws nodes and edges, shows hostile prompt strings as text, and showing a node lists its edges
and pins it; served with a transcoder set, a clicked feature shows its contexts from the set's feature database and
steering the clicked or the pinned features shows the output before and after; without one the page says how."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.browser.test_app_pages_browser import strict_page  # noqa: F401 (fixture)
from tests.unit.test_graph_features import built  # noqa: F401 (fixture)
from tests.unit.test_cli import NASTY

pytestmark = [pytest.mark.browser]


@pytest.fixture(scope="module")
def graph_json():
    from mechscope.graphs import attribute, prune, to_neuronpedia
    from tests.conftest import random_tokens
    from tests.unit.test_graphs import random_set, tiny64

    m = tiny64()
    g = attribute(m, random_set(m), random_tokens(1, 8, seed=3)[0], max_feature_nodes=None, progress=False)
    d = to_neuronpedia(g, slug="tiny", pruned=prune(g, 0.95, 0.99))
    d["metadata"]["prompt"] = NASTY[0]
    d["metadata"]["prompt_tokens"][1] = NASTY[0]
    return d


def test_the_graph_page_opens_offline_and_shows_a_node(page, graph_json, tmp_path):
    from mechscope.report.graph_page import write_graph_page

    path = write_graph_page(graph_json, tmp_path / "graph.html")
    requests = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto(path.as_uri())
    page.wait_for_selector("#fig-graph .main-svg")
    assert page.locator("#fig-graph .scatterlayer .trace").count() >= 5  # edge bins and the four node kinds
    assert NASTY[0] in page.inner_text("h1") and NASTY[0] in page.inner_text("#summary")
    feature = next(n["node_id"] for n in graph_json["nodes"] if n["feature_type"] == "cross layer transcoder")
    page.evaluate(f"window.mechscopeShowNode({feature!r})")
    info = page.inner_text("#node-info")
    assert feature in info and "edges in" in info and "edges out" in info
    page.click("#node-info button.pin")
    assert page.locator("#pins li").count() == 1
    page.click("#pins button.pin")
    assert page.locator("#pins li").count() == 0
    assert all(u.startswith(("file:", "data:", "blob:")) for u in requests), requests
    assert page.js_errors == []


def test_integers_show_as_integers(page, graph_json, tmp_path):
    from mechscope.report.graph_page import write_graph_page

    path = write_graph_page(graph_json, tmp_path / "graph.html")
    page.goto(path.as_uri())
    page.wait_for_selector("#fig-graph .main-svg")
    node = next(n for n in graph_json["nodes"] if n["feature_type"] == "cross layer transcoder")
    page.evaluate(f"window.mechscopeShowNode({node['node_id']!r})")
    rows = dict(r.split("\t") for r in page.inner_text("#node-info table").splitlines()[1:6])
    assert rows["position"] == str(node["ctx_idx"]) and rows["layer"] == node["layer"]
    assert page.js_errors == []


def test_the_app_serves_the_graph_page_under_its_csp(strict_page, graph_json):  # noqa: F811
    from mechscope.app import AppState, create_app
    from tests.browser.conftest import serve

    url, stop = serve(create_app(AppState(graph=graph_json)))
    try:
        pg = strict_page
        r = pg.goto(url + "/graph")
        assert "script-src 'self';" in r.headers["content-security-policy"]
        pg.wait_for_selector("#graph .main-svg")
        assert NASTY[0] in pg.inner_text("#title") and pg.locator("header a.on").inner_text() == "graph"
        node = next(n["node_id"] for n in graph_json["nodes"] if n["feature_type"] == "cross layer transcoder")
        pg.evaluate(f"window.mechscopeShowNode({node!r})")
        assert "edges in" in pg.inner_text("#node-info")
        pg.click("#node-info button.pin")
        assert pg.locator("#pins li").count() == 1
        pg.wait_for_selector("#table-edges table")
        assert pg.js_errors == [] and pg.console_errors == [] and pg.failed == []
    finally:
        stop()


def test_clicking_a_feature_shows_its_contexts_and_steering_changes_the_output(strict_page, built):  # noqa: F811
    from mechscope.app import AppState, create_app
    from mechscope.graphs.features import open_set_features
    from tests.browser.conftest import serve

    root, m, ts, _, _, _, d = built
    url, stop = serve(create_app(AppState(model=m, graph=d, graph_transcoders=ts,
                                          graph_features=open_set_features(root, ts))))
    try:
        pg = strict_page
        pg.goto(url + "/graph")
        pg.wait_for_selector("#graph .main-svg")
        nodes = sorted((n for n in d["nodes"] if n["feature_type"] == "cross layer transcoder"),
                       key=lambda n: -n["activation"])
        pg.evaluate(f"window.mechscopeShowNode({nodes[0]['node_id']!r})")
        pg.wait_for_selector("#feature-contexts .ctx")
        assert "feature database" in pg.inner_text("#feature-info") and "no label yet" in pg.inner_text("#feature-info")
        pg.click("#edge-heads")
        pg.wait_for_selector("#edge-info table")
        assert "strongest move" in pg.inner_text("#edge-info")
        pg.fill("#steer-scale", "0")
        pg.click("#steer-clicked")
        pg.wait_for_selector("#steer-out table")
        out = pg.inner_text("#steer-out")
        assert "KL(before || after)" in out and "greedy continuation" in out
        pg.click("#node-info button.pin")
        pg.evaluate(f"window.mechscopeShowNode({nodes[1]['node_id']!r})")
        pg.click("#node-info button.pin")
        pg.click("#steer-pinned")
        pg.locator("#steer-out p").filter(has_text="x their activations").filter(has_text=", ").wait_for()
        # a hand-made supernode: group the pinned nodes, steer the group, download the JSON that carries it
        n_suggested = len(d["qParams"]["supernodes"])
        pg.fill("#group-name", "my <b>group</b>")
        pg.click("#group-pinned")
        assert pg.locator("#groups li").count() == n_suggested + 1
        assert "my <b>group</b>" in pg.inner_text("#groups")
        pg.fill("#steer-scale", "2")
        pg.locator("#groups button.steer-group").last.click()
        pg.locator("#steer-out p").filter(has_text="to 2 x their activations").wait_for()
        with pg.expect_download() as dl:
            pg.click("#export-json")
        saved = json.loads(Path(dl.value.path()).read_text())
        assert saved["qParams"]["supernodes"][-1] == ["my <b>group</b>", nodes[0]["node_id"], nodes[1]["node_id"]]
        assert saved["qParams"]["pinnedIds"] == [nodes[0]["node_id"], nodes[1]["node_id"]]
        from mechscope.graphs.neuronpedia import load_neuronpedia

        load_neuronpedia(saved)  # the download reads back
        assert pg.js_errors == [] and pg.console_errors == [] and pg.failed == []
    finally:
        stop()


def test_without_transcoders_the_page_says_how_to_steer(strict_page, graph_json):  # noqa: F811
    from mechscope.app import AppState, create_app
    from tests.browser.conftest import serve

    url, stop = serve(create_app(AppState(graph=graph_json)))
    try:
        pg = strict_page
        pg.goto(url + "/graph")
        pg.wait_for_selector("#steer-why p")
        assert "--transcoders" in pg.inner_text("#steer-why") and pg.locator("#steer-clicked").is_disabled()
        node = next(n["node_id"] for n in graph_json["nodes"] if n["feature_type"] == "cross layer transcoder")
        pg.evaluate(f"window.mechscopeShowNode({node!r})")
        pg.wait_for_selector("#feature-info p.note >> text=no feature database")
        assert pg.js_errors == [] and pg.console_errors == [] and pg.failed == []
    finally:
        stop()
