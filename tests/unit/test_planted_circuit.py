"""Ground truth by construction: a tiny float64 model whose circuit is planted by hand, recovered exactly by
every discovery method.

The model is a tiny random Llama (grouped-query attention), GPT-2 or GPT-NeoX (parallel residual) in
float64 in which every head except a0.h1 and a1.h2 has its output projection W_O zeroed and every MLP
except m0 its down projection (weights and bias), so those nodes write exactly zero, whatever they read.
The planted circuit is then every edge from a live node (``input``, a0.h1, m0, a1.h2) into a receiver
that a live node reads (a0.h1's query, its key/value head's key and value, m0, a1.h2's query and its
key/value head's, the logits): 18 edges (17 for GPT-NeoX, whose m0 does not read a0.h1). Every other
edge either leaves a node that writes zero or feeds a node whose output is zero, so it cannot change the
logits: EAP, EAP-IG and exact patching must score it exactly 0 and every planted edge away from 0; ACDC
(edge and node level, signed and absolute) must keep exactly the planted set; path patching from each
layer-0 head into each layer-1 receiver and into the logits must be non-zero exactly on the planted pairs.
"""

from __future__ import annotations

import pytest
import torch

import mechscope
from mechscope.circuits import Graph, acdc, attribute, path_patching, path_patching_sweep
from mechscope.data.task import Task
from tests.conftest import make_tiny, random_tokens

LIVE_HEADS = {(0, 1), (1, 2)}
LIVE_MLPS = {0}
FAMILIES = ["llama", "gpt2", "gpt_neox"]


def planted_model(family: str) -> mechscope.HookedModel:
    """A tiny float64 model where only LIVE_HEADS and LIVE_MLPS write anything to the residual stream."""
    hf = make_tiny(family).double()
    for p in hf.parameters():
        p.requires_grad_(False)
    m = mechscope.HookedModel(hf, name=f"planted-{family}")
    a, dh = m.adapter, m.cfg.d_head
    for L in range(m.cfg.n_layers):
        o = m.layer_module(L, a.o_proj)
        for h in range(m.cfg.n_heads):
            if (L, h) not in LIVE_HEADS:  # W_O[h] = 0 (Conv1D stores [in, out], Linear [out, in])
                (o.weight.data[h * dh:(h + 1) * dh] if a.conv1d else o.weight.data[:, h * dh:(h + 1) * dh]).zero_()
        if L not in LIVE_MLPS:
            mlp = m.layer_module(L, a.mlp_branch)
            for name, p in mlp.named_parameters():
                if name.split(".")[0] in ("down_proj", "c_proj", "dense_4h_to_h"):
                    p.data.zero_()
    return m


def live_nodes(g: Graph) -> set[str]:
    return {"input", *(f"m{L}" for L in LIVE_MLPS), *(f"a{L}.h{h}" for L, h in LIVE_HEADS)}


def planted_edges(g: Graph) -> torch.Tensor:
    """bool [n_edges]: edges from a live node into a receiver a live node reads."""
    live, rep = live_nodes(g), g.n_heads // g.n_kv_heads

    def read_by_live(rec) -> bool:
        if rec.kind == "logits":
            return True
        if rec.kind == "mlp":
            return f"m{rec.layer}" in live
        heads = [rec.index] if rec.kind == "q" else range(rec.index * rep, (rec.index + 1) * rep)
        return any(f"a{rec.layer}.h{h}" in live for h in heads)

    return torch.tensor([g.sources[s] in live and read_by_live(g.receivers[r])
                         for r, s in zip(g.edge_receiver.tolist(), g.edge_source.tolist())])


def planted_task(n: int = 6, pos: int = 8) -> Task:
    gen = torch.Generator().manual_seed(3)
    return Task("planted", random_tokens(n, pos, seed=0), random_tokens(n, pos, seed=100),
                torch.randint(3, 128, (n,), generator=gen), torch.randint(3, 128, (n,), generator=gen))


