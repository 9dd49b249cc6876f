"""ACDC (Conmy et al. 2023) and ROC curves against a known circuit, on tiny random float64 models.

Claims tested: the batched search makes the decisions of a naive sequential ACDC written here (one edge
per forward, no shortcuts) and of itself run with one variant per forward, the same trace; every decision
compares the current circuit's metric with the metric after the candidate is patched, and the final
circuit's metric is what the kept edges give when evaluated afresh; bad settings and too large searches are
refused with the fix, and a time budget stops the search with a warning and keeps the untested edges. The
ROC area of scores is the Mann-Whitney probability; the ROC of a family of circuits is the trapezoid through
its points. (Exact recovery of a planted circuit: tests/unit/test_planted_circuit.py.)
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import mechscope
from mechscope.circuits import Graph, acdc, acdc_sweep, capture_sources, patched_logits, roc_auc, roc_of_circuits
from mechscope.data.task import Task
from tests.conftest import make_tiny, random_tokens


def _model(family: str = "llama") -> mechscope.HookedModel:
    hf = make_tiny(family, initializer_range=0.4).double()  # larger weights than the default: effects well apart
    for p in hf.parameters():
        p.requires_grad_(False)
    return mechscope.HookedModel(hf, name=f"tiny-{family}-f64")


def _task(n: int = 4) -> Task:
    gen = torch.Generator().manual_seed(5)
    return Task("random", random_tokens(n, 8, seed=1), random_tokens(n, 8, seed=51),
                torch.randint(3, 128, (n,), generator=gen), torch.randint(3, 128, (n,), generator=gen))


def naive_acdc(model, graph: Graph, task: Task, tau: float) -> tuple[torch.Tensor, dict[str, tuple[float, bool]]]:
    """ACDC as Conmy et al.'s Algorithm 1 states it: receivers from the logits backwards, each incoming edge
    (latest source first) patched on top of the removed ones; removed when KL(clean || patched) rises by at
    most tau. Returns the kept mask and, per edge, (metric after patching it, kept)."""
    kl_task = dataclasses.replace(task, metric="kl")
    corrupt = capture_sources(model, task.corrupt_tokens)
    clean_logits = model.run(task.clean_tokens, logits_to_keep=1).logits

    def metric(mask):
        logits = patched_logits(model, graph, task.clean_tokens, corrupt, mask)[0]
        return float(kl_task.values(logits, clean_logits).double().mean())

    patched = torch.zeros(graph.n_edges, dtype=torch.bool)
    cur, decisions, names = metric(patched), {}, graph.edge_names()
    for r in reversed(range(graph.n_receivers)):
        for e in reversed((graph.edge_receiver == r).nonzero().flatten().tolist()):
            trial = patched.clone()
            trial[e] = True
            after = metric(trial)
            keep = after - cur > tau
            decisions[names[e]] = (after, keep)
            if not keep:
                patched, cur = trial, after
    return ~patched, decisions


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_batched_acdc_makes_the_naive_sequential_decisions(family):
    m, task = _model(family), _task()
    g = Graph.from_model(m)
    kept, decisions = naive_acdc(m, g, task, tau=0.01)
    r = acdc(m, task, tau=0.01, graph=g, variants=8, progress=False)
    assert torch.equal(r.kept, kept) and 0 < r.n_kept < g.n_edges
    for step in r.trace:
        if step.evaluated:  # edges into a node that reaches nothing are removed without a forward; the naive
            after, keep = decisions[step.candidate]  # loop measures them and removes them too (checked above)
            assert step.kept == keep and step.after == pytest.approx(after, abs=1e-9), step


def test_speculative_batches_give_the_sequential_trace():
    m, task = _model(), _task()
    g = Graph.from_model(m)
    for level in ("edge", "node"):
        one = acdc(m, task, tau=0.003, graph=g, level=level, variants=1, progress=False)
        many = acdc(m, task, tau=0.003, graph=g, level=level, variants=8, batch_size=3, progress=False)
        assert [(s.candidate, s.kept, s.evaluated) for s in one.trace] == [(s.candidate, s.kept, s.evaluated) for s in many.trace]
        torch.testing.assert_close(torch.tensor([s.after for s in one.trace]), torch.tensor([s.after for s in many.trace]),
                                   atol=1e-9, rtol=0)
        assert torch.equal(one.kept, many.kept) and many.n_forwards / 2 <= one.n_forwards  # 2 prompt batches each


def test_each_decision_compares_the_current_circuit_with_the_candidate_patched():
    m, task = _model(), _task()
    g = Graph.from_model(m)
    r = acdc(m, task, tau=0.003, graph=g, progress=False)
    cur = r.metric_full
    assert cur == 0.0  # nothing patched: the clean model, KL 0
    for s in r.trace:
        assert s.before == cur and s.damage == pytest.approx(s.after - s.before)
        assert s.kept == (s.damage > 0.003)
        if not s.kept:
            cur = s.after
    assert r.metric_circuit == cur
    corrupt = capture_sources(m, task.corrupt_tokens)
    clean = m.run(task.clean_tokens, logits_to_keep=1).logits
    fresh = patched_logits(m, g, task.clean_tokens, corrupt, torch.stack([~r.kept, ~torch.zeros_like(r.kept)]))
    kl = dataclasses.replace(task, metric="kl")
    assert float(kl.values(fresh[0], clean).double().mean()) == pytest.approx(r.metric_circuit, abs=1e-9)
    assert r.task_values["circuit"] == pytest.approx(float(task.values(fresh[0]).double().mean()), abs=1e-9)
    assert r.task_values["empty"] == pytest.approx(float(task.values(fresh[1]).double().mean()), abs=1e-9)


def test_the_signed_rule_removes_edges_that_bring_the_output_closer_and_absolute_keeps_them():
    m, task = _model(), _task()
    g = Graph.from_model(m)
    signed = acdc(m, task, tau=1e-4, metric="task", graph=g, progress=False)  # logit difference: damage = before - after
    absolute = acdc(m, task, tau=1e-4, metric="task", graph=g, absolute=True, progress=False)
    assert all(s.kept == (abs(s.damage) > 1e-4) for s in absolute.trace)
    helpful = [s for s in signed.trace if s.damage < -1e-4]  # patching them brings the output closer to clean
    assert helpful and not any(s.kept for s in helpful)
    assert absolute.n_kept > signed.n_kept


def test_the_result_is_a_circuit_and_reads_well():
    pytest.importorskip("mechscope.circuits.circuit", reason="Circuit is not in this checkout yet")
    m, task = _model(), _task()
    r = acdc(m, task, tau=0.01, progress=False)
    c = r.circuit()
    assert torch.equal(c.edges, r.kept) and c.selection["method"] == "acdc" and c.selection["tau"] == 0.01
    assert "ACDC (edge level, tau=0.01, kl)" in str(r) and f"kept {r.n_kept} of 82 edges" in str(r)
    assert r.kept_names() == [n for n, k in zip(r.graph.edge_names(), r.kept.tolist()) if k]
    assert r.trace[0].to_dict().keys() == {"candidate", "before", "after", "damage", "kept", "evaluated"}


@pytest.mark.parametrize("kwargs, match", [
    (dict(tau=-0.1), "tau must be a finite number >= 0"),
    (dict(tau=float("nan")), "tau must be"),
    (dict(metric="logit_diff"), "unknown metric"),
    (dict(level="head"), "unknown level"),
    (dict(variants=0), "variants and batch_size"),
    (dict(max_candidates=50), r"82 candidates, more than max_candidates=50.*level='node'"),
])
def test_bad_settings_are_refused_with_the_fix(kwargs, match):
    with pytest.raises(mechscope.InputError, match=match):
        acdc(_model(), _task(), progress=False, **kwargs)


def test_a_time_budget_stops_the_search_and_keeps_what_it_did_not_test():
    m, task = _model(), _task()
    with pytest.warns(UserWarning, match="stopped at its time budget .* stay in the circuit"):
        r = acdc(m, task, tau=0.01, time_budget_s=0.0, progress=False)
    assert not r.complete and r.untested == 82 and r.kept.all() and not r.trace
    assert "STOPPED EARLY" in str(r)


# -- ROC ------------------------------------------------------------------------------------------------------
def test_roc_auc_is_the_probability_a_known_edge_outranks_another():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(60, generator=gen).round(decimals=1)  # rounding makes ties
    known = torch.rand(60, generator=gen) < 0.3
    pos, neg = scores[known].abs(), scores[~known].abs()
    pairs = (pos[:, None] > neg[None]).double() + 0.5 * (pos[:, None] == neg[None]).double()
    r = roc_auc(scores, known)
    assert r.auc == pytest.approx(float(pairs.mean()), abs=1e-12)
    assert r.auc == pytest.approx(float(torch.trapezoid(r.tpr, r.fpr)), abs=1e-12)  # the curve's area, ties as diagonals
    assert roc_auc(torch.where(known, 2.0, 1.0), known).auc == 1.0 and roc_auc(torch.ones(60), known).auc == 0.5
    signed = roc_auc(torch.where(known, -2.0, 1.0), known, absolute=False)
    assert signed.auc == 0.0


def test_roc_of_circuits_is_the_trapezoid_through_their_points():
    known = torch.tensor([True, True, False, False, False, False])
    circuits = torch.tensor([[True, False, False, False, False, False],  # (0, 0.5)
                             [True, True, True, False, False, False]])  # (0.25, 1)
    r = roc_of_circuits(circuits, known, thresholds=[0.1, 0.01])
    assert r.fpr.tolist() == [0.0, 0.0, 0.25, 1.0] and r.tpr.tolist() == [0.0, 0.5, 1.0, 1.0]
    assert r.auc == pytest.approx(0.25 * 0.75 + 0.75 * 1.0) and r.thresholds[1:3].tolist() == [0.1, 0.01]
    for bad, match in ((torch.zeros(6, dtype=torch.bool), "holds 0 of 6"), (torch.ones(5, dtype=torch.bool), "5 entries")):
        with pytest.raises(mechscope.InputError, match=match):
            roc_of_circuits(circuits, bad)


def test_a_tau_sweep_gives_nested_circuits_and_their_roc():
    m, task = _model(), _task()
    g = Graph.from_model(m)
    known = acdc(m, task, tau=0.01, graph=g, absolute=True, progress=False).kept
    sweep = acdc_sweep(m, task, [0.001, 0.01, 0.1, 1.0], known=known, graph=g, absolute=True)
    sizes = [r.n_kept for r in sweep.results]
    assert sizes == sorted(sizes, reverse=True) and torch.equal(sweep.results[1].kept, known)
    assert 1.0 in sweep.roc.tpr[1:-1].tolist() and sweep.roc.auc > 0.5  # tau 0.01 recovers its own circuit
    assert sweep.circuits().shape == (4, g.n_edges)
