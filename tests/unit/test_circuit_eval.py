"""Circuits and their evaluation on tiny random models of every family with exact edges (no download).

Claims tested: the circuit of every edge has faithfulness exactly 1 and the empty circuit exactly 0, under
every ablation and at both levels; faithfulness equals a naive computation from ``patched_logits`` and its
bootstrap interval a naive resampling loop; a curve's CPR and CMD equal a hand-computed trapezoid over
circuits selected the way MIB selects them; the mean-ablation sources equal averaging ``capture_sources``;
zero-ablating every edge equals a plain run with every node's output zeroed by interventions; node level
equals edge level for a circuit of all edges of a node set; pruning keeps m(C) under corrupted patching;
the JSON and MIB formats hold what they say and refuse what they should.
"""

from __future__ import annotations

import dataclasses
import json
import warnings

import numpy as np
import pytest
import torch

import mechscope
from mechscope.analysis.bootstrap import bootstrap_indices
from mechscope.circuits import (Circuit, Graph, attribute, capture_sources, completeness, evaluate_circuit,
                                faithfulness_curve, mean_sources, minimality, patched_logits, robustness_table)
from mechscope.circuits.ablation import ablated_edges, measure
from mechscope.circuits.circuit import receiver_owners
from mechscope.core.errors import CorruptFileError
from mechscope.data.task import Task
from tests.conftest import FAMILIES, GEMMA, random_tokens, tiny_hooked

EDGE_FAMILIES = [f for f in FAMILIES if f not in GEMMA]
POS = 8


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():  # tiny random models give wide intervals; warnings are tested where claimed
        warnings.simplefilter("ignore", UserWarning)
        yield


def toy_task(n: int = 6, seed: int = 0, metric: str = "logit_diff") -> Task:
    g = torch.Generator().manual_seed(seed)
    answer = torch.randint(3, 128, (n,), generator=g)
    wrong = (answer - 3 + torch.randint(1, 124, (n,), generator=g)) % 125 + 3
    return Task("toy", random_tokens(n, POS, seed=seed), random_tokens(n, POS, seed=seed + 100), answer, wrong,
                metric=metric)


def random_circuit(graph: Graph, p: float = 0.3, seed: int = 0) -> Circuit:
    return Circuit(graph, torch.rand(graph.n_edges, generator=torch.Generator().manual_seed(seed)) < p)


# -- faithfulness ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", EDGE_FAMILIES)
def test_every_edge_is_one_and_no_edge_is_zero_exactly(family):
    m = tiny_hooked(family)
    g = Graph.from_model(m)
    task = toy_task()
    for circuit, want in ((Circuit(g, torch.ones(g.n_edges, dtype=torch.bool)), 1.0),
                          (Circuit(g, torch.zeros(g.n_edges, dtype=torch.bool)), 0.0)):
        table = robustness_table(m, task, circuit, n_boot=50)
        assert len(table.rows) == 6
        for row in table.rows:
            assert row.faithfulness.estimate == want, (row.ablation, row.level)
            assert row.faithfulness.low == row.faithfulness.high == want
    warnings.simplefilter("default", UserWarning)
    with pytest.warns(UserWarning, match="empty"):
        evaluate_circuit(m, task, Circuit(g, torch.zeros(g.n_edges, dtype=torch.bool)), n_boot=50)


def test_faithfulness_and_interval_equal_naive_computation():
    m = tiny_hooked("qwen2")
    g = Graph.from_model(m)
    task = toy_task(n=7)
    circuit = random_circuit(g)
    ev = evaluate_circuit(m, task, circuit, batch_size=3, rows_per_forward=3, n_boot=200, seed=4)
    cs = capture_sources(m, task.corrupt_tokens)
    out = patched_logits(m, g, task.clean_tokens, cs, torch.stack([~circuit.edges, torch.ones_like(circuit.edges)]))
    clean = m.hf(task.clean_tokens).logits[:, -1:]
    mC, m0 = (task.values(out[v], clean).double() for v in range(2))
    mM = task.values(clean, clean).double()
    f = float((mC.mean() - m0.mean()) / (mM.mean() - m0.mean()))
    assert ev.faithfulness.estimate == pytest.approx(f, abs=1e-6)
    torch.testing.assert_close(ev.values["circuit"], mC, atol=1e-5, rtol=0)
    # the interval: a loop over the same resamples of the same per-prompt values, numpy's percentiles
    mM, m0, mC = ev.values["model"], ev.values["empty"], ev.values["circuit"]
    boot = [float((mC[i].mean() - m0[i].mean()) / (mM[i].mean() - m0[i].mean())) for i in bootstrap_indices(7, 200, 4)]
    lo, hi = np.percentile(boot, [2.5, 97.5])
    assert (ev.faithfulness.low, ev.faithfulness.high) == pytest.approx((lo, hi), abs=1e-12)
    ratios = ((mC - m0) / (mM - m0)).numpy()
    assert ev.per_prompt["median"] == pytest.approx(float(np.median(ratios)), abs=1e-6)
    assert ev.per_prompt["iqr"] == pytest.approx(float(np.subtract(*np.percentile(ratios, [75, 25]))), abs=1e-6)
    d = ev.to_dict()
    assert d["ablation"] == "corrupted" and d["level"] == "edge" and json.dumps(d)


