"""Circuit evaluation on the default real model (SmolLM2-135M-Instruct, fp32): IOI, EAP scores, the top 200
edges' faithfulness with its interval, and MIB's CPR and CMD curves.

Claims tested: the top-200 circuit recovers a real share of the behaviour (0 < f < 1.5, interval around
the estimate), node level and edge level are both reported with the ablation named; the curves end at f = 1
(every edge) and their areas are finite with intervals. Run with ``-s`` to see the numbers.

Measured when written (seed 0, 1 torch thread, ~40 s with the model loaded): top 200 EAP edges (50 nodes) on
32 prompts, corrupted ablation, edge level: f = 0.450 [0.400, 0.515], per-prompt median 0.437, IQR 0.223
(logit difference +3.85 clean, -0.49 circuit, -4.04 all ablated). On 16 prompts: CPR 0.272 [0.227, 0.325],
CMD 0.026 [0.014, 0.040]. EAP's CPR is at MIB's random level because EAP scores input->m0 positive (+0.45:
patching it is predicted to raise the logit difference), so no circuit chosen by signed importance holds an
edge out of the input, and under corrupted patching such a circuit is the all-ablated model (f = 0 up to 2%
of edges); EAP-IG scores give CPR ~2.1 (bench/circuits.py). Only sanity bounds are asserted: the numbers
move with the prompts.
"""

from __future__ import annotations

import time
import warnings

import pytest

from mechscope.circuits import Circuit, Graph, attribute, evaluate_circuit, faithfulness_curve
from mechscope.data import load_task

pytestmark = pytest.mark.real


def test_top_eap_edges_on_ioi(real_model):
    start = time.perf_counter()
    task = load_task("ioi", real_model, n=32)
    graph = Graph.from_model(real_model)
    scores = attribute(real_model, task, graph=graph, method="eap", batch_size=16, progress=False)
    circuit = Circuit.from_scores(scores, top_n=200)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # wide intervals on 32 prompts are expected and printed
        ev = evaluate_circuit(real_model, task, circuit)
        half = task.subset(slice(0, 16))
        curves = [faithfulness_curve(real_model, half, scores, kind=k, n_boot=500) for k in ("cpr", "cmd")]
    print(f"\n{circuit}\n{ev}")
    for c in curves:
        print(c)
    print(f"{time.perf_counter() - start:.1f} s")
    f = ev.faithfulness
    assert 0 < f.estimate < 1.5 and f.low <= f.estimate <= f.high
    assert ev.ablation == "corrupted" and ev.level == "edge" and ev.n_edges == 200
    for c in curves:
        assert float(c.faithfulness.estimate[-1]) == 1.0 and c.area.low <= c.area.high
