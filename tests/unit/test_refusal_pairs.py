"""Refusal-style prefixes as twin pairs (mechscope.safety.refusal): the pairs share their prompt and differ only in
the scored answer; the causal check's metric on them equals log P(refusal) - log P(compliance) by hand; a planted
direction that raises the refusal prefix's logit is found causal; built-in requests become chat twins; bad
inputs name the fix."""

from __future__ import annotations

import pytest
import torch

from mechscope import InputError
from mechscope.data.labelled_builtins import load_labelled
from mechscope.safety.causal import causal_check
from mechscope.safety.refusal import COMPLIANCE, REFUSAL, refusal_pairs
from tests.conftest import make_words_model
from tests.unit.test_causal_check import SITE, naive_pair_metrics, planted_direction

REQUESTS = ["w20 w31 w44", "w50 w61", "w70 w22 w93 w24", "w35 w36 w37", "w80 w81 w82", "w90 w91"]


@pytest.fixture(scope="module")
def model():
    return make_words_model()


def test_text_pairs_measure_refusal_against_compliance_and_a_planted_direction_is_causal(model):
    pairs = refusal_pairs(REQUESTS, refusal="w7", compliance="w9", chat=False)  # planted_direction favours w7 over w9
    assert len(pairs) == 12 and pairs.labels.tolist() == [1, 0] * 6 and len(pairs.twins()) == 6
    assert [e.text for e in pairs.examples[:2]] == ["w20 w31 w44 w7", "w20 w31 w44 w9"]
    check = causal_check(model, planted_direction(model).float(), pairs, site=SITE, alphas=(-4, 0, 4), n_random=8,
                         n_boot=200)
    naive = torch.tensor(naive_pair_metrics(model, pairs), dtype=torch.float64)
    torch.testing.assert_close(check.pair_clean.double(), naive, atol=1e-4, rtol=1e-4)
    assert check.verdict == "causal" and check.estimate[check.alphas.index(4.0)] > 0


def test_builtin_harmful_requests_become_chat_twins():
    harm = load_labelled("harmfulness")
    pairs = refusal_pairs(harm)
    n_harmful = int(harm.labels.sum())
    assert len(pairs) == 2 * n_harmful and pairs.name == "refusal:harmfulness"
    for i0, i1 in list(pairs.twins().values())[:20]:  # (label 0, label 1) per group
        a, b = pairs.examples[i1], pairs.examples[i0]
        assert a.messages[:-1] == b.messages[:-1] and a.messages[-1].role == "assistant"
        assert (a.messages[-1].content, b.messages[-1].content, a.label, b.label) == (REFUSAL, COMPLIANCE, 1, 0)
    assert len(refusal_pairs(harm, label=None)) == 2 * len(harm)


def test_bad_inputs_name_the_fix():
    with pytest.raises(InputError, match="two different non-empty texts"):
        refusal_pairs(REQUESTS, refusal="w7", compliance="w7")
    with pytest.raises(InputError, match="no requests"):
        refusal_pairs([])
    with pytest.raises(InputError, match="not non-empty strings"):
        refusal_pairs(["w5", " "])
    with pytest.raises(InputError, match="unknown"):
        refusal_pairs("harmfulnes")
