"""The probe page's API on a tiny model: per-token scores equal the probe applied to a plain cached forward, the
aggregate is the probe's own, the monitored generation is token for token plain generation with the monitor's
scores, rule values and alarms; thresholds come from --probe-threshold, the probe's cfg.json, or 0 (said);
bad requests get a readable 4xx; a server without probes says how to load one; and ``mechscope serve --probe``
refuses a missing folder (before loading the model) and a probe of another width with one line, exit 2."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from typer.testing import CliRunner

import mechscope
from mechscope.app import AppState, create_app
from mechscope.app.probe_routes import NO_PROBES, load_probes
from mechscope.features.generation import generate
from mechscope.safety.monitor import Monitor, rule_values
from mechscope.safety.probes import fit_probe
from tests.unit.test_app import tiny_model_dir  # noqa: F401 (fixture)

SITES = ("blocks.1.hook_resid_post", "blocks.0.hook_resid_post")
TEXT = "w5 w9 w1 w33 w7 w7"


def make_probe(model, site: str, *, d: int = 32, seed: int = 0, aggregation: str = "mean", info: dict | None = None):
    g = torch.Generator().manual_seed(seed)
    return fit_probe(torch.randn(40, d, generator=g), torch.arange(40) % 2, "diff_means", site=site,
                     model_name=model.cfg.name, aggregation=aggregation, info=info)


@pytest.fixture(scope="module")
def model(tiny_model_dir):  # noqa: F811
    return mechscope.load(str(tiny_model_dir))


@pytest.fixture(scope="module")
def folders(model, tmp_path_factory):
    """Three saved probes: ``resid1`` (mean, carries a threshold), ``resid0`` (max, none), ``wide`` (d=48)."""
    root = tmp_path_factory.mktemp("probes")
    make_probe(model, SITES[0], info={"threshold": 0.25}).save(root / "resid1")
    make_probe(model, SITES[1], seed=1, aggregation="max").save(root / "resid0")
    make_probe(model, SITES[0], d=48).save(root / "wide")
    return root


@pytest.fixture(scope="module")
def state(model, folders):
    return AppState(model=model, probes=load_probes([folders / "resid1", folders / "resid0"], model))


@pytest.fixture(scope="module")
def client(state):
    from fastapi.testclient import TestClient

    return TestClient(create_app(state), raise_server_exceptions=False)


def offline_scores(model, probe, tokens):
    """One plain forward with the probe's site cached, scored by the probe."""
    return probe.score_tokens(model.run(tokens, cache=[probe.site]).cache[probe.site][0])


def test_thresholds_come_from_the_flag_the_cfg_or_the_decision_boundary(state, model, folders):
    by = {p.name: p for p in state.probes}
    assert sorted(by) == ["resid0", "resid1"]
    assert by["resid1"].threshold == 0.25 and "cfg.json" in by["resid1"].threshold_from
    assert by["resid0"].threshold == 0.0 and "not calibrated" in by["resid0"].threshold_from
    forced = load_probes([folders / "resid1"], model, threshold=-1.5)
    assert forced[0].threshold == -1.5 and forced[0].threshold_from == "--probe-threshold"



def test_probes_of_the_same_folder_name_get_distinct_names(model, folders, tmp_path):
    import shutil

    for run in ("run-a", "run-b"):
        shutil.copytree(folders / "resid1", tmp_path / run / "logistic")
    twins = load_probes([tmp_path / "run-a" / "logistic", tmp_path / "run-b" / "logistic"], model)
    assert [p.name for p in twins] == ["run-a/logistic", "run-b/logistic"]


def test_probe_scores_equal_the_probe_on_a_plain_forward(client, state, model):
    r = client.post("/api/probe", json={"text": TEXT})
    assert r.status_code == 200, r.text
    body = r.json()
    tokens = model.to_tokens(TEXT)
    assert body["n_tokens"] == tokens.shape[1] == len(body["tokens"]) == 6
    assert "".join(body["tokens"]) == body["text"] and body["labels"] == model.to_str_tokens(tokens)
    assert body["aggregate_from"] == 0  # this tokenizer adds no BOS
    assert [p["name"] for p in body["probes"]] == ["resid1", "resid0"]
    for got, served in zip(body["probes"], state.probes):
        want = offline_scores(model, served.probe, tokens)
        torch.testing.assert_close(torch.tensor(got["scores"], dtype=torch.float64), want, atol=1e-5, rtol=0)
        assert abs(got["aggregate"] - served.probe.aggregate(want)) < 1e-5
        assert got["above"] == (got["aggregate"] > served.threshold) and got["threshold"] == served.threshold
        assert got["site"] == served.probe.site and got["aggregation"] == served.probe.aggregation
    assert body["probes"][1]["aggregate"] == pytest.approx(max(body["probes"][1]["scores"]))  # "max" aggregation

    one = client.post("/api/probe", json={"text": TEXT, "probes": ["resid0"]}).json()
    assert [p["name"] for p in one["probes"]] == ["resid0"] and one["probes"][0]["scores"] == body["probes"][1]["scores"]


