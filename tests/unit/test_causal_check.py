"""The causal check of a direction (mechscope.safety.causal): the pair metric equals a hand computation,
steering and ablation equal hand-written hooks, a planted direction is found causal and beats every random
direction, a model whose behaviour no direction can move gives 'correlational', KL and CIs behave, and bad
inputs raise errors that name the fix."""

from __future__ import annotations

import json
import random

import pytest
import torch

from mechscope import HookNameError, InputError
from mechscope.data.labelled import Example, LabelledDataset
from mechscope.data.labelled_render import render
from mechscope.hooks.interventions import Add
from mechscope.safety.causal import CausalCheck, causal_check
from tests.conftest import make_words_model

SITE = "blocks.1.hook_resid_post"  # the last layer of the tiny model: only ln_final and the unembedding follow
A, B = "w7", "w9"  # the planted label-1 / label-0 continuations
ID_A, ID_B = 4 + 7, 4 + 9


@pytest.fixture(scope="module")
def model():
    return make_words_model()


def twin_dataset(n_pairs: int = 6, cont=None, seed: int = 0) -> LabelledDataset:
    """Twin text examples: a random prompt of 4-7 words, then a label-1 and a label-0 continuation (scored)."""
    rng = random.Random(seed)
    examples = []
    for g in range(n_pairs):
        prompt = " ".join(f"w{rng.randrange(20, 120)}" for _ in range(rng.randrange(4, 8)))
        c1, c0 = cont(rng) if cont else (A, B)
        for label, c in ((1, c1), (0, c0)):
            text = f"{prompt} {c}"
            examples.append(Example(text=text, label=label, group=f"g{g}",
                                    score_span={"start": len(prompt) + 1, "end": len(text)}))
    return LabelledDataset("twins", tuple(examples))


def multi_token(rng):
    def words(n):
        return " ".join(f"w{rng.randrange(4, 60)}" for _ in range(n))
    return words(3), words(2)


def naive_logprob(logits, tokens, mask) -> float:
    """Sum over scored t of log_softmax(logits[t-1])[tokens[t]], one position at a time."""
    total = 0.0
    for t in range(len(tokens)):
        if mask[t]:
            total += float(torch.log_softmax(logits[t - 1].double(), -1)[tokens[t]])
    return total


def naive_pair_metrics(model, ds, **run_kw) -> list[float]:
    """log P(cont_1 | prompt) - log P(cont_0 | prompt) per group, by plain model.run calls."""
    rendered = render(model, ds)
    by_group = {}
    for ex, r in zip(ds.examples, rendered):
        lp = naive_logprob(model.run(r.tokens[None], **run_kw).logits[0], r.tokens.tolist(), r.score_mask.tolist())
        by_group.setdefault(ex.group, {})[ex.label] = lp
    return [v[1] - v[0] for v in by_group.values()]


def naive_norm_unit(model, ds, site) -> float:
    norms = [model.run(r.tokens[None], cache=[site]).cache[site][0, 1:].double().norm(dim=-1)
             for r in render(model, ds)]
    return float(torch.cat(norms).mean()) / model.cfg.d_model ** 0.5  # per-coordinate RMS


def planted_direction(model) -> torch.Tensor:
    """Raises logit(A) - logit(B) through ln_final: g * (W_U[:, A] - W_U[:, B]) (RMSNorm gain g)."""
    g = model.module("model.norm").weight.detach().double()
    return g * (model.W_U[:, ID_A] - model.W_U[:, ID_B]).detach().double()


# -- the metric and the interventions equal hand computations --------------------------------------
def test_metric_and_add_steering_equal_a_naive_computation(model):
    ds = twin_dataset(4, cont=multi_token)
    torch.manual_seed(1)
    d = torch.randn(model.cfg.d_model)
    res = causal_check(model, d, ds, site="blocks.0.hook_resid_post", alphas=(0, 2), n_random=1, n_boot=10)
    naive = naive_pair_metrics(model, ds)
    assert res.pair_clean.tolist() == pytest.approx(naive, abs=1e-5)
    assert res.clean_metric == pytest.approx(sum(naive) / len(naive), abs=1e-5)
    norm = naive_norm_unit(model, ds, "blocks.0.hook_resid_post")
    assert res.norm_unit == pytest.approx(norm, rel=1e-6)
    # alpha = 0 is the clean run exactly; alpha = 2 equals a plain Add of 2 * norm_unit * unit(d).
    assert res.pair_effects[:, 0].tolist() == [0.0] * 4
    add = Add("blocks.0.hook_resid_post", direction=(d / d.norm()) * 2 * norm)
    steered = naive_pair_metrics(model, ds, interventions=[add])
    assert (res.pair_clean + res.pair_effects[:, 1]).tolist() == pytest.approx(steered, abs=1e-4)
    assert res.n_pairs == 4 and res.info["groups"] == ["g0", "g1", "g2", "g3"]


