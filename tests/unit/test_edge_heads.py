"""Which heads carry an attribution-graph edge (:mod:`mechscope.graphs.edge_heads`), on tiny random models.

Claims tested: the measured edge equals the graph's adjacency entry; per layer, the heads' shares plus the
no-head rest sum to the edge; each head's share equals the edge's drop when that head's output is zeroed in the
frozen replacement model (an independent ablation, not a gradient); a head's (query, key) moves sum to its
share; a cross-position edge has no no-head rest in its one attention layer; the strongest head's move is explained
by explain_attention; bad node pairs are clear errors.
"""

from __future__ import annotations

import pytest
import torch

from mechscope.core.errors import InputError
from mechscope.graphs import attribute
from mechscope.graphs.edge_heads import edge_heads, graph_edge_heads, json_node
from mechscope.graphs.replacement import frozen_forward, replacement_state
from tests.conftest import random_tokens
from tests.unit.test_graphs import random_set, tiny64


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def setup(request):
    m = tiny64(request.param)
    ts = random_set(m)
    g = attribute(m, ts, random_tokens(1, 8, seed=3)[0], max_feature_nodes=None, batch_size=16, progress=False)
    return m, ts, g


def _ablated_edge(m, ts, g, source, target, layer, head):
    """The edge in the frozen model with head ``head`` of ``layer`` zeroed (a finite difference of two copies)."""
    st = replacement_state(m, ts, g.tokens)
    s, t = g.node(source), g.node(target)
    P, D = g.n_pos, m.cfg.d_model
    deltas, emb = None, None
    if s["kind"] == "token":
        emb = torch.zeros(2, P, D, dtype=st.embed.dtype)
        emb[1, s["pos"]] = st.embed[s["pos"]]
    else:
        vec = (s["activation"] * ts[s["layer"]].W_dec[s["feature"]].detach() if s["kind"] == "feature"
               else st.errors[s["layer"], s["pos"]])
        deltas = {s["layer"]: torch.zeros(2, P, D, dtype=st.mlp_out.dtype)}
        deltas[s["layer"]][1, s["pos"]] = vec

    def zero(z):
        z = z.clone()
        if head is not None:
            z[:, :, head] = 0
        return z

    with frozen_forward(m, ts, st, 2, deltas=deltas, embed_delta=emb, grad=False,
                        functions={f"blocks.{layer}.attn.hook_z": zero}) as r:
        if t["kind"] == "feature":
            tc = ts[t["layer"]]
            val = tc.encode_pre(r.mlp_in[t["layer"]][:, t["pos"]])[:, t["feature"]]
        else:
            lg = r.logits[:, -1]
            val = lg[:, t["token"]] - lg.mean(-1)
    return float((val[1] - val[0]).detach())


def _pairs(g):
    """Three edges: the strongest into the top logit, the strongest feature -> feature edge across positions and
    layers, and a token -> feature edge across positions."""
    A = g.adjacency.double()
    F = g.n_features
    out = [(int(A[g.logit_start, :g.n_sources].abs().argmax()), g.logit_start)]
    best = None
    for t in range(F):
        for s in range(F):
            a, b = g.node(s), g.node(t)
            stronger = best is None or abs(A[t, s]) > abs(A[best[1], best[0]])
            if a["layer"] < b["layer"] and a["pos"] < b["pos"] and stronger:
                best = (s, t)
    out.append(best)
    t = next(i for i in range(F) if g.node(i)["pos"] >= 3)
    out.append((g.token_node(1), t))
    return out


def test_head_shares_sum_to_the_edge_and_equal_ablations(setup):
    m, ts, g = setup
    A = g.adjacency.double()
    for s, t in _pairs(g):
        r = graph_edge_heads(m, ts, g, s, t, top=3, explain=0)
        assert r.edge == pytest.approx(float(A[t, s]), rel=1e-5, abs=1e-7)
        torch.testing.assert_close(r.heads.sum(1) + r.residual, torch.full((g.n_layers,), r.edge, dtype=torch.float64))
        assert r.heads.abs().sum() > 0
        for L in range(g.n_layers):
            base = _ablated_edge(m, ts, g, s, t, L, None)
            for h in range(m.cfg.n_heads):
                drop = base - _ablated_edge(m, ts, g, s, t, L, h)
                assert float(r.heads[L, h]) == pytest.approx(drop, abs=1e-9), (s, t, L, h)
        for hm in r.top:
            assert abs(hm.contribution) <= abs(r.heads).max() + 1e-12 and hm.fraction == pytest.approx(
                hm.contribution / r.edge)
    # cross-position token -> layer-0 feature: everything goes through layer 0's heads
    s, t = _pairs(g)[2]
    r = graph_edge_heads(m, ts, g, s, t, explain=0)
    if g.node(t)["layer"] == 0:
        assert abs(float(r.residual[0])) < 1e-9


def test_moves_sum_to_the_head_and_the_top_move_is_explained(setup):
    m, ts, g = setup
    s, t = _pairs(g)[1]
    r = graph_edge_heads(m, ts, g, s, t, top=2, explain=1, n_moves=64)
    hm = r.top[0]
    assert sum(c for _, _, c in hm.moves) == pytest.approx(hm.contribution, abs=1e-9)
    q, k, _ = hm.moves[0]
    a = r.attention[0]
    assert (a.layer, a.head, a.query_pos, a.key_pos) == (hm.layer, hm.head, q, k)
    assert a.total == pytest.approx(a.score, abs=1e-6)
    d = r.to_dict()
    assert d["top"][0]["layer"] == hm.layer and len(d["heads"]) == g.n_layers
    st = replacement_state(m, ts, g.tokens)  # a kept state gives the same split and explanation
    again = graph_edge_heads(m, ts, g, s, t, top=2, explain=1, n_moves=64, state=st)
    assert torch.equal(again.heads, r.heads) and again.attention[0].pairs == r.attention[0].pairs
    other = replacement_state(m, ts, g.tokens[:-1])
    with pytest.raises(InputError, match="another prompt"):
        graph_edge_heads(m, ts, g, s, t, state=other)


def test_json_nodes_and_bad_pairs():
    from mechscope.graphs import prune, to_neuronpedia

    m = tiny64()
    ts = random_set(m)
    g = attribute(m, ts, random_tokens(1, 6, seed=1)[0], max_feature_nodes=None, progress=False)
    d = to_neuronpedia(g, slug="t", pruned=prune(g, 0.99, 0.99))
    by_kind = {}
    for n in d["nodes"]:
        by_kind.setdefault(n["feature_type"], n)
    for n in by_kind.values():
        jn = json_node(n)
        want = g.node({"feature": 0, "error": g.error_start, "token": g.token_start,
                       "logit": g.logit_start}[jn["kind"]])
        assert jn["kind"] == want["kind"]
    f = json_node(by_kind["cross layer transcoder"])
    i = g.feature_node(f["layer"], f["pos"], f["feature"])
    assert f["activation"] == pytest.approx(g.node(i)["activation"])
    with pytest.raises(InputError, match="target is a feature or logit"):
        edge_heads(m, ts, g.tokens, g.node(0), g.node(g.token_start))
    with pytest.raises(InputError, match="source is a feature, error or token"):
        edge_heads(m, ts, g.tokens, g.node(g.logit_start), g.node(0))
    late = {"kind": "feature", "layer": 1, "pos": 5, "feature": 0, "activation": 1.0}
    early = {"kind": "feature", "layer": 0, "pos": 2, "feature": 0}
    with pytest.raises(InputError, match="no edge runs"):
        edge_heads(m, ts, g.tokens, late, early)
