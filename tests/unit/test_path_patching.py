"""Path patching (Wang et al. 2022, App. B) on tiny random models of several families.

Claims tested: the batched implementation equals Wang et al.'s algorithm written out by hand, step by step,
with plain ``model.run`` and ``Patch`` (head, MLP and input senders; query, key, value, MLP and logits
receivers; all or some positions); a sweep of many senders as variants of one forward equals one call per
sender; where no attention head and no MLP lies between a sender and its receiver, path patching *is*
edge patching, measured by the independent mask engine: a last-layer head into the logits of a
parallel-residual model (GPT-NeoX) is the edge u->logits, of a serial model (Llama) the edges u->logits and
u->m_last (the last MLP reads u and recomputes in pass C), and in an attention-only model any senders into
one receiver are exactly those edges. Bad names, empty sets and senders with no path are refused with the
fix.
"""

from __future__ import annotations

import pytest
import torch

import mechscope
from mechscope import Patch
from mechscope.circuits import Graph, capture_sources, patched_logits, path_patching, path_patching_sweep
from mechscope.data.task import Task
from tests.conftest import make_tiny, random_tokens, tiny_hooked

POS = 8


def _task(n: int = 5, seed: int = 0) -> Task:
    gen = torch.Generator().manual_seed(seed + 7)
    return Task("random", random_tokens(n, POS, seed=seed), random_tokens(n, POS, seed=seed + 50),
                torch.randint(3, 128, (n,), generator=gen), torch.randint(3, 128, (n,), generator=gen))


def wang_by_hand(model, task: Task, heads, mlps, receivers, *, inputs=False, positions=None):
    """Wang et al. 2022 App. B, one step at a time. ``heads``: [(layer, head)] senders; ``mlps``: [layer];
    ``receivers``: [(site, head or None)]. Returns metric(D) - metric(clean) per prompt."""
    n, H = model.cfg.n_layers, model.cfg.n_heads
    z = [f"blocks.{L}.attn.hook_z" for L in range(n)]
    # (A) cache both runs
    clean_logits, clean = model.run(task.clean_tokens, cache=z)
    _, corrupt = model.run(task.corrupt_tokens, cache=[*z, "blocks.*.hook_mlp_out", "blocks.0.hook_resid_pre"])
    # (C) x_orig; every head frozen to x_orig except the senders, patched from x_new; MLPs recompute
    pass_c = [Patch("blocks.0.hook_resid_pre", source=corrupt)] if inputs else []
    for L in range(n):
        senders = [h for (layer, h) in heads if layer == L]
        pass_c.append(Patch(z[L], source=clean, heads=[h for h in range(H) if h not in senders]))
        if senders:
            pass_c.append(Patch(z[L], source=corrupt, heads=senders))
        if L in mlps:
            pass_c.append(Patch(f"blocks.{L}.hook_mlp_out", source=corrupt))
    _, c = model.run(task.clean_tokens, interventions=pass_c, cache=[site for site, _ in receivers])
    # (D) x_orig with only the receivers patched to their values in C
    pass_d = [Patch(site, source=c, heads=None if h is None else [h], positions=positions) for site, h in receivers]
    logits, _ = model.run(task.clean_tokens, interventions=pass_d)
    return (task.values(logits) - task.values(clean_logits)).double()


CASES = [  # family, senders, receivers (names), the same by hand
    ("llama", ["a0.h1"], ["a1.h2<q>"], dict(heads=[(0, 1)], mlps=[], receivers=[("blocks.1.attn.hook_q", 2)])),
    ("llama", ["a0.h1", "m0"], ["a1.kv1<k>", "a1.kv0<v>"],
     dict(heads=[(0, 1)], mlps=[0], receivers=[("blocks.1.attn.hook_k", 1), ("blocks.1.attn.hook_v", 0)])),
    ("qwen3", ["a0.h0", "a0.h3", "a1.h1"], ["m1", "logits"],
     dict(heads=[(0, 0), (0, 3), (1, 1)], mlps=[], receivers=[("blocks.1.ln2.hook_normalized", None),
                                                              ("ln_final.hook_normalized", None)])),
    ("gpt2", ["input"], ["a1.h3<v>", "a0.h2<q>"],
     dict(heads=[], mlps=[], inputs=True, receivers=[("blocks.1.attn.hook_v", 3), ("blocks.0.attn.hook_q", 2)])),
    ("gpt_neox", ["m0", "a0.h2"], ["a1.h0<q>", "logits"],
     dict(heads=[(0, 2)], mlps=[0], receivers=[("blocks.1.attn.hook_q", 0), ("ln_final.hook_normalized", None)])),
]


@pytest.mark.parametrize("family, senders, receivers, by_hand", CASES)
def test_path_patching_equals_wang_et_al_by_hand(family, senders, receivers, by_hand):
    m = tiny_hooked(family)
    task = _task()
    got = path_patching(m, task, senders, receivers, batch_size=2, n_boot=200)
    want = wang_by_hand(m, task, **by_hand)
    torch.testing.assert_close(got.per_prompt, want, atol=1e-5, rtol=0)
    assert float(want.abs().max()) > 1e-3  # the comparison is not between zeros
    assert got.ci is not None and got.ci.low <= got.effect <= got.ci.high and got.effect == pytest.approx(float(want.mean()), abs=1e-5)


