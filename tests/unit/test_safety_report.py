"""The safety report (mechscope.report.safety), drawn from synthetic probe runs, monitored generations and claims.

Claims tested: roc_points gives sklearn's ROC curve (with and without intermediate points dropped, ties
included) and its trapezoid area is the AUROC; the page is self-contained (CSP, nothing fetched) and shows
hostile strings only escaped, in the HTML and in the figures' JSON; the sweep figures' interval bands hold the
rows' CI bounds in layer order and the random band the mean ± 2 std; the ROC operating point and the
histograms' threshold line sit at the row's threshold; a generation's token strip has one span per token with
the alarm tokens marked and the threshold line at its threshold; an older run without scores still renders its
sweep and says what the missing figures need; bad input raises InputError naming the fix; the file is written
atomically and only into an existing folder.
"""

from __future__ import annotations

import json
import random
import re

import pytest

from mechscope.core.errors import InputError
from mechscope.report.safety import (
    NO_SCORES,
    render_safety_html,
    safety_figures,
    write_safety_report,
)
from mechscope.report.safety_figures import operating_point, roc_area, roc_points

HOSTILE = ["</script><b>x", "<img src=x>"]
LAYERS = [0, 2, 4, 6, 8, 10]
METHODS = ("logistic", "diff_means")


# -- factories ---------------------------------------------------------------------------------------------------
def _ci(est: float, half: float = 0.05) -> dict:
    return {"estimate": est, "low": max(0.0, est - half), "high": min(1.0, est + half), "width": 2 * half, "n": 80,
            "n_boot": 200, "alpha": 0.05, "method": "percentile"}


def _part(rng: random.Random, n: int, shift: float, labelled: bool = True) -> dict:
    labels = [i % 2 for i in range(n)]
    scores = [round(rng.gauss(shift * y if labelled else 0.0, 1.0), 1) for y in labels]  # rounded: ties
    return {"scores": scores, "labels": labels if labelled else None}


def make_run(*, scores: bool = True, seed: int = 0, validation: bool = False) -> dict:
    """A ProbeRun.to_dict() over 6 layers and 2 methods (listed in scrambled site order), with one transfer
    dataset and, by default, the selected probes' scores on test, control and transfer."""
    rng = random.Random(seed)
    rows = []
    for layer in [4, 10, 0, 8, 2, 6]:  # the report sorts by layer
        for k, m in enumerate(METHODS):
            est = 0.55 + 0.04 * layer - 0.05 * k
            row = {"site": f"blocks.{layer}.hook_resid_post", "method": m, "n_pos": 40, "n_neg": 40,
                   "auroc": _ci(est), "balanced_accuracy": _ci(est - 0.1), "recall": _ci(est - 0.3, 0.1),
                   "fpr": 0.05, "threshold": 1.25 + 0.1 * k, "ba_threshold": 0.0, "control": "control set",
                   "honest_fpr": None, "random_auroc_mean": 0.5 + 0.001 * layer, "random_auroc_std": 0.03,
                   "shuffled_auroc": 0.45 + 0.01 * layer}
            if validation:
                row["validation_auroc"] = est - 0.02
            rows.append(row)
    run = {"sweep": {"rows": rows, "best_site": {m: "blocks.10.hook_resid_post" for m in METHODS}},
           "info": {"dataset": "honesty_pairs", "fingerprint": "abc123", "n_train": 80, "n_test": 80,
                    "aggregation": "mean", "fpr": 0.05, "control": "control", "transfer": ["deception_scenarios"],
                    "seconds": {"activations": 1.0, "fits": 2.0}},
           "transfer": {"deception_scenarios": [{**r, "auroc": _ci(0.4)} for r in rows]}}
    if validation:
        run["info"]["selection"] = "validation"
    if scores:
        run["scores"] = {m: {"site": "blocks.8.hook_resid_post",
                             "parts": {"test": _part(rng, 80, 2.0), "validation": _part(rng, 40, 2.0),
                                       "control": _part(rng, 60, 0.0, labelled=False),
                                       "transfer:deception_scenarios": _part(rng, 50, 0.5)}}
                         for m in METHODS}
    return run


