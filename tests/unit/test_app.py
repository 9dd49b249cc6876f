"""The web app's API on a tiny model: pages and assets load, the prompt inspector returns the model's real
values with token strings intact, malformed requests get a 4xx with a readable message (never a 500),
the feature list pages, sorts and carries each latent's top tokens, pages carry a CSP and assets cache
headers, and a real server on loopback answers 50 concurrent requests without an error (a bounded load
test). tests/unit/test_app_properties.py fuzzes every endpoint from the OpenAPI schema."""

from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import mechscope
from mechscope.app import AppState, create_app
from mechscope.dictionaries import DictionaryConfig, SparseDictionary, Splice

HOOK = "blocks.1.hook_resid_post"
LABELLED = 7  # the latent given labels in the feature database fixture


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama (2 layers, 4 heads, rotary positions up to 256) with the word-level tokenizer
    "w0".."w123", saved to disk."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.conftest import make_tokenizer

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(cfg).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def state(tiny_model_dir):
    model = mechscope.load(str(tiny_model_dir))
    d = SparseDictionary(DictionaryConfig("topk", 32, 64, HOOK, k=4)).initialize(0)
    return AppState(model=model, dictionary=d)


@pytest.fixture(scope="module")
def client(state):
    from fastapi.testclient import TestClient

    return TestClient(create_app(state), raise_server_exceptions=False)


def make_full_state(state, path) -> AppState:
    """``state`` plus steering and a feature database over 24 random contexts of 12 tokens, whose latent
    :data:`LABELLED` has two labels (the better-scored one is the one lists show)."""
    from mechscope.app import make_steer
    from mechscope.features.build import build_feature_db
    from mechscope.features.db import FeatureDB
    from mechscope.features.sources import FeatureSource
    from mechscope.features.stats import StatsConfig

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(4, 128, (24, 12), generator=g)
    tokens[:, 0] = 1  # BOS
    build_feature_db(FeatureSource(state.model, dictionary=state.dictionary), tokens, path,
                     StatsConfig(top_k=5, batch_contexts=8), progress=False).close()
    with FeatureDB(path, read_only=False) as rw:
        rw.add_label(LABELLED, "a weak guess", score=0.55, score_kind="detection balanced accuracy", explainer="x")
        rw.add_label(LABELLED, "the better label", score=0.8, score_kind="detection balanced accuracy", explainer="y")
    return AppState(model=state.model, dictionary=state.dictionary, db=FeatureDB(path),
                    steer=make_steer(state.model, state.dictionary))


@pytest.fixture(scope="module")
def full_state(state, tmp_path_factory):
    st = make_full_state(state, tmp_path_factory.mktemp("db") / "features.duckdb")
    yield st
    st.db.close()


@pytest.fixture(scope="module")
def full(full_state):
    """A client of the app with a model, a dictionary, a feature database and steering."""
    from fastapi.testclient import TestClient

    return TestClient(create_app(full_state), raise_server_exceptions=False)


def test_pages_and_assets_load(client):
    for path in ("/", "/inspect", "/steer", "/patching", "/feature/3", "/static/app.js", "/static/app.css"):
        r = client.get(path)
        assert r.status_code == 200, path
    js = client.get("/plotly.min.js")
    assert js.status_code == 200 and len(js.content) > 1_000_000 and js.headers["content-type"].startswith("application/javascript")
    for page in ("/", "/inspect", "/feature/1"):  # no inline markup from data: the pages are static shells
        assert "innerHTML" not in client.get(page).text
    assert "innerHTML" not in client.get("/static/app.js").text


