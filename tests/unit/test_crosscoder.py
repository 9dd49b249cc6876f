"""Crosscoders and diff-SAEs for model diffing: the forward and loss against a naive implementation, recovery of
planted shared / tuned-only / base-only features with the right relative decoder norms, Latent Scaling telling
truly tuned-only latents from spurious ones, the file format, bad input, paired activations, and a diff-SAE
that finds a planted difference direction."""

from __future__ import annotations

import pytest
import torch

import mechscope
from mechscope.core.errors import InputError
from mechscope.dictionaries import (
    Crosscoder,
    CrosscoderConfig,
    classify_latents,
    decoder_cosines,
    latent_scaling,
    load_crosscoder,
    relative_norms,
    save_crosscoder,
    scaling_betas,
    stack_models,
)
from mechscope.dictionaries.crosscoder_analysis import (
    diff_sae_latents,
    model_specific_latents,
    top_contexts,
)
from mechscope.training import (
    CrosscoderTrainConfig,
    paired_activations,
    train_crosscoder,
    train_diff_sae,
)
from mechscope.training.crosscoder import crosscoder_loss
from tests.conftest import WRONG_TYPE, make_tiny, tiny_hooked


def make_cc(seed: int = 0, **overrides) -> Crosscoder:
    """A small crosscoder with random (not unit-norm) weights and biases, float64."""
    cfg = CrosscoderConfig(**{"d_in": 5, "d_sae": 7, "k": 2, "hook": "h", "dtype": "float64", **overrides})
    cc = Crosscoder(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (cc.W_enc, cc.b_enc, cc.W_dec, cc.b_dec):
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
        cc.b_enc.add_(1.0)  # most pre-activations positive: BatchTopK has more than k * rows candidates
        cc.threshold.fill_(0.7)
    return cc


# -- naive reference -----------------------------------------------------------------------------
def naive_forward(cc: Crosscoder, x: torch.Tensor, training: bool):
    """The formulas with explicit loops: pre, BatchTopK by sorting the flattened batch, per-model decoders."""
    B, M, D = x.shape
    S = cc.cfg.d_sae
    W_enc, b_enc, W_dec, b_dec = cc.W_enc, cc.b_enc, cc.W_dec, cc.b_dec
    pre = torch.stack([torch.stack([
        b_enc[s] + sum(x[b, m, d] * W_enc[m, d, s] for m in range(M) for d in range(D)) for s in range(S)])
        for b in range(B)])
    if training:
        flat = pre.relu().flatten()
        keep = sorted(range(flat.numel()), key=lambda i: -float(flat[i].detach()))[: cc.cfg.k * B]
        mask = torch.zeros(flat.numel(), dtype=torch.bool)
        mask[keep] = True
        acts = torch.where(mask.view(B, S), pre.relu(), torch.zeros_like(pre))
    else:
        acts = torch.where(pre > cc.threshold, pre, torch.zeros_like(pre))
    recons = torch.stack([torch.stack([
        b_dec[m] + sum(acts[b, s] * W_dec[m, s] for s in range(S)) for m in range(M)]) for b in range(B)])
    mse = torch.stack([sum(((x[b, m] - recons[b, m]) ** 2).sum() for b in range(B)) / B for m in range(M)])
    return pre, acts, recons, mse


def test_forward_loss_and_gradients_equal_the_naive_formulas():
    cc = make_cc().train()
    x = torch.randn(6, 2, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    mse, recons, pre, acts = crosscoder_loss(cc, x)
    pre_n, acts_n, recons_n, mse_n = naive_forward(cc, x, training=True)
    torch.testing.assert_close(pre, pre_n)
    torch.testing.assert_close(acts, acts_n)
    torch.testing.assert_close(recons, recons_n)
    torch.testing.assert_close(mse, mse_n)
    assert int((acts > 0).sum()) == cc.cfg.k * x.shape[0]  # BatchTopK: exactly k * rows active over the batch
    assert (acts > 0).sum(-1).tolist() != [cc.cfg.k] * x.shape[0]  # ... not k per row (this batch shows it)
    # gradients of the summed loss equal those of the naive formulas
    mse.sum().backward()
    grads = {n: p.grad.clone() for n, p in cc.named_parameters()}
    cc.zero_grad()
    naive_forward(cc, x, training=True)[3].sum().backward()
    for n, p in cc.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, msg=n)
    # eval mode: the inference threshold instead of the batch TopK; forward = decode(encode)
    cc.eval()
    _, acts_e, recons_e, _ = naive_forward(cc, x, training=False)
    with torch.no_grad():
        torch.testing.assert_close(cc.encode(x), acts_e)
        torch.testing.assert_close(cc(x), recons_e)


def test_decoder_norm_helpers_keep_the_split_between_models():
    cc = make_cc()
    r_before = relative_norms(cc)
    cc.normalize_decoder()
    joint = cc.W_dec.detach().pow(2).sum((0, 2)).sqrt()
    torch.testing.assert_close(joint, torch.ones_like(joint))
    torch.testing.assert_close(relative_norms(cc), r_before)
    n = cc.decoder_norms()
    torch.testing.assert_close(r_before, n[1] / (n[0] + n[1]))
    cos = decoder_cosines(cc)
    j = 3
    torch.testing.assert_close(cos[j], torch.dot(cc.W_dec[0, j], cc.W_dec[1, j]).detach() / (n[0, j] * n[1, j]))
    # the parallel gradient component of each latent's joint decoder vector is removed
    cc.W_dec.grad = torch.randn_like(cc.W_dec)
    cc.remove_parallel_decoder_grad()
    assert torch.allclose((cc.W_dec.grad * cc.W_dec).sum((0, 2)), torch.zeros(7, dtype=torch.float64), atol=1e-12)


def test_scaling_betas_are_the_least_squares_solution():
    g = torch.Generator().manual_seed(0)
    f = torch.rand(50, 3, generator=g, dtype=torch.float64) * (torch.rand(50, 3, generator=g) < 0.5)
    d = torch.randn(3, 4, generator=g, dtype=torch.float64)
    y = torch.randn(50, 4, generator=g, dtype=torch.float64)
    betas = scaling_betas(f, d, y)
    for k in range(3):  # argmin_b sum_i ||b f_k(x_i) d_k - y_i||^2 as a one-column least-squares problem
        A = (f[:, k, None] * d[k]).reshape(-1, 1)
        ref = torch.linalg.lstsq(A, y.reshape(-1, 1)).solution
        assert betas[k].item() == pytest.approx(ref.item(), rel=1e-10)
    y_per_latent = torch.randn(3, 50, 4, generator=g, dtype=torch.float64)
    per = scaling_betas(f, d, y_per_latent)
    for k in range(3):
        assert per[k].item() == pytest.approx(scaling_betas(f[:, k:k + 1], d[k:k + 1], y_per_latent[k]).item())
    assert torch.isnan(scaling_betas(torch.zeros(50, 1, dtype=torch.float64), d[:1], y)).all()  # never fires


def test_latent_scaling_targets_match_their_definitions():
    cc = make_cc(seed=3).eval()
    g = torch.Generator().manual_seed(4)
    base, tuned = (torch.randn(40, 5, generator=g, dtype=torch.float64) for _ in range(2))
    ls = latent_scaling(cc, base, tuned, [0, 4, 6], batch_rows=7)  # chunks of 7 rows sum like one batch
    with torch.no_grad():
        x = stack_models(base, tuned)
        f = cc.encode(x)
        recon = torch.einsum("ns,msd->nmd", f, cc.W_dec)  # no bias
        for i, j in enumerate([0, 4, 6]):
            d = cc.W_dec[1, j]
            for m, name in enumerate(("base", "tuned")):
                y_r = recon[:, m]
                y_e = x[:, m] - (recon[:, m] + cc.b_dec[m]) + f[:, j, None] * cc.W_dec[m, j]
                for kind, y in (("recon", y_r), ("error", y_e)):
                    want = scaling_betas(f[:, j:j + 1], d[None], y)[0]
                    assert ls.betas[f"{name}_{kind}"][i].item() == pytest.approx(want.item(), rel=1e-9), (name, kind)
    torch.testing.assert_close(ls.nu_r, ls.betas["base_recon"] / ls.betas["tuned_recon"])
    torch.testing.assert_close(ls.nu_eps, ls.betas["base_error"] / ls.betas["tuned_error"])
    assert [r["latent"] for r in ls.rows()] == [0, 4, 6]


# -- synthetic recovery --------------------------------------------------------------------------
D, N_SHARED, N_TUNED, N_BASE, N_SPUR, SPUR_STRENGTH = 24, 10, 4, 4, 2, 0.3
KINDS = ["shared"] * N_SHARED + ["tuned"] * N_TUNED + ["base"] * N_BASE + ["spurious"] * N_SPUR
W_BASE = torch.tensor([1.0] * N_SHARED + [0.0] * N_TUNED + [1.0] * N_BASE + [SPUR_STRENGTH] * N_SPUR)
W_TUNED = torch.tensor([1.0] * N_SHARED + [1.0] * N_TUNED + [0.0] * N_BASE + [1.0] * N_SPUR)


def planted(n: int = 20000, seed: int = 0):
    """Orthonormal feature directions; each active with probability 0.08 at a strength U(0.5, 1.5).

    Shared features appear in both models, tuned-only ones in the tuned model only, base-only ones in the base
    model only, and "spurious" ones in both but at 0.3 of the strength in the base model.
    """
    g = torch.Generator().manual_seed(seed)
    F = torch.linalg.qr(torch.randn(D, D, generator=g))[0].T[: len(KINDS)]
    c = (0.5 + torch.rand(n, len(KINDS), generator=g)) * (torch.rand(n, len(KINDS), generator=g) < 0.08)
    return (c * W_BASE) @ F, (c * W_TUNED) @ F, F


@pytest.fixture(scope="module")
def trained():
    base, tuned, F = planted()
    res = train_crosscoder((base, tuned), CrosscoderConfig(d_in=D, d_sae=32, k=2, hook="h"),
                           CrosscoderTrainConfig(n_steps=2500, batch_rows=256, lr=3e-3), progress=False)
    cc = res.crosscoder
    # match each planted feature to the latent whose joint decoder [d_base, d_tuned] is closest
    P = torch.cat([F * W_BASE[:, None], F * W_TUNED[:, None]], -1)
    W = torch.cat([cc.W_dec[0], cc.W_dec[1]], -1).detach()
    cos = (P / P.norm(dim=-1, keepdim=True)) @ (W / W.norm(dim=-1, keepdim=True)).T
    best, latent = cos.max(1)
    return res, base, tuned, best, latent


def test_crosscoder_recovers_planted_features_with_their_relative_norms(trained):
    res, base, tuned, best, latent = trained
    assert res.fvu["base"] < 0.05 and res.fvu["tuned"] < 0.05
    assert res.l0 == pytest.approx(1.6, abs=0.5)  # true L0: 20 features x 0.08
    assert res.history and res.history[-1]["step"] == 2500
    r = relative_norms(res.crosscoder)
    recovered = {kind: [i for i, k in enumerate(KINDS) if k == kind and best[i] > 0.9] for kind in set(KINDS)}
    assert len(recovered["tuned"]) == N_TUNED and len(recovered["spurious"]) == N_SPUR
    assert len(recovered["shared"]) >= N_SHARED - 2 and len(recovered["base"]) >= N_BASE - 1
    for i in recovered["tuned"]:
        assert r[latent[i]] > 0.9
    for i in recovered["shared"]:
        assert 0.3 <= r[latent[i]] <= 0.7
    for i in recovered["base"]:
        assert r[latent[i]] < 0.1
    for i in recovered["spurious"]:  # present in both, 0.3 as strong in the base: r about 1 / 1.3
        assert r[latent[i]] == pytest.approx(1 / (1 + SPUR_STRENGTH), abs=0.05)
    classes = classify_latents(res.crosscoder)
    assert set(latent[recovered["tuned"]].tolist()) <= set(classes.tuned_only.tolist())
    assert set(latent[recovered["base"]].tolist()) <= set(classes.base_only.tolist())
    assert set(latent[recovered["shared"]].tolist()) <= set(classes.shared.tolist())


def test_same_init_starts_every_latent_shared_and_keeps_short_runs_closer_to_trained_geometry():
    cfg = CrosscoderConfig(d_in=D, d_sae=32, k=2, hook="h")
    same, indep = Crosscoder(cfg).initialize(3), Crosscoder(cfg).initialize(3, same_init=False)
    torch.testing.assert_close(decoder_cosines(same), torch.ones(32))
    torch.testing.assert_close(relative_norms(same), torch.full((32,), 0.5))
    assert decoder_cosines(indep).abs().median() < 0.3  # independent draws in 24 dimensions
    torch.testing.assert_close(same.W_dec.pow(2).sum((0, 2)), torch.ones(32))  # joint unit norm either way
    torch.testing.assert_close(same.W_enc, same.W_dec.transpose(1, 2))
    # 300 steps: both reconstruct, but independently drawn decoders of latents the data barely reaches stay apart
    base, tuned, _ = planted()
    runs = {s: train_crosscoder((base, tuned), cfg, CrosscoderTrainConfig(n_steps=300, batch_rows=256, lr=3e-3,
                                                                          same_init=s), progress=False)
            for s in (True, False)}
    for res in runs.values():
        assert res.fvu["base"] < 0.05 and res.fvu["tuned"] < 0.05
    med = {s: float(decoder_cosines(r.crosscoder).median()) for s, r in runs.items()}
    assert med[True] > med[False] + 0.15, med


def test_latent_scaling_separates_truly_tuned_only_latents_from_spurious_ones(trained):
    res, base, tuned, best, latent = trained
    cc = res.crosscoder
    tuned_only = latent[[i for i, k in enumerate(KINDS) if k == "tuned"]]
    ls = latent_scaling(cc, base, tuned, tuned_only)
    assert ls.nu_eps.abs().max() < 0.05 and ls.nu_r.abs().max() < 0.05  # the base model has none of them
    assert (ls.n_active > 0).all()
    spur = latent[[i for i, k in enumerate(KINDS) if k == "spurious"]]
    ls = latent_scaling(cc, base, tuned, spur)
    assert torch.allclose(ls.nu_r, torch.full_like(ls.nu_r, SPUR_STRENGTH), atol=0.05)
    assert torch.allclose(ls.nu_eps, torch.full_like(ls.nu_eps, SPUR_STRENGTH), atol=0.05)
    # Complete Shrinkage (the L1 artefact of Minder et al. 2025): the base decoder of these latents shrunk to
    # zero makes them look tuned-only by their decoder norms; nu_eps still shows the base model has them.
    shrunk = Crosscoder(cc.cfg)
    shrunk.load_state_dict(cc.state_dict())
    shrunk.eval()
    with torch.no_grad():
        shrunk.W_dec[0, spur] = 0
    assert (relative_norms(shrunk)[spur] == 1).all()
    assert set(spur.tolist()) <= set(classify_latents(shrunk).tuned_only.tolist())
    ls = latent_scaling(shrunk, base, tuned, spur)
    assert torch.allclose(ls.nu_eps, torch.full_like(ls.nu_eps, SPUR_STRENGTH), atol=0.05)


def test_model_specific_latents_lists_the_tuned_only_latents_with_contexts(trained):
    res, base, tuned, best, latent = trained
    n = base.shape[0]
    paired = mechscope.training.PairedActivations("h", base, tuned, torch.arange(n) // 100, torch.arange(n) % 100,
                                                  [torch.arange(100) + 1000 * i for i in range(n // 100)])
    rows = model_specific_latents(res.crosscoder, paired, n_contexts=3)
    tuned_only = set(latent[[i for i, k in enumerate(KINDS) if k == "tuned"]].tolist())
    assert tuned_only <= {r["latent"] for r in rows}
    for r in rows:
        if r["latent"] in tuned_only:
            assert r["relative_norm"] > 0.9 and abs(r["nu_eps"]) < 0.05 and 0.06 < r["frequency"] < 0.3  # planted: 0.08
            assert len(r["contexts"]) == 3
            c = r["contexts"][0]
            assert c.activation == pytest.approx(r["max_activation"])
            assert c.token_ids[c.focus] == int(paired.tokens[c.doc][c.pos]) and "«" in c.text


def test_training_from_a_batch_callable_and_bad_sources():
    base, tuned, _ = planted(4096)
    stacked = stack_models(base, tuned)
    res = train_crosscoder(lambda step: stacked[(step * 256) % 4096:][:256], CrosscoderConfig(d_in=D, d_sae=32, k=2),
                           CrosscoderTrainConfig(n_steps=20, batch_rows=256), progress=False)
    assert set(res.fvu) == {"base", "tuned"} and len(res.history) == 2
    cfg, tcfg = CrosscoderConfig(d_in=D, d_sae=32, k=2), CrosscoderTrainConfig(n_steps=5, batch_rows=256)
    with pytest.raises(InputError, match="same tokens"):
        train_crosscoder((base, tuned[:100]), cfg, tcfg, progress=False)
    with pytest.raises(InputError, match="d_in"):
        train_crosscoder((base[:, :10], tuned[:, :10]), cfg, tcfg, progress=False)
    with pytest.raises(InputError, match="fewer than one batch"):
        train_crosscoder((base[:100], tuned[:100]), cfg, tcfg, progress=False)
    with pytest.raises(InputError, match="3 models"):
        train_crosscoder((base, tuned, tuned), cfg, tcfg, progress=False)


# -- configuration, files, errors ----------------------------------------------------------------
def test_save_load_round_trip_is_bit_exact(tmp_path):
    cc = make_cc(dtype="float32", models=("base", "chat"), metadata={"note": "x"})
    path = save_crosscoder(cc, tmp_path / "cc")
    assert sorted(p.name for p in path.iterdir()) == ["cfg.json", "crosscoder.safetensors"]
    back = load_crosscoder(path)
    assert back.cfg == cc.cfg and back.cfg.metadata == {"note": "x"} and not back.training
    for k, v in cc.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    x = torch.randn(9, 2, 5)
    cc.eval()
    assert torch.equal(back(x), cc(x))
    save_crosscoder(back, path)  # overwriting an existing crosscoder works (atomic replace)
    assert torch.equal(load_crosscoder(path).W_dec, cc.W_dec)


def test_bad_input_raises_input_error_with_a_fix(tmp_path):
    with pytest.raises(InputError, match="lower k or raise d_sae"):
        CrosscoderConfig(d_in=4, d_sae=8, k=9)
    with pytest.raises(InputError, match="positive int"):
        CrosscoderConfig(d_in=0, d_sae=8, k=1)
    with pytest.raises(InputError, match="distinct"):
        CrosscoderConfig(d_in=4, d_sae=8, k=1, models=("a", "a"))
    with pytest.raises(InputError, match="paired_activations"):
        stack_models(torch.zeros(3, 4), torch.zeros(3, 5))
    cc = make_cc()
    with pytest.raises(mechscope.ShapeError, match="stack_models"):
        cc(torch.zeros(3, 5))
    with pytest.raises(InputError, match="same tokens"):
        latent_scaling(cc, torch.zeros(3, 5), torch.zeros(4, 5), [0])
    with pytest.raises(InputError, match="0..6"):
        latent_scaling(cc, torch.zeros(3, 5), torch.zeros(3, 5), [7])
    with pytest.raises(InputError, match="not one of"):
        latent_scaling(cc, torch.zeros(3, 5), torch.zeros(3, 5), [0], owner="chat")
    with pytest.raises(InputError, match="interval"):
        classify_latents(cc, shared=(0.05, 0.5))
    with pytest.raises(InputError, match="no crosscoder"):
        load_crosscoder(tmp_path)
    with pytest.raises(WRONG_TYPE):
        CrosscoderTrainConfig(n_steps=0)
    path = save_crosscoder(cc, tmp_path / "cc")
    text = (path / "cfg.json").read_text().replace('"hook"', '"hook_name"')
    (path / "cfg.json").write_text(text)
    with pytest.raises(InputError, match="unknown keys"):
        load_crosscoder(path)
    with pytest.raises(InputError, match="load_dictionary"):
        CrosscoderConfig.from_dict({"architecture": "topk", "d_in": 4, "d_sae": 8, "k": 1})
    with pytest.raises(InputError, match="same tokens"):
        train_diff_sae(torch.zeros(10, 4), torch.zeros(11, 4), d_sae=8)


# -- paired activations --------------------------------------------------------------------------
def test_paired_activations_align_rows_and_ignore_padding():
    base = tiny_hooked("llama")
    hf = make_tiny("llama", seed=1)
    for p in hf.parameters():
        p.requires_grad_(False)
    tuned = mechscope.HookedModel(hf, name="tiny-llama-2")
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(3, 128, (n,), generator=g) for n in (7, 3, 10, 5)]
    site = "blocks.1.hook_resid_post"
    p = paired_activations(base, tuned, docs, site, batch_size=3, progress=False)
    assert len(p) == sum(len(d) for d in docs) and p.base.shape == p.tuned.shape == (25, 64)
    assert p.doc.tolist() == sum(([i] * len(d) for i, d in enumerate(docs)), [])
    assert p.pos.tolist() == sum((list(range(len(d))) for d in docs), [])
    for i, d in enumerate(docs):  # each row equals the unpadded forward of its own document
        rows = p.doc == i
        for model, acts in ((base, p.base), (tuned, p.tuned)):
            ref = model.run(d[None], cache=[site]).cache[site][0]
            torch.testing.assert_close(acts[rows], ref, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(p.base, p.tuned)
    same = paired_activations(base, base, docs, site, batch_size=2, skip_first=1, progress=False)
    assert len(same) == 25 - 4 and torch.equal(same.base, same.tuned) and same.pos.min() == 1
    assert same.stacked().shape == (21, 2, 64) and torch.equal(same.diff, torch.zeros(21, 64))
    with pytest.raises(InputError, match="no texts"):
        paired_activations(base, tuned, [], site, progress=False)
    with pytest.raises(InputError, match="layers 0..1"):
        paired_activations(base, tuned, docs, "blocks.9.hook_resid_post", progress=False)


# -- diff-SAE ------------------------------------------------------------------------------------
def test_diff_sae_recovers_a_planted_difference_direction(tmp_path):
    g = torch.Generator().manual_seed(5)
    n, d = 8192, 16
    Q = torch.linalg.qr(torch.randn(d, d, generator=g))[0].T
    shared = (torch.rand(n, 8, generator=g) * (torch.rand(n, 8, generator=g) < 0.3)) @ Q[:8]
    u, v = Q[8], Q[9]  # two planted differences: u on 10% of tokens, v (weaker) on 5%
    cu = (1 + torch.rand(n, generator=g)) * (torch.rand(n, generator=g) < 0.1)
    cv = 0.5 * (torch.rand(n, generator=g) < 0.05)
    base = shared + 0.01 * torch.randn(n, d, generator=g)
    tuned = shared + cu[:, None] * u + cv[:, None] * v + 0.01 * torch.randn(n, d, generator=g)
    sae = train_diff_sae(base, tuned, d_sae=4, k=1, n_steps=600, batch_rows=512, lr=3e-3, progress=False,
                         out_dir=tmp_path / "run")
    assert sae.cfg.metadata["input"] == "tuned - base" and (tmp_path / "run" / "diff_sae" / "cfg.json").is_file()
    W = sae.W_dec.detach() / sae.W_dec.detach().norm(dim=-1, keepdim=True)
    assert (W @ u).max() > 0.95 and (W @ v).max() > 0.9
    n_docs = n // 64
    paired = mechscope.training.PairedActivations("h", base, tuned, torch.arange(n) // 64, torch.arange(n) % 64,
                                                  [torch.arange(64)] * n_docs)
    rows = diff_sae_latents(sae, paired, top=3, n_contexts=2, sort_by="norm")
    # the u latent is among the two writing most of the difference (the other is -u: b_dec starts at the
    # mean difference, 0.15 u, which a latent then cancels on the 90% of rows without u)
    j_u = int((W @ u).argmax())
    top = next(r for r in rows[:2] if r["latent"] == j_u)
    assert len(top["contexts"]) == 2 and len(rows) == 3
    assert rows[1]["mean_contribution"] <= rows[0]["mean_contribution"]
    ctx = top["contexts"][0]
    assert cu[ctx.doc * 64 + ctx.pos] > 1.5  # the strongest context is a strong occurrence of u
    by_freq = diff_sae_latents(sae, paired, top=None)
    assert [r["frequency"] for r in by_freq] == sorted((r["frequency"] for r in by_freq), reverse=True)
    assert top_contexts(torch.zeros(n), paired) == []
