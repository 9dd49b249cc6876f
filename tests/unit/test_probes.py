"""Linear probes, their metrics and their files (mechscope.safety).

Claims tested: each probe method equals an independent implementation (sklearn's LogisticRegression, numpy's
solve and SVD, a numpy mean difference; logistic also satisfies its optimality condition) and recovers a
planted direction; CCS lowers its loss and finds the planted direction from contrast pairs alone; AUROC equals a
brute-force pair count and sklearn's roc_auc_score with ties; the threshold at an FPR flags at most that share
of the control set; recall at the FPR equals a hand count; the stratified bootstrap interval of AUROC covers the
population AUROC in about 95% of draws, and the clustered one does when groups share a shift (where the
stratified one does not); a cluster resample's AUROC equals sklearn's with the draw counts as weights; the baselines sit at chance; a sweep finds the site with the signal;
files round-trip and refuse another model or width; bad inputs say the fix.
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mechscope.core.errors import CorruptFileError, HookNameError, InputError
from mechscope.safety import (
    METHODS,
    Probe,
    auroc,
    auroc_ci,
    balanced_accuracy,
    ensemble,
    evaluate_probe,
    fit_probe,
    probe_sweep,
    recall_at_fpr,
    threshold_at_fpr,
)
from mechscope.safety.probes import make_pairs

SITE = "blocks.1.hook_resid_post"


def planted(n_pairs=500, d=16, sep=1.5, seed=0, noise=1.0):
    """Contrast pairs: a shared per-pair base vector, plus +sep*u (positive) or -sep*u (negative), plus noise.

    Returns X float64 [2 n_pairs, d] (positives then negatives), y, pairs [n_pairs, 2] and the unit u.
    """
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(d, generator=g, dtype=torch.float64)
    u /= u.norm()
    base = torch.randn(n_pairs, d, generator=g, dtype=torch.float64)
    pos = base + sep * u + noise * torch.randn(n_pairs, d, generator=g, dtype=torch.float64)
    neg = base - sep * u + noise * torch.randn(n_pairs, d, generator=g, dtype=torch.float64)
    X = torch.cat([pos, neg])
    y = torch.cat([torch.ones(n_pairs), torch.zeros(n_pairs)]).long()
    pairs = torch.stack([torch.arange(n_pairs), torch.arange(n_pairs) + n_pairs], 1)
    return X, y, pairs, u


def cos(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


# -- each method against an independent implementation --------------------------------------------
@pytest.mark.parametrize("fit_intercept", [False, True])
@pytest.mark.parametrize("C", [0.1, 1.0])
def test_logistic_equals_sklearn(C, fit_intercept):
    sklearn = pytest.importorskip("sklearn.linear_model")
    X, y, _, _ = planted(n_pairs=150, d=24, sep=0.7, seed=1)
    X = X * torch.linspace(0.5, 3.0, 24) + 2.0  # unequal scales and an offset: standardisation matters
    p = fit_probe(X, y, "logistic", C=C, fit_intercept=fit_intercept)
    Z = (X.numpy() - X.numpy().mean(0)) / X.numpy().std(0)
    ref = sklearn.LogisticRegression(C=C, fit_intercept=fit_intercept, tol=1e-12, max_iter=10000).fit(Z, y.numpy())
    assert cos(p.direction, ref.coef_[0]) > 0.999999
    np.testing.assert_allclose(p.direction.numpy(), ref.coef_[0], rtol=1e-4, atol=1e-6)
    assert p.bias == pytest.approx(float(ref.intercept_[0]), abs=1e-5)
    assert (ref.predict(Z) == (p.score(X) > 0).numpy()).all()
    np.testing.assert_allclose(p.mean.numpy(), X.numpy().mean(0), rtol=1e-6)


def test_logistic_satisfies_its_optimality_condition():
    """At the optimum of 0.5|w|^2 + C sum log(1 + exp(-s z.w)) the gradient w - C Z^T (s sigmoid(-s z.w)) is 0."""
    X, y, _, _ = planted(n_pairs=100, d=12, sep=0.5, seed=2)
    p = fit_probe(X.float(), y, "logistic", C=0.1)  # float32 input, computed in float64
    Z = (X.numpy() - X.numpy().mean(0)) / X.numpy().std(0)
    w, s = p.direction.double().numpy(), 2.0 * y.numpy() - 1.0
    grad = w - 0.1 * Z.T @ (s / (1 + np.exp(s * (Z @ w))))
    assert np.abs(grad).max() < 1e-5 * np.abs(w).max()
    assert p.info["C"] == 0.1 and p.info["fit_intercept"] is False and p.bias == 0.0


def test_diff_means_equals_numpy():
    X, y, _, _ = planted(seed=3)
    p = fit_probe(X, y, "diff_means")
    x = X.numpy()
    mu1, mu0 = x[y.numpy() == 1].mean(0), x[y.numpy() == 0].mean(0)
    np.testing.assert_allclose(p.direction.numpy(), mu1 - mu0, rtol=1e-6)
    assert p.score(torch.tensor((mu0 + mu1)[None] / 2))[0] == pytest.approx(0.0, abs=1e-5)
    assert (p.mean == 0).all() and (p.scale == 1).all()


@pytest.mark.parametrize("shrinkage", [0.0, 0.3])
def test_lda_equals_a_numpy_solve(shrinkage):
    X, y, _, _ = planted(n_pairs=200, d=10, seed=4)
    X = X @ torch.randn(10, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)  # correlated
    p = fit_probe(X, y, "lda", shrinkage=shrinkage)
    x, yy = X.numpy(), y.numpy()
    xc = np.concatenate([x[yy == c] - x[yy == c].mean(0) for c in (0, 1)])
    S = xc.T @ xc / (len(x) - 2)
    sigma = (1 - shrinkage) * S + shrinkage * np.trace(S) / 10 * np.eye(10)
    want = np.linalg.solve(sigma, x[yy == 1].mean(0) - x[yy == 0].mean(0))
    np.testing.assert_allclose(p.direction.numpy(), want, rtol=1e-5, atol=1e-7)
    assert p.info["shrinkage"] == shrinkage


def test_lda_auto_shrinkage_is_ledoit_wolf_and_works_with_more_features_than_examples():
    covariance = pytest.importorskip("sklearn.covariance")
    X, y, _, _ = planted(n_pairs=20, d=64, sep=2.0, seed=5)  # d = 64 > n = 40
    p = fit_probe(X, y, "lda")
    x, yy = X.numpy(), y.numpy()
    xc = np.concatenate([x[yy == c] - x[yy == c].mean(0) for c in (0, 1)])
    assert p.info["shrinkage"] == pytest.approx(covariance.ledoit_wolf_shrinkage(xc, assume_centered=True), rel=1e-9)
    assert 0 < p.info["shrinkage"] <= 1 and torch.isfinite(p.direction).all()
    assert auroc(p.score(X), y) > 0.9


def test_lat_equals_numpy_svd_of_paired_differences():
    X, y, pairs, _ = planted(seed=6)
    p = fit_probe(X, y, "lat", pairs=pairs)
    diffs = X.numpy()[pairs[:, 0]] - X.numpy()[pairs[:, 1]]
    v = np.linalg.svd(diffs, full_matrices=False)[2][0]
    assert abs(cos(p.direction, v)) > 0.999999
    assert (diffs @ p.direction.double().numpy()).mean() > 0  # oriented: positives score higher
    assert p.info["paired"] is True and p.info["n_pairs"] == len(pairs)
    # without pairs: the same computation on random (positive, negative) pairs
    q = fit_probe(X, y, "lat", seed=3)
    rp = make_pairs(y, 3).numpy()
    assert (y[rp[:, 0]] == 1).all() and (y[rp[:, 1]] == 0).all() and len(np.unique(rp[:, 1])) == len(rp)
    v2 = np.linalg.svd(X.numpy()[rp[:, 0]] - X.numpy()[rp[:, 1]], full_matrices=False)[2][0]
    assert abs(cos(q.direction, v2)) > 0.999999


def test_ccs_lowers_its_loss_and_finds_the_planted_direction_from_pairs():
    X, y, pairs, u = planted(n_pairs=400, d=16, sep=2.0, seed=7)
    p = fit_probe(X, y, "ccs", pairs=pairs, n_tries=4, n_epochs=600)
    assert p.info["loss_final"] < 0.7 * p.info["loss_initial"]
    assert p.info["loss_final"] == min(p.info["loss_final_all"])  # the best of the restarts is kept
    assert cos(p.raw_direction, u) > 0.95
    assert auroc(p.score(X), y) > 0.95  # the sign is oriented with the labels
    # the labels only orient the sign: flipping them flips the probe, nothing else
    q = fit_probe(X, 1 - y, "ccs", pairs=pairs.flip(1), n_tries=4, n_epochs=600)
    assert cos(q.raw_direction, p.raw_direction) < -0.999


@pytest.mark.parametrize("method", METHODS)
def test_every_method_recovers_the_planted_direction(method):
    X, y, _, u = planted(n_pairs=500, d=16, sep=1.5, seed=8)
    kw = {"n_tries": 4, "n_epochs": 600} if method == "ccs" else {}
    p = fit_probe(X, y, method, site=SITE, model_name="tiny", **kw)
    assert cos(p.raw_direction, u) > 0.95
    assert auroc(p.score(X), y) > 0.9  # oriented: positives score higher
    assert p.method == method and p.d_model == 16 and p.info["n_train"] == 1000


# -- metrics --------------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(-3, 3), st.integers(0, 1)), min_size=2, max_size=40))
def test_auroc_equals_a_pair_count_and_sklearn_with_ties(rows):
    s = np.array([r[0] for r in rows], dtype=np.float64)
    y = np.array([r[1] for r in rows], dtype=np.int64)
    if y.min() == y.max():
        with pytest.raises(InputError, match="one class"):
            auroc(s, y)
        return
    diff = s[y == 1][:, None] - s[y == 0][None]
    want = ((diff > 0) + 0.5 * (diff == 0)).mean()
    assert auroc(s, y) == pytest.approx(want, abs=1e-12)
    metrics = pytest.importorskip("sklearn.metrics")
    assert auroc(torch.tensor(s), torch.tensor(y)) == pytest.approx(metrics.roc_auc_score(y, s), abs=1e-12)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 400), st.sampled_from([0.001, 0.01, 0.05, 0.3, 0.9]), st.integers(0, 10**6))
def test_threshold_at_fpr_flags_at_most_the_target_share(n, fpr, seed):
    c = np.random.default_rng(seed).normal(size=n)
    t = threshold_at_fpr(c, fpr)
    assert (c > t).mean() <= fpr
    assert (c > t).sum() == math.floor(fpr * n + 1e-9)  # continuous scores: exactly the k largest are above
    tied = np.round(c)  # with ties the share above can only fall
    assert (tied > threshold_at_fpr(tied, fpr)).mean() <= fpr


def test_recall_and_balanced_accuracy_equal_hand_counts():
    control = np.arange(100, dtype=np.float64)  # 1% FPR: one item (99) above -> threshold 98
    assert threshold_at_fpr(control, 0.01) == 98.0
    scores = np.array([99.5, 98.0, 120.0, 50.0, 3.0, 100.0])
    labels = np.array([1, 1, 1, 1, 0, 0])
    assert recall_at_fpr(scores, labels, control, fpr=0.01) == 2 / 4  # 99.5 and 120 are > 98
    assert recall_at_fpr(scores, labels, fpr=0.4) == 1 / 4  # control = negatives {3, 100}: k=0, t=100
    assert balanced_accuracy(scores, labels, threshold=60.0) == pytest.approx(0.5 * (3 / 4 + 1 / 2))


def test_auroc_interval_covers_the_population_value_about_95_percent_of_draws():
    """pos ~ N(1, 1), neg ~ N(0, 1), 150 each: population AUROC = Phi(1/sqrt 2) = 0.7602. Measured: 190/200
    (0.95); percentile intervals run narrow at small n (60 each: 0.915)."""
    truth = 0.5 * (1 + math.erf(1 / math.sqrt(2) / math.sqrt(2)))
    rng = np.random.default_rng(0)
    covered = 0
    for i in range(200):
        s = np.concatenate([rng.normal(1, 1, 150), rng.normal(0, 1, 150)])
        y = np.repeat([1, 0], 150)
        ci = auroc_ci(s, y, n_boot=500, seed=i)
        covered += ci.low <= truth <= ci.high
    assert 0.90 <= covered / 200 <= 0.99


def test_clustered_interval_covers_when_groups_share_a_shift_and_the_stratified_one_does_not():
    """40 groups of 4 examples, each group of one class and sharing a shift u_g ~ N(0, 1.5^2) (as the templates of
    one harmful goal would): population AUROC = Phi(1 / sqrt(6.5)) = 0.6526. Measured over 200 draws: the
    stratified interval covers it in 0.745 of draws (it treats the 160 examples as independent), the clustered
    one in 0.945."""
    truth = 0.5 * (1 + math.erf(1 / math.sqrt(6.5) / math.sqrt(2)))
    rng = np.random.default_rng(0)
    strat = clus = 0
    for i in range(200):
        u = rng.normal(0, 1.5, 40)
        g = np.repeat(np.arange(40), 4)
        y = (g % 2 == 0).astype(int)
        s = u[g] + y + rng.normal(0, 1, 160)
        a = auroc_ci(s, y, n_boot=500, seed=i)
        b = auroc_ci(s, y, groups=[f"g{k}" for k in g], n_boot=500, seed=i)
        assert a.estimate == b.estimate
        strat += a.low <= truth <= a.high
        clus += b.low <= truth <= b.high
    assert 0.90 <= clus / 200 <= 0.99 and strat / 200 < 0.85


def test_a_cluster_resample_is_the_auroc_of_the_repeated_examples():
    from sklearn.metrics import roc_auc_score

    from mechscope.safety.metrics import _cluster_weights, _weighted_auroc

    rng = np.random.default_rng(3)
    s = torch.tensor(np.round(rng.normal(0, 1, 30), 1))  # rounded: ties occur
    y = torch.tensor(rng.integers(0, 2, 30))
    y[:2] = torch.tensor([0, 1])
    groups = [f"g{k // 3}" for k in range(30)]
    w = _cluster_weights(groups, 30, 20, seed=5)
    assert torch.equal(w.sum(1), torch.full((20,), 30.0, dtype=torch.float64))  # 10 groups of 3 drawn each time
    got = _weighted_auroc(s[y == 1], s[y == 0], w[:, y == 1], w[:, y == 0])
    for b in range(20):
        keep = w[b] > 0
        if len(set(y[keep].tolist())) < 2:
            assert got[b].isnan()
            continue
        assert float(got[b]) == pytest.approx(roc_auc_score(y[keep].numpy(), s[keep].numpy(),
                                                            sample_weight=w[b][keep].numpy()), abs=1e-12)


def test_evaluation_intervals_and_baselines():
    X, y, _, _ = planted(n_pairs=150, d=16, sep=1.5, seed=10)
    Xt, yt = X[::2], y[::2]
    Xtr, ytr = X[1::2], y[1::2]
    p = fit_probe(Xtr, ytr, "diff_means", site=SITE)
    control = planted(n_pairs=200, d=16, sep=0.0, seed=11)[0]
    honest = Xt[yt == 0][:20]
    ev = evaluate_probe(p, Xt, yt, control=control, honest=honest, train=(Xtr, ytr), n_boot=300, n_random=200)
    assert ev.auroc.estimate == pytest.approx(auroc(p.score(Xt), yt))
    for ci in (ev.auroc, ev.balanced_accuracy, ev.recall):
        assert ci.low <= ci.estimate <= ci.high and ci.n_boot == 300
    t = threshold_at_fpr(p.score(control), 0.01)
    assert ev.threshold == t and ev.control == "control set"
    assert ev.recall.estimate == pytest.approx(float((p.score(Xt)[yt == 1] > t).double().mean()))
    assert ev.honest_fpr == pytest.approx(float((p.score(honest) > t).double().mean()))
    assert ev.auroc.estimate > 0.9
    assert abs(ev.random_auroc_mean - 0.5) < 0.05 and 0.02 < ev.random_auroc_std < 0.4
    assert abs(ev.shuffled_auroc - 0.5) < 0.25
    json.dumps(ev.to_dict())


# -- sweep and ensemble ---------------------------------------------------------------------------
def test_sweep_finds_the_site_with_the_signal_and_ensemble_averages_standardised_scores():
    X, y, _, _ = planted(n_pairs=100, d=8, sep=1.5, seed=12)
    noise = planted(n_pairs=100, d=8, sep=0.0, seed=13)[0]
    idx = torch.randperm(200, generator=torch.Generator().manual_seed(0))
    tr, te = idx[:120], idx[120:]
    features = {"blocks.0.hook_resid_post": (noise[tr], noise[te]), "blocks.1.hook_resid_post": (X[tr], X[te])}
    res = probe_sweep(features, y[tr], y[te], ("logistic", "diff_means"), n_boot=50, n_random=20, model_name="tiny")
    assert res.best_site("logistic") == res.best_site("diff_means") == "blocks.1.hook_resid_post"
    table = res.table()
    assert table["blocks.1.hook_resid_post"]["logistic"] > 0.9
    assert table["blocks.0.hook_resid_post"]["logistic"] < 0.75
    assert res.probes["blocks.1.hook_resid_post", "logistic"].model_name == "tiny"
    json.dumps(res.to_dict())
    probes = [res.probes[s, "diff_means"] for s in features]
    Xs = {s: te_x for s, (_, te_x) in features.items()}
    want = sum((p.score(Xs[p.site]) - p.info["train_score_mean"]) / p.info["train_score_std"] for p in probes) / 2
    torch.testing.assert_close(ensemble(probes, Xs), want)
    with pytest.raises(InputError, match="lacks"):
        ensemble(probes, {"blocks.1.hook_resid_post": X[te]})
    with pytest.raises(InputError, match="control has no activations"):
        probe_sweep(features, y[tr], y[te], ("diff_means",), control={"blocks.1.hook_resid_post": X})


# -- files ----------------------------------------------------------------------------------------
def test_save_load_round_trip_and_refusals(tmp_path):
    X, y, _, _ = planted(n_pairs=60, d=12, seed=14)
    p = fit_probe(X, y, "logistic", site=SITE, model_name="tiny-llama", aggregation="max", info={"split": "train"})
    folder = p.save(tmp_path / "probe")
    assert sorted(f.name for f in folder.iterdir()) == ["cfg.json", "probe.safetensors"]
    q = Probe.load(folder, model="tiny-llama")
    for k in ("bias", "method", "site", "aggregation", "model_name", "d_model"):
        assert getattr(q, k) == getattr(p, k)
    for k in ("direction", "mean", "scale"):
        assert torch.equal(getattr(q, k), getattr(p, k))
    assert q.info == p.info and q.info["split"] == "train"
    assert torch.equal(q.score(X), p.score(X))
    assert q.aggregate(q.score_tokens(X[:5])) == pytest.approx(float(p.score(X[:5]).max()))
    model = SimpleNamespace(cfg=SimpleNamespace(name="tiny-llama", d_model=12, d_mlp=48, n_heads=2, d_head=6))
    assert Probe.load(folder, model=model).d_model == 12
    with pytest.raises(InputError, match="'tiny-llama'.*'other-model'"):
        Probe.load(folder, model="other-model")
    wide = SimpleNamespace(cfg=SimpleNamespace(name="tiny-llama", d_model=64, d_mlp=48, n_heads=2, d_head=6))
    with pytest.raises(InputError, match="reads 12 features.*has 64.*Refit"):
        Probe.load(folder, model=wide)
    with pytest.raises(InputError, match="width 5"):
        q.score(torch.zeros(3, 5))
    (folder / "probe.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(CorruptFileError):
        Probe.load(folder)
    p.save(folder)  # overwrite in place
    (folder / "cfg.json").write_text("{not json")
    with pytest.raises(CorruptFileError):
        Probe.load(folder)
    with pytest.raises(InputError, match="site="):
        fit_probe(X, y, "diff_means").save(tmp_path / "nosite")


def test_bad_inputs_say_the_fix():
    X, y, _, _ = planted(n_pairs=20, d=6, seed=15)
    bad = X.clone()
    bad[3, 2], bad[5, 1] = float("nan"), float("inf")
    with pytest.raises(InputError, match=rf"{SITE}.*2 NaN or infinite"):
        fit_probe(bad, y, "logistic", site=SITE)
    p = fit_probe(X, y, "diff_means", site=SITE)
    with pytest.raises(InputError, match="2 NaN"):
        evaluate_probe(p, bad, y)
    with pytest.raises(InputError, match="one class"):
        fit_probe(X, torch.ones(40, dtype=torch.long), "logistic")
    with pytest.raises(InputError, match="0 or 1"):
        fit_probe(X, y * 2, "lda")
    with pytest.raises(InputError, match="choose one of"):
        fit_probe(X, y, "svm")
    with pytest.raises(InputError, match="no such option"):
        fit_probe(X, y, "diff_means", C=1.0)
    with pytest.raises(HookNameError):
        fit_probe(X, y, "diff_means", site="blocks.1.hook_resid_psot")
    with pytest.raises(InputError, match="aggregation"):
        fit_probe(X, y, "diff_means", aggregation="median")
    with pytest.raises(InputError, match=r"\(positive, negative\)"):
        fit_probe(X, y, "lat", pairs=torch.tensor([[0, 1], [2, 3]]))  # rows 0, 1 are both positives
    for fpr in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(InputError, match=r"\(0, 1\)"):
            threshold_at_fpr(np.arange(10.0), fpr)
        with pytest.raises(InputError, match=r"\(0, 1\)"):
            recall_at_fpr(p.score(X), y, fpr=fpr)
        with pytest.raises(InputError, match=r"\(0, 1\)"):
            evaluate_probe(p, X, y, fpr=fpr)
