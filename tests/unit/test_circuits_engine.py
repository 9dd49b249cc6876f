"""The edge engine on tiny random models of every supported family (no download).

Exactness: with the hooks attached and nothing patched the logits are the plain forward's, bit for bit;
patching every edge gives the corrupted run; one forward of the mask trick equals naive patching done by
hand, layer by layer, with mechscope's own ``Patch`` interventions (each receiver's query/key/value found
by running the real model on that receiver's input), for single edges and for random edge masks. EAP
scores equal the first-order change measured by finite differences (float64); the score of a GQA-native
key or value edge equals the sum of the scores of its ungrouped copies (a model whose key/value heads are
copied per query head computes the same function). Gemma's post-norms are refused with the reason.
"""

from __future__ import annotations

import pytest
import torch

import mechscope
from mechscope.circuits import Graph
from mechscope.circuits.attribution import attribute_pairs
from mechscope.circuits.engine import capture_sources, patched_logits
from tests.conftest import FAMILIES, GEMMA, make_tiny, random_tokens, tiny_hooked

EDGE_FAMILIES = [f for f in FAMILIES if f not in GEMMA]
POS = 8


def _pair(seed: int = 0, batch: int = 3):
    return random_tokens(batch, POS, seed=seed), random_tokens(batch, POS, seed=seed + 100)


# -- a naive, independent implementation of edge patching ------------------------------------------------------
def naive_patched_logits(model, graph: Graph, clean, corrupt, patched: list[int]):
    """Edge patching by hand: layer by layer, with full forwards and ``Patch`` interventions only.

    For each stage (a layer's attention receivers, then its MLP, then the logits), one forward with the
    earlier stages already patched gives the current output of every node; each patched receiver's input is
    its residual input plus Σ (corrupted - current) over its patched edges; a head's query/key/value is what
    the real model computes from that input (a forward with the layer's normalised input replaced), patched
    in for that head only.
    """
    a, c = model.adapter, model.cfg
    n, H = c.n_layers, c.n_heads
    rec_of = {}
    for e in patched:
        rec_of.setdefault(int(graph.edge_receiver[e]), []).append(int(graph.edge_source[e]))
    sites = ["blocks.0.hook_resid_pre", "blocks.*.attn.hook_result", "blocks.*.hook_mlp_out",
             "blocks.*.hook_resid_pre", f"blocks.{n - 1}.hook_resid_post"]
    if not graph.parallel:
        sites.append("blocks.*.hook_resid_mid")
    _, corr = model.run(corrupt, cache=sites)

    def outputs(cache):  # [S, B, P, D] every node's output in a run
        rows = [cache["blocks.0.hook_resid_pre"]]
        for L in range(n):
            rows += [cache[f"blocks.{L}.attn.hook_result"][:, :, h] for h in range(H)]
            rows.append(cache[f"blocks.{L}.hook_mlp_out"])
        return torch.stack(rows)

    z_corr = outputs(corr)
    done: list = []
    # stages in forward order: a layer's attention receivers, then its MLP (which reads its heads), then logits
    stages = [(L, kinds) for L in range(n) for kinds in (("q", "k", "v"), ("mlp",))] + [(n, ("logits",))]
    for L, kinds in stages:
        recs = [r for r in rec_of if graph.receivers[r].layer == L and graph.receivers[r].kind in kinds]
        if not recs:
            continue
        _, cur = model.run(clean, interventions=done, cache=sites)
        diff = z_corr - outputs(cur)

        def moved(base, r):
            return base + sum(diff[s] for s in rec_of[r])

        added = []
        for r in recs:
            rec = graph.receivers[r]
            if rec.kind == "logits":
                x = moved(cur[f"blocks.{n - 1}.hook_resid_post"], r)
                added.append(mechscope.Replace("ln_final.hook_normalized", value=model.module(a.final_norm)(x)))
            elif rec.kind == "mlp":
                base = cur[f"blocks.{L}.hook_resid_pre" if graph.parallel else f"blocks.{L}.hook_resid_mid"]
                added.append(mechscope.Replace(f"blocks.{L}.ln2.hook_normalized",
                                               value=model.layer_module(L, a.ln2)(moved(base, r))))
            else:
                normed = model.layer_module(L, a.ln1)(moved(cur[f"blocks.{L}.hook_resid_pre"], r))
                site = f"blocks.{L}.attn.hook_{rec.kind}"
                _, probe = model.run(clean, interventions=[*done, mechscope.Replace(f"blocks.{L}.ln1.hook_normalized",
                                                                                   value=normed)], cache=[site])
                added.append(mechscope.Patch(site, source=probe[site], heads=[rec.index]))
        done += added
    logits, _ = model.run(clean, interventions=done)
    return logits


