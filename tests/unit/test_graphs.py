"""Attribution graphs (mechscope.graphs) on tiny random models with random transcoders.

Claims tested: the local replacement model with its error nodes reproduces the real logits; every edge equals
the measured effect of a perturbation of its source in the frozen replacement model (features, error nodes and
tokens as sources; features and logits as targets), in float64; the feature order by influence keeps the
most influential features; pruning keeps the cumulative influence it states and the histogram threshold equals
the sorting definition; graph scores are 1 without error and fall with it; a graph round-trips through its
files; a transcoder set saves and loads, and bad input (another model, a missing layer, an empty or too long
prompt, a target outside the vocabulary) is a clear error.
"""

from __future__ import annotations

import json

import pytest
import torch

import mechscope
from mechscope.core.errors import CorruptFileError
from mechscope.dictionaries import SparseDictionary
from mechscope.graphs import (AttributionGraph, TranscoderSet, attribute, cumulative_threshold, frozen_forward,
                              graph_scores, influence, load_transcoders, normalize_rows, prune, replacement_state,
                              save_transcoders, transcoder_configs)
from mechscope.graphs.replacement import feature_preactivations
from tests.conftest import make_tiny, random_tokens


def tiny64(family: str = "llama") -> mechscope.HookedModel:
    hf = make_tiny(family).double()
    for p in hf.parameters():
        p.requires_grad_(False)
    return mechscope.HookedModel(hf, name=f"tiny-{family}")


def random_set(model, d_sae: int = 32, k: int = 4, skip: bool = True, dtype: str = "float64",
               error_scale: float = 0.3) -> TranscoderSet:
    out = []
    for i, c in enumerate(transcoder_configs(model, d_sae=d_sae, k=k, skip=skip)):
        d = SparseDictionary(c.replace(dtype=dtype)).initialize(seed=i)
        with torch.no_grad():
            d.b_enc.normal_(0, 0.1)
            d.b_dec.normal_(0, 0.05)
            d.W_dec.mul_(error_scale)
            if d.W_skip is not None:
                d.W_skip.normal_(0, 0.05)
        out.append(d.eval())
    return TranscoderSet(out, model_name=model.cfg.name)


@pytest.fixture(scope="module")
def setup():
    m = tiny64()
    ts = random_set(m)
    tok = random_tokens(1, 8, seed=3)[0]
    g = attribute(m, ts, tok, max_feature_nodes=None, batch_size=16, progress=False)
    return m, ts, tok, g


def _perturbed(m, ts, st, deltas):
    with frozen_forward(m, ts, st, 1, deltas=deltas, grad=False) as r:
        pre = [feature_preactivations(ts, r, L)[0] for L in range(st.n_layers)]
        return pre, r.logits[0, -1]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_replacement_model_reproduces_the_real_logits(family):
    m = tiny64(family)
    ts = random_set(m, skip=family == "llama")
    tok = random_tokens(1, 9, seed=1)[0]
    st = replacement_state(m, ts, tok)
    with torch.no_grad():
        real = make_tiny(family).double()(tok[None]).logits[0]  # a plain transformers forward
    with frozen_forward(m, ts, st, 2, grad=False) as run:
        got = run.logits
    # HF's norms compute in float32 even for a float64 model: agreement is to float32 rounding
    assert torch.allclose(got[0], real, rtol=0, atol=1e-5 * float(real.abs().max()))
    assert torch.allclose(got[0], got[1], rtol=0, atol=1e-12)
    assert torch.allclose(st.logits, real, atol=1e-12)
    # the error nodes are what makes it exact: without them the logits move
    for L in range(st.n_layers):
        assert st.errors[L].abs().max() > 1e-3
    recon = st.mlp_out - st.errors
    for L in range(st.n_layers):  # position 0 (BOS, the attention sink) has no features: all error
        assert torch.allclose(recon[L, 1:], ts[L](st.mlp_in[L, 1:]), atol=1e-12)
    assert st.first_zeroed and not (st.features.index[:, 1] == 0).any()
    kept = replacement_state(m, ts, tok, zero_first=False)
    assert (kept.features.index[:, 1] == 0).any()


