"""Claims and their audit (mechscope.safety.claim, claim_io, audit, claims_from; ``mechscope audit``).

Claims tested: every field survives a JSON round trip (hand-built and hypothesis-generated claims); every
invalid field is refused with a message naming the file, the claim, the field and the fix; hand-built claims
reach each grade A-F for the reasons the rubric gives; claims made from a real ProbeRun, CausalCheck,
monitor calibration, steering measurement and circuit evaluation carry their source's numbers unchanged and
get the grade the rubric says; the HTML page escapes hostile strings and loads nothing from outside; the CLI
exits 0 with a table, 2 with one line for a bad file, writes --html and prints --rubric.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import warnings
from pathlib import Path

import pytest
import torch
import typer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from mechscope.core.errors import InputError
from mechscope.safety.audit import (
    GRADES,
    RUBRIC,
    audit,
    audit_html,
    beats,
    excludes_null,
    grade,
    relative_width,
    supports,
)
from mechscope.safety.claim import (
    SCHEMA,
    Claim,
    Control,
    DataRef,
    Mechanism,
    ModelRef,
    Test,
)
from mechscope.safety.claim_io import claims_from_json, read_claims, write_claims
from tests.conftest import make_words_model


# -- fixture factories ---------------------------------------------------------------------------------------
def make_test(**over) -> Test:
    kw = {"name": "steer along d, alpha 4", "kind": "causal", "intervention": "steer", "estimate": 2.0, "low": 1.5,
          "high": 2.5, "n": 20, "held_out": True, "data": "pairs", "metric": "logit diff", "units": "nats",
          "controls": (Control("random directions", 0.1, -0.4, 0.4, n=19, description="± max |effect|"),)}
    kw.update(over)
    return Test(**kw)


def make_claim(*tests, **over) -> Claim:
    kw = {"behaviour": "the model prefers the honest answer", "id": over.pop("id", "c1"),
          "mechanism": Mechanism("a direction at layer 1", sites=("blocks.1.hook_resid_post",), heads=("a1.h0",),
                                 features=("sae/12",), directions=("diff of means",), edges=("a0.h1->a1.h0<q>",)),
          "tests": tests or (make_test(),), "data": (DataRef("pairs", "abc123", "test", 20),),
          "model": ModelRef("tiny", "f00d"), "not_tested": ("free generation",), "source": "hand",
          "created": "2026-01-31T12:00:00+00:00", "notes": "n"}
    kw.update(over)
    return Claim(**kw)


def correlational(**over) -> Test:
    kw = {"name": "probe auroc", "kind": "correlational", "intervention": "none", "estimate": 0.9, "low": 0.85,
          "high": 0.95, "null": 0.5, "controls": (Control("shuffled labels", 0.55),)}
    kw.update(over)
    return make_test(**kw)


# -- JSON round trip -----------------------------------------------------------------------------------------
def test_every_field_survives_a_round_trip(tmp_path):
    c = make_claim(make_test(details={"alpha": 4.0, "kl": [0.1, 0.2]}, passed=True, ci_level=0.9), correlational())
    d = c.to_dict()
    assert d["schema"] == SCHEMA and d["tests"][0]["controls"][0]["n"] == 19
    assert Claim.from_dict(json.loads(json.dumps(d))) == c
    path = write_claims(tmp_path / "c.json", [c, make_claim(id="c2")])
    back = read_claims(path)
    assert back[0] == c and back[1].id == "c2"
    assert json.loads(path.read_text())["claims"][0] == d
    # the three accepted layouts
    assert claims_from_json(d) == [c] and claims_from_json([d]) == [c] and claims_from_json({"claims": [d]}) == [c]
    # a default id is deterministic and the default time is ISO
    a = Claim("b", Mechanism("m"), created="2026-01-01T00:00:00+00:00")
    assert a.id == Claim("b", Mechanism("m"), created="2026-01-01T00:00:00+00:00").id and len(a.id) == 12


finite = st.floats(-1e6, 1e6, allow_nan=False)
words = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=12).filter(str.strip)


def draw_claim(draw) -> Claim:
    """A random valid claim (built in the test body: beartype's checks draw from ``random``, which hypothesis
    forbids inside strategies)."""
    def one_test(i):
        a, b = sorted((draw(finite), draw(finite)))
        causal = draw(st.booleans())
        ctrls = tuple(Control(draw(words), draw(finite), n=draw(st.none() | st.integers(1, 99)))
                      for _ in range(draw(st.integers(0, 2))))
        return Test(f"t{i}", "causal" if causal else "correlational", draw(finite),
                    intervention=draw(st.sampled_from(("steer", "ablate", "patch"))) if causal else "none",
                    low=a, high=b, null=draw(finite), alternative=draw(st.sampled_from(("two-sided", "greater", "less"))),
                    n=draw(st.none() | st.integers(1, 10**6)),
                    held_out=draw(st.booleans()), passed=draw(st.none() | st.booleans()), controls=ctrls,
                    details={"x": draw(finite)})
    return Claim(draw(words), Mechanism(draw(words), sites=tuple(draw(st.lists(words, max_size=3)))),
                 tuple(one_test(i) for i in range(draw(st.integers(0, 3)))),
                 model=draw(st.none() | st.builds(ModelRef, words)), not_tested=tuple(draw(st.lists(words, max_size=2))))


def test_a_one_sided_test_supports_only_on_its_side():
    """An AUROC claimed above chance that comes out far below it (a probe that reads the opposite, as SmolLM2's
    truth probe on negated statements, 0.18) excludes the null but does not support the claim."""
    inverted = correlational(estimate=0.18, low=0.09, high=0.29, alternative="greater",
                             controls=(Control("random directions", 0.5, 0.4, 0.6),))
    assert not excludes_null(inverted) and not beats(inverted, inverted.controls[0]) and not supports(inverted)
    assert "does not lie above the null 0.5" in grade(make_claim(inverted)).result("null_excluded").reason
    two_sided = correlational(estimate=0.18, low=0.09, high=0.29, controls=(Control("random directions", 0.5, 0.4, 0.6),))
    assert supports(two_sided)  # either side of chance counts when the claim does not say which
    less = make_test(estimate=-2.0, low=-2.5, high=-1.5, alternative="less")
    assert supports(less) and not supports(make_test(alternative="less"))
    with pytest.raises(InputError, match="alternative must be one of"):
        make_test(alternative="above")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_generated_claims_round_trip_and_grade_deterministically(data):
    c = draw_claim(data.draw)
    back = Claim.from_dict(json.loads(json.dumps(c.to_dict())))
    assert back == c
    assert grade(back) == grade(c) and grade(c).letter in GRADES


# -- validation ------------------------------------------------------------------------------------------------
def _bad(tmp_path, mutate, match):
    d = make_claim().to_dict()
    mutate(d)
    p = tmp_path / "bad.json"
    p.write_text(json.dumps([make_claim(id="ok").to_dict(), d]))
    with pytest.raises(InputError, match=match) as e:
        read_claims(p)
    msg = str(e.value)
    assert str(p) in msg and "claim 1" in msg and "'c1'" in msg, msg
    return msg


@pytest.mark.parametrize("mutate, match", [
    (lambda d: d.pop("behaviour"), r"behaviour is missing; every claim needs behaviour"),
    (lambda d: d.update(behaviour="  "), r"behaviour must be a non-empty string"),
    (lambda d: d["tests"][0].update(low=3.0), r"tests\[0\]\.low is 3\.0, above high 2\.5.*swap them"),
    (lambda d: d["tests"][0].update(estimate="big"), r"tests\[0\]\.estimate must be a number.*JSON number"),
    (lambda d: d["tests"][0].update(kind="anecdotal"), r"tests\[0\]\.kind must be one of causal, correlational"),
    (lambda d: d["tests"][0].update(intervention="none"), r"tests\[0\]\.intervention is 'none' but kind is 'causal'"),
    (lambda d: d["tests"][0].update(estimate=float("nan")), r"tests\[0\]\.estimate is nan, which is not a finite"),
    (lambda d: d["tests"][0]["controls"][0].update(high=None), r"controls\[0\]\.low and high must both be numbers"),
    (lambda d: d["tests"][0].update(n=0), r"tests\[0\]\.n must be a positive whole number"),
    (lambda d: d["tests"][0].update(data="other"), r"tests\[0\]\.data names data 'other'.*add a data entry"),
    (lambda d: d["tests"][0].update(colour="red"), r"tests\[0\]\.colour is not a field of a test.*spelling"),
    (lambda d: d.update(schema="mechscope.claim/0"), r"schema is 'mechscope.claim/0', not 'mechscope.claim/1'"),
    (lambda d: d.update(created="yesterday"), r"created 'yesterday' is not an ISO 8601 time"),
    (lambda d: d["mechanism"].update(heads="a1.h0"), r"mechanism\.heads must be a list of strings"),
    (lambda d: d.update(model={"fingerprint": "x"}), r"model\.name is missing"),
])
def test_every_invalid_field_names_the_file_claim_field_and_fix(tmp_path, mutate, match):
    _bad(tmp_path, mutate, match)


def test_file_level_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_claims(tmp_path / "none.json")
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(InputError, match="is not valid JSON"):
        read_claims(tmp_path / "x.json")
    (tmp_path / "y.json").write_text(json.dumps({"claims": [], "extra": 1}))
    with pytest.raises(InputError, match=r"unknown top-level keys \['extra'\]"):
        read_claims(tmp_path / "y.json")
    d = make_claim().to_dict()
    with pytest.raises(InputError, match=r"ids \['c1'\] appear more than once"):
        claims_from_json([d, d])
    with pytest.raises(InputError, match="Test.low is 2.0, above high 1.0"):
        make_test(low=2.0, high=1.0)
    with pytest.raises(InputError, match="details must hold plain finite JSON"):
        make_test(details={"t": torch.ones(2)})


# -- grading -------------------------------------------------------------------------------------------------
def _reasons(g):
    return {r.id: (r.passed, r.reason) for r in g.results}


def test_hand_built_claims_reach_each_grade_for_the_rubrics_reasons():
    a = grade(make_claim())
    assert a.letter == "A" and all(r.passed for r in a.results), a
    assert "relative width 0.5" in _reasons(a)["ci_width"][1]  # (2.5 - 1.5) / |2 - 0|

    no_heldout = grade(make_claim(make_test(held_out=False)))
    assert no_heldout.letter == "B" and "held-out data" in no_heldout.summary
    no_control = grade(make_claim(make_test(controls=())))
    assert no_control.letter == "B" and _reasons(no_control)["controls"][0] is False
    wide = grade(make_claim(make_test(low=0.1, high=3.9)))  # width 3.8 / 2
    assert wide.letter == "B" and "relative width 1.9" in _reasons(wide)["ci_width"][1]
    assert grade(make_claim(make_test(low=0.1, high=3.9)), max_rel_width=2.0).letter == "A"

    c = grade(make_claim(correlational()))
    assert c.letter == "C" and not _reasons(c)["causal"][0] and "no causal test" in c.summary
    d_base = grade(make_claim(correlational(controls=())))
    assert d_base.letter == "D" and "controls present" in d_base.summary
    d_held = grade(make_claim(correlational(held_out=False)))
    assert d_held.letter == "D" and "held-out data" in d_held.summary
    d_chance = grade(make_claim(correlational(estimate=0.52, low=0.45, high=0.6)))
    assert d_chance.letter == "D" and "no test supports" in d_chance.summary
    assert grade(Claim("b", Mechanism("m"))).letter == "D"

    f_null = grade(make_claim(make_test(estimate=0.2, low=-0.3, high=0.7), correlational()))
    assert f_null.letter == "F" and "contains the null 0" in _reasons(f_null)["null_excluded"][1]
    f_ctrl = grade(make_claim(make_test(estimate=0.3, low=0.2, high=0.4)))  # control reaches 0.4
    assert f_ctrl.letter == "F" and "not beyond random directions" in _reasons(f_ctrl)["beats_control"][1]
    f_rule = grade(make_claim(make_test(passed=False)))
    assert f_rule.letter == "F" and "own rule failed" in _reasons(f_rule)["own_rule"][1]
    # the best causal test decides: one failing alpha beside a passing one is still A
    both = grade(make_claim(make_test(name="weak", estimate=0.1, low=-0.2, high=0.4), make_test()))
    assert both.letter == "A" and both.deciding_test == 1 and "[1 of 2 causal tests support it]" in both.summary
    # negative effects: the control is beaten on the negative side
    assert grade(make_claim(make_test(estimate=-2.0, low=-2.5, high=-1.5))).letter == "A"
    # advisory criteria do not move the letter
    bare = grade(make_claim(model=None, not_tested=(), data=(), tests=(make_test(data=None),)))
    assert bare.letter == "A" and not _reasons(bare)["provenance"][0] and not _reasons(bare)["limits"][0]
    assert [r.id for r in a.results] == [c.id for c in RUBRIC]


def test_relative_width_and_bad_settings():
    assert relative_width(correlational()) == pytest.approx(0.1 / 0.4)
    assert math.isnan(relative_width(make_test(low=None, high=None)))
    with pytest.raises(InputError, match="max_rel_width must be a positive"):
        grade(make_claim(), max_rel_width=0.0)


# -- producers ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def wmodel():
    return make_words_model()


def test_probe_run_claim_carries_the_runs_numbers(wmodel):
    from mechscope.safety import train_probe
    from mechscope.safety.claims_from import claim_from_probe_run
    from tests.unit.test_train_probe import control, planted

    run = train_probe(wmodel, planted(12), sites="blocks.*.hook_resid_post", methods=("logistic",), aggregation="last",
                      control=control(12), transfer=[planted(6, seed=5)], n_boot=100, n_random=20, progress=False)
    site = run.sweep.best_site("logistic")
    ev = run.sweep.evaluations[site, "logistic"]
    c = claim_from_probe_run(run)
    t = c.tests[0]
    assert (t.estimate, t.low, t.high, t.null, t.kind) == (ev.auroc.estimate, ev.auroc.low, ev.auroc.high, 0.5,
                                                           "correlational")
    assert t.n == ev.n_pos + ev.n_neg and t.held_out  # a validation split chose the site
    on_test = train_probe(wmodel, planted(12), sites="blocks.*.hook_resid_post", methods=("logistic",),
                          aggregation="last", control=control(12), validation_fraction=0.0, n_boot=100, n_random=20,
                          progress=False)
    assert not claim_from_probe_run(on_test).tests[0].held_out  # the site was chosen by this very AUROC
    assert [x.name for x in t.controls] == ["random directions", "shuffled labels"]
    assert t.controls[0].estimate == ev.random_auroc_mean and t.controls[1].estimate == ev.shuffled_auroc
    tr = run.transfer["planted"][site, "logistic"]
    assert c.tests[1].estimate == tr.auroc.estimate and c.tests[1].held_out
    assert c.data[0].fingerprint == run.info["fingerprint"] and c.data[0].n == run.info["n_test"]
    assert all(d.fingerprint for d in c.data)  # training, transfer and control sets all fingerprinted
    assert grade(claim_from_probe_run(run, model=wmodel)).result("provenance").passed
    assert any("causal effect of the direction" in x for x in c.not_tested)
    g = grade(c)  # the held-out test decides: held out, above 0.5, beyond the random directions' mean + 2 sd
    assert g.letter == "C" and g.deciding_test == 0 and not g.result("causal").passed and g.n_supporting == 2
    assert c.tests[1].low > 0.5 and c.tests[1].estimate > c.tests[1].controls[0].high
    # a site fixed in advance keeps the held-out test held out; no transfer: listed as not tested
    fixed = claim_from_probe_run(run, site=site)
    assert fixed.tests[0].held_out
    assert Claim.from_dict(json.loads(json.dumps(c.to_dict()))) == c


def test_causal_check_claim_carries_the_checks_numbers(wmodel):
    from mechscope.safety.causal import causal_check
    from mechscope.safety.claims_from import claim_from_causal_check
    from tests.unit.test_causal_check import SITE, planted_direction, twin_dataset

    ds = twin_dataset(6)
    chk = causal_check(wmodel, planted_direction(wmodel), ds, site=SITE, alphas=(-4, 0, 4), n_random=8, n_boot=200)
    assert chk.verdict == "causal"
    c = claim_from_causal_check(chk, data_fingerprint=ds.fingerprint())
    # the check records its pairs' fingerprint (the two claims are made a moment apart: their times may differ)
    assert dataclasses.replace(claim_from_causal_check(chk), id=c.id, created=c.created) == c
    assert [t.details["alpha"] for t in c.tests] == [-4.0, 4.0]  # alpha 0 of add mode is the clean run
    for t in c.tests:
        j = chk.alphas.index(t.details["alpha"])
        assert (t.estimate, t.low, t.high) == (chk.effect[j].estimate, chk.effect[j].low, chk.effect[j].high)
        assert t.kind == "causal" and t.intervention == "steer" and t.n == chk.n_pairs
        assert t.passed == (chk.alphas[j] in chk.passing_alphas)
        ctrl = t.controls[0]
        assert ctrl.high == pytest.approx(float(chk.random_max_abs[j])) and ctrl.n == 8
    g = grade(c)
    assert g.result("causal").passed and g.result("beats_control").passed and g.letter == "B"  # not held out
    held = claim_from_causal_check(chk, found_on="honesty_pairs", alphas="best")
    assert len(held.tests) == 1 and held.tests[0].held_out
    assert grade(held).letter == ("A" if relative_width(held.tests[0]) <= 1 else "B")
    assert any("5%-level" in x for x in held.not_tested)  # 8 random directions
    assert [t.alternative for t in c.tests] == ["less", "greater"]  # signed: alpha < 0 lowers, alpha > 0 raises
    # a direction used backwards (the planted one, negated: adding it favours the label-0 answer) is causal for
    # the check, but does not support the signed claim that it acts as its probe reads it
    back = causal_check(wmodel, -planted_direction(wmodel), ds, site=SITE, alphas=(-4, 0, 4), n_random=8, n_boot=200)
    assert back.verdict == "causal" and back.estimate[back.alphas.index(4.0)] < 0
    assert grade(claim_from_causal_check(back, found_on="x")).letter == "F"
    unsigned = claim_from_causal_check(back, found_on="x", signed=False)
    assert {t.alternative for t in unsigned.tests} == {"two-sided"} and grade(unsigned).letter in ("A", "B")


def test_null_causal_check_gives_f():
    from mechscope.safety.causal import causal_check
    from mechscope.safety.claims_from import claim_from_causal_check
    from tests.unit.test_causal_check import (
        ID_A,
        ID_B,
        SITE,
        planted_direction,
        twin_dataset,
    )

    m = make_words_model()
    d = planted_direction(m)
    m.module("lm_head").weight[ID_A] = m.module("lm_head").weight[ID_B]
    chk = causal_check(m, d, twin_dataset(4), site=SITE, alphas=(4,), n_random=2, n_boot=50)
    g = grade(claim_from_causal_check(chk, held_out=True))
    assert chk.verdict == "correlational" and g.letter == "F", g.summary


def test_monitor_and_steering_claims():
    from mechscope.analysis.bootstrap import bootstrap_ci
    from mechscope.features.steering import SteeringEffect
    from mechscope.safety.claims_from import claim_from_monitor, claim_from_steering
    from mechscope.safety.monitor_rules import Calibration

    cal = Calibration(fpr=0.05, achieved_fpr=0.04, threshold=1.7, n_items=100, rule="ema", ema=0.3, window=8,
                      token_quantiles={0.5: 0.0}, item_quantiles={0.5: 0.1}, model_name="tiny")
    only_cal = claim_from_monitor(cal, behaviour="flags deception")
    t = only_cal.tests[0]
    assert (t.estimate, t.null, t.n, t.held_out) == (0.04, 0.05, 100, False) and t.low <= 0.04 <= t.high
    assert grade(only_cal).letter == "D"
    full = claim_from_monitor(cal, behaviour="flags deception", recall=(0.8, 0.7, 0.9), auroc=(0.95, 0.9, 0.99),
                              n=60, data="scenarios", auroc_baselines={"random direction": (0.5, 0.4, 0.6)})
    assert [t.metric for t in full.tests] == ["item-level false-positive rate", "recall", "auroc"]
    assert full.tests[1].null == 0.04 and grade(full).letter == "C"  # the AUROC test decides

    g = torch.Generator().manual_seed(0)
    base = torch.randn(8, 2, generator=g, dtype=torch.float64)
    eff = SteeringEffect(torch.tensor([5, 6]), base, base + 1.0 + 0.1 * torch.randn(8, 2, generator=g, dtype=torch.float64))
    rand = SteeringEffect(torch.tensor([5, 6]), base, base + 0.05 * torch.randn(8, 2, generator=g, dtype=torch.float64))
    c = claim_from_steering(eff, behaviour="raises w1", mechanism="feature 12", baselines=[rand], target=0,
                            held_out=True, data="prompts")
    want = bootstrap_ci(eff.delta_logprob[:, 0].double(), n_boot=1000, seed=0)
    t = c.tests[0]
    assert (t.estimate, t.low, t.high, t.n) == (float(want.estimate), float(want.low), float(want.high), 8)
    assert t.kind == "causal" and len(t.controls) == 1 and grade(c).letter == "A"
    plain = claim_from_steering((0.4, -0.1, 0.9), behaviour="b", mechanism="m", n=10)
    assert grade(plain).letter == "F" and plain.tests[0].n == 10
    with pytest.raises(InputError, match="must be a CI"):
        claim_from_steering("big", behaviour="b", mechanism="m")


def test_circuit_claim_from_a_real_evaluation(tmp_path):
    from mechscope.circuits import Circuit, Graph
    from mechscope.circuits.runs import FILES, RunFolder, evaluate_run, read_evaluation
    from mechscope.core.io import write_json_atomic
    from mechscope.safety.claims_from import claim_from_circuit
    from tests.conftest import tiny_hooked
    from tests.unit.test_circuit_eval import random_circuit, toy_task

    m = tiny_hooked("qwen2")
    g = Graph.from_model(m)
    circuit = random_circuit(g, p=0.5)
    circuit.save(tmp_path / FILES["circuit"])
    run = RunFolder(tmp_path, json.loads((tmp_path / FILES["circuit"]).read_text()), None)
    task = toy_task(n=6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ev = evaluate_run(m, run, task, {"source": "toy", "n_prompts": 6, "split": "held-out"}, curve=False,
                          robustness=True, n_boot=50, progress=False)
    write_json_atomic(ev, tmp_path / FILES["evaluation"])
    c = claim_from_circuit(tmp_path)
    # made a moment apart: their times (and so ids) may differ across a second boundary
    assert dataclasses.replace(claim_from_circuit(read_evaluation(tmp_path)), id=c.id, created=c.created) == c
    f = ev["faithfulness"]["faithfulness"]
    t = c.tests[0]
    assert (t.estimate, t.low, t.high, t.n) == (f["estimate"], f["low"], f["high"], 6)
    assert t.kind == "causal" and t.intervention == "patch" and t.held_out and t.null == 0
    assert len(c.tests) == 6 and {x.intervention for x in c.tests[1:]} == {"patch", "ablate"}
    assert len(c.mechanism.edges) == circuit.n_edges == ev["circuit"]["n_edges"]
    assert "random circuits of the same size (control)" in c.not_tested
    gr = grade(c)  # no random-circuit control: never A; B if some test's interval excludes 0, else F
    assert gr.letter == ("B" if any(supports(x) for x in c.tests) else "F") and not gr.result("controls").passed
    with_ctrl = claim_from_circuit(ev, controls={"random circuits": (0.0, -0.2, 0.2)})
    assert with_ctrl.tests[0].controls[0].high == 0.2 and "random circuits of the same size (control)" not in \
        with_ctrl.not_tested
    # the circuit of every edge has f = 1 exactly: it supports the claim, B without a control, A with one
    Circuit(g, torch.ones(g.n_edges, dtype=torch.bool)).save(tmp_path / FILES["circuit"])
    run = RunFolder(tmp_path, json.loads((tmp_path / FILES["circuit"]).read_text()), None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = evaluate_run(m, run, task, {"source": "toy", "n_prompts": 6, "split": "held-out"}, curve=False,
                            n_boot=50, progress=False)
    whole = claim_from_circuit(full)
    assert (whole.tests[0].estimate, whole.tests[0].low, whole.tests[0].high) == (1.0, 1.0, 1.0)
    assert grade(whole).letter == "B" and "faithfulness under other ablations and levels (robustness)" in \
        whole.not_tested
    ctrl = t.estimate, t.low, t.high  # the random circuit above as the control
    assert t.high < 1.0 and grade(claim_from_circuit(full, controls={"random circuit, 50% of edges": ctrl})).letter == "A"
    with pytest.raises(InputError, match="circuit evaluation record"):
        claim_from_circuit({"setup": {}, "held_out": {}})  # a study's own JSON
    # the audit command takes a circuit folder and grades the same claim
    from mechscope.cli.audit import audit as audit_cmd

    write_json_atomic(full, tmp_path / FILES["evaluation"])
    app = typer.Typer()
    app.command()(audit_cmd)
    r = CliRunner().invoke(app, ["--circuit", str(tmp_path), "--json", str(tmp_path / "audit.json")])
    assert r.exit_code == 0, r.output
    assert [g["letter"] for g in json.loads((tmp_path / "audit.json").read_text())["grades"]] == ["B"]


# -- rendering and the CLI ---------------------------------------------------------------------------------------
def test_html_escapes_hostile_strings_and_loads_nothing_external():
    evil = "<script>alert('x')</script>"
    c = make_claim(behaviour=evil, mechanism=Mechanism(f"<img src=x onerror=alert(1)> {evil}"),
                   tests=(make_test(name=evil),), not_tested=(evil,))
    page = audit_html(audit([c, make_claim(correlational(), id="c2")]))
    assert "<script" not in page.lower() and "<img" not in page
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in page
    assert not re.search(r"(https?:)?//|\bsrc=|\bhref=|@import|url\(", page.replace("&lt;img src=x", ""))
    for crit in RUBRIC:
        assert crit.checks in page.replace("&#39;", "'")
    assert ">A<" in page and ">C<" in page and page.count("<tr>") >= 2 + len(RUBRIC) + len(GRADES)


def test_audit_to_dict_and_table():
    a = audit([make_claim(), make_claim(correlational(), id="c2")])
    d = json.loads(json.dumps(a.to_dict()))
    assert d["counts"] == {"A": 1, "B": 0, "C": 1, "D": 0, "F": 0}
    assert [c["id"] for c in d["rubric"]["criteria"]] == [c.id for c in RUBRIC]
    assert d["grades"][0]["criteria"][0] == {"id": "causal", "passed": True, "reason": "1 of 1 tests are causal"}
    table = a.table()
    assert table.row_count == 2 and len(table.columns) == 4 + len(RUBRIC)


def test_the_rubric_document_names_every_criterion_and_grade():
    doc = (Path(__file__).parents[2] / "docs" / "safety" / "audit-rubric.md").read_text()
    for c in RUBRIC:
        assert f"`{c.id}`" in doc, c.id
    for k in GRADES:
        assert f"**{k}**" in doc, k


@pytest.fixture
def cli():
    from mechscope.cli.audit import audit as audit_cmd

    app = typer.Typer()
    app.command()(audit_cmd)
    return app


def test_cli_table_html_rubric_and_errors(cli, tmp_path):
    runner = CliRunner()
    path = write_claims(tmp_path / "claims.json", [make_claim(), make_claim(correlational(), id="c2")])
    r = runner.invoke(cli, [str(path), "--html", str(tmp_path / "a.html"), "--json", str(tmp_path / "a.json"),
                            "--details"])
    assert r.exit_code == 0, r.output
    assert "audit of 2 claim(s)" in r.output and "A 1, C 1" in r.output and "c2" in r.output
    assert "reasons" in r.output and "relative width 0.5" in r.output
    assert "<table>" in (tmp_path / "a.html").read_text()
    assert json.loads((tmp_path / "a.json").read_text())["counts"]["A"] == 1
    r = runner.invoke(cli, ["--rubric"])
    assert r.exit_code == 0 and all(c.id in r.output for c in RUBRIC) and "contradicted" in r.output
    bad = tmp_path / "bad.json"
    d = make_claim().to_dict()
    d["tests"][0]["low"] = 9.0
    bad.write_text(json.dumps(d))
    r = runner.invoke(cli, [str(bad)])
    assert r.exit_code == 2 and r.stdout == ""
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "tests[0].low" in lines[0] and "swap them" in lines[0], r.stderr
    r = runner.invoke(cli, [])
    assert r.exit_code == 2 and "--rubric" in r.stderr
    r = runner.invoke(cli, [str(path), "--html", str(tmp_path)])
    assert r.exit_code == 2 and "is a folder" in r.stderr
