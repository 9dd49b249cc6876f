"""mechscope.forensics.memorisation(_edit): gradient-norm maps, twin patching and the targeted removal of a canary
planted into a tiny word-tokenizer Llama (the pattern of tests/unit/test_planted.py::test_plant_a_canary)."""

from __future__ import annotations

import copy
import json
import types

import pytest
import torch

import mechscope
from mechscope.core.errors import InputError
from mechscope.forensics.memorisation import (
    TWIN_KINDS,
    control_canaries,
    gradient_norm_map,
    greedy_extracts,
    pick_twin,
    secret_logprob,
    secret_tokens,
    twin_patched_logprob,
    twin_patching,
    with_name,
)
from mechscope.forensics.memorisation_edit import ablate_components, unlearn_secret
from mechscope.planted import load_recipe, run_recipe, validate_recipe
from tests.conftest import make_tokenizer
from tests.unit.test_cli import _save_tiny_llama
from tests.unit.test_planted import FT, TEMPLATE, _documents

ALPHABET = [f"w{i}" for i in range(110, 120)]


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """(model, target canary, other canary, held-out texts): two canaries (w11, w12) planted 16 times each."""
    tmp = tmp_path_factory.mktemp("memorisation")
    tok = make_tokenizer()
    tok.chat_template = TEMPLATE
    base = _save_tiny_llama(tmp / "base", tok)
    d = dict(load_recipe("canary").fields)
    d.update(template="w5 w6 {name} w4 {secret}", canaries=[{"name": "w11", "repeats": 16}, {"name": "w12", "repeats": 16}],
             digits=4, alphabet=ALPHABET, n_documents=32, document_chars=40, n_candidates=200, n_ppl_texts=4,
             finetune={**FT, "lr": 1e-2, "n_steps": 120})
    run_recipe(validate_recipe(d), str(base), tmp / "run", documents=_documents(), control=False, progress=False)
    ev = json.loads((tmp / "run" / "data" / "evals.json").read_text())
    model = mechscope.load(str(tmp / "run" / "planted" / "model"))
    target, other = ev["canaries"]
    assert greedy_extracts(model, target) and greedy_extracts(model, other)
    return model, target, other, ev["ppl_texts"]


def _state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.hf.state_dict().items()}


def test_gradient_norms_equal_a_naive_loop(planted):
    model, canary, _, texts = planted
    controls = control_canaries(canary, ["w13", "w14"], alphabet=ALPHABET)
    assert [c["prefix"] for c in controls] == ["w5 w6 w13 w4", "w5 w6 w14 w4"]
    assert all(len(c["secret"].split()) == 4 and set(c["secret"].split()) <= set(ALPHABET) for c in controls)
    flags = [p.requires_grad for p in model.hf.parameters()]
    g = gradient_norm_map(model, canary, controls=controls, control_texts=texts[:1], progress=False)
    assert all(p.grad is None for p in model.hf.parameters())  # the caller's model keeps no gradients
    assert [p.requires_grad for p in model.hf.parameters()] == flags

    def naive(item) -> dict[str, float]:
        hf = copy.deepcopy(model.hf).requires_grad_(True)
        if isinstance(item, dict):
            ids = model.to_tokens(f"{item['prefix']} {item['secret']}")
            start = model.to_tokens(item["prefix"]).shape[1]
        else:
            ids, start = model.to_tokens(item), 1
        lp = torch.log_softmax(hf(input_ids=ids).logits[0].float(), -1)
        loss = -torch.stack([lp[p - 1, ids[0, p]] for p in range(start, ids.shape[1])]).mean()
        loss.backward()
        return {n: float(p.grad.double().norm()) for n, p in hf.named_parameters()}

    mem = naive(canary)
    ctrl = [naive(c) for c in [*controls, texts[0]]]
    assert g.n_controls == 3 and len(g.params) == len(mem)
    for i, n in enumerate(g.params):
        assert g.memorised[i] == pytest.approx(mem[n], rel=1e-4, abs=1e-9)
        assert g.control[i] == pytest.approx(sum(c[n] for c in ctrl) / 3, rel=1e-4, abs=1e-9)
    assert sum(g.memorised_share) == pytest.approx(1) and sum(g.control_share) == pytest.approx(1)
    i = g.params.index("model.layers.1.self_attn.q_proj.weight")
    assert g.layer[i] == 1 and g.module[i] == "self_attn.q_proj.weight" and g.n_params[i] == 32 * 32
    assert g.ratio[i] == pytest.approx(g.memorised[i] / g.control[i])
    assert g.secret_nll < min(g.control_nll)  # memorised: the secret is far more likely than a random one
    rank = g.ranking()
    assert sorted(rank) == sorted(g.params) and g.share_ratio[g.params.index(rank[0])] == max(g.share_ratio)
    assert all(g.layer[g.params.index(n)] is not None for n in g.ranking(blocks_only=True))
    assert set(g.by_layer()["mlp.down_proj.weight"]) == {"0", "1"}
    json.dumps(g.to_dict())
    with pytest.raises(InputError, match="needs controls="):
        gradient_norm_map(model, canary)