def test_a_leading_bos_is_scored_but_not_aggregated(client, state, model):
    text = "<bos> w5 w9 w1"
    body = client.post("/api/probe", json={"text": text}).json()
    tokens = model.to_tokens(text)
    assert int(tokens[0, 0]) == model.tokenizer.bos_token_id and body["aggregate_from"] == 1
    for got, served in zip(body["probes"], state.probes):
        want = offline_scores(model, served.probe, tokens)
        assert len(got["scores"]) == 4 and abs(got["aggregate"] - served.probe.aggregate(want[1:])) < 1e-5


def test_monitor_is_plain_generation_with_the_monitors_scores(client, state, model):
    served = state.probes[0]
    prompt = "w1 w2 w3"
    plain = generate(model, prompt, max_new_tokens=12)
    s = offline_scores(model, served.probe, plain.tokens)[plain.prompt_len:]
    thr = float(rule_values(s, "window_max", window=2).median())  # some tokens alarm, some do not
    r = client.post("/api/monitor", json={"prompt": prompt, "probe": "resid1", "max_new_tokens": 12,
                                          "rule": "window_max", "window": 2, "threshold": thr})
    assert r.status_code == 200, r.text
    body = r.json()
    (ref,) = Monitor(served.probe, threshold=thr, rule="window_max", window=2).generate(model, prompt, max_new_tokens=12)
    assert body["token_ids"] == ref.tokens.tolist() == plain.tokens[0].tolist()
    assert body["prompt_len"] == plain.prompt_len and body["text"] == plain.text
    assert "".join(body["tokens"]) == model.tokenizer.decode(plain.tokens[0].tolist())  # spans of the exact text
    assert body["labels"] == model.to_str_tokens(plain.tokens)
    torch.testing.assert_close(torch.tensor(body["scores"], dtype=torch.float64), ref.scores, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor(body["values"], dtype=torch.float64), ref.values, atol=1e-5, rtol=0)
    assert body["values_from"] == plain.prompt_len and body["threshold"] == thr
    assert [a["position"] for a in body["alarms"]] == [a.position for a in ref.alarms] and body["alarms"]
    assert [a["token"] for a in body["alarms"]] == [a.token for a in ref.alarms]
    assert body["flagged"] is True and body["threshold_from"] == "this request"

    default = client.post("/api/monitor", json={"prompt": prompt, "max_new_tokens": 3}).json()
    assert default["name"] == "resid1" and default["threshold"] == 0.25 and default["rule"] == "ema"
    assert default["flagged"] == bool(default["alarms"]) and default["token_ids"] == plain.tokens[0, :6].tolist()


def test_chat_renders_one_user_message_through_the_template():
    from fastapi.testclient import TestClient

    from mechscope.app.probe_routes import ServedProbe
    from tests.conftest import make_words_model

    model = make_words_model()
    model.tokenizer.chat_template = ("{% for m in messages %}w100 {{ m['content'] }} w101 {% endfor %}"
                                     "{% if add_generation_prompt %}w102{% endif %}")
    probe = make_probe(model, SITES[0], d=64)
    c = TestClient(create_app(AppState(model=model, probes=[ServedProbe("p", probe, 0.0, "test")])),
                   raise_server_exceptions=False)
    body = c.post("/api/probe", json={"text": "w5 w6", "chat": True}).json()
    assert body["labels"] == ["w100", "w5", "w6", "w101"] and body["chat"] is True
    want = offline_scores(model, probe, model.to_tokens("w100 w5 w6 w101 ", prepend_bos=False))
    torch.testing.assert_close(torch.tensor(body["probes"][0]["scores"], dtype=torch.float64), want, atol=1e-5, rtol=0)
    mon = c.post("/api/monitor", json={"prompt": "w5 w6", "chat": True, "max_new_tokens": 4}).json()
    assert mon["labels"][:mon["prompt_len"]] == ["w100", "w5", "w6", "w101", "w102"]  # the generation prompt too
    ids = model.to_tokens("w100 w5 w6 w101 w102", prepend_bos=False)
    assert mon["token_ids"] == generate(model, ids[0], max_new_tokens=4).tokens[0].tolist()