def test_wide_interval_warns_with_the_quantity():
    m = tiny_hooked("llama")
    g = Graph.from_model(m)
    warnings.simplefilter("default", UserWarning)
    with pytest.warns(UserWarning, match=r"normalised faithfulness \(mean ablation, node level\)"):
        evaluate_circuit(m, toy_task(n=4), random_circuit(g), ablation="mean", level="node", n_boot=50)


def test_curve_areas_are_the_trapezoid_of_mib_circuits():
    m = tiny_hooked("llama")
    g = Graph.from_model(m)
    task = toy_task(n=6)
    scores = attribute(m, task, graph=g, method="eap", progress=False)
    sizes = (5, 10, 25, 50, 100)
    for kind in ("cpr", "cmd"):
        curve = faithfulness_curve(m, task, scores, sizes=sizes, kind=kind, n_boot=100, rows_per_forward=12)
        mM, m0, mC = curve.values["model"], curve.values["empty"], curve.values["circuits"]
        f = [float((mC[:, k].mean() - m0.mean()) / (mM.mean() - m0.mean())) for k in range(len(sizes))]
        y = f if kind == "cpr" else [abs(1 - v) for v in f]
        x = [p / 100 for p in sizes]
        area = sum((x[i + 1] - x[i]) * (y[i] + y[i + 1]) / 2 for i in range(len(x) - 1))
        assert curve.area.estimate == pytest.approx(area, abs=1e-9)
        assert curve.faithfulness.estimate.tolist() == pytest.approx(f, abs=1e-9)
        assert curve.faithfulness.estimate[-1] == 1.0  # every edge: the clean run
        for k, p in enumerate(sizes[:-1]):  # each size is MIB's circuit: int(p% of edges) top-n, pruned
            want = Circuit.from_scores(scores, top_n=int(p / 100 * g.n_edges), absolute=kind == "cmd", prune=True)
            assert curve.n_kept[k] == want.n_edges
            ev = evaluate_circuit(m, task, want, n_boot=20)
            assert ev.faithfulness.estimate == pytest.approx(f[k], abs=1e-5)
        assert str(curve).startswith(f"{kind.upper()} {area:.3f}") and curve.to_dict()["kind"] == kind