def make_generation(i: int, *, threshold: float = 0.7) -> dict:
    """A MonitoredGeneration.to_dict() + the CLI's keys: 5 prompt tokens, 7 generated, an alarm at 9 and 10."""
    strings = ["The", " cat", *HOSTILE, " ok", "\n", " says", " hi", " &amp;", " x", " y", " z"]
    scores = [-1.0, -0.5, 0.0, 0.2, 0.1, 0.3, 0.5, 0.6, 0.9, 1.4, 1.1, 0.2]
    alarms = [{"prompt_index": i, "position": p, "token_index": p - 5, "token_id": 100 + p, "token": strings[p],
               "value": scores[p], "threshold": threshold, "rule": "ema", "scores": scores[p - 2:p + 1]} for p in (9, 10)]
    return {"prompt_index": i, "tokens": [100 + j for j in range(12)], "prompt_len": 5, "text": "".join(strings[5:]),
            "scores": scores, "values": scores[5:], "alarms": alarms, "stopped": i == 1, "flagged": False,
            "token_strings": strings, "threshold": threshold, "probe": HOSTILE[1], "rule": "ema"}


def make_claim() -> dict:
    return {"id": "honesty-L16", "behaviour": HOSTILE[0], "kind": "correlational",
            "audit": {"grade": "B", "criteria": [{"id": "held-out", "passed": True, "reason": "groups disjoint"},
                                                  {"id": "causal", "passed": False, "reason": HOSTILE[1]}]}}


@pytest.fixture(scope="module")
def page() -> str:
    return render_safety_html(runs={"honesty pairs": make_run(), "truth": make_run(seed=1, validation=True)},
                              generations=[make_generation(0), make_generation(1)], claims=[make_claim(), ["odd", 1]],
                              title="Safety of " + HOSTILE[0])


# -- ROC --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("drop", [False, True])
def test_roc_points_equal_sklearn(seed, drop):
    from sklearn.metrics import roc_auc_score, roc_curve

    d = _part(random.Random(seed), 101, 1.0)  # rounded scores: many ties
    roc = roc_points(d["scores"], d["labels"], drop_intermediate=drop)
    fpr, tpr, thr = roc_curve(d["labels"], d["scores"], drop_intermediate=drop)
    assert roc["fpr"] == pytest.approx(fpr.tolist(), abs=1e-12) and roc["tpr"] == pytest.approx(tpr.tolist(), abs=1e-12)
    assert roc["thresholds"][0] is None and roc["thresholds"][1:] == pytest.approx(thr[1:].tolist())
    assert roc_area(roc["fpr"], roc["tpr"]) == pytest.approx(roc_auc_score(d["labels"], d["scores"]), abs=1e-12)


def test_roc_area_equals_the_probe_auroc_and_the_operating_point_is_strict():
    import torch

    from mechscope.safety.metrics import auroc

    d = _part(random.Random(3), 60, 1.0)
    roc = roc_points(d["scores"], d["labels"])
    want = auroc(torch.tensor(d["scores"], dtype=torch.float64), torch.tensor(d["labels"]))
    assert roc_area(roc["fpr"], roc["tpr"]) == pytest.approx(want, abs=1e-12)
    assert operating_point([0.0, 1.0, 1.0, 2.0], [0, 0, 1, 1], 1.0) == (0.0, 0.5)  # == threshold: not flagged


def test_roc_points_reject_bad_labels():
    with pytest.raises(InputError, match="both classes"):
        roc_points([0.1, 0.2], [1, 1])
    with pytest.raises(InputError, match="one label per score"):
        roc_points([0.1, 0.2], [1])
    with pytest.raises(InputError, match="0 or 1"):
        roc_points([0.1, 0.2], [0, 2])


# -- the page ---------------------------------------------------------------------------------------------------
def _scripts(html: str) -> list[str]:
    return re.findall(r"<script[^>]*>(.*?)</script>", html, flags=re.DOTALL)


