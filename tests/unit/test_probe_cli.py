"""``mechscope probe ...`` and ``mechscope monitor ...`` on a tiny random Llama with a word tokenizer (no download).

Claims tested: ``probe sweep`` writes run.json whose numbers equal :func:`train_probe` run by hand with the same
arguments, the best probe of each method (loadable, equal to the run's), the claims (readable, graded) and a
self-contained report; ``probe train`` saves one probe with its control-set threshold; ``probe eval`` prints
and writes the numbers of :func:`evaluate_probe`; ``monitor calibrate`` then ``monitor generate`` produce the
tokens and scores of :class:`Monitor` used directly, and ``--out`` lines render in ``probe report``; ``monitor
drift`` on the same model reports a zero shift. Bad inputs are one line with exit status 2, before the model
loads where they can be.
"""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import mechscope
from mechscope.cli import app
from mechscope.data.labelled import Example, LabelledDataset
from tests.unit.test_cli import tiny_model_dir  # noqa: F401 (fixture)
from tests.unit.test_train_probe import control, planted

runner = CliRunner()
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def invoke(*args) -> str:
    r = runner.invoke(app, [str(a) for a in args], terminal_width=400)
    assert r.exit_code == 0, (r.output, r.exception)
    return r.stdout


def fails(*args) -> str:
    r = runner.invoke(app, [str(a) for a in args], terminal_width=400)
    assert r.exit_code == 2, (r.output, r.exception)
    lines = [line for line in r.stderr.splitlines() if line.strip() and "Loading weights" not in line]  # transformers
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe-cli")
    planted(40).to_jsonl(root / "planted.jsonl")
    planted(10, seed=5).to_jsonl(root / "transfer.jsonl")
    control().to_jsonl(root / "ctrl.jsonl")
    return root


@pytest.fixture(scope="module")
def swept(files, tiny_model_dir):  # noqa: F811
    out = files / "run"
    text = invoke("probe", "sweep", files / "planted.jsonl", "--control", files / "ctrl.jsonl", "--transfer",
                  files / "transfer.jsonl", "--method", "logistic", "--method", "diff_means", "--aggregation", "last",
                  "--n-boot", 100, "--model", tiny_model_dir, "--out", out, "--threads", 1)
    return out, text


def test_sweep_writes_the_run_the_probes_the_claims_and_the_report(files, swept, tiny_model_dir):  # noqa: F811
    from mechscope.safety import read_claims, train_probe
    from mechscope.safety.probe import Probe

    out, text = swept
    run = json.loads((out / "run.json").read_text())
    model = mechscope.load(str(tiny_model_dir))
    from mechscope.data.labelled_builtins import load_labelled

    ref = train_probe(model, load_labelled(str(files / "planted.jsonl")), methods=("logistic", "diff_means"),
                      aggregation="last", control=load_labelled(str(files / "ctrl.jsonl")),
                      transfer=[load_labelled(str(files / "transfer.jsonl"))], n_boot=100, progress=False)
    want = ref.to_dict()
    assert run["sweep"]["best_site"] == want["sweep"]["best_site"] and run["info"]["selection"] == "validation"
    for got, exp in zip(run["sweep"]["rows"], want["sweep"]["rows"]):
        assert (got["site"], got["method"]) == (exp["site"], exp["method"])
        assert got["auroc"] == pytest.approx(exp["auroc"]) and got["threshold"] == pytest.approx(exp["threshold"])
    assert set(run["scores"]) == {"logistic", "diff_means"} and set(run["scores"]["logistic"]["parts"]) == {"test", "validation", "control", "transfer:transfer"}
    for method in ("logistic", "diff_means"):
        p = Probe.load(out / "probes" / method, model=model)
        torch.testing.assert_close(p.direction, ref.best(method).direction, atol=1e-5, rtol=1e-4)
        site = run["sweep"]["best_site"][method]
        row = next(r for r in run["sweep"]["rows"] if (r["site"], r["method"]) == (site, method))
        assert p.site == site and p.info["threshold"] == pytest.approx(row["threshold"])
    claims = read_claims(out / "claims.json")
    assert len(claims) == 2
    html = (out / "report.html").read_text()
    assert "default-src 'none'" in html and "planted" in html
    assert "AUROC" in text and run["sweep"]["best_site"]["logistic"] in text