def test_every_edge_is_the_effect_of_perturbing_its_source(setup):
    m, ts, tok, g = setup
    st = replacement_state(m, ts, tok)
    A = g.adjacency.double()
    pre0, lg0 = _perturbed(m, ts, st, None)
    D = m.cfg.d_model

    def check(col, deltas, factor=1.0):
        pre1, lg1 = _perturbed(m, ts, st, deltas)
        for j in range(g.n_features):
            n = g.node(j)
            meas = float(pre1[n["layer"]][n["pos"], n["feature"]] - pre0[n["layer"]][n["pos"], n["feature"]])
            assert meas == pytest.approx(factor * float(A[j, col]), rel=1e-5, abs=1e-7), (j, col)
        dl = (lg1 - lg1.mean()) - (lg0 - lg0.mean())
        for k in range(g.n_logits):
            assert float(dl[g.logit_tokens[k]]) == pytest.approx(factor * float(A[g.logit_start + k, col]), rel=1e-5,
                                                                 abs=1e-7)

    assert g.n_features == len(st.features) > 20
    for i in range(0, g.n_features, 7):  # double a feature: adds activation x decoder row once
        n = g.node(i)
        delta = torch.zeros(1, g.n_pos, D, dtype=torch.float64)
        delta[0, n["pos"]] = n["activation"] * ts[n["layer"]].W_dec[n["feature"]]
        check(i, {n["layer"]: delta})
    for L, p in [(0, 3), (1, 7)]:  # zero an error node: its edge, negated
        delta = torch.zeros(1, g.n_pos, D, dtype=torch.float64)
        delta[0, p] = -st.errors[L, p]
        check(g.error_node(L, p), {L: delta}, factor=-1.0)
    assert A[:, g.logit_start:].abs().max() == 0 and A[g.error_start:g.logit_start].abs().max() == 0
    # causality: nothing reads a later position or a later (or the same) layer
    for j in range(g.n_features):
        tj = g.node(j)
        for i in range(g.n_features):
            si = g.node(i)
            if si["pos"] > tj["pos"] or si["layer"] >= tj["layer"]:
                assert A[j, i] == 0


def test_token_edges_are_the_embeddings_direct_effects(setup):
    m, ts, tok, g = setup
    st = replacement_state(m, ts, tok)
    k = 0
    with frozen_forward(m, ts, st, 1, grad=True) as r:
        lg = r.logits[0, -1]
        y = lg[g.logit_tokens[k]] - lg.mean()
        (gr,) = torch.autograd.grad(y, [r.embed])
    want = (gr[0] * st.embed).sum(-1)
    got = g.adjacency[g.logit_start + k, g.token_start:g.logit_start].double()
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-7)


def test_feature_and_error_edges_sum_to_their_joint_effect(setup):
    """Removing every feature and error node at once moves each target by the sum of their edges (linearity)."""
    m, ts, tok, g = setup
    st = replacement_state(m, ts, tok)
    # zero every source: features (their decoder rows), errors and embeddings; what is left is the constant part
    D = m.cfg.d_model
    deltas = {L: torch.zeros(1, g.n_pos, D, dtype=torch.float64) for L in range(st.n_layers)}
    for (L, p, f), a in zip(st.features.index.tolist(), st.features.values.tolist()):
        deltas[L][0, p] -= a * ts[L].W_dec[f]
    for L in range(st.n_layers):
        deltas[L][0] -= st.errors[L]
    pre_full, _ = _perturbed(m, ts, st, None)
    pre_none, _ = _perturbed(m, ts, st, deltas)
    A = g.adjacency.double()
    for j in range(0, g.n_features, 5):
        n = g.node(j)
        diff = float(pre_full[n["layer"]][n["pos"], n["feature"]] - pre_none[n["layer"]][n["pos"], n["feature"]])
        assert diff == pytest.approx(float(A[j, :g.token_start].sum()), rel=1e-5, abs=1e-7)


