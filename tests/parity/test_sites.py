"""Every canonical hook site on every family: fires once with its documented shape, changes nothing
when only observed, and the residual-stream sums that define the sites hold."""

from __future__ import annotations

import pytest
import torch

import mechscope
from mechscope.core.names import SITES
from tests.conftest import (
    FAMILY_SPECS,
    GEMMA,
    SEQ_LEN,
    capture_output,
    make_tiny,
    random_tokens,
    site_shape,
    tiny_hooked,
    twin,
)

# Sites a family cannot have, written out by hand (independent of the adapters' own table).
_NO_POS_EMBED = {"hook_pos_embed"}
_UNGATED = {"blocks.{L}.mlp.hook_pre_linear"}
EXPECTED_MISSING = {
    "llama": _NO_POS_EMBED, "mistral": _NO_POS_EMBED, "qwen2": _NO_POS_EMBED, "qwen3": _NO_POS_EMBED,
    "gemma2": _NO_POS_EMBED, "gemma3_text": _NO_POS_EMBED,
    "gpt2": _UNGATED,
    "gpt_neox": _NO_POS_EMBED | _UNGATED | {"blocks.{L}.hook_resid_mid"},
    "gpt_neox_serial": _NO_POS_EMBED | _UNGATED,
}


def test_twin_is_identical(family):
    """The reference model really is the same network (else every parity test below is vacuous)."""
    a, b = tiny_hooked(family).hf.state_dict(), twin(family).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_config_dims(family):
    """cfg reads the dimensions the tiny configs were built with (k/v keep their own head count)."""
    m = tiny_hooked(family)
    spec = FAMILY_SPECS[family][2]
    assert (m.cfg.n_layers, m.cfg.d_model, m.cfg.n_heads, m.cfg.d_head, m.cfg.d_mlp, m.cfg.d_vocab) == (2, 64, 4, 16, 96, 128)
    assert m.cfg.n_kv_heads == spec.get("num_key_value_heads", 4)


def test_hook_table_and_missing_sites(family):
    m = tiny_hooked(family)
    present = {t for t in SITES if t not in EXPECTED_MISSING[family]}
    want = [t for t in present if "{L}" not in t] + [t.format(L=L) for t in present if "{L}" in t for L in range(2)]
    assert sorted(m.hook_names()) == sorted(want)
    for t in EXPECTED_MISSING[family]:
        with pytest.raises(mechscope.SiteUnavailableError):
            m.resolve(t.format(L=0))


def test_every_hook_fires_once_with_its_shape_in_forward_order(family, tokens):
    m = tiny_hooked(family)
    calls: list[tuple[str, tuple[int, ...]]] = []

    def recorder(name):
        def fn(v):
            calls.append((name, tuple(v.shape)))
        return fn

    m.run(tokens, functions={n: recorder(n) for n in m.hook_names()})
    names = [n for n, _ in calls]
    assert sorted(names) == sorted(m.hook_names()), "some hook fired twice or never"
    for name, shape in calls:
        assert shape == site_shape(m, name, *tokens.shape), name
    if family != "gpt_neox":  # parallel attention: the MLP does not wait for attention
        assert names == list(m.hook_names()), "hook_names() is not in forward order"


@pytest.mark.parametrize("impl", ["default", "eager"])
def test_unhooked_and_cache_all_are_bit_identical(family, impl, tokens):
    impl = None if impl == "default" else impl
    m, ref = tiny_hooked(family, impl), twin(family, impl)
    # run() forwards with use_cache=False (no KV cache to build); the plain forward it equals is the same call.
    # GPT-2's own eager attention gives other bits with and without a KV cache on some CPUs (1.2e-6 on an
    # AVX-512 machine: the key tensor's memory layout changes the matmul kernel), so each is compared with
    # the plain forward of the same arguments.
    expected, expected_no_kv = ref(tokens).logits, ref(tokens, use_cache=False).logits
    assert torch.equal(m.run(tokens).logits, expected_no_kv)
    assert torch.equal(m.hf(tokens).logits, expected)
    logits, cache = m.run(tokens, cache="*")
    assert torch.equal(logits, expected_no_kv)
    assert list(cache) == list(m.hook_names())
    with m.hooks(cache="*") as c:
        assert torch.equal(m.hf(tokens).logits, expected)
    assert len(c) == len(m.hook_names())


def test_identity_functions_are_bit_identical(family, tokens):
    m = tiny_hooked(family)
    expected = twin(family)(tokens).logits
    logits, _ = m.run(tokens, functions={n: (lambda v: v) for n in m.hook_names()})
    assert torch.equal(logits, expected)