def test_the_page_is_self_contained_and_escapes_hostile_strings(page):
    scripts = _scripts(page)
    assert len(scripts) == 3  # plotly.js, the figures as JSON, the drawing code
    assert "default-src 'none'" in page and not re.search(r"<(script|link|img|iframe)[^>]*(src|href)=", page)
    assert not re.search(r"""(src|href)\s*=\s*["']?https?://""", page.replace(scripts[0], ""))
    for h in HOSTILE:
        assert h not in page.replace(scripts[0], "")
    assert "&lt;/script&gt;&lt;b&gt;x" in page and "&lt;img src=x&gt;" in page  # token strip, title, claim
    assert "each method&#39;s site chosen on the validation split" in page.split('id="run-1"')[1]
    assert "\\u003c" in scripts[1] and "<" not in scripts[1] and ">" not in scripts[1]
    figs = json.loads(scripts[1])
    assert figs == json.loads(json.dumps(safety_figures({"honesty pairs": make_run(),
                                                         "truth": make_run(seed=1, validation=True)},
                                                        [make_generation(0), make_generation(1)])))
    hover = json.dumps(figs["fig-g0"])
    assert "&lt;/script&gt;&lt;b&gt;x" in hover and "</script>" not in hover  # plotly reads HTML in hover text
    assert "<b>x" not in json.dumps(figs)


def test_a_real_probe_run_renders_with_its_scores():
    from mechscope.core.io import jsonable
    from mechscope.safety import train_probe
    from tests.conftest import make_words_model
    from tests.unit.test_train_probe import control, planted

    r = train_probe(make_words_model(), planted(24), sites="blocks.*.hook_resid_post", methods=("logistic", "diff_means"),
                    aggregation="last", control=control(), transfer=[planted(8, seed=5)], n_boot=50, n_random=10,
                    shuffled=False, progress=False)
    d = json.loads(json.dumps(jsonable(r.to_dict())))  # as read back from run.json
    figs = safety_figures({"planted": d})
    assert {"fig-r0-auroc", "fig-r0-recall", "fig-r0-roc-0", "fig-r0-roc-1", "fig-r0-hist-0", "fig-r0-hist-1"} <= set(figs)
    html = render_safety_html(runs={"planted": d})
    assert r.sweep.best_site("logistic") in html and NO_SCORES not in html


def test_every_expected_figure_has_its_element(page):
    figs = json.loads(_scripts(page)[1])
    expected = {f"fig-r{i}-{k}" for i in (0, 1) for k in ("auroc", "recall", "roc-0", "roc-1", "hist-0", "hist-1")}
    assert set(figs) == expected | {"fig-g0", "fig-g1"}
    for fid in figs:
        assert page.count(f'id="{fid}"') == 1


def _band(fig: dict, name: str) -> tuple[dict, dict]:
    """The (upper, lower) traces of the band called ``name``."""
    i = next(i for i, t in enumerate(fig["data"]) if t["name"] == name and t.get("fill") == "tonexty")
    return fig["data"][i - 1], fig["data"][i]


def test_sweep_bands_hold_the_rows_intervals_in_layer_order():
    run = make_run(validation=True)
    figs = safety_figures({"r": run})
    rows = run["sweep"]["rows"]
    for metric in ("auroc", "recall"):
        fig = figs[f"fig-r0-{metric}"]
        for m in METHODS:
            mine = sorted((r for r in rows if r["method"] == m), key=lambda r: int(r["site"].split(".")[1]))
            upper, lower = _band(fig, f"{m} 95% interval")
            assert upper["x"] == LAYERS and lower["x"] == LAYERS
            assert upper["y"] == [r[metric]["high"] for r in mine] and lower["y"] == [r[metric]["low"] for r in mine]
            line = next(t for t in fig["data"] if t["name"] == m)
            assert line["y"] == [r[metric]["estimate"] for r in mine]
            star = next(t for t in fig["data"] if t["name"].startswith(f"{m}: selected"))
            assert star["x"] == [8] and "blocks.8.hook_resid_post" in star["name"]  # the scores' site
    fig = figs["fig-r0-auroc"]
    mine = sorted((r for r in rows if r["method"] == "logistic"), key=lambda r: int(r["site"].split(".")[1]))
    upper, lower = _band(fig, "random directions, mean ± 2 std")
    assert upper["y"] == pytest.approx([r["random_auroc_mean"] + 2 * r["random_auroc_std"] for r in mine])
    assert lower["y"] == pytest.approx([r["random_auroc_mean"] - 2 * r["random_auroc_std"] for r in mine])
    shuf = next(t for t in fig["data"] if t["name"] == "logistic: shuffled labels")
    assert shuf["y"] == [r["shuffled_auroc"] for r in mine] and shuf["mode"] == "markers"
    assert next(t for t in fig["data"] if t["name"] == "logistic: validation")["y"] == [r["validation_auroc"] for r in mine]
    assert {"type": "line", "xref": "paper", "x0": 0, "x1": 1, "y0": 0.5, "y1": 0.5} .items() <= fig["layout"]["shapes"][0].items()