def test_max_feature_nodes_keeps_the_most_influential(setup):
    m, ts, tok, full = setup
    part = attribute(m, ts, tok, max_feature_nodes=10, batch_size=4, update_interval=1, progress=False)
    assert part.n_features == 10 and full.n_features == len(full.active_features)
    w = full.logit_weights()
    infl = influence(normalize_rows(full.adjacency), w)[:full.n_features]
    rank = infl.argsort(descending=True)
    top = set(full.selected[rank[:10]].tolist())
    # the greedy order from partial rows finds most of the true top 10, and the chosen carry most influence
    assert len(top & set(part.selected.tolist())) >= 6
    chosen = torch.isin(full.selected, part.selected)
    assert float(infl[chosen].sum()) >= 0.8 * float(infl[rank[:10]].sum())
    # the rows it did compute equal the full graph's on the shared columns
    i = part.feature_node(*part.active_features[part.selected[0]].tolist())
    j = full.feature_node(*part.active_features[part.selected[0]].tolist())
    assert torch.allclose(part.adjacency[i, part.error_start:], full.adjacency[j, full.error_start:])


def test_cumulative_threshold_equals_the_sort_definition():
    g = torch.Generator().manual_seed(0)
    for n, frac in [(50, 0.8), (100_000, 0.98), (100_000, 0.5), (20_000, 1.0), (20_000, 0.0)]:
        s = torch.rand(n, generator=g).pow(8) * (torch.rand(n, generator=g) > 0.3)
        ordered = s[s > 0].double().sort(descending=True).values
        k = int(torch.searchsorted(ordered.cumsum(0) / ordered.sum(), torch.tensor(frac, dtype=torch.float64)))
        want = float(ordered[min(k, len(ordered) - 1)])
        got = cumulative_threshold(s, frac)
        assert got == pytest.approx(want, rel=1e-6)
        assert float(s[s >= got].double().sum()) >= frac * float(s.double().sum()) * (1 - 1e-9)
    assert cumulative_threshold(torch.zeros(5), 0.5) == float("inf")
    with pytest.raises(mechscope.InputError, match=r"\[0, 1\]"):
        cumulative_threshold(torch.ones(3), 1.5)


def _square_reference(g, node_threshold, edge_threshold):
    """Pruning and scores by the square-matrix definitions (circuit-tracer's, written out plainly)."""
    A = g.adjacency.float()
    w = g.logit_weights()
    nf, keep = g.n_features, g.token_start

    def infl(M):
        return influence(normalize_rows(M), w)

    def thr(x, f):
        v = x.flatten().double()
        v = v[v > 0].sort(descending=True).values
        k = int(torch.searchsorted(v.cumsum(0) / v.sum(), torch.tensor(f, dtype=torch.float64)))
        return float(v[min(k, len(v) - 1)])

    node = infl(A)
    nm = node >= thr(node, node_threshold)
    nm[keep:] = True
    P = A * nm[:, None] * nm[None, :]
    sc = normalize_rows(P) * (infl(P) + w)[:, None]
    em = (sc >= thr(sc, edge_threshold)) & (sc > 0)
    while True:
        old = nm.clone()
        nm[:keep] &= em[:, :keep].any(0)
        nm[:nf] &= em[:nf].any(1)
        em &= nm[:, None] & nm[None, :]
        if torch.equal(old, nm):
            break

    def scores(M, mask=None):
        An = normalize_rows(M)
        i = influence(An, w)
        t, e = float(i[g.token_start:g.logit_start].sum()), float(i[g.error_start:g.token_start].sum())
        out = i + w if mask is None else (i + w) * mask
        return t / (t + e), float(((1 - An[:, g.error_start:g.token_start].sum(-1)) * out).sum() / out.sum())

    return nm, em, scores(A), scores(A * em, nm)


@pytest.mark.parametrize("thresholds", [(0.8, 0.98), (0.5, 0.9), (0.95, 0.999)])
def test_block_pruning_and_scores_equal_the_square_definitions(setup, thresholds):
    _, _, _, g = setup
    nm, em, full, pruned = _square_reference(g, *thresholds)
    pr = prune(g, *thresholds)
    assert torch.equal(pr.node_mask, nm)
    assert torch.equal(g.adjacency.new_zeros(g.n_nodes, g.n_nodes).bool().index_put_(
        (torch.tensor([g.row_node(r) for r in range(g.edges.shape[0])])[:, None], torch.arange(g.n_sources)[None]),
        pr.edge_mask), em)
    assert graph_scores(g) == pytest.approx(full, rel=1e-5)
    assert graph_scores(g, pr) == pytest.approx(pruned, rel=1e-5)


