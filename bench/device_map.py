"""Benchmark: the cost of splitting a model with ``device_map`` (accelerate offload) against the unsplit model.

Rows, all in one process, every ratio against the unsplit model measured in the same run, repetitions interleaved
(unsplit, split, unsplit, ...), medians:

  plain        ``run(tokens)``: the forward alone.
  cache all    ``run(tokens, cache=<every site>)``.
  lens         ``run(tokens, cache="blocks.*.hook_resid_post")`` then the logit lens of the last position
               (the final norm and W_U applied to each layer's residual; W_U is read from disk when offloaded).

Placements (``--split``):

  disk-half    the embedding and the first half of the blocks in memory, the rest (and the final norm and
               unembedding) on disk: accelerate reads each offloaded block from the safetensors file at every
               forward and drops it again;
  disk-all     everything on disk (``{"": "disk"}``): the smallest memory, the slowest.

Also checks, once per placement, that the split model's logits and every cached site equal the unsplit
model's exactly (bit-identical), and reports peak resident memory after loading each.

Usage:
    .venv/bin/python bench/device_map.py                            # smollm2-135m, 1 x 64 tokens, 5 reps
    .venv/bin/python bench/device_map.py --model path/to/folder --pos 256 --reps 9

``--clock cpu`` (default) times this process's CPU time (one thread), which ignores the time other processes take
on a shared machine; reading from disk is mostly page-cache hits after the first forward, so what is measured is
accelerate's per-forward cost (safetensors reads, tensor moves, hook dispatch), not a cold disk.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import mechscope


def _split_map(m, mode: str) -> dict[str, str]:
    if mode == "disk-all":
        return {"": "disk"}
    layers, n = m.adapter.layers, m.cfg.n_layers
    parent = layers.rsplit(".", 1)[0]
    tied = set(getattr(m.hf, "all_tied_weights_keys", None) or {}) | set(
        (getattr(m.hf, "all_tied_weights_keys", None) or {}).values())
    dm = {}
    for name, _ in m.hf.get_submodule(parent).named_children():
        full = f"{parent}.{name}"
        if full == layers:
            dm.update({f"{layers}.{i}": "cpu" if i < n // 2 else "disk" for i in range(n)})
        else:
            dm[full] = "cpu" if full == m.adapter.embed else "disk"
    for name, _ in m.hf.named_children():
        if name != parent:  # a tied unembedding stays with the embedding (see check_device_map_modules)
            dm[name] = "cpu" if f"{name}.weight" in tied else "disk"
    return dm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--pos", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    ap.add_argument("--split", nargs="+", default=["disk-half", "disk-all"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    from mechscope.analysis import logit_lens  # noqa: F401  (import cost outside the timings)

    ref = mechscope.load(args.model)
    tokens = torch.randint(10, ref.cfg.d_vocab, (1, args.pos), generator=torch.Generator().manual_seed(0))
    names = list(ref.hook_names())
    resid = "blocks.*.hook_resid_post"

    def lens(m):
        c = m.run(tokens, cache=resid).cache
        norm = m.module(m.adapter.final_norm)
        return norm(c.stack(resid)[:, 0, -1]) @ m.W_U

    jobs = {"plain": lambda m: m.run(tokens), "cache all": lambda m: m.run(tokens, cache=names), "lens": lens}
    print(f"{ref.cfg.name}: {ref.cfg.n_layers} layers, 1 x {args.pos} tokens, {args.reps} reps, "
          f"{args.threads} thread(s), {args.clock} clock")
    for mode in args.split:
        t0 = time.perf_counter()
        split = mechscope.load(args.model, device_map=_split_map(ref, mode))
        load_s = time.perf_counter() - t0
        where = split.placement()
        n_disk = sum(v.startswith("disk") for v in where.values())
        in_memory = sum(p.numel() * p.element_size() for p in split.hf.parameters() if p.device.type != "meta")
        total = sum(p.numel() * p.element_size() for p in ref.hf.parameters())
        a, b = ref.run(tokens, cache=names), split.run(tokens, cache=names)
        exact = torch.equal(a.logits, b.logits) and all(torch.equal(a.cache[n], b.cache[n]) for n in names)
        print(f"\n{mode}: {n_disk} of {len(where)} modules on disk, {in_memory / 2**20:.0f} of "
              f"{total / 2**20:.0f} MiB of weights in memory, load {load_s:.1f} s, "
              f"logits and all {len(names)} sites bit-identical: {exact}")
        for job, fn in jobs.items():
            ts = {"unsplit": [], "split": []}
            for _ in range(args.reps):
                for label, m in (("unsplit", ref), ("split", split)):
                    t = clock()
                    fn(m)
                    ts[label].append(clock() - t)
            u, s = statistics.median(ts["unsplit"]), statistics.median(ts["split"])
            print(f"  {job:10s} unsplit {u * 1e3:8.1f} ms   split {s * 1e3:8.1f} ms   x{s / u:.2f}")


if __name__ == "__main__":
    main()