@pytest.mark.parametrize("family", EDGE_FAMILIES)
def test_nothing_patched_is_the_plain_forward_and_everything_patched_the_corrupted_one(family):
    m = tiny_hooked(family)
    g = Graph.from_model(m)
    clean, corrupt = _pair()
    cs = capture_sources(m, corrupt, logits_to_keep=POS)
    masks = torch.zeros(2, g.n_edges, dtype=torch.bool)
    masks[1] = True
    out = patched_logits(m, g, clean, cs, masks, logits_to_keep=POS)
    assert torch.equal(out[0], m.hf(clean, use_cache=False).logits)  # hooks attached, nothing patched: bit-identical
    torch.testing.assert_close(out[1], m.hf(corrupt, use_cache=False).logits, atol=2e-5, rtol=0)


@pytest.mark.parametrize("family", EDGE_FAMILIES)
def test_single_edges_equal_naive_patching(family):
    m = tiny_hooked(family)
    g = Graph.from_model(m)
    clean, corrupt = _pair(1)
    cs = capture_sources(m, corrupt, logits_to_keep=POS)
    edges = torch.randperm(g.n_edges, generator=torch.Generator().manual_seed(0))[:50]
    masks = torch.zeros(len(edges), g.n_edges, dtype=torch.bool)
    masks[torch.arange(len(edges)), edges] = True
    fast = patched_logits(m, g, clean, cs, masks, logits_to_keep=POS)  # 50 variants, one forward
    kinds = set()
    for j, e in enumerate(edges.tolist()):
        kinds.add(g.receivers[int(g.edge_receiver[e])].kind)
        torch.testing.assert_close(fast[j], naive_patched_logits(m, g, clean, corrupt, [e]), atol=1e-5, rtol=0)
    assert kinds == {"q", "k", "v", "mlp", "logits"}


@pytest.mark.parametrize("family", EDGE_FAMILIES)
def test_random_edge_masks_equal_naive_layer_by_layer_patching(family):
    m = tiny_hooked(family)
    g = Graph.from_model(m)
    clean, corrupt = _pair(2)
    cs = capture_sources(m, corrupt, logits_to_keep=POS)
    gen = torch.Generator().manual_seed(1)
    n_masks = 50 if family == "llama" else 12
    masks = torch.rand(n_masks, g.n_edges, generator=gen) < torch.rand(n_masks, 1, generator=gen)
    fast = patched_logits(m, g, clean, cs, masks, logits_to_keep=POS)
    for j in range(n_masks):
        want = naive_patched_logits(m, g, clean, corrupt, masks[j].nonzero().flatten().tolist())
        torch.testing.assert_close(fast[j], want, atol=1e-5, rtol=0)