def test_receivers_patched_at_some_positions_only():
    m = tiny_hooked("llama")
    task = _task(seed=1)
    got = path_patching(m, task, ["a0.h2"], ["a1.h3<q>"], positions=[-1, -3], n_boot=0)
    want = wang_by_hand(m, task, heads=[(0, 2)], mlps=[], receivers=[("blocks.1.attn.hook_q", 3)], positions=[-1, -3])
    torch.testing.assert_close(got.per_prompt, want, atol=1e-5, rtol=0)
    assert got.ci is None


def test_a_sweep_of_variants_equals_one_call_per_sender():
    m = tiny_hooked("qwen2")
    task = _task(seed=2)
    sweep = path_patching_sweep(m, task, ["a1.h0<q>", "logits"], senders=["a0.h0", "a0.h1", "a0.h2", "a0.h3", "m0"],
                                variants=3, batch_size=3, n_boot=100, progress=False)
    for j, s in enumerate(sweep.senders):
        one = path_patching(m, task, [s], ["a1.h0<q>", "logits"], n_boot=0)
        torch.testing.assert_close(sweep.per_prompt[:, j], one.per_prompt, atol=1e-5, rtol=0)
    hm = sweep.head_map()
    assert hm.shape == (2, 4) and hm[1].isnan().all() and not hm[0].isnan().any()
    assert (sweep.ci.low <= sweep.effect + 1e-12).all() and (sweep.effect <= sweep.ci.high + 1e-12).all()
    default = path_patching_sweep(m, task, ["a1.h0<q>"], n_boot=0, progress=False)
    assert default.senders == ["a0.h0", "a0.h1", "a0.h2", "a0.h3"]  # every head with a path, by default


def _edge_effect(m, task, edges):
    g = Graph.from_model(m)
    mask = torch.zeros(g.n_edges, dtype=torch.bool)
    mask[[g.edge_index(e) for e in edges]] = True
    logits = patched_logits(m, g, task.clean_tokens, capture_sources(m, task.corrupt_tokens), mask)[0]
    clean = m.run(task.clean_tokens, logits_to_keep=1).logits
    return (task.values(logits) - task.values(clean)).double()


def test_a_last_layer_head_into_the_logits_is_edge_patching():
    """Parallel residual: the last MLP reads the block input, so only the edge u->logits carries u. Serial: the
    last MLP reads u and recomputes in pass C, so path patching is edge patching of u->logits and u->m1."""
    task = _task(seed=3)
    neox = tiny_hooked("gpt_neox")
    torch.testing.assert_close(path_patching(neox, task, ["a1.h2"], ["logits"], n_boot=0).per_prompt,
                               _edge_effect(neox, task, ["a1.h2->logits"]), atol=1e-5, rtol=0)
    llama = tiny_hooked("llama")
    pp = path_patching(llama, task, ["a1.h2"], ["logits"], n_boot=0).per_prompt
    torch.testing.assert_close(pp, _edge_effect(llama, task, ["a1.h2->logits", "a1.h2->m1"]), atol=1e-5, rtol=0)
    assert float((pp - _edge_effect(llama, task, ["a1.h2->logits"])).abs().max()) > 1e-3  # the MLP path matters


def test_in_an_attention_only_model_path_patching_is_edge_patching():
    hf = make_tiny("llama")
    for L in range(2):
        hf.model.layers[L].mlp.down_proj.weight.data.zero_()
    for p in hf.parameters():
        p.requires_grad_(False)
    m = mechscope.HookedModel(hf, name="attn-only-llama")
    task = _task(seed=4)
    for receiver in ["a1.h2<q>", "a1.kv0<k>", "a1.kv1<v>", "logits"]:
        senders = ["a0.h1", "a0.h3"] if receiver != "logits" else ["a0.h1", "a1.h0"]
        got = path_patching(m, task, senders, [receiver], n_boot=0).per_prompt
        torch.testing.assert_close(got, _edge_effect(m, task, [f"{s}->{receiver}" for s in senders]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("family, senders, receivers, match", [
    ("llama", [], ["logits"], "no senders"),
    ("llama", ["a0.h1"], [], "no receivers"),
    ("llama", ["a0.h9"], ["logits"], "is not a node"),
    ("llama", ["a0.h1"], ["a1.h7<q>"], "is not a receiver"),
    ("llama", ["a0.h1"], ["a1.h2<k>"], r"a1\.kv1<k>"),  # GQA: the key receiver is per key/value head
    ("llama", ["a1.h0"], ["a1.h2<q>"], "no path"),  # a head of the receiver's own layer writes after it reads
    ("llama", ["m1"], ["a1.h2<q>", "m1"], "no path"),
    ("gpt_neox", ["a1.h0"], ["m1"], "no path"),  # parallel residual: the MLP reads the block input
    ("llama", ["a0.h1", "a0.h1"], ["logits"], "twice"),
])
def test_bad_senders_and_receivers_are_refused_with_the_fix(family, senders, receivers, match):
    with pytest.raises(mechscope.InputError, match=match):
        path_patching(tiny_hooked(family), _task(), senders, receivers)
