"""Head scores and repeated random tokens on tiny random models.

Claims tested: the vectorised scores equal a naive per-prompt, per-head, per-query loop over the
attention pattern; a pattern forced (Replace on hook_pattern) to the previous token, the earlier copy,
or the token after it scores exactly 1 on that score.
"""

from __future__ import annotations

import pytest
import torch
import transformers

import mechscope
from mechscope import Replace
from mechscope.analysis import head_scores, repeated_random_tokens
from mechscope.core.errors import InputError

V = 101


def tiny(family: str = "llama", seed: int = 0) -> mechscope.HookedModel:
    common = dict(vocab_size=V, num_hidden_layers=2, max_position_embeddings=64, bos_token_id=1,
                  eos_token_id=2, pad_token_id=0)
    if family == "gpt2":
        cfg, cls = transformers.GPT2Config(**common, n_embd=32, n_head=4, n_inner=48), transformers.GPT2LMHeadModel
    else:
        cfg = transformers.LlamaConfig(**common, hidden_size=32, intermediate_size=48, num_attention_heads=4,
                                       num_key_value_heads=2, initializer_range=0.3)
        cls = transformers.LlamaForCausalLM
    torch.manual_seed(seed)
    hf = cls(cfg).eval()
    for p in hf.parameters():
        p.requires_grad_(False)
    return mechscope.HookedModel(hf, name=f"tiny-{family}")


def test_repeated_random_tokens_layout():
    m = tiny()
    t = repeated_random_tokens(m, batch=3, seq_len=7, seed=1)
    assert t.shape == (3, 15) and t.dtype == torch.long
    assert (t[:, 0] == 1).all()  # BOS from the config
    assert torch.equal(t[:, 1:8], t[:, 8:])
    assert not (t[:, 1:] == 1).any()  # BOS never drawn inside
    assert torch.equal(t, repeated_random_tokens(m, batch=3, seq_len=7, seed=1))
    assert not torch.equal(t, repeated_random_tokens(m, batch=3, seq_len=7, seed=2))
    nb = repeated_random_tokens(m, batch=2, seq_len=5, prepend_bos=False)
    assert nb.shape == (2, 10) and torch.equal(nb[:, :5], nb[:, 5:])
    with pytest.raises(InputError, match="seq_len"):
        repeated_random_tokens(m, seq_len=1)


def naive_scores(model, toks):
    """Per-prompt, per-head, per-query loop over the cached pattern (BOS + seq + seq layout)."""
    _, cache = model.run(toks, cache=["blocks.*.attn.hook_pattern"])
    half = (toks.shape[1] - 1) // 2
    L, H = model.cfg.n_layers, model.cfg.n_heads
    out = {k: torch.zeros(L, H, dtype=torch.float64) for k in ("induction", "previous_token", "duplicate_token")}
    count = 0
    for layer in range(L):
        p = cache[f"blocks.{layer}.attn.hook_pattern"].double()
        for b in range(toks.shape[0]):
            for h in range(H):
                for i in range(1 + half, 1 + 2 * half):
                    assert toks[b, i] == toks[b, i - half]
                    out["induction"][layer, h] += p[b, h, i, i - half + 1]
                    out["previous_token"][layer, h] += p[b, h, i, i - 1]
                    out["duplicate_token"][layer, h] += p[b, h, i, i - half]
                    count += layer == 0 and h == 0
    return {k: (v / count).float() for k, v in out.items()}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_head_scores_equal_a_naive_loop(family):
    m = tiny(family)
    toks = repeated_random_tokens(m, batch=3, seq_len=6, seed=3)
    got = head_scores(m, toks)
    want = naive_scores(m, toks)
    assert set(got) == {"induction", "previous_token", "duplicate_token"}
    for k in want:
        assert got[k].shape == (m.cfg.n_layers, m.cfg.n_heads) and got[k].dtype == torch.float32
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=1e-5)
    # default tokens are the same as an explicit call with the same arguments
    d = head_scores(m, seq_len=6, batch=3, seed=3)
    torch.testing.assert_close(d["induction"], got["induction"])


def forced(target_of_query):
    """A Replace callable: every head attends only to target_of_query(i) from query i."""
    def fn(pattern):
        q, k = pattern.shape[-2:]
        new = torch.zeros_like(pattern)
        for i in range(q):
            new[..., i, target_of_query(i)] = 1.0
        return new
    return fn


@pytest.mark.parametrize("score,target", [
    ("previous_token", lambda half: lambda i: max(i - 1, 0)),
    ("duplicate_token", lambda half: lambda i: i - half if i > half else i),
    ("induction", lambda half: lambda i: i - half + 1 if i > half else i),
])
def test_forced_pattern_scores_one(score, target):
    m = tiny()
    half = 6
    toks = repeated_random_tokens(m, batch=2, seq_len=half)
    fn = forced(target(half))
    ivs = [Replace(f"blocks.{L}.attn.hook_pattern", value=fn) for L in range(m.cfg.n_layers)]
    s = head_scores(m, toks, interventions=ivs)
    torch.testing.assert_close(s[score], torch.ones(m.cfg.n_layers, m.cfg.n_heads))
    for other in set(s) - {score}:
        torch.testing.assert_close(s[other], torch.zeros_like(s[other]))


def test_head_scores_rejects_tokens_that_do_not_repeat():
    m = tiny()
    toks = repeated_random_tokens(m, batch=2, seq_len=5)
    toks[:, -1] = (toks[:, -1] + 1) % V
    with pytest.raises(InputError, match="repeated"):
        head_scores(m, toks)
