"""`mechscope sae train|eval` end to end on a tiny saved model and a local text corpus, and the report's
sparse-dictionary section (rendered on stand-in results, checked for its figures and escaping)."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from mechscope.cli import app
from tests.unit.test_cli import make_results, tiny_model_dir  # noqa: F401 (fixture)

runner = CliRunner()


@pytest.fixture(scope="module")
def corpus_files(tmp_path_factory):
    """A JSONL corpus of word-level documents (the tiny tokenizer's words w0..w123), 200 documents."""
    import random

    rng = random.Random(0)
    folder = tmp_path_factory.mktemp("corpus")
    path = folder / "docs.jsonl"
    with open(path, "w") as f:
        for _ in range(200):
            f.write(json.dumps({"text": " ".join(f"w{rng.randrange(124)}" for _ in range(rng.randrange(20, 80)))}) + "\n")
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir, corpus_files, monkeypatch_module):  # noqa: F811
    out = tmp_path_factory.mktemp("run")
    r = runner.invoke(app, ["sae", "train", "--model", str(tiny_model_dir), "--dtype", "float32", "--hook",
                            "blocks.1.hook_resid_post", "--width", "64", "--k", "4", "--k", "8", "--tokens", "4096",
                            "--batch-tokens", "256", "--corpus", str(corpus_files), "--context-len", "16",
                            "--compute-dtype", "float32", "--eval-tokens", "500", "--out", str(out),
                            "--checkpoint-every", "4", "--threads", "1"])
    assert r.exit_code == 0, r.output
    return out, r.output


@pytest.fixture(scope="module")
def monkeypatch_module(tmp_path_factory):
    """A private mechscope cache for this module (harvested activations, packed tokens)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("MECHSCOPE_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield mp
    mp.undo()


def test_sae_train_writes_dictionaries_metrics_and_eval(trained):
    out, output = trained
    names = sorted(p.name for p in out.iterdir() if (p / "cfg.json").exists())
    assert names == ["topk_L1_resid_post_w64_k4", "topk_L1_resid_post_w64_k8"]  # --k 4 --k 8 from one pass
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["name"] for r in rows} == set(names) and rows[-1]["step"] == 16
    for name in names:
        ev = json.loads((out / name / "eval.json").read_text())
        k = int(name.rsplit("k", 1)[1])
        assert ev["l0"] <= k + 1e-6 and 0 <= ev["dead_fraction"] <= 1 and ev["n_tokens"] >= 500
        assert ev["explained_variance"] == pytest.approx(1 - ev["fvu"])
        cfg = json.loads((out / name / "cfg.json").read_text())
        assert cfg["metadata"]["training_tokens"] == 4096 and cfg["d_in"] == 32
    assert "ce_loss_recovered" in output and (out / "training_curves.html").exists()
    data = json.loads((out / "data.json").read_text())
    assert data["unique_tokens"] >= 4096  # enough held-in contexts were harvested for one epoch


def test_sae_train_resume_and_refusal(trained, tiny_model_dir, corpus_files):  # noqa: F811
    out, _ = trained
    args = ["sae", "train", "--model", str(tiny_model_dir), "--dtype", "float32", "--hook", "blocks.1.hook_resid_post",
            "--width", "64", "--k", "4", "--k", "8", "--tokens", "4096", "--batch-tokens", "256", "--corpus",
            str(corpus_files), "--context-len", "16", "--compute-dtype", "float32", "--eval-tokens", "0", "--out",
            str(out), "--checkpoint-every", "4", "--threads", "1"]
    r = runner.invoke(app, args)
    assert r.exit_code == 2 and "--resume" in r.output  # an existing run is never overwritten
    r = runner.invoke(app, args + ["--resume"])  # resumes at the final checkpoint: nothing left to train
    assert r.exit_code == 0, r.output


def test_sae_eval_and_errors(trained, tiny_model_dir, corpus_files):  # noqa: F811
    out, _ = trained
    folder = out / "topk_L1_resid_post_w64_k4"
    args = ["sae", "eval", str(folder), "--model", str(tiny_model_dir), "--dtype", "float32", "--corpus",
            str(corpus_files), "--context-len", "16", "--tokens", "500", "--threads", "1"]
    evals = []
    for _ in range(2):
        r = runner.invoke(app, args)
        assert r.exit_code == 0, r.output
        evals.append(json.loads((folder / "eval.json").read_text()))
    assert evals[0] == evals[1]  # the same held-out text gives the same numbers
    r = runner.invoke(app, ["sae", "eval", str(out), "--model", str(tiny_model_dir)])
    assert r.exit_code == 2 and "holds no dictionary" in r.output
    r = runner.invoke(app, ["sae", "train", "--model", str(tiny_model_dir), "--hook", "blocks.9.hook_resid_post"])
    assert r.exit_code == 2 and "layer 9 does not exist" in r.output


def test_report_sae_section_renders_curves_density_and_escapes(trained, tiny_model_dir):  # noqa: F811
    import mechscope
    from mechscope.report import render_html
    from mechscope.report.sae import sae_section

    out, _ = trained
    folders = sorted(p for p in out.iterdir() if (p / "cfg.json").exists())
    (folders[1] / "eval.json").unlink(missing_ok=True)  # one with eval.json, one evaluated by the report
    with pytest.raises(mechscope.InputError, match="sae eval"):
        sae_section(folders)
    section = sae_section(folders, mechscope.load(str(tiny_model_dir)), eval_tokens=300, progress=False)
    e = section["dictionaries"][0]
    assert e["curves"]["fvu"] and len(e["density_histogram"]) == len(e["histogram_edges"]) - 1
    assert sum(e["density_histogram"]) == round(e["d_sae"] * (1 - e["eval"]["dead_fraction"]))
    results = make_results()
    e["name"] = "<script>alert(1)</script>"
    results["sae"] = section
    html = render_html(results)
    figs = json.loads(re.findall(r"<script[^>]*>(.*?)</script>", html, flags=re.S)[1])
    assert {"fig-sae-curves-0", "fig-sae-density-0", "fig-sae-curves-1"} <= set(figs)
    assert "<script>alert(1)" not in html and "Sparse dictionaries" in html


def test_sae_train_streaming_and_memory_budget(tmp_path, tiny_model_dir, corpus_files, monkeypatch_module):  # noqa: F811
    base = ["sae", "train", "--model", str(tiny_model_dir), "--dtype", "float32", "--hook", "blocks.0.hook_mlp_out",
            "--width", "32", "--k", "4", "--tokens", "1024", "--batch-tokens", "128", "--corpus", str(corpus_files),
            "--context-len", "16", "--compute-dtype", "float32", "--eval-tokens", "0", "--threads", "1"]
    r = runner.invoke(app, base + ["--stream", "--out", str(tmp_path / "s")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "s" / "data.json").read_text())["activations"] == "streamed"
    assert (tmp_path / "s" / "topk_L0_mlp_out_w32_k4" / "cfg.json").exists()
    r = runner.invoke(app, base + ["--out", str(tmp_path / "b"), "--memory-budget-gib", "0.00001"])
    assert r.exit_code == 2 and "MiB" in r.output and not (tmp_path / "b" / "metrics.jsonl").exists()
