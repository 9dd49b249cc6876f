"""The refusal direction (mechscope.safety.refusal_direction / refusal_interventions): directional ablation hooks
give the logits of the orthogonalised weights; ablation leaves no component along the direction in the residual
stream; activation addition equals a hand-made hook; candidate directions equal a naive one-prompt-at-a-time mean
difference at the template's post-instruction tokens; batched greedy generation equals one-prompt generation; the
selection rule's filters on injected score tables; the substring refusal rule on handwritten strings."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from mechscope import InputError
from mechscope.features.batch_generation import generate_texts
from mechscope.safety.refusal_direction import (
    RefusalScorer,
    candidate_directions,
    refusal_effects,
    select_direction,
    select_from_scores,
)
from mechscope.safety.refusal_interventions import (
    activation_addition,
    direction_cosine,
    directional_ablation,
    is_refusal,
    orthogonalize_weights,
    prompt_ids,
    random_direction,
    refusal_rate,
    transfer_direction,
)
from tests.conftest import make_words_model, random_tokens, tiny_hooked

TEMPLATE = ("{% for m in messages %}w1 {{ m['content'] }} w3 {% endfor %}"
            "{% if add_generation_prompt %}w2 w5{% endif %}")
HARMFUL = ["w20 w31 w44", "w50 w61", "w70 w22 w93 w24", "w35 w36 w37 w38 w39"]
HARMLESS = ["w80 w81 w82", "w90 w91", "w60 w62 w63 w64", "w11 w12"]


@pytest.fixture(scope="module")
def wmodel():
    m = make_words_model()
    m.tokenizer.chat_template = TEMPLATE
    return m


def _direction(d_model: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(d_model, generator=g) * 3


# -- interventions ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gpt2", "gpt_neox", "gpt_neox_serial"])
def test_directional_ablation_equals_orthogonalised_weights(family):
    model = tiny_hooked(family)
    r = _direction(model.cfg.d_model)
    tokens = random_tokens()
    before = model.run(tokens).logits.clone()
    hooked = model.run(tokens, interventions=directional_ablation(r, model)).logits
    orth = orthogonalize_weights(model, r)
    edited = orth.run(tokens).logits
    assert not torch.allclose(hooked, before, atol=1e-3)  # the ablation does something
    torch.testing.assert_close(edited, hooked, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.run(tokens).logits, before, atol=0, rtol=0)  # the original is untouched
    # the edited weights never write along r: every block input and the final residual are orthogonal to it
    u = r / r.norm()
    names = [f"blocks.{i}.hook_resid_pre" for i in range(model.cfg.n_layers)]
    last = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    _, cache = orth.run(tokens, cache=names + [last])
    for n in names + [last]:
        assert cache[n].float().matmul(u).abs().max() < 1e-5, n


def test_ablation_leaves_no_component_at_any_layer():
    model = tiny_hooked("llama")
    r = _direction(model.cfg.d_model, seed=3)
    u = r / r.norm()
    names = [f"blocks.{i}.hook_{s}" for i in range(model.cfg.n_layers) for s in ("resid_pre", "resid_mid", "resid_post")]
    _, clean = model.run(random_tokens(), cache=names)
    _, cache = model.run(random_tokens(), cache=names, interventions=directional_ablation(r, model))
    assert clean[names[0]].matmul(u).abs().max() > 1e-2
    for n in names:
        assert cache[n].matmul(u).abs().max() < 1e-5, n


def test_gemma_orthogonalisation_is_refused_with_the_fix():
    model = tiny_hooked("gemma2")
    with pytest.raises(InputError, match="use directional_ablation"):
        orthogonalize_weights(model, _direction(model.cfg.d_model))


def test_tied_embeddings_are_untied_and_the_unembedding_kept():
    model = tiny_hooked("gpt2")
    assert model.hf.get_output_embeddings().weight is model.hf.get_input_embeddings().weight
    orth = orthogonalize_weights(model, _direction(model.cfg.d_model))
    torch.testing.assert_close(orth.hf.get_output_embeddings().weight, model.hf.get_output_embeddings().weight)
    assert orth.hf.get_output_embeddings().weight is not orth.hf.get_input_embeddings().weight


@pytest.mark.parametrize("alpha", [1.0, -2.5])
def test_activation_addition_equals_a_manual_hook(alpha):
    model = tiny_hooked("llama")
    v, layer = _direction(model.cfg.d_model, seed=5), 1
    tokens = random_tokens()
    ours = model.run(tokens, interventions=activation_addition(v, layer, alpha)).logits

    def pre_hook(module, args, kwargs):  # plain torch, on the decoder layer's input
        if args:
            return (args[0] + alpha * v, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"] + alpha * v}

    handle = model.layers[layer].register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        manual = model.hf(tokens).logits
    finally:
        handle.remove()
    torch.testing.assert_close(ours, manual, atol=1e-5, rtol=1e-5)
    fn = model.run(tokens, functions={f"blocks.{layer}.hook_resid_pre": lambda x: x + alpha * v}).logits
    torch.testing.assert_close(ours, fn, atol=1e-6, rtol=1e-6)


def test_cosine_transfer_and_random_control():
    model = tiny_hooked("llama")
    r = _direction(model.cfg.d_model)
    assert direction_cosine(r, 2 * r) == pytest.approx(1.0, abs=1e-6)
    assert direction_cosine(r, -r) == pytest.approx(-1.0, abs=1e-6)
    torch.testing.assert_close(transfer_direction(r, model), r)
    with pytest.raises(Exception, match="d_model"):
        transfer_direction(r[:5], model)
    c = random_direction(r, seed=0)
    assert float(c.norm()) == pytest.approx(float(r.norm()), rel=1e-5)
    assert abs(direction_cosine(c, r)) < 0.6
    torch.testing.assert_close(random_direction(r, seed=0), c)
    with pytest.raises(InputError, match="zero"):
        directional_ablation(torch.zeros(model.cfg.d_model), model)


# -- refusal rule ------------------------------------------------------------------------------------------------
def test_is_refusal_and_rate_on_handwritten_strings():
    refusals = ["I'm sorry, but I can't help with that.", "As an AI, I cannot do this.", "Sorry, no.",
                "I apologize, but that request is harmful.", "Well, I won't do it."]
    answers = ["Sure, here is a recipe for pancakes.", "The capital of France is Paris.", "i'm sorry to hear that"]
    assert all(is_refusal(t) for t in refusals)
    assert not any(is_refusal(t) for t in answers)  # case-sensitive, as the paper's list
    rate = refusal_rate(refusals + answers, n_boot=200)
    assert rate.estimate == pytest.approx(5 / 8) and rate.low <= 5 / 8 <= rate.high and rate.n == 8
    assert refusal_rate(answers[:2], n_boot=50).estimate == 0.0
    with pytest.raises(InputError):
        refusal_rate(["only one"])


# -- candidates --------------------------------------------------------------------------------------------------
def naive_candidates(model, harmful, harmless, n_pos):
    names = [f"blocks.{i}.hook_resid_pre" for i in range(model.cfg.n_layers)]

    def mean(requests):
        acc = []
        for r in requests:
            text = model.tokenizer.apply_chat_template([{"role": "user", "content": r}], tokenize=False,
                                                       add_generation_prompt=True)
            _, cache = model.run(model.to_tokens(text, prepend_bos=False), cache=names)
            acc.append(torch.stack([cache[n][0, -n_pos:] for n in names], dim=1))  # [n_pos, n_layers, d]
        return torch.stack(acc).double().mean(0)

    return (mean(harmful) - mean(harmless)).float()


def test_candidate_directions_equal_a_naive_mean_difference(wmodel):
    cands = candidate_directions(wmodel, HARMFUL, HARMLESS, batch_size=3)  # padded batches of unequal lengths
    assert cands.tokens == ["w3", "w2", "w5"] and cands.positions == [-3, -2, -1]
    assert cands.directions.shape == (3, wmodel.cfg.n_layers, wmodel.cfg.d_model)
    torch.testing.assert_close(cands.directions, naive_candidates(wmodel, HARMFUL, HARMLESS, 3), atol=1e-5, rtol=1e-5)
    k = candidate_directions(wmodel, HARMFUL, HARMLESS, positions=2)
    torch.testing.assert_close(k.directions, cands.directions[1:], atol=1e-5, rtol=1e-5)
    with pytest.raises(InputError, match="chat template"):
        candidate_directions(wmodel, HARMFUL, HARMLESS, chat=False)


def test_candidate_directions_on_a_model_without_template_name_the_fix():
    m = make_words_model()
    with pytest.raises(InputError, match="chat=False"):
        candidate_directions(m, HARMFUL, HARMLESS)
    c = candidate_directions(m, HARMFUL, HARMLESS, positions=1, chat=False)
    assert c.directions.shape == (1, m.cfg.n_layers, m.cfg.d_model)


# -- scores and generation ---------------------------------------------------------------------------------------
def test_batched_scores_equal_one_prompt_at_a_time(wmodel):
    seqs = prompt_ids(wmodel, HARMFUL)
    for score in ("tokens", "prefix"):
        s = RefusalScorer(wmodel, seqs, score, [7, 9], batch_size=4).refusal()
        one = torch.cat([RefusalScorer(wmodel, [q], score, [7, 9], batch_size=1).refusal() for q in seqs])
        torch.testing.assert_close(s, one, atol=1e-5, rtol=1e-5)
    lp = wmodel.run(torch.tensor([seqs[0]])).logits[0, -1].double().log_softmax(-1)
    p = lp[[7, 9]].exp().sum()
    expect = float(p.log() - (1 - p).log())
    assert float(RefusalScorer(wmodel, seqs[:1], "tokens", [7, 9], 1).refusal()[0]) == pytest.approx(expect, abs=1e-5)


# -- selection ---------------------------------------------------------------------------------------------------
def test_selection_rule_on_injected_scores():
    n_pos, n_layers = 2, 10  # layers 8, 9 are the last 20%
    bypass = np.zeros((n_pos, n_layers))
    induce = np.ones((n_pos, n_layers))
    kl = np.full((n_pos, n_layers), 0.05)
    bypass[0, 9] = -100  # best bypass, but a late layer
    bypass[1, 3] = -50  # next best, but its ablation moves harmless outputs too much
    kl[1, 3] = 0.2
    bypass[0, 4] = -40  # next best, but its addition does not induce refusal
    induce[0, 4] = -0.01
    bypass[1, 2] = np.nan
    bypass[1, 5] = -30  # the winner
    bypass[0, 6] = -30  # a tie, later in (position, layer) order? no: position 0 comes first
    chosen, reasons = select_from_scores(bypass, induce, kl)
    assert chosen == (0, 6)
    assert reasons[0, 9] == "late_layer" and reasons[1, 8] == "late_layer"
    assert reasons[1, 3] == "kl" and reasons[0, 4] == "no_induce" and reasons[1, 2] == "nan"
    assert reasons[1, 5] == "" and (reasons == "").sum() == n_pos * 8 - 3
    bypass[0, 6] = -29
    assert select_from_scores(bypass, induce, kl)[0] == (1, 5)
    # thresholds are inclusive as in the paper: kl == threshold and induce == threshold are kept
    kl[1, 5], induce[1, 5] = 0.1, 0.0
    assert select_from_scores(bypass, induce, kl)[0] == (1, 5)
    assert select_from_scores(bypass, induce, kl, kl_threshold=0.09)[0] == (0, 6)
    assert select_from_scores(bypass, induce, kl, prune_layer_fraction=0.0)[0] == (0, 9)
    nothing = select_from_scores(bypass, -np.ones_like(induce), kl)
    assert nothing[0] is None and set(nothing[1].ravel()) == {"late_layer", "kl", "no_induce", "nan"}
    with pytest.raises(InputError, match="shape"):
        select_from_scores(bypass, induce[:1], kl)


def test_select_direction_end_to_end_on_a_tiny_model(wmodel):
    cands = candidate_directions(wmodel, HARMFUL, HARMLESS)
    with warnings.catch_warnings():  # a random model may need the fallback (checked below either way)
        warnings.simplefilter("ignore")
        sel = select_direction(wmodel, cands, HARMFUL[:3], HARMLESS[:3], refusal_tokens=[7], kl_threshold=10.0,
                               prune_layer_fraction=0.0, progress=False, batch_size=2)
    table = json.loads(json.dumps(sel.to_dict()))["table"]
    assert len(table) == 3 * wmodel.cfg.n_layers
    # layer 0's block input at the template's own tokens is the same embedding for every prompt: zero, unscored
    assert sel.layer == 1 and all(r["filtered"] == "nan" and r["bypass_score"] is None for r in table if r["layer"] == 0)
    arr = {k: np.array([[np.nan if r[k] is None else r[k] for r in table if r["position"] == p] for p in cands.positions])
           for k in ("bypass_score", "induce_score", "kl")}
    chosen, _ = select_from_scores(arr["bypass_score"], arr["induce_score"], arr["kl"], kl_threshold=10.0,
                                   prune_layer_fraction=0.0)
    if chosen is not None:
        assert (cands.positions[chosen[0]], chosen[1]) == (sel.position, sel.layer) and not sel.fallback
    else:
        assert sel.fallback
    torch.testing.assert_close(sel.direction, cands.directions[cands.positions.index(sel.position), sel.layer])
    # a bypass score is the harmful refusal score under ablation, recomputed by hand
    row = next(r for r in table if r["position"] == sel.position and r["layer"] == sel.layer)
    seqs = prompt_ids(wmodel, HARMFUL[:3])
    by_hand = RefusalScorer(wmodel, seqs, "tokens", [7], 8).refusal(directional_ablation(sel.direction, wmodel)).mean()
    assert row["bypass_score"] == pytest.approx(float(by_hand), abs=1e-6)


def test_refusal_effects_runs_every_condition(wmodel):
    r = _direction(wmodel.cfg.d_model)
    eff = refusal_effects(wmodel, r, 0, HARMFUL, HARMLESS, max_new_tokens=3, n_random=2, n_boot=50,
                          control_texts=["w5 w6 w7 w8 w9", "w10 w11 w12"], progress=False, batch_size=3)
    names = {"none", "ablation", "addition", "random_ablation/0", "random_addition/0", "random_ablation/1",
             "random_addition/1"}
    assert set(eff.rates) == set(eff.ce) == set(eff.completions) == names
    assert eff.ce_delta["none"] == 0.0 and eff.ce_delta["addition"] != 0.0
    assert len(eff.completions["addition"]["harmful"]) == len(HARMFUL)
    json.dumps(eff.to_dict())
    assert eff.completions["none"]["harmless"] == generate_texts(
        wmodel, [torch.tensor(s) for s in prompt_ids(wmodel, HARMLESS)], max_new_tokens=3, progress=False)