# Sites where a hook's *new* tensor is written straight back (no recomputation): returning an equal
# copy must leave the logits bit-identical too.
_WRITE_BACK = ("hook_embed", "hook_pos_embed", "hook_resid_pre", "ln1.hook_normalized", "attn.hook_q",
               "attn.hook_k", "attn.hook_v", "attn.hook_z", "hook_attn_out", "ln2.hook_normalized",
               "mlp.hook_pre", "mlp.hook_pre_linear", "mlp.hook_post", "hook_mlp_out", "hook_resid_post",
               "ln_final.hook_normalized")


def test_clone_functions_at_write_back_sites_are_bit_identical(family, tokens):
    m = tiny_hooked(family)
    expected = twin(family)(tokens).logits
    names = [n for n in m.hook_names() if n.endswith(_WRITE_BACK)]
    seen = []

    def clone(v):
        seen.append(1)
        return v.clone()

    logits, _ = m.run(tokens, functions={n: clone for n in names})
    assert len(seen) == len(names)
    assert torch.equal(logits, expected)


def test_residual_stream_sums(family, tokens):
    m = tiny_hooked(family)
    logits, c = m.run(tokens, cache="*")
    first = c["hook_embed"] + c["hook_pos_embed"] if "hook_pos_embed" in c else c["hook_embed"]
    assert torch.equal(c["blocks.0.hook_resid_pre"], first)
    for L in range(m.cfg.n_layers):
        b = f"blocks.{L}."
        if family == "gpt_neox":  # parallel: both branches read resid_pre
            torch.testing.assert_close(c[b + "hook_resid_post"], c[b + "hook_resid_pre"] + c[b + "hook_attn_out"]
                                       + c[b + "hook_mlp_out"], rtol=0, atol=1e-5)
        else:
            torch.testing.assert_close(c[b + "hook_resid_mid"], c[b + "hook_resid_pre"] + c[b + "hook_attn_out"],
                                       rtol=0, atol=1e-6)
            torch.testing.assert_close(c[b + "hook_resid_post"], c[b + "hook_resid_mid"] + c[b + "hook_mlp_out"],
                                       rtol=0, atol=1e-5)
        if L + 1 < m.cfg.n_layers:
            assert torch.equal(c[b + "hook_resid_post"], c[f"blocks.{L + 1}.hook_resid_pre"])
    last = c[f"blocks.{m.cfg.n_layers - 1}.hook_resid_post"]
    assert torch.equal(c["ln_final.hook_normalized"], m.module(m.adapter.final_norm)(last))
    # the unembedding reads ln_final through W_U (Gemma 2 then soft-caps the logits)
    pred = c["ln_final.hook_normalized"] @ m.W_U
    cap = getattr(m.hf.config, "final_logit_softcapping", None)
    if cap:
        pred = cap * torch.tanh(pred / cap)
    torch.testing.assert_close(logits, pred, rtol=1e-5, atol=1e-5)


def test_norm_sites_are_the_norms_of_the_residual(family, tokens):
    m = tiny_hooked(family)
    _, c = m.run(tokens, cache="*")
    for L in range(m.cfg.n_layers):
        b = f"blocks.{L}."
        ln1 = m.layer_module(L, m.adapter.ln1)
        assert torch.equal(c[b + "ln1.hook_normalized"], ln1(c[b + "hook_resid_pre"]))
        ln2_in = c[b + "hook_resid_pre"] if family == "gpt_neox" else c[b + "hook_resid_mid"]
        torch.testing.assert_close(c[b + "ln2.hook_normalized"], m.layer_module(L, m.adapter.ln2)(ln2_in),
                                   rtol=1e-5, atol=1e-5)


def test_per_head_results_sum_to_the_output_projection(family, tokens):
    m = tiny_hooked(family)
    for L in range(m.cfg.n_layers):
        o_proj = m.layer_module(L, m.adapter.o_proj)
        (_, c), proj_out = capture_output(o_proj, m.run, tokens, cache=[f"blocks.{L}.attn.hook_result",
                                                                        f"blocks.{L}.hook_attn_out"])
        result = c[f"blocks.{L}.attn.hook_result"]
        total = result.sum(dim=2) + (m.b_O(L) if m.b_O(L) is not None else 0)
        torch.testing.assert_close(total, proj_out, rtol=0, atol=1e-5)
        if family in GEMMA:  # the post-attention norm sits between the projection and the residual
            post = m.layer_module(L, "post_attention_layernorm")
            torch.testing.assert_close(c[f"blocks.{L}.hook_attn_out"], post(proj_out), rtol=0, atol=1e-6)
        else:
            torch.testing.assert_close(total, c[f"blocks.{L}.hook_attn_out"], rtol=0, atol=1e-5)


