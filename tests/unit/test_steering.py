"""Steering on tiny models, against naive implementations: latent add/clamp semantics, CAA as a plain
mean difference of HF hidden states, KV-cache generation against full recomputation, and the measured
effect against a hand-computed log-probability difference."""

from __future__ import annotations

import math

import pytest
import torch

import mechscope
from mechscope.dictionaries import DictionaryConfig, SparseDictionary, Splice
from mechscope.features.generation import FromPosition, PositionTracker, compare_generations, from_position, generate
from mechscope.features.steering import (
    LatentEdit,
    LatentSteer,
    add_directions,
    contrastive_direction,
    decoder_direction,
    measure_steering,
    promoted_tokens,
    steer_latents,
    steering_kwargs,
)
from tests.conftest import make_tiny, make_tokenizer, random_tokens, tiny_hooked, twin

torch.set_num_threads(1)

HOOK = "blocks.1.hook_resid_post"
LATENTS = f"{HOOK}.sae.hook_sae_acts_post"


@pytest.fixture(scope="module")
def sae():
    d = SparseDictionary(DictionaryConfig("topk", 64, 128, HOOK, k=8)).initialize(0)
    for p in d.parameters():
        p.requires_grad_(False)
    return d


@pytest.fixture(scope="module")
def llama():
    return tiny_hooked("llama")


@pytest.fixture(scope="module")
def worded():
    """A tiny llama with a word-level tokenizer ("w0".."w123"), for text in and out."""
    hf = make_tiny("llama")
    for p in hf.parameters():
        p.requires_grad_(False)
    return mechscope.HookedModel(hf, tokenizer=make_tokenizer(), name="tiny-llama-words")


# -- latent steering semantics ----------------------------------------------------------------------
@pytest.mark.parametrize("positions", [None, [2, 4], slice(-1, None)])
def test_clamp_sets_the_latents_exactly_where_selected(llama, sae, positions):
    tokens = random_tokens()
    _, clean = llama.run(tokens, saes=[Splice(sae, error_term=True)], cache=[LATENTS])
    steer = steer_latents(sae, {3: 5.0, 70: 0.25}, mode="clamp", positions=positions)
    _, cache = llama.run(tokens, cache=[LATENTS], **steer.run_kwargs())
    got, ref = cache[LATENTS], clean[LATENTS]
    sel = torch.zeros(tokens.shape[1], dtype=torch.bool)
    sel[slice(None) if positions is None else positions] = True  # torch indexing: list or slice
    assert torch.all(got[:, sel, 3] == 5.0) and torch.all(got[:, sel, 70] == 0.25)
    assert torch.equal(got[:, ~sel], ref[:, ~sel])  # unselected positions: untouched
    others = torch.ones(128, dtype=torch.bool)
    others[[3, 70]] = False
    assert torch.equal(got[..., others], ref[..., others])  # other latents: untouched


def test_add_with_error_term_equals_adding_the_decoder_row(llama, sae):
    tokens = random_tokens()
    steered, _ = llama.run(tokens, **steer_latents(sae, {5: 3.0, 9: -2.0}, mode="add").run_kwargs())
    v = 3.0 * decoder_direction(sae, 5) - 2.0 * decoder_direction(sae, 9)
    added, _ = llama.run(tokens, interventions=[mechscope.Add(HOOK, direction=v)])
    torch.testing.assert_close(steered, added, atol=1e-5, rtol=1e-5)
    assert (steered - llama.run(tokens).logits).abs().max() > 1e-2  # and it did change something


def test_clamp_with_error_term_equals_adding_the_missing_activation(llama, sae):
    tokens = random_tokens()
    _, clean = llama.run(tokens, saes=[Splice(sae, error_term=True)], cache=[LATENTS])
    a = clean[LATENTS][..., 11]  # [batch, pos]
    steered, _ = llama.run(tokens, **steer_latents(sae, {11: 4.0}, mode="clamp").run_kwargs())
    v = (4.0 - a)[..., None] * decoder_direction(sae, 11)  # [batch, pos, d_model]
    added, _ = llama.run(tokens, interventions=[mechscope.Add(HOOK, direction=v)])
    torch.testing.assert_close(steered, added, atol=1e-5, rtol=1e-5)


