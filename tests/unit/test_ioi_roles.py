"""IOI head classes on a tiny model: the evidence equals naive computations (attention read off the pattern,
direct logit attribution, the copy score written out by hand), and the rules classify synthetic evidence as
documented. The real classification of SmolLM2's circuit is in tests/real/test_circuits_real.py."""

from __future__ import annotations

import pytest
import torch

import mechscope
from mechscope.analysis.bootstrap import CI
from mechscope.circuits.ioi import RULES, HeadEvidence, classify_heads, copy_scores, head_evidence
from mechscope.data.task import Task
from tests.conftest import random_tokens, tiny_hooked


def _fake_ioi(model, n: int = 6, pos: int = 9) -> Task:
    """Random tokens with IOI-like positions: IO at 2, S1 at 3, S2 at 6, END the last."""
    clean, corrupt = random_tokens(n, pos, seed=11), random_tokens(n, pos, seed=12)
    positions = {"IO": torch.full((n,), 2), "S1": torch.full((n,), 3), "S2": torch.full((n,), 6),
                 "end": torch.full((n,), pos - 1)}
    return Task("ioi", clean, corrupt, clean[:, 2].clone(), clean[:, 3].clone(), positions=positions)


def test_evidence_equals_naive_reads():
    m = tiny_hooked("llama")
    task = _fake_ioi(m)
    ev = head_evidence(m, task, ["a1.h2", "a0.h1"], n_boot=50)
    _, cache = m.run(task.clean_tokens, cache=["blocks.1.attn.hook_pattern", "blocks.0.attn.hook_pattern",
                                              "blocks.0.hook_resid_post"])
    from mechscope.analysis.dla import direct_logit_attribution

    dla = direct_logit_attribution(m, task.clean_tokens, torch.stack([task.answer, task.wrong], 1))
    for e in ev:
        pat = cache[f"blocks.{e.layer}.attn.hook_pattern"][:, e.index]
        assert e.attention["END->IO"].estimate == pytest.approx(float(pat[:, 8, 2].mean()), abs=1e-6)
        assert e.attention["S2->S1+1"].estimate == pytest.approx(float(pat[:, 6, 4].mean()), abs=1e-6)
        assert e.attention["S1+1->S1"].estimate == pytest.approx(float(pat[:, 4, 3].mean()), abs=1e-6)
        assert e.dla.estimate == pytest.approx(float(dla.heads[:, e.layer, e.index].mean()), abs=1e-6)
        assert e.dla.low <= e.dla.estimate <= e.dla.high


def test_copy_score_equals_the_ov_circuit_written_out():
    m = tiny_hooked("llama")  # 4 query heads, 2 key/value heads: head 3 reads value head 1
    resid = torch.randn(10, 64, generator=torch.Generator().manual_seed(0))
    names = torch.arange(10, 20)
    a = m.adapter
    ln1, vproj = m.layer_module(1, a.ln1), m.layer_module(1, "self_attn.v_proj")
    dh = m.cfg.d_head
    v = ln1(resid) @ vproj.weight[dh:2 * dh].T  # value head 1
    out = v @ m.W_O(1)[3]
    final = m.module(a.final_norm)
    for sign, got in zip((1, -1), copy_scores(m, 1, 3, resid, names)):
        top = (final(sign * out) @ m.W_U).topk(5, dim=-1).indices
        assert got == pytest.approx(float((top == names[:, None]).any(-1).float().mean()))


def _ev(**kw) -> HeadEvidence:
    def ci(x, lo=None, hi=None):
        return CI(x, x - 0.1 if lo is None else lo, x + 0.1 if hi is None else hi, 10, 100, 0.05)
    att = {k: ci(kw.pop(k.replace("->", "_").replace("+", "p"), 0.0)) for k in
           ("END->IO", "END->S1", "END->S2", "S2->S1", "S2->S1+1", "S1+1->S1")}
    return HeadEvidence(kw.pop("head", "a1.h0"), 1, 0, ci(kw.pop("dla", 0.0)), att, kw.pop("copy", 0.0),
                        kw.pop("neg_copy", 0.0), {"induction": kw.pop("ind", 0.0), "previous_token": kw.pop("prev", 0.0),
                                                 "duplicate_token": kw.pop("dup", 0.0)}, kw.pop("s_inh", None))


@pytest.mark.parametrize("kw, role", [
    (dict(END_IO=0.6, dla=1.0, copy=0.9), "name mover"),
    (dict(END_IO=0.6, dla=-1.0, neg_copy=0.9), "negative name mover"),
    (dict(END_S2=0.6, dla=1.0, neg_copy=0.9), "s suppression"),
    (dict(END_S2=0.5, s_inh=CI(-1.0, -1.2, -0.8, 10, 100, 0.05)), "s-inhibition"),
    (dict(END_S2=0.5, s_inh=CI(-0.1, -0.2, 0.05, 10, 100, 0.05)), "unclassified"),  # interval crosses 0
    (dict(S2_S1p1=0.5, ind=0.6), "induction"),
    (dict(S2_S1=0.5, dup=0.6), "duplicate token"),
    (dict(S1p1_S1=0.8, prev=0.9), "previous token"),
    (dict(END_IO=0.6, dla=0.05, copy=0.9), "unclassified"),  # direct effect interval crosses 0
])
def test_rules_classify_as_documented(kw, role):
    (e,) = classify_heads([_ev(**kw)], clean_logit_diff=4.0)
    assert e.role == role and (role == "unclassified") == (e.why == "")
    assert set(RULES) >= {role} or role == "unclassified"


def test_bad_inputs_name_the_fix():
    m = tiny_hooked("llama")
    task = _fake_ioi(m)
    with pytest.raises(mechscope.InputError, match="a23.h3"):
        head_evidence(m, task, ["L1H2"])
    bare = Task("x", task.clean_tokens, task.corrupt_tokens, task.answer, task.wrong)
    with pytest.raises(mechscope.InputError, match="load_task\\('ioi'"):
        head_evidence(m, bare, ["a1.h2"])