def test_roc_and_histograms_read_the_selected_probe_and_its_threshold():
    run = make_run()
    figs = safety_figures({"r": run})
    for k, m in enumerate(METHODS):
        t = next(r["threshold"] for r in run["sweep"]["rows"] if r["method"] == m and r["site"].startswith("blocks.8."))
        d = run["scores"][m]["parts"]["test"]
        curve = next(c for c in figs["fig-r0-roc-0"]["data"] if c["name"].startswith(f"{m} (AUROC"))
        roc = roc_points(d["scores"], d["labels"])
        assert f"AUROC {roc_area(roc['fpr'], roc['tpr']):.3f}" in curve["name"]
        point = next(c for c in figs["fig-r0-roc-0"]["data"] if c["name"].startswith(f"{m}: threshold"))
        assert (point["x"][0], point["y"][0]) == operating_point(d["scores"], d["labels"], t)
        hist = figs[f"fig-r0-hist-{k}"]
        line = hist["layout"]["shapes"][0]
        assert line["x0"] == line["x1"] == t
        names = [tr["name"].split(" (n =")[0] for tr in hist["data"]]
        assert names == ["test positives", "test negatives", "control", "deception_scenarios (transfer) positives",
                         "deception_scenarios (transfer) negatives"]
        for tr in hist["data"]:
            assert sum(tr["y"][:-1]) == pytest.approx(1.0, abs=1e-4)  # shares of the set
    assert "deception_scenarios" in figs["fig-r0-roc-1"]["layout"]["title"]["text"]


def test_token_strips_carry_every_token_and_mark_the_alarms(page):
    for i in (0, 1):
        g = make_generation(i)
        block = page.split(f'<div id="gen-{i}" class="gen">')[1].split('class="fig"')[0]
        spans = re.findall(r'<span class="tok([^"]*)" data-pos="(\d+)" style="[^"]*" title="([^"]*)">(.*?)</span>',
                           block, flags=re.DOTALL)
        assert len(spans) == len(g["tokens"]) and [int(s[1]) for s in spans] == list(range(len(g["tokens"])))
        assert [int(s[1]) for s in spans if "alarm" in s[0]] == [9, 10]
        assert [int(s[1]) for s in spans if " p" in s[0]] == list(range(g["prompt_len"]))
        assert spans[2][3] == "&lt;/script&gt;&lt;b&gt;x" and spans[3][3] == "&lt;img src=x&gt;"
        assert spans[5][3] == "\\n" and spans[8][3] == " &amp;amp;"
        assert spans[9][2] == "position 9 (generated) · score 1.4 · alarm"
    fig = safety_figures(None, [make_generation(0, threshold=0.85)])["fig-g0"]
    assert fig["layout"]["shapes"][0]["y0"] == fig["layout"]["shapes"][0]["y1"] == 0.85
    assert fig["data"][1]["x"] == list(range(5, 12))  # rule values of the generated tokens


def test_an_outlier_token_neither_flattens_the_plot_nor_whitens_the_strip():
    """SmolLM2's chat starts with a token scoring about -430 logits; the rest sit within a few logits."""
    from mechscope.report.safety_figures import check_generation, token_strip

    g = make_generation(0)
    g["scores"] = [-430.0] + g["scores"][1:]
    fig = safety_figures(None, [g])["fig-g0"]
    lo, hi = fig["layout"]["yaxis"]["range"]
    assert -2 < lo < -0.5 and 1.4 < hi < 2  # the axis spans the other scores, the rule values and the threshold
    assert "1 outlying score(s) off the axis" in fig["layout"]["title"]["text"]
    alphas = [float(t["bg"].rsplit(",", 1)[1].rstrip(")")) for t in token_strip(check_generation(g, 0))]
    assert alphas[0] == pytest.approx(0.8) and alphas[9] > 0.3  # the alarm token (1.4, threshold 0.7) is visible


