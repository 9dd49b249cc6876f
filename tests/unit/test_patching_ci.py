"""Bootstrap intervals of activation and attribution patching (``ci=``), on tiny random models.

Claims tested: with ``ci`` on, the values are exactly those without it and lie inside their intervals;
the intervals equal a naive bootstrap loop that re-runs the whole patching sweep (and rebuilds the metric,
with its normalisation) on each resample of prompts; intervals narrow as prompts are added; Metric's
per-prompt values average to its raw value; a metric without per-prompt values is refused.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mechscope.analysis import activation_patching, attribution_patching, bootstrap_indices, make_metric
from mechscope.core.errors import InputError
from tests.conftest import WRONG_TYPE
from tests.unit.test_analysis_patching import metric_for, task

SWEEPS = {"activation": activation_patching, "attribution": attribution_patching}


def run(method, m, clean, corrupt, metric, kind, **kw):
    if method == "activation":
        kw.setdefault("progress", False)
    return SWEEPS[method](m, clean, corrupt, metric, kind=kind, **kw)


@pytest.mark.parametrize("method", list(SWEEPS))
@pytest.mark.parametrize("kind, metric_kind", [("heads", "logit_diff"), ("resid_pre", "prob"), ("attn_out", "kl")])
def test_values_unchanged_and_inside_their_intervals(method, kind, metric_kind):
    m, clean, corrupt, answers = task("llama", n=6)
    metric = metric_for(m, clean, corrupt, answers, kind=metric_kind)
    plain = run(method, m, clean, corrupt, metric, kind)
    with_ci = run(method, m, clean, corrupt, metric, kind, ci=200)
    assert plain.ci_low is None and plain.n_boot == 0 and with_ci.n_boot == 200
    assert torch.equal(plain.values, with_ci.values)
    assert with_ci.ci_low.shape == with_ci.values.shape == with_ci.ci_high.shape
    assert with_ci.ci_low.dtype == torch.float32
    tol = 1e-5 * (1 + with_ci.values.abs())
    assert (with_ci.ci_low <= with_ci.values + tol).all() and (with_ci.values <= with_ci.ci_high + tol).all()
    assert (with_ci.ci_high - with_ci.ci_low).max() > 0


@pytest.mark.parametrize("method", list(SWEEPS))
@pytest.mark.parametrize("kind, metric_kind", [("attn_out", "logit_diff"), ("heads", "kl")])
def test_intervals_equal_a_naive_bootstrap_loop(method, kind, metric_kind):
    n, n_boot = 5, 20
    m, clean, corrupt, answers = task("llama", n=n, seed=2)
    with torch.no_grad():
        clean_logits, corrupt_logits = m.run(clean).logits, m.run(corrupt).logits
    metric = make_metric(metric_kind, clean_logits, corrupt_logits, answers)
    got = run(method, m, clean, corrupt, metric, kind, ci=n_boot)
    boots = []
    for idx in bootstrap_indices(n, n_boot, seed=0):  # the resamples ci= draws
        resampled = make_metric(metric_kind, clean_logits[idx], corrupt_logits[idx], answers[idx])
        boots.append(run(method, m, clean[idx], corrupt[idx], resampled, kind).values.double().numpy())
    low, high = np.percentile(np.stack(boots), [2.5, 97.5], axis=0)
    np.testing.assert_allclose(got.ci_low.numpy(), low, atol=2e-4, rtol=1e-4)
    np.testing.assert_allclose(got.ci_high.numpy(), high, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("method", list(SWEEPS))
def test_intervals_narrow_as_prompts_are_added(method):
    m, clean, corrupt, answers = task("llama", n=48, seed=5)
    widths = []
    for n in (6, 48):  # the first 6 prompts, then all 48: about sqrt(8) = 2.8 times narrower
        metric = metric_for(m, clean[:n], corrupt[:n], answers[:n])
        r = run(method, m, clean[:n], corrupt[:n], metric, "mlp_out", ci=True)
        assert r.n_boot == 1000
        widths.append(float((r.ci_high - r.ci_low).median()))
    assert widths[1] < 0.6 * widths[0], widths


def test_per_prompt_values_average_to_the_raw_value():
    m, clean, corrupt, answers = task("llama", n=4)
    for kind in ("logit_diff", "prob", "kl"):
        metric = metric_for(m, clean, corrupt, answers, kind=kind)
        logits = m.run(corrupt).logits
        per = metric.per_prompt(logits)
        assert per.shape == (4,)
        assert float(per.mean()) == pytest.approx(float(metric.raw(logits)), abs=1e-6)
        assert float(metric.clean_values.mean()) == pytest.approx(metric.raw_clean, abs=1e-6)
        torch.testing.assert_close(metric.corrupt_values, per.float().cpu(), atol=1e-5, rtol=1e-5)


def test_ci_needs_a_metric_with_per_prompt_values():
    m, clean, corrupt, answers = task("llama", n=3)
    metric = metric_for(m, clean, corrupt, answers)

    def plain_metric(logits):
        return metric(logits)

    for method in SWEEPS:
        with pytest.raises(InputError, match=r"ci= needs per-prompt metric values.*make_metric"):
            run(method, m, clean, corrupt, plain_metric, "attn_out", ci=True)
        with pytest.raises(InputError, match=r"ci must be True .* >= 10; got 5"):
            run(method, m, clean, corrupt, metric, "attn_out", ci=5)
        with pytest.raises(WRONG_TYPE):
            run(method, m, clean, corrupt, metric, "attn_out", ci="yes")
