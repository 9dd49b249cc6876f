"""Patching metrics, activation patching and attribution patching on tiny random models.

Claims tested: the metrics score clean 1 / corrupt 0 and accept last-position-only logits; the
batch-stacked activation sweep equals a naive one-variant-per-forward loop for every kind; patching
the one corrupted position at layer 0 restores the clean run exactly; patching a last-layer branch
equals the value computed by hand through the final norm and unembedding; attribution patching
equals (clean - corrupt) . gradient computed independently with torch.autograd.grad, and tracks
activation patching.
"""

from __future__ import annotations

import functools

import pytest
import torch
import transformers
from jaxtyping import TypeCheckError

import mechscope
from mechscope import Patch
from mechscope.analysis import (
    PatchingResult,
    activation_patching,
    attribution_patching,
    logit_diff,
    make_metric,
)
from mechscope.analysis.patching import PATCH_KINDS, _pair
from mechscope.core.errors import InputError, ShapeError

V = 101


@functools.cache
def tiny(family: str, seed: int = 0, init: float = 0.3, dtype: torch.dtype = torch.float32) -> mechscope.HookedModel:
    """A seeded tiny HF model; ``init`` is the weight scale (0.3: far from linear, large effects)."""
    rot = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
               max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=init)
    specs = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(rot, num_key_value_heads=2)),
        "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM, dict(
            rot, num_key_value_heads=2, head_dim=8, final_logit_softcapping=5.0)),
        "gpt2": (transformers.GPT2Config, transformers.GPT2LMHeadModel, dict(
            vocab_size=V, n_embd=32, n_layer=3, n_head=4, n_inner=48, n_positions=64, initializer_range=init)),
        "gpt_neox": (transformers.GPTNeoXConfig, transformers.GPTNeoXForCausalLM, dict(rot, use_parallel_residual=True)),
    }
    config_cls, model_cls, kwargs = specs[family]
    torch.manual_seed(seed)
    hf = model_cls(config_cls(**kwargs)).eval().to(dtype)
    for p in hf.parameters():
        p.requires_grad_(False)
    return mechscope.HookedModel(hf, name=f"tiny-{family}")


def task(family: str, n: int = 3, pos: int = 7, diff_at: tuple[int, ...] = (2,), seed: int = 0, **model_kw):
    """(model, clean, corrupt, answers): corrupt differs from clean only at ``diff_at``; answers are the
    clean and corrupted arg-max next tokens, so the logit difference flips sign."""
    m = tiny(family, **model_kw)
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(3, V, (n, pos), generator=g)
    corrupt = clean.clone()
    for p in diff_at:
        corrupt[:, p] = (clean[:, p] + 1 + torch.randint(0, V - 4, (n,), generator=g)) % (V - 3) + 3
    cl, co = m.run(clean).logits[:, -1], m.run(corrupt).logits[:, -1]
    right = cl.argmax(-1)
    wrong = torch.where(co.argmax(-1) != right, co.argmax(-1), cl.topk(2).indices[:, 1])
    return m, clean, corrupt, torch.stack([right, wrong], 1)


def metric_for(m, clean, corrupt, answers, kind="logit_diff", position=-1):
    return make_metric(kind, m.run(clean).logits, m.run(corrupt).logits, answers, position=position)


# -- metrics -----------------------------------------------------------------------------------

def test_logit_diff_by_hand():
    logits = torch.randn(2, 4, 10)
    answers = torch.tensor([[1, 2], [3, 4]])
    got = logit_diff(logits, answers)
    torch.testing.assert_close(got, torch.stack([logits[0, -1, 1] - logits[0, -1, 2], logits[1, -1, 3] - logits[1, -1, 4]]))
    torch.testing.assert_close(logit_diff(logits, answers, position=1)[0], logits[0, 1, 1] - logits[0, 1, 2])
    torch.testing.assert_close(logit_diff(logits[:, -1:], answers), got)


