"""The circuit page, the report's circuit section and the web app's ``/circuit``, each drawn from a saved
evaluation.json of the tiny model (tests/unit/test_circuit_cli.py's fixture).

Claims tested: hostile strings (task names, notes, head classes and their reasons) reach the page only
escaped, and the page fetches nothing; the graph puts every node where the layout says (input left, logits
right, heads by index, MLPs below, key/value heads left of their group) and every circuit edge on it once,
wider for a larger |score|, dashed by type; a node's details list exactly its edges; a circuit larger than the
drawing cap says how many edges it drew; the report reads an evaluation.json as it is and evaluates a
discover-only folder on its held-out prompts (the same number evaluate gives), capped and said; the app
serves the same view as JSON under its CSP.
"""

from __future__ import annotations

import copy
import json
import re

import pytest

from tests.unit.test_circuit_cli import run, tiny_model_dir  # noqa: F401 (fixtures)
from tests.unit.test_cli import NASTY, make_results

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture()
def ev(run):  # noqa: F811
    return json.loads((run["root"] / "ev" / "evaluation.json").read_text())


def hostile(ev: dict) -> dict:
    """``ev`` with hostile strings in every free-text field the page shows, and IOI roles for its heads."""
    ev = copy.deepcopy(ev)
    ev["task"]["name"] = NASTY[0]
    ev["notes"] = NASTY[:3]
    ev["circuit"]["selection"]["method"] = NASTY[1]
    ci = {"estimate": 0.5, "low": 0.4, "high": 0.6}
    heads = [n for n in ev["circuit"]["nodes"] if n.startswith("a")]
    ev["roles"] = {"heads": [{"head": h, "role": "name mover" if i == 0 else NASTY[2], "why": NASTY[0], "dla": ci,
                              "attention": {"END->IO": ci, "END->S2": ci}, "copy_score": 0.9,
                              "negative_copy_score": 0.1, "head_scores": {"induction": 0.2}}
                             for i, h in enumerate(heads)]}
    return ev


def test_the_page_shows_hostile_strings_as_text_and_fetches_nothing(ev):
    from mechscope.report.circuit import render_circuit_html

    html = render_circuit_html(hostile(ev))
    scripts = re.findall(r"<script[^>]*>(.*?)</script>", html, flags=re.S)
    assert len(scripts) == 3  # plotly.js, the view as JSON, the drawing code
    assert NASTY[0] not in html and "<b>&amp;" not in html
    assert "&lt;/script&gt;&lt;script&gt;alert(1)&lt;/script&gt;" in html  # the title and the role table, escaped
    assert "\\u003c/script\\u003e" in scripts[1]  # in the JSON, < and > are escapes
    assert "default-src 'none'" in html and not re.search(r"<(script|link|img)[^>]*(src|href)=", html)
    assert "innerHTML" not in scripts[2]


def test_graph_puts_every_node_and_edge_where_the_layout_says(ev):
    from mechscope.report.circuit_view import KINDS, circuit_view

    view = circuit_view(ev)
    fig = view["figures"]["graph"]
    shape, H = ev["model"], ev["model"]["n_heads"]
    nodes = next(t for t in fig["data"] if t.get("name") == "nodes")
    at = dict(zip(nodes["customdata"], zip(nodes["x"], nodes["y"])))
    assert at["input"] == (-1.0, (H - 1) / 2) and at["logits"] == (shape["n_layers"], (H - 1) / 2)
    for name, (x, y) in at.items():
        if re.fullmatch(r"a\d+\.h\d+", name):
            layer, h = map(int, name[1:].split(".h"))
            assert (x, y) == (layer, H - 1 - h)
        elif re.fullmatch(r"m\d+", name):
            assert (x, y) == (int(name[1:]) + 0.45, -1.5)
        elif ".kv" in name:  # 2 query heads per key/value head: halfway between them, left of the layer
            layer, g = map(int, name[1:].split(".kv"))
            assert (x, y) == (layer - 0.3, H - 1 - (2 * g + 0.5))
    edges = next(t for t in fig["data"] if t.get("name") == "edges")
    assert sorted(t.split("<br>")[0] for t in edges["text"]) == sorted(
        e["name"].replace("<", "&lt;").replace(">", "&gt;") for e in ev["circuit"]["edges"])
    lines = [t for t in fig["data"] if t["mode"] == "lines" and t["x"] != [None] and t["line"]["color"] != "#c9d3e3"]
    assert sum(t["x"].count(None) for t in lines) == len(ev["circuit"]["edges"])
    strongest = max(ev["circuit"]["edges"], key=lambda e: abs(e["score"]))
    widest = max(lines, key=lambda t: t["line"]["width"])
    assert widest["line"]["dash"] == KINDS[strongest["kind"]][0] and widest["line"]["width"] == pytest.approx(5.8)
    assert view["figures"]["curve"]["layout"]["title"]["text"].startswith("Faithfulness by circuit size: CPR")


