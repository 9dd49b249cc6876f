"""train_probe on a tiny model: a planted token signal is found, the split keeps groups apart, the numbers equal
the model-free pieces run by hand, and bad datasets are refused with the fix."""

from __future__ import annotations

import pytest
import torch

import mechscope
from mechscope.core.errors import InputError
from mechscope.data.labelled import Example, LabelledDataset
from mechscope.data.labelled_render import render
from mechscope.safety import (
    auroc,
    collect_features,
    evaluate_probe,
    fit_probe,
    group_pairs,
    train_probe,
)
from tests.conftest import make_words_model


@pytest.fixture(scope="module")
def wmodel() -> mechscope.HookedModel:
    return make_words_model()


def planted(n_groups: int = 24, seed: int = 0) -> LabelledDataset:
    """Twin texts per group: the positive ends with w7, the negative with w8; the rest is random words."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(n_groups):
        words = " ".join(f"w{int(i)}" for i in torch.randint(20, 120, (6,), generator=g))
        out += [Example(text=f"{words} w7", label=1, group=f"g{k}"), Example(text=f"{words} w8", label=0, group=f"g{k}")]
    return LabelledDataset("planted", tuple(out))


def control(n: int = 30) -> LabelledDataset:
    g = torch.Generator().manual_seed(1)
    return LabelledDataset("ctrl", tuple(Example(text=" ".join(f"w{int(i)}" for i in torch.randint(20, 120, (7,), generator=g)),
                                                 label=0, group=f"c{k % 3}") for k in range(n)))


def test_a_planted_token_is_found_and_the_numbers_equal_the_pieces(wmodel):
    ds = planted(40)
    r = train_probe(wmodel, ds, sites="blocks.*.hook_resid_post", methods=("logistic", "diff_means", "lat"),
                    aggregation="last", control=control(), transfer=[planted(8, seed=5)], n_boot=200, n_random=20,
                    progress=False)
    assert set(r.info["train_groups"]).isdisjoint(r.info["test_groups"]) and r.info["paired"]
    assert r.info["n_train"] + r.info["n_validation"] + r.info["n_test"] == len(ds)
    assert set(r.info["validation_groups"]).isdisjoint(r.info["test_groups"] + r.info["train_groups"])
    assert r.info["selection"] == "validation" and r.info["bootstrap"] == "clustered"
    best = r.sweep.evaluations[r.sweep.best_site("logistic"), "logistic"]
    assert best.auroc.estimate > 0.95 and best.auroc.low <= best.auroc.estimate <= best.auroc.high
    assert abs(best.random_auroc_mean - 0.5) < 0.2 and best.shuffled_auroc is not None
    assert r.transfer["planted"][r.sweep.best_site("logistic"), "logistic"].auroc.estimate > 0.9
    # the same cells by hand: split (test, then validation out of train), render, collect, fit, evaluate
    train, test = ds.split(0.5, 0)
    train, val = train.split(0.25, 1)
    sites = list(r.sweep.sites)
    f = {name: collect_features(wmodel, render(wmodel, part), sites, aggregation="last", progress=False)
         for name, part in (("train", train), ("val", val), ("test", test))}
    site = r.sweep.best_site("diff_means")
    p = fit_probe(f["train"].vectors[site], train.labels, "diff_means", site=site)
    torch.testing.assert_close(p.direction, r.sweep.probes[site, "diff_means"].direction, atol=1e-5, rtol=1e-4)
    e = evaluate_probe(p, f["test"].vectors[site], test.labels, control=None, groups=test.groups, n_boot=200, n_random=20)
    got = r.sweep.evaluations[site, "diff_means"]
    assert e.auroc.estimate == pytest.approx(got.auroc.estimate, abs=1e-9) and got.bootstrap == "clustered"
    assert (e.auroc.low, e.auroc.high) == pytest.approx((got.auroc.low, got.auroc.high), abs=1e-9)
    # the best site is the validation argmax, and the stored scores are the best probe's on each part
    val_auc = {s: auroc(r.sweep.probes[s, "diff_means"].score(f["val"].vectors[s]), val.labels) for s in sites}
    assert site == max(sites, key=lambda s: val_auc[s])
    assert r.sweep.validation_auroc[site, "diff_means"] == pytest.approx(val_auc[site], abs=1e-12)
    stored = r.scores["diff_means"]
    assert stored["site"] == site and set(stored["parts"]) == {"test", "validation", "control", "transfer:planted"}
    torch.testing.assert_close(torch.tensor(stored["parts"]["test"]["scores"], dtype=torch.float64),
                               p.score(f["test"].vectors[site]).double(), atol=1e-5, rtol=1e-5)
    assert stored["parts"]["test"]["labels"] == test.labels.tolist() and stored["parts"]["control"]["labels"] is None
    d = r.to_dict()
    assert d["sweep"]["best_site"]["logistic"] == r.sweep.best_site("logistic") and d["sweep"]["selection"] == "validation"
    assert all("validation_auroc" in row for row in d["sweep"]["rows"])


def test_without_a_validation_split_the_test_split_picks_and_says_so(wmodel):
    r = train_probe(wmodel, planted(), sites="blocks.*.hook_resid_post", methods=("diff_means",), aggregation="last",
                    control=control(), validation_fraction=0.0, clustered=False, n_boot=50, n_random=5, progress=False)
    assert r.info["selection"] == "test" and r.info["n_validation"] == 0 and not r.sweep.validation_auroc
    assert r.sweep.best_site("diff_means") == max(r.sweep.sites, key=lambda s: r.sweep.evaluations[s, "diff_means"].auroc.estimate)
    assert r.sweep.evaluations[r.sweep.sites[0], "diff_means"].bootstrap == "stratified"
    # with a control set, the honest answers' FPR is the share of test negatives above the control threshold
    e = r.sweep.evaluations[r.sweep.sites[0], "diff_means"]
    assert e.honest_fpr is not None and 0 <= e.honest_fpr <= 1


def test_group_pairs_are_the_twins():
    ds = planted(4)
    pairs = group_pairs(ds)
    assert pairs.tolist() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert group_pairs(control()) is None


def test_bad_datasets_name_the_fix(wmodel):
    one_class = LabelledDataset("ones", tuple(Example(text="w5 w6", label=1, group=f"g{k}") for k in range(6)))
    with pytest.raises(InputError, match="needs examples of both labels.*0 of label 0 and 6 of label 1"):
        train_probe(wmodel, one_class, progress=False)
    with pytest.raises(InputError, match="unknown"):
        train_probe(wmodel, "honesty_pairz", progress=False)
    with pytest.raises(InputError, match="fpr"):
        train_probe(wmodel, planted(), methods=("diff_means",), control=None, fpr=1.5, n_boot=50, n_random=5,
                    progress=False)
    with pytest.raises(InputError, match="transfer datasets named \\['planted'\\] appear more than once"):
        train_probe(wmodel, planted(), transfer=[planted(8, seed=5), planted(6, seed=6)], progress=False)
    with pytest.raises(InputError, match="validation_fraction must lie in"):
        train_probe(wmodel, planted(), validation_fraction=1.0, progress=False)
