"""Batched monitored generation: the same tokens, scores, rule values, alarms, actions and log lines as
``batch_size=1`` for prompts of different lengths (so padding matters), on every family; EOS and stops end
one row only; sampling per row with its own seeded generator; the context limit per row; bad inputs."""

from __future__ import annotations

import json

import pytest
import torch

from mechscope.core.errors import InputError
from mechscope.safety.monitor import Monitor
from mechscope.safety.monitor_batch import pad_id
from tests.conftest import (
    FAMILIES,
    WRONG_TYPE,
    all_hooks_removed,
    make_tokenizer,
    make_words_model,
    tiny_hooked,
)
from tests.unit.test_monitor import make_probe, offline_scores

PROMPTS = [torch.tensor([5, 6, 7, 8, 9]), torch.tensor([40, 3, 77]), torch.tensor([11]),
           torch.tensor([9, 8, 7, 6, 5, 4, 3, 99]), torch.tensor([60, 61])]


def assert_same(single, batched, model=None, probe=None):
    """Records equal: tokens exactly; scores and rule values to 1e-5 (fp32); alarms with positions equal."""
    assert len(single) == len(batched)
    for a, b in zip(single, batched):
        assert b.prompt_index == a.prompt_index and b.prompt_len == a.prompt_len and b.text == a.text
        assert torch.equal(b.tokens, a.tokens), (a.prompt_index, a.tokens, b.tokens)
        torch.testing.assert_close(b.scores, a.scores, atol=1e-5, rtol=0)
        torch.testing.assert_close(b.values, a.values, atol=1e-5, rtol=0)
        assert (b.stopped, b.flagged) == (a.stopped, a.flagged)
        assert [(x.position, x.token_index, x.token_id, x.token) for x in b.alarms] == \
               [(x.position, x.token_index, x.token_id, x.token) for x in a.alarms]
        for x, y in zip(a.alarms, b.alarms):
            assert abs(x.value - y.value) < 1e-5 and len(x.scores) == len(y.scores)
        if model is not None:
            torch.testing.assert_close(b.scores, offline_scores(model, probe, b.tokens), atol=1e-5, rtol=0)


def run_both(model, monitor, prompts, batch_size=3, **kw):
    single = monitor.generate(model, prompts, **kw)
    batched = monitor.generate(model, prompts, batch_size=batch_size, **kw)
    assert not all_hooks_removed(model.hf)
    return single, batched


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_equals_single_on_every_family(family):
    model = tiny_hooked(family)
    probe = make_probe()
    thr = float(offline_scores(model, probe, PROMPTS[0]).median())  # alarms do fire
    single, batched = run_both(model, Monitor(probe, threshold=thr, on_alarm="flag"), PROMPTS, max_new_tokens=8,
                               stop_at_eos=False)
    assert_same(single, batched, model, probe)
    assert all(r.new_tokens.numel() == 8 for r in batched) and any(r.alarms for r in batched)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_no_cache_sampling_chunks_and_zero_new_tokens(family):
    model = tiny_hooked(family)
    probe = make_probe()
    mon = Monitor(probe, threshold=float(offline_scores(model, probe, PROMPTS[1]).median()), rule="window_max",
                  window=3)
    for kw in ({"use_kv_cache": False}, {"temperature": 1.0, "seed": 5}, {"temperature": 0.7, "seed": 2}):
        single, batched = run_both(model, mon, PROMPTS, batch_size=2, max_new_tokens=6, stop_at_eos=False, **kw)
        assert_same(single, batched, model, probe)  # 5 prompts in batches of 2, 2, 1
    greedy = mon.generate(model, PROMPTS, max_new_tokens=6, stop_at_eos=False, batch_size=8)
    sampled = mon.generate(model, PROMPTS, max_new_tokens=6, stop_at_eos=False, batch_size=8, temperature=1.0)
    assert any(not torch.equal(a.tokens, b.tokens) for a, b in zip(greedy, sampled))  # sampling did sample
    single, batched = run_both(model, mon, PROMPTS, max_new_tokens=0)
    assert_same(single, batched, model, probe)
    assert all(r.new_tokens.numel() == 0 and r.scores.numel() == r.prompt_len for r in batched)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_eos_ends_one_row_only(family, monkeypatch):
    model = tiny_hooked(family)
    probe = make_probe()
    mon = Monitor(probe, threshold=1e9)
    plain = mon.generate(model, PROMPTS, max_new_tokens=8, stop_at_eos=False)
    news = [r.new_tokens.tolist() for r in plain]
    # an EOS id that row 0 makes early and some other row never makes
    eos = next(t for t in news[0][:5] if any(t not in n for n in news[1:]))
    monkeypatch.setattr(model.hf.generation_config, "eos_token_id", eos)
    single, batched = run_both(model, mon, PROMPTS, batch_size=5, max_new_tokens=8)
    assert_same(single, batched, model, probe)
    assert batched[0].new_tokens[-1] == eos and batched[0].new_tokens.numel() < 8  # the EOS is kept and scored
    assert any(r.new_tokens.numel() == 8 and eos not in r.new_tokens.tolist() for r in batched[1:])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_stop_flag_and_log_per_row(family, tmp_path):
    model = tiny_hooked(family)
    probe = make_probe()
    probe_run = Monitor(probe, threshold=1e9, rule="window_max", window=2)
    maxima = sorted(float(r.values.max()) for r in probe_run.generate(model, PROMPTS, max_new_tokens=8,
                                                                      stop_at_eos=False))
    thr = (maxima[2] + maxima[3]) / 2  # exactly two rows alarm
    for action in ("stop", "flag"):
        logs = [tmp_path / f"{action}-{b}.jsonl" for b in (1, 3)]
        out = [Monitor(probe, threshold=thr, rule="window_max", window=2, on_alarm=action, log=log).generate(
            model, PROMPTS, max_new_tokens=8, stop_at_eos=False, batch_size=b) for log, b in zip(logs, (1, 3))]
        assert_same(*out, model, probe)
        alarmed = [bool(r.alarms) for r in out[1]]
        assert sum(alarmed) == 2
        if action == "stop":
            assert [r.stopped for r in out[1]] == alarmed and not any(r.flagged for r in out[1])
            assert all(r.new_tokens.numel() == 8 for r, a in zip(out[1], alarmed) if not a)  # others ran on
            assert any(r.new_tokens.numel() < 8 for r in out[1])
        else:
            assert [r.flagged for r in out[1]] == alarmed and not any(r.stopped for r in out[1])
        lines = [sorted((json.loads(x) for x in log.read_text().splitlines()),
                        key=lambda d: (d["prompt_index"], d["position"])) for log in logs]
        assert len(lines[0]) == len(lines[1]) >= 2
        for x, y in zip(*lines):
            assert x.keys() == y.keys()
            for k in x:
                if k == "scores":
                    torch.testing.assert_close(torch.tensor(y[k]), torch.tensor(x[k]), atol=1e-5, rtol=0)
                elif k == "value":
                    assert abs(x[k] - y[k]) < 1e-5
                else:
                    assert x[k] == y[k], k