@pytest.mark.parametrize("kind", ["logit_diff", "prob", "kl"])
def test_metric_values_and_truncated_logits(kind):
    m, clean, corrupt, answers = task("llama")
    cl, co = m.run(clean).logits, m.run(corrupt).logits
    met = make_metric(kind, cl, co, answers)
    assert met.name == kind
    torch.testing.assert_close(met(cl), torch.tensor(met.clean_value), atol=1e-6, rtol=0)
    torch.testing.assert_close(met(co), torch.tensor(met.corrupt_value), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(met(co[:, -1:]), met(co))  # logits_to_keep=1
    p_cl, p_co = torch.softmax(cl[:, -1], -1), torch.softmax(co[:, -1], -1)
    if kind == "prob":
        torch.testing.assert_close(met(co), p_co[torch.arange(3), answers[:, 0]].mean())
    if kind == "kl":
        assert met.clean_value == pytest.approx(0.0, abs=1e-6)
        want = (p_cl * (p_cl.log() - p_co.log())).sum(-1).mean()
        torch.testing.assert_close(met(co), want, atol=1e-5, rtol=1e-4)
    if kind == "logit_diff":
        half = 0.5 * (cl + co)
        raw = logit_diff(half, answers).mean()
        want = (raw - met.raw_corrupt) / (met.raw_clean - met.raw_corrupt)
        torch.testing.assert_close(met(half), want)
    x = co.clone().requires_grad_(True)
    met(x).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_metric_errors():
    logits = torch.randn(2, 4, 10)
    answers = torch.tensor([[1, 2], [3, 4]])
    with pytest.raises(InputError, match="kind"):
        make_metric("accuracy", logits, logits, answers)
    with pytest.raises(InputError, match="same"):
        make_metric("logit_diff", logits, logits, answers)
    with pytest.raises((ShapeError, TypeCheckError)):  # the jaxtyping test hook may catch it first
        make_metric("prob", logits, logits[:, :3], answers)
    met = make_metric("prob", logits, logits + 1, answers, position=1)
    assert met.position == -3
    with pytest.raises(InputError, match="logits_to_keep"):
        met(logits[:, -1:])
    with pytest.raises(ShapeError, match="prompts"):
        met(torch.randn(3, 4, 10))


# -- activation patching -------------------------------------------------------------------------

def naive(m, clean, corrupt, metric, kind):
    """One forward per patched variant, full logits."""
    template = PATCH_KINDS[kind]
    n_pos = clean.shape[1]
    _, cache = m.run(clean, cache=[template.format(L=L) for L in range(m.cfg.n_layers)])
    cols = {"resid_pre": n_pos, "heads": m.cfg.n_heads}.get(kind)
    out = torch.zeros(m.cfg.n_layers, cols or 1)
    for L in range(m.cfg.n_layers):
        site = template.format(L=L)
        for c in range(cols or 1):
            sel = {"resid_pre": dict(positions=c), "heads": dict(heads=c)}.get(kind, {})
            logits = m.run(corrupt, interventions=[Patch(site, source=cache, **sel)]).logits
            out[L, c] = metric(logits)
    return out if cols else out[:, 0]


@pytest.mark.parametrize("family", ["llama", "gpt_neox", "gemma2", "gpt2"])
@pytest.mark.parametrize("kind", list(PATCH_KINDS))
def test_stacked_sweep_equals_one_forward_per_variant(family, kind):
    m, clean, corrupt, answers = task(family)
    met = metric_for(m, clean, corrupt, answers)
    res = activation_patching(m, clean, corrupt, met, kind=kind, batch_size=4, progress=False)
    want = naive(m, clean, corrupt, met, kind)
    assert isinstance(res, PatchingResult) and res.method == "activation" and res.kind == kind
    assert res.values.shape == want.shape and res.values.dtype == torch.float32
    torch.testing.assert_close(res.values, want, atol=1e-4, rtol=1e-4)
    assert res.values.abs().amax() > 1e-2  # the sweep found some effect
    assert res.row_labels == [f"L{L}" for L in range(m.cfg.n_layers)]
    if kind == "heads":
        assert res.col_labels == [f"H{h}" for h in range(m.cfg.n_heads)]
    elif kind == "resid_pre":
        assert len(res.col_labels) == clean.shape[1] and len(set(res.col_labels)) == clean.shape[1]
    else:
        assert res.col_labels is None


@pytest.mark.parametrize("diff_at", [(0,), (1, 4), (6,)])
@pytest.mark.parametrize("kind", ["resid_pre", "heads"])
def test_stacked_sweep_with_other_corrupted_positions(kind, diff_at):
    """No shared prefix (position 0 corrupted), two corrupted positions, and only the last one."""
    m, clean, corrupt, answers = task("llama", diff_at=diff_at)
    met = metric_for(m, clean, corrupt, answers)
    res = activation_patching(m, clean, corrupt, met, kind=kind, batch_size=3, progress=False)
    torch.testing.assert_close(res.values, naive(m, clean, corrupt, met, kind), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["kl", "prob"])
def test_stacked_sweep_with_a_metric_at_an_inner_position(kind):
    m, clean, corrupt, answers = task("llama")
    met = metric_for(m, clean, corrupt, answers, kind=kind, position=4)
    res = activation_patching(m, clean, corrupt, met, kind="resid_pre", batch_size=5, progress=False)
    torch.testing.assert_close(res.values, naive(m, clean, corrupt, met, "resid_pre"), atol=1e-5, rtol=1e-4)
    # positions after the scored one cannot change it, although their residuals differ from layer 1 on
    after = res.values[:, 5:]
    torch.testing.assert_close(after, torch.full_like(after, met.corrupt_value), atol=1e-5, rtol=1e-5)


def test_resid_pre_at_layer_0_restores_the_clean_run():
    m, clean, corrupt, answers = task("llama", diff_at=(2,))
    met = metric_for(m, clean, corrupt, answers)
    full = m.run(corrupt, interventions=[Patch("blocks.0.hook_resid_pre", source=m.run(clean, cache=["blocks.0.hook_resid_pre"]).cache)])
    assert float(met(full.logits)) == pytest.approx(1.0, abs=1e-6)
    res = activation_patching(m, clean, corrupt, met, kind="resid_pre", progress=False)
    row = res.values[0]
    assert row[2] == pytest.approx(1.0, abs=1e-5)  # the one corrupted position: clean restored
    others = torch.cat([row[:2], row[3:]])
    torch.testing.assert_close(others, torch.zeros_like(others), atol=1e-5, rtol=0)  # identical tokens: nothing


@pytest.mark.parametrize("family,kind", [("llama", "mlp_out"), ("gpt_neox", "attn_out"), ("gpt_neox", "mlp_out")])
def test_last_layer_branch_patch_by_hand(family, kind):
    """A last-layer branch feeds only the final norm (GPT-NeoX: attention and MLP in parallel), so
    patching it is final_norm(resid_post - corrupt_branch + clean_branch) through lm_head."""
    m, clean, corrupt, answers = task(family)
    met = metric_for(m, clean, corrupt, answers)
    L = m.cfg.n_layers - 1
    site = f"blocks.{L}.hook_{kind}"
    res = activation_patching(m, clean, corrupt, met, kind=kind, progress=False)
    _, c_cl = m.run(clean, cache=[site])
    _, c_co = m.run(corrupt, cache=[site, f"blocks.{L}.hook_resid_post"])
    resid = c_co[f"blocks.{L}.hook_resid_post"] - c_co[site] + c_cl[site]
    logits = m.module(m.adapter.unembed)(m.module(m.adapter.final_norm)(resid))
    assert float(res.values[L]) == pytest.approx(float(met(logits)), abs=1e-4)


def test_sums_sanity_across_kinds():
    """attn_out of a layer is the sum of its heads (+ b_O): patching all heads of a layer at once equals
    patching attn_out there; every single-head effect is finite."""
    m, clean, corrupt, answers = task("llama")
    met = metric_for(m, clean, corrupt, answers)
    attn = activation_patching(m, clean, corrupt, met, kind="attn_out", progress=False)
    heads = activation_patching(m, clean, corrupt, met, kind="heads", progress=False)
    assert torch.isfinite(heads.values).all()
    _, cache = m.run(clean, cache=["blocks.*.attn.hook_z"])
    for L in range(m.cfg.n_layers):
        all_heads = m.run(corrupt, interventions=[Patch(f"blocks.{L}.attn.hook_z", source=cache)]).logits
        assert float(met(all_heads)) == pytest.approx(float(attn.values[L]), abs=1e-4)


def test_patching_rejects_prompts_of_different_length():
    m, clean, corrupt, answers = task("llama")
    met = metric_for(m, clean, corrupt, answers)
    with pytest.raises(ShapeError, match="equal token length"):
        _pair(m, clean, corrupt[:, :-1])
    for fn in (activation_patching, attribution_patching):
        with pytest.raises((ShapeError, TypeCheckError)):  # the jaxtyping test hook may catch it first
            fn(m, clean, corrupt[:, :-1], met, kind="heads")
        with pytest.raises(InputError, match="kind"):
            fn(m, clean, corrupt, met, kind="resid_post")


# -- attribution patching ------------------------------------------------------------------------

def autograd_attribution(m, clean, corrupt, metric, kind):
    """(clean - corrupt) . d metric / d act, with the gradient from torch.autograd.grad on zero offsets
    added at each site (independent of the cache's gradient recording)."""
    template = PATCH_KINDS[kind]
    sites = [template.format(L=L) for L in range(m.cfg.n_layers)]
    _, c_cl = m.run(clean, cache=sites)
    _, c_co = m.run(corrupt, cache=sites)
    eps = {s: torch.zeros_like(c_co[s], requires_grad=True) for s in sites}
    with torch.enable_grad(), m.hooks(functions={s: (lambda v, s=s: v + eps[s]) for s in sites}):
        value = metric(m.hf(corrupt).logits)
        grads = torch.autograd.grad(value, [eps[s] for s in sites])
    reduce = {"resid_pre": (0, 2), "heads": (0, 1, 3)}.get(kind, (0, 1, 2))
    return torch.stack([((c_cl[s] - c_co[s]) * g).sum(reduce) for s, g in zip(sites, grads)])


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
@pytest.mark.parametrize("kind", list(PATCH_KINDS))
def test_attribution_equals_gradient_times_difference(family, kind):
    m, clean, corrupt, answers = task(family)
    met = metric_for(m, clean, corrupt, answers)
    res = attribution_patching(m, clean, corrupt, met, kind=kind)
    want = autograd_attribution(m, clean, corrupt, met, kind)
    assert res.method == "attribution" and res.values.shape == want.shape
    torch.testing.assert_close(res.values, want, atol=1e-5, rtol=1e-4)
    assert res.values.abs().amax() > 1e-3


def pearson(a, b):
    a, b = a.flatten().double(), b.flatten().double()
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


@pytest.mark.parametrize("kind", list(PATCH_KINDS))
def test_attribution_is_the_derivative_of_activation_patching(kind):
    """Patching a fraction t of the way from the corrupt to the clean activation changes the metric by
    t * attribution + O(t^2): the central difference at small t converges to the attribution."""
    m, clean, corrupt, answers = task("llama", dtype=torch.float64)
    met = metric_for(m, clean, corrupt, answers)
    att = attribution_patching(m, clean, corrupt, met, kind=kind).values
    template = PATCH_KINDS[kind]
    sites = [template.format(L=L) for L in range(m.cfg.n_layers)]
    _, c_cl = m.run(clean, cache=sites)
    _, c_co = m.run(corrupt, cache=sites)
    t = 3e-3  # small enough for O(t^2) ~ 1e-5, large enough for float32 norms inside Llama (~1e-7 noise)
    cols = {"resid_pre": clean.shape[1], "heads": m.cfg.n_heads}.get(kind)
    fd = torch.zeros_like(att)
    for L, site in enumerate(sites):
        for c in range(cols or 1):
            sel = {"resid_pre": dict(positions=c), "heads": dict(heads=c)}.get(kind, {})
            value = []
            for step in (t, -t):
                src = c_co[site] + step * (c_cl[site] - c_co[site])
                value.append(float(met(m.run(corrupt, interventions=[Patch(site, source=src, **sel)]).logits)))
            fd[(L, c) if cols else L] = (value[0] - value[1]) / (2 * t)
    assert att.abs().max() > 1e-2
    torch.testing.assert_close(fd, att, atol=1e-3 * att.abs().max().item(), rtol=1e-2)


@pytest.mark.parametrize("kind", list(PATCH_KINDS))
def test_attribution_tracks_activation_patching_in_a_near_linear_model(kind):
    """With small weights (init 0.05) the network is close to linear, so whole-patch effects are close
    to their linear estimates (with init 0.3 they are not: attribution patching is a local method)."""
    m, clean, corrupt, answers = task("llama", n=4, init=0.05)
    met = metric_for(m, clean, corrupt, answers)
    act = activation_patching(m, clean, corrupt, met, kind=kind, progress=False).values
    att = attribution_patching(m, clean, corrupt, met, kind=kind).values
    assert pearson(act, att) > 0.9
