"""Monitors on SAE latents: a LatentScorer's scores equal a naive encode of the cached site, the monitor over it
generates the tokens of plain generation with scores equal to offline re-scoring, calibration bounds the item
FPR, a planted latent alarms exactly where its token appears, and bad inputs raise InputError naming the fix."""

from __future__ import annotations

import json

import pytest
import torch

from mechscope.core.errors import InputError
from mechscope.dictionaries import DictionaryConfig, SparseDictionary
from mechscope.features.generation import generate
from mechscope.safety.latent_scorer import LatentScorer, _check_latents
from mechscope.safety.monitor import Monitor, rule_values
from mechscope.safety.probes import fit_probe
from tests.conftest import WRONG_TYPE, all_hooks_removed, make_words_model, tiny_hooked

SITE = "blocks.1.hook_resid_post"
TC_IN, TC_OUT = "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"
D, D_SAE = 64, 32
LATENTS = [3, 7, 11, 20, 29]
PROMPTS = [torch.tensor([5, 6, 7, 8, 9]), torch.tensor([40, 3, 77])]


def make_dictionary(arch: str = "relu", *, site: str = SITE, hook_out: str | None = None, d_in: int = D,
                    d_sae: int = D_SAE, seed: int = 0, **cfg) -> SparseDictionary:
    """A dictionary with random weights (about half the latents fire on the tiny model), in eval mode."""
    k = 6 if arch in ("topk", "batchtopk") else None
    d = SparseDictionary(DictionaryConfig(arch, d_in, d_sae, site, hook_out=hook_out, k=k, model_name="tiny", **cfg))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in d.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.1 if name.startswith("W") else 0.05))
        if d.threshold is not None:
            d.threshold.copy_(0.1 * torch.rand(d_sae, generator=g))
    return d.eval()


def naive_latents(d: SparseDictionary, x: torch.Tensor) -> torch.Tensor:
    """The latent activations [pos, d_sae] by the formulas of the dictionaries' module docstring, in float64."""
    W_enc, b_enc, b_dec = (t.detach().double() for t in (d.W_enc, d.b_enc, d.b_dec))
    x = x.double()
    pre = (x - b_dec if d.cfg.subtracts_b_dec else x) @ W_enc + b_enc
    arch = d.cfg.architecture
    if arch == "relu":
        return pre.clamp_min(0)
    if arch == "topk":
        keep = torch.zeros_like(pre)
        for r in range(pre.shape[0]):
            for j in sorted(range(pre.shape[1]), key=lambda j: -float(pre[r, j]))[:d.cfg.k]:
                keep[r, j] = 1.0
        return pre.clamp_min(0) * keep
    return pre * (pre > d.threshold.detach().double())  # jumprelu; batchtopk at inference


def cached(model, site, tokens) -> torch.Tensor:
    return model.run(tokens, cache=[site]).cache[site][0]


@pytest.mark.parametrize("arch", ["relu", "topk", "jumprelu", "batchtopk"])
def test_scores_equal_naive_encode(arch):
    model = make_words_model()
    tokens = model.to_tokens("w1 w2 w3 w9 w40 w7 w7 w100")
    for tc in (False, True):
        d = make_dictionary(arch, site=TC_IN if tc else SITE, hook_out=TC_OUT if tc else None)
        x = cached(model, TC_IN if tc else SITE, tokens)
        acts = naive_latents(d, x)[:, LATENTS]
        assert float(acts.max()) > 0 and float((acts == 0).double().mean()) > 0.1  # some fire, some do not
        torch.testing.assert_close(acts, d.encode(x).double()[:, LATENTS], atol=1e-5, rtol=0)
        w = torch.tensor([0.5, 2.0, 1.0, 0.0, 3.0], dtype=torch.float64)
        for reduce, weights, want in (("sum", None, acts.sum(-1)), ("max", None, acts.max(-1).values),
                                      ("sum", w, (acts * w).sum(-1)), ("max", w.tolist(), (acts * w).max(-1).values)):
            s = LatentScorer(d, LATENTS, reduce=reduce, weights=weights)
            assert s.site == (TC_IN if tc else SITE) and s.d_model == D and s.method == "sae_latents"
            got = s.score_tokens(x)
            assert got.dtype == torch.float64 and got.shape == (tokens.shape[1],)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        assert s.aggregate(got) == float(got.max()) and s.aggregation == "max"
        info = json.loads(json.dumps(s.describe()))
        assert info["latents"] == LATENTS and info["dictionary"]["hook_out"] == (TC_OUT if tc else SITE)
        assert info["model_name"] == "tiny" and info["weights"] == w.tolist()