def test_long_prompt_plan_ranks_from_top_entries_and_keeps_edges_exact(setup):
    m, ts, tok, full = setup
    dense = attribute(m, ts, tok, max_feature_nodes=12, batch_size=1, progress=False)  # the plan below gets 1 too
    assert dense.info["passes"] == 1
    # every entry kept by the ranking pass: the same greedy order, the same graph
    same = attribute(m, ts, tok, max_feature_nodes=12, batch_size=4, memory_budget_gb=1e-6, ranking_entries=10**6,
                     progress=False)
    assert same.info["passes"] == 2 and same.info["batch_size"] == 1
    assert torch.equal(same.selected, dense.selected) and torch.allclose(same.edges, dense.edges, atol=1e-6)
    # few entries kept: perhaps another order, but every edge it has equals the full graph's
    few = attribute(m, ts, tok, max_feature_nodes=12, batch_size=4, memory_budget_gb=1e-6, ranking_entries=8,
                    progress=False)
    rows = [full.feature_node(*few.active_features[i].tolist()) for i in few.selected]
    cols = rows + list(range(full.error_start, full.logit_start))
    want = torch.cat([full.edges[rows][:, cols], full.edges[full.n_features:][:, cols]])
    assert torch.allclose(few.edges, want, atol=1e-6)


def test_pruning_keeps_the_stated_influence(setup):
    _, _, _, g = setup
    pr = prune(g, 0.8, 0.98)
    infl = pr.influence
    feat_err = slice(0, g.token_start)
    kept = float(infl[feat_err][pr.node_mask[feat_err]].sum())
    # the node threshold keeps >= 80% of all influence before nodes without edges are dropped; they carry little
    before = infl >= cumulative_threshold(infl, 0.8)
    assert float(infl[before].sum()) >= 0.8 * float(infl.sum()) - 1e-6
    assert pr.node_mask[g.token_start:].all() and kept > 0
    row_kept = torch.tensor([bool(pr.node_mask[g.row_node(r)]) for r in range(g.edges.shape[0])])
    assert not pr.edge_mask[~row_kept].any() and not pr.edge_mask[:, ~pr.node_mask[:g.n_sources]].any()
    # every kept feature has an edge in and out
    for i in pr.node_mask[:g.n_features].nonzero().flatten().tolist():
        assert pr.edge_mask[i].any() and pr.edge_mask[:, i].any()
    tight, loose = prune(g, 0.5, 0.9), prune(g, 0.95, 0.999)
    assert tight.node_mask.sum() <= pr.node_mask.sum() <= loose.node_mask.sum()
    with pytest.raises(mechscope.InputError, match="node_threshold"):
        prune(g, 1.2)


def test_scores_are_one_without_error_and_fall_with_it():
    m = tiny64()
    tok = random_tokens(1, 6, seed=4)[0]
    scores = []
    for scale in (0.3, 1.0):
        g = attribute(m, random_set(m, error_scale=scale), tok, max_feature_nodes=None, progress=False)
        scores.append(graph_scores(g))
        rep, comp = scores[-1]
        assert 0 < rep <= 1 and 0 < comp <= 1
    # a graph whose error columns are zeroed scores 1 and 1
    g.edges[:, g.error_start:g.token_start] = 0
    assert graph_scores(g) == pytest.approx((1.0, 1.0))
    pr = prune(g)
    rep_p, comp_p = graph_scores(g, pr)
    assert rep_p == pytest.approx(1.0) and comp_p == pytest.approx(1.0)


def test_graph_round_trips_through_its_files(setup, tmp_path):
    _, _, _, g = setup
    g.save(tmp_path / "g")
    h = AttributionGraph.load(tmp_path / "g")
    assert torch.equal(h.edges, g.edges) and torch.equal(h.selected, g.selected)
    assert h.str_tokens == g.str_tokens and h.logit_strs == g.logit_strs and h.info == json.loads(json.dumps(g.info))
    with pytest.raises(mechscope.InputError, match="holds no attribution graph"):
        AttributionGraph.load(tmp_path)