def test_ablate_equals_a_hand_written_projection_hook(model):
    ds = twin_dataset(3, cont=multi_token, seed=3)
    torch.manual_seed(2)
    d = torch.randn(model.cfg.d_model)
    u = d / d.norm()
    res = causal_check(model, d, ds, site=SITE, alphas=(0,), mode="ablate", n_random=2, n_boot=10)
    project_out = {SITE: lambda x: x - (x @ u)[..., None] * u}
    ablated = naive_pair_metrics(model, ds, functions=project_out)
    assert (res.pair_clean + res.pair_effects[:, 0]).tolist() == pytest.approx(ablated, abs=1e-5)
    assert res.pair_effects.abs().max() > 1e-4  # the ablation did something, so the comparison has teeth
    # ablation is sign-blind
    flipped = causal_check(model, -d, ds, site=SITE, alphas=(0,), mode="ablate", n_random=2, n_boot=10)
    assert torch.allclose(flipped.pair_effects, res.pair_effects, atol=1e-6)


# -- the verdict -----------------------------------------------------------------------------------
def test_a_planted_direction_is_causal_and_beats_every_random_direction(model):
    ds = twin_dataset(6)
    res = causal_check(model, planted_direction(model), ds, site=SITE, alphas=(-4, -1, 0, 1, 4), n_random=8, n_boot=200)
    assert res.verdict == "causal", str(res)
    est = res.estimate
    # The direction moves logit(A) - logit(B) the way its sign says, at every nonzero alpha ...
    assert (est[[0, 1]] < 0).all() and (est[[3, 4]] > 0).all() and est[2] == 0
    # ... and more than any of the 8 random unit directions at the same strength.
    assert (est.abs()[[0, 1, 3, 4]] > res.random_max_abs[[0, 1, 3, 4]]).all()
    assert set(res.passing_alphas) == {-4.0, -1.0, 1.0, 4.0}
    assert abs(float(est[4])) > 3 * float(res.random_max_abs[4])  # large, not a near-tie
    # The negated direction is as causal, and the result says its positive side pushes towards label 0.
    flipped = causal_check(model, -planted_direction(model), ds, site=SITE, alphas=(4,), n_random=8, n_boot=200)
    assert flipped.verdict == "causal" and float(flipped.estimate[0]) < 0 and "opposite to alpha" in flipped.reason


def test_a_behaviour_no_direction_can_move_gives_correlational():
    """Null model: the two continuations share one unembedding row, so logit(A) - logit(B) = 0 whatever
    the residual stream: every effect is exactly 0 and the CI contains 0 (what is checked: the rule does
    not call a zero effect causal, even for the direction that would be causal in the untied model)."""
    m = make_words_model()
    planted = planted_direction(m)  # computed before the tie, as in the untied model
    m.module("lm_head").weight[ID_A] = m.module("lm_head").weight[ID_B]
    res = causal_check(m, planted, twin_dataset(5), site=SITE, alphas=(-4, 4), n_random=4, n_boot=50)
    assert res.verdict == "correlational" and not res.passing_alphas
    assert res.pair_effects.abs().max() < 1e-5 and res.random_effects.abs().max() < 1e-5
    assert "contains 0" in res.reason


def test_a_random_direction_is_not_called_causal(model):
    """A direction drawn like the controls (another seed): for this seed the rule says correlational. A
    property of this draw (a null direction passes at one alpha with chance about 1/9), stated as such."""
    g = torch.Generator().manual_seed(123)
    d = torch.randn(model.cfg.d_model, generator=g, dtype=torch.float64)
    res = causal_check(model, d, twin_dataset(6), site=SITE, alphas=(-4, 4), n_random=8, n_boot=200)
    assert res.verdict == "correlational", str(res)


