"""Path patching and ACDC on the default real model (SmolLM2-135M-Instruct, fp32, CPU) on IOI.

Path patching (Wang et al. 2022, App. B) into the queries of L23H3 and L20H0, the report's top heads by
activation patching, from the heads that the full sweeps put first (measured when written, 32 IOI prompts,
95% bootstrap intervals, logit difference; clean mean +3.85):

- into ``a23.h3<q>`` from all 207 heads of layers 0-22 (658 s on 2 busy cores): a20.h0 +0.162 [+0.106,
  +0.233], a19.h2 +0.075 [+0.052, +0.102], a18.h2 +0.021 [+0.014, +0.029], a19.h1 -0.019 [-0.026, -0.012];
  every other head within +-0.018. The signs are positive: the corrupted prompt (the indirect object named
  again in place of S2) sent through L23H3's query alone *raises* the logit difference;
- into ``a20.h0<q>`` from all 180 heads of layers 0-19 (530 s): nothing above 0.05 in magnitude; the
  largest, a19.h2 -0.049 [-0.105, +0.012], is not told apart from zero.

This test repeats the four strongest senders into each receiver on 16 prompts (one forward of 4 variants
per pass), checks the intervals, and that one sender alone gives its column of the sweep. ACDC runs at
node level (301 nodes; edge level would try 70,651 edges) on 8 prompts under a time budget and prints what
it reached. Run with ``-s`` for the numbers.
"""

from __future__ import annotations

import math
import time
import warnings

import pytest

from mechscope.circuits import Graph, acdc, path_patching, path_patching_sweep
from mechscope.data import load_task

pytestmark = pytest.mark.real

SENDERS = {"a23.h3<q>": ["a20.h0", "a19.h2", "a18.h2", "a19.h1"], "a20.h0<q>": ["a19.h2", "a18.h1", "a19.h4", "a19.h1"]}


@pytest.fixture(scope="module")
def ioi(real_model):
    return load_task("ioi", real_model, n=16)


def test_path_patching_into_the_top_heads_queries(real_model, ioi):
    g = Graph.from_model(real_model)
    # 30 layers x (9 query + 3 key + 3 value + 1 MLP receivers) + logits; 123,211 edges with K/V copied per query head
    assert (g.n_sources, g.n_receivers, g.n_edges) == (301, 481, 70_651)
    sweeps = {}
    for receiver, senders in SENDERS.items():
        t0 = time.perf_counter()
        sw = path_patching_sweep(real_model, ioi, [receiver], senders=senders, graph=g, variants=len(senders),
                                 progress=False)
        print(f"\n{receiver} ({time.perf_counter() - t0:.1f} s, n={len(ioi)}, clean {sw.clean_value:+.3f}):")
        for j, s in enumerate(sw.senders):
            lo, hi, e = float(sw.ci.low[j]), float(sw.ci.high[j]), float(sw.effect[j])
            print(f"  {s:7s} {e:+.4f} [{lo:+.4f}, {hi:+.4f}]")
            assert math.isfinite(e) and lo <= e <= hi
        sweeps[receiver] = sw
    into_l23 = sweeps["a23.h3<q>"]
    assert float(into_l23.ci.low[0]) > 0  # a20.h0 -> a23.h3<q>: the interval excludes zero
    one = path_patching(real_model, ioi, ["a20.h0"], ["a23.h3<q>"], graph=g)
    assert one.effect == pytest.approx(float(into_l23.effect[0]), abs=1e-4)
    assert str(one).startswith("path patching a20.h0 -> a23.h3<q>: +")


def test_acdc_at_node_level_on_ioi_within_a_budget(real_model, ioi):
    task = ioi.subset(slice(0, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # an early stop is reported in the result
        r = acdc(real_model, task, tau=0.02, level="node", variants=8, batch_size=8, time_budget_s=40.0, progress=False)
    print(f"\n{r}\nnodes kept: {r.kept_node_names()}")
    assert r.graph.n_sources == 301 and len(r.trace) + r.untested == 301
    assert r.complete or r.untested > 0
    assert all(s.kept == (s.damage > 0.02) for s in r.trace)
