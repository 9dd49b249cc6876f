"""CLI and report plumbing on tiny inputs: exit codes, hook listing, HTML escaping, atomic JSON.

The report's HTML is tested on stand-in results (small hand-made arrays with hostile token strings),
so these tests need no real model; the real end-to-end run lives in tests/real/test_report_real.py.
"""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from mechscope.cli import app

runner = CliRunner()
NASTY = ['</script><script>alert(1)</script>', '<b>&amp;', '"quote\'', "\u2028line", " Paris", "\n"]


# -- fixtures --------------------------------------------------------------------------------------
def make_results(n_layers: int = 3, n_heads: int = 2, n_pos: int = 6, n_prompts: int = 4) -> dict:
    """Stand-in results.json with every section the template reads, and hostile strings everywhere."""
    grid = [[round(0.1 * (layer + h), 3) for h in range(n_heads)] for layer in range(n_layers)]
    tok = NASTY * 3
    heads = [{"head": f"L{layer}H{h}", "layer": layer, "head_index": h, "score": 0.5} for layer, h in [(0, 1), (1, 0)]]
    patch = lambda values, rows, cols: {"values": values, "row_labels": rows, "col_labels": cols, "method": "x",
                                        "metric": "logit_diff"}
    layers = [f"L{layer}" for layer in range(n_layers)]
    return {
        "schema": "mechscope.report/1",
        "model": {"name": "tiny<&>", "family": "llama", "n_layers": n_layers, "d_model": 8, "n_heads": n_heads,
                  "n_kv_heads": 1, "d_head": 4, "d_mlp": 16, "d_vocab": 10, "n_ctx": 64, "dtype": "float32",
                  "attn_implementation": "sdpa", "n_params": 1000},
        "run": {"date": "2025-01-01T00:00:00+00:00", "versions": {"mechscope": "0", "torch": "t", "transformers": "x"},
                "settings": {"n_prompts": n_prompts}, "torch_threads": 2, "timings_s": {"load": 1.0}, "total_s": 2.0},
        "parity": {"prompts": NASTY[:2], "n_hooks_cached": 7, "max_abs_delta_plain": 0.0, "max_abs_delta_all_hooks": 0.0,
                   "per_prompt": [{"prompt": p, "n_tokens": 3, "plain": 0.0, "all_hooks": 0.0} for p in NASTY[:2]]},
        "logit_lens": {"prompt": NASTY[0], "str_tokens": NASTY, "target": NASTY[0], "target_token": NASTY[0],
                       "labels": layers, "top_tokens": [tok[:2] for _ in range(n_layers)],
                       "top_probs": [[0.5, 0.2] for _ in range(n_layers)], "target_prob": [0.1] * n_layers,
                       "target_rank": [3] * n_layers},
        "head_scores": {"seq_len": 5, "batch": 1, "seed": 0, "n_tokens": 11,
                        "scores": {k: grid for k in ("induction", "previous_token", "duplicate_token")},
                        "top": {k: heads for k in ("induction", "previous_token", "duplicate_token")},
                        "repeat_loss": {"per_position": [1.0] * 10, "first_copy": 9.0, "second_copy": 1.0, "repeat_start": 6}},
        "ioi": {"n_prompts": n_prompts, "n_tokens": n_pos, "templates": ["t"], "prompts": NASTY[:n_prompts],
                "corrupt_prompts": NASTY[:n_prompts], "io_names": NASTY[:n_prompts], "s_names": NASTY[:n_prompts],
                "answer_str": None, "logit_diff": [1.0] * n_prompts, "corrupt_logit_diff": [-1.0] * n_prompts,
                "mean_logit_diff": 1.0, "std_logit_diff": 0.0, "median_logit_diff": 1.0, "min_logit_diff": 1.0,
                "max_logit_diff": 1.0, "accuracy": 1.0, "mean_corrupt_logit_diff": -1.0, "corrupt_accuracy": 0.0,
                "dla": {"embed": 0.1, "bias": 0.0, "attn": [0.1] * n_layers, "mlp": [0.2] * n_layers, "heads": grid,
                        "top_heads": heads, "bottom_heads": heads, "max_abs_total_minus_logit_diff": 1e-6,
                        "max_abs_logit_diff_minus_forward": 1e-6}},
        "patching": {
            "n_prompts": 2, "prompt_indices": [0, 1], "positions_aligned": True, "metric": "logit_diff",
            "metric_note": "clean = 1", "raw_clean_logit_diff": 3.0, "raw_corrupt_logit_diff": -3.0, "str_tokens": NASTY,
            "activation": {"resid_pre": patch([[0.5] * n_pos for _ in range(n_layers)], layers, tok[:n_pos]),
                           "attn_out": patch([0.1] * n_layers, layers, None), "mlp_out": patch([0.2] * n_layers, layers, None),
                           "heads": patch(grid, layers, [f"H{h}" for h in range(n_heads)])},
            "attribution": {"heads": patch(grid, layers, None)},
            "correlation": {"resid_pre": 0.9, "attn_out": None, "mlp_out": 0.5, "heads": 1.0},
            "top_heads": heads,
            "timings_s": {f"{a}_{k}": 0.1 for a in ("activation", "attribution")
                          for k in ("resid_pre", "attn_out", "mlp_out", "heads")},
        },
        "comparisons": [{"quantity": "q<", "ours": 1.0, "value": 3.56, "model": "GPT-2 small", "source": "Wang et al. 2022"}],
    }