def test_train_eval_and_report(files, swept, tiny_model_dir, tmp_path):  # noqa: F811
    from mechscope.data.labelled_builtins import load_labelled
    from mechscope.data.labelled_render import render
    from mechscope.safety import collect_features, evaluate_probe
    from mechscope.safety.probe import Probe

    site = "blocks.1.hook_resid_post"
    invoke("probe", "train", files / "planted.jsonl", "--site", site, "--method", "diff_means", "--control",
           files / "ctrl.jsonl", "--aggregation", "last", "--n-boot", 50, "--model", tiny_model_dir, "--out",
           tmp_path / "one", "--threads", 1)
    run = json.loads((tmp_path / "one" / "run.json").read_text())
    assert run["info"]["selection"] == "test" and [r["site"] for r in run["sweep"]["rows"]] == [site]
    p = Probe.load(tmp_path / "one" / "probes" / "diff_means")
    assert p.site == site and p.info["threshold"] == pytest.approx(run["sweep"]["rows"][0]["threshold"])
    # eval: the printed and written numbers are evaluate_probe's on the whole dataset
    text = invoke("probe", "eval", tmp_path / "one" / "probes" / "diff_means", files / "transfer.jsonl", "--control",
                  files / "ctrl.jsonl", "--n-boot", 50, "--json", tmp_path / "ev.json", "--model", tiny_model_dir,
                  "--threads", 1)
    got = json.loads((tmp_path / "ev.json").read_text())
    model = mechscope.load(str(tiny_model_dir))
    ds, ctrl = load_labelled(str(files / "transfer.jsonl")), load_labelled(str(files / "ctrl.jsonl"))
    x = collect_features(model, render(model, ds), [site], aggregation="last", progress=False).vectors[site]
    c = collect_features(model, render(model, ctrl), [site], aggregation="last", progress=False).vectors[site]
    ev = evaluate_probe(p, x, ds.labels, control=c, groups=ds.groups, n_boot=50)
    assert got["auroc"] == pytest.approx(ev.to_dict()["auroc"]) and got["threshold"] == pytest.approx(ev.threshold)
    assert f"{ev.auroc.estimate:.3f}" in text and got["bootstrap"] == "clustered"


def test_monitor_calibrate_generate_drift_and_report(files, swept, tiny_model_dir, tmp_path):  # noqa: F811
    from mechscope.safety import Monitor
    from mechscope.safety.probe import Probe

    out, _ = swept
    folder = out / "probes" / "logistic"
    cal = tmp_path / "cal.json"
    invoke("monitor", "calibrate", folder, "--control", files / "ctrl.jsonl", "--fpr", 0.1, "--model", tiny_model_dir,
           "--out", cal, "--threads", 1)
    stored = json.loads(cal.read_text())
    model = mechscope.load(str(tiny_model_dir))
    mon = Monitor(Probe.load(folder, model=model), fpr=0.1)
    ref = mon.calibrate(model, str(files / "ctrl.jsonl"))
    assert stored["calibration"]["threshold"] == pytest.approx(ref.threshold)
    gens = tmp_path / "gens.jsonl"
    text = invoke("monitor", "generate", folder, "w5 w9 w30", "w40 w41", "--calibration", cal, "--raw",
                  "--max-new-tokens", 6, "--model", tiny_model_dir, "--out", gens, "--log", tmp_path / "alarms.jsonl",
                  "--threads", 1)
    rows = [json.loads(line) for line in gens.read_text().splitlines()]
    want = mon.generate(model, ["w5 w9 w30", "w40 w41"], max_new_tokens=6)
    assert [r["tokens"] for r in rows] == [g.tokens.tolist() for g in want]
    for r, g in zip(rows, want):
        assert r["scores"] == pytest.approx(g.scores.tolist(), abs=1e-6) and len(r["token_strings"]) == len(r["tokens"])
        assert r["threshold"] == pytest.approx(ref.threshold)
    assert "generations alarmed" in text
    batched = tmp_path / "batched.jsonl"
    invoke("monitor", "generate", folder, "w5 w9 w30", "w40 w41", "--calibration", cal, "--raw", "--max-new-tokens", 6,
           "--batch-size", 2, "--model", tiny_model_dir, "--out", batched, "--threads", 1)
    assert [json.loads(line)["tokens"] for line in batched.read_text().splitlines()] == [r["tokens"] for r in rows]
    drift = tmp_path / "drift.json"
    invoke("monitor", "drift", cal, "--model", tiny_model_dir, "--control", files / "ctrl.jsonl", "--out", drift,
           "--threads", 1)
    assert json.loads(drift.read_text())["threshold_shift"] == pytest.approx(0.0, abs=1e-9)
    html = tmp_path / "r.html"
    invoke("probe", "report", out, "--generations", gens, "--out", html)
    assert html.stat().st_size > 0 and "w30" in html.read_text()