def test_inspector_returns_the_models_values(client, state):
    text = "w1 w2 w3 w4"
    r = client.post("/api/inspect", json={"text": text, "layer": 0, "top": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    m, d = state.model, state.dictionary
    toks = m.to_tokens(text, prepend_bos=True)
    assert "".join(body["tokens"]) == body["text"] == m.tokenizer.decode(toks[0], skip_special_tokens=False)
    assert [t.strip() for t in body["tokens"]] == m.to_str_tokens(toks) == body["labels"]
    _, cache = m.run(toks, cache=[f"{HOOK}.sae.hook_sae_acts_post", "blocks.0.attn.hook_pattern"],
                     saes=[Splice(d, error_term=True)])
    acts = cache[f"{HOOK}.sae.hook_sae_acts_post"][0]
    assert body["features"][0] == []  # nothing at BOS
    for pos, feats in list(enumerate(body["features"]))[1:]:
        want = acts[pos].topk(3)
        assert [f["id"] for f in feats] == [int(i) for v, i in zip(*want) if v > 0]
    pattern = torch.tensor(body["attention"]["pattern"])
    assert torch.allclose(pattern, cache["blocks.0.attn.hook_pattern"][0], atol=1e-4)
    assert len(body["lens"]["labels"]) == m.cfg.n_layers


@pytest.mark.parametrize("kwargs,status", [
    (dict(json={"text": ""}), 422),
    (dict(json={"text": 5}), 422),
    (dict(json={}), 422),
    (dict(content=b"{not json", headers={"content-type": "application/json"}), 422),
    (dict(json={"text": "w1", "layer": 99}), 400),
    (dict(json={"text": "w1 " * 500}), 400),  # longer than the inspector takes
])
def test_malformed_requests_are_4xx_with_a_message(client, kwargs, status):
    r = client.post("/api/inspect", **kwargs)
    assert r.status_code == status, r.text
    assert r.json()["detail"]


def test_missing_parts_and_unknown_routes_are_404(client):
    for path in ("/api/feature/3", "/api/search?q=a", "/api/patching", "/nope"):
        r = client.get(path)
        assert r.status_code == 404 and r.json()["detail"], path
    r = client.get("/api/search")  # no q: a validation error, not a crash
    assert r.status_code in (404, 422)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fifty_concurrent_requests_on_loopback(state):
    """A real uvicorn server on 127.0.0.1; 50 requests at once (bounded: one round, 60 s timeout)."""
    import httpx
    import uvicorn

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(state), host="127.0.0.1", port=port, log_level="error"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    try:
        for _ in range(100):
            if server.started:
                break
            time.sleep(0.05)
        assert server.started
        base = f"http://127.0.0.1:{port}"

        def one(i):
            with httpx.Client(timeout=60) as c:
                if i % 3 == 0:
                    return c.post(base + "/api/inspect", json={"text": f"w{i} w{i + 1}"}).status_code
                if i % 3 == 1:
                    return c.get(base + "/api/info").status_code
                return c.post(base + "/api/inspect", json={"text": ""}).status_code  # malformed: 422

        with ThreadPoolExecutor(max_workers=50) as pool:
            codes = list(pool.map(one, range(50)))
        assert codes.count(200) == 34 and codes.count(422) == 16, codes
    finally:
        server.should_exit = True
        t.join(timeout=10)


def test_steering_endpoint_generates_and_measures(state):
    """Steered text differs from unsteered, and the reported effect equals measure_steering's numbers."""
    from fastapi.testclient import TestClient

    from mechscope.app import make_steer
    from mechscope.features.steering import measure_steering, steer_latents

    st = AppState(model=state.model, dictionary=state.dictionary, steer=make_steer(state.model, state.dictionary))
    c = TestClient(create_app(st), raise_server_exceptions=False)
    r = c.post("/api/steer", json={"prompt": "w1 w2 w3", "latents": [{"id": 5, "value": 40.0, "mode": "add"}],
                                   "max_new_tokens": 6})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["unsteered"] != body["steered"]
    ids = [state.model.tokenizer.convert_tokens_to_ids(m["token"].strip()) for m in body["measured"]]
    eff = measure_steering(state.model, ["w1 w2 w3"], steer_latents(state.dictionary, {5: 40.0}), ids)
    assert [m["delta_logprob"] for m in body["measured"]] == pytest.approx(eff.mean_delta_logprob.tolist(), abs=1e-3)
    for bad in ({"prompt": "w1", "latents": [{"id": 999, "value": 1}]}, {"prompt": "w1", "latents": []},
                {"prompt": "w1", "latents": [{"id": 1, "value": 1, "mode": "nope"}]}):
        r = c.post("/api/steer", json=bad)
        assert r.status_code in (404, 422) and r.json()["detail"], bad


# -- every malformed request: a 4xx whose detail is readable text ------------------------------------------
def _steer(**over):
    return {"prompt": "w1 w2", "latents": [{"id": 3, "value": 2.0, "mode": "add"}], "max_new_tokens": 2, **over}


def _raw(text: str) -> dict:  # a body json.dumps cannot write: NaN, Infinity, lone surrogates
    return {"content": text.encode(), "headers": {"content-type": "application/json"}}


MALFORMED = [
    ("get", "/api/features?offset=1e20", {}, 422, "offset: Input should be a valid integer"),
    ("get", "/api/features?offset=99999999999999999999", {}, 422, "offset: Input should be less than or equal to 2147483647"),
    ("get", "/api/features?offset=-1", {}, 422, "offset: Input should be greater than or equal to 0"),
    ("get", "/api/features?limit=0", {}, 422, "limit:"),
    ("get", "/api/features?limit=%ED%A0%80", {}, 422, "limit:"),
    ("get", "/api/features?order=nope", {}, 422, "order: Input should be 'id', 'density', 'density_asc' or 'max_act'"),
    ("get", "/api/search", {}, 422, "q: required"),
    ("get", "/api/search?q=", {}, 422, "q: String should have at least 1 character"),
    ("get", "/api/search?q=" + "a" * 60_000, {}, 422, "q: String should have at most 200 characters (got 'aaaa"),
    ("get", "/api/search?q=a&by=nope", {}, 422, "by:"),
    ("get", "/api/feature/1e9", {}, 422, "latent: Input should be a valid integer"),
    ("get", "/api/feature/-1", {}, 422, "latent: Input should be greater than or equal to 0"),
    ("get", "/api/feature/99999999999999999999", {}, 422, "latent:"),
    ("get", "/api/feature/%ED%A0%80", {}, 422, "latent:"),
    ("get", "/api/feature/64", {}, 404, "latent 64 does not exist; this database has latents 0..63"),
    ("get", "/api/feature/64/summary", {}, 404, "latent 64 does not exist"),
    ("get", "/feature/%ED%A0%80", {}, 422, "latent:"),
    ("get", "/feature/1e9", {}, 422, "latent:"),
    ("get", "/nope", {}, 404, "nothing at /nope"),
    ("put", "/api/steer", {}, 405, "PUT is not allowed on /api/steer"),
    ("get", "/api/inspect", {}, 405, "GET is not allowed"),
    ("post", "/api/steer", _raw('{"prompt": "w1", "latents": [{"id": 1, "value": NaN}]}'), 422,
     "latents[0].value: Input should be a finite number (got nan)"),
    ("post", "/api/steer", _raw('{"prompt": "w1", "latents": [{"id": 1, "value": Infinity}]}'), 422, "finite number (got inf)"),
    ("post", "/api/steer", _raw('{"prompt": "w1", "latents": [{"id": 1, "value": -Infinity}]}'), 422, "finite number (got -inf)"),
    ("post", "/api/steer", {"json": _steer(latents=[{"value": 1.0}])}, 422, "latents[0].id: required, and missing"),
    ("post", "/api/steer", {"json": _steer(latents=[{"id": None, "value": 1.0}])}, 422, "latents[0].id:"),
    ("post", "/api/steer", {"json": _steer(latents=[{"id": "", "value": 1.0}])}, 422, "latents[0].id:"),
    ("post", "/api/steer", {"json": _steer(latents=[{"id": False, "value": 1.0}])}, 422, "latents[0].id: Input should be a valid integer (got False)"),
    ("post", "/api/steer", {"json": _steer(latents=[{"id": 1.5, "value": 1.0}])}, 422, "latents[0].id:"),
    ("post", "/api/steer", {"json": _steer(latents=[{"id": 1, "value": True}])}, 422, "latents[0].value:"),
    ("post", "/api/steer", {"json": _steer(prompt="   ")}, 400, "has no tokens"),
    ("post", "/api/steer", {"json": _steer(latents=[{"id": 10**20, "value": 1.0}])}, 422, "latents[0].id:"),
    ("post", "/api/steer", {"json": _steer(latents=[{"id": 64, "value": 1.0}])}, 404, "latent 64 does not exist"),
    ("post", "/api/steer", {"json": _steer(latents=[{"id": 1, "value": "abc"}])}, 422, "latents[0].value:"),
    ("post", "/api/steer", {"json": _steer(latents=[{"id": 1, "value": 1e5}])}, 422, "latents[0].value:"),
    ("post", "/api/steer", {"json": _steer(latents=[{"id": 1, "value": 1.0}, {"id": 1, "value": 2.0}])}, 422,
     "latent 1 is given twice"),
    ("post", "/api/steer", {"json": _steer(latents=[{"id": i, "value": 1.0} for i in range(17)])}, 422, "latents:"),
    ("post", "/api/steer", {"json": _steer(latents=[])}, 422, "latents:"),
    ("post", "/api/steer", {"json": _steer(latents=[{"id": 1, "value": 1, "mode": "nope"}])}, 422,
     "latents[0].mode: Input should be 'add' or 'clamp'"),
    ("post", "/api/steer", {"json": _steer(prompt="")}, 422, "prompt:"),
    ("post", "/api/steer", {"json": _steer(prompt="w1 " * 34_000)}, 422, "prompt: String should have at most 2000"),
    ("post", "/api/steer", _raw('{"prompt": "\\ud800", "latents": [{"id": 1, "value": 1}]}'), 422,
     "prompt: holds a lone UTF-16 surrogate"),
    ("post", "/api/steer", {"json": _steer(max_new_tokens=10**9)}, 422, "max_new_tokens:"),
    ("post", "/api/steer", {"json": []}, 422, "request body:"),
    ("post", "/api/inspect", _raw('{"text": "\\ud800"}'), 422, "text: holds a lone UTF-16 surrogate"),
    ("post", "/api/inspect", _raw('{"text": "w1 \\udfff w2"}'), 422, "text: holds a lone UTF-16 surrogate"),
    ("post", "/api/inspect", _raw('{"text": "w1", "layer": NaN}'), 422, "layer:"),
    ("post", "/api/inspect", {"json": {"text": "w1", "layer": 10**30}}, 400, "layer must be in 0..1"),
    ("post", "/api/inspect", {"json": {"text": "a" * 100_000}}, 422, "text: String should have at most 2000"),
    ("post", "/api/inspect", {"json": {"text": "w1", "top": 0}}, 422, "top:"),
    ("post", "/api/inspect", _raw('{"text": "w1",'), 422, "request body: not valid JSON"),
    ("post", "/api/inspect", _raw("[" * 100_000), 400, "body"),  # nested past the JSON parser's recursion limit
]


@pytest.mark.parametrize("method,path,kwargs,status,message", MALFORMED, ids=[f"{m[0]} {m[1][:40]} {i}" for i, m in enumerate(MALFORMED)])
def test_every_malformed_request_gets_a_4xx_with_a_readable_message(full, method, path, kwargs, status, message):
    r = getattr(full, method)(path, **kwargs) if kwargs else getattr(full, method)(path)
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, str) and message in detail, detail
    assert len(detail) < 2000 and "\ud800" not in detail  # the input is echoed short and escaped


def test_an_unexpected_exception_is_a_500_that_says_it_is_a_bug(state):
    from fastapi.testclient import TestClient

    def broken(prompt, latents, max_new_tokens):
        raise RuntimeError("boom \ud800")

    c = TestClient(create_app(AppState(model=state.model, dictionary=state.dictionary, steer=broken)),
                   raise_server_exceptions=False)
    r = c.post("/api/steer", json=_steer())
    assert r.status_code == 500
    assert r.json()["detail"].startswith("internal error (RuntimeError: boom \\ud800); this is a bug in mechscope")


# -- the feature list and search --------------------------------------------------------------------------
def test_feature_list_pages_sorts_and_shows_top_tokens(full, full_state):
    db = full_state.db
    everything = full.get("/api/features?limit=500&order=id").json()
    assert everything["total"] == db.n_latents == 64 and [r["id"] for r in everything["latents"]] == list(range(64))
    for r in everything["latents"]:  # each row's top tokens: the distinct tokens its top examples peak on
        f = db.feature(r["id"])
        assert r["top_tokens"] == list(dict.fromkeys(ex["max_token"] for ex in f["top"]))[:5]
        assert (r["density"], r["max_act"], r["mean_act"]) == (f["density"], f["max_act"], f["mean_act"])
    assert sum(bool(r["top_tokens"]) for r in everything["latents"]) > 32  # the column is not empty
    labelled = everything["latents"][LABELLED]  # the best-scored label, with its score and provenance
    assert (labelled["label"], labelled["label_score"], labelled["label_explainer"]) == ("the better label", 0.8, "y")
    assert labelled["label_score_kind"] == "detection balanced accuracy" and labelled["label_date"]

    def ids(order, offset=0, limit=10):
        d = full.get(f"/api/features?order={order}&offset={offset}&limit={limit}").json()
        assert (d["order"], d["offset"], d["limit"], d["total"]) == (order, offset, limit, 64)
        return [r["id"] for r in d["latents"]]

    rows = everything["latents"]
    by = {"id": lambda r: r["id"], "density": lambda r: (-r["density"], r["id"]),
          "density_asc": lambda r: (r["density"], r["id"]), "max_act": lambda r: (-r["max_act"], r["id"])}
    for order, key in by.items():
        want = [r["id"] for r in sorted(rows, key=key)]
        assert ids(order, 0, 64) == want, order
        assert ids(order, 10, 10) == want[10:20] and ids(order, 60, 10) == want[60:], order  # pages; a short last one
    assert ids("id", 64) == [] and ids("id", 2**31 - 1) == []  # past the end: an empty page with the total


def test_search_rows_equal_the_list_rows(full, full_state):
    db = full_state.db
    tok = db.feature(5)["top"][0]["max_token"]
    r = full.get("/api/search", params={"q": tok, "by": "token"}).json()
    want = db.search_tokens(tok, limit=50)
    assert [x["id"] for x in r["latents"]] == want and 5 in want
    rows = {x["id"]: x for x in full.get("/api/features?limit=500").json()["latents"]}
    assert all(x == rows[x["id"]] for x in r["latents"])
    assert full.get("/api/search", params={"q": "better", "by": "label"}).json()["latents"][0]["id"] == LABELLED
    nothing = full.get("/api/search", params={"q": "\u00ff\u00ff no such text", "by": "text"})
    assert nothing.status_code == 200 and nothing.json()["latents"] == []


def test_feature_summary_gives_the_steering_scale(full, full_state):
    f = full_state.db.feature(5)
    s = full.get("/api/feature/5/summary").json()
    assert (s["id"], s["mean_act"], s["max_act"], s["density"]) == (5, f["mean_act"], f["max_act"], f["density"])


# -- steering ---------------------------------------------------------------------------------------------
def test_steering_several_latents_at_once(full, full_state):
    """Two latents, one added and one clamped: the endpoint applies both, as steer_latents would."""
    from mechscope.features.generation import generate
    from mechscope.features.steering import steer_latents

    m, d = full_state.model, full_state.dictionary
    body = {"prompt": "w1 w2 w3", "max_new_tokens": 5,
            "latents": [{"id": 5, "value": 40.0, "mode": "add"}, {"id": 9, "value": 0.0, "mode": "clamp"}]}
    r = full.post("/api/steer", json=body)
    assert r.status_code == 200, r.text
    steers = [steer_latents(d, {5: 40.0}, mode="add"), steer_latents(d, {9: 0.0}, mode="clamp")]
    assert r.json()["steered"] == generate(m, "w1 w2 w3", interventions=steers, max_new_tokens=5).text
    one = full.post("/api/steer", json={**body, "latents": body["latents"][:1]}).json()
    assert one["steered"] == generate(m, "w1 w2 w3", interventions=steers[:1], max_new_tokens=5).text


# -- headers: CSP, nosniff, caching -----------------------------------------------------------------------
PAGES = ("/", "/inspect", "/steer", "/patching", "/feature/3")


def test_every_page_has_a_csp_and_no_inline_script(full):
    import re

    for path in ("/api/info", "/static/app.js", "/plotly.min.js", "/nope"):
        assert full.get(path).headers["x-content-type-options"] == "nosniff", path
    assert 'href="/steer?latent=3"' in full.get("/feature/3").text  # "steer this latent" carries the id
    for path in PAGES:
        r = full.get(path)
        csp = r.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "script-src 'self';" in csp and "connect-src 'self'" in csp, path
        assert "'unsafe-inline'" not in csp.split("script-src")[1].split(";")[0] and "'unsafe-eval'" not in csp
        assert r.headers["x-content-type-options"] == "nosniff" and r.headers["cache-control"] == "no-cache"
        inline = [s for s in re.findall(r"<script([^>]*)>", r.text) if "src=" not in s]
        assert inline == [], f"{path} has an inline script, which the CSP blocks; move it to static/"
        assert "innerHTML" not in r.text


def test_assets_are_cached_by_version_and_revalidated_otherwise(full):
    import re

    html = full.get("/inspect").text
    urls = re.findall(r'(?:src|href)="(/(?:static/[^"]+|plotly\.min\.js[^"]*))"', html)
    assert {u.split("?")[0] for u in urls} == {"/static/app.css", "/static/app.js", "/static/inspect.js", "/plotly.min.js"}
    for url in urls:  # the URLs pages use carry the asset's version: cached for a year, never revalidated
        assert "?v=" in url, url
        r = full.get(url)
        assert r.status_code == 200 and r.headers["cache-control"] == "public, max-age=31536000, immutable", url
        etag = r.headers["etag"]
        bare = full.get(url.split("?")[0])  # no version, or another one: revalidate, 304 when unchanged
        assert bare.headers["cache-control"] == "no-cache" and bare.headers["etag"] == etag
        assert full.get(url.split("?")[0] + "?v=old").headers["cache-control"] == "no-cache"
        again = full.get(url.split("?")[0], headers={"If-None-Match": etag})
        assert again.status_code == 304 and again.content == b"" and again.headers["etag"] == etag, url
    assert full.get("/plotly.min.js", headers={"If-None-Match": '"other"'}).status_code == 200
