"""Sparse dictionaries against independent naive implementations (float64), and their files and splices.

The naive reference below is written from the papers' definitions with explicit formulas and Python
loops over rows; it calls nothing of mechscope's. JumpReLU's straight-through gradients to the threshold
are written out by hand (Rajamanoharan et al. 2024, eqs. 11-12):

    d JumpReLU / d theta = -(theta / eps) * rect((pre - theta) / eps)
    d H(pre - theta) / d theta = -(1 / eps) * rect((pre - theta) / eps)
"""

from __future__ import annotations

import errno
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mechscope
from mechscope.core.errors import CorruptFileError, DiskFullError, InputError
from mechscope.dictionaries import DictionaryConfig, SparseDictionary, Splice, load_dictionary, save_dictionary
from mechscope.training.losses import compute_loss
from tests.conftest import random_tokens, tiny_hooked

torch.set_num_threads(1)

SAE_HOOK = "blocks.0.hook_resid_post"
TC_IN, TC_OUT = "blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out"
EPS = 0.3  # a wide STE kernel so that many pre-activations fall inside it


def make_dict(arch: str, *, transcoder: bool = False, skip: bool = False, d_in: int = 6, d_sae: int = 12,
              d_out: int | None = None, k: int = 3, seed: int = 0, dtype: str = "float64",
              apply_b_dec_to_input: bool = True, **cfg_overrides) -> SparseDictionary:
    """A dictionary with random weights (every parameter non-zero) and thresholds in [0.05, 0.6]."""
    cfg = DictionaryConfig(
        architecture=arch, d_in=d_in, d_sae=d_sae, hook_in=TC_IN if transcoder else SAE_HOOK,
        hook_out=TC_OUT if transcoder else None, d_out=d_out if transcoder else None,
        k=k if arch in ("topk", "batchtopk") else None, skip=skip, apply_b_dec_to_input=apply_b_dec_to_input,
        jumprelu_bandwidth=EPS, dtype=dtype, **cfg_overrides)
    d = SparseDictionary(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in d.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * (0.5 if name.startswith("W") else 0.2))
        if d.threshold is not None:
            d.threshold.copy_(0.05 + 0.55 * torch.rand(d_sae, generator=g, dtype=torch.float64))
    return d


# -- the naive reference ---------------------------------------------------------------------------
def naive_topk_mask(pre: torch.Tensor, k: int) -> torch.Tensor:
    """1 at the k largest entries of each row (Python sort), 0 elsewhere."""
    mask = torch.zeros_like(pre)
    for r in range(pre.shape[0]):
        order = sorted(range(pre.shape[1]), key=lambda j: -float(pre[r, j]))
        for j in order[:k]:
            mask[r, j] = 1.0
    return mask


def naive_batchtopk_mask(pre: torch.Tensor, k: int) -> torch.Tensor:
    """1 at the k * rows largest ReLU'd entries of the whole batch."""
    rows, cols = pre.shape
    flat = [(max(float(pre[r, j]), 0.0), r, j) for r in range(rows) for j in range(cols)]
    flat.sort(key=lambda t: -t[0])
    mask = torch.zeros_like(pre)
    for _, r, j in flat[: k * rows]:
        mask[r, j] = 1.0
    return mask


def rect(u: torch.Tensor) -> torch.Tensor:
    return ((u > -0.5) & (u < 0.5)).double()


