"""The model-diff report (mechscope.report.diff), drawn from a real DiffResult of a tiny base model and a copy
perturbed in one layer.

Claims tested: the page is self-contained (CSP, three scripts, nothing fetched) and shows hostile token strings
only escaped, in the HTML and in the figures' JSON; the summary names the planted layer as the top layer by
weight change, and the weight heatmap is non-zero only in that layer's planted kind; the activation and logit-lens
figures carry the result's per-layer values; the page rendered from the saved diff.json equals the page rendered
from the object; a tiny patching gap brings the warning and a real one does not; the latents section appears only
with a "latents" key, escaped; bad input raises InputError naming the fix; the CLI writes diff.html (and not
with --no-html).
"""

from __future__ import annotations

import copy
import json
import re

import pytest

from mechscope.core.errors import InputError
from mechscope.diff import diff_models, logprob_metric
from mechscope.report.diff import (
    TINY_GAP,
    diff_figures,
    render_diff_html,
    render_diff_report,
)
from tests.unit.test_diff import N_LAYERS, PROMPTS, TEXTS, V1, _model

HOSTILE = "<script>alert(1)</script>"


@pytest.fixture(scope="module")
def result():
    base, tuned = _model(), _model({V1: 0.05})
    return diff_models(base, tuned, TEXTS, prompts=PROMPTS, metric=logprob_metric(5), n_boot=50, top_n=5,
                       progress=False)


@pytest.fixture(scope="module")
def hostile(result) -> dict:
    """The result's dict with a hostile string as a context, a next token, a prediction and a lens token."""
    d = result.to_dict()
    top = d["kl"]["top"][0]
    top["context"], top["next"] = HOSTILE, HOSTILE
    top["tuned_top"][0]["token"] = HOSTILE
    d["logit_lens"]["top_increased"][0]["token"] = HOSTILE
    return d


def _scripts(html: str) -> list[str]:
    return re.findall(r"<script[^>]*>(.*?)</script>", html, flags=re.DOTALL)


def _section(html: str, sid: str) -> str:
    return html.split(f'<section id="{sid}">', 1)[1].split("</section>", 1)[0]


def test_page_is_self_contained_and_escapes_hostile_tokens(hostile):
    page = render_diff_html(hostile)
    scripts = _scripts(page)
    assert len(scripts) == 3  # plotly.js, the figures as JSON, the drawing code
    assert "default-src 'none'" in page and not re.search(r"<(script|link|img|iframe)[^>]*(src|href)=", page)
    rest = page.replace(scripts[0], "")
    assert not re.search(r"""(src|href)\s*=\s*["']?https?://""", rest)
    assert HOSTILE not in rest and "<script>alert" not in rest
    tokens = _section(page, "tokens")
    assert tokens.count("&lt;script&gt;alert(1)&lt;/script&gt;") == 3  # context, next, tuned prediction
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in _section(page, "lens")
    assert "<" not in scripts[1] and ">" not in scripts[1]
    assert json.loads(scripts[1]) == json.loads(json.dumps(diff_figures(hostile)))


def test_summary_and_weight_figures_point_at_the_planted_layer(result):
    page = render_diff_html(result)
    summary = _section(page, "summary")
    card = re.search(r'<div class="card" data-layer="(\d+)"><div class="k">top layer by weight change</div>'
                     r'<div class="v">([^<]*)</div>', summary)
    assert card and card.groups() == ("1", "layer 1")
    assert "nats/token" in summary and "95% CI [" in summary
    assert f'<div class="v small">{result.tuned}</div><div class="s">compared with the base {result.base}' in summary
    figs = diff_figures(result)
    heat = figs["fig-w-heat"]["data"][0]
    kinds = figs["fig-w-heat"]["layout"]["xaxis"]["ticktext"]
    nonzero = [(L, kinds[k]) for L, row in enumerate(heat["z"]) for k, v in enumerate(row) if v]
    assert nonzero == [(1, "attn_v")]
    bars = figs["fig-w-bars"]["data"][0]["y"]
    assert bars[0] == 0 and bars[2] == 0 and bars[1] == pytest.approx(result.weights.by_layer[1]["relative"],
                                                                       rel=1e-5)
    weights = _section(page, "weights")
    assert V1 in weights and "1 of " in weights
    assert "Changed layers (1 of 3)" in weights and re.findall(r"<tr><td>(layer \d+)</td>", weights) == ["layer 1"]


