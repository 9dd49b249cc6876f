"""The Toy Models of Superposition reproduction: the model's loss and gradient against a naive float64
version, the analyses against hand computations, and the paper's claims at small settings (superposition
appears with sparsity; the 2-in-1 phase diagram), plus determinism, config checks and the report."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from mechscope.core.errors import InputError
from mechscope.toys.superposition import (
    PAIR_CLASSES,
    SuperpositionConfig,
    classify_pair,
    dimensionality,
    feature_norms,
    forward,
    gram,
    importance,
    in_superposition,
    interference,
    represented,
    run_superposition,
    sample_features,
    toy_loss,
)
from tests.conftest import WRONG_TYPE

torch.set_num_threads(1)

SUPERPOSED, ONLY_1, ONLY_2 = PAIR_CLASSES.index("superposition (antipodal)"), 1, 2


def make_cfg(**overrides) -> SuperpositionConfig:
    """Small settings that still show the paper's effects (a few seconds)."""
    base = dict(n=20, m=5, sparsities=(0.0, 0.99), replicas=2, steps=4000, batch=1024, eval_batch=16_384,
                phase_importance_points=3, phase_importance_range=(1 / 3, 3.0), phase_density_points=2,
                phase_density_range=(0.03, 1.0), phase_replicas=2, phase_steps=1500, warm_start_check=False)
    return SuperpositionConfig(**{**base, **overrides})


def tiny_cfg(**overrides) -> SuperpositionConfig:
    """Settings that only exercise the code paths (well under a second)."""
    return make_cfg(**{"n": 6, "m": 2, "steps": 40, "phase_steps": 40, "warmup_steps": 5, "eval_batch": 256,
                       "batch": 64, "warm_start_check": True, **overrides})


@pytest.fixture(scope="module")
def small_result() -> dict:
    return run_superposition(make_cfg(), progress=False)


# -- the model ---------------------------------------------------------------------------------------------
def naive_loss(W: torch.Tensor, b: torch.Tensor, x: torch.Tensor, imp: torch.Tensor) -> torch.Tensor:
    """Sum over instances of mean_batch sum_i I_i (x_i - ReLU(sum_k W_ki h_k + b_i))^2, h_k = sum_j W_kj x_j,
    written with loops in float64."""
    total = torch.zeros((), dtype=torch.float64)
    inst, m, n = W.shape
    for a in range(inst):
        for e in range(x.shape[1]):
            h = [sum(W[a, k, j] * x[a, e, j] for j in range(n)) for k in range(m)]
            for i in range(n):
                out = torch.clamp(sum(W[a, k, i] * h[k] for k in range(m)) + b[a, i], min=0)
                total = total + imp[a, i] * (x[a, e, i] - out) ** 2 / x.shape[1]
    return total


