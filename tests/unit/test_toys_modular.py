"""Modular addition (Nanda et al. 2023) at small settings: the model is a hooked transformers GPT-2 without
LayerNorm or biases; a short run generalises and its embedding's Fourier spectrum is sparse; the Fourier
analyses equal hand computations on functions whose spectrum is known; reruns are identical."""

from __future__ import annotations

import math

import pytest
import torch

import mechscope
from mechscope.toys.modular import (
    ModularConfig, build_model, dataset, excluded_and_restricted_logits, fourier_basis, key_frequencies,
    neuron_frequency_shares, run_modular, train,
)

torch.set_num_threads(1)
SMALL = ModularConfig(p=31, train_fraction=0.7, d_model=64, d_mlp=128, lr=1e-2, epochs=400, checkpoint_every=100)


@pytest.fixture(scope="module")
def small_run():
    return run_modular(SMALL, progress=False)


def test_a_small_run_generalises_and_its_embedding_spectrum_is_sparse(small_run):
    m = small_run["metrics"]
    assert m["final_train_acc"] == 1.0 and m["final_test_acc"] > 0.95, m["history"]["test_acc"]
    freqs = m["key_frequencies"]
    assert 1 <= len(freqs) <= 6  # a few of the 15 frequencies
    assert m["embedding_power_in_key_freqs"] > 0.6  # sparse: most of the embedding in those few
    assert set(m["embedding_top_freqs"]) == set(freqs)
    # ablating everything but the key frequencies keeps the answer
    assert m["key_frequency_ablation"]["accuracy"] > 0.95 and m["restricted"]["accuracy"] > 0.95
    # the circuit's measures move as it forms: excluded loss rises above the train loss it started at
    pm = m["progress_measures"]
    assert pm["excluded_loss"][-1] > 10 * m["history"]["train_loss"][-1]


def test_result_renders_with_the_papers_numbers(small_run, tmp_path):
    from mechscope.report.toys import write_toy_report

    html, js = write_toy_report(small_run, tmp_path)
    page = html.read_text()
    assert "[14, 35, 41, 42, 52]" in page and "Modular addition and grokking" in page
    assert {f["id"] for f in small_run["figures"]} >= {"losses", "accuracy", "embedding", "neurons", "neuron"}
    assert small_run["seed"] == 0 and small_run["settings"]["p"] == 31


def test_reruns_are_identical():
    cfg = ModularConfig(p=13, train_fraction=0.6, d_model=32, d_mlp=64, n_heads=2, epochs=30, checkpoint_every=10)
    (_, h1, c1), (_, h2, c2) = train(cfg, progress=False), train(cfg, progress=False)
    assert h1 == h2 and all(torch.equal(a[k], b[k]) for a, b in zip(c1, c2) for k in a)


def test_model_is_a_hooked_gpt2_without_norms_or_biases():
    cfg = ModularConfig(p=13, d_model=32, d_mlp=64, n_heads=2)
    model = build_model(cfg)
    tokens, labels, tr, te = dataset(13, 0.3, 0)
    assert tokens.shape == (169, 3) and (tokens[:, 2] == 13).all() and torch.equal(labels, (tokens[:, 0] + tokens[:, 1]) % 13)
    assert len(tr) == round(0.3 * 169) and set(tr.tolist()).isdisjoint(te.tolist())
    assert all(float(p.abs().max()) == 0 and not p.requires_grad for n, p in model.hf.named_parameters() if "bias" in n)
    plain = model.hf(tokens[:5]).logits
    hooked, cache = model.run(tokens[:5], cache=["hook_embed", "blocks.0.hook_resid_pre", "blocks.0.mlp.hook_post"])
    assert torch.equal(plain, hooked)
    w_e, w_p = model.hf.transformer.wte.weight, model.hf.transformer.wpe.weight
    torch.testing.assert_close(cache["blocks.0.hook_resid_pre"], w_e[tokens[:5]] + w_p[:3])  # no norm anywhere
    assert (cache["blocks.0.mlp.hook_post"] >= 0).all()  # ReLU


def test_fourier_basis_is_orthonormal_and_shares_find_a_planted_frequency():
    p, k = 17, 5
    fb = fourier_basis(p)
    torch.testing.assert_close(fb @ fb.T, torch.eye(p), atol=1e-5, rtol=0)
    a = torch.arange(p, dtype=torch.float32)
    grid = torch.cos(2 * math.pi * k * (a[:, None] + a[None, :]) / p)  # cos(k(a+b)): quadratic terms of k
    acts = torch.stack([grid.reshape(-1), torch.sin(2 * math.pi * 3 * a[:, None] / p).expand(p, p).reshape(-1)], 1)
    shares = neuron_frequency_shares(acts, p)
    assert shares[0, k - 1] == pytest.approx(1, abs=1e-4) and shares[1, 2] == pytest.approx(1, abs=1e-4)
    assert shares.sum(1).tolist() == pytest.approx([1, 1], abs=1e-4)  # frequencies split the variance
    assert key_frequencies(shares, 0.85, 1) == [3, 5] and key_frequencies(shares, 0.85, 2) == []


def test_excluded_and_restricted_logits_split_a_known_function():
    p, w = 13, 4
    a = torch.arange(p, dtype=torch.float32)
    s = (a[:, None] + a[None, :]).reshape(-1, 1)
    c = a[None, :]
    key = torch.cos(2 * math.pi * w * (s - c) / p)  # the paper's logit form: cos(w(a+b-c))
    other = 0.5 * torch.cos(2 * math.pi * 2 * (s - c) / p)
    logits = 3.0 + key + other
    excl, restr = excluded_and_restricted_logits(logits, p, [w])
    torch.testing.assert_close(restr, 3.0 + key + other.mean(0, keepdim=True), atol=1e-5, rtol=0)
    torch.testing.assert_close(excl, 3.0 + other, atol=1e-5, rtol=0)


@pytest.mark.parametrize("bad, match", [(dict(p=12), "prime"), (dict(train_fraction=1.0), "train_fraction"),
                                        (dict(d_model=30, n_heads=4), "multiple"), (dict(epochs=0), "epochs")])
def test_bad_config_is_refused(bad, match):
    with pytest.raises(mechscope.InputError, match=match):
        run_modular(ModularConfig(**bad), progress=False)