def naive(d: SparseDictionary, x: torch.Tensor, y: torch.Tensor, *, mode: str, l1: float = 0.0, l0: float = 0.0,
          aux_coef: float = 0.0, dead: torch.Tensor | None = None):
    """Naive forward, loss terms and gradients of every parameter (dict), from detached copies of the weights.

    ``mode`` is the activation: relu | topk | batchtopk-train | threshold (batchtopk at inference) | jumprelu.
    """
    c = d.cfg
    P = {n: p.detach().clone().requires_grad_(True) for n, p in d.named_parameters()}
    theta = d.threshold.detach().clone() if d.threshold is not None else None
    B = x.shape[0]
    xin = x - P["b_dec"] if (c.hook_in == c.hook_out and c.apply_b_dec_to_input) else x
    pre = torch.einsum("bi,is->bs", xin, P["W_enc"]) + P["b_enc"]
    if mode == "relu":
        mask = (pre > 0).double()
    elif mode == "topk":
        mask = naive_topk_mask(pre.detach(), c.k) * (pre > 0).double()
    elif mode == "batchtopk-train":
        mask = naive_batchtopk_mask(pre.detach(), c.k)
    else:  # threshold, jumprelu
        mask = (pre > theta).double()
    acts = pre * mask.detach()
    acts.retain_grad()
    recons = torch.einsum("bs,so->bo", acts, P["W_dec"]) + P["b_dec"]
    if "W_skip" in P:
        recons = recons + torch.einsum("bi,io->bo", x, P["W_skip"])
    terms = {"mse": ((recons - y) ** 2).sum() / B}
    if mode == "relu":
        norms = torch.sqrt((P["W_dec"] ** 2).sum(1))
        terms["l1"] = l1 * sum(acts[b, j] * norms[j] for b in range(B) for j in range(c.d_sae)) / B
    if mode == "jumprelu":
        terms["l0"] = l0 * mask.sum() / B  # no gradient but through the STE (added below)
    if c.architecture in ("topk", "batchtopk") and dead is not None:
        e = (y - recons).detach()
        n_dead = int(dead.sum())
        k_aux = c.d_out // 2
        scale = min(n_dead / k_aux, 1.0)
        total = 0.0
        for b in range(B):
            dead_ids = sorted((j for j in range(c.d_sae) if dead[j]), key=lambda j: -float(pre.detach()[b, j]))
            e_hat = sum(pre[b, j] * P["W_dec"][j] for j in dead_ids[: min(k_aux, n_dead)])
            total = total + ((e_hat - e[b]) ** 2).sum()
        terms["aux"] = aux_coef * scale * total / B
    total = sum(terms.values())
    total.backward()
    grads = {n: p.grad for n, p in P.items() if p.grad is not None}
    if mode == "jumprelu":  # the straight-through estimators, by hand
        u = rect((pre.detach() - theta) / EPS)
        g_jump = (-(theta / EPS) * u * acts.grad).sum(0)
        g_l0 = (l0 / B) * (-(1.0 / EPS) * u).sum(0)
        grads["threshold"] = g_jump + g_l0
    return dict(pre=pre.detach(), acts=acts.detach(), recons=recons.detach(),
                terms={k: v.detach() for k, v in terms.items()}, grads=grads)


