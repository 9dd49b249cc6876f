"""Attention sites against a naive recomputation from the cached q, k, v: scores, pattern, z, and the
effect of replacing a pattern."""

from __future__ import annotations

import pytest
import torch

import mechscope
from tests.conftest import allowed_keys, random_tokens, sliding_window, tiny_hooked, twin


def _repeat_kv(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[batch, kv_pos, n_kv_heads, d_head] -> [batch, kv_pos, n_heads, d_head] (each kv head serves a group)."""
    groups = n_heads // t.shape[2]
    return torch.cat([t[:, :, h : h + 1].expand(-1, -1, groups, -1) for h in range(t.shape[2])], dim=2)


def _naive_scores(m: mechscope.HookedModel, layer: int, q, k) -> torch.Tensor:
    # 1/sqrt(d_head), except Gemma's configured query_pre_attn_scalar
    scaling = getattr(m.hf.config, "query_pre_attn_scalar", None) or m.cfg.d_head
    scaling = scaling ** -0.5
    scores = torch.einsum("bqhd,bkhd->bhqk", q, _repeat_kv(k, m.cfg.n_heads)) * scaling
    cap = getattr(m.hf.config, "attn_logit_softcapping", None)
    if cap:
        scores = cap * torch.tanh(scores / cap)
    ok = allowed_keys(m.hf.config, layer, q.shape[1])
    return scores.masked_fill(~ok, float("-inf"))


def test_scores_pattern_and_z_match_a_naive_recomputation(family, tokens):
    m = tiny_hooked(family)
    _, c = m.run(tokens, cache="blocks.*.attn.*")
    for L in range(m.cfg.n_layers):
        a = f"blocks.{L}.attn."
        scores, pattern = c[a + "hook_attn_scores"], c[a + "hook_pattern"]
        naive = _naive_scores(m, L, c[a + "hook_q"], c[a + "hook_k"])
        assert torch.equal(torch.isinf(scores), torch.isinf(naive))
        torch.testing.assert_close(scores.nan_to_num(neginf=0), naive.nan_to_num(neginf=0), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(pattern, naive.softmax(-1), rtol=1e-5, atol=1e-6)
        z = torch.einsum("bhqk,bkhd->bqhd", pattern, _repeat_kv(c[a + "hook_v"], m.cfg.n_heads))
        torch.testing.assert_close(c[a + "hook_z"], z, rtol=1e-5, atol=1e-5)


def test_pattern_rows_sum_to_one_causal_and_windowed(family, tokens):
    m = tiny_hooked(family)
    pos = tokens.shape[1]
    _, c = m.run(tokens, cache="blocks.*.attn.hook_pattern")
    windows = [sliding_window(m.hf.config, L) for L in range(m.cfg.n_layers)]
    if family in ("gemma2", "gemma3_text", "mistral"):
        assert any(w is not None and w < pos for w in windows), "the fixture lost its sliding window"
    for L in range(m.cfg.n_layers):
        p = c[f"blocks.{L}.attn.hook_pattern"]
        torch.testing.assert_close(p.sum(-1), torch.ones(p.shape[:-1]), rtol=0, atol=1e-5)
        upper = torch.ones(pos, pos, dtype=torch.bool).triu(1)
        assert (p[..., upper] == 0).all(), "attention to future positions"
        # the support is exactly the allowed keys: causal, and inside the window on sliding layers
        assert torch.equal(p > 0, allowed_keys(m.hf.config, L, pos).expand_as(p))


def test_replacing_a_pattern_acts_as_pattern_times_values(family, tokens):
    """Replace(hook_pattern) gives the output predicted by z' = P' @ v, patched in at hook_z."""
    m = tiny_hooked(family)
    pos = tokens.shape[1]
    _, clean = m.run(tokens, cache=["blocks.0.attn.hook_v", "blocks.0.attn.hook_pattern"])
    g = torch.Generator().manual_seed(1)
    raw = torch.randn(tokens.shape[0], m.cfg.n_heads, pos, pos, generator=g) * 3
    new = raw.masked_fill(~torch.ones(pos, pos, dtype=torch.bool).tril(), float("-inf")).softmax(-1)
    v = _repeat_kv(clean["blocks.0.attn.hook_v"], m.cfg.n_heads)

    for heads in (None, [1, 3]):
        got, _ = m.run(tokens, interventions=[mechscope.Replace("blocks.0.attn.hook_pattern", value=new, heads=heads)])
        pattern = new.clone()
        if heads is not None:
            keep = [h for h in range(m.cfg.n_heads) if h not in heads]
            pattern[:, keep] = clean["blocks.0.attn.hook_pattern"][:, keep]
        z = torch.einsum("bhqk,bkhd->bqhd", pattern, v)
        predicted, _ = m.run(tokens, interventions=[mechscope.Patch("blocks.0.attn.hook_z", source=z)])
        torch.testing.assert_close(got, predicted, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(got, twin(family)(tokens).logits, atol=1e-3), "the replacement had no effect"


@pytest.mark.parametrize("pos", [1, 3])
def test_short_prompts(family, pos):
    """Patterns of 1-token prompts are [[1]]; short prompts stay bit-identical with caching."""
    m = tiny_hooked(family)
    toks = random_tokens(batch=2, pos=pos, seed=9)
    logits, c = m.run(toks, cache="*")
    assert torch.equal(logits, twin(family)(toks).logits)
    p = c["blocks.0.attn.hook_pattern"]
    assert p.shape == (2, m.cfg.n_heads, pos, pos)
    torch.testing.assert_close(p[..., 0, 0], torch.ones(2, m.cfg.n_heads))
