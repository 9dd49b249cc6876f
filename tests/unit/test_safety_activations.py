"""Activations for probes: one batched, padded pass equals one forward per example at the scored tokens."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import mechscope
from mechscope.core.errors import InputError
from mechscope.safety.activations import collect_features
from tests.conftest import make_tiny, tiny_hooked


@dataclass
class Ex:
    tokens: torch.Tensor
    score_mask: torch.Tensor


def examples(vocab: int, n: int = 7, seed: int = 0) -> list[Ex]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        pos = int(torch.randint(3, 12, (1,), generator=g))
        mask = torch.rand(pos, generator=g) < 0.5
        mask[int(torch.randint(0, pos, (1,), generator=g))] = True
        out.append(Ex(torch.randint(0, vocab, (pos,), generator=g), mask))
    return out


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("how", ["mean", "max", "last"])
def test_batched_padded_features_equal_one_forward_per_example(family, how):
    model = tiny_hooked(family)
    exs = examples(model.cfg.d_vocab)
    f = collect_features(model, exs, ["blocks.*.hook_resid_post", "blocks.0.hook_attn_out"], aggregation=how,
                         batch_size=3, keep_tokens=True, progress=False)
    assert "blocks.0.hook_attn_out" in f.sites and len(f.sites) == model.cfg.n_layers + 1
    for i, ex in enumerate(exs):
        cache = model.run(ex.tokens[None], cache=f.sites).cache
        for site in f.sites:
            acts = cache[site][0][ex.score_mask]
            want = {"mean": acts.mean(0), "max": acts.max(0).values, "last": acts[-1]}[how]
            torch.testing.assert_close(f.vectors[site][i], want.float(), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(f.tokens[site][i], acts.float(), atol=1e-5, rtol=1e-5)
    assert f.n_scored.tolist() == [int(e.score_mask.sum()) for e in exs]
    sub = f.subset([2, 0])
    assert torch.equal(sub.vectors[f.sites[0]][1], f.vectors[f.sites[0]][0]) and len(sub) == 2


def test_bad_inputs_name_the_fix():
    model = tiny_hooked("llama")
    exs = examples(model.cfg.d_vocab, n=2)
    with pytest.raises(InputError, match="no examples"):
        collect_features(model, [], progress=False)
    with pytest.raises(InputError, match="unknown aggregation 'median'"):
        collect_features(model, exs, aggregation="median", progress=False)
    with pytest.raises(InputError, match="example 1 scores no token"):
        collect_features(model, [exs[0], Ex(exs[1].tokens, torch.zeros_like(exs[1].score_mask))], progress=False)
    with pytest.raises(InputError, match="probes need one vector per position"):
        collect_features(model, exs, "blocks.0.attn.hook_pattern", progress=False)


def test_nan_activations_are_refused_with_the_site():
    hf = make_tiny("llama")  # a fresh copy: tiny_hooked's model is shared by every test
    with torch.no_grad():
        hf.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    model = mechscope.HookedModel(hf, name="tiny-llama-nan")
    exs = examples(model.cfg.d_vocab, n=2)
    with pytest.raises(InputError, match=r"NaN/inf activation values at blocks\.1\.hook_resid_post"):
        collect_features(model, exs, "blocks.1.hook_resid_post", progress=False)