def _save_tiny_llama(path, tokenizer=None):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    LlamaForCausalLM(cfg).save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama and a word-level tokenizer ("w0".."w123"), saved with save_pretrained."""
    from tests.conftest import make_tokenizer

    return _save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), make_tokenizer())


@pytest.fixture(scope="module")
def tiny_model_dir_no_tokenizer(tmp_path_factory):
    return _save_tiny_llama(tmp_path_factory.mktemp("tiny-llama-bare"))


# -- CLI -----------------------------------------------------------------------------------------
def test_version_prints_versions():
    r = runner.invoke(app, ["version"])
    assert r.exit_code == 0, r.output
    assert "mechscope" in r.output and "torch" in r.output and "transformers" in r.output


@pytest.mark.parametrize("name", ["smollm-135m", "not a model!"])
def test_bad_model_is_one_red_line_exit_2(name):
    # names the loader rejects without touching the network
    r = runner.invoke(app, ["hooks", "--model", name])
    assert r.exit_code == 2
    assert r.stderr.startswith("error: ") and f"unknown model {name!r}" in r.stderr
    assert "Traceback" not in r.output
    assert len(r.stderr.strip().splitlines()) == 1


def test_bad_report_settings_exit_2(tmp_path):
    r = runner.invoke(app, ["report", "--n-prompts", "4", "--patch-prompts", "9", "--out", str(tmp_path)])
    assert r.exit_code == 2
    assert "patch_prompts" in r.stderr


def test_hooks_lists_every_site_with_shapes(tiny_model_dir):
    r = runner.invoke(app, ["hooks", "--model", str(tiny_model_dir)], terminal_width=200)
    assert r.exit_code == 0, r.output
    assert "blocks.1.attn.hook_k" in r.output
    assert "hook_embed" in r.output and "ln_final.hook_normalized" in r.output
    # shapes use this model's sizes: 2 kv heads of width 8, d_model 32
    assert re.search(r"blocks\.0\.attn\.hook_k\s.*\[batch, pos, 2, 8\]", r.output) or "[batch, kv_pos, 2, 8]" in r.output
    assert "[batch, pos, 32]" in r.output


def test_lens_prints_one_row_per_layer(tiny_model_dir):
    r = runner.invoke(app, ["lens", "w1 w2 w3", "--target", "w5", "--k", "3", "--model", str(tiny_model_dir)])
    assert r.exit_code == 0, r.output
    assert "L0" in r.stdout and "L1" in r.stdout and "L2" not in r.stdout
    assert "p('w5')" in r.stdout and "rank" in r.stdout


def test_lens_errors_are_clean(tiny_model_dir, tiny_model_dir_no_tokenizer):
    r = runner.invoke(app, ["lens", "hello", "--model", str(tiny_model_dir_no_tokenizer)])
    assert r.exit_code == 2, r.output
    assert "no tokenizer" in r.stderr and "Traceback" not in r.output
    r = runner.invoke(app, ["lens", "w1 w2", "--target", "w5 w6", "--model", str(tiny_model_dir)])
    assert r.exit_code == 2, r.output
    assert "is 2 tokens" in r.stderr


# -- report plumbing -----------------------------------------------------------------------------
def test_html_escapes_tokens_and_embeds_plotly_once(tmp_path):
    from mechscope.report import render_html, write_report

    results = make_results()
    html = render_html(results)
    # a token '</script>' must appear neither raw in markup nor raw in script data
    body_scripts = re.findall(r"<script[^>]*>(.*?)</script>", html, flags=re.S)
    assert len(body_scripts) == 3  # plotly.js, figure data, the plotting call
    assert "<script>alert(1)" not in html
    assert "&lt;/script&gt;&lt;script&gt;alert(1)&lt;/script&gt;" in html  # escaped in tables
    assert "&lt;b&gt;&amp;amp;" in html
    assert "\u2028" not in body_scripts[1]
    # every figure's data parses back exactly
    figs = json.loads(body_scripts[1])
    assert {"fig-lens", "fig-heads-induction", "fig-patch-resid", "fig-attr-scatter", "fig-ioi-dist"} <= set(figs)
    assert NASTY[0] in figs["fig-patch-resid"]["layout"]["xaxis"]["ticktext"]
    # offline: no remote script or stylesheet, plotly.js inline exactly once
    assert not re.search(r"<script[^>]+src=", html)
    assert not re.search(r"<link[^>]+href=\"?https?:", html)
    assert html.count("plotly.js v") == 1
    assert "default-src 'none'" in html and "unsafe-eval" not in html.split("</head>")[0]  # CSP: no fetch, no eval

    paths = write_report(results, tmp_path / "out")
    assert json.loads(paths.json.read_text())["parity"]["max_abs_delta_plain"] == 0.0
    assert paths.html.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_repeated_labels_keep_their_own_columns():
    from mechscope.report.figures import resid_patching_figure

    fig = resid_patching_figure({"values": [[1.0, 2.0]], "row_labels": ["L0"], "col_labels": [" the", " the"]})
    assert fig["data"][0]["x"] == [0, 1]
    assert fig["layout"]["xaxis"]["ticktext"] == [" the", " the"]


def test_json_helpers_are_strict_and_atomic(tmp_path):
    import torch

    from mechscope.report.io import jsonable, pearson, write_json_atomic

    obj = jsonable({"a": torch.tensor([1.0, float("nan")]), "b": torch.tensor([1, 2]), "c": float("inf"), "d": 1 / 3})
    assert obj == {"a": [1.0, None], "b": [1, 2], "c": None, "d": 0.333333}
    write_json_atomic(obj, tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text()) == obj
    with pytest.raises(ValueError):
        write_json_atomic({"x": float("nan")}, tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text()) == obj  # the old file survives a failed write
    assert not list(tmp_path.glob("*.tmp"))
    assert pearson(torch.tensor([1.0, 2, 3]), torch.tensor([2.0, 4, 6])) == pytest.approx(1.0)
    assert pearson(torch.ones(3), torch.tensor([1.0, 2, 3])) is None


def test_script_json_cannot_close_a_script():
    from mechscope.report.render import script_json

    s = str(script_json({"t": "</script><!-- & \u2028"}))
    assert "<" not in s and ">" not in s and "&" not in s and "\u2028" not in s
    assert json.loads(s) == {"t": "</script><!-- & \u2028"}


def test_auto_threads_leaves_busy_cores_alone(monkeypatch):
    import os

    import torch

    from mechscope.cli import auto_threads

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (3.7, 3.0, 3.0))
    assert auto_threads()[0] == 1
    monkeypatch.setattr(os, "getloadavg", lambda: (0.2, 0.2, 0.2))
    assert auto_threads()[0] == min(2, torch.get_num_threads())