def _logit_diff(answers):
    def values(logits, clean_logits, rows=slice(None)):
        last, a = logits[:, -1].double(), answers[rows]
        return last.gather(1, a[:, :1]).squeeze(1) - last.gather(1, a[:, 1:]).squeeze(1)
    return values


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_eap_scores_are_the_first_order_change(family):
    """EAP(u -> r) = d/dw metric(clean with edge u -> r patched by a fraction w) at w = 0 (float64 model)."""
    hf = make_tiny(family).double()
    for p in hf.parameters():
        p.requires_grad_(False)
    m = mechscope.HookedModel(hf, name=f"tiny-{family}-f64")
    g = Graph.from_model(m)
    clean, corrupt = _pair(3, batch=2)
    answers = torch.tensor([[5, 9], [17, 3]])
    values = _logit_diff(answers)
    eap = attribute_pairs(m, g, clean, corrupt, values, method="eap", progress=False)
    cs = capture_sources(m, corrupt)
    # central differences; eps not smaller because the norms compute in float32 even in a float64 model
    eps = 1e-3
    edges = torch.randperm(g.n_edges, generator=torch.Generator().manual_seed(2))[:25]
    masks = torch.zeros(2 * len(edges), g.n_edges, dtype=torch.float64)
    masks[torch.arange(len(edges)), edges] = eps
    masks[len(edges) + torch.arange(len(edges)), edges] = -eps
    moved = patched_logits(m, g, clean, cs, masks)
    for j, e in enumerate(edges.tolist()):
        fd = (values(moved[j], None) - values(moved[len(edges) + j], None)) / (2 * eps)  # per prompt
        torch.testing.assert_close(eap.per_prompt[:, e].double(), fd, atol=2e-4, rtol=1e-3)