def test_prompt_alarm_stops_its_row_in_the_first_forward():
    model = tiny_hooked("llama")
    probe = make_probe()
    s = offline_scores(model, probe, PROMPTS[0])
    mon = Monitor(probe, threshold=float(s.max()) - 1e-3, rule="window_max", window=1, include_prompt=True,
                  on_alarm="stop")
    single, batched = run_both(model, mon, PROMPTS, max_new_tokens=4, stop_at_eos=False)
    assert_same(single, batched, model, probe)
    assert batched[0].stopped and batched[0].new_tokens.numel() == 0 and batched[0].alarms[0].token_index is None


def test_context_limit_per_row():
    model = tiny_hooked("gpt2")  # learned positions: a wrong position id would index past the table
    probe = make_probe()
    long = torch.arange(4, 64) % 120 + 4  # 60 tokens of a 64-token context: 4 new tokens at most
    prompts = [PROMPTS[1], long, PROMPTS[2]]
    single, batched = run_both(model, Monitor(probe, threshold=1e9), prompts, max_new_tokens=8, stop_at_eos=False)
    assert_same(single, batched, model, probe)
    assert [r.new_tokens.numel() for r in batched] == [8, 4, 8]


def test_words_model_text_and_pad_fallback():
    model = make_words_model()
    probe = make_probe()
    prompts = ["w1 w2 w3", "w7", "w9 w10 w11 w12 w13 w14"]
    mon = Monitor(probe, threshold=0.0)
    single, batched = run_both(model, mon, prompts, max_new_tokens=6, stop_at_eos=False)
    assert_same(single, batched, model, probe)
    assert batched[0].text and any(r.alarms for r in batched)  # decoded text and alarm tokens compared above
    assert pad_id(model) == model.tokenizer.pad_token_id == 0
    tok = make_tokenizer()
    tok.pad_token = None  # no pad token: EOS is fed at pads (masked, so never read)
    model.tokenizer = tok
    assert tok.pad_token_id is None and pad_id(model) == tok.eos_token_id == 2
    assert_same(single, mon.generate(model, prompts, max_new_tokens=6, stop_at_eos=False, batch_size=3))
    model.tokenizer = None
    assert pad_id(model) == 0


def test_bad_inputs():
    model = tiny_hooked("llama")
    probe = make_probe()
    mon = Monitor(probe, threshold=0.0)
    for b in (0, -1, True):
        with pytest.raises(InputError, match="batch_size must be an int >= 1"):
            mon.generate(model, PROMPTS, max_new_tokens=2, batch_size=b)
    for b in (2.5, "2"):
        with pytest.raises(WRONG_TYPE):
            mon.generate(model, PROMPTS, max_new_tokens=2, batch_size=b)
    with pytest.raises(InputError, match="temperature and max_new_tokens must be >= 0"):
        mon.generate(model, PROMPTS, max_new_tokens=-1, batch_size=2)
    nan_model = make_words_model()
    with torch.no_grad():
        nan_model.W_E[9] = float("nan")
    prompts = [torch.tensor([5, 6, 7, 8]), torch.tensor([5, 9, 6])]  # token 9's embedding is NaN
    msgs = []
    for b in (1, 2):  # the same message as the single path: the site, position and prompt (NaN spreads in attention)
        with pytest.raises(InputError, match="NaN or infinite activations at blocks.1.hook_resid_post, position") as e:
            mon.generate(nan_model, prompts, max_new_tokens=2, batch_size=b)
        msgs.append(str(e.value))
    assert msgs[0] == msgs[1] and "of prompt 1" in msgs[1]
    assert not all_hooks_removed(nan_model.hf)
