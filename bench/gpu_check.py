"""Harvest and dictionary-training throughput on one CUDA GPU, with MFU against the card's bf16 dense peak
(issue 19, item 10). ``bench/gpu_check.sh`` runs it after the CUDA tests; it can also run alone::

    .venv/bin/python bench/gpu_check.py                      # SmolLM2-135M bf16, 200k tokens, on cuda
    .venv/bin/python bench/gpu_check.py --device cpu --tokens 8192 --train-tokens 65536   # a dry run, MFU n/a

What is timed (``torch.cuda.synchronize()`` before each clock read; one untimed warm-up forward first):

  forward       ``model.run`` over the contexts, caching the hook and stopping after its layer: the harvest's
                compute alone, nothing written
  harvest       :func:`mechscope.data.harvest` over the same contexts: the forwards plus the bfloat16 shards
                written to disk (what ``mechscope sae harvest`` does)
  train topk    :class:`mechscope.training.Trainer` ``.fit`` over the harvested shards (epochs over them) for
  train relu    ``--train-tokens``, bf16 autocast, Adam: start-up (input-norm estimation) and the final save
                included

Tokens: the forward and harvest rows count every position the model runs (BOS included; the harvest stores all
but BOS); the training rows count activation rows trained on.

FLOP per token, from the planner (:mod:`mechscope.planning.costs`, the counts ``mechscope plan`` uses):
forward ``ModelDims.forward_flop_per_token(L, T)`` = ``2 x L x layer_params`` (2 FLOP per non-embedding weight of
the L blocks run, Kaplan et al. 2020) ``+ 2 x L x T x n_heads x d_head`` (attention at context T); training
:func:`~mechscope.planning.costs.train_flop_per_token`: dense (relu) ``12 d m``, TopK ``4 d m + 8 d k``.
MFU = tokens/s x FLOP/token / the card's dense bf16 tensor-core peak: H100 SXM and H200 989 TFLOP/s (the planner's
profiles), H100 NVL 835, H100 PCIe 756, A100 312; another card: n/a. Nothing is asserted: this prints a table
(and writes it as JSON with ``--json``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars would garble the table

import torch  # noqa: E402

#: Dense bf16 tensor-core peaks (FLOP/s) of cards the planner has no profile for (vendor datasheets, no sparsity).
OTHER_PEAKS = {"H100 NVL": 835e12, "H100 PCIE": 756e12, "A100": 312e12}


def bf16_peak(card: str) -> float | None:
    """The dense bf16 peak of a card named as ``nvidia-smi`` names it (FLOP/s), or None for a card not listed."""
    from mechscope.planning.calibrate import device_profile

    name = card.upper()
    for key in ("H100 NVL", "H100 PCIE"):
        if key in name:
            return OTHER_PEAKS[key]
    if "H200" in name:
        return device_profile("h200").bf16_flop_per_s
    if "H100" in name:
        return device_profile("h100").bf16_flop_per_s
    if "A100" in name:
        return OTHER_PEAKS["A100"]
    return None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn) -> tuple[object, float]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def measure(args) -> dict:
    import mechscope
    from mechscope.data import corpus_tokens, harvest
    from mechscope.dictionaries import DictionaryConfig
    from mechscope.planning.costs import model_dims, train_flop_per_token
    from mechscope.training import DictionarySpec, TrainConfig, Trainer

    device = torch.device(args.device)
    m, load_s = timed(device, lambda: mechscope.load(args.model, dtype="bfloat16", device=args.device))
    dims = model_dims(m)
    layers = dims.layers_run([args.hook])
    per_ctx = args.context_len - 1
    packed = corpus_tokens([args.corpus], m.tokenizer, args.context_len, "train",
                           max_tokens=args.tokens + 4 * args.context_len, seed=0)
    contexts = packed.tokens[:math.ceil(args.tokens / per_ctx)]
    n_run = int(contexts.numel())
    bc = args.batch_contexts
    batches = [contexts[i:i + bc] for i in range(0, contexts.shape[0], bc)]

    def forward():
        with torch.no_grad():
            for b in batches:
                m.run(b.to(device), cache=[args.hook], stop_at_layer=layers)

    timed(device, lambda: m.run(batches[0].to(device), cache=[args.hook], stop_at_layer=layers))  # warm-up
    rows = []
    fwd_flop = dims.forward_flop_per_token(layers, args.context_len, 0.0)
    _, s = timed(device, forward)
    rows.append({"what": "forward (no disk)", "tokens": n_run, "seconds": s, "flop_per_token": fwd_flop})
    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="mechscope-gpu-check-"))
    try:
        acts, s = timed(device, lambda: harvest(m, [args.hook], contexts, work / "acts", dtype=torch.bfloat16,
                                                forward_batch_contexts=bc, progress=False))
        rows.append({"what": "harvest (to disk)", "tokens": n_run, "seconds": s, "flop_per_token": fwd_flop,
                     "rows_stored": acts.n_tokens})
        d_in = m.cfg.d_model
        for arch in ("topk", "relu"):
            k = args.k if arch == "topk" else None
            spec = DictionarySpec(arch, DictionaryConfig(arch, d_in, args.width, args.hook, k=k))
            cfg = TrainConfig(n_tokens=args.train_tokens, batch_tokens=args.batch_tokens, dtype=args.compute_dtype,
                              checkpoint_every_steps=0, log_every_steps=100)
            trainer = Trainer([spec], cfg, work / arch, progress=False, device=args.device)
            _, s = timed(device, lambda t=trainer: t.fit(acts))
            rows.append({"what": f"train {arch} (d_sae {args.width:,}" + (f", k {k})" if k else ")"),
                         "tokens": cfg.n_tokens_trained, "seconds": s,
                         "flop_per_token": train_flop_per_token(d_in, args.width, arch, k)})
    finally:
        if not args.out:
            shutil.rmtree(work, ignore_errors=True)
    return {"model": m.cfg.name, "hook": args.hook, "layers_run": layers, "context_len": args.context_len,
            "load_seconds": load_s, "rows": rows}


def table(result: dict, card: str, peak: float | None) -> str:
    head = f"{'':32} {'tokens':>11} {'seconds':>8} {'tokens/s':>11} {'GFLOP/token':>11} {'TFLOP/s':>8} {'MFU':>6}"
    lines = [f"{card}: bf16 dense peak " + (f"{peak / 1e12:,.0f} TFLOP/s" if peak else "unknown (MFU n/a)"),
             (f"{result['model']} bf16, {result['hook']} ({result['layers_run']} blocks run), context "
              f"{result['context_len']}; torch {torch.__version__}, CUDA {torch.version.cuda}"), head, "-" * len(head)]
    for r in result["rows"]:
        rate = r["tokens"] / r["seconds"]
        achieved = rate * r["flop_per_token"]
        r.update(tokens_per_s=rate, flop_per_s=achieved, mfu=achieved / peak if peak else None)
        mfu = f"{r['mfu']:.1%}" if peak else "n/a"
        lines.append(f"{r['what']:32} {r['tokens']:>11,} {r['seconds']:>8.2f} {rate:>11,.0f} "
                     f"{r['flop_per_token'] / 1e9:>11.4f} {achieved / 1e12:>8.2f} {mfu:>6}")
    lines.append("MFU = tokens/s x FLOP/token (the planner's counts: forward 2 x params of the blocks run + attention; "
                 "dense 12dm, TopK 4dm + 8dk) / the bf16 dense peak.")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--hook", default="blocks.15.hook_resid_post")
    p.add_argument("--corpus", default="pysource", help="a corpus needing no network (pysource: the stdlib's code)")
    p.add_argument("--tokens", type=int, default=200_000, help="tokens to harvest")
    p.add_argument("--context-len", type=int, default=128)
    p.add_argument("--batch-contexts", type=int, default=64, help="contexts per forward")
    p.add_argument("--train-tokens", type=int, default=2**21, help="training tokens per dictionary (epochs over "
                                                                   "the harvest)")
    p.add_argument("--batch-tokens", type=int, default=4096)
    p.add_argument("--width", type=int, default=16_384, help="d_sae")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--compute-dtype", default="bfloat16", help="training compute: bfloat16 (autocast) or float32")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu for a dry run")
    p.add_argument("--card", default=None, help="the card's name for its peak (default: torch's name of the GPU)")
    p.add_argument("--out", default=None, help="keep the harvest and the trained dictionaries here")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        why = "a CPU build of torch" if torch.version.cuda is None else f"no GPU visible to torch {torch.__version__}"
        print(f"gpu_check: no CUDA GPU here ({why}); run this on a machine with an NVIDIA GPU, or pass --device cpu "
              "for a dry run.", file=sys.stderr)
        return 2
    card = args.card or (torch.cuda.get_device_name(torch.device(args.device)) if args.device.startswith("cuda")
                         else "CPU")
    peak = bf16_peak(card) if args.device.startswith("cuda") else None
    result = measure(args)
    print(table(result, card, peak), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"card": card, "bf16_peak_flop_per_s": peak, **result}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