def _ungrouped(family: str):
    """The tiny GQA model with every key/value head copied per query head (the same function)."""
    hf = make_tiny(family)
    cfg = hf.config
    H, G = cfg.num_attention_heads, cfg.num_key_value_heads
    dh = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
    import copy

    cfg2 = copy.deepcopy(cfg)
    cfg2.num_key_value_heads = H
    torch.manual_seed(0)
    hf2 = type(hf)(cfg2).eval()
    state = hf.state_dict()
    for k, v in list(state.items()):
        if k.endswith(("k_proj.weight", "v_proj.weight", "k_proj.bias", "v_proj.bias")):
            state[k] = v.view(G, dh, *v.shape[1:]).repeat_interleave(H // G, dim=0).reshape(H * dh, *v.shape[1:])
    hf2.load_state_dict(state)
    for model in (hf, hf2):
        for p in model.parameters():
            p.requires_grad_(False)
    return mechscope.HookedModel(hf, name="grouped"), mechscope.HookedModel(hf2, name="ungrouped"), H // G


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_gqa_native_key_value_scores_are_the_sum_of_ungrouped_copies(family):
    grouped, ungrouped, rep = _ungrouped(family)
    clean, corrupt = _pair(4)
    torch.testing.assert_close(grouped.hf(clean).logits, ungrouped.hf(clean).logits, atol=1e-5, rtol=0)
    values = _logit_diff(torch.tensor([[5, 9], [17, 3], [40, 41]]))
    g1, g2 = Graph.from_model(grouped), Graph.from_model(ungrouped)
    s1 = attribute_pairs(grouped, g1, clean, corrupt, values, method="eap", progress=False).scores
    s2 = attribute_pairs(ungrouped, g2, clean, corrupt, values, method="eap", progress=False).scores
    assert g2.n_edges > g1.n_edges
    checked = 0
    for e, name in enumerate(g1.edge_names()):
        src, dst = name.split("->")
        if "<k>" in dst or "<v>" in dst:
            layer, kv = dst.split(".")[0], int(dst.split(".")[1][2:].split("<")[0])
            copies = [f"{src}->{layer}.h{h}{dst[dst.index('<'):]}" for h in range(kv * rep, (kv + 1) * rep)]
            want = sum(float(s2[g2.edge_index(c)]) for c in copies)
            assert float(s1[e]) == pytest.approx(want, abs=1e-4, rel=1e-3), name
            checked += 1
        else:  # query, MLP and logit edges are the same edges in both graphs
            assert float(s1[e]) == pytest.approx(float(s2[g2.edge_index(name)]), abs=1e-4, rel=1e-3), name
    assert checked == sum(1 for n in g1.edge_names() if "<k>" in n or "<v>" in n) > 0


@pytest.mark.parametrize("family", GEMMA)
def test_gemma_post_norms_are_refused_with_the_reason(family):
    with pytest.raises(mechscope.InputError, match="normalises each attention and MLP output"):
        Graph.from_model(tiny_hooked(family))


def test_graph_counts_names_and_errors():
    m = tiny_hooked("llama")  # 2 layers, 4 query / 2 key-value heads
    g = Graph.from_model(m)
    # layer 0: 8 attention receivers read input; m0 reads input + 4 heads; layer 1: 8 x (1 + 5); m1: 1 + 5 + 4; logits 11
    assert g.n_edges == 8 * 1 + 5 + 8 * 6 + 10 + 11
    assert g.edge_names()[0] == "input->a0.h0<q>" and "a0.h2->a1.kv1<v>" in g.edge_names()
    with pytest.raises(mechscope.InputError, match="does not write before"):
        g.edge_index("a1.h0->a0.h0<q>")
    with pytest.raises(mechscope.InputError, match="no node"):
        g.edge_index("a9.h0->logits")
    neox = Graph.from_model(tiny_hooked("gpt_neox"))  # parallel residual: an MLP does not read its own layer's heads
    assert "a0.h0->m0" not in neox.edge_names() and "a0.h0->m0" in Graph.from_model(tiny_hooked("gpt_neox_serial")).edge_names()


def _f64(family: str):
    hf = make_tiny(family).double()
    for p in hf.parameters():
        p.requires_grad_(False)
    return mechscope.HookedModel(hf, name=f"tiny-{family}-f64")


def test_integrated_gradients_are_complete():
    """IG's completeness on the graph: with many steps, ig-inputs' input edges sum to metric(corrupted) -
    metric(clean); ig-activations' edges out of a node group (a layer's heads, an MLP) sum to the effect of
    patching that group's output everywhere (measured with the mask trick). clean-corrupted is the mean of
    EAP at both ends."""
    m = _f64("llama")
    g = Graph.from_model(m)
    clean, corrupt = _pair(5, batch=2)
    values = _logit_diff(torch.tensor([[5, 9], [17, 3]]))
    clean_m = values(m.hf(clean).logits[:, -1:], None)
    corrupt_m = values(m.hf(corrupt).logits[:, -1:], None)
    ig = attribute_pairs(m, g, clean, corrupt, values, method="ig-inputs", steps=60, progress=False)
    from_input = ig.per_prompt[:, g.node_edges(["input"])].sum(1).double()
    torch.testing.assert_close(from_input, corrupt_m - clean_m, atol=0.03, rtol=0.03)
    act = attribute_pairs(m, g, clean, corrupt, values, method="ig-activations", steps=200, progress=False)
    cs = capture_sources(m, corrupt)
    heads = [[f"a{L}.h{h}" for h in range(g.n_heads)] for L in range(g.n_layers)]
    for nodes in (heads[0], ["m0"], heads[1], ["m1"]):  # ig-activations moves a layer's heads together
        effect = values(patched_logits(m, g, clean, cs, g.node_edges(nodes))[0], None) - clean_m
        torch.testing.assert_close(act.per_prompt[:, g.node_edges(nodes)].sum(1).double(), effect, atol=0.02, rtol=0.03)
    eap = attribute_pairs(m, g, clean, corrupt, values, method="eap", progress=False).per_prompt
    at_corrupt = attribute_pairs(m, g, clean, corrupt, values, method="ig-inputs", steps=1, progress=False).per_prompt
    cc = attribute_pairs(m, g, clean, corrupt, values, method="clean-corrupted", progress=False).per_prompt
    torch.testing.assert_close(cc, (eap + at_corrupt) / 2, atol=1e-6, rtol=1e-5)


def test_exact_scores_are_single_edge_patching():
    m = tiny_hooked("qwen2")
    g = Graph.from_model(m)
    clean, corrupt = _pair(6)
    values = _logit_diff(torch.tensor([[5, 9], [17, 3], [40, 41]]))
    edges = torch.tensor([0, 7, 33, g.n_edges - 1])
    ex = attribute_pairs(m, g, clean, corrupt, values, method="exact", edges=edges, batch_size=2, progress=False)
    assert ex.scored.sum() == 4 and ex.scores[~ex.scored].abs().sum() == 0
    for e in edges.tolist():
        want = values(naive_patched_logits(m, g, clean, corrupt, [e])[:, -1:], None) - values(m.hf(clean).logits[:, -1:], None)
        torch.testing.assert_close(ex.per_prompt[:, e].double(), want.double(), atol=1e-5, rtol=1e-4)