@pytest.mark.parametrize("kv", [True, False])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_monitor_tokens_identical_and_scores_equal_offline(family, kv):
    model = tiny_hooked(family)
    for site, out in ((SITE, None), (TC_IN, TC_OUT)):
        scorer = LatentScorer(make_dictionary("topk", site=site, hook_out=out), LATENTS)
        first = generate(model, PROMPTS[0], max_new_tokens=8, stop_at_eos=False)
        s = scorer.score_tokens(cached(model, site, first.tokens))[first.prompt_len:]
        thr = float(rule_values(s, "ema", ema=0.3).median())  # so that alarms do fire
        mon = Monitor(scorer, threshold=thr, on_alarm="flag")
        gens = mon.generate(model, PROMPTS, max_new_tokens=8, stop_at_eos=False, use_kv_cache=kv)
        assert not all_hooks_removed(model.hf)
        for prompt, r in zip(PROMPTS, gens):
            plain = generate(model, prompt, max_new_tokens=8, stop_at_eos=False, use_kv_cache=kv)
            assert torch.equal(r.tokens, plain.tokens[0]) and r.new_tokens.numel() == 8
            assert r.scores.shape == (prompt.numel() + 8,)
            torch.testing.assert_close(r.scores, scorer.score_tokens(cached(model, site, r.tokens)), atol=1e-5, rtol=0)
            torch.testing.assert_close(r.values, rule_values(r.scores[r.prompt_len:], "ema", ema=0.3))
            assert r.flagged == bool(r.alarms)
        assert gens[0].alarms


def test_planted_latents_alarm_where_their_tokens_are(tmp_path):
    model = make_words_model()
    prompt = "w1 w2 w3"
    plain = generate(model, prompt, max_new_tokens=12, stop_at_eos=False)
    new = plain.new_tokens.tolist()
    targets = {5: new[1], 6: new[6]}  # latent -> a token the greedy continuation produces
    d = make_dictionary("relu", site="hook_embed")
    with torch.no_grad():  # each planted latent reads its token's embedding: 1.0 there, below 0 for other tokens
        d.b_dec.zero_()
        for j, t in targets.items():
            e = model.W_E[t].float()
            d.W_enc[:, j] = e / e.dot(e)
            d.b_enc[j] = -0.5
    W = d.W_enc.detach()[:, [5, 6]]
    for j, t in enumerate(targets.values()):
        others = torch.cat([model.W_E[:t], model.W_E[t + 1:]]).float()
        assert float((others @ W[:, j]).max()) < 0.5
    scorer = LatentScorer(d, [5, 6])
    log = tmp_path / "alarms.jsonl"
    rec = Monitor(scorer, threshold=0.25, rule="window_max", window=1, log=log).generate(
        model, prompt, max_new_tokens=12, stop_at_eos=False)[0]
    on = [t in targets.values() for t in new]
    crossings = [i for i, x in enumerate(on) if x and (i == 0 or not on[i - 1])]  # one alarm per excursion
    assert [a.token_index for a in rec.alarms] == crossings and crossings[0] == on.index(True)
    assert all(a.token_id in targets.values() and abs(a.value - 0.5) < 1e-5 for a in rec.alarms)
    torch.testing.assert_close(rec.values, 0.5 * torch.tensor(on, dtype=torch.float64), atol=1e-5, rtol=0)
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert [x["token_index"] for x in lines] == crossings and lines[0]["site"] == "hook_embed"
    for kv in (True, False):
        st = Monitor(scorer, threshold=0.25, rule="ema", ema=1.0, on_alarm="stop").generate(
            model, prompt, max_new_tokens=12, stop_at_eos=False, use_kv_cache=kv)[0]
        assert st.stopped and torch.equal(st.new_tokens, plain.new_tokens[:crossings[0] + 1])