def test_mlp_sites_recompose_the_mlp(family, tokens):
    """mlp.hook_post through the down projection gives the MLP branch (Gemma: before its post-norm)."""
    m = tiny_hooked(family)
    down = m.layer_module(0, m.adapter.mlp_out_proj)
    (_, c), down_out = capture_output(down, m.run, tokens, cache="blocks.0.*")
    assert torch.equal(down(c["blocks.0.mlp.hook_post"]), down_out)
    if family in GEMMA:
        assert torch.equal(m.layer_module(0, "post_feedforward_layernorm")(down_out), c["blocks.0.hook_mlp_out"])
    else:
        assert torch.equal(down_out, c["blocks.0.hook_mlp_out"])
    pre = c["blocks.0.mlp.hook_pre"]
    assert torch.equal(pre, m.layer_module(0, m.adapter.mlp_in)(c["blocks.0.ln2.hook_normalized"]))
    if "blocks.0.mlp.hook_pre_linear" in c:  # gated: post = act(gate) * up
        act = m.layer_module(0, "mlp").act_fn
        torch.testing.assert_close(c["blocks.0.mlp.hook_post"], act(pre) * c["blocks.0.mlp.hook_pre_linear"],
                                   rtol=0, atol=1e-6)


def test_plain_transformers_forward_after_hooked_runs(family):
    """Wrapping and running with hooks never leaves the model in a different state."""
    m = tiny_hooked(family)
    toks = random_tokens(batch=3, pos=7, seed=5)
    m.run(toks, cache="*", interventions=[mechscope.Ablate("blocks.0.hook_attn_out")])
    assert torch.equal(m.hf(toks).logits, twin(family)(toks).logits)


def test_batch_of_one_and_fresh_model(family):
    """A freshly built (not cached) model of the family wraps and matches its twin for batch 1."""
    hf = make_tiny(family, seed=3)
    ref = make_tiny(family, seed=3)
    m = mechscope.HookedModel(hf)
    toks = random_tokens(batch=1, pos=SEQ_LEN, seed=2)
    assert torch.equal(m.run(toks[0]).logits, ref(toks).logits)  # a 1-D input is one row


def test_hook_result_read_later_equals_the_eager_value():
    """``hook_result`` cached alone is computed when first read: bitwise the value an eager run gives (forced
    by a no-op hook function), also with cache_positions and cache_dtype, and unchanged by a later weight edit.
    The same for the attention scores and pattern (computed from the forward's q and k when read)."""
    import torch

    from mechscope.hooks.cache import _Deferred
    from tests.conftest import tiny_hooked

    m = tiny_hooked("llama")
    toks = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    name = "blocks.1.attn.hook_result"
    for kw in ({}, {"cache_positions": [2, -1]}, {"cache_dtype": torch.float64}):
        lazy = m.run(toks, cache=[name, "blocks.1.attn.hook_z"], **kw).cache
        assert isinstance(lazy._values[name], _Deferred)  # nothing computed yet
        eager = m.run(toks, cache=[name], functions={name: lambda v: None}, **kw).cache
        assert not isinstance(eager._values[name], _Deferred)
        with torch.no_grad():
            m.hf.model.layers[1].self_attn.o_proj.weight.mul_(2.0)  # an edit after the run...
        try:
            assert torch.equal(lazy[name], eager[name])  # ...does not reach the value read afterwards
        finally:
            with torch.no_grad():
                m.hf.model.layers[1].self_attn.o_proj.weight.div_(2.0)
        assert torch.equal(lazy.stack("blocks.*.attn.hook_result"), eager[name][None])
    att = ["blocks.0.attn.hook_attn_scores", "blocks.0.attn.hook_pattern"]
    for family in ("llama", "qwen2", "gpt2"):  # GQA and MHA
        m = tiny_hooked(family)
        for kw in ({}, {"cache_positions": [1, -1]}):
            lazy = m.run(toks, cache=att, **kw).cache
            assert all(isinstance(lazy._values[n], _Deferred) for n in att)
            eager = m.run(toks, cache=att, functions={att[0]: lambda v: None}, **kw).cache
            for n in att:
                assert torch.equal(lazy[n], eager[n]), (family, n, kw)
