"""The web app's API on a tiny model: pages and assets load, the prompt inspector returns the model's real
values with token strings intact, malformed requests get a 4xx with a message (never a 500), and a real
server on loopback answers 50 concurrent requests without an error (a bounded load test)."""

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
from tests.unit.test_cli import tiny_model_dir  # noqa: F401 (fixture)

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def state(tiny_model_dir):  # noqa: F811
    model = mechscope.load(str(tiny_model_dir))
    d = SparseDictionary(DictionaryConfig("topk", 32, 64, HOOK, k=4)).initialize(0)
    return AppState(model=model, dictionary=d)


@pytest.fixture(scope="module")
def client(state):
    from fastapi.testclient import TestClient

    return TestClient(create_app(state), raise_server_exceptions=False)


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
    assert body["tokens"] == m.to_str_tokens(toks)
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