def test_bad_inputs_are_one_line_exit_2(files, swept, tiny_model_dir, tmp_path):  # noqa: F811
    out, _ = swept
    folder = out / "probes" / "logistic"
    assert "unknown" in fails("probe", "sweep", "honesty_pairz", "--model", "no-such-model")  # before the model loads
    assert "--fpr" in fails("probe", "sweep", files / "planted.jsonl", "--fpr", 1.5, "--model", "no-such-model")
    assert "--method" in fails("probe", "sweep", files / "planted.jsonl", "--method", "svm", "--model", "no-such-model")
    assert "one site" in fails("probe", "train", files / "planted.jsonl", "--site", "blocks.*.hook_resid_post")
    assert "--validation-fraction" in fails("probe", "sweep", files / "planted.jsonl", "--validation-fraction", 1.0)
    one = LabelledDataset("ones", tuple(Example(text="w5 w6", label=1, group=f"g{k}") for k in range(6)))
    one.to_jsonl(tmp_path / "ones.jsonl")
    assert "both labels" in fails("probe", "sweep", tmp_path / "ones.jsonl", "--model", "no-such-model")
    assert "holds no probe" in fails("probe", "eval", tmp_path / "nothing", files / "planted.jsonl")
    assert "not both" in fails("monitor", "generate", folder, "w5", "--threshold", 1, "--calibration", tmp_path / "c.json")
    assert "no prompts" in fails("monitor", "generate", folder, "--threshold", 1)
    assert "--rule" in fails("monitor", "generate", folder, "w5", "--rule", "mean")
    assert "does not exist" in fails("monitor", "generate", folder, "w5", "--calibration", tmp_path / "c.json")
    assert "no chat template" in fails("monitor", "generate", folder, "w5", "--threshold", 1, "--model", tiny_model_dir)
    assert "holds no run.json" in fails("probe", "report", tmp_path)
    assert "not both" in fails("probe", "causal", folder, "--pairs", "deception_scenarios", "--refusal", "harmfulness")
    assert "--refusal" in fails("probe", "causal", folder, "--refusal", "harmfulnes")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"tokens": [1]}\n')
    assert "not a monitored generation" in fails("probe", "report", out, "--generations", bad, "--out", tmp_path / "r.html")


def test_monitor_on_sae_latents(files, tiny_model_dir, tmp_path):  # noqa: F811
    """A dictionary folder with --latents: the same tokens and scores as a Monitor over a LatentScorer."""
    from mechscope.dictionaries.io import save_dictionary
    from mechscope.safety import LatentScorer, Monitor
    from tests.unit.test_latent_monitor import make_dictionary

    d = make_dictionary("relu", d_in=32)  # the saved tiny Llama has d_model 32
    folder = save_dictionary(d, tmp_path / "sae")
    gens = tmp_path / "gens.jsonl"
    invoke("monitor", "generate", folder, "w5 w9 w30", "--latents", "3,7-9", "--threshold", 0.05, "--raw",
           "--max-new-tokens", 5, "--model", tiny_model_dir, "--out", gens, "--threads", 1)
    (row,) = [json.loads(line) for line in gens.read_text().splitlines()]
    model = mechscope.load(str(tiny_model_dir))
    (want,) = Monitor(LatentScorer(d, [3, 7, 8, 9]), threshold=0.05, on_alarm="flag").generate(model, "w5 w9 w30",
                                                                                               max_new_tokens=5)
    assert row["tokens"] == want.tokens.tolist() and row["scores"] == pytest.approx(want.scores.tolist(), abs=1e-6)
    assert len(row["alarms"]) == len(want.alarms)
    assert "beyond the latents" in fails("monitor", "generate", folder, "w5", "--latents", "99", "--threshold", 1)