CASES = {  # id -> (architecture, mode, transcoder, skip, extra cfg)
    "relu": ("relu", "relu", False, False, {}),
    "relu-no-b_dec-sub": ("relu", "relu", False, False, {"apply_b_dec_to_input": False}),
    "topk": ("topk", "topk", False, False, {}),
    "batchtopk-train": ("batchtopk", "batchtopk-train", False, False, {}),
    "batchtopk-threshold": ("batchtopk", "threshold", False, False, {}),
    "jumprelu": ("jumprelu", "jumprelu", False, False, {}),
    "relu-transcoder": ("relu", "relu", True, False, {"d_out": 5}),
    "jumprelu-skip-transcoder": ("jumprelu", "jumprelu", True, True, {"d_out": 5}),
    "topk-skip-transcoder": ("topk", "topk", True, True, {"d_out": 4}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_forward_loss_and_gradients_equal_naive(case):
    arch, mode, transcoder, skip, extra = CASES[case]
    d = make_dict(arch, transcoder=transcoder, skip=skip, seed=1, **extra)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(7, d.cfg.d_in, generator=g, dtype=torch.float64)
    y = torch.randn(7, d.cfg.d_out, generator=g, dtype=torch.float64) if transcoder else x
    d.train()
    if mode == "threshold":
        d.batchtopk_use_threshold = True
    dead = torch.zeros(d.cfg.d_sae, dtype=torch.bool)
    dead[[0, 3, 4, 7, 9]] = True
    kw = dict(l1=0.7, l0=0.4, aux_coef=0.5, dead=dead)
    ref = naive(d, x, y, mode=mode, **kw)

    out = compute_loss(d, x, None if not transcoder else y, l1_coefficient=0.7, l0_coefficient=0.4,
                       aux_coefficient=0.5, dead=dead)
    out.total.backward()
    torch.testing.assert_close(out.pre, ref["pre"])
    torch.testing.assert_close(out.acts, ref["acts"])
    torch.testing.assert_close(out.recons, ref["recons"])
    torch.testing.assert_close(d(x), ref["recons"])  # the plain forward gives the same reconstruction
    assert set(out.terms) == set(ref["terms"]), (out.terms.keys(), ref["terms"].keys())
    for name, v in ref["terms"].items():
        torch.testing.assert_close(out.terms[name], v, msg=lambda m, name=name: f"loss term {name}: {m}")
    expected_grads = dict(ref["grads"])
    for name, p in d.named_parameters():
        want = expected_grads.pop(name, torch.zeros_like(p))
        got = p.grad if p.grad is not None else torch.zeros_like(p)
        torch.testing.assert_close(got, want, msg=lambda m, name=name: f"gradient of {name}: {m}")
    assert not expected_grads
    if mode == "jumprelu":  # the STE must actually have been exercised
        assert d.threshold.grad.abs().sum() > 0
        assert ((ref["pre"] - d.threshold.detach()).abs() < EPS / 2).any()


@pytest.mark.parametrize("dead_ids", [[], [2], [0, 1, 2, 4, 5, 6, 8, 9, 10]])
def test_aux_loss_equals_naive(dead_ids):
    """AuxK: no dead latents -> no loss; few -> scaled by n_dead / k_aux; many -> top k_aux of the dead."""
    d = make_dict("topk", seed=3)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(5, 6, generator=g, dtype=torch.float64)
    dead = torch.zeros(12, dtype=torch.bool)
    dead[dead_ids] = True
    ref = naive(d, x, x, mode="topk", aux_coef=1.0, dead=dead)
    out = compute_loss(d, x, aux_coefficient=1.0, dead=dead)
    aux = out.terms.get("aux", torch.zeros((), dtype=torch.float64))
    torch.testing.assert_close(aux, ref["terms"]["aux"])
    if not dead_ids:
        assert float(aux.detach()) == 0.0
    else:
        assert float(aux.detach()) > 0.0


def test_jumprelu_threshold_gradient_is_the_hand_written_ste():
    """One latent, one token, inside and outside the kernel: the exact numbers of eqs. 11-12."""
    d = make_dict("jumprelu", d_in=1, d_sae=1)
    with torch.no_grad():
        d.W_enc.fill_(1.0), d.b_enc.zero_(), d.b_dec.zero_(), d.W_dec.fill_(1.0), d.threshold.fill_(0.5)
    for pre, inside in ((0.6, True), (0.9, False), (0.4, True)):
        d.zero_grad()
        x = torch.tensor([[pre]], dtype=torch.float64)
        out = compute_loss(d, x, torch.zeros(1, 1, dtype=torch.float64), l0_coefficient=2.0)
        out.total.backward()
        a = pre if pre > 0.5 else 0.0
        grad_out = 2 * a  # d/d acts of (acts * W_dec - 0)^2
        want = (-(0.5 / EPS) * grad_out - 2.0 / EPS) if inside else 0.0
        assert d.threshold.grad.item() == pytest.approx(want, rel=1e-12, abs=1e-12)


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 4), d_sae=st.integers(1, 9), k=st.integers(1, 9), seed=st.integers(0, 10_000),
       shift=st.floats(-2.0, 2.0))