# -- ablations and levels ---------------------------------------------------------------------------------
def test_mean_sources_are_the_average_of_captured_sources():
    m = tiny_hooked("gpt2")
    ref = random_tokens(7, POS, seed=9)
    mean = mean_sources(m, ref, batch_size=3)
    full = capture_sources(m, ref)
    for got, want in [(mean.input, full.input), *zip(mean.z, full.z), *zip(mean.mlp, full.mlp)]:
        torch.testing.assert_close(got, want.mean(0, keepdim=True), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_zero_ablating_every_edge_is_the_model_with_every_node_zeroed(family):
    m = tiny_hooked(family)
    g = Graph.from_model(m)
    task = toy_task(n=4)
    everything = torch.ones(1, g.n_edges, dtype=torch.bool)
    _, (edge,) = measure(m, g, task, [("zero", everything)])
    node_mask = ablated_edges(Circuit(g, torch.zeros(g.n_edges, dtype=torch.bool)), "node")[None]
    _, (node,) = measure(m, g, task, [("zero", node_mask)])
    n = m.cfg.n_layers
    zeroed = [mechscope.Replace("blocks.0.hook_resid_pre", value=lambda x: torch.zeros_like(x))]
    zeroed += [mechscope.Ablate(f"blocks.{L}.attn.hook_z") for L in range(n)]
    zeroed += [mechscope.Ablate(f"blocks.{L}.hook_mlp_out") for L in range(n)]
    logits, _ = m.run(task.clean_tokens, interventions=zeroed)
    naive = task.values(logits[:, -1:]).double()
    torch.testing.assert_close(edge[0], naive, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(node[0], edge[0], atol=0, rtol=0)  # the same mask


@pytest.mark.parametrize("family", ["qwen3", "gpt_neox", "gpt2"])
def test_node_level_equals_edge_level_for_all_edges_of_a_node_set(family):
    m = tiny_hooked(family)
    g = Graph.from_model(m)
    task = toy_task(n=5)
    nodes = ["input", "a0.h1", "a0.h3", "m0", "a1.h0", "m1"]
    circuit = Circuit.from_nodes(g, nodes)
    assert circuit.nodes == nodes + ["logits"]
    table = robustness_table(m, task, circuit, n_boot=50)
    for a in ("corrupted", "mean", "zero"):
        edge, node = (r for r in table.rows if r.ablation == a)
        torch.testing.assert_close(edge.values["circuit"], node.values["circuit"], atol=1e-5, rtol=0)
    # a circuit of the edges among the nodes (not to other receivers) is the same node circuit too
    owners = receiver_owners(g)
    keep = torch.tensor([g.node_index(v) for v in nodes])
    read = torch.tensor([not o or bool(torch.isin(torch.tensor(o), keep).any()) for o in owners])  # by a kept node
    inner = circuit.edges & read[g.edge_receiver]
    ev = evaluate_circuit(m, task, Circuit(g, inner), n_boot=20)
    torch.testing.assert_close(ev.values["circuit"], table.rows[0].values["circuit"], atol=1e-5, rtol=0)


def test_pruning_keeps_the_metric_under_corrupted_patching():
    m = tiny_hooked("mistral")
    g = Graph.from_model(m)
    task = toy_task(n=4)
    circuit = random_circuit(g, p=0.15, seed=3)
    pruned = circuit.prune()
    assert 0 < pruned.n_edges < circuit.n_edges and not (pruned.edges & ~circuit.edges).any()
    assert pruned.prune().n_edges == pruned.n_edges
    a = evaluate_circuit(m, task, circuit, n_boot=20).values["circuit"]
    b = evaluate_circuit(m, task, pruned, n_boot=20).values["circuit"]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    full = Circuit(g, torch.ones(g.n_edges, dtype=torch.bool))
    assert full.prune().n_edges == g.n_edges


def test_greedy_selection_grows_from_the_logits():
    m = tiny_hooked("llama")
    g = Graph.from_model(m)
    scores = attribute(m, toy_task(), graph=g, method="eap", progress=False)
    c = Circuit.greedy(scores, 20)
    assert c.n_edges == 20 and c.selection["method"] == "greedy"
    owners = receiver_owners(g)
    chosen = set(c.edges.nonzero().flatten().tolist())
    sources = {int(g.edge_source[e]) for e in chosen}
    for e in chosen:  # every chosen edge enters the logits or a receiver read by a chosen edge's source
        r = int(g.edge_receiver[e])
        assert r == g.n_receivers - 1 or set(owners[r]) & sources
    assert c.prune().n_edges <= 20 and Circuit.greedy(scores, g.n_edges).n_edges == g.n_edges
    top = Circuit.from_scores(scores, top_n=1)
    assert top.edges.nonzero().item() == int(scores.scores.abs().argmax())
    signed = Circuit.from_scores(scores, top_n=1, absolute=False)
    assert signed.edges.nonzero().item() == int(scores.scores.argmin())  # importance is -score


def test_wang_criteria_are_knockout_differences():
    m = tiny_hooked("gpt2")
    g = Graph.from_model(m)
    task = toy_task(n=5)
    circuit = Circuit.from_nodes(g, ["input", "a0.h0", "a0.h2", "m0", "a1.h1"])
    comp = completeness(m, task, circuit, k_sets=[[], ["a0.h2"]], ablation="corrupted", n_boot=50)
    assert comp.n_forwards == 4 and len(comp.gaps) == 2
    ev = evaluate_circuit(m, task, circuit, level="node", n_boot=20)
    assert comp.gaps[0].f_a == pytest.approx(float(ev.m_circuit.estimate), abs=1e-6)
    assert comp.gaps[0].f_b == pytest.approx(float(ev.m_model.estimate), abs=1e-9)
    knocked = Circuit.from_nodes(g, ["input", "a0.h0", "m0", "a1.h1"])
    ev_k = evaluate_circuit(m, task, knocked, level="node", n_boot=20)
    assert comp.gaps[1].f_a == pytest.approx(float(ev_k.m_circuit.estimate), abs=1e-6)
    assert comp.gaps[1].gap == pytest.approx(abs(comp.gaps[1].f_a - comp.gaps[1].f_b), abs=1e-9)
    greedy = completeness(m, task, circuit, n_random=2, greedy_steps=1, n_boot=50)
    assert len(greedy.gaps) == 5 and greedy.n_forwards == 2 * 4 + 2 * 4 + 2
    mini = minimality(m, task, circuit, k_sets=[[]], ablation="corrupted", n_boot=50)
    assert set(mini.nodes) == {"a0.h0", "a0.h2", "m0", "a1.h1"} and mini.n_forwards == 5
    assert mini.nodes["a0.h2"].gap == pytest.approx(abs(ev_k.m_circuit.estimate - ev.m_circuit.estimate), abs=1e-6)
    with pytest.raises(mechscope.InputError, match="outside the circuit"):
        completeness(m, task, circuit, k_sets=[["a1.h3"]])


# -- selection and files --------------------------------------------------------------------------------------
def test_selection_errors_name_the_fix():
    m = tiny_hooked("llama")
    g = Graph.from_model(m)
    scores = attribute(m, toy_task(), graph=g, method="eap", progress=False)
    with pytest.raises(mechscope.InputError, match="keeps no edge: the largest"):
        Circuit.from_scores(scores, threshold=1e9)
    for bad in (0, -1, g.n_edges + 1):
        with pytest.raises(mechscope.InputError, match="top_n must be an int from 1 to"):
            Circuit.from_scores(scores, top_n=bad)
    with pytest.raises(mechscope.InputError, match="exactly one"):
        Circuit.from_scores(scores, top_n=3, threshold=0.1)
    kept = Circuit.from_scores(scores, threshold=float(scores.scores.abs().median()))
    assert kept.n_edges >= g.n_edges // 2
    with pytest.raises(mechscope.InputError, match="unknown ablation"):
        evaluate_circuit(m, toy_task(), kept, ablation="resample")
    other = tiny_hooked("gpt2")
    with pytest.raises(mechscope.InputError, match="belongs to tiny-llama"):
        evaluate_circuit(other, toy_task(), Circuit.from_scores(scores, top_n=5))


def test_json_round_trip_is_sorted_and_refuses_other_models(tmp_path):
    m = tiny_hooked("llama")
    g = Graph.from_model(m)
    scores = attribute(m, toy_task(), graph=g, method="eap", progress=False)
    c = Circuit.from_scores(scores, top_n=12)
    path = c.save(tmp_path / "c.json")
    back = Circuit.load(path, g)
    assert back == c and back.edge_names() == c.edge_names() and torch.equal(back.scores, c.scores)
    later = dataclasses.replace(c, meta=c.meta | {"date": "2099-01-01T00:00:00+00:00"})
    assert later == c and dataclasses.replace(c, meta=c.meta | {"task": "other"}) != c  # the date alone is not provenance
    text = path.read_text()
    doc = json.loads(text)
    assert doc["format"] == "mechscope.circuit" and doc["format_version"] == 1 and doc["model"] == "tiny-llama"
    assert doc["edges"] == sorted(doc["edges"]) and list(doc["scores"]) == sorted(doc["scores"])
    assert len(doc["scores"]) == g.n_edges and doc["meta"]["method"] == "eap"
    lines = text.splitlines()
    first = lines.index(' "edges": [') + 1
    assert [line.strip().strip(",") for line in lines[first:first + c.n_edges]] == [f'"{e}"' for e in doc["edges"]]
    only = Circuit.load(c.save(tmp_path / "s.json", scores="circuit"), g)
    assert torch.equal(only.scores[c.edges], c.scores[c.edges]) and only.scores[~c.edges].isnan().all()
    empty = Circuit.load(Circuit(g, torch.zeros(g.n_edges, dtype=torch.bool)).save(tmp_path / "e.json"), g)
    assert empty.is_empty and empty.nodes == []
    with pytest.raises(mechscope.InputError, match="circuit of tiny-llama.*tiny-gpt2.*Load it onto the graph of tiny-llama"):
        Circuit.load(path, Graph.from_model(tiny_hooked("gpt2")))
    doc["edges"].append("a0.h0->a0.h1<q>")
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    with pytest.raises(mechscope.InputError, match="names 1 edges that tiny-llama's graph lacks"):
        Circuit.load(tmp_path / "bad.json", g)
    doc["extra"] = 1
    (tmp_path / "bad2.json").write_text(json.dumps(doc))
    with pytest.raises(CorruptFileError, match="unknown keys"):
        Circuit.load(tmp_path / "bad2.json", g)


def test_mib_export_has_every_ungrouped_edge_with_flags(tmp_path):
    m = tiny_hooked("llama")  # 4 query heads, 2 key/value heads
    g = Graph.from_model(m)
    scores = attribute(m, toy_task(), graph=g, method="eap", progress=False)
    c = Circuit.from_scores(scores, top_n=15)
    doc = c.to_mib(tmp_path / "mib.json")
    assert json.loads((tmp_path / "mib.json").read_text()) == doc
    ungrouped = Graph(g.model_name, g.n_layers, g.n_heads, g.n_heads, g.parallel)  # K/V per query head
    assert set(doc["edges"]) == set(ungrouped.edge_names()) and len(doc["edges"]) == ungrouped.n_edges > g.n_edges
    assert doc["cfg"] == {"n_layers": 2, "n_heads": 4, "parallel_attn_mlp": False}
    assert set(doc["nodes"]) == {*g.sources, "logits"}
    assert [n for n, v in doc["nodes"].items() if v] == c.nodes
    for name, e in zip(g.edge_names(), range(g.n_edges)):
        src, dst = name.split("->")
        if "kv" in dst:  # a1.kv1<k> -> a1.h2<k>, a1.h3<k>, each with the native score (MIB's sign: -score)
            layer, g_idx, kind = dst.split(".")[0], int(dst.split(".kv")[1][0]), dst[-3:]
            copies = [f"{src}->{layer}.h{h}{kind}" for h in (2 * g_idx, 2 * g_idx + 1)]
        else:
            copies = [name]
        for cp in copies:
            assert doc["edges"][cp] == {"score": -float(scores.scores[e]), "in_graph": bool(c.edges[e])}
    assert sum(v["in_graph"] for v in doc["edges"].values()) > c.n_edges  # K/V copies


@pytest.mark.parametrize("family", EDGE_FAMILIES)
def test_binary_masks_equal_the_general_mask_product(family):
    """patched_logits sums, for 0/1 masks, only the patched rows or (running total minus) the kept rows; with
    the same masks as floats it takes the general [R, S] x [S, B*P*D] product. Single variants matter: then
    only the sources some edge patches are recorded."""
    m = tiny_hooked(family)
    g = Graph.from_model(m)
    task = toy_task(n=3)
    cs = capture_sources(m, task.corrupt_tokens)
    gen = torch.Generator().manual_seed(5)
    for p in (0.02, 0.3, 0.7, 0.98):
        masks = torch.rand(3, g.n_edges, generator=gen) < p
        for batch in (masks[:1], masks):
            fast = patched_logits(m, g, task.clean_tokens, cs, batch)
            general = patched_logits(m, g, task.clean_tokens, cs, batch.float())
            torch.testing.assert_close(fast, general, atol=1e-5, rtol=0)


def test_mean_ablation_uses_the_given_reference():
    m = tiny_hooked("llama")
    g = Graph.from_model(m)
    task = toy_task(n=4)
    circuit = random_circuit(g)
    ref = random_tokens(5, POS, seed=42)
    own = evaluate_circuit(m, task, circuit, ablation="mean", reference=ref, n_boot=20)
    default = evaluate_circuit(m, task, circuit, ablation="mean", n_boot=20)  # the task's corrupted prompts
    again = evaluate_circuit(m, task, circuit, ablation="mean", reference=task.corrupt_tokens, n_boot=20)
    torch.testing.assert_close(default.values["circuit"], again.values["circuit"], atol=0, rtol=0)
    assert not torch.allclose(own.values["empty"], default.values["empty"])
    with pytest.raises(mechscope.InputError, match="do not fit the task's 8 positions"):
        evaluate_circuit(m, task, circuit, ablation="mean", reference=random_tokens(5, POS + 1))
