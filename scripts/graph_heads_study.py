"""Which heads carry the cross-position edges into each graph's top target, and what steering the top features does.

For each graph folder (``mechscope graph`` output): the strongest edges into the top logit whose source sits at an
earlier position (so every path runs through attention) are split over heads (:func:`json_edge_heads`, with the top
head's attention score explained); the five features with the strongest direct edges to the top logit are ablated
together in the real model (:func:`steer_graph_features`), beside five random kept features. Writes one JSON.

    .venv/bin/python scripts/graph_heads_study.py /work/runs/graphs/fact /work/runs/graphs/ioi \\
        /work/runs/graphs/induction --transcoders /work/runs/tc/run1 --out docs/graphs/runs/smollm2/heads.json
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch


def main() -> None:
    import mechscope
    from mechscope.core.io import jsonable, write_json_atomic
    from mechscope.graphs import load_transcoders
    from mechscope.graphs.edge_heads import json_edge_heads
    from mechscope.graphs.neuronpedia import load_neuronpedia
    from mechscope.graphs.steer import steer_graph_features

    ap = argparse.ArgumentParser()
    ap.add_argument("graphs", nargs="+", type=Path)
    ap.add_argument("--transcoders", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--edges", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    m = mechscope.load("smollm2-135m", dtype="float32")
    ts = load_transcoders(args.transcoders)
    out = {}
    for folder in args.graphs:
        d = load_neuronpedia(folder / "neuronpedia.json")
        nodes = {n["node_id"]: n for n in d["nodes"]}
        toks = d["metadata"]["prompt_tokens"]
        top = next(n for n in d["nodes"] if n["feature_type"] == "logit")
        into = sorted((e for e in d["links"] if e["target"] == top["node_id"]), key=lambda e: -abs(e["weight"]))
        cross = [e for e in into if nodes[e["source"]]["ctx_idx"] < top["ctx_idx"]][:args.edges]
        rows = []
        for e in cross:
            t0 = time.perf_counter()
            r = json_edge_heads(m, ts, d, e["source"], e["target"], top=5, explain=1)
            rows.append({"source": e["source"], "source_token": toks[nodes[e["source"]]["ctx_idx"]],
                         "kind": nodes[e["source"]]["feature_type"], "graph_weight": e["weight"], "edge": r.edge,
                         "seconds": time.perf_counter() - t0, "top": [h.to_dict() for h in r.top],
                         "attention": [a.to_dict() for a in r.attention]})
            print(folder.name, e["source"], f"{r.edge:+.3f}",
                  [(h.layer, h.head, round(h.fraction, 2)) for h in r.top[:3]], flush=True)
        feats = [e for e in into if nodes[e["source"]]["feature_type"] == "cross layer transcoder"][:5]
        ids = [e["source"] for e in feats]
        steer = steer_graph_features(m, ts, d, ids, scale=0.0, max_new_tokens=8) if ids else None
        pool = [n["node_id"] for n in d["nodes"] if n["feature_type"] == "cross layer transcoder" and n["node_id"]
                not in ids]
        rnd = random.Random(0)
        controls = []
        for _ in range(5):
            pick = rnd.sample(pool, min(len(ids), len(pool)))
            if pick:
                c = steer_graph_features(m, ts, d, pick, scale=0.0, max_new_tokens=0)
                controls.append({"nodes": pick, "top_target_logit_diff": c["targets"][0]["logit_diff"],
                                 "kl": c["kl"]})
        out[folder.name] = {"prompt": d["metadata"]["prompt"], "target": top["clerp"], "edges": rows,
                            "ablate_top5": steer, "random5": controls}
        if steer:
            print(folder.name, "ablate top-5 direct features:", round(steer["targets"][0]["logit_diff"], 3),
                  "random:", [round(c["top_target_logit_diff"], 3) for c in controls], flush=True)
    write_json_atomic(jsonable(out), args.out)


if __name__ == "__main__":
    main()