def test_topk_property(rows, d_sae, k, seed, shift):
    """Exactly min(k, #positive) non-zeros per row, and they sit at the largest pre-activations."""
    k = min(k, d_sae)
    d = make_dict("topk", d_in=3, d_sae=d_sae, k=k, seed=seed)
    pre = torch.randn(rows, d_sae, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + shift
    acts = d.activate(pre)
    for r in range(rows):
        n_pos = int((pre[r] > 0).sum())
        nz = (acts[r] != 0).nonzero().flatten().tolist()
        assert len(nz) == min(k, n_pos)
        if nz:
            assert min(float(pre[r, j]) for j in nz) >= max(
                [float(pre[r, j]) for j in range(d_sae) if j not in nz and pre[r, j] > 0], default=-1e9)
            torch.testing.assert_close(acts[r, nz], pre[r, nz])
        assert (acts[r] >= 0).all()


# -- fold_scaling ------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["relu", "topk", "batchtopk-threshold", "jumprelu", "jumprelu-skip-transcoder"])
def test_fold_scaling_is_invariant(case):
    arch, mode, transcoder, skip, extra = CASES[case]
    d = make_dict(arch, transcoder=transcoder, skip=skip, seed=5, **extra).eval()
    x = torch.randn(6, d.cfg.d_in, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    s_in, s_out = 2.5, (0.3 if transcoder else 2.5)
    with torch.no_grad():
        want_acts = d.encode(x * s_in)
        want = d(x * s_in) / s_out
        folded = make_dict(arch, transcoder=transcoder, skip=skip, seed=5, **extra).eval().fold_scaling(s_in, s_out)
        torch.testing.assert_close(folded.encode(x), want_acts)
        torch.testing.assert_close(folded(x), want)


# -- files -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["relu", "topk", "batchtopk-threshold", "jumprelu", "jumprelu-skip-transcoder"])
def test_save_load_round_trip_is_bitwise(tmp_path, case):
    arch, _, transcoder, skip, extra = CASES[case]
    d = make_dict(arch, transcoder=transcoder, skip=skip, dtype="float32", **extra)
    d.cfg.metadata["note"] = "x"
    save_dictionary(d, tmp_path / "dict")
    e = load_dictionary(tmp_path / "dict")
    assert e.cfg == d.cfg and e.cfg.to_dict() == d.cfg.to_dict()
    for (n1, t1), (n2, t2) in zip(sorted(d.state_dict().items()), sorted(e.state_dict().items()), strict=True):
        assert n1 == n2 and t1.dtype == t2.dtype and torch.equal(t1, t2), n1


def test_truncated_weights_raise_corrupt_file_error(tmp_path):
    save_dictionary(make_dict("relu"), tmp_path / "d")
    f = tmp_path / "d" / "dictionary.safetensors"
    f.write_bytes(f.read_bytes()[:-40])
    with pytest.raises(CorruptFileError, match="truncated"):
        load_dictionary(tmp_path / "d")


def test_unknown_cfg_key_and_wrong_d_in_are_clear_errors(tmp_path):
    save_dictionary(make_dict("relu"), tmp_path / "d")
    cfg_path = tmp_path / "d" / "cfg.json"
    good = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**good, "lr_typo": 1}))
    with pytest.raises(InputError, match="unknown keys \\['lr_typo'\\]"):
        load_dictionary(tmp_path / "d")
    cfg_path.write_text(json.dumps({**good, "d_in": 7, "d_out": 7}))
    with pytest.raises(CorruptFileError, match=r"W_enc has shape \(6, 12\) but the cfg says \(7, 12\)"):
        load_dictionary(tmp_path / "d")