def test_steering_the_last_position_leaves_earlier_outputs_unchanged(llama, sae):
    tokens = random_tokens()
    clean = llama.run(tokens).logits
    steered, _ = llama.run(tokens, **steer_latents(sae, {3: 8.0}, mode="clamp", positions=[-1]).run_kwargs())
    torch.testing.assert_close(steered[:, :-1], clean[:, :-1], atol=1e-5, rtol=1e-5)  # causal + error term
    assert (steered[:, -1] - clean[:, -1]).abs().max() > 1e-2


def test_latent_steer_validates(sae):
    with pytest.raises(mechscope.InputError, match="mode"):
        steer_latents(sae, {1: 1.0}, mode="scale")
    with pytest.raises(mechscope.InputError, match="out of range"):
        steer_latents(sae, {128: 1.0})
    with pytest.raises(mechscope.InputError, match="at least one"):
        steer_latents(sae, {})
    with pytest.raises(mechscope.InputError, match="finite"):
        steer_latents(sae, {1: float("nan")})
    with pytest.raises(mechscope.InputError, match="out of range"):
        decoder_direction(sae, -1)
    s = steer_latents(sae, {7: 1, 2: 2.5})
    assert isinstance(s, LatentSteer) and s.latents == ((2, 2.5), (7, 1.0)) and s.site == LATENTS
    assert isinstance(s.edit(), LatentEdit) and s.edit().latents == (2, 7)


def test_two_steers_on_one_dictionary_share_one_splice(llama, sae):
    tokens = random_tokens()
    kw = steering_kwargs([steer_latents(sae, {5: 3.0}), steer_latents(sae, {9: -2.0})])
    assert len(kw["saes"]) == 1 and len(kw["interventions"]) == 2
    both, _ = llama.run(tokens, **kw)
    one, _ = llama.run(tokens, **steer_latents(sae, {5: 3.0, 9: -2.0}).run_kwargs())
    torch.testing.assert_close(both, one, atol=1e-5, rtol=1e-5)
    with pytest.raises(mechscope.InputError, match="error_term"):
        steering_kwargs([steer_latents(sae, {5: 1.0}), steer_latents(sae, {5: 1.0}, error_term=False)])


def test_promoted_tokens_rank_by_the_unembedding(llama):
    v = torch.randn(64, generator=torch.Generator().manual_seed(0))
    gain = llama.module(llama.adapter.final_norm).weight.float()
    ref = ((v * gain) @ llama.W_U.float()).topk(5)
    got = promoted_tokens(llama, v, k=5)
    assert [i for i, _, _ in got] == ref.indices.tolist()
    torch.testing.assert_close(torch.tensor([w for _, _, w in got]), ref.values)


# -- contrastive activation addition ------------------------------------------------------------------
@pytest.mark.parametrize("position", ["last", "mean"])
def test_contrastive_direction_is_the_mean_difference_of_hidden_states(llama, position):
    pos = [random_tokens(1, n, seed=s)[0] for n, s in ((5, 1), (7, 2), (6, 3))]
    neg = [random_tokens(1, n, seed=s)[0] for n, s in ((6, 4), (5, 5), (8, 6))]
    dirs = contrastive_direction(llama, pos, neg, [0, "blocks.1.hook_resid_mid"], position=position)
    ref_model = twin("llama")

    def naive(t, layer):  # HF's hidden_states[L + 1] is the output of block L (for L < n_layers - 1)
        h = ref_model(t[None], output_hidden_states=True).hidden_states[layer + 1][0]
        return h[-1] if position == "last" else h.mean(0)

    with torch.no_grad():
        want = sum(naive(p, 0) - naive(q, 0) for p, q in zip(pos, neg)) / 3
    torch.testing.assert_close(dirs["blocks.0.hook_resid_post"], want, atol=1e-5, rtol=1e-5)
    assert set(dirs) == {"blocks.0.hook_resid_post", "blocks.1.hook_resid_mid"}
    (add,) = add_directions({"blocks.0.hook_resid_post": want}, scale=2.0)
    assert add.scale == 2.0 and add.site == "blocks.0.hook_resid_post"