def test_transcoder_set_saves_loads_and_refuses_what_does_not_fit(tmp_path):
    m = tiny64()
    ts = random_set(m)
    save_transcoders(ts, tmp_path / "tc")
    back = load_transcoders(tmp_path / "tc")
    assert len(back) == 2 and all(torch.equal(a.W_dec, b.W_dec) for a, b in zip(ts.transcoders, back.transcoders))
    back.check_model(m)
    other = mechscope.HookedModel(make_tiny("llama", num_hidden_layers=3), name="tiny-3")
    with pytest.raises(mechscope.InputError, match="has 2 layers but tiny-3 has 3"):
        back.check_model(other)
    renamed = TranscoderSet(back.transcoders, model_name="another-model")
    with pytest.raises(mechscope.InputError, match="trained on another-model"):
        renamed.check_model(m)
    manifest = json.loads((tmp_path / "tc" / "transcoders.json").read_text())
    del manifest["layers"]["1"]
    (tmp_path / "tc" / "transcoders.json").write_text(json.dumps(manifest))
    with pytest.raises(mechscope.InputError, match=r"no transcoder for layer\(s\) \[1\]"):
        load_transcoders(tmp_path / "tc")
    with pytest.raises(mechscope.InputError, match="is not a transcoder set"):
        load_transcoders(tmp_path / "tc" / "L00")
    with pytest.raises(mechscope.InputError, match="must read blocks.1.ln2.hook_normalized"):
        TranscoderSet([ts[0], ts[0]], model_name="x")


def test_bad_prompts_and_targets_are_clear_errors(setup):
    m, ts, tok, _ = setup
    with pytest.raises(mechscope.InputError, match="context"):
        attribute(m, ts, torch.randint(3, 100, (70,)), progress=False)
    with pytest.raises(mechscope.InputError, match="no tokens"):
        attribute(m, ts, torch.zeros(0, dtype=torch.long), progress=False)
    with pytest.raises(mechscope.InputError, match="not in the vocabulary"):
        attribute(m, ts, tok, targets=[500], progress=False)
    with pytest.raises(mechscope.InputError, match="max_feature_nodes"):
        attribute(m, ts, tok, max_feature_nodes=-1, progress=False)
    g = attribute(m, ts, tok, targets=[5, 9], max_feature_nodes=3, progress=False)
    assert g.logit_tokens.tolist() == [5, 9] and g.n_features == 3


def test_neuronpedia_json_validates_round_trips_and_ids_never_collide(setup, tmp_path):
    import jsonschema_rs

    from mechscope.graphs.neuronpedia import load_neuronpedia, save_neuronpedia, schema, to_neuronpedia

    _, _, _, g = setup
    pr = prune(g, 0.95, 0.99)
    d = to_neuronpedia(g, slug="tiny", pruned=pr, labels={(0, int(g.active_features[g.selected[0], 2])): "a label"})
    jsonschema_rs.validator_for(schema()).validate(d)
    ids = [n["node_id"] for n in d["nodes"]]
    assert len(ids) == len(set(ids)) == int(pr.node_mask.sum())
    # every id of the full graph is distinct too (errors, features, tokens and logits all at once)
    from mechscope.graphs.neuronpedia import node_id
    every = [node_id(g, i) for i in range(g.n_nodes)]
    assert len(set(every)) == g.n_nodes
    kinds = {n["feature_type"] for n in d["nodes"]}
    assert {"embedding", "logit", "mlp reconstruction error", "cross layer transcoder"} <= kinds
    assert len(d["links"]) == int(pr.edge_mask.sum())
    lookup = {node_id(g, i): i for i in range(g.n_nodes)}
    for e in d["links"][:50]:
        assert e["weight"] == float(g.adjacency[lookup[e["target"]], lookup[e["source"]]])
    assert sum(n["is_target_logit"] for n in d["nodes"]) == 1
    m = d["metadata"]["mechscope"]
    assert (m["replacement_score"], m["completeness_score"]) == pytest.approx(graph_scores(g))
    path = save_neuronpedia(g, tmp_path / "tiny.json", slug="tiny", pruned=pr)
    back = load_neuronpedia(path)
    assert back == json.loads(json.dumps(to_neuronpedia(g, slug="tiny", pruned=pr)))
    assert load_neuronpedia(back) is back
    broken = json.loads(path.read_text())
    broken["links"].append({"source": "nope", "target": ids[0], "weight": 1.0})
    with pytest.raises(CorruptFileError, match="names a node that is not in the file"):
        load_neuronpedia(broken)
    broken["nodes"].append(dict(broken["nodes"][0]))
    with pytest.raises(CorruptFileError, match="occurs twice"):
        load_neuronpedia(broken)
    with pytest.raises(mechscope.InputError, match="slug"):
        to_neuronpedia(g, slug="a/b")


