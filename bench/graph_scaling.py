"""Attribution-graph time and peak memory against prompt length, mechscope beside circuit-tracer 0.5.

Each graph runs in a fresh child process (one per tool and length), timed inside the child from the start of the
attribution (model and transcoders already loaded), with the child's peak resident memory read by ``os.wait4``.
The prompt is BOS plus seeded random token ids (time and memory depend on the length, not the text: TopK
transcoders fire k latents at every position whatever the tokens).

    .venv/bin/python bench/graph_scaling.py --transcoders tc-smollm2 --lengths 16 64 256 1024 \\
        --max-feature-nodes 200 --ct /path/to/circuit-tracer-venv/bin/python

Without ``--transcoders`` the set is random TopK skip transcoders of the same shape (d_sae 4608, k 32), which
costs the same. circuit-tracer runs in its own environment (``--ct``; see tests/parity/test_circuit_tracer.py),
on the same weights converted by scripts/circuit_tracer_graph.py; lengths it cannot hold in memory are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child_mechscope(args) -> None:
    import torch

    import mechscope
    from mechscope.graphs import attribute, load_transcoders

    torch.set_num_threads(args.threads)
    m = mechscope.load(args.model)
    ts = load_transcoders(args.transcoders)
    tokens = torch.tensor(json.loads(Path(args.tokens).read_text()))
    t0 = time.perf_counter()
    g = attribute(m, ts, tokens, max_feature_nodes=args.max_feature_nodes, memory_budget_gb=args.memory_budget_gb,
                  progress=False)
    print(json.dumps({"seconds": time.perf_counter() - t0, "features": g.n_features, "passes": g.info["passes"],
                      "batch": g.info["batch_size"], "active": g.info["n_active_features"]}))


def random_set(model_name: str, folder: Path) -> None:
    import torch

    import mechscope
    from mechscope.dictionaries import SparseDictionary
    from mechscope.graphs import TranscoderSet, save_transcoders, transcoder_configs

    m = mechscope.load(model_name)
    out = []
    for i, c in enumerate(transcoder_configs(m, d_sae=4608, k=32, skip=True)):
        d = SparseDictionary(c).initialize(seed=i)
        with torch.no_grad():
            d.W_enc.mul_(4.0)
        out.append(d.eval())
    save_transcoders(TranscoderSet(out, model_name=m.cfg.name), folder)


def run_child(cmd: list[str]) -> tuple[dict | None, float, str]:
    """(the child's last JSON line or None, its peak RSS in GiB, its stderr tail)."""
    with tempfile.TemporaryFile("w+") as fo, tempfile.TemporaryFile("w+") as fe:
        p = subprocess.Popen(cmd, stdout=fo, stderr=fe, text=True, cwd=ROOT)
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        fo.seek(0)
        fe.seek(0)
        out, err = fo.read(), fe.read()
    lines = [x for x in out.splitlines() if x.startswith("{")]
    return (json.loads(lines[-1]) if lines and p.returncode == 0 else None), usage.ru_maxrss / 2**20, err[-400:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--transcoders", type=Path)
    ap.add_argument("--lengths", type=int, nargs="+", default=[16, 64, 256, 1024])
    ap.add_argument("--max-feature-nodes", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--memory-budget-gb", type=float, default=4.0, help="mechscope's attribute(memory_budget_gb=)")
    ap.add_argument("--ct", help="circuit-tracer's python (its own virtual environment)")
    ap.add_argument("--ct-max-length", type=int, default=256, help="longest prompt given to circuit-tracer")
    ap.add_argument("--child", choices=["mechscope"], help=argparse.SUPPRESS)
    ap.add_argument("--tokens", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child_mechscope(args)
        return
    tmp = Path(tempfile.mkdtemp(prefix="graph-bench-"))
    if args.transcoders is None:
        args.transcoders = tmp / "tc"
        random_set(args.model, args.transcoders)
    import torch

    import mechscope

    m = mechscope.load(args.model)
    hf_dir = None
    if args.ct:  # circuit-tracer's transformers 4.57 reads the converted HF folder; its tokenizer class named for 4.x
        import shutil

        src = Path(m.hf.name_or_path)
        hf_dir = tmp / "hf"
        shutil.copytree(src, hf_dir)
        cfg_path = hf_dir / "tokenizer_config.json"
        if cfg_path.exists():
            cfg = json.loads(cfg_path.read_text())
            cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
            cfg_path.write_text(json.dumps(cfg))
        # transformers 5 writes rope_theta inside rope_parameters; 4.57 reads the top-level key (else 10,000)
        mcfg = json.loads((hf_dir / "config.json").read_text())
        mcfg.update({k: v for k, v in mcfg.get("rope_parameters", {}).items() if k == "rope_theta"})
        (hf_dir / "config.json").write_text(json.dumps(mcfg))
    g = torch.Generator().manual_seed(0)
    rows = []
    for P in args.lengths:
        ids = [m.tokenizer.bos_token_id] + torch.randint(100, m.cfg.d_vocab - 100, (P - 1,), generator=g).tolist()
        tok_file = tmp / f"tokens-{P}.json"
        tok_file.write_text(json.dumps(ids))
        ours, peak, err = run_child([sys.executable, __file__, "--child", "mechscope", "--model", args.model,
                                     "--transcoders", str(args.transcoders), "--tokens", str(tok_file),
                                     "--max-feature-nodes", str(args.max_feature_nodes),
                                     "--threads", str(args.threads),
                                     "--memory-budget-gb", str(args.memory_budget_gb)])
        row = {"length": P, "mechscope_s": ours and ours["seconds"], "mechscope_peak_gib": peak,
               "mechscope": ours, "error": None if ours else err}
        if args.ct and P <= args.ct_max_length:
            out = tmp / f"ct-{P}.safetensors"
            t0 = time.perf_counter()
            ct, ct_peak, ct_err = run_child([args.ct, str(ROOT / "scripts" / "circuit_tracer_graph.py"), str(hf_dir),
                                             str(args.transcoders), str(tok_file), str(out),
                                             str(args.max_feature_nodes)])
            ok = out.exists()
            if ok:
                from safetensors.torch import load_file

                row["ct_s"] = float(load_file(str(out))["seconds"][0])
            row.update(ct_peak_gib=ct_peak, ct_error=None if ok else ct_err, ct_wall_s=time.perf_counter() - t0)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| tokens | mechscope s | mechscope peak GiB | circuit-tracer s | circuit-tracer peak GiB "
          "| x circuit-tracer time |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ct_s = r.get("ct_s")
        ratio = f"{r['mechscope_s'] / ct_s:.2f}" if ct_s and r["mechscope_s"] else "n/a"
        print(f"| {r['length']} | {r['mechscope_s'] or float('nan'):.1f} | {r['mechscope_peak_gib']:.2f} | "
              f"{ct_s if ct_s else float('nan'):.1f} | {r.get('ct_peak_gib', float('nan')):.2f} | {ratio} |")


if __name__ == "__main__":
    main()