@pytest.mark.parametrize("path, body, status, message", [
    ("/api/probe", {"text": ""}, 422, "text: String should have at least 1 character"),
    ("/api/probe", {"text": "   "}, 400, "the prompt is blank"),
    ("/api/probe", {"text": "w1", "probes": ["nope"]}, 404, "no probe named 'nope'; this server has ['resid0', 'resid1']"),
    ("/api/probe", {"text": "w1", "chat": True}, 400, "has no chat template"),
    ("/api/probe", {"text": "w1 " * 300}, 400, "300 tokens but tiny-llama* has a context of 256"),
    ("/api/monitor", {"prompt": "w1", "max_new_tokens": 201}, 422, "max_new_tokens: Input should be less than or equal to 200"),
    ("/api/monitor", {"prompt": "w1", "probe": "nope"}, 404, "no probe named 'nope'"),
    ("/api/monitor", {"prompt": ""}, 422, "prompt: String should have at least 1 character"),
    ("/api/monitor", {"prompt": "w1", "rule": "mean"}, 422, "rule: Input should be 'ema' or 'window_max'"),
    ("/api/monitor", {"prompt": "w1", "max_new_tokens": True}, 422, "max_new_tokens"),
])
def test_bad_requests_get_a_readable_4xx(client, path, body, status, message):
    r = client.post(path, json=body)
    assert r.status_code == status, r.text
    pattern = re.escape(message).replace(r"\*", ".*")  # '*': the temporary folder's name varies
    assert re.search(pattern, r.json()["detail"]), r.json()["detail"]


def test_without_probes_the_page_and_the_api_say_how_to_load_one(model):
    from fastapi.testclient import TestClient

    c = TestClient(create_app(AppState(model=model)), raise_server_exceptions=False)
    page = c.get("/probe")
    assert page.status_code == 200 and "script-src 'self'" in page.headers["content-security-policy"]
    assert "/static/probe.js?v=" in page.text and "innerHTML" not in c.get("/static/probe.js").text
    assert c.get("/api/probes").json() == {"probes": [], "help": NO_PROBES, "max_new_tokens": 200}
    assert "--probe DIR" in NO_PROBES
    for path, body in (("/api/probe", {"text": "w1"}), ("/api/monitor", {"prompt": "w1"})):
        r = c.post(path, json=body)
        assert r.status_code == 404 and "mechscope serve --probe DIR" in r.json()["detail"]
    assert "/probe" in c.get("/nothing-here").json()["detail"]  # the 404 lists the page


def test_probe_of_another_model_or_site_is_refused(model, folders, tmp_path):
    from mechscope.core.errors import InputError

    with pytest.raises(InputError, match="reads 48 features"):
        load_probes([folders / "wide"], model)
    other = dataclasses.replace(make_probe(model, SITES[0]), model_name="another-model")
    other.save(tmp_path / "other")
    with pytest.raises(InputError, match="fitted on 'another-model' activations"):
        load_probes([tmp_path / "other"], model)
    with pytest.raises(InputError, match="given more than once"):
        load_probes([folders / "resid1", folders / "resid1"], model)


# -- the CLI ------------------------------------------------------------------------------------------------
@pytest.fixture()
def cli(tiny_model_dir, folders, monkeypatch):  # noqa: F811
    """Run ``mechscope serve`` without serving: uvicorn.run records the app; model loads are recorded."""
    import transformers
    import uvicorn

    from mechscope.models import loading

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    transformers.utils.logging.disable_progress_bar()
    served, loads = [], []
    real = loading._from_folder
    monkeypatch.setattr(loading, "_from_folder", lambda path, *a, **k: loads.append(str(path)) or real(path, *a, **k))
    monkeypatch.setattr(uvicorn, "run", lambda app, **k: served.append(app))
    from mechscope.cli.root import app

    def run(*args):
        return CliRunner().invoke(app, ["serve", "--model", str(tiny_model_dir), "--dtype", "float32", "--threads", "1",
                                        *[str(a) for a in args]])
    yield run, served, loads
    transformers.utils.logging.enable_progress_bar()


def one_error_line(r) -> str:
    assert r.exit_code == 2, (r.exit_code, r.output, r.exception)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


def test_serve_probe_errors_are_one_line_exit_2(cli, folders, tmp_path):
    run, served, loads = cli
    line = one_error_line(run("--probe", tmp_path / "missing"))
    assert f"{tmp_path / 'missing'} holds no probe" in line and "Probe.save" in line
    assert loads == []  # refused before loading the model
    line = one_error_line(run("--probe-threshold", "nan", "--probe", folders / "resid1"))
    assert "--probe-threshold must be a finite number" in line and loads == []
    line = one_error_line(run("--probe", folders / "wide"))
    assert f"{folders / 'wide'} reads 48 features at {SITES[0]}" in line and "Refit it on this model" in line
    assert served == []


def test_serve_probe_loads_the_probes(cli, folders):
    run, served, _ = cli
    r = run("--probe", folders / "resid1", "--probe", folders / "resid0", "--probe-threshold", "1.5")
    assert r.exit_code == 0, r.output
    from fastapi.testclient import TestClient

    probes = TestClient(served[0]).get("/api/probes").json()["probes"]
    assert [(p["name"], p["threshold"], p["threshold_from"]) for p in probes] == [
        ("resid1", 1.5, "--probe-threshold"), ("resid0", 1.5, "--probe-threshold")]