def test_contrastive_direction_validates(llama):
    t = random_tokens(1, 4)[0]
    with pytest.raises(mechscope.InputError, match="pairs"):
        contrastive_direction(llama, [t, t], [t], 0)
    with pytest.raises(mechscope.InputError, match="position"):
        contrastive_direction(llama, [t], [t], 0, position="first")


# -- generation with the KV cache -------------------------------------------------------------------
def _naive_generate(model, prompt, n_new, start, saes, interventions):
    """Greedy decoding re-running the full sequence each step; steering via plain positions=slice(start)."""
    seq = prompt[None]
    logits = []
    for _ in range(n_new):
        out, _ = model.run(seq, saes=saes, interventions=interventions)
        logits.append(out[0, -1].float())
        seq = torch.cat([seq, out[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq, torch.stack(logits)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
@pytest.mark.parametrize("from_position", ["prompt_end", "all", 2])
def test_kv_cache_generation_with_add_equals_full_recomputation(family, from_position):
    model = tiny_hooked(family)
    prompt = random_tokens(1, 6, seed=7)[0]
    v = torch.randn(64, generator=torch.Generator().manual_seed(1))
    start = {"prompt_end": 5, "all": 0, 2: 2}[from_position]
    gen = generate(model, prompt, interventions=[mechscope.Add("blocks.0.hook_resid_post", direction=v, scale=3.0)],
                   max_new_tokens=12, from_position=from_position, stop_at_eos=False)
    ref_seq, ref_logits = _naive_generate(
        model, prompt, 12, start, (),
        [mechscope.Add("blocks.0.hook_resid_post", direction=v, scale=3.0, positions=slice(start, None))])
    assert torch.equal(gen.tokens, ref_seq)
    torch.testing.assert_close(gen.logits, ref_logits, atol=1e-4, rtol=1e-4)
    plain = generate(model, prompt, max_new_tokens=12, stop_at_eos=False)
    assert not torch.allclose(plain.logits, gen.logits)  # the steering mattered


def test_kv_cache_generation_with_latent_steer_equals_full_recomputation(llama, sae):
    prompt = random_tokens(1, 5, seed=3)[0]
    steer = steer_latents(sae, {3: 6.0, 40: 2.0}, mode="clamp")
    gen = generate(llama, prompt, interventions=[steer], max_new_tokens=10, stop_at_eos=False)
    edit = LatentEdit(LATENTS, positions=slice(4, None), latents=(3, 40), values=(6.0, 2.0), mode="clamp")
    ref_seq, ref_logits = _naive_generate(llama, prompt, 10, 4, [Splice(sae, error_term=True)], [edit])
    assert torch.equal(gen.tokens, ref_seq)
    torch.testing.assert_close(gen.logits, ref_logits, atol=1e-4, rtol=1e-4)


def test_cached_and_uncached_sampling_agree_and_are_seeded(llama):
    prompt = random_tokens(1, 4, seed=5)[0]
    iv = [mechscope.Add("blocks.1.hook_resid_pre", direction=torch.ones(64), scale=0.5)]
    a = generate(llama, prompt, interventions=iv, max_new_tokens=10, temperature=1.0, seed=3, stop_at_eos=False)
    b = generate(llama, prompt, interventions=iv, max_new_tokens=10, temperature=1.0, seed=3, stop_at_eos=False,
                 use_kv_cache=False)
    c = generate(llama, prompt, interventions=iv, max_new_tokens=10, temperature=1.0, seed=4, stop_at_eos=False)
    assert torch.equal(a.tokens, b.tokens)
    assert not torch.equal(a.tokens, c.tokens)
    assert a.prompt_len == 4 and a.new_tokens.shape == (10,) and a.logits.shape == (10, 128) and a.text is None


def test_position_tracker_steers_hf_generate_like_generate(llama):
    prompt = random_tokens(1, 6, seed=8)
    add = mechscope.Add("blocks.0.hook_resid_post", direction=torch.randn(64, generator=torch.Generator().manual_seed(2)),
                        scale=3.0)
    with PositionTracker(llama) as t, llama.hooks(interventions=[from_position(add, 5, t)]):
        out = llama.hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False,
                                pad_token_id=0, eos_token_id=None)
    ours = generate(llama, prompt[0], interventions=[add], max_new_tokens=8, stop_at_eos=False)
    assert torch.equal(out, ours.tokens)


def test_generation_refuses_per_forward_positions(llama):
    prompt = random_tokens(1, 4)[0]
    with pytest.raises(mechscope.InputError, match="positions=\\[-1\\]"):
        generate(llama, prompt, interventions=[mechscope.Add(HOOK, direction=torch.ones(64), positions=[-1])])
    with pytest.raises(mechscope.InputError, match="from_position"):
        generate(llama, prompt, from_position="end")
    add = from_position(mechscope.Add(HOOK, direction=torch.ones(64)), 0, PositionTracker(llama))
    assert isinstance(add, FromPosition) and add.site == HOOK
    with pytest.raises(mechscope.InputError, match="PositionTracker"):
        llama.run(prompt, interventions=[add])


def test_generate_and_compare_with_text(worded):
    v = torch.randn(64, generator=torch.Generator().manual_seed(0))
    gen = generate(worded, "w1 w2 w3", max_new_tokens=5, stop_at_eos=False)
    assert gen.text == worded.tokenizer.decode(gen.new_tokens.tolist(), skip_special_tokens=True)
    base, steered = compare_generations(worded, "w1 w2 w3", mechscope.Add(HOOK, direction=v, scale=20.0),
                                        max_new_tokens=5, stop_at_eos=False)
    assert base == gen.text and steered != base
    with pytest.raises(mechscope.InputError, match="has no tokens"):  # this tokenizer drops whitespace, adds no BOS
        generate(worded, "   ", max_new_tokens=2)


# -- measured effect --------------------------------------------------------------------------------
def test_measure_steering_equals_a_naive_log_prob_difference(llama, sae):
    prompts = [random_tokens(1, n, seed=n)[0] for n in (4, 6, 9)]
    targets = torch.tensor([5, 17, 99])
    steer = [steer_latents(sae, {3: 5.0}, mode="add"), mechscope.Add("blocks.0.hook_resid_post", direction=torch.ones(64))]
    probe_dir = torch.randn(64, generator=torch.Generator().manual_seed(0))
    eff = measure_steering(llama, prompts, steer, targets, probe=("blocks.1.hook_resid_post", probe_dir))
    for i, p in enumerate(prompts):
        base, bc = llama.run(p, cache=[HOOK])
        st, sc = llama.run(p, saes=[Splice(sae, error_term=True)], cache=[HOOK], interventions=[
            LatentEdit(LATENTS, latents=(3,), values=(5.0,)), mechscope.Add("blocks.0.hook_resid_post", direction=torch.ones(64))])
        lb = torch.log_softmax(base[0, -1], -1)[targets]
        ls = torch.log_softmax(st[0, -1], -1)[targets]
        torch.testing.assert_close(eff.delta_logprob[i], ls - lb, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(eff.delta_prob[i], ls.exp() - lb.exp(), atol=1e-6, rtol=1e-4)
        want_probe = (sc[HOOK][0, -1] - bc[HOOK][0, -1]) @ probe_dir
        torch.testing.assert_close(eff.delta_probe[i], want_probe, atol=1e-3, rtol=1e-4)
        ps, pb = torch.softmax(st[0, -1].double(), -1), torch.softmax(base[0, -1].double(), -1)
        kl = sum(float(ps[v]) * math.log(float(ps[v]) / float(pb[v])) for v in range(ps.numel()))  # by hand
        assert float(eff.kl[i]) == pytest.approx(kl, rel=1e-3, abs=1e-6)
        order = sorted(range(ps.numel()), key=lambda v: -float(ps[v] - pb[v]))[:5]
        assert eff.raised_ids[i].tolist() == order
        torch.testing.assert_close(eff.raised_delta_prob[i].double(), (ps - pb)[order], atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(eff.mean_delta_logprob, eff.delta_logprob.mean(0))
    assert eff.logprob_base.shape == (3, 3)


def test_measure_steering_targets_are_single_tokens(worded):
    eff = measure_steering(worded, ["w1 w2"], mechscope.Add(HOOK, direction=torch.ones(64)), ["w5", "w6"])
    assert eff.target_ids.tolist() == [9, 10]
    with pytest.raises(mechscope.InputError, match="single tokens"):
        measure_steering(worded, ["w1 w2"], mechscope.Add(HOOK, direction=torch.ones(64)), ["w5 w6"])