# -- CIs, KL, output -------------------------------------------------------------------------------
def test_ci_contains_estimate_and_kl_is_zero_at_zero_and_grows(model):
    texts = ["w20 w21 w22 w23 w24 w25", "w50 w41 w32 w23 w14"]
    alphas = (-8, -4, -2, 0, 2, 4, 8)
    res = causal_check(model, planted_direction(model), twin_dataset(5), site="blocks.0.hook_resid_post",
                       alphas=alphas, n_random=3, control_texts=texts, n_boot=200)
    for c in res.effect:
        assert c.low <= c.estimate <= c.high and c.n == 5 and c.n_boot == 200
    zero = alphas.index(0)
    assert float(res.kl[zero]) == 0.0 and res.kl_random[:, zero].eq(0).all()
    for lo, hi in ((2, 4), (4, 8), (-2, -4), (-4, -8)):
        i, j = alphas.index(lo), alphas.index(hi)
        assert 0 < res.kl[i] < res.kl[j]
        assert (0 < res.kl_random[:, i]).all() and (res.kl_random[:, i] < res.kl_random[:, j]).all()
    assert res.info["n_control_tokens"] == 11
    d = res.to_dict()
    json.dumps(d)
    assert d["verdict"] == res.verdict and len(d["effect"]) == len(alphas) and len(d["kl_random_mean"]) == len(alphas)
    text = str(res)
    assert "verdict:" in text and "KL dir" in text and len(text.splitlines()) == len(alphas) + 3


def test_a_probe_is_accepted_and_its_site_is_the_default(model):
    from mechscope.safety.probes import Probe

    direction = planted_direction(model).float()
    probe = Probe(direction=direction, bias=0.0, mean=torch.zeros_like(direction), scale=torch.ones_like(direction),
                  method="diff_means", site=SITE)
    res = causal_check(model, probe, twin_dataset(4), alphas=(2,), n_random=2, n_boot=20)
    assert isinstance(res, CausalCheck) and res.site == SITE and res.mode == "add"
    with pytest.raises(InputError, match="drop site="):
        causal_check(model, probe, twin_dataset(4), site="blocks.0.hook_resid_post", alphas=(2,))


# -- errors ----------------------------------------------------------------------------------------
def test_bad_inputs_raise_errors_that_name_the_fix(model):
    ds = twin_dataset(3)
    d = torch.randn(model.cfg.d_model)
    lone = LabelledDataset("lone", tuple(Example(text=f"w1{i} w2{i}", label=i % 2, group=f"lone{i}",
                                                 score_span={"start": 4}) for i in range(4)))
    with pytest.raises(InputError, match="0 twin groups .* of 4"):
        causal_check(model, d, lone, site=SITE)
    with pytest.raises(InputError, match=r"shape \(10,\).*\[64\] wide"):
        causal_check(model, torch.randn(10), ds, site=SITE)
    with pytest.raises(InputError, match="norm"):
        causal_check(model, torch.zeros(model.cfg.d_model), ds, site=SITE)
    with pytest.raises(HookNameError):
        causal_check(model, d, ds, site="blocks.1.hook_resid_psot")
    with pytest.raises(InputError, match="d_model"):
        causal_check(model, d, ds, site="blocks.1.mlp.hook_post")
    with pytest.raises(InputError, match="pass site="):
        causal_check(model, d, ds)
    with pytest.raises(InputError, match="non-empty"):
        causal_check(model, d, ds, site=SITE, alphas=())
    with pytest.raises(InputError, match="nonzero alpha"):
        causal_check(model, d, ds, site=SITE, alphas=(0,))
    with pytest.raises(InputError, match="n_random"):
        causal_check(model, d, ds, site=SITE, n_random=0)
    with pytest.raises(InputError, match="mode"):
        causal_check(model, d, ds, site=SITE, mode="clamp")
    with pytest.raises(InputError, match="list of strings"):
        causal_check(model, d, ds, site=SITE, control_texts="w1 w2")
    differ = LabelledDataset("differ", ds.examples[:4] + (
        Example(text="w30 w31 w7", label=1, group="x", score_span={"start": 8}),
        Example(text="w30 w32 w9", label=0, group="x", score_span={"start": 8})))
    with pytest.raises(InputError, match="prompts differ"):
        causal_check(model, d, differ, site=SITE)
    with pytest.warns(UserWarning, match="1 groups .* not twins"):
        res = causal_check(model, d, LabelledDataset("extra", ds.examples + lone.examples[:1]), site=SITE,
                           alphas=(1,), n_random=1, n_boot=10)
    assert res.n_pairs == 3 and res.info["n_skipped_groups"] == 1
