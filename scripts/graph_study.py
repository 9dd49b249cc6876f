"""Attribution graphs of SmolLM2-135M-Instruct on three prompts (a fact, an IOI sentence, an induction pattern),
with their scores, validation by interventions and a reading of the strongest features (README "Attribution
graphs"). Writes, per prompt, the graph folder (graph.safetensors, graph.json, neuronpedia.json, graph.html,
validation.json) and a ``study.json`` summary into ``--out``.

    .venv/bin/python scripts/graph_study.py --transcoders tc-smollm2 --out docs/graphs/runs/smollm2
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import mechscope
from mechscope.core.io import jsonable, write_json_atomic
from mechscope.graphs import (attribute, explain_attention, graph_scores, load_transcoders, prune, save_neuronpedia,
                              steer_supernode, suggest_supernodes, validate)
from mechscope.graphs.neuronpedia import load_neuronpedia
from mechscope.report.graph_page import write_graph_page

PROMPTS = {
    "fact": "The capital of France is",
    "ioi": "When Mary and John went to the store, John gave a drink to",
    "induction": "The code word is ravotel quimby. Again, the code word is ravotel",
}


def describe(model, ts, g, pr, k: int = 12) -> list[dict]:
    """The ``k`` kept features of most influence: where they are, their activation, and the tokens their decoder
    row promotes most through the unembedding (a logit-lens reading of what they write)."""
    W_U = model.W_U.detach().float()
    infl = pr.influence[:g.n_features]
    kept = pr.node_mask[:g.n_features]
    order = [int(i) for i in infl.argsort(descending=True) if kept[i]][:k]
    out = []
    for i in order:
        n = g.node(i)
        dec = ts[n["layer"]].W_dec[n["feature"]].detach().float()
        top = (dec @ W_U).topk(5).indices.tolist()
        out.append({"node": i, "layer": n["layer"], "pos": n["pos"], "token": g.str_tokens[n["pos"]],
                    "feature": n["feature"], "activation": round(n["activation"], 3),
                    "influence": round(float(infl[i]), 4),
                    "promotes": [model.tokenizer.decode([t]) for t in top]})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--transcoders", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--only", nargs="*", choices=list(PROMPTS), default=list(PROMPTS))
    ap.add_argument("--max-feature-nodes", type=int, default=7500)
    ap.add_argument("--n-validate", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = mechscope.load()
    ts = load_transcoders(args.transcoders)
    summary = {}
    for name in args.only:
        prompt = PROMPTS[name]
        t0 = time.perf_counter()
        g = attribute(model, ts, prompt, max_feature_nodes=args.max_feature_nodes)
        t_graph = time.perf_counter() - t0
        pr = prune(g)
        folder = args.out / name
        g.save(folder)
        save_neuronpedia(g, folder / "neuronpedia.json", slug=f"smollm2-{name}", pruned=pr)
        write_graph_page(load_neuronpedia(folder / "neuronpedia.json"), folder / "graph.html")
        t1 = time.perf_counter()
        v = validate(model, ts, g, n_features=args.n_validate)
        t_val = time.perf_counter() - t1
        write_json_atomic(jsonable(v.to_dict()), folder / "validation.json")
        small = validate(model, ts, g, n_features=args.n_validate, step=0.05)  # how local is the linearity?
        supernodes = []
        for sn in suggest_supernodes(g, pr)[:4]:
            chk = steer_supernode(model, ts, g, pr, sn.nodes, alpha=-1.0)
            supernodes.append({**sn.to_dict(), "steering": chk.to_dict()})
        attention = None
        if name == "ioi":  # the name mover's score from the last position to the indirect object " Mary" (pos 2)
            e = explain_attention(model, ts, g.tokens, 23, 3, g.n_pos - 1, 2, top=8, str_tokens=g.str_tokens)
            attention = e.to_dict()
        rep, comp = graph_scores(g)
        rep_p, comp_p = graph_scores(g, pr)
        summary[name] = {"prompt": prompt, "tokens": g.str_tokens,
                         "targets": [[s, round(float(p), 4)] for s, p in zip(g.logit_strs, g.logit_probs)],
                         "n_active": len(g.active_features), "n_feature_nodes": g.n_features,
                         "pruned_nodes": int(pr.node_mask.sum()),
                         "pruned_features": int(pr.node_mask[:g.n_features].sum()),
                         "pruned_edges": int(pr.edge_mask.sum()), "replacement": rep, "completeness": comp,
                         "pruned_replacement": rep_p, "pruned_completeness": comp_p, "graph_seconds": t_graph,
                         "validate_seconds": t_val, "validation": v.to_dict(), "summary": v.summary(),
                         "validation_step_5pct": small.to_dict(), "summary_step_5pct": small.summary(),
                         "top_features": describe(model, ts, g, pr), "supernodes": supernodes,
                         "attention": attention, "info": g.info}
        print(name, json.dumps(jsonable({k: summary[name][k] for k in ("targets", "replacement", "completeness",
                                                                          "pruned_replacement", "pruned_completeness",
                                                                          "graph_seconds")})), flush=True)
        print(v.summary(), flush=True)
        print(small.summary(), flush=True)
        write_json_atomic(jsonable(summary), args.out / "study.json")


if __name__ == "__main__":
    main()
