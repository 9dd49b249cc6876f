"""run(backward=...) gradients equal torch.autograd.grad taken independently, at every site."""

from __future__ import annotations

import torch

import mechscope
from tests.conftest import tiny_hooked, twin


def _metric(logits: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy over every position (so every position gets a gradient)."""
    targets = torch.arange(logits.shape[1]) % logits.shape[-1]
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.repeat(logits.shape[0]))


def test_backward_grads_match_autograd_at_every_site(family, tokens):
    m = tiny_hooked(family)
    logits, cache = m.run(tokens, cache="*", backward=_metric)
    expected_logits = twin(family)(tokens).logits
    assert torch.equal(logits, expected_logits), "asking for gradients changed the forward values"
    torch.testing.assert_close(torch.tensor(cache.metric), _metric(expected_logits).detach())
    assert set(cache.grads) == set(m.hook_names())
    for name in m.hook_names():
        # independent: a leaf tensor holding the clean value is put in place, the forward is rerun by
        # transformers itself, and autograd differentiates the metric with respect to that leaf
        leaf = cache[name].clone().requires_grad_(True)
        with torch.enable_grad(), m.hooks(interventions=[mechscope.Replace(name, value=leaf)]):
            out = m.hf(tokens, use_cache=False).logits
            (grad,) = torch.autograd.grad(_metric(out), leaf)
        assert cache.grads[name].shape == grad.shape, name
        torch.testing.assert_close(cache.grads[name], grad, rtol=1e-4, atol=1e-7, msg=name)
        assert cache.grads[name].abs().sum() > 0, f"{name}: a zero gradient proves nothing"


def test_grads_with_cache_positions_are_sliced_like_the_values(family, tokens):
    m = tiny_hooked(family)
    _, full = m.run(tokens, cache="blocks.0.*", backward=_metric)
    _, part = m.run(tokens, cache="blocks.0.*", backward=_metric, cache_positions=[2, 7])
    for name, axes in m.hook_names().items():
        if not name.startswith("blocks.0."):
            continue
        if "pos" in axes.split():
            d = axes.split().index("pos")
            assert torch.equal(part.grads[name], full.grads[name].index_select(d, torch.tensor([2, 7]))), name
        else:  # k, v: kv_pos is not sliced
            assert torch.equal(part.grads[name], full.grads[name]), name
