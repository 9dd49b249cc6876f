"""run() options: cache_positions, cache_dtype, cache_device, stop_at_layer, logits_to_keep, functions,
and the hooks() context, each checked against a full run."""

from __future__ import annotations

import pytest
import torch

import mechscope
from tests.conftest import tiny_hooked, twin

FAMS = ["llama", "gemma2", "gpt2"]


@pytest.mark.parametrize("fam", FAMS)
@pytest.mark.parametrize("positions", [-1, [0, 3, -2], slice(2, 8, 3)])
def test_cache_positions_slice_the_pos_axis_only(fam, positions, tokens):
    m = tiny_hooked(fam)
    logits, full = m.run(tokens, cache="*")
    logits_p, part = m.run(tokens, cache="*", cache_positions=positions)
    assert torch.equal(logits, logits_p)
    assert part.positions == positions
    for name, axes in m.hook_names().items():
        axes = axes.split()
        if "pos" not in axes:  # k, v keep every key position
            assert torch.equal(part[name], full[name]), name
            continue
        idx = [slice(None)] * len(axes)
        idx[axes.index("pos")] = positions
        assert torch.equal(part[name], full[name][tuple(idx)]), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_cache_dtype_converts_after_the_fact(dtype, tokens):
    m = tiny_hooked("llama")
    logits, full = m.run(tokens, cache="blocks.0.*")
    logits_d, conv = m.run(tokens, cache="blocks.0.*", cache_dtype=dtype, cache_device="cpu")
    assert torch.equal(logits, logits_d), "the storage dtype must not change the forward"
    for name in full:
        assert conv[name].dtype == dtype and conv[name].device.type == "cpu"
        assert torch.equal(conv[name], full[name].to(dtype)), name


@pytest.mark.parametrize("fam", FAMS)
@pytest.mark.parametrize("stop", [0, 1, 2])
def test_stop_at_layer_runs_only_earlier_blocks(fam, stop, tokens):
    m = tiny_hooked(fam)
    _, full = m.run(tokens, cache="*")
    early = ["hook_embed"] + [n for n in m.hook_names() if n.startswith(tuple(f"blocks.{L}." for L in range(stop)))]
    ran = []
    logits, part = m.run(tokens, cache=early, stop_at_layer=stop,
                         functions={"hook_embed": lambda v: ran.append(1)})
    assert logits is None and ran == [1]
    assert list(part) == early
    for name in early:
        assert torch.equal(part[name], full[name]), name


def test_stop_at_layer_errors(tokens):
    m = tiny_hooked("llama")
    with pytest.raises(mechscope.InputError, match="stops before"):
        m.run(tokens, cache="blocks.1.hook_resid_pre", stop_at_layer=1)
    with pytest.raises(mechscope.InputError, match="stops before"):
        m.run(tokens, cache="ln_final.hook_normalized", stop_at_layer=2)
    with pytest.raises(mechscope.InputError, match="stop_at_layer must be in"):
        m.run(tokens, stop_at_layer=3)
    with pytest.raises(mechscope.InputError, match="backward"):
        m.run(tokens, stop_at_layer=1, backward=lambda logits: logits.sum())


def test_logits_to_keep_matches_the_tail(tokens):
    m = tiny_hooked("qwen3")
    logits, _ = m.run(tokens)
    tail, _ = m.run(tokens, logits_to_keep=3)
    assert tail.shape == (2, 3, m.cfg.d_vocab)
    torch.testing.assert_close(tail, logits[:, -3:], rtol=0, atol=1e-6)


def test_function_may_return_none_or_a_same_shaped_tensor(tokens):
    m = tiny_hooked("llama")
    seen = {}
    site = "blocks.1.hook_mlp_out"
    def observe(v):
        seen["v"] = v.clone()  # returns None: keep the value

    _, c = m.run(tokens, cache=site, functions={site: observe})
    assert torch.equal(c[site], seen["v"])
    logits, c = m.run(tokens, cache=site, functions={site: lambda v: v * 0})
    assert torch.equal(c[site], torch.zeros_like(seen["v"]))
    with pytest.raises(mechscope.InputError, match="must return None or a tensor of shape"):
        m.run(tokens, functions={site: lambda v: v[:, :1]})
    # globs in functions= apply the function at every match
    count = []
    m.run(tokens, functions={"blocks.*.hook_resid_post": lambda v: count.append(1)})
    assert len(count) == m.cfg.n_layers


def test_hooks_context_on_a_plain_hf_forward(tokens):
    m = tiny_hooked("gpt2")
    ref = twin("gpt2")
    d = torch.randn(m.cfg.d_model, generator=torch.Generator().manual_seed(0))  # not constant: LayerNorm removes those
    with m.hooks(cache="blocks.1.hook_resid_post",
                 interventions=[mechscope.Add("blocks.0.hook_resid_post", direction=d)]) as cache:
        steered = m.hf(tokens).logits
    _, c = m.run(tokens, cache="blocks.1.hook_resid_post",
                 interventions=[mechscope.Add("blocks.0.hook_resid_post", direction=d)])
    assert torch.equal(cache["blocks.1.hook_resid_post"], c["blocks.1.hook_resid_post"])
    assert not torch.allclose(steered, ref(tokens).logits, atol=1e-4)
    assert torch.equal(m.hf(tokens).logits, ref(tokens).logits)  # gone after the context


def test_caching_twice_in_one_context_is_an_error(tokens):
    m = tiny_hooked("llama")
    with pytest.raises(mechscope.InputError, match="fired twice"):
        with m.hooks(cache="blocks.0.hook_resid_pre"):
            m.hf(tokens)
            m.hf(tokens)


def test_int32_tokens_and_a_single_row(tokens):
    m = tiny_hooked("llama")
    logits, _ = m.run(tokens)
    assert torch.equal(m.run(tokens.to(torch.int32)).logits, logits)
    assert torch.equal(m.run(tokens[1]).logits, logits[1:])
