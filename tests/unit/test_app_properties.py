"""Property-based tests of the web app's HTTP API: no request, however malformed, gets a 5xx, and every 4xx
carries a non-empty string ``detail`` (a readable message, not FastAPI's raw error list).

Two generators cover every endpoint and parameter of the app's OpenAPI schema (``/openapi.json``), on a
tiny model with a dictionary, a small feature database (so the database endpoints run queries) and steering:

- schemathesis, from the schema, in positive and negative modes (values that fit, and values that break
  each constraint: wrong types, out-of-range and huge integers, missing fields, strings past their bounds);
- hypothesis strategies of the inputs schemathesis does not make, because they are not valid JSON or not
  valid Unicode: NaN, Infinity, lone surrogates (in JSON bodies, query strings and paths), plus huge
  integers, and empty and 100 kB strings, in each field in turn.

Bounded for CI: capped examples, no deadline; the whole file takes about 17 s (22 s with start-up) on 2 cores.
"""

from __future__ import annotations

import json
import math
import string
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mechscope.app import AppState, create_app
from tests.unit.test_app import full_state, state, tiny_model_dir  # noqa: F401 (fixtures)

schemathesis = pytest.importorskip("schemathesis")

EXAMPLES = 25  # per operation and generation mode


def assert_answer_is_readable(status: int, body: bytes, what: str) -> None:
    """The property: no 5xx; a 4xx body is JSON with a non-empty string ``detail``."""
    assert status < 500, f"{what} -> {status}: {body[:300]!r}"
    if status >= 400:
        detail = json.loads(body).get("detail")
        assert isinstance(detail, str) and detail.strip(), f"{what} -> {status} with detail {detail!r}"


@pytest.fixture(scope="module")
def base_url(full_state):  # noqa: F811
    """The app on a real uvicorn server on loopback (the requests go through the real HTTP stack)."""
    from tests.browser.conftest import serve

    url, stop = serve(create_app(full_state))
    yield url
    stop()


# the schema does not depend on what the app serves, so an empty app gives it at import time (no model)
SCHEMA = schemathesis.openapi.from_dict(create_app(AppState()).openapi())
SCHEMA.config.generation.update(modes=["positive", "negative"], max_examples=EXAMPLES, deterministic=True,
                                database="none")


@SCHEMA.parametrize()
@settings(deadline=None, max_examples=EXAMPLES, suppress_health_check=list(HealthCheck))
def test_schema_generated_requests_never_get_a_5xx(case, base_url):
    r = case.call(base_url=base_url)
    assert_answer_is_readable(r.status_code, r.content, f"{case.method} {case.formatted_path} {case.query} {case.body!r:.200}")


# -- what schemathesis does not send: NaN, Infinity, lone surrogates, huge numbers, 100 kB strings ---------
QUERY_CHARS = 60_000  # the test client refuses URLs past 65,536 characters; bodies get the full 100 kB
EDGE = [math.nan, math.inf, -math.inf, 10**20, -(10**20), 2**63, 2**31, -1, 0, 1e308, 5e-324, 0.5, True, False, None,
        "", " ", "a" * 100_000, "\ud800", "w1 \udfff w2", "\udc80\ud800", "\x00", "w1\u202ew2", "\U0001f600", [], {},
        [None], {"id": 1}]
SURROGATE = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
TEXT = st.text(st.one_of(st.characters(), SURROGATE, st.sampled_from(string.printable)), max_size=24)
HOSTILE = st.one_of(st.sampled_from(EDGE), st.integers(), st.floats(), TEXT, st.lists(st.integers(), max_size=3))
BODIES = {
    "/api/steer": ({"prompt": "w1 w2", "latents": [{"id": 3, "value": 2.0, "mode": "add"}], "max_new_tokens": 2},
                   [("prompt",), ("latents",), ("latents", 0), ("latents", 0, "id"), ("latents", 0, "value"),
                    ("latents", 0, "mode"), ("max_new_tokens",), ()]),
    "/api/inspect": ({"text": "w1 w2", "layer": 0, "top": 3}, [("text",), ("layer",), ("top",), ()]),
}
QUERIES = {
    "/api/features": {"offset": "0", "limit": "5", "order": "id"},
    "/api/search": {"q": "w1", "by": "token", "limit": "5"},
}
PATHS = ["/api/feature/{}", "/api/feature/{}/summary", "/feature/{}"]


