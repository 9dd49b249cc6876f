"""Editing a site changes what comes after it and nothing before it, on every family."""

from __future__ import annotations

import torch

import mechscope
from tests.conftest import tiny_hooked


def _noise(shape, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_each_site_edit_changes_downstream_only(family, tokens):
    m = tiny_hooked(family)
    order = list(m.hook_names())
    clean_logits, clean = m.run(tokens, cache="*")
    edited_sites = [n for n in order if not n.startswith("blocks.1.")]  # every kind, once (layer 0 + globals)
    for i, site in enumerate(edited_sites):
        noise = _noise(clean[site].shape, seed=i)
        logits, c = m.run(tokens, cache="*", interventions=[mechscope.Add(site, direction=noise)])
        # the site holds the edited value (masked scores stay -inf, everything else moves)
        torch.testing.assert_close(c[site], clean[site] + noise, rtol=0, atol=0)
        for other in order[: order.index(site)]:
            assert torch.equal(c[other], clean[other]), f"editing {site} changed {other}, upstream of it"
        assert not torch.allclose(logits, clean_logits, atol=1e-4), f"editing {site} did not change the logits"
        last = f"blocks.{m.cfg.n_layers - 1}.hook_resid_post"
        if order.index(site) < order.index(last):
            assert not torch.allclose(c[last], clean[last], atol=1e-4), f"editing {site} did not reach {last}"


def test_edit_at_a_later_position_leaves_earlier_positions(family, tokens):
    """Causality: an edit at position p leaves every position < p of the output unchanged."""
    m = tiny_hooked(family)
    clean_logits, clean = m.run(tokens, cache=["blocks.0.hook_resid_pre"])
    p = 6
    direction = _noise((m.cfg.d_model,), seed=0) * 5
    logits, _ = m.run(tokens, interventions=[mechscope.Add("blocks.0.hook_resid_pre", direction=direction, positions=p)])
    torch.testing.assert_close(logits[:, :p], clean_logits[:, :p], rtol=0, atol=1e-6)
    assert not torch.allclose(logits[:, p:], clean_logits[:, p:], atol=1e-4)


def test_zero_ablating_every_head_zeroes_the_attention_branch(family, tokens):
    """Zeroing hook_z (all heads) leaves only b_O at the projection; hook_result zeroing does the same."""
    m = tiny_hooked(family)
    b = m.b_O(0) if m.b_O(0) is not None else torch.zeros(m.cfg.d_model)
    for site in ("blocks.0.attn.hook_z", "blocks.0.attn.hook_result"):
        _, c = m.run(tokens, cache=["blocks.0.hook_attn_out"], interventions=[mechscope.Ablate(site)])
        out = c["blocks.0.hook_attn_out"]
        if family in ("gemma2", "gemma3_text"):
            expected = m.layer_module(0, "post_attention_layernorm")(b.expand_as(out))
        else:
            expected = b.expand_as(out)
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