@pytest.mark.parametrize("mode", ["double", "zero"])
def test_validate_reports_exact_agreement_in_the_frozen_model(setup, mode):
    from mechscope.graphs.validate import _path_sums, validate

    m, ts, _, g = setup
    v = validate(m, ts, g, n_features=25, mode=mode, batch=8)
    assert v.n_perturbed == 25 and v.frozen_features.n == 25 * g.n_features
    assert v.frozen_features.rel_error < 1e-5 and v.frozen_features.pearson > 0.999999
    assert v.frozen_logits.rel_error < 1e-5 and v.frozen_logits.pearson > 0.999999
    for a in (v.real_direct, v.real_paths):
        assert a.n == 25 * g.n_logits and -1 <= a.pearson <= 1
    assert "features" in v.summary() and json.dumps(v.to_dict())
    # the path sums in closed form: relative changes u = (I - D^-1 A_ff)^-1 D^-1 delta, read by the logits
    delta = torch.randn(g.n_features, 3, dtype=torch.float64)
    A = g.adjacency.double()
    F = g.n_features
    Dinv = torch.diag(1 / g.activations[g.selected].double())
    u = torch.linalg.solve(torch.eye(F, dtype=torch.float64) - Dinv @ A[:F, :F], Dinv @ delta)
    assert torch.allclose(_path_sums(g, delta), A[g.logit_start:, :F] @ u, atol=1e-9)
    with pytest.raises(mechscope.InputError, match="mode"):
        validate(m, ts, g, mode="triple")
    for a in (v.live_paths, v.replacement_paths, v.real_replacement, v.attention_paths, v.norms_paths):
        assert a.n == 25 * g.n_logits and -1 <= a.pearson <= 1
    assert "Where it departs" in v.summary()
    tiny = validate(m, ts, g, n_features=10, step=1e-6)  # a vanishing step: the live-feature model is the graph
    assert tiny.mode == "step" and tiny.live_paths.pearson > 0.999999 and tiny.live_paths.rel_error < 1e-4
    with pytest.raises(mechscope.InputError, match="step"):
        validate(m, ts, g, step=0.0)