def test_the_claim_table_shows_grades_and_unknown_shapes_as_json(page):
    claims = page.split('<section id="claims">')[1]
    assert "honesty-L16" in claims and "correlational" in claims and '<span class="grade">B</span>' in claims
    assert "held-out: groups disjoint" in claims and "causal: &lt;img src=x&gt;" in claims
    assert '<pre class="raw">[\n &#34;odd&#34;,\n 1\n]</pre>' in claims
    grade = {"claim_id": "truth-L8", "behaviour": "truth", "letter": "D", "summary": HOSTILE[0],
             "criteria": [{"id": "causal", "passed": False, "reason": "no intervention"}]}  # audit's Grade.to_dict()
    claims = render_safety_html(claims=[grade]).split('<section id="claims">')[1]
    assert '<td>truth-L8</td><td>truth</td>' in claims and '<span class="grade">D</span>' in claims
    assert "&lt;/script&gt;&lt;b&gt;x" in claims and "causal: no intervention" in claims
    html = render_safety_html(runs={"r": make_run()}, claims=None)
    assert 'id="claims"' not in html and 'id="generations"' not in html


def test_a_run_without_scores_renders_its_sweep_and_says_what_is_missing():
    old = make_run(scores=False)
    figs = safety_figures({"old": old})
    assert set(figs) == {"fig-r0-auroc", "fig-r0-recall"}
    html = render_safety_html(runs={"old": old})
    assert NO_SCORES.split(":")[0] in html and "run[&#39;scores&#39;]" in html
    assert "blocks.10.hook_resid_post" in html  # the best test site, selected without scores
    assert "highest test AUROC (chosen on the split it is scored on: optimistic)" in html


@pytest.mark.parametrize("bad, match", [
    ({"r": {"info": {}}}, r"no sweep rows .*ProbeRun.to_dict\(\)"),
    ({"r": {"sweep": {"rows": []}}}, "no sweep rows"),
    ({"r": {"sweep": {"rows": [{"site": "blocks.0.hook_resid_post"}]}}}, "lacks site, method or auroc"),
    ({"r": "not a run"}, "no sweep rows"),
])
def test_bad_runs_raise_input_errors_naming_the_fix(bad, match):
    with pytest.raises(InputError, match=match):
        render_safety_html(runs=bad)


def test_bad_generations_raise_input_errors_naming_the_fix():
    g = make_generation(0)
    with pytest.raises(InputError, match="12 scores and 11 token strings for 12 tokens.*token_strings"):
        safety_figures(None, [{**g, "token_strings": g["token_strings"][:-1]}])
    no_thr = {k: v for k, v in g.items() if k != "threshold"}
    assert safety_figures(None, [no_thr])["fig-g0"]["layout"]["shapes"][0]["y0"] == 0.7  # the alarms' threshold
    with pytest.raises(InputError, match="no threshold"):
        safety_figures(None, [{**no_thr, "alarms": []}])
    with pytest.raises(InputError, match="nothing to report"):
        render_safety_html()


def test_scores_that_do_not_fit_their_labels_name_the_run_and_part():
    run = make_run()
    run["scores"]["logistic"]["parts"]["test"]["labels"].pop()
    with pytest.raises(InputError, match=r"run 'r', scores of logistic on test: 80 scores but 79 labels"):
        safety_figures({"r": run})


def test_write_is_atomic_and_refuses_a_missing_folder(tmp_path):
    with pytest.raises(InputError, match="does not exist; create it first"):
        write_safety_report(tmp_path / "nope" / "safety.html", runs={"r": make_run()})
    with pytest.raises(InputError):  # a render error leaves no file behind
        write_safety_report(tmp_path / "safety.html", runs={"r": {}})
    assert list(tmp_path.iterdir()) == []
    path = write_safety_report(tmp_path / "safety.html", runs={"r": make_run()}, generations=[make_generation(0)])
    assert path.read_text(encoding="utf-8").startswith("<!DOCTYPE html>") and list(tmp_path.iterdir()) == [path]