@pytest.mark.parametrize("family", FAMILIES)
def test_the_planted_set_is_what_was_built(family):
    g = Graph.from_model(planted_model(family))
    known = planted_edges(g)
    assert int(known.sum()) == (17 if family == "gpt_neox" else 18)  # NeoX's m0 reads the block input, not a0.h1
    names = {n for n, k in zip(g.edge_names(), known.tolist()) if k}
    assert {"a0.h1->a1.h2<q>", "a1.h2->logits", "m0->logits", "input->logits"} <= names
    assert not any(n.startswith(("a0.h0", "a1.h3", "m1")) for n in names)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["eap", "eap-ig", "ig-activations", "exact"])
def test_every_scoring_method_scores_exactly_the_planted_edges(family, method):
    m = planted_model(family)
    g = Graph.from_model(m)
    known = planted_edges(g)
    s = attribute(m, planted_task(), graph=g, method=method, progress=False)
    assert float(s.per_prompt[:, ~known].abs().max()) == 0.0  # not one prompt moves off zero
    assert float(s.scores[known].abs().min()) > 1e-6  # every planted edge matters (smallest seen: 1.6e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("absolute", [False, True])
def test_acdc_keeps_exactly_the_planted_edges_at_edge_and_node_level(family, absolute):
    m = planted_model(family)
    g = Graph.from_model(m)
    known, task = planted_edges(g), planted_task()
    edge = acdc(m, task, tau=1e-9, absolute=absolute, graph=g, progress=False)
    assert torch.equal(edge.kept, known), edge.kept_names()
    assert edge.complete and edge.task_values["faithfulness"] == pytest.approx(1.0, abs=1e-9)
    node = acdc(m, task, tau=1e-9, absolute=absolute, graph=g, level="node", progress=False)
    assert set(node.kept_node_names()) == live_nodes(g) == set(edge.kept_node_names())
    assert torch.equal(node.kept, known)  # edges between kept nodes: the same circuit
    task_metric = acdc(m, task, tau=1e-9, metric="task", absolute=True, graph=g, progress=False)
    assert torch.equal(task_metric.kept, known)


def test_acdc_at_tau_zero_keeps_every_edge_that_changes_the_metric():
    """At tau = 0 with |damage|, an edge is removed only when patching it changes the metric not at all: here
    exactly the edges outside the planted set (their recorded change is exactly 0)."""
    m = planted_model("gpt2")
    g = Graph.from_model(m)
    known = planted_edges(g)
    r = acdc(m, planted_task(), tau=0.0, absolute=True, graph=g, progress=False)
    assert torch.equal(r.kept, known)
    assert all(s.damage == 0.0 for s in r.trace if not s.kept)
    assert all(abs(s.damage) > 0 for s in r.trace if s.kept)


@pytest.mark.parametrize("family", FAMILIES)
def test_path_patching_between_heads_is_non_zero_exactly_on_planted_pairs(family):
    m = planted_model(family)
    g = Graph.from_model(m)
    task = planted_task()
    kv = "kv" if g.n_kv_heads != g.n_heads else "h"
    rep = g.n_heads // g.n_kv_heads
    # (receiver, whether the live head a1.h2 reads it)
    receivers = [(f"a1.h{h}<q>", h == 2) for h in range(g.n_heads)]
    receivers += [(f"a1.{kv}{i}<{x}>", i == 2 // rep) for i in range(g.n_kv_heads) for x in "kv"]
    for rec, reads_live in receivers:
        sweep = path_patching_sweep(m, task, [rec], graph=g, n_boot=0, progress=False)
        for sender, effect in zip(sweep.senders, sweep.effect.tolist()):
            planted = sender == "a0.h1" and reads_live
            assert (abs(effect) > 1e-6) if planted else (effect == 0.0), (rec, sender, effect)
    to_logits = path_patching_sweep(m, task, ["logits"], graph=g, n_boot=0, progress=False)
    live = {f"a{L}.h{h}" for L, h in LIVE_HEADS}
    for sender, effect in zip(to_logits.senders, to_logits.effect.tolist()):
        assert (abs(effect) > 1e-6) if sender in live else (effect == 0.0), (sender, effect)
    # a dead sender has no effect through any receiver, also as part of a set with the live one removed
    assert path_patching(m, task, ["a0.h0", "a0.h3"], ["a1.h2<q>", "logits"], graph=g, n_boot=0).per_prompt.abs().max() == 0
