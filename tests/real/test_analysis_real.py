"""Analyses on the default real model (SmolLM2-135M-Instruct, fp32), against REFERENCE.md.

Measured here when written: IOI (60 prompts) mean logit difference +4.02, IO preferred on 58/60;
induction heads L18H6 0.86, L17H3 0.74, L17H4 0.69; previous-token heads L16H0 0.89, L11H1 0.87,
L2H1 0.70 (top 5); attribution vs activation patching of heads on 4 IOI prompts: Pearson 0.89.
"""

from __future__ import annotations

import pytest
import torch

import mechscope
from mechscope.analysis import (
    activation_patching,
    attribution_patching,
    direct_logit_attribution,
    head_scores,
    logit_diff,
    logit_lens,
    make_metric,
)
from mechscope.data import make_ioi_dataset

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def smol() -> mechscope.HookedModel:
    try:
        return mechscope.load("smollm2-135m", dtype="float32")
    except mechscope.ModelLoadError as e:
        pytest.skip(f"default model unavailable: {e}")


@pytest.fixture(scope="module")
def ioi(smol):
    return make_ioi_dataset(smol, 60, seed=0)


def head(i: int, n_heads: int) -> str:
    return f"L{i // n_heads}H{i % n_heads}"


def test_ioi_behaviour(smol, ioi):
    assert ioi.clean_tokens.shape[0] == 60
    logits = smol.run(ioi.clean_tokens, logits_to_keep=1).logits
    ld = logit_diff(logits, ioi.answer_tokens)
    mean, acc = float(ld.mean()), float((ld > 0).float().mean())
    assert mean > 2.0, f"mean IOI logit difference {mean:.2f} (REFERENCE: +5.4 over 10 prompts)"
    assert acc > 0.9, f"IO preferred on {acc:.1%} of prompts"
    corrupt = logit_diff(smol.run(ioi.corrupt_tokens, logits_to_keep=1).logits, ioi.answer_tokens)
    assert float(corrupt.mean()) < 0, "the corrupted prompts should prefer S"


def test_dla_sums_to_the_logit_difference(smol, ioi):
    toks, answers = ioi.clean_tokens[:8], ioi.answer_tokens[:8]
    res = direct_logit_attribution(smol, toks, answers)
    real = logit_diff(smol.run(toks, logits_to_keep=1).logits, answers)
    torch.testing.assert_close(res.logit_diff, real, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(res.total(), res.logit_diff, atol=1e-4, rtol=1e-4)
    # no b_O in Llama: the heads make the whole attention branch
    torch.testing.assert_close(res.heads.sum(-1), res.attn, atol=1e-4, rtol=1e-4)
    # the IOI answer is written late: the last third of the layers carries most of it
    late = res.attn[:, 20:].sum(-1) + res.mlp[:, 20:].sum(-1)
    assert float(late.mean()) > 0.5 * float(res.logit_diff.mean())


def test_logit_lens_paris(smol):
    res = logit_lens(smol, "The capital of France is", target=" Paris", k=5)
    assert res.top_tokens[-1][0] == " Paris"
    real = torch.softmax(smol.run("The capital of France is").logits[0, -1].float(), -1)
    assert float(res.target_prob[-1]) == pytest.approx(float(real[smol.to_tokens(" Paris")[0, 0]]), abs=1e-5)
    assert float(res.target_prob[-1]) == pytest.approx(0.77, abs=0.02)  # REFERENCE.md
    assert int(res.target_rank[-1]) == 0 and int(res.target_rank[0]) > 10


def test_head_scores_find_the_reference_heads(smol):
    scores = head_scores(smol, seq_len=50, batch=4, seed=0)
    H = smol.cfg.n_heads
    ind = scores["induction"].flatten()
    top = [head(int(i), H) for i in ind.topk(3).indices]
    assert float(ind.max()) > 0.5
    assert top[0] == "L18H6" and set(top) == {"L18H6", "L17H3", "L17H4"}, top  # REFERENCE.md
    prev = [head(int(i), H) for i in scores["previous_token"].flatten().topk(5).indices]
    assert {"L16H0", "L11H1", "L2H1"} <= set(prev), prev


def test_resid_patching_on_ioi(smol, ioi):
    """On prompts with S2 at one position: at layer 0 only that position matters (exactly 1 there),
    and by the last layer the information sits at the final position."""
    s2 = int(ioi.word_idx["S2"].mode().values)
    rows = (ioi.word_idx["S2"] == s2).nonzero()[:, 0][:6]
    clean, corrupt, answers = ioi.clean_tokens[rows], ioi.corrupt_tokens[rows], ioi.answer_tokens[rows]
    metric = make_metric("logit_diff", smol.run(clean).logits, smol.run(corrupt).logits, answers)
    res = activation_patching(smol, clean, corrupt, metric, kind="resid_pre", progress=False)
    assert res.values.shape == (smol.cfg.n_layers, clean.shape[1])
    assert float(res.values[0, s2]) == pytest.approx(1.0, abs=1e-4)
    others = torch.cat([res.values[0, :s2], res.values[0, s2 + 1:]])
    torch.testing.assert_close(others, torch.zeros_like(others), atol=1e-4, rtol=0)
    assert float(res.values[-1, -1]) > 0.5 and abs(float(res.values[-1, s2])) < 0.2


def test_attribution_tracks_activation_patching_of_heads(smol, ioi):
    clean, corrupt, answers = ioi.clean_tokens[:4], ioi.corrupt_tokens[:4], ioi.answer_tokens[:4]
    metric = make_metric("logit_diff", smol.run(clean).logits, smol.run(corrupt).logits, answers)
    act = activation_patching(smol, clean, corrupt, metric, kind="heads", progress=False).values
    att = attribution_patching(smol, clean, corrupt, metric, kind="heads").values
    r = float(torch.corrcoef(torch.stack([act.flatten(), att.flatten()]))[0, 1])
    assert r > 0.7, f"Pearson correlation of attribution and activation patching of heads: {r:.3f}"
    # both methods agree on the head that matters most
    assert int(act.abs().argmax()) == int(att.abs().argmax())
