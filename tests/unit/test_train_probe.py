"""train_probe on a tiny model: a planted token signal is found, the split keeps groups apart, the numbers equal
the model-free pieces run by hand, and bad datasets are refused with the fix."""

from __future__ import annotations

import pytest
import torch

import mechscope
from mechscope.core.errors import InputError
from mechscope.data.labelled import Example, LabelledDataset
from mechscope.data.labelled_render import render
from mechscope.safety import collect_features, evaluate_probe, fit_probe, group_pairs, train_probe
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
    ds = planted()
    r = train_probe(wmodel, ds, sites="blocks.*.hook_resid_post", methods=("logistic", "diff_means", "lat"),
                    aggregation="last", control=control(), transfer=[planted(8, seed=5)], n_boot=200, n_random=20,
                    progress=False)
    assert set(r.info["train_groups"]).isdisjoint(r.info["test_groups"]) and r.info["paired"]
    assert r.info["n_train"] + r.info["n_test"] == len(ds)
    best = r.sweep.evaluations[r.sweep.best_site("logistic"), "logistic"]
    assert best.auroc.estimate > 0.95 and best.auroc.low <= best.auroc.estimate <= best.auroc.high
    assert abs(best.random_auroc_mean - 0.5) < 0.2 and best.shuffled_auroc is not None
    assert r.transfer["planted"][r.sweep.best_site("logistic"), "logistic"].auroc.estimate > 0.9
    # the same cell by hand: split, render, collect, fit, evaluate
    train, test = ds.split(0.5, 0)
    site = r.sweep.best_site("diff_means")
    f_tr = collect_features(wmodel, render(wmodel, train), site, aggregation="last", progress=False)
    f_te = collect_features(wmodel, render(wmodel, test), site, aggregation="last", progress=False)
    p = fit_probe(f_tr.vectors[site], train.labels, "diff_means", site=site)
    torch.testing.assert_close(p.direction, r.sweep.probes[site, "diff_means"].direction, atol=1e-5, rtol=1e-4)
    e = evaluate_probe(p, f_te.vectors[site], test.labels, n_boot=200, n_random=20)
    assert e.auroc.estimate == pytest.approx(r.sweep.evaluations[site, "diff_means"].auroc.estimate, abs=1e-9)
    assert r.to_dict()["sweep"]["best_site"]["logistic"] == r.sweep.best_site("logistic")


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