@pytest.fixture(scope="module")
def client(full_state):  # noqa: F811
    from fastapi.testclient import TestClient

    return TestClient(create_app(full_state), raise_server_exceptions=False)


def with_value(body, where: tuple, value):
    """``body`` with the field at path ``where`` replaced by ``value`` (``()``: the whole body)."""
    if not where:
        return value
    body = json.loads(json.dumps(body))
    node = body
    for k in where[:-1]:
        node = node[k]
    node[where[-1]] = value
    return body


def encodings(body) -> list[bytes]:
    """The body as JSON with ASCII escapes (NaN and Infinity as JavaScript writes them; a lone surrogate as
    ``\\ud800``), and as raw UTF-8 where a lone surrogate becomes bytes that are not UTF-8."""
    return [json.dumps(body).encode("ascii"), json.dumps(body, ensure_ascii=False).encode("utf-8", "surrogatepass")]


def as_text(value) -> str | list[str] | None:
    """A value as it would appear in a URL: numbers as Python writes them, lists as repeated parameters."""
    if value is None or isinstance(value, (str, list)):
        return value if not isinstance(value, str) else value[:QUERY_CHARS]
    if isinstance(value, bool):
        return str(value).lower()
    return json.dumps(value) if isinstance(value, dict) else repr(value)


def enc(s) -> str:
    return quote(str(s).encode("utf-8", "surrogatepass"), safe="")


def query_url(path: str, params: dict, name: str, value) -> str:
    text = as_text(value)
    pairs = [(k, v) for k, v in params.items() if k != name]
    pairs += [(name, v) for v in text] if isinstance(text, list) else ([] if text is None else [(name, text)])
    return path + "?" + "&".join(f"{enc(k)}={enc(v)}" for k, v in pairs)


def check_body(client, path, body):
    for raw in encodings(body):
        r = client.post(path, content=raw, headers={"content-type": "application/json"})
        assert_answer_is_readable(r.status_code, r.content, f"POST {path} {raw[:200]!r}")


def check_get(client, url):
    r = client.get(url)
    assert_answer_is_readable(r.status_code, r.content, f"GET {url[:300]}")


def test_every_edge_value_in_every_field(client):
    """Each edge value (NaN, Infinity, huge integers, lone surrogates, empty and 100 kB strings, wrong types)
    in each field of each endpoint, the others valid: exhaustive, so no case depends on a random draw."""
    for path, (base, fields) in BODIES.items():
        for where in fields:
            for value in EDGE:
                check_body(client, path, with_value(base, where, value))
    for path, params in QUERIES.items():
        for name in params:
            for value in EDGE:
                check_get(client, query_url(path, params, name, value))
    for template in PATHS:
        for value in EDGE:
            text = as_text(value)
            check_get(client, template.format(enc(text if not isinstance(text, list) else ",".join(map(str, text)))))


SETTINGS = settings(deadline=None, max_examples=60, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


@SETTINGS
@given(data=st.data())
def test_hostile_json_bodies(client, data):
    path = data.draw(st.sampled_from(sorted(BODIES)), label="path")
    base, fields = BODIES[path]
    body = base
    chosen = data.draw(st.lists(st.sampled_from(fields), min_size=1, max_size=3, unique=True), label="fields")
    for where in sorted(chosen, key=len, reverse=True):  # deeper first: replacing a parent then a child cannot work
        body = with_value(body, where, data.draw(HOSTILE, label=str(where)))
    check_body(client, path, body)


@SETTINGS
@given(data=st.data())
def test_hostile_query_strings_and_paths(client, data):
    if data.draw(st.booleans(), label="query"):
        path = data.draw(st.sampled_from(sorted(QUERIES)), label="path")
        params = QUERIES[path]
        name = data.draw(st.sampled_from([*params, "unknown"]), label="name")
        check_get(client, query_url(path, params, name, data.draw(HOSTILE, label="value")))
    else:
        text = as_text(data.draw(HOSTILE, label="segment"))
        check_get(client, data.draw(st.sampled_from(PATHS)).format(enc(text if not isinstance(text, list) else ",".join(map(str, text)))))
