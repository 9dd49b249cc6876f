"""SmolLM2's attribution graph of one prompt by mechscope and by circuit-tracer 0.5.0, on the same transcoders,
compared (README "Attribution graphs"): active features, targets, adjacency, pruned node and edge sets, scores.

circuit-tracer runs in its own environment (``--ct``: its python; see tests/parity/test_circuit_tracer.py) on a
copy of mechscope's converted SmolLM2 folder whose tokenizer config names the tokenizer class transformers 4.57
knows.

    .venv/bin/python scripts/graph_parity_real.py --transcoders tc-smollm2 --ct ct/bin/python --out parity.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

import mechscope
from mechscope.core.io import jsonable, write_json_atomic
from mechscope.graphs import attribute, graph_scores, load_transcoders, prune

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--transcoders", type=Path, required=True)
    ap.add_argument("--ct", required=True)
    ap.add_argument("--prompt", default="The capital of France is")
    ap.add_argument("--max-feature-nodes", default="none")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    m = mechscope.load()
    ts = load_transcoders(args.transcoders)
    tok = m.to_tokens(args.prompt, prepend_bos=True)[0]
    tmp = Path(tempfile.mkdtemp(prefix="ct-parity-"))
    hf = tmp / "hf"
    shutil.copytree(m.hf.name_or_path, hf)
    cfg = json.loads((hf / "tokenizer_config.json").read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    (hf / "tokenizer_config.json").write_text(json.dumps(cfg))
    (tmp / "tokens.json").write_text(json.dumps(tok.tolist()))
    r = subprocess.run([args.ct, str(ROOT / "scripts" / "circuit_tracer_graph.py"), str(hf), str(args.transcoders),
                        str(tmp / "tokens.json"), str(tmp / "ct.safetensors"), args.max_feature_nodes],
                       capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(r.stderr[-3000:])
    ct = load_file(str(tmp / "ct.safetensors"))
    budget = None if args.max_feature_nodes == "none" else int(args.max_feature_nodes)
    t0 = time.perf_counter()
    g = attribute(m, ts, tok, max_feature_nodes=budget, progress=False)
    seconds = time.perf_counter() - t0
    pr = prune(g)
    A, B = g.adjacency, ct["adjacency"]
    same_shape = A.shape == B.shape
    full_edge = torch.zeros_like(ct["edge_mask"])
    if same_shape:
        full_edge[:g.n_features, :g.n_sources] = pr.edge_mask[:g.n_features]
        full_edge[g.logit_start:, :g.n_sources] = pr.edge_mask[g.n_features:]
    res = {"prompt": args.prompt, "tokens": g.str_tokens, "n_active": len(g.active_features),
           "same_active_features": bool(torch.equal(g.active_features, ct["active_features"])),
           "max_activation_diff": float((g.activations - ct["activations"]).abs().max()),
           "same_targets": bool(torch.equal(g.logit_tokens, ct["logit_tokens"])),
           "same_selected": bool(torch.equal(g.selected, ct["selected"])),
           "adjacency_max_abs_diff": float((A - B).abs().max()) if same_shape else None,
           "adjacency_max_abs": float(B.abs().max()),
           "same_pruned_nodes": bool(torch.equal(pr.node_mask, ct["node_mask"])) if same_shape else False,
           "pruned_node_differences": int((pr.node_mask != ct["node_mask"]).sum()) if same_shape else None,
           "same_pruned_edges": bool(torch.equal(full_edge, ct["edge_mask"])) if same_shape else False,
           "pruned_edge_differences": int((full_edge != ct["edge_mask"]).sum()) if same_shape else None,
           "scores_mechscope": graph_scores(g), "scores_circuit_tracer": ct["scores"].tolist(),
           "seconds_mechscope": seconds, "seconds_circuit_tracer": float(ct["seconds"][0])}
    res["adjacency_rel_diff"] = (res["adjacency_max_abs_diff"] / res["adjacency_max_abs"]
                                 if res["adjacency_max_abs_diff"] is not None else None)
    write_json_atomic(jsonable(res), args.out)
    print(json.dumps(jsonable(res), indent=1))


if __name__ == "__main__":
    main()