def test_loss_and_gradient_equal_naive_float64():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(2, 3, 5, generator=g)
    b = torch.randn(2, 5, generator=g) * 0.3
    x = sample_features(torch.tensor([0.0, 0.5]), 4, 5, g)
    imp = torch.stack([importance(5, 0.7), importance(5, 0.9)])
    W32, b32 = W.clone().requires_grad_(), b.clone().requires_grad_()
    ours = toy_loss(x, forward(W32, b32, x), imp)
    ours.sum().backward()
    W64, b64 = W.double().requires_grad_(), b.double().requires_grad_()
    ref = naive_loss(W64, b64, x.double(), imp.double())
    ref.backward()
    torch.testing.assert_close(ours.sum().double(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(W32.grad.double(), W64.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(b32.grad.double(), b64.grad, rtol=1e-4, atol=1e-5)
    # per instance: each instance's loss is its own
    one = naive_loss(W64[1:], b64[1:], x[1:].double(), imp[1:].double()).detach()
    torch.testing.assert_close(ours[1].double(), one, rtol=1e-5, atol=1e-6)


def test_features_follow_the_sparsity_and_uniform_law():
    S = torch.tensor([0.0, 0.7, 0.99])
    x = sample_features(S, 200_000, 3, torch.Generator().manual_seed(1))
    zero = (x == 0).float().mean((1, 2))
    torch.testing.assert_close(zero, S, atol=3e-3, rtol=0)
    for k in range(3):
        active = x[k][x[k] > 0]
        assert abs(active.mean().item() - 0.5) < 0.01 and active.max() <= 1
    assert torch.equal(importance(4, 0.5), torch.tensor([1.0, 0.5, 0.25, 0.125]))


# -- analyses against hand computations ---------------------------------------------------------------------
def test_antipodal_pair_in_one_dimension():
    W = torch.tensor([[1.0, -1.0]])
    torch.testing.assert_close(feature_norms(W), torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(interference(W), torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(dimensionality(W), torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(gram(W), torch.tensor([[1.0, -1.0], [-1.0, 1.0]]))
    assert in_superposition(W).all()
    assert classify_pair(W).item() == SUPERPOSED


def test_orthogonal_features_and_an_unrepresented_one():
    W = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.1]])  # feature 2 is short: ||W_2|| = 0.1
    torch.testing.assert_close(feature_norms(W), torch.tensor([1.0, 1.0, 0.1]))
    assert represented(W).tolist() == [True, True, False]
    # feature 1 sees feature 2: (W^_1 . W_2)^2 = 0.01; feature 2's direction is W_1's: (e2 . W_1)^2 = 1
    torch.testing.assert_close(interference(W), torch.tensor([0.0, 0.01, 1.0]))
    torch.testing.assert_close(dimensionality(W), torch.tensor([1.0, 1 / 1.01, 0.01 / 1.01]))
    assert in_superposition(W).tolist() == [False, False, False]  # 0.01 < 0.05; feature 2 not represented
    assert in_superposition(W, interference_threshold=0.005).tolist() == [False, True, False]
    assert represented(W, threshold=0.05).tolist() == [True, True, True]


def test_unequal_lengths_and_a_zero_column():
    W = torch.tensor([[2.0, 1.0, 0.0]])
    # W^_1 = 1: (1 * 1)^2 = 1; W^_2 = 1: (1 * 2)^2 = 4; D_1 = 4 / (4 + 1), D_2 = 1 / (1 + 4); zero column: 0
    torch.testing.assert_close(interference(W), torch.tensor([1.0, 4.0, 0.0]))
    torch.testing.assert_close(dimensionality(W), torch.tensor([0.8, 0.2, 0.0]))
    assert not dimensionality(W).isnan().any()


def test_pentagon_has_dimensionality_two_fifths():
    angles = torch.arange(5) * 2 * math.pi / 5
    W = torch.stack([angles.cos(), angles.sin()])  # [m=2, n=5], unit columns
    torch.testing.assert_close(dimensionality(W), torch.full((5,), 0.4))
    torch.testing.assert_close(interference(W), torch.full((5,), 1.5))  # 2 cos^2 72 + 2 cos^2 144


def test_analyses_batch_over_instances():
    W = torch.randn(3, 4, 2, 6, generator=torch.Generator().manual_seed(2))
    for fn in (feature_norms, interference, dimensionality, gram):
        batched = fn(W)
        torch.testing.assert_close(batched[2, 1], fn(W[2, 1]))


def test_classify_pair_every_outcome():
    W = torch.tensor([[[0.1, 0.2]], [[1.0, 0.1]], [[0.0, -0.9]], [[1.0, -1.0]], [[0.8, 0.7]]])  # [5, m=1, 2]
    assert classify_pair(W).tolist() == [0, 1, 2, 3, 4]
    assert classify_pair(W, threshold=0.05).tolist() == [4, 4, 2, 3, 4]


# -- the paper's claims at small settings -------------------------------------------------------------------
def test_superposition_appears_only_with_sparsity(small_result):
    rows = {r["sparsity"]: r for r in small_result["metrics"]["sweep"]}
    dense, sparse = rows[0.0], rows[0.99]
    assert dense["represented"] <= 5 and dense["in_superposition"] == 0, dense
    assert sparse["represented"] > 5 and sparse["in_superposition"] > 0, sparse
    # dense: the most important features, orthogonal (one dimension each)
    norms = torch.tensor(dense["norms"])
    assert (norms[:dense["represented"]] > 0.5).all()
    rep = norms > 0.5
    dims = torch.tensor(dense["dimensionality"])[rep]
    torch.testing.assert_close(dims, torch.ones_like(dims), atol=0.05, rtol=0)


def test_phase_diagram_dense_lone_feature_sparse_superposition(small_result):
    phase = small_result["metrics"]["phase"]
    r, dens, cls = phase["relative_importance"], phase["density"], phase["classes"]
    assert dens[0] == pytest.approx(1.0) and r[1] == pytest.approx(1.0)
    assert cls[0][0] == ONLY_1 and cls[0][2] == ONLY_2, cls  # dense: the more important feature alone
    assert cls[1][1] == SUPERPOSED, cls  # sparse, equal importance: an antipodal pair


def test_result_is_complete(small_result):
    r = small_result
    assert r["toy"] == "superposition" and r["command"] == "mechscope toy superposition --seed 0"
    assert {f["id"] for f in r["figures"]} == {"gram", "norms", "dimensionality", "phase"}
    assert all(set(c) == {"quantity", "paper", "ours", "note"} for c in r["comparisons"])
    assert r["settings"]["sparsities"] == [0.0, 0.99] and r["notes"] and r["metrics"]["warm_start"] is None
    json.dumps(r, allow_nan=False)


def test_warm_start_check():
    r = run_superposition(tiny_cfg(), progress=False)
    warm = r["metrics"]["warm_start"]
    assert warm["sparsity"] == 0.99 and len(warm["represented_before"]) == 2
    assert warm["sweep_represented"] == r["metrics"]["sweep"][1]["represented"]
    assert warm["loss"] > 0 and warm["sweep_loss"] > 0
    assert any(n.startswith("Warm-start check") for n in r["notes"])
    json.dumps(r, allow_nan=False)


def test_same_seed_same_numbers_other_seed_differs():
    a = run_superposition(tiny_cfg(), progress=False)
    b = run_superposition(tiny_cfg(), progress=False)
    c = run_superposition(tiny_cfg(seed=1), progress=False)
    assert a["metrics"] == b["metrics"] and a["figures"] == b["figures"]
    assert a["metrics"]["sweep"][0]["norms"] != c["metrics"]["sweep"][0]["norms"]


# -- bad input ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, words", [
    (dict(m=20), "m < n"),
    (dict(m=25), "m < n"),
    (dict(sparsities=(0.0, 1.0)), "sparsities"),
    (dict(sparsities=(-0.1,)), "sparsities"),
    (dict(sparsities=()), "sparsities"),
    (dict(steps=0), "steps"),
    (dict(phase_steps=-5), "phase_steps"),
    (dict(batch=-1), "batch"),
    (dict(replicas=True), "replicas"),
    (dict(lr=0.0), "lr"),
    (dict(decay=-0.7), "decay"),
    (dict(warmup_steps=5000), "warmup_steps"),
    (dict(phase_density_range=(0.0, 1.0)), "phase_density_range"),
    (dict(phase_density_range=(0.1, 2.0)), "phase_density_range"),
    (dict(phase_importance_range=(10.0, 0.1)), "phase_importance_range"),
])
def test_bad_config_raises_input_error(overrides, words):
    with pytest.raises(InputError, match=words.replace("(", r"\(")) as e:
        make_cfg(**overrides)
    assert "got" in str(e.value)


def test_wrong_types_are_rejected():
    with pytest.raises(WRONG_TYPE, match="batch"):
        make_cfg(batch=2.5)
    with pytest.raises(WRONG_TYPE):
        run_superposition(dataclasses.asdict(make_cfg()), progress=False)


# -- the report ---------------------------------------------------------------------------------------------
def test_report_renders(small_result, tmp_path):
    from mechscope.report.toys import write_toy_report

    html, js = write_toy_report(small_result, tmp_path)
    assert html.name == "superposition.html" and js.name == "superposition.json"
    page = html.read_text()
    assert "Beside the paper" in page and "features represented at S=0" in page and "mechscope-figures" in page
    assert "superposition (antipodal)" in page
    data = json.loads(js.read_text())
    assert [f["id"] for f in data["figures"]] == ["gram", "norms", "dimensionality", "phase"]
    assert data["figures"][3]["fig"]["data"][0]["type"] == "heatmap"
    assert data["comparisons"] == small_result["comparisons"]