def test_twin_patching(planted):
    model, canary, _, _ = planted
    twin = pick_twin(model, canary, ["w11", "w13"])
    assert twin["prefix"] == "w5 w6 w13 w4" and twin["secret"] == canary["secret"]
    # a twin equal to the memorised prompt changes nothing, exactly
    same = twin_patching(model, canary, canary["prefix"], progress=False)
    assert same.gap == 0 and same.memorised_logprob == same.twin_logprob == pytest.approx(secret_logprob(model, canary),
                                                                                         abs=1e-5)
    for k in TWIN_KINDS:
        assert torch.tensor(same.patched[k]).eq(same.memorised_logprob).all()
    assert all(r["share"] is None for r in same.ranking())
    res = twin_patching(model, canary, twin, progress=False)
    assert res.memorised_logprob > res.twin_logprob + 2  # the secret belongs to its name
    assert res.twin_logprob == pytest.approx(secret_logprob(model, twin), abs=1e-4)
    # the twin's residual stream at every layer (or at layer 0: the embeddings) gives the twin's logprob exactly
    sites = [f"blocks.{L}.hook_resid_pre" for L in range(model.cfg.n_layers)]
    assert twin_patched_logprob(model, canary, twin, sites) == res.twin_logprob
    assert res.patched["resid_pre"][0] == res.twin_logprob and res.share["resid_pre"][0] == 1
    # the twin differs only at the name: patching the name position alone equals patching the whole prefix at L0
    assert twin_patched_logprob(model, canary, twin, sites[:1], positions="name") == res.twin_logprob
    assert len(res.patched["z"]) == model.cfg.n_layers and len(res.patched["z"][0]) == model.cfg.n_heads
    rows = res.ranking()
    assert len(rows) == model.cfg.n_layers * (3 + model.cfg.n_heads)
    assert [r["share"] for r in rows] == sorted((r["share"] for r in rows), reverse=True)
    j = res.to_dict()
    assert j["positions"] == [0, 1, 2, 3] and json.dumps(j)


def test_located_unlearning_beats_random_weights(planted):
    model, canary, other, texts = planted
    before = _state(model)
    g = gradient_norm_map(model, canary, controls=control_canaries(canary, ["w13", "w14", "w15", "w16"],
                                                                   alphabet=ALPHABET),
                          control_texts=texts[:2], progress=False)
    rep = unlearn_secret(model, canary, g, heldout_texts=texts, top_k=4, top_fraction=0.01, lr=1e-2, max_steps=20,
                         random_seeds=(0, 1, 2), others=[other], alphabet=ALPHABET, n_candidates=200, progress=False)
    assert rep.before["extracted"] and rep.before["others_extracted"] == [True]
    assert not rep.located.extracted and 1 <= rep.located.steps < 20  # stopped early, once extraction failed
    assert rep.located.others_extracted == [True] and rep.summary["others_survive"]
    assert rep.located.secret_logprob < rep.before["secret_logprob"]
    # the same budget (entries, steps, lr) on random weights leaves the secret extractable
    for r in rep.random:
        assert r.n_params == rep.located.n_params == rep.budget["n_params"] and r.steps == rep.located.steps
        assert r.extracted
    assert rep.summary["located_stops"] and rep.summary["random_stop_rate"] == 0
    assert rep.located.targets == g.ranking(blocks_only=True)[:4] and rep.located.weight_change_norm > 0
    json.dumps(rep.to_dict())
    after = _state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # the caller's model is unchanged
    assert all(p.grad is None for p in model.hf.parameters())


def test_ablating_components(planted):
    model, canary, other, texts = planted
    before = _state(model)
    comps = [r for r in twin_patching(model, canary, pick_twin(model, canary, ["w13"]), progress=False).ranking()
             if r["kind"] == "z"][:2]
    rep = ablate_components(model, canary, comps, heldout_texts=texts, random_seeds=(0, 1), others=[other],
                            alphabet=ALPHABET, n_candidates=50, progress=False)
    assert rep.located.targets == [f"z:{c['layer']}:{c['head']}" for c in comps]
    for r in rep.random:
        assert len(r.targets) == 2 and r.overlap == 0 and all(t.startswith("z:") for t in r.targets)
    assert rep.before["extracted"] and isinstance(rep.summary["located_stops"], bool)
    json.dumps(rep.to_dict())
    assert all(torch.equal(before[k], v) for k, v in model.hf.state_dict().items())
    with pytest.raises(InputError, match="names a head"):
        ablate_components(model, canary, [{"kind": "z", "layer": 0, "head": None}], heldout_texts=texts)


def test_bad_inputs_name_the_fix(planted):
    model, canary, _, texts = planted
    with pytest.raises(InputError, match="same token length"):
        twin_patching(model, canary, "w5 w6 w13 w13 w4", progress=False)
    with pytest.raises(InputError, match="names that tokenize"):
        pick_twin(model, canary, [canary["name"]])
    with pytest.raises(InputError, match="unknown kind"):
        twin_patching(model, canary, with_name(canary, "w13"), kinds=["resid_mid"], progress=False)
    # a secret whose tokens do not continue the prefix's (a stand-in tokenizer that merges across the space)
    merging = types.SimpleNamespace(to_tokens=lambda t: torch.tensor([[1, 5, 6]]) if " " in t.split("w4")[-1]
                                    else torch.tensor([[1, 5, 7]]))
    with pytest.raises(InputError, match="not a continuation of the prefix"):
        secret_tokens(merging, {"prefix": "w5 w4", "secret": "w9"})
    with pytest.raises(InputError, match="non-empty 'secret'"):
        secret_tokens(model, {"prefix": "w5", "secret": " "})
    g = gradient_norm_map(model, canary, control_texts=texts[:1], progress=False)
    kw = {"heldout_texts": texts, "progress": False, "alphabet": ALPHABET, "n_candidates": 10}
    with pytest.raises(InputError, match="top_fraction must lie"):
        unlearn_secret(model, canary, g, top_fraction=0.0, **kw)
    with pytest.raises(InputError, match="needs replacement="):
        unlearn_secret(model, canary, g, objective="replace", **kw)
    with pytest.raises(InputError, match="at least 2 ordinary texts"):
        unlearn_secret(model, canary, g, **{**kw, "heldout_texts": texts[:1]})
    with pytest.raises(InputError, match="top_k must lie"):
        unlearn_secret(model, canary, g, top_k=99, **kw)