def test_failed_overwrite_leaves_old_folder(tmp_path, monkeypatch):
    import safetensors.torch

    old = make_dict("jumprelu", seed=1, dtype="float32")
    save_dictionary(old, tmp_path / "d")

    def full_disk(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(DiskFullError):
        save_dictionary(make_dict("jumprelu", seed=2, dtype="float32"), tmp_path / "d")
    monkeypatch.undo()
    back = load_dictionary(tmp_path / "d")
    for name, t in old.state_dict().items():
        assert torch.equal(back.state_dict()[name], t)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # no temporary folders left behind


def test_a_save_killed_between_its_renames_is_found_and_explained(tmp_path, monkeypatch):
    """A kill after the old folder moved aside and before the new one moved in leaves only ``d.old-PID``:
    loading ``d`` names that folder and the command that restores it."""
    import os

    old = make_dict("topk", seed=1, dtype="float32")
    save_dictionary(old, tmp_path / "d")
    real_replace, calls = os.replace, []

    def killed_on_second_rename(a, b):
        if os.path.isdir(a):  # the folder swap: old -> d.old-PID, then new -> d
            calls.append((a, b))
            if len(calls) == 2:
                raise KeyboardInterrupt  # the process dies here
        real_replace(a, b)

    monkeypatch.setattr(os, "replace", killed_on_second_rename)
    with pytest.raises(KeyboardInterrupt):
        save_dictionary(make_dict("topk", seed=2, dtype="float32"), tmp_path / "d")
    monkeypatch.undo()
    assert not (tmp_path / "d").exists()
    (stranded,) = tmp_path.glob("d.old-*")
    with pytest.raises(InputError, match="was interrupted") as e:
        load_dictionary(tmp_path / "d")
    assert f"mv '{stranded}' '{tmp_path / 'd'}'" in str(e.value)
    os.replace(stranded, tmp_path / "d")  # the advised fix gives back the old dictionary, bit for bit
    back = load_dictionary(tmp_path / "d")
    assert all(torch.equal(back.state_dict()[n], t) for n, t in old.state_dict().items())


# -- splicing into a model ---------------------------------------------------------------------------
def model_dict(arch="relu", *, d_in=64, seed=0, hook="blocks.1.hook_resid_post", **kw):
    d = make_dict(arch, d_in=d_in, d_sae=32, seed=seed, dtype="float32", **kw)
    d.cfg = d.cfg.replace(hook_in=hook, hook_out=hook)
    return d.eval()


def test_splice_width_mismatch_is_input_error(tmp_path):
    model = tiny_hooked("llama")
    d = model_dict(d_in=32)
    with pytest.raises(InputError, match=r"the dictionary's config says d_in=32, but blocks\.1\.hook_resid_post of "
                                         r"tiny-llama is 64 wide \(d_model=64\).*Fix: pass the model"):
        model.run(random_tokens(), saes=[d])
    # loaded from a folder, the message names its cfg.json (where the user can read what it was trained on)
    save_dictionary(model_dict("topk", d_in=48, k=4, hook="blocks.0.attn.hook_z", model_name="other-model"),
                    tmp_path / "z")
    with pytest.raises(InputError, match=rf"{tmp_path / 'z' / 'cfg.json'} says d_in=48, but blocks\.0\.attn\.hook_z of "
                                         r"tiny-llama is 64 wide \(n_heads\*d_head=4\*16\).*trained on \(other-model\) "
                                         r"\(--model on the command line\), or a dictionary trained on tiny-llama"):
        model.run(random_tokens(), saes=[load_dictionary(tmp_path / "z")])


def test_splice_error_term_keeps_logits():
    model = tiny_hooked("llama")
    tokens = random_tokens()
    d = model_dict()
    clean = model.run(tokens).logits
    kept = model.run(tokens, saes=[Splice(d, error_term=True)]).logits
    torch.testing.assert_close(kept, clean, atol=1e-5, rtol=1e-5)
    replaced = model.run(tokens, saes=[d]).logits
    assert (replaced - clean).abs().max() > 1e-2


def test_ablating_latents_removes_their_decoder_contribution():
    model = tiny_hooked("llama")
    tokens = random_tokens()
    d = model_dict()
    site = "blocks.1.hook_resid_post"
    acts_site = f"{site}.sae.hook_sae_acts_post"
    clean = model.run(tokens, cache=[site])
    resid = clean.cache[site]
    with torch.no_grad():
        acts = d.encode(resid)
    # all latents at position 3, by Ablate
    got = model.run(tokens, saes=[Splice(d, error_term=True)],
                    interventions=[mechscope.Ablate(site=acts_site, positions=[3])]).logits
    expected = resid.clone()
    expected[:, 3] -= acts[:, 3] @ d.W_dec.detach()
    want = model.run(tokens, interventions=[mechscope.Patch(site=site, source=expected)]).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got - clean.logits).abs().max() > 1e-3
    # one latent everywhere, by Replace
    j = int(acts.flatten(0, 1).ne(0).sum(0).argmax())
    assert acts[..., j].abs().sum() > 0

    def drop(v):
        v = v.clone()
        v[..., j] = 0
        return v

    got = model.run(tokens, saes=[Splice(d, error_term=True)],
                    interventions=[mechscope.Replace(site=acts_site, value=drop)]).logits
    expected = resid - acts[..., j, None] * d.W_dec.detach()[j]
    want = model.run(tokens, interventions=[mechscope.Patch(site=site, source=expected)]).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
