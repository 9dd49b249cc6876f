"""The sparse-dictionary pipeline on the default real model (SmolLM2-135M-Instruct, fp32), small settings:
real text -> harvested activations -> TopK SAE -> evaluation with the SAE spliced in; and splicing with the
error term leaves the model's logits as they were, while an edit of one latent moves them by its decoder
direction."""

from __future__ import annotations

import pytest
import torch

from mechscope.dictionaries import Splice
from mechscope.training.pipeline import evaluate_on_corpus

pytestmark = pytest.mark.real
HOOK = "blocks.6.hook_resid_post"


@pytest.fixture(scope="module")
def small_sae(real_sae):
    """The session's small TopK SAE at ``blocks.6.hook_resid_post`` (see ``tests/conftest.py``)."""
    d, corpus = real_sae
    assert d.cfg.hook_in == HOOK
    return d, corpus


def test_small_topk_sae_reconstructs_held_out_text(real_model, small_sae):
    d, corpus = small_sae
    e = evaluate_on_corpus(real_model, d, corpus=corpus, n_tokens=3000, progress=False)
    assert e.l0 == pytest.approx(32, abs=1e-6)  # TopK: exactly k latents per token
    assert e.fvu < 0.6 and e.cosine_similarity > 0.7, e.summary()
    assert e.ce_clean < e.ce_with_dictionary < e.ce_zero_ablation, e.summary()
    assert e.ce_loss_recovered > 0.5 and e.delta_lm_loss == pytest.approx(e.ce_with_dictionary - e.ce_clean)


def test_splice_with_error_term_is_exact_and_latent_edits_act(real_model, small_sae):
    d, _ = small_sae
    toks = real_model.to_tokens("The capital of France is Paris, and the capital of Italy is", prepend_bos=True)
    clean, _ = real_model.run(toks)
    spliced, cache = real_model.run(toks, saes=[Splice(d, error_term=True)], cache=[f"{HOOK}.sae.hook_sae_acts_post"])
    assert (spliced - clean).abs().max() < 1e-2 * clean.abs().max()  # float rounding of recons + error only
    acts = cache[f"{HOOK}.sae.hook_sae_acts_post"]
    assert (acts[0, 1:] > 0).sum(-1).eq(32).all()

    # zero the strongest latent at the last position: same as subtracting its decoder contribution
    i = int(acts[0, -1].argmax())
    a = float(acts[0, -1, i])

    def drop(v):
        v = v.clone()
        v[0, -1, i] = 0
        return v

    edited, _ = real_model.run(toks, saes=[Splice(d, error_term=True)],
                               functions={f"{HOOK}.sae.hook_sae_acts_post": drop})
    from mechscope.hooks.interventions import Add

    direction = torch.zeros(toks.shape[1], 576)
    direction[-1] = -a * d.W_dec[i].detach()
    expected, _ = real_model.run(toks, interventions=[Add(site=HOOK, direction=direction)])
    assert (edited[0, -1] - expected[0, -1]).abs().max() < 1e-2 * expected.abs().max()
    assert (edited[0, -1] - clean[0, -1]).abs().max() > 1e-3  # the edit did something
