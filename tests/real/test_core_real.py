"""The core on the default real model, SmolLM2-135M-Instruct (fp32): exact parity with transformers,
known behaviour, and its documented shapes. Kept to a few short forwards (CI has 2 cores)."""

from __future__ import annotations

import pytest
import torch

import mechscope

pytestmark = pytest.mark.real

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def france(real_model):
    return real_model.to_tokens(PROMPT)


def test_config_of_the_default_model(real_model):
    c = real_model.cfg
    assert (c.family, c.n_layers, c.d_model, c.n_heads, c.n_kv_heads, c.d_head, c.d_mlp, c.d_vocab) == (
        "llama", 30, 576, 9, 3, 64, 1536, 49152)
    assert sum(p.numel() for p in real_model.hf.parameters()) == 134_515_008


def test_unhooked_logits_equal_transformers_and_paris_is_top1(real_model, france):
    """A plain forward of the same module with the original attention function is the reference."""
    m = real_model
    logits = m.run(france).logits
    original = m.cfg.attn_implementation
    wrapped = m.hf.config._attn_implementation
    try:
        m.hf.set_attn_implementation(original)  # the untouched transformers path
        expected = m.hf(france, use_cache=False).logits
    finally:
        m.hf.set_attn_implementation(wrapped)
    assert torch.equal(logits, expected)
    probs = logits[0, -1].softmax(-1)
    top = int(probs.argmax())
    assert m.tokenizer.decode([top]) == " Paris"
    assert probs[top] > 0.5  # measured 0.77


def test_caching_every_hook_keeps_logits_identical(real_model, france):
    m = real_model
    logits = m.run(france).logits
    cached, cache = m.run(france, cache="*")
    assert torch.equal(cached, logits)
    assert len(cache) == len(m.hook_names())
    pos = france.shape[1]
    assert cache["blocks.7.attn.hook_q"].shape == (1, pos, 9, 64)
    assert cache["blocks.7.attn.hook_k"].shape == (1, pos, 3, 64)
    assert cache["blocks.7.attn.hook_v"].shape == (1, pos, 3, 64)
    assert cache["blocks.7.attn.hook_pattern"].shape == (1, 9, pos, pos)
    assert cache["blocks.29.mlp.hook_post"].shape == (1, pos, 1536)
    # the per-head results rebuild the attention output (Llama: no post-norm, no o_proj bias)
    torch.testing.assert_close(cache["blocks.7.attn.hook_result"].sum(2), cache["blocks.7.hook_attn_out"],
                               rtol=0, atol=1e-4)
    torch.testing.assert_close(cache["ln_final.hook_normalized"] @ m.W_U, logits, rtol=1e-4, atol=1e-4)


def test_ablating_the_answer_direction_changes_the_answer(real_model, france):
    """A real intervention: removing the unembedding direction of " Paris" from the final residual."""
    import mechscope

    m = real_model
    paris = m.tokenizer.encode(" Paris", add_special_tokens=False)[0]
    last = f"blocks.{m.cfg.n_layers - 1}.hook_resid_post"
    logits, _ = m.run(france, interventions=[mechscope.Add(last, direction=-m.W_U[:, paris] * 20, positions=-1)])
    assert int(logits[0, -1].argmax()) != paris


def test_loading_the_gguf_file_directly_gives_the_converted_models_logits(real_model, france):
    """A .gguf path loads through transformers' GGUF reader; it must equal the cached safetensors conversion."""
    from mechscope.models.loading import smollm2_gguf

    direct = mechscope.load(str(smollm2_gguf()))
    assert direct.cfg.n_layers == real_model.cfg.n_layers and direct.cfg.n_kv_heads == 3
    assert torch.equal(direct.run(france).logits, real_model.run(france).logits)
