"""Interventions against naive implementations: explicit loops over the selected (row, position, head)
cells for the data classes, and raw PyTorch hooks on an untouched twin model for the end-to-end runs."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mechscope
from mechscope.core.names import axes as site_axes
from tests.conftest import WRONG_TYPE, random_tokens, tiny_hooked, twin

SITE_SHAPES = {  # site -> a small shape for its axes
    "blocks.0.attn.hook_z": (3, 5, 4, 2),
    "blocks.0.attn.hook_k": (3, 5, 2, 2),
    "blocks.0.attn.hook_pattern": (3, 4, 5, 5),
    "blocks.0.hook_resid_post": (3, 5, 6),
}
SITE_AXES = {  # written out here, so strategies call nothing of mechscope's (beartype draws random items)
    "blocks.0.attn.hook_z": ("batch", "pos", "n_heads", "d_head"),
    "blocks.0.attn.hook_k": ("batch", "kv_pos", "n_kv_heads", "d_head"),
    "blocks.0.attn.hook_pattern": ("batch", "n_heads", "pos", "kv_pos"),
    "blocks.0.hook_resid_post": ("batch", "pos", "d_model"),
}


def test_site_axes_table_matches_the_vocabulary():
    assert {s: site_axes(s) for s in SITE_AXES} == SITE_AXES


def _indices(sel, n: int) -> list[int]:
    """The indices a selector picks, the plain-Python way."""
    if sel is None:
        return list(range(n))
    if isinstance(sel, slice):
        return list(range(n)[sel])
    if isinstance(sel, int):
        return [range(n)[sel]]
    return [range(n)[i] for i in sel]


def naive_select(site, value, new, batch=None, positions=None, heads=None):
    """``value`` with ``new`` written into every selected (row, position, head) cell, by explicit loops."""
    names = site_axes(site)
    new = new.expand(value.shape) if new.dim() == value.dim() else new.broadcast_to(value.shape)
    out = value.clone()
    pos_axis = "pos" if "pos" in names else "kv_pos"
    head_axis = next((a for a in names if a in ("n_heads", "n_kv_heads")), None)
    picks = {"batch": batch, pos_axis: positions}
    if head_axis:
        picks[head_axis] = heads
    axis_ids = [names.index(a) for a in picks]
    choices = [_indices(sel, value.shape[d]) for sel, d in zip(picks.values(), axis_ids)]
    for combo in itertools.product(*choices):
        idx = [slice(None)] * value.dim()
        for d, i in zip(axis_ids, combo):
            idx[d] = i
        out[tuple(idx)] = new[tuple(idx)]
    return out


def selector(n: int):
    ints = st.integers(-n, n - 1)
    return st.one_of(
        st.none(),
        ints,
        st.lists(ints, min_size=1, max_size=n + 1),  # duplicates and negatives allowed
        st.builds(slice, st.none() | st.integers(-n, n), st.none() | st.integers(-n, n),
                  st.none() | st.sampled_from([1, 2, -1, -2])),
    )


@st.composite
def case(draw):
    site = draw(st.sampled_from(sorted(SITE_SHAPES)))
    shape = SITE_SHAPES[site]
    names = SITE_AXES[site]
    has_heads = any(a in ("n_heads", "n_kv_heads") for a in names)
    pos_size = shape[names.index("pos" if "pos" in names else "kv_pos")]
    head_size = shape[[i for i, a in enumerate(names) if a in ("n_heads", "n_kv_heads")][0]] if has_heads else 1
    return (site, shape, draw(selector(shape[0])), draw(selector(pos_size)),
            draw(selector(head_size)) if has_heads else None, draw(st.integers(0, 2**16)))


def _rand(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@settings(max_examples=150, deadline=None)
@given(case())
def test_patch_replace_add_zero_match_naive_slicing(c):
    site, shape, batch, positions, heads, seed = c
    value, other = _rand(shape, seed), _rand(shape, seed + 1)
    sel = dict(batch=batch, positions=positions, heads=heads)
    got = mechscope.Patch(site, source=other, **sel).apply(value)
    assert torch.equal(got, naive_select(site, value, other, **sel))
    got = mechscope.Replace(site, value=lambda v: v * 2, **sel).apply(value)
    assert torch.equal(got, naive_select(site, value, value * 2, **sel))
    got = mechscope.Add(site, direction=other[0], scale=0.5, **sel).apply(value)
    assert torch.equal(got, naive_select(site, value, value + 0.5 * other[0], **sel))
    got = mechscope.Ablate(site, **sel).apply(value)
    assert torch.equal(got, naive_select(site, value, torch.zeros(shape), **sel))


@settings(max_examples=60, deadline=None)
@given(case(), st.booleans())
def test_mean_ablation_matches_naive_mean(c, over_positions):
    site, shape, batch, positions, heads, seed = c
    value, ref = _rand(shape, seed), _rand((7, *shape[1:]), seed + 1)
    names = site_axes(site)
    mean = ref.mean(0, keepdim=True)
    if over_positions and "pos" in names:
        mean = mean.mean(names.index("pos"), keepdim=True)
    sel = dict(batch=batch, positions=positions, heads=heads)
    got = mechscope.Ablate(site, method="mean", reference=ref, mean_over_positions=over_positions, **sel).apply(value)
    torch.testing.assert_close(got, naive_select(site, value, mean, **sel), rtol=0, atol=1e-6)


def test_resample_ablation_draws_whole_rows_of_the_reference():
    site, shape = "blocks.0.hook_resid_post", (6, 5, 3)
    value, ref = _rand(shape, 0), _rand((4, 5, 3), 1)
    got = mechscope.Ablate(site, method="resample", reference=ref, positions=[1, 3], seed=3).apply(value)
    assert torch.equal(got[:, [0, 2, 4]], value[:, [0, 2, 4]])
    for row in got:
        assert any(torch.equal(row[[1, 3]], r[[1, 3]]) for r in ref), "a resampled row is not a reference row"
    again = mechscope.Ablate(site, method="resample", reference=ref, positions=[1, 3], seed=3).apply(value)
    assert torch.equal(got, again)
    def rows_drawn(seed):
        out = mechscope.Ablate(site, method="resample", reference=ref, seed=seed).apply(value)
        return tuple(next(j for j, r in enumerate(ref) if torch.equal(row, r)) for row in out)

    drawn = {rows_drawn(s) for s in range(8)}
    assert len(drawn) > 1, "every seed drew the same rows"


def test_batch_selector_with_a_short_source_fills_the_selected_rows():
    site = "blocks.0.hook_resid_post"
    value, src = _rand((4, 5, 3), 0), _rand((2, 5, 3), 1)
    got = mechscope.Patch(site, source=src, batch=[3, 1], positions=2).apply(value)
    want = value.clone()
    want[3, 2], want[1, 2] = src[0, 2], src[1, 2]
    assert torch.equal(got, want)
    with pytest.raises(mechscope.ShapeError, match="batch selects 1 rows"):
        mechscope.Patch(site, source=src, batch=[0]).apply(value)


def test_selector_errors():
    value = torch.zeros(2, 5, 3)
    with pytest.raises(mechscope.InputError, match="out of range"):
        mechscope.Ablate("blocks.0.hook_resid_post", positions=5).apply(value)
    with pytest.raises(mechscope.InputError, match="no head axis"):
        mechscope.Ablate("blocks.0.hook_resid_post", heads=0).apply(value)
    with pytest.raises(mechscope.ShapeError):
        mechscope.Ablate("blocks.0.attn.hook_z").apply(value)  # 3 axes where 4 are documented
    with pytest.raises(mechscope.InputError):
        mechscope.Ablate("blocks.0.hook_resid_post", method="median")
    with pytest.raises(mechscope.InputError, match="reference"):
        mechscope.Ablate("blocks.0.hook_resid_post", method="mean")
    with pytest.raises(mechscope.InputError):
        mechscope.Add("blocks.0.hook_resid_post", direction=[1.0, 2.0])
    with pytest.raises(mechscope.InputError):
        mechscope.Replace("blocks.0.hook_resid_post")
    with pytest.raises(mechscope.ShapeError):
        mechscope.Add("blocks.0.hook_resid_post", direction=torch.ones(4)).apply(value)
    with pytest.raises(mechscope.ShapeError):
        mechscope.Replace("blocks.0.hook_resid_post", value=torch.ones(3, 5, 3)).apply(value)
    with pytest.raises(mechscope.InputError, match="not a Tensor"):
        mechscope.Replace("blocks.0.hook_resid_post", value=lambda v: 1.0).apply(value)


def test_interventions_are_frozen():
    iv = mechscope.Ablate("blocks.0.hook_resid_post")
    with pytest.raises(AttributeError):
        iv.site = "hook_embed"


# -- end to end: mechscope's run against raw PyTorch hooks on the twin ---------------------------------
def _raw_run(hf, tokens, module_path: str, edit, pre: bool = False):
    """Logits of a plain transformers forward where ``edit`` rewrites one module's input or output."""
    mod = hf.get_submodule(module_path)
    if pre:
        handle = mod.register_forward_pre_hook(lambda m, args: (edit(args[0]), *args[1:]))
    else:
        handle = mod.register_forward_hook(
            lambda m, args, out: (edit(out[0]), *out[1:]) if isinstance(out, tuple) else edit(out))
    try:
        return hf(tokens).logits
    finally:
        handle.remove()


