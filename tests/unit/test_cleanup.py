"""No hook survives: whatever goes wrong inside a run, every module hook and attention-registry entry is
removed and the next plain forward equals transformers bit for bit."""

from __future__ import annotations

import pytest
import torch

import mechscope
from mechscope.hooks import runtime
from tests.conftest import all_hooks_removed, tiny_hooked, twin


class Boom(Exception):
    pass


class HardStop(BaseException):
    """Not an Exception (like KeyboardInterrupt): cleanup must not depend on catching Exception."""


def _raise(exc):
    def fn(v):
        raise exc
    return fn


def _assert_clean(m, tokens, family):
    assert all_hooks_removed(m.hf) == []
    assert len(runtime._ACTIVE) == 0
    assert torch.equal(m.hf(tokens).logits, twin(family)(tokens).logits)
    assert torch.equal(m.run(tokens).logits, twin(family)(tokens).logits)


SCENARIOS = {
    # a Replace callable that raises inside a module forward hook
    "replace-raises": lambda m, t: m.run(t, cache="*", interventions=[
        mechscope.Replace("blocks.1.hook_resid_post", value=_raise(Boom("x")))]),
    # a function that raises inside the attention function (registry path)
    "attention-raises": lambda m, t: m.run(t, cache="*", functions={"blocks.0.attn.hook_q": _raise(Boom("q"))}),
    # a pre-hook site (resid_pre) raising a BaseException
    "base-exception": lambda m, t: m.run(t, cache="*", functions={"blocks.1.hook_resid_pre": _raise(HardStop())}),
    # a patch whose shape does not fit
    "shape-error": lambda m, t: m.run(t, cache="*", interventions=[
        mechscope.Patch("blocks.0.attn.hook_z", source=torch.zeros(1, 2, 3, 4))]),
    # the backward metric fails after the forward
    "metric-raises": lambda m, t: m.run(t, cache="*", backward=_raise(Boom("metric"))),
    # a bad return value from a function
    "bad-function-value": lambda m, t: m.run(t, functions={"blocks.0.attn.hook_pattern": lambda v: v[..., :1]}),
}
EXPECTED = {"replace-raises": Boom, "attention-raises": Boom, "base-exception": HardStop,
            "shape-error": mechscope.ShapeError, "metric-raises": Boom, "bad-function-value": mechscope.InputError}


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_no_hook_survives_an_error(family, tokens, scenario):
    m = tiny_hooked(family)
    with pytest.raises(EXPECTED[scenario]):
        SCENARIOS[scenario](m, tokens)
    _assert_clean(m, tokens, family)


def test_error_in_the_body_of_hooks_context(family, tokens):
    m = tiny_hooked(family)
    with pytest.raises(Boom):
        with m.hooks(cache="*", interventions=[mechscope.Ablate("blocks.0.hook_attn_out")]):
            m.hf(tokens)
            raise Boom("user code")
    _assert_clean(m, tokens, family)


def test_hooks_are_really_there_during_a_run(tokens):
    """The cleanliness check can fail: during a run the hooks and registry entries exist."""
    m = tiny_hooked("llama")
    seen = {}

    def spy(v):
        seen["modules"] = all_hooks_removed(m.hf)
        seen["active"] = len(runtime._ACTIVE)

    m.run(tokens, cache="*", functions={"blocks.1.hook_resid_post": spy})
    assert seen["modules"] and seen["active"] == m.cfg.n_layers
    _assert_clean(m, tokens, "llama")


def test_clean_after_stop_at_layer_and_backward(family, tokens):
    m = tiny_hooked(family)
    m.run(tokens, cache="blocks.0.*", stop_at_layer=1)
    _assert_clean(m, tokens, family)
    m.run(tokens, cache="*", backward=lambda logits: logits[:, -1].logsumexp(-1).sum())
    _assert_clean(m, tokens, family)
    assert all(p.grad is None for p in m.hf.parameters())


def test_nested_contexts_unwind_in_order(tokens):
    m = tiny_hooked("qwen2")
    d = torch.randn(m.cfg.d_model, generator=torch.Generator().manual_seed(0))
    with m.hooks(interventions=[mechscope.Add("blocks.0.hook_resid_post", direction=d)]):
        with m.hooks(cache="blocks.1.hook_resid_pre") as inner:
            m.hf(tokens)
        assert all_hooks_removed(m.hf), "the outer context's hook was removed by the inner one"
    _, c = m.run(tokens, cache="blocks.1.hook_resid_pre",
                 interventions=[mechscope.Add("blocks.0.hook_resid_post", direction=d)])
    assert torch.equal(inner["blocks.1.hook_resid_pre"], c["blocks.1.hook_resid_pre"])
    _assert_clean(m, tokens, "qwen2")


def test_run_inside_a_hooks_context_composes_at_attention_sites(tokens):
    """An outer context's attention edits stay in force during, and after, an inner run()."""
    m = tiny_hooked("llama")
    outer = [mechscope.Ablate("blocks.0.attn.hook_pattern", heads=[0, 2]),
             mechscope.Add("blocks.1.attn.hook_q", direction=torch.ones(m.cfg.d_head))]
    want, want_cache = m.run(tokens, interventions=outer, cache="blocks.*.attn.hook_[qk]")
    with m.hooks(interventions=outer):
        before = m.hf(tokens).logits
        inner, c = m.run(tokens, cache="blocks.*.attn.hook_[qk]")
        after = m.hf(tokens).logits
        assert len(runtime._ACTIVE) == 2  # the outer context's registrations survive the inner run
    assert torch.equal(before, want) and torch.equal(inner, want) and torch.equal(after, want)
    for name in want_cache:
        assert torch.equal(c[name], want_cache[name]), name
    _assert_clean(m, tokens, "llama")
