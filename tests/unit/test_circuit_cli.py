"""``mechscope circuit ...`` on a tiny random Llama and a JSONL task of word tokens (no download).

Claims tested: discover scores on the train split only (its saved scores equal ``attribute`` on the train
prompts) and writes the circuit, every edge's per-prompt scores (safetensors, no pickle), the MIB graph and a
run record whose command reruns it to the same circuit; evaluate measures the held-out prompts discover
recorded (the same prompts, by hash) and its numbers equal the library's on them; a wide interval shows as a
``note:`` line; render re-draws the page byte for byte from evaluation.json; path-patch prints the library's
effect with its interval; --no-check turns a task the model fails into a note. The bad inputs of these
commands are in test_cli_errors.py's table.
"""

from __future__ import annotations

import json
import random
import shlex
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import mechscope
from mechscope.cli import app
from tests.unit.test_cli import tiny_model_dir  # noqa: F401 (fixture)

runner = CliRunner()
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # wide intervals of the library's own recomputations


def write_tasks(root: Path, model_dir: str, n: int = 16) -> Path:
    """Task files of word tokens ("w3 w7 w9 w3 w7" -> " w9", the corrupted prompt's third word swapped):
    ``solved.jsonl`` (each answer is the one of the two words the random model prefers, so it solves the task),
    ``failed.jsonl`` (answer and wrong swapped: it solves none) and ``unequal.jsonl`` (a corrupted prompt one
    token longer than its clean one)."""
    model = mechscope.load(model_dir)
    rng = random.Random(0)
    solved, failed = [], []
    for _ in range(n):
        a, b, c, x = rng.sample(range(5, 100), 4)
        clean, corrupt = f"w{a} w{b} w{c} w{a} w{b}", f"w{a} w{b} w{x} w{a} w{b}"
        with torch.no_grad():
            logits = model.run(model.to_tokens(clean)).logits[0, -1]
        ids = {w: model.to_tokens(f" w{w}", prepend_bos=False)[0, 0] for w in (c, x)}
        good, bad = (c, x) if logits[ids[c]] > logits[ids[x]] else (x, c)
        solved.append({"clean": clean, "corrupt": corrupt, "answer": f" w{good}", "wrong": f" w{bad}"})
        failed.append({"clean": clean, "corrupt": corrupt, "answer": f" w{bad}", "wrong": f" w{good}"})
    unequal = [dict(solved[0]), {**solved[1], "corrupt": solved[1]["corrupt"] + " w5"}]
    for name, rows in (("solved", solved), ("failed", failed), ("unequal", unequal)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def invoke(*args) -> str:
    r = runner.invoke(app, [str(a) for a in args], terminal_width=400)
    assert r.exit_code == 0, (r.output, r.exception)
    return r.stdout


@pytest.fixture(scope="module")
def run(tiny_model_dir, tmp_path_factory):  # noqa: F811
    """A discover folder (EAP, top 30 edges, pruned) and an evaluate folder (curves and robustness)."""
    root = write_tasks(tmp_path_factory.mktemp("circuit"), str(tiny_model_dir))
    m = ["--model", tiny_model_dir, "--threads", "1"]
    disc = invoke("circuit", "discover", "--task", root / "solved.jsonl", "--method", "eap", "--edges", 30, "--out",
                  root / "run", *m)
    ev = invoke("circuit", "evaluate", root / "run", "--curve", "--robustness", "--n-boot", 200, "--out", root / "ev",
                "--threads", "1")
    return {"root": root, "model": str(tiny_model_dir), "discover_out": disc, "evaluate_out": ev}


def _model_task_graph(run):
    from mechscope.circuits import Graph
    from mechscope.data.tasks import load_task

    model = mechscope.load(run["model"])
    task = load_task(str(run["root"] / "solved.jsonl"), model)
    return model, task, Graph.from_model(model)


def test_discover_scores_the_train_split_and_writes_every_file(run):
    from mechscope.circuits import Circuit, attribute
    from mechscope.circuits.runs import load_scores, prompts_hash

    folder = run["root"] / "run"
    assert sorted(p.name for p in folder.iterdir()) == ["circuit.json", "discover.json", "mib.json",
                                                        "scores.safetensors"]
    assert b"pickle" not in (folder / "scores.safetensors").read_bytes()[:2000]
    model, task, graph = _model_task_graph(run)
    rec = json.loads((folder / "discover.json").read_text())
    train, test = task.split(0.5, 0)
    assert rec["split"] == {"test_fraction": 0.5, "seed": 0, "n_train": len(train), "n_test": len(test),
                            "by_group": False, "train_hash": prompts_hash(train), "test_hash": prompts_hash(test)}
    assert rec["method"] == "eap" and rec["check"]["accuracy"] == 1.0 and set(rec["timings_s"]) >= {"load", "discover"}
    saved = load_scores(folder / "scores.safetensors", graph)
    want = attribute(model, train, graph=graph, method="eap", progress=False)
    assert saved.per_prompt.shape == (len(train), graph.n_edges)
    torch.testing.assert_close(saved.per_prompt, want.per_prompt)
    circuit = Circuit.load(folder / "circuit.json", graph)
    expected = Circuit.from_scores(want, top_n=30, prune=True)
    assert torch.equal(circuit.edges, expected.edges) and circuit.selection == expected.selection
    torch.testing.assert_close(circuit.scores, expected.scores)
    assert rec["n_edges"] == circuit.n_edges <= 30
    assert f"pruning kept {circuit.n_edges} of the 30" in run["discover_out"]
    mib = json.loads((folder / "mib.json").read_text())
    assert sum(e["in_graph"] for e in mib["edges"].values()) >= circuit.n_edges  # K/V edges copied per query head


def test_the_recorded_command_reruns_to_the_same_circuit(run, tmp_path):
    folder = run["root"] / "run"
    args = shlex.split(json.loads((folder / "discover.json").read_text())["command"])
    assert args[:3] == ["mechscope", "circuit", "discover"]
    args[args.index("--out") + 1] = str(tmp_path / "again")
    invoke(*args[1:])
    for name in ("circuit.json", "mib.json"):
        a, b = (json.loads((p / name).read_text()) for p in (folder, tmp_path / "again"))
        a.get("meta", {}).pop("date", None), b.get("meta", {}).pop("date", None)
        assert a == b, name


def test_evaluate_measures_the_held_out_prompts_with_the_librarys_numbers(run):
    from mechscope.circuits import Circuit, evaluate_circuit, faithfulness_curve, robustness_table
    from mechscope.circuits.runs import load_scores, prompts_hash

    ev = json.loads((run["root"] / "ev" / "evaluation.json").read_text())
    model, task, graph = _model_task_graph(run)
    _, test = task.split(0.5, 0)
    assert ev["task"]["split"] == "held-out" and ev["task"]["n_prompts"] == len(test)
    assert ev["task"]["test_hash"] == prompts_hash(test)
    circuit = Circuit.load(run["root"] / "run" / "circuit.json", graph)
    want = evaluate_circuit(model, test, circuit, n_boot=200)
    got = ev["faithfulness"]
    assert got["faithfulness"]["estimate"] == pytest.approx(want.faithfulness.estimate, rel=1e-5)
    assert got["faithfulness"]["low"] == pytest.approx(want.faithfulness.low, rel=1e-5)
    assert got["values"]["circuit"] == pytest.approx(want.values["circuit"].tolist(), rel=1e-5)
    scores = load_scores(run["root"] / "run" / "scores.safetensors", graph)
    for kind in ("cpr", "cmd"):
        c = faithfulness_curve(model, test, scores, kind=kind, n_boot=200)
        assert ev["curves"][kind]["area"]["estimate"] == pytest.approx(c.area.estimate, rel=1e-5, abs=1e-9)
    rows = robustness_table(model, test, circuit, n_boot=200).rows
    assert [(r["ablation"], r["level"]) for r in ev["robustness"]] == [(r.ablation, r.level) for r in rows]
    assert len(ev["circuit"]["edges"]) == circuit.n_edges and ev["roles"] is None
    out = run["evaluate_out"]
    assert "faithfulness f(C)" in out and "CPR (higher is better)" in out and "robustness" in out
    assert "note: normalised faithfulness (corrupted ablation, edge level) is uncertain" in out  # 8 prompts: wide


def test_render_redraws_the_page_byte_for_byte(run, tmp_path):
    folder = run["root"] / "ev"
    invoke("circuit", "render", folder / "evaluation.json", "--out", tmp_path)
    assert (tmp_path / "circuit.html").read_bytes() == (folder / "circuit.html").read_bytes()


def test_evaluate_on_another_task_uses_all_its_prompts(run, tmp_path):
    invoke("circuit", "evaluate", run["root"] / "run", "--task", run["root"] / "failed.jsonl", "--no-check",
           "--n-boot", 50, "--out", tmp_path)
    ev = json.loads((tmp_path / "evaluation.json").read_text())
    assert ev["task"]["split"] == "whole task" and ev["task"]["n_prompts"] == 16
    assert any("--no-check" in n for n in ev["notes"])


def test_no_check_goes_on_with_a_note(run, tmp_path):
    out = invoke("circuit", "discover", "--task", run["root"] / "failed.jsonl", "--method", "eap", "--edges", 10,
                 "--no-check", "--out", tmp_path, "--model", run["model"], "--threads", "1")
    assert "note: --no-check: going on although 0 of 16 clean prompts prefer the answer" in out
    assert json.loads((tmp_path / "discover.json").read_text())["check"]["required"] is False


@pytest.mark.parametrize("extra", [["--greedy", "--edges", "12"], ["--threshold", "0.001", "--no-prune"],
                                   ["--method", "acdc", "--level", "node", "--tau", "0.0"]])
def test_other_selections_and_acdc(run, tmp_path, extra):
    from mechscope.circuits import Circuit

    args = ["--method", "eap", *extra] if "acdc" not in extra else extra
    invoke("circuit", "discover", "--task", run["root"] / "solved.jsonl", *args, "--out", tmp_path, "--model",
           run["model"], "--threads", "1")
    _, _, graph = _model_task_graph(run)
    c = Circuit.load(tmp_path / "circuit.json", graph)
    sel = c.selection
    if "--greedy" in extra:
        assert sel["method"] == "greedy" and sel["pruned"] and c.n_edges <= 12
    elif "--threshold" in extra:
        assert sel["method"] == "threshold" and "pruned" not in sel
        assert bool((c.scores[c.edges].abs() >= 0.001).all()) and bool((c.scores[~c.edges].abs() < 0.001).all())
    else:  # ACDC at tau 0 keeps every node whose removal changes KL at all; its trace is saved
        from safetensors.torch import load_file

        assert sel["method"] == "acdc" and sel["level"] == "node"
        t = load_file(tmp_path / "scores.safetensors")
        assert t["acdc_candidate"].numel() == graph.n_sources and torch.equal(t["kept"], c.edges)
        invoke("circuit", "evaluate", tmp_path, "--n-boot", 50, "--threads", "1")  # no --curve: ACDC has no scores
        assert json.loads((tmp_path / "evaluation.json").read_text())["curves"] == {}


def test_path_patch_prints_the_librarys_effect(run, tmp_path):
    from mechscope.circuits import path_patching, path_patching_sweep

    model, task, graph = _model_task_graph(run)
    out = invoke("circuit", "path-patch", "--task", run["root"] / "solved.jsonl", "--senders", "a0.h1,m0",
                 "--receivers", "a1.h0<q>,logits", "--positions", "end", "--n-boot", 200, "--out", tmp_path / "p.json",
                 "--model", run["model"], "--threads", "1")
    want = path_patching(model, task, ["a0.h1", "m0"], ["a1.h0<q>", "logits"], positions=4, n_boot=200)
    got = json.loads((tmp_path / "p.json").read_text())
    assert got["effect"] == pytest.approx(want.effect, rel=1e-5, abs=1e-9)
    assert got["ci"]["low"] == pytest.approx(want.ci.low, rel=1e-5, abs=1e-9) and f"{want.effect:+.4f}" in out
    out = invoke("circuit", "path-patch", "--task", run["root"] / "solved.jsonl", "--sweep", "--receivers", "logits",
                 "--top", 3, "--n-boot", 50, "--out", tmp_path / "s.json", "--model", run["model"], "--threads", "1")
    sweep = path_patching_sweep(model, task, ["logits"], n_boot=50, progress=False)
    got = json.loads((tmp_path / "s.json").read_text())
    assert [t["sender"] for t in got["top"]] == [s for s, _ in sweep.top(3)]
    assert "layer x head" in out and len(got["head_map"]) == 2