def _raw_capture(hf, tokens, module_path: str, pre: bool = False):
    seen = []
    _raw_run(hf, tokens, module_path, lambda t: seen.append(t.clone()) or t, pre)
    return seen[0]


# family -> (o_proj path, mlp path, layer path) for the raw reference
RAW_PATHS = {
    "llama": ("model.layers.1.self_attn.o_proj", "model.layers.0.mlp", "model.layers.0"),
    "gpt2": ("transformer.h.1.attn.c_proj", "transformer.h.0.mlp", "transformer.h.0"),
    "gpt_neox": ("gpt_neox.layers.1.attention.dense", "gpt_neox.layers.0.mlp", "gpt_neox.layers.0"),
}


@pytest.mark.parametrize("fam", sorted(RAW_PATHS))
def test_head_patch_from_a_clean_cache_matches_raw_hooks(fam):
    m, ref = tiny_hooked(fam), twin(fam)
    o_proj, _, _ = RAW_PATHS[fam]
    clean, corrupt = random_tokens(seed=1), random_tokens(seed=2)
    _, clean_cache = m.run(clean, cache="blocks.1.attn.hook_z")
    clean_z = _raw_capture(ref, clean, o_proj, pre=True)  # [batch, pos, n_heads * d_head]
    assert torch.equal(clean_cache["blocks.1.attn.hook_z"].flatten(2), clean_z)
    d = m.cfg.d_head

    def edit(z):
        z = z.clone()
        for h in (1, 3):
            z[:, 4, h * d:(h + 1) * d] = clean_z[:, 4, h * d:(h + 1) * d]
            z[:, 6, h * d:(h + 1) * d] = clean_z[:, 6, h * d:(h + 1) * d]
        return z

    got, _ = m.run(corrupt, interventions=[
        mechscope.Patch("blocks.1.attn.hook_z", source=clean_cache, positions=[4, 6], heads=[1, 3])])
    assert torch.equal(got, _raw_run(ref, corrupt, o_proj, edit, pre=True))


