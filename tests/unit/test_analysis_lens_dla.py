"""Logit lens and direct logit attribution on tiny random models of several families.

Claims tested: the logit lens's last row is the model's real output distribution; DLA's parts sum to
the real logit difference on every family (norm biases, b_O and GPT-2's position embedding made
non-zero on purpose, Gemma 2 with its post-attention norms and final soft-cap).
"""

from __future__ import annotations

import pytest
import torch
import transformers
from jaxtyping import TypeCheckError

import mechscope
from mechscope.analysis import direct_logit_attribution, logit_lens
from mechscope.analysis.metrics import _check_answers
from mechscope.core.errors import InputError, ShapeError

V = 101


def tiny(family: str, seed: int = 0) -> mechscope.HookedModel:
    """A seeded tiny HF model of ``family``; every 1-d parameter (biases, norm gains) gets noise, so
    constant terms of the decomposition are non-zero."""
    rot = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
               max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.1)
    specs = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(rot, num_key_value_heads=2)),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(rot, num_key_value_heads=2)),
        "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM, dict(
            rot, num_key_value_heads=2, head_dim=8, final_logit_softcapping=5.0, attn_logit_softcapping=2.0)),
        "gpt2": (transformers.GPT2Config, transformers.GPT2LMHeadModel, dict(
            vocab_size=V, n_embd=32, n_layer=3, n_head=4, n_inner=48, n_positions=64, bos_token_id=1,
            eos_token_id=2)),
        "gpt_neox": (transformers.GPTNeoXConfig, transformers.GPTNeoXForCausalLM, dict(rot, use_parallel_residual=True)),
        "gpt_neox_serial": (transformers.GPTNeoXConfig, transformers.GPTNeoXForCausalLM,
                            dict(rot, use_parallel_residual=False)),
    }
    config_cls, model_cls, kwargs = specs[family]
    torch.manual_seed(seed)
    hf = model_cls(config_cls(**kwargs)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() == 1:
                p.add_(0.2 * torch.randn_like(p))
            p.requires_grad_(False)
    return mechscope.HookedModel(hf, name=f"tiny-{family}")


def tokens(batch: int = 3, pos: int = 9, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, V, (batch, pos), generator=g)


FAMILIES = ["llama", "qwen2", "gemma2", "gpt2", "gpt_neox", "gpt_neox_serial"]


@pytest.mark.parametrize("family", FAMILIES)
def test_logit_lens_last_layer_is_the_real_distribution(family):
    m = tiny(family)
    toks = tokens(1)
    res = logit_lens(m, toks, position=-1, target=7, k=4)
    real = torch.log_softmax(m.run(toks).logits[0, -1].float(), -1)
    assert res.labels == [f"L{i}" for i in range(m.cfg.n_layers)]
    torch.testing.assert_close(res.logprobs[-1], real, atol=1e-5, rtol=1e-5)
    top = real.topk(4)
    torch.testing.assert_close(res.top_probs[-1], top.values.exp(), atol=1e-6, rtol=1e-5)
    assert res.top_tokens[-1] == [str(i) for i in top.indices.tolist()]  # no tokenizer: ids as strings
    assert res.target_rank[-1] == int((real > real[7]).sum())
    torch.testing.assert_close(res.target_prob, res.logprobs[:, 7].exp())
    assert res.top_probs.shape == (m.cfg.n_layers, 4) and res.top_probs.dtype == torch.float32
    # each top-k row is sorted and rank 0 is the arg-max
    assert (res.top_probs[:, :-1] >= res.top_probs[:, 1:]).all()


def test_logit_lens_other_position_and_earlier_layers_differ():
    m = tiny("llama")
    toks = tokens(1)
    res = logit_lens(m, toks, position=4)
    real = torch.log_softmax(m.run(toks).logits[0, 4].float(), -1)
    torch.testing.assert_close(res.logprobs[-1], real, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(res.logprobs[0], res.logprobs[-1], atol=1e-3)
    assert res.target_token is None and res.target_prob is None and res.target_rank is None


def test_logit_lens_input_errors():
    m = tiny("llama")
    with pytest.raises((InputError, TypeCheckError)):  # the jaxtyping test hook may catch it first
        logit_lens(m, tokens(2))
    with pytest.raises(InputError, match="outside"):
        logit_lens(m, tokens(1, pos=5), position=5)
    with pytest.raises(InputError, match="vocabulary"):
        logit_lens(m, tokens(1), target=V + 3)
    with pytest.raises(InputError, match=r"the prompt is empty \(0 tokens\)"):  # not "position -1 is outside"
        logit_lens(m, tokens(1, pos=5)[:, :0])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("position", [-1, 4])
def test_dla_parts_sum_to_the_real_logit_difference(family, position):
    m = tiny(family)
    toks = tokens()
    answers = torch.tensor([[5, 9], [11, 3], [40, 41]])
    res = direct_logit_attribution(m, toks, answers, position=position)
    n, L, H = 3, m.cfg.n_layers, m.cfg.n_heads
    assert res.embed.shape == (n,) and res.attn.shape == (n, L) and res.heads.shape == (n, L, H)
    assert res.mlp.shape == (n, L) and res.bias.shape == (n,) and res.logit_diff.shape == (n,)
    logits = m.run(toks).logits[:, position]
    if family == "gemma2":  # pre-soft-cap logits: undo the tanh cap (exact in float64 for these small logits)
        cap = m.hf.config.final_logit_softcapping
        logits = cap * torch.atanh(logits.double() / cap)
    real = logits[torch.arange(n), answers[:, 0]] - logits[torch.arange(n), answers[:, 1]]
    torch.testing.assert_close(res.logit_diff, real.float(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(res.total(), res.logit_diff, atol=1e-5, rtol=1e-4)
    # the parts are not trivially zero
    assert res.heads.abs().amax() > 1e-3 and res.mlp.abs().amax() > 1e-3 and res.embed.abs().amax() > 1e-3


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "gemma2", "llama"])
def test_dla_heads_plus_constant_make_the_attention_branch(family):
    """attn - heads.sum(-1) is the constant part of the branch: zero without b_O (Llama), non-zero with
    one; for Gemma 2 the frozen post-attention norm keeps heads additive."""
    m = tiny(family)
    toks = tokens()
    answers = torch.tensor([[5, 9], [11, 3], [40, 41]])
    res = direct_logit_attribution(m, toks, answers)
    const = res.attn - res.heads.sum(-1)
    if m.b_O(0) is None:
        torch.testing.assert_close(const, torch.zeros_like(const), atol=1e-5, rtol=0)
    else:
        assert const.abs().amax() > 1e-4


def test_dla_is_linear_in_the_answer_direction():
    """Swapping (correct, wrong) negates every part."""
    m = tiny("gpt2")
    toks = tokens()
    answers = torch.tensor([[5, 9], [11, 3], [40, 41]])
    a = direct_logit_attribution(m, toks, answers)
    b = direct_logit_attribution(m, toks, answers.flip(1))
    for name in ("embed", "attn", "heads", "mlp", "bias", "logit_diff"):
        torch.testing.assert_close(getattr(b, name), -getattr(a, name), atol=1e-6, rtol=1e-5)


def test_dla_errors():
    m = tiny("llama")
    for bad in (torch.tensor([[1, 2, 3]] * 3), torch.tensor([[1, 2]] * 2)):
        with pytest.raises((ShapeError, TypeCheckError)):  # the jaxtyping test hook may catch it first
            direct_logit_attribution(m, tokens(), bad)
    with pytest.raises(ShapeError, match=r"\[batch, 2\]"):
        _check_answers(torch.tensor([[1, 2, 3]] * 3), 3)
    with pytest.raises(ShapeError, match="rows"):
        _check_answers(torch.tensor([[1, 2]] * 2), 3)
    with pytest.raises(InputError, match="outside"):
        direct_logit_attribution(m, tokens(), torch.tensor([[1, 2]] * 3), position=20)