def test_live_and_unfrozen_replacement_models_are_the_real_forward_and_linearise_to_the_paths(setup):
    """Check 3's two intermediate models: on the prompt they equal the real forward; for a vanishing perturbation the
    live-feature model (attention frozen, transcoders recomputed) changes the logits by the graph's path sums."""
    from mechscope.graphs.validate import _path_sums, unfrozen_replacement_logits

    m, ts, tok, g = setup
    st = replacement_state(m, ts, tok)
    with frozen_forward(m, ts, st, 1, grad=False, live_features=True) as r:
        torch.testing.assert_close(r.logits[0].double(), st.logits.double(), atol=1e-5, rtol=0)  # HF norms: fp32
    torch.testing.assert_close(unfrozen_replacement_logits(m, ts, st, None, 1)[0], st.logits[-1].double(),
                               atol=1e-5, rtol=0)
    # with attention and norms live the live-feature model is the unfrozen replacement (hooks vs Splice: two paths)
    i = int(g.activations[g.selected].argmax())
    L, p, f = (int(v) for v in g.active_features[g.selected[i]])
    d = torch.zeros(2, g.n_pos, m.cfg.d_model, dtype=torch.float64)
    d[1, p] = -float(g.activations[g.selected[i]]) * ts[L].W_dec[f].detach()
    with frozen_forward(m, ts, st, 2, deltas={L: d}, grad=False, live_features=True, freeze_attention=False,
                        freeze_norms=False) as r:
        torch.testing.assert_close(r.logits[:, -1].double(), unfrozen_replacement_logits(m, ts, st, {L: d}, 2),
                                   atol=1e-9, rtol=0)
    eps = 1e-6
    with frozen_forward(m, ts, st, 1, grad=False, live_features=True) as r0:
        lg0 = r0.logits[0, -1].double()
    moved = 0
    for i in range(g.n_features):  # every feature node, one at a time
        L, p, f = (int(v) for v in g.active_features[g.selected[i]])
        a = float(g.activations[g.selected[i]])
        d = torch.zeros(1, g.n_pos, m.cfg.d_model, dtype=torch.float64)
        d[0, p] = eps * a * ts[L].W_dec[f].detach()
        with frozen_forward(m, ts, st, 1, deltas={L: d}, grad=False, live_features=True) as r1:
            lg1 = r1.logits[0, -1].double()
        measured = ((lg1 - lg1.mean()) - (lg0 - lg0.mean()))[g.logit_tokens] / eps
        delta = torch.zeros(g.n_features, 1, dtype=torch.float64)
        delta[i, 0] = a
        torch.testing.assert_close(measured, _path_sums(g, delta)[:, 0], atol=1e-6, rtol=1e-4)
        moved += int(measured.abs().max() > 1e-4)
    assert moved > g.n_features // 4  # most features reach the logits: the comparison is not 0 == 0


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_pattern_shared_by_the_batch_mixes_like_its_copies(family):
    """The runtime's path for a pattern expanded over the batch (frozen attention) equals the copied pattern's."""
    from tests.conftest import tiny_hooked

    m = tiny_hooked(family)
    tok = random_tokens(3, 7, seed=2)

    def run(copy: bool):
        def fn(p):
            shared = p[:1].expand_as(p)
            return shared.contiguous() if copy else shared
        return m.run(tok, functions={f"blocks.{L}.attn.hook_pattern": fn for L in range(2)}).logits

    assert torch.allclose(run(False), run(True), atol=1e-6)


def _synthetic_graph():
    """Five features on two layers and three positions whose edges make {0, 1} and {2, 3} play one role each."""
    L, P, F, T = 2, 3, 5, 2
    active = torch.tensor([[0, 1, 7], [0, 2, 8], [1, 1, 3], [1, 2, 4], [0, 0, 9]])
    E = torch.zeros(F + T, F + L * P + P)
    tok = F + L * P
    E[0, tok + 1], E[1, tok + 1] = 1.0, 2.0  # a and b read token 1
    E[2, tok + 2], E[3, tok + 2] = 1.0, 3.0  # c and d read token 2
    E[4, tok + 0], E[4, tok + 1] = 1.0, -1.0  # e reads tokens 0 and 1 with opposite signs
    E[F + 0, 0], E[F + 0, 1] = 1.0, 0.5  # a, b raise logit 0
    E[F + 1, 2], E[F + 1, 3] = -1.0, -2.0  # c, d lower logit 1
    E[F + 0, 4], E[F + 1, 4] = 0.3, 0.3
    from mechscope.graphs import AttributionGraph

    return AttributionGraph(prompt="", tokens=torch.tensor([1, 5, 6]), str_tokens=["<s>", "x", "y"],
                            active_features=active, activations=torch.ones(F), selected=torch.arange(F), edges=E,
                            logit_tokens=torch.tensor([3, 4]), logit_probs=torch.tensor([0.6, 0.3]),
                            logit_strs=["a", "b"], n_layers=L)


def test_supernodes_group_features_of_one_role():
    from mechscope.graphs import Pruned
    from mechscope.graphs.supernodes import suggest_supernodes

    g = _synthetic_graph()
    everything = Pruned(torch.ones(g.n_nodes, dtype=torch.bool), torch.ones_like(g.edges, dtype=torch.bool),
                        torch.zeros(g.n_nodes), 1.0, 1.0)
    groups = suggest_supernodes(g, everything, threshold=0.9)
    assert sorted(s.nodes for s in groups) == [[0, 1], [2, 3]]
    assert all(s.similarity == pytest.approx(1.0) for s in groups)
    assert groups[0].layers in ([0], [1]) and "'x', 'y'" in groups[0].label
    assert suggest_supernodes(g, everything, threshold=0.9, min_size=3) == []
    from mechscope.graphs import to_neuronpedia

    d = to_neuronpedia(g, pruned=everything, supernodes=groups)
    assert sorted(x[1:] for x in d["qParams"]["supernodes"]) == [["0_7_1", "0_8_2"], ["1_3_1", "1_4_2"]]
    with pytest.raises(mechscope.InputError, match="min_size"):
        suggest_supernodes(g, everything, min_size=1)