@pytest.mark.parametrize("fam", sorted(RAW_PATHS))
def test_mean_ablation_of_mlp_out_and_resample_of_resid_post_match_raw_hooks(fam):
    m, ref = tiny_hooked(fam), twin(fam)
    _, mlp, layer = RAW_PATHS[fam]
    tokens, reference = random_tokens(batch=3, seed=3), random_tokens(batch=5, seed=4)
    _, ref_cache = m.run(reference, cache=["blocks.0.hook_mlp_out", "blocks.0.hook_resid_post"])
    mean = _raw_capture(ref, reference, mlp).mean(0)

    def edit(out):
        out = out.clone()
        out[:, 2:5] = mean[2:5]
        return out

    got, _ = m.run(tokens, interventions=[mechscope.Ablate(
        "blocks.0.hook_mlp_out", method="mean", reference=ref_cache, positions=slice(2, 5))])
    torch.testing.assert_close(got, _raw_run(ref, tokens, mlp, edit), rtol=0, atol=1e-6)

    # resample: every row of the edited residual is some row of the reference
    _, c = m.run(tokens, cache="blocks.0.hook_resid_post", interventions=[mechscope.Ablate(
        "blocks.0.hook_resid_post", method="resample", reference=ref_cache, batch=[0, 2], seed=1)])
    raw_post = _raw_capture(ref, tokens, layer)
    post, ref_post = c["blocks.0.hook_resid_post"], ref_cache["blocks.0.hook_resid_post"]
    assert torch.equal(post[1], raw_post[1])
    for row in (0, 2):
        assert any(torch.equal(post[row], r) for r in ref_post)


@pytest.mark.parametrize("fam", sorted(RAW_PATHS))
def test_steering_add_at_resid_post_matches_raw_hooks(fam):
    m, ref = tiny_hooked(fam), twin(fam)
    _, _, layer = RAW_PATHS[fam]
    tokens = random_tokens(seed=5)
    direction = _rand((m.cfg.d_model,), 7)
    got, _ = m.run(tokens, interventions=[mechscope.Add("blocks.0.hook_resid_post", direction=direction,
                                                        scale=3.0, positions=-1, batch=1)])

    def edit(h):
        h = h.clone()
        h[1, -1] = h[1, -1] + 3.0 * direction
        return h

    assert torch.equal(got, _raw_run(ref, tokens, layer, edit))


def test_interventions_at_one_site_compose_in_order(tokens):
    m = tiny_hooked("llama")
    site = "blocks.0.hook_resid_pre"
    d = _rand((m.cfg.d_model,), 0)
    _, c = m.run(tokens, cache=site, interventions=[
        mechscope.Ablate(site, positions=0), mechscope.Add(site, direction=d)])
    _, clean = m.run(tokens, cache=site)
    want = clean[site] + d
    want[:, 0] = d
    assert torch.equal(c[site], want)


def test_patch_source_errors(tokens):
    m = tiny_hooked("llama")
    _, short = m.run(tokens[:, :6], cache="blocks.0.hook_resid_pre")
    with pytest.raises(mechscope.ShapeError, match="same number of tokens"):
        m.run(tokens, interventions=[mechscope.Patch("blocks.0.hook_resid_pre", source=short)])
    with pytest.raises(mechscope.InputError, match="no value for"):
        m.run(tokens, interventions=[mechscope.Patch("blocks.0.hook_resid_post", source=short)])
    with pytest.raises(mechscope.InputError, match="Tensor or an ActivationCache"):
        m.run(tokens, interventions=[mechscope.Patch("blocks.0.hook_resid_pre", source=3.0)])
    with pytest.raises(WRONG_TYPE, match="Patch/Ablate/Add/Replace|interventions"):
        m.run(tokens, interventions=["blocks.0.hook_resid_pre"])
