"""Overhead of the runtime monitor: monitored against plain generation with the KV cache, same prompts.

Rows (one process, repetitions interleaved plain, monitored, plain, monitored, ...; medians reported):

  plain generate      ``features.generation.generate`` per prompt, greedy: the baseline
  monitored generate  ``Monitor.generate`` on the same prompts and arguments         target <= 1.05x
  monitored batched   ``Monitor.generate(..., batch_size=B)``: B prompts at a time, left-padded, KV cache;
                      also reported against the monitored row (batch_size=1)

The prompts have different token lengths, so the batched row pads.

The probe is fitted on random data at ``blocks.15.hook_resid_post`` (its values do not change the cost);
the threshold is set high so that no alarm stops a generation and every row makes the same tokens (checked).
Each row reports wall-clock and process CPU time.

Usage: ``.venv/bin/python bench/monitor.py [--prompts 8] [--new 32] [--reps 5] [--threads N] [--batch-size B]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import mechscope
from mechscope.features.generation import generate
from mechscope.safety.monitor import Monitor
from mechscope.safety.probes import fit_probe

PROMPTS = [
    "The capital of France is", "Write a short poem about the sea.", "def fibonacci(n):",
    "Explain why the sky is blue.", "My favourite recipe for pancakes", "In 1905, Albert Einstein",
    "List three uses of a paperclip:", "The quick brown fox", "A haiku about winter:", "How do vaccines work?",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--new", type=int, default=32, help="new tokens per prompt")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None, help="rows of the batched row (default: all prompts)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    model = mechscope.load("smollm2-135m", dtype="float32")
    site = "blocks.15.hook_resid_post"
    g = torch.Generator().manual_seed(0)
    X = torch.randn(64, model.cfg.d_model, generator=g)
    probe = fit_probe(X, torch.arange(64) % 2, "diff_means", site=site, model_name=model.cfg.name)
    monitor = Monitor(probe, threshold=1e9)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(a.prompts)]
    kw = {"max_new_tokens": a.new, "stop_at_eos": False, "use_kv_cache": True}

    def plain():
        return [generate(model, p, **kw).new_tokens for p in prompts]

    def monitored():
        return [r.new_tokens for r in monitor.generate(model, prompts, **kw)]

    batch_size = a.batch_size or a.prompts

    def batched():
        return [r.new_tokens for r in monitor.generate(model, prompts, batch_size=batch_size, **kw)]

    ref = plain()  # warm-up, and the tokens every row must make
    assert all(torch.equal(x, y) for x, y in zip(ref, monitored())), "monitored tokens differ from plain ones"
    assert all(torch.equal(x, y) for x, y in zip(ref, batched())), "batched tokens differ from plain ones"
    rows = {"plain generate": plain, "monitored generate": monitored, "monitored batched": batched}
    wall: dict[str, list[float]] = {k: [] for k in rows}
    cpu: dict[str, list[float]] = {k: [] for k in rows}
    for _ in range(a.reps):
        for name, fn in rows.items():
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - w0)
            cpu[name].append(time.process_time() - c0)
    print(f"{model.cfg.name}, {a.prompts} prompts x {a.new} new tokens, KV cache, greedy; {a.reps} reps, "
          f"torch threads {torch.get_num_threads()}; batched row: batch_size {batch_size}")
    print(f"{'row':<20} {'wall s':>8} {'x plain':>8} {'paired':>8} {'cpu s':>8} {'x plain':>8}")
    for name in rows:
        wm, cm = statistics.median(wall[name]), statistics.median(cpu[name])
        paired = statistics.median(x / y for x, y in zip(wall[name], wall["plain generate"]))
        print(f"{name:<20} {wm:8.2f} {wm / statistics.median(wall['plain generate']):8.3f} {paired:8.3f} "
              f"{cm:8.2f} {cm / statistics.median(cpu['plain generate']):8.3f}")

    b, m = "monitored batched", "monitored generate"
    paired = statistics.median(x / y for x, y in zip(wall[b], wall[m]))
    print(f"{b} / {m} (batch_size {batch_size} / 1): wall {statistics.median(wall[b]) / statistics.median(wall[m]):.3f}, "
          f"paired {paired:.3f}, cpu {statistics.median(cpu[b]) / statistics.median(cpu[m]):.3f}")


if __name__ == "__main__":
    main()