def test_activation_lens_and_patching_figures_carry_the_results_values(result):
    figs = diff_figures(result)
    a = result.activations
    for metric in ("norm_ratio", "cosine", "rel_diff"):
        lines = {t["name"]: t["y"] for t in figs[f"fig-a0-{metric}"]["data"]}
        assert len(lines) == 2
        for w, name in (("all", "all positions but 0"), ("first_k", "first 5 positions (1..5)")):
            assert lines[name] == pytest.approx(a.per_layer(metric, w).tolist(), rel=1e-5)
    z = figs["fig-h0-all"]["data"][0]["z"]
    assert len(z) == N_LAYERS and all(v == 0 for v in z[0]) and all(v > 0 for v in z[1])
    assert figs["fig-lens"]["data"][0]["y"] == pytest.approx(result.lens.kl.tolist(), rel=1e-5)
    lines = {t["name"]: t["y"] for t in figs["fig-p-layers"]["data"]}
    assert set(lines) == set(result.patching.patched)
    for k, y in lines.items():
        assert y == pytest.approx(result.patching.recovered(k).tolist(), rel=1e-4, abs=1e-6)


def test_saved_json_renders_the_same_page(result, tmp_path):
    path = result.save(tmp_path)
    from_obj = render_diff_report(result, tmp_path / "a.html")
    from_json = render_diff_report(json.loads(path.read_text()), tmp_path / "b.html")
    from_path = render_diff_report(path, tmp_path / "c.html", title="custom <title>")
    assert from_obj.read_text() == from_json.read_text()
    assert "Model diff: tuned vs base" in from_obj.read_text()
    assert "<h1>custom &lt;title&gt;</h1>" in from_path.read_text()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left


def test_patching_warns_only_when_the_gap_is_tiny(result):
    d = result.to_dict()
    assert abs(d["patching"]["gap"]) >= TINY_GAP
    assert 'class="warn"' not in render_diff_html(d)
    tiny = copy.deepcopy(d)
    tiny["patching"]["base_value"] = tiny["patching"]["tuned_value"] + 1e-5
    tiny["patching"]["gap"] = 1e-5
    section = _section(render_diff_html(tiny), "patching")
    assert 'class="warn"' in section and "meaningless" in section
    none = copy.deepcopy(d)
    none["patching"] = None
    page = render_diff_html(none)
    assert 'id="patching"' not in page and "fig-p-layers" not in page


def test_latents_section_only_with_latents(result):
    d = result.to_dict()
    assert 'id="latents"' not in render_diff_html(d)
    d["latents"] = [{"id": 7, "relative_norm": 0.97, "cosine": 0.12, "nu_eps": 0.05, "nu_r": 0.3,
                     "top_contexts": ["a «b» c", HOSTILE]},
                    {"latent": 9, "relative_norm": 0.93, "cosine": -0.2, "contexts": [{"text": "x «y»"}]}]
    section = _section(render_diff_html(d), "latents")
    assert "0.97" in section and "ν^ε" in section and "a «b» c" in section and "x «y»" in section
    assert "<td>9</td>" in section and "&lt;script&gt;alert(1)&lt;/script&gt;" in section and HOSTILE not in section
    d["latents"], d["dictionary"] = [], {"kind": "crosscoder", "site": "blocks.1.hook_resid_post", "n_rows": 9,
                                         "stats": {"decoder_cosine_median": 0.2, "relative_norm_min": 0.46,
                                                   "relative_norm_max": 0.54}}
    section = _section(render_diff_html(d), "latents")
    assert "crosscoder at blocks.1.hook_resid_post" in section and "r ranges from 0.46 to 0.54" in section
    assert "still near their random initialisation" in section and "No model-specific latent" in section
    d["dictionary"]["stats"]["decoder_cosine_median"] = 0.9
    assert "random initialisation" not in _section(render_diff_html(d), "latents")
    d["latents"] = [1, 2]
    with pytest.raises(InputError, match="list of dicts"):
        render_diff_html(d)


def test_bad_input_names_the_fix(result, tmp_path):
    with pytest.raises(InputError, match="lacks activations, kl"):
        render_diff_html({"weights": {}})
    with pytest.raises(InputError, match="mechscope diff"):
        render_diff_html(tmp_path / "missing.json")
    with pytest.raises(InputError, match="does not exist"):
        render_diff_report(result, tmp_path / "no" / "diff.html")
    assert not (tmp_path / "no").exists()


def test_cli_writes_diff_html(tmp_path):
    from typer.testing import CliRunner

    from mechscope.cli import app
    from tests.unit.test_diff import saved_pair

    b, t = saved_pair(tmp_path)
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(TEXTS) + "\n")
    args = ["diff", str(b), str(t), "--texts", str(texts), "--split-lines", "--threads", "1", "--n-boot", "20"]
    r = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "out")], terminal_width=200)
    assert r.exit_code == 0, r.output
    page = (tmp_path / "out" / "diff.html").read_text()
    assert 'data-layer="1"><div class="k">top layer by weight change' in page
    assert page == render_diff_html(tmp_path / "out" / "diff.json")
    r = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "plain"), "--no-html"], terminal_width=200)
    assert r.exit_code == 0, r.output
    assert (tmp_path / "plain" / "diff.json").is_file() and not (tmp_path / "plain" / "diff.html").exists()