def test_steering_a_supernode_reports_its_effect_beside_random_groups(setup):
    from mechscope.graphs.supernodes import steer_supernode, suggest_supernodes

    m, ts, _, g = setup
    pr = prune(g, 0.95, 0.99)
    groups = suggest_supernodes(g, pr, threshold=0.3)
    nodes = groups[0].nodes if groups else pr.node_mask[:g.n_features].nonzero().flatten()[:2].tolist()
    zero = steer_supernode(m, ts, g, pr, nodes, alpha=0.0, n_random=2)
    assert zero.effect == 0 and zero.predicted == 0 and zero.random_effects == [0.0, 0.0]
    chk = steer_supernode(m, ts, g, pr, nodes, alpha=-1.0, n_random=3)
    assert len(chk.random_effects) == 3 and chk.effect != 0
    assert chk.beats_random == (abs(chk.effect) > max(abs(r) for r in chk.random_effects))
    with pytest.raises(mechscope.InputError, match="groups features"):
        steer_supernode(m, ts, g, pr, [g.token_start], n_random=0)


def test_task_graphs_and_what_recurs_among_them(setup):
    from mechscope.data.task import Task
    from mechscope.graphs.aggregate import aggregate, task_graphs

    m, ts, tok, g = setup
    toks = random_tokens(3, 7, seed=5)
    task = Task("tiny", toks, toks.flip(1), answer=torch.tensor([5, 6, 7]), wrong=torch.tensor([8, 9, 10]))
    graphs = task_graphs(m, ts, task, n=2, max_feature_nodes=None, progress=False)
    assert len(graphs) == 2 and graphs[1].logit_tokens.tolist() == [6, 9]
    assert torch.equal(graphs[0].tokens, toks[0])  # the tiny tokenizer-less model has no BOS to add
    same = aggregate([g, g], node_threshold=0.95, edge_threshold=0.99)
    pr = prune(g, 0.95, 0.99)
    kept_ids = pr.node_mask[:g.n_features].nonzero().flatten().tolist()
    kept = {(g.node(i)["layer"], g.node(i)["feature"]) for i in kept_ids}
    assert kept and set(same.features) == kept and all(v["count"] == 2 for v in same.features.values())
    assert same.edges and all(v["count"] == 2 for v in same.edges.values())
    both = aggregate(graphs, node_threshold=0.95, edge_threshold=0.99)
    assert all(1 <= v["count"] <= 2 for v in both.features.values())
    rec = both.recurring(0.0)
    assert [k for k, _ in rec] == sorted(both.features, key=lambda k: (-both.features[k]["count"],
                                                                        -both.features[k]["mean_influence"]))
    with pytest.raises(mechscope.InputError, match="no graphs"):
        aggregate([])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_attention_scores_split_exactly_into_component_pairs(family):
    from mechscope.graphs.attention import explain_attention

    m = tiny64(family)
    ts = random_set(m, skip=family == "llama")
    tok = random_tokens(1, 8, seed=6)[0]
    for layer, head, q, k in [(1, 0, 7, 3), (1, 3, 5, 5), (0, 2, 6, 0)]:
        e = explain_attention(m, ts, tok, layer, head, q, k, top=5)
        assert e.total == pytest.approx(e.score, rel=1e-6, abs=1e-8)
        assert len(e.pairs) == (4 if layer == 0 else 5) and abs(e.pairs[0].value) >= abs(e.pairs[-1].value)
        assert 0 <= e.pattern <= 1
        names = {n for n, _ in e.query_totals}
        if layer == 0:  # before layer 0 the residual stream is the embedding (and, for GPT-2, positions)
            assert names == {f"token '{int(tok[q])}'@{q}", f"other@{q}"}
        else:
            assert any(n.startswith("L0 #") for n in names) or len(names) == 5
    with pytest.raises(mechscope.InputError, match="key_pos <= query_pos"):
        explain_attention(m, ts, tok, 1, 0, 2, 5)
