"""Cost of a full probe layer sweep: one cached forward pass over the data, then the fits.

Rows (one process, repetitions interleaved; medians reported):

  plain forward      ``model.run`` over the same length-sorted, right-padded batches, nothing cached: the baseline
  collect features   ``collect_features`` at every ``hook_resid_post`` (every site cached in that one pass and
                     aggregated over the scored tokens)                               target <= ~1x the forward
  fits               ``probe_sweep``: every method at every site, evaluated with its baselines (no model)

The data are the built-in ``honesty_pairs`` rendered through SmolLM2's chat template. The sweep's total is
reported as (collect + fits) / forward: the forward is paid once however many sites and methods are swept.

Usage: ``.venv/bin/python bench/probe_sweep.py [--reps 3] [--threads N] [--methods logistic,diff_means,lda,lat]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import mechscope
from mechscope.data.labelled_builtins import load_labelled
from mechscope.data.labelled_render import render
from mechscope.safety import collect_features, probe_sweep


def plain_forward(model, examples, batch_size: int = 16) -> None:
    """The same batches collect_features makes (length-sorted, right-padded), with no cache."""
    order = sorted(range(len(examples)), key=lambda i: int(examples[i].tokens.numel()))
    for s in range(0, len(order), batch_size):
        rows = order[s:s + batch_size]
        P = max(int(examples[i].tokens.numel()) for i in rows)
        ids = torch.zeros(len(rows), P, dtype=torch.long)
        attn = torch.zeros(len(rows), P, dtype=torch.long)
        for j, i in enumerate(rows):
            t = examples[i].tokens
            ids[j, :t.numel()] = t
            attn[j, :t.numel()] = 1
        model.run(ids, attention_mask=attn, logits_to_keep=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--methods", default="logistic,diff_means,lda,lat")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    model = mechscope.load("smollm2-135m", dtype="float32")
    ds = load_labelled("honesty_pairs")
    train, test = ds.split(0.5, 0)
    examples = render(model, ds)
    n_tok = sum(int(e.tokens.numel()) for e in examples)
    sites = "blocks.*.hook_resid_post"
    plain_forward(model, examples[:16])  # warm-up
    times: dict[str, list[float]] = {"plain forward": [], "collect features": [], "fits": []}
    feats = None
    for _ in range(a.reps):
        t = time.perf_counter()
        with torch.no_grad():
            plain_forward(model, examples)
        times["plain forward"].append(time.perf_counter() - t)
        t = time.perf_counter()
        feats = collect_features(model, examples, sites, progress=False)
        times["collect features"].append(time.perf_counter() - t)
    idx = {id(e): i for i, e in enumerate(ds.examples)}
    tr = torch.tensor([idx[id(e)] for e in train.examples])
    te = torch.tensor([idx[id(e)] for e in test.examples])
    methods = tuple(a.methods.split(","))
    for _ in range(a.reps):
        t = time.perf_counter()
        probe_sweep({s: (v[tr], v[te]) for s, v in feats.vectors.items()}, train.labels, test.labels, methods,
                    n_boot=1000, n_random=100)
        times["fits"].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["plain forward"]
    print(f"SmolLM2-135M fp32, {len(examples)} examples ({n_tok} tokens), {len(feats.sites)} sites x "
          f"{len(methods)} methods, torch threads {torch.get_num_threads()}, median of {a.reps}")
    for k, v in med.items():
        print(f"  {k:<17} {v:8.2f} s   {v / base:5.2f}x the forward")
    print(f"  {'sweep total':<17} {med['collect features'] + med['fits']:8.2f} s   "
          f"{(med['collect features'] + med['fits']) / base:5.2f}x the forward")


if __name__ == "__main__":
    main()
