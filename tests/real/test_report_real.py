"""`mechscope report` end to end on the default real model (SmolLM2-135M-Instruct, fp32), small settings.

Checks the claims the report makes, read back from results.json: hooks change no logit, the model does
IOI, induction heads exist, DLA parts sum to the logit difference, attribution patching tracks
activation patching; and that the HTML is self-contained and carries every plot's data.
"""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from mechscope.cli import app

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def report(tmp_path_factory, real_model):  # real_model: skips when the default model is unavailable
    out = tmp_path_factory.mktemp("report")
    r = CliRunner().invoke(app, ["report", "--n-prompts", "20", "--patch-prompts", "2", "--out", str(out)])
    assert r.exit_code == 0, r.output
    return out, r.stdout


def test_results_numbers(report, real_model):
    out, stdout = report
    res = json.loads((out / "results.json").read_text())
    assert str(out / "report.html") in stdout.replace("\n", "") and str(out / "results.json") in stdout.replace("\n", "")

    assert res["parity"]["max_abs_delta_plain"] == 0.0
    assert res["parity"]["max_abs_delta_all_hooks"] == 0.0
    assert res["parity"]["n_hooks_cached"] == len(real_model.hook_names())

    lens = res["logit_lens"]
    assert lens["target_token"] == " Paris" and lens["top_tokens"][-1][0] == " Paris"
    assert lens["target_prob"][-1] > 0.5 and lens["target_rank"][-1] == 0

    hs = res["head_scores"]
    assert hs["top"]["induction"][0]["score"] > 0.5
    assert hs["repeat_loss"]["second_copy"] < hs["repeat_loss"]["first_copy"] - 5

    ioi = res["ioi"]
    assert ioi["n_prompts"] == 20 and len(ioi["logit_diff"]) == 20
    assert ioi["accuracy"] > 0.9
    assert ioi["mean_logit_diff"] > 2
    assert ioi["mean_corrupt_logit_diff"] < 0
    assert ioi["dla"]["max_abs_total_minus_logit_diff"] < 1e-3  # the parts sum to the whole
    assert ioi["dla"]["max_abs_logit_diff_minus_forward"] < 1e-3

    pt = res["patching"]
    n_layers, n_heads, n_pos = res["model"]["n_layers"], res["model"]["n_heads"], ioi["n_tokens"]
    act = pt["activation"]
    assert len(act["resid_pre"]["values"]) == n_layers and len(act["resid_pre"]["values"][0]) == n_pos
    assert len(act["resid_pre"]["col_labels"]) == n_pos
    assert len(act["attn_out"]["values"]) == n_layers and len(act["mlp_out"]["values"]) == n_layers
    assert len(act["heads"]["values"]) == n_layers and len(act["heads"]["values"][0]) == n_heads
    # clean and corrupted prompts differ only at S2: patching the embedding there restores the clean run,
    # and patching any position before it changes nothing (the activations are the same)
    s2 = next(i for i, label in enumerate(act["resid_pre"]["col_labels"]) if "(S2)" in label)
    assert act["resid_pre"]["values"][0][s2] == pytest.approx(1.0, abs=0.01)
    assert all(abs(v) < 0.01 for row in act["resid_pre"]["values"] for v in row[:s2])
    assert pt["correlation"]["heads"] > 0.5  # the linear estimate tracks the real intervention

    for key in ("load", "parity", "logit_lens", "head_scores", "ioi", "patching"):
        assert res["run"]["timings_s"][key] > 0
    assert {"mechscope", "torch", "transformers"} <= set(res["run"]["versions"])
    assert any(row["value"] == 3.56 for row in res["comparisons"])


def test_html_is_self_contained_with_plot_data(report):
    out, _ = report
    html = (out / "report.html").read_text(encoding="utf-8")
    assert not re.search(r"<script[^>]*\bsrc\s*=", html, flags=re.I)
    assert not re.search(r"<(link|img|iframe)[^>]*(href|src)\s*=\s*[\"']?https?:", html, flags=re.I)
    assert html.count("plotly.js v") == 1
    data = re.search(r'<script type="application/json" id="mechscope-figures">(.*?)</script>', html, flags=re.S)
    figs = json.loads(data.group(1))
    for fig in ("fig-lens", "fig-heads-induction", "fig-heads-previous_token", "fig-heads-duplicate_token",
                "fig-ioi-dist", "fig-dla-heads", "fig-patch-resid", "fig-patch-layers", "fig-patch-heads",
                "fig-attr-scatter"):
        assert fig in figs and figs[fig]["data"], fig
        assert f'id="{fig}"' in html
    assert "L18H6" in html  # the strongest induction head of SmolLM2 is named in the atlas
