"""The hook-name vocabulary: parsing, axes, expansion order, glob resolution, and helpful errors."""

from __future__ import annotations

import pytest

import mechscope
from mechscope.core import names
from mechscope.core.errors import HookNameError
from tests.conftest import tiny_hooked


def test_parse_concrete_and_global_names():
    assert names.parse("hook_embed") == ("hook_embed", None)
    assert names.parse("blocks.12.attn.hook_z") == ("blocks.{L}.attn.hook_z", 12)
    assert names.parse("blocks.0.hook_resid_post") == ("blocks.{L}.hook_resid_post", 0)
    assert names.parse("ln_final.hook_normalized") == ("ln_final.hook_normalized", None)


@pytest.mark.parametrize("bad", ["blocks.x.hook_resid_post", "blocks.3.hook_resid_pots", "hook_embedding",
                                 "blocks.3", "", "blocks..hook_z"])
def test_parse_rejects_non_names(bad):
    with pytest.raises(HookNameError):
        names.parse(bad)


def test_parse_error_lists_closest_templates():
    with pytest.raises(HookNameError, match=r"blocks\.\{L\}\.hook_resid_post"):
        names.parse("blocks.3.hook_resid_pots")


def test_every_template_has_axes_from_the_shared_vocabulary():
    vocab = set("batch pos kv_pos d_model d_vocab n_layers n_heads n_kv_heads d_head d_mlp d_sae".split())
    for template, (axes, doc) in names.SITES.items():
        assert set(axes.split()) <= vocab, template
        assert axes.split()[0] == "batch" and doc
        assert names.axes(template) == tuple(axes.split())
        assert names.axes(template.format(L=7)) == tuple(axes.split())


def test_expand_orders_globals_layers_then_final():
    out = names.expand(["ln_final.hook_normalized", "blocks.{L}.hook_resid_post", "hook_embed",
                        "blocks.{L}.hook_resid_pre"], n_layers=2)
    assert out == ["hook_embed", "blocks.0.hook_resid_post", "blocks.0.hook_resid_pre",
                   "blocks.1.hook_resid_post", "blocks.1.hook_resid_pre", "ln_final.hook_normalized"]


VALID = names.expand(list(names.SITES), n_layers=3)


@pytest.mark.parametrize("pattern, expected", [
    ("blocks.*.hook_resid_post", [f"blocks.{L}.hook_resid_post" for L in range(3)]),
    ("blocks.1.attn.hook_[qkv]", ["blocks.1.attn.hook_q", "blocks.1.attn.hook_k", "blocks.1.attn.hook_v"]),
    ("hook_*", ["hook_embed", "hook_pos_embed"]),
    ("blocks.?.ln*.hook_normalized", [f"blocks.{L}.ln{i}.hook_normalized" for L in range(3) for i in (1, 2)]),
    ("*", VALID),
])
def test_resolve_globs(pattern, expected):
    assert names.resolve(pattern, VALID) == expected


def test_resolve_dedupes_and_keeps_forward_order():
    got = names.resolve(["blocks.2.hook_resid_pre", "hook_embed", "blocks.*.hook_resid_pre", "hook_embed"], VALID)
    assert got == ["hook_embed"] + [f"blocks.{L}.hook_resid_pre" for L in range(3)]


@pytest.mark.parametrize("typo, closest", [
    ("blocks.1.hook_resid_pst", "blocks.1.hook_resid_post"),
    ("blocks.0.attn.hook_patern", "blocks.0.attn.hook_pattern"),
    ("blocks.2.mlp.hook_psot", "blocks.2.mlp.hook_post"),
    ("ln_final.hook_norm", "ln_final.hook_normalized"),
])
def test_mistyped_name_error_names_the_closest_valid_names(typo, closest):
    with pytest.raises(HookNameError) as info:
        names.resolve(typo, VALID)
    assert closest in str(info.value)
    assert isinstance(info.value, KeyError) and not str(info.value).startswith('"')  # readable, not repr'd


def test_glob_matching_nothing_is_an_error():
    with pytest.raises(HookNameError, match="matches no hook point"):
        names.resolve("blocks.*.hook_nothing", VALID)


def test_model_resolve_errors():
    m = tiny_hooked("llama")
    with pytest.raises(HookNameError, match="blocks.1.attn.hook_result"):
        m.resolve("blocks.1.attn.hook_reslt")
    with pytest.raises(mechscope.SiteUnavailableError, match="rotary"):
        m.resolve("hook_pos_embed")
    with pytest.raises(mechscope.InputError, match="layers 0..1"):
        m.resolve("blocks.2.hook_resid_pre")
    with pytest.raises(mechscope.SiteUnavailableError, match="parallel"):
        tiny_hooked("gpt_neox").resolve("blocks.0.hook_resid_mid")
    with pytest.raises(mechscope.SiteUnavailableError, match="ungated|gated"):
        tiny_hooked("gpt2").resolve("blocks.0.mlp.hook_pre_linear")
    # a glob over an unavailable template simply has no matches among this model's names
    assert tiny_hooked("gpt_neox").resolve("blocks.*.hook_resid_*") == [
        f"blocks.{L}.hook_resid_{k}" for L in range(2) for k in ("pre", "post")]


def test_run_with_bad_names_raises_before_running(tokens):
    m = tiny_hooked("qwen2")
    with pytest.raises(HookNameError, match="blocks.0.hook_mlp_out"):
        m.run(tokens, cache=["blocks.0.hook_mlp_ot"])
    with pytest.raises(HookNameError, match="blocks.0.hook_attn_out"):
        m.run(tokens, interventions=[mechscope.Ablate("blocks.0.hook_atn_out")])
    with pytest.raises(mechscope.SiteUnavailableError):
        m.run(tokens, functions={"hook_pos_embed": lambda v: v})
    with pytest.raises(mechscope.InputError, match="one concrete site"):
        m.run(tokens, interventions=[mechscope.Ablate("blocks.*.hook_attn_out")])


def test_cache_lookup_error_names_closest_cached(tokens):
    _, cache = tiny_hooked("llama").run(tokens, cache="blocks.0.hook_resid_*")
    with pytest.raises(HookNameError, match="blocks.0.hook_resid_post"):
        cache["blocks.0.hook_resid_pst"]
    assert "blocks.1.hook_resid_pre" not in cache and "blocks.0.hook_resid_pre" in cache
    with pytest.raises(HookNameError, match="backward"):
        cache.grad("blocks.0.hook_resid_pre")
    stacked = cache.stack("blocks.0.hook_resid_*")
    assert stacked.shape == (3, *tokens.shape, 64)