def test_a_nodes_details_list_exactly_its_edges(ev):
    from mechscope.report.circuit_view import circuit_view

    nodes = circuit_view(ev)["nodes"]
    edges = ev["circuit"]["edges"]
    for name, d in nodes.items():
        assert sorted(r[0] for r in d["edges_out"]) == sorted(e["name"] for e in edges if e["source"] == name)
        if re.fullmatch(r"a\d+\.h\d+", name):
            layer, h = map(int, name[1:].split(".h"))
            into = [e["name"] for e in edges if e["receiver"] in (f"{name}<q>", f"a{layer}.kv{h // 2}<k>",
                                                                  f"a{layer}.kv{h // 2}<v>")]
            assert sorted(r[0] for r in d["edges_in"]) == sorted(into), name
        assert d["score_out"] == pytest.approx(sum(r[2] for r in d["edges_out"]))


def test_a_circuit_larger_than_the_cap_says_what_it_drew(ev, monkeypatch):
    import mechscope.report.circuit_view as page

    monkeypatch.setattr(page, "MAX_DRAWN_EDGES", 5)
    title = page.circuit_view(ev)["figures"]["graph"]["layout"]["title"]["text"]
    assert f"the 5 strongest of {len(ev['circuit']['edges'])} edges drawn" in title


def test_the_report_reads_an_evaluation_and_evaluates_a_discover_folder(run, ev, tmp_path, monkeypatch):  # noqa: F811
    import mechscope
    import mechscope.report.circuit_section as section
    from mechscope.report import render_html, write_report

    model = mechscope.load(run["model"])
    entries = section.circuit_section([run["root"] / "run", run["root"] / "ev"], model, n_boot=200, progress=False)
    assert entries[0]["how"].startswith("evaluated by mechscope report") and "8 of its 8 held-out" in entries[0]["how"]
    assert entries[1]["how"].startswith("read from") and entries[1]["evaluation"] == ev
    f0, f1 = (e["evaluation"]["faithfulness"]["faithfulness"] for e in entries)
    assert f0 == f1  # the same held-out prompts, circuit and bootstrap as `circuit evaluate`
    results = {**make_results(), "circuits": entries}
    html = render_html(results)
    assert 'id="circuits"' in html and 'href="circuit-0.html"' in html and '"fig-circuit-graph-1"' in html
    write_report(results, tmp_path)
    assert (tmp_path / "circuit-0.html").is_file() and (tmp_path / "circuit-1.html").is_file()
    monkeypatch.setattr(section, "MAX_PROMPTS", 3)
    (capped,) = section.circuit_section([run["root"] / "run"], model, n_boot=50, progress=False)
    assert capped["evaluation"]["task"]["n_prompts"] == 3 and "3 of its 8 held-out" in capped["how"]


def test_the_app_serves_the_view_under_its_csp(ev):
    from fastapi.testclient import TestClient

    from mechscope.app import AppState, create_app
    from mechscope.report.circuit_view import circuit_view

    client = TestClient(create_app(AppState(circuit=ev)), raise_server_exceptions=False)
    r = client.get("/api/circuit")
    assert r.status_code == 200
    assert r.json()["view"] == json.loads(json.dumps(circuit_view(ev)))
    page = client.get("/circuit")
    assert page.status_code == 200 and "script-src 'self';" in page.headers["content-security-policy"]
    assert re.search(r'<script src="/static/circuit\.js\?v=[0-9a-f]{12}"', page.text)
    assert [s for s in re.findall(r"<script([^>]*)>", page.text) if "src=" not in s] == []
    assert "innerHTML" not in client.get("/static/circuit.js").text
    assert client.get("/api/info").json()["has_circuit"] is True
    bare = TestClient(create_app(AppState()), raise_server_exceptions=False).get("/api/circuit")
    assert bare.status_code == 404 and "--circuit" in bare.json()["detail"]
