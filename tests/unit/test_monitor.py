"""The runtime monitor: identical tokens, scores equal to offline re-scoring, the alarm rules by hand,
stop / flag / callables, the JSONL log, calibration to an item-level FPR, drift, and bad inputs."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from mechscope.core.errors import InputError
from mechscope.features.generation import generate
from mechscope.safety.monitor import Monitor, rule_values
from mechscope.safety.probes import fit_probe
from tests.conftest import all_hooks_removed, make_words_model, tiny_hooked

SITE = "blocks.1.hook_resid_post"
PROMPTS = [torch.tensor([5, 6, 7, 8, 9]), torch.tensor([40, 3, 77])]


def make_probe(d: int = 64, site: str = SITE, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return fit_probe(torch.randn(40, d, generator=g), torch.arange(40) % 2, "diff_means", site=site)


def offline_scores(model, probe, tokens):
    """One forward over the whole sequence with the site cached, scored by the probe."""
    return probe.score_tokens(model.run(tokens, cache=[probe.site]).cache[probe.site][0])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("kv", [True, False])
def test_tokens_identical_and_scores_equal_offline(family, kv):
    model = tiny_hooked(family)
    probe = make_probe()
    scores0 = offline_scores(model, probe, PROMPTS[0])
    mon = Monitor(probe, threshold=float(scores0.median()), on_alarm="flag")  # alarms do fire
    out = mon.generate(model, PROMPTS, max_new_tokens=10, stop_at_eos=False, use_kv_cache=kv)
    assert len(out) == 2 and not all_hooks_removed(model.hf)
    for prompt, r in zip(PROMPTS, out):
        plain = generate(model, prompt, max_new_tokens=10, stop_at_eos=False, use_kv_cache=kv)
        assert torch.equal(r.new_tokens, plain.new_tokens) and r.new_tokens.numel() == 10
        assert torch.equal(r.tokens, plain.tokens[0]) and r.prompt_len == prompt.numel()
        assert r.scores.shape == (prompt.numel() + 10,) and r.values.shape == (10,)  # prompt scored, not ruled
        torch.testing.assert_close(r.scores, offline_scores(model, probe, r.tokens), atol=1e-5, rtol=0)
        torch.testing.assert_close(r.values, rule_values(r.scores[r.prompt_len:], "ema", ema=0.3))
        assert not r.stopped and r.flagged == bool(r.alarms)
    assert any(r.alarms for r in out)


def test_rules_equal_hand_computation():
    s = [1.0, -2.0, 4.0, 0.5, 3.0]
    ema, v = [], None
    for x in s:  # v_0 = s_0; v_t = 0.5 s_t + 0.5 v_{t-1}
        v = x if v is None else 0.5 * x + 0.5 * v
        ema.append(v)
    assert ema == [1.0, -0.5, 1.75, 1.125, 2.0625]
    torch.testing.assert_close(rule_values(s, "ema", ema=0.5), torch.tensor(ema, dtype=torch.float64))
    win = [1.0, -0.5, 1.0, 2.5 / 3, 7.5 / 3]  # mean of the last 3 scores (fewer at the start)
    torch.testing.assert_close(rule_values(s, "window_max", window=3), torch.tensor(win, dtype=torch.float64))
    torch.testing.assert_close(rule_values(s, "window_max", window=1), torch.tensor(s, dtype=torch.float64))


def test_alarms_stop_log_and_callable(tmp_path):
    model = make_words_model()
    probe = make_probe()
    prompt = "w1 w2 w3"
    plain = generate(model, prompt, max_new_tokens=12, stop_at_eos=False)
    s = offline_scores(model, probe, plain.tokens)[plain.prompt_len:]
    values = rule_values(s, "window_max", window=2)
    records = [t for t in range(1, len(values)) if values[t] > values[:t].max()]
    k = records[-1]  # the threshold lies between the max before k and the value at k: the first alarm is at k
    thr = float(values[:k].max() + values[k]) / 2
    assert k >= 1
    crossings = [t for t in range(len(values)) if values[t] > thr and (t == 0 or values[t - 1] <= thr)]
    log = tmp_path / "alarms.jsonl"
    rec = Monitor(probe, threshold=thr, rule="window_max", window=2, log=log).generate(
        model, prompt, max_new_tokens=12, stop_at_eos=False)[0]
    assert [a.token_index for a in rec.alarms] == crossings and crossings[0] == k
    assert torch.equal(rec.new_tokens, plain.new_tokens) and not rec.stopped and not rec.flagged
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert len(lines) == len(crossings)
    first = lines[0]
    assert first["token_index"] == k and first["position"] == plain.prompt_len + k
    assert first["token"] == model.tokenizer.decode([int(plain.new_tokens[k])]) and first["rule"] == "window_max"
    assert first["threshold"] == thr and first["site"] == SITE and len(first["scores"]) == 2
    torch.testing.assert_close(torch.tensor(first["scores"], dtype=torch.float64), s[k - 1:k + 1], atol=1e-5, rtol=0)

    for kv in (True, False):
        st = Monitor(probe, threshold=thr, rule="window_max", window=2, on_alarm="stop").generate(
            model, prompt, max_new_tokens=12, stop_at_eos=False, use_kv_cache=kv)[0]
        assert st.stopped and len(st.alarms) == 1 and torch.equal(st.new_tokens, plain.new_tokens[:k + 1])
        assert st.text == model.tokenizer.decode(plain.new_tokens[:k + 1].tolist(), skip_special_tokens=True)
        assert st.scores.shape == (plain.prompt_len + k + 1,) and not all_hooks_removed(model.hf)

    sampled = generate(model, prompt, max_new_tokens=12, stop_at_eos=False, temperature=1.0, seed=3)
    mon = Monitor(probe, threshold=thr, rule="window_max", window=2)
    r = mon.generate(model, prompt, max_new_tokens=12, stop_at_eos=False, temperature=1.0, seed=3)[0]
    assert torch.equal(r.new_tokens, sampled.new_tokens)  # sampling draws the same tokens under the monitor

    seen = []
    cb = Monitor(probe, threshold=thr, rule="window_max", window=2,
                 on_alarm=lambda a: seen.append(a.token_index) or ("stop" if len(seen) == 2 else None))
    r = cb.generate(model, prompt, max_new_tokens=12, stop_at_eos=False)[0]
    if len(crossings) >= 2:
        assert r.stopped and r.new_tokens.numel() == crossings[1] + 1 and seen == crossings[:2]
    else:
        assert not r.stopped and seen == crossings
    assert json.loads(json.dumps(r.to_dict()))["tokens"] == r.tokens.tolist()


def test_include_prompt_lets_the_prompt_alarm():
    model = tiny_hooked("llama")
    probe = make_probe()
    s = offline_scores(model, probe, PROMPTS[0])
    thr = float(s.max()) - 1e-3  # only the prompt's highest token (or later ones) exceed it
    mon = Monitor(probe, threshold=thr, rule="window_max", window=1, include_prompt=True, on_alarm="stop")
    r = mon.generate(model, PROMPTS[0], max_new_tokens=4, stop_at_eos=False)[0]
    assert r.stopped and r.alarms[0].token_index is None and r.alarms[0].position == int(s.argmax())
    assert r.new_tokens.numel() == 0 and r.values.shape == (int(s.argmax()) + 1,)


def test_calibration_bounds_item_fpr_and_drift():
    g = torch.Generator().manual_seed(1)
    items = [torch.randn(int(n), generator=g, dtype=torch.float64) for n in torch.randint(3, 30, (500,), generator=g)]
    for rule in ("ema", "window_max"):
        for fpr in (0.01, 0.05, 0.2):
            mon = Monitor(make_probe(), rule=rule, window=4)
            cal = mon.calibrate_scores(items, fpr)
            maxima = torch.stack([rule_values(s, rule, ema=0.3, window=4).max() for s in items])
            achieved = float((maxima > mon.threshold).double().mean())
            assert achieved <= fpr and achieved == cal.achieved_fpr
            assert achieved >= fpr - 2 / len(items)  # not needlessly conservative (no ties)
    shifted = [s + 1.0 for s in items]
    mon = Monitor(make_probe(), fpr=0.05)
    before = mon.calibrate_scores(items)
    after = mon.calibrate_scores(shifted)
    assert math.isclose(after.threshold - before.threshold, 1.0, abs_tol=1e-9)
    assert all(math.isclose(after.token_quantiles[q] - before.token_quantiles[q], 1.0, abs_tol=1e-9)
               for q in before.token_quantiles)


def test_calibrate_and_recalibrate_on_a_model():
    model = make_words_model()
    probe = make_probe()
    texts = [" ".join(f"w{(7 * i + j) % 120}" for j in range(4 + i % 5)) for i in range(30)]
    mon = Monitor(probe)
    cal = mon.calibrate(model, texts, 0.1)
    assert cal.n_items == 30 and cal.achieved_fpr <= 0.1 and mon.threshold == cal.threshold
    assert cal.model_name == model.cfg.name
    other = make_words_model()
    with torch.no_grad():
        other.W_E.mul_(2.0)  # a "new checkpoint"
    drift = mon.recalibrate(other, texts)
    assert drift.before is cal and drift.after.fpr == 0.1 and mon.threshold == drift.after.threshold
    assert drift.to_dict()["threshold_shift"] == drift.after.threshold - cal.threshold
    scores = mon.control_scores(other, texts)
    assert [len(x) for x in scores] == [len(t.split()) for t in texts]  # every word token (no BOS here)


def test_bad_inputs(tmp_path):
    model = tiny_hooked("llama")
    probe = make_probe()
    for fpr in (0.0, 1.0, -0.1, 1.5, float("nan")):
        with pytest.raises(InputError, match=r"fpr must lie in \(0, 1\)"):
            Monitor(probe, fpr=fpr)
        with pytest.raises(InputError, match=r"fpr must lie in \(0, 1\)"):
            Monitor(probe).calibrate_scores([torch.zeros(3)], fpr)
    with pytest.raises(InputError, match="calibrate"):
        Monitor(probe).generate(model, PROMPTS[0])
    with pytest.raises(InputError, match="another model or width"):
        Monitor(make_probe(d=32), threshold=0.0).generate(model, PROMPTS[0], max_new_tokens=2)
    with pytest.raises(InputError, match="no site"):
        Monitor(dataclasses.replace(probe, site=None))
    with pytest.raises(InputError, match="rule"):
        Monitor(probe, rule="mean")
    with pytest.raises(InputError, match="ema"):
        Monitor(probe, ema=0.0)
    with pytest.raises(InputError, match="on_alarm"):
        Monitor(probe, on_alarm="shout")
    with pytest.raises(InputError, match="does not exist"):
        Monitor(probe, log=tmp_path / "missing" / "a.jsonl")

    nan_model = make_words_model()
    with torch.no_grad():
        nan_model.W_E[9] = float("nan")
    with pytest.raises(InputError, match="NaN or infinite activations at blocks.1.hook_resid_post, position 0 of prompt 0"):
        Monitor(probe, threshold=0.0).generate(nan_model, torch.tensor([9, 5, 6]), max_new_tokens=2)
    assert not all_hooks_removed(nan_model.hf)
    with pytest.raises(InputError, match="NaN/inf activation values at blocks.1.hook_resid_post"):
        Monitor(probe).calibrate(nan_model, ["w5 w6", "w7 w8"], 0.1)  # w5 is token 9
