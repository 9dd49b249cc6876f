"""Benchmark: activation patching vs attribution patching on IOI prompts (SmolLM2-135M by default).

Times activation patching of every head (one forward pass per few stacked variants) against
attribution patching of every head (two forward passes and one backward), prints the time ratio and
the Pearson correlation of the two maps, and, with ``--kinds``, the time of the other activation
sweeps. Also prints the cost of one plain forward pass of the corrupted prompts, the baseline that
every other time is a multiple of (timings drift on a shared machine; compare ratios from one run).

    python bench/patching.py                      # 16 prompts, fp32, heads only
    python bench/patching.py --kinds all          # also resid_pre, attn_out, mlp_out
    python bench/patching.py --dtype bfloat16 --n-prompts 32 --batch-size 8
"""

from __future__ import annotations

import argparse
import time

import torch

import mechscope
from mechscope.analysis import PATCH_KINDS, activation_patching, attribution_patching, make_metric
from mechscope.data import make_ioi_dataset


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten().double(), b.flatten().double()]))[0, 1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--n-prompts", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=None, help="patched variants per forward pass (default: auto)")
    ap.add_argument("--kinds", default="heads", help="comma-separated patching kinds, or 'all'")
    ap.add_argument("--metric", default="logit_diff", choices=["logit_diff", "prob", "kl"])
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    kinds = list(PATCH_KINDS) if args.kinds == "all" else args.kinds.split(",")

    model = mechscope.load(args.model, dtype=args.dtype)
    ds = make_ioi_dataset(model, args.n_prompts, seed=args.seed)
    n, n_pos = ds.clean_tokens.shape
    with torch.no_grad():
        clean_logits = model.run(ds.clean_tokens, logits_to_keep=1).logits
        (corrupt_logits, _), t_fwd = timed(lambda: model.run(ds.corrupt_tokens, logits_to_keep=1))
        _, t_fwd = timed(lambda: model.run(ds.corrupt_tokens, logits_to_keep=1))  # warm
    metric = make_metric(args.metric, clean_logits, corrupt_logits, ds.answer_tokens)
    print(f"{model.cfg.name} {args.dtype}, {n} IOI prompts x {n_pos} tokens, torch threads {torch.get_num_threads()}")
    print(f"metric {metric}")
    print(f"one forward of the corrupted prompts (logits_to_keep=1): {t_fwd:.3f} s")
    print()
    print(f"{'kind':<10} {'method':<12} {'variants':>8} {'seconds':>9} {'x forward':>10} {'pearson':>8}")
    for kind in kinds:
        act, t_act = timed(lambda: activation_patching(model, ds.clean_tokens, ds.corrupt_tokens, metric, kind=kind,
                                                       batch_size=args.batch_size, progress=False))
        att, t_att = timed(lambda: attribution_patching(model, ds.clean_tokens, ds.corrupt_tokens, metric, kind=kind))
        r = pearson(act.values, att.values)
        print(f"{kind:<10} {'activation':<12} {act.values.numel():>8} {t_act:>9.2f} {t_act / t_fwd:>10.1f} {'':>8}")
        print(f"{kind:<10} {'attribution':<12} {att.values.numel():>8} {t_att:>9.2f} {t_att / t_fwd:>10.1f} {r:>8.3f}")
        print(f"{kind:<10} activation / attribution time: {t_act / t_att:.1f}x")


if __name__ == "__main__":
    main()
