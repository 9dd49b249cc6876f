"""Attribution graphs on SmolLM2-135M-Instruct (fp32) with random TopK skip transcoders of a small width.

Claims tested on the real model (the transcoders' quality does not matter for these): the local replacement model
with its error nodes reproduces the real logits; edges into feature and logit nodes equal the measured effect of
doubling their source feature in the frozen replacement model; a head's attention score splits exactly into its
component pairs.
"""

from __future__ import annotations

import pytest
import torch

from mechscope.dictionaries import SparseDictionary
from mechscope.graphs import TranscoderSet, attribute, frozen_forward, replacement_state, transcoder_configs
from mechscope.graphs.attention import explain_attention
from mechscope.graphs.validate import validate

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def setup(real_model):
    out = []
    for i, c in enumerate(transcoder_configs(real_model, d_sae=256, k=8, skip=True)):
        d = SparseDictionary(c).initialize(seed=i)
        with torch.no_grad():
            d.W_enc.mul_(4.0)
            d.W_dec.mul_(0.2)
        out.append(d.eval())
    ts = TranscoderSet(out, model_name=real_model.cfg.name)
    tok = real_model.to_tokens("The capital of France is", prepend_bos=True)[0]
    return real_model, ts, tok


def test_replacement_model_reproduces_smollm2(setup):
    m, ts, tok = setup
    st = replacement_state(m, ts, tok)
    with frozen_forward(m, ts, st, 1, grad=False) as r:
        got = r.logits[0]
    assert float((got - st.logits).abs().max()) < 1e-3 * float(st.logits.abs().max())
    assert int(got[-1].argmax()) == int(st.logits[-1].argmax())


def test_smollm2_edges_are_perturbation_effects(setup):
    m, ts, tok = setup
    g = attribute(m, ts, tok, max_feature_nodes=40, batch_size=16, progress=False)
    assert g.logit_strs[0] == " Paris" and g.n_features == 40
    v = validate(m, ts, g, n_features=10, batch=5)
    # float32 through 30 layers: relative to the largest edge
    assert v.frozen_features.rel_error < 1e-3 and v.frozen_features.pearson > 0.9999
    assert v.frozen_logits.rel_error < 1e-3 and v.frozen_logits.pearson > 0.9999


def test_smollm2_attention_score_splits_exactly(setup):
    m, ts, tok = setup
    e = explain_attention(m, ts, tok, 23, 3, len(tok) - 1, 4, top=5)
    assert e.total == pytest.approx(e.score, rel=1e-4, abs=1e-4)
