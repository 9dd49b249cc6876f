"""``mechscope circuit discover`` then ``evaluate`` on the default real model (SmolLM2-135M-Instruct, fp32): IOI,
EAP on the 16 train prompts of 32, the top 200 edges pruned, faithfulness on the 16 held-out ones.

Claims tested: the model solves the task (the check passes), the circuit recovers a real share of the
behaviour on prompts it was not scored on (0 < f < 1.5, its interval around the estimate), the page is
written, and the whole run stays short (about 60-100 s on the 2-core CPU, most of it EAP and the four
evaluation forwards; without --curve, whose CMD sizes cost minutes here). Run with ``-s`` for the numbers.
"""

from __future__ import annotations

import json
import time

import pytest
from typer.testing import CliRunner

from mechscope.cli import app

pytestmark = pytest.mark.real


def test_discover_then_evaluate_ioi(tmp_path):
    runner = CliRunner()
    start = time.perf_counter()
    r = runner.invoke(app, ["circuit", "discover", "--task", "ioi", "--n", "32", "--method", "eap", "--edges", "200",
                            "--out", str(tmp_path)], terminal_width=200)
    assert r.exit_code == 0, (r.output, r.exception)
    r = runner.invoke(app, ["circuit", "evaluate", str(tmp_path)], terminal_width=200)
    assert r.exit_code == 0, (r.output, r.exception)
    seconds = time.perf_counter() - start
    print(r.stdout, f"\n{seconds:.0f} s")
    rec = json.loads((tmp_path / "discover.json").read_text())
    ev = json.loads((tmp_path / "evaluation.json").read_text())
    assert rec["check"]["accuracy"] >= 0.9 and rec["split"]["n_train"] + rec["split"]["n_test"] == 32
    assert ev["task"]["split"] == "held-out" and ev["task"]["test_hash"] == rec["split"]["test_hash"]
    f = ev["faithfulness"]["faithfulness"]
    assert 0 < f["estimate"] < 1.5 and f["low"] <= f["estimate"] <= f["high"]
    assert 0 < ev["circuit"]["n_edges"] <= 200 and (tmp_path / "circuit.html").stat().st_size > 1_000_000