def test_calibration_bounds_item_fpr():
    model = make_words_model()
    texts = [" ".join(f"w{(7 * i + 3 * j) % 120}" for j in range(3 + i % 6)) for i in range(40)]
    scorer = LatentScorer(make_dictionary("jumprelu"), LATENTS, reduce="max")
    for fpr in (0.1, 0.25):
        mon = Monitor(scorer, rule="window_max", window=3)
        cal = mon.calibrate(model, texts, fpr)
        offline = [scorer.score_tokens(cached(model, SITE, model.to_tokens(t))) for t in texts]
        for got, want in zip(mon.control_scores(model, texts), offline):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        maxima = torch.stack([rule_values(s, "window_max", window=3).max() for s in offline])
        achieved = float((maxima > mon.threshold).double().mean())
        assert cal.n_items == 40 and achieved <= fpr and abs(achieved - cal.achieved_fpr) < 1e-12
        assert achieved > 0 and len(set(maxima.tolist())) > 30  # scores spread: the bound is not vacuous
        gens = mon.generate(model, texts[:3], max_new_tokens=4, stop_at_eos=False)
        assert [len(g.new_tokens) for g in gens] == [4, 4, 4]


def test_bad_inputs():
    d = make_dictionary()
    for latents, match in (([D_SAE], "out of range.*0..31"), ([-1], "out of range"), ([], "no latents"),
                           ([True], "integers"), ([2, 2], "repeated")):
        with pytest.raises(InputError, match=match):
            LatentScorer(d, latents)
    for latents, match in (([1.5], "integers in 0..31"), (3, "list of latent")):  # the run-time type check
        with pytest.raises(WRONG_TYPE):  # catches these first in the test suite
            LatentScorer(d, latents)
        with pytest.raises(InputError, match=match):
            _check_latents(latents, D_SAE)
    assert _check_latents(torch.tensor([4, 2]), D_SAE) == (4, 2)  # tensors and NumPy arrays are read too
    with pytest.raises(InputError, match=r"reduce must be one of \('sum', 'max'\)"):
        LatentScorer(d, [1], reduce="mean")
    with pytest.raises(InputError, match="aggregation"):
        LatentScorer(d, [1], aggregation="median")
    with pytest.raises(InputError, match=r">= 0.*Drop the latents"):
        LatentScorer(d, [1, 2], weights=[1.0, -1.0])
    with pytest.raises(InputError, match="2 entries but there are 3 latents; give one weight per latent"):
        LatentScorer(d, [1, 2, 3], weights=[1.0, 1.0])
    with pytest.raises(InputError, match="all 0"):
        LatentScorer(d, [1], weights=[0.0])
    with pytest.raises(InputError, match="not one vector per position.*hook_resid_post"):
        LatentScorer(make_dictionary(site="blocks.0.attn.hook_z"), [1])
    with pytest.raises(InputError, match="not one vector per position"):
        LatentScorer(d, [1], site=f"{SITE}.sae.hook_sae_acts_post")
    with pytest.raises(InputError, match="not a hook name"):
        LatentScorer(d, [1], site="blocks.1.resid")
    with pytest.raises(InputError, match=r"dictionary.eval\(\)"):
        LatentScorer(make_dictionary("batchtopk").train(), [1])
    with pytest.raises(WRONG_TYPE):  # InputError naming load_dictionary without the run-time type check
        LatentScorer(fit_probe(torch.randn(10, D), torch.arange(10) % 2, "diff_means", site=SITE), [1])
    with pytest.raises(WRONG_TYPE):  # InputError naming Probe and LatentScorer without it
        Monitor(d)
    s = LatentScorer(d, [1])
    with pytest.raises(InputError, match="width 32 but the dictionary reads 64"):
        s.score_tokens(torch.zeros(3, 32))
    with pytest.raises(InputError, match="NaN or infinite"):
        s.score_tokens(torch.full((2, D), float("nan")))
    with pytest.raises(WRONG_TYPE):  # InputError "floats [pos, d]" without the run-time type check
        s.score_tokens(torch.zeros(1, 3, D))
    narrow = LatentScorer(make_dictionary(d_in=32), [1])
    with pytest.raises(InputError, match="the dictionary reads 32 features.*another model or width.*Use a dictionary"):
        Monitor(narrow, threshold=0.0).generate(tiny_hooked("llama"), PROMPTS[0], max_new_tokens=2)
