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
    # transformers 5 writes rope_theta inside rope_parameters; 4.57 reads the top-level key (else 10,000)
    mcfg = json.loads((hf / "config.json").read_text())
    mcfg.update({k: v for k, v in mcfg.get("rope_parameters", {}).items() if k == "rope_theta"})
    (hf / "config.json").write_text(json.dumps(mcfg))
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
    # match feature nodes by (layer, position, latent): float differences between the two forwards (transformers
    # 4.57 eager attention there, 5.23 sdpa here) can move a TopK value across zero, so the active sets may differ
    ours = {tuple(g.active_features[i].tolist()): n for n, i in enumerate(g.selected.tolist())}
    ct_active = ct["active_features"]
    theirs = {tuple(ct_active[i].tolist()): n for n, i in enumerate(ct["selected"].tolist())}
    common = sorted(set(ours) & set(theirs))
    nf_c = len(ct["selected"])
    rest = g.n_nodes - g.n_features  # errors, tokens, logits: the same layout in both
    idx_m = torch.tensor([ours[k] for k in common] + list(range(g.n_features, g.n_nodes)))
    idx_c = torch.tensor([theirs[k] for k in common] + list(range(nf_c, nf_c + rest)))
    A = g.adjacency[idx_m][:, idx_m]
    B = ct["adjacency"][idx_c][:, idx_c]
    act_m = torch.stack([g.activations[g.selected[ours[k]]] for k in common])
    act_c = torch.stack([ct["activations"][ct["selected"][theirs[k]]] for k in common])
    only_m = sorted(set(ours) - set(theirs))
    only_c = sorted(set(theirs) - set(ours))
    only_vals = [float(ct["activations"][ct["selected"][theirs[k]]]) for k in only_c]
    nm, nc = pr.node_mask[idx_m], ct["node_mask"][idx_c]
    res = {"prompt": args.prompt, "tokens": g.str_tokens, "n_active_mechscope": len(ours),
           "n_active_circuit_tracer": len(theirs), "n_common": len(common), "only_mechscope": len(only_m),
           "only_circuit_tracer": len(only_c),
           "largest_activation_only_circuit_tracer": max(only_vals, default=0.0),
           "max_activation_diff_common": float((act_m - act_c).abs().max()),
           "same_targets": bool(torch.equal(g.logit_tokens, ct["logit_tokens"])),
           "adjacency_max_abs_diff_common": float((A - B).abs().max()), "adjacency_max_abs": float(B.abs().max()),
           "pruned_node_differences_common": int((nm != nc).sum()), "pruned_nodes_mechscope": int(pr.node_mask.sum()),
           "pruned_nodes_circuit_tracer": int(ct["node_mask"].sum()),
           "scores_mechscope": graph_scores(g), "scores_circuit_tracer": ct["scores"].tolist(),
           "seconds_mechscope": seconds, "seconds_circuit_tracer": float(ct["seconds"][0])}
    res["adjacency_rel_diff_common"] = res["adjacency_max_abs_diff_common"] / res["adjacency_max_abs"]
    write_json_atomic(jsonable(res), args.out)
    print(json.dumps(jsonable(res), indent=1))


if __name__ == "__main__":
    main()
