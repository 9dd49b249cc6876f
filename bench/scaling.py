"""Weak scaling of the distributed harvest and of data-parallel / latent-sharded training, world size 1 vs 2.

Weak scaling: the work per rank is fixed, so W ranks do W times the work; the efficiency is
``(tokens/s at W) / (W * tokens/s at 1)`` (1.0 = perfect). Every rank runs one torch thread
(``--threads 1``, ``OMP_NUM_THREADS=1``), so on this 2-core machine world size 2 uses both cores and world size 1
one of them. Each configuration is launched with ``torchrun --standalone --nproc-per-node=W`` (world size 1 too,
so both pay the same launcher); repetitions interleave the world sizes (1, 2, 1, 2, ...) and medians are reported.

Rows:

  harvest        ``mechscope sae harvest`` of ``--harvest-tokens`` per rank (SmolLM2-135M, bfloat16, one hook
                 ``blocks.15.hook_resid_post``, contexts of 128): wall time of the command, model loading included
                 (reported separately as ``load s``: the harvest's own time is what its log line says).
  train dp       :class:`~mechscope.training.Trainer` data parallel from the shards of the harvest: TopK k=32,
                 d_sae=4608, ``--batch-tokens`` rows per rank per step (global batch W times that), ``--steps`` steps;
                 the time of ``fit`` (no checkpoint).
  train tp       strong scaling instead: the same run as ``train dp`` at W = 1 (d_sae 4608, ``--batch-tokens`` rows a
                 step) with its latents split over the W ranks (``tp = W``): each rank holds d_sae / W latents of
                 every row; the efficiency is the speed-up over W.

Usage::

    .venv/bin/python bench/scaling.py                       # defaults: 3 reps
    .venv/bin/python bench/scaling.py --reps 5 --harvest-tokens 16384 --steps 40

Prints one table; put its figures in the README ("Scale: distributed jobs").
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HOOK = "blocks.15.hook_resid_post"


def _torchrun(world: int, args: list[str], env: dict) -> tuple[float, str]:
    torchrun = Path(sys.executable).with_name("torchrun")
    t0 = time.perf_counter()
    p = subprocess.run([str(torchrun), "--standalone", f"--nproc-per-node={world}", *args], capture_output=True,
                       text=True, env=env)
    wall = time.perf_counter() - t0
    if p.returncode:
        sys.exit(f"torchrun failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return wall, p.stdout


def _harvest(world: int, tokens_per_rank: int, out: Path, env: dict) -> dict:
    args = ["-m", "mechscope", "sae", "harvest", "--hook", HOOK, "--tokens", str(tokens_per_rank * world),
            "--context-len", "128", "--shard-tokens", str(127 * 16), "--batch-contexts", "8", "--threads", "1",
            "--device", "cpu", "--out", str(out)]
    wall, stdout = _torchrun(world, args, env)
    line = [ln for ln in stdout.splitlines() if ln.startswith("harvested")][-1]
    n = int(line.split()[1].replace(",", ""))
    secs = float(line.split(" in ")[1].split(" s")[0])
    return {"tokens": n, "seconds": secs, "wall": wall}


def _train_worker(folder: str, batch_per_rank: int, steps: int, tp: int, result: str) -> None:
    """Run under torchrun: train from the harvested shards, rank 0 writes the timing."""
    import torch

    from mechscope.data import ShardedActivations
    from mechscope.dictionaries import DictionaryConfig
    from mechscope.scale.dist import init_distributed, shutdown
    from mechscope.training import DictionarySpec, TrainConfig, Trainer

    torch.set_num_threads(1)
    info = init_distributed("gloo", device="cpu")
    W = info.world_size
    sa = ShardedActivations(folder)
    d = sa.d_in[HOOK]
    spec = DictionarySpec("s", DictionaryConfig("topk", d, 4608, HOOK, k=32))
    B = batch_per_rank * (W // tp)  # data-parallel replicas each take batch_per_rank rows; shards share them
    cfg = TrainConfig(n_tokens=B * steps, batch_tokens=B, log_every_steps=steps, norm_estimation_batches=2)
    with tempfile.TemporaryDirectory() as tmp:
        t = Trainer([spec], cfg, tmp, progress=False, dist=info if W > 1 else None, tp=tp)
        t0 = time.perf_counter()
        t.fit(sa)
        secs = time.perf_counter() - t0
    if info.is_main:
        Path(result).write_text(json.dumps({"tokens": B * steps, "seconds": secs, "world": W, "tp": tp}))
    shutdown()


def _train(world: int, folder: Path, batch: int, steps: int, tp: int, env: dict) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        res = f.name
    args = [__file__, "--worker", str(folder), str(batch), str(steps), str(tp), res]
    wall, _ = _torchrun(world, args, env)
    r = json.loads(Path(res).read_text())
    os.unlink(res)
    return {**r, "wall": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--harvest-tokens", type=int, default=8192, help="tokens harvested per rank")
    ap.add_argument("--batch-tokens", type=int, default=1024, help="training rows per rank per step")
    ap.add_argument("--steps", type=int, default=30)
    a = ap.parse_args()
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    rows: dict[str, dict[int, list[dict]]] = {"harvest": {1: [], 2: []}, "train dp": {1: [], 2: []},
                                              "train tp": {1: [], 2: []}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shards = None
        for rep in range(a.reps):
            for w in (1, 2):
                out = tmp / f"h{rep}_{w}"
                rows["harvest"][w].append(_harvest(w, a.harvest_tokens, out, env))
                shards = shards or out
            for w in (1, 2):
                rows["train dp"][w].append(_train(w, shards, a.batch_tokens, a.steps, 1, env))
                rows["train tp"][w].append(_train(w, shards, a.batch_tokens, a.steps, w, env))
            print(f"rep {rep + 1}/{a.reps} done", file=sys.stderr, flush=True)
    print(f"weak scaling, one thread per rank, medians of {a.reps}; harvest {a.harvest_tokens:,} tokens per rank, "
          f"training {a.batch_tokens:,} rows per rank per step x {a.steps} steps")
    print(f"{'row':<10} {'W':>2} {'tokens':>9} {'seconds':>8} {'tok/s':>9} {'efficiency':>10} {'wall s':>7}")
    for name, by_w in rows.items():
        base = None
        for w in (1, 2):
            secs = statistics.median(r["seconds"] for r in by_w[w])
            toks = by_w[w][0]["tokens"]
            rate = toks / secs
            base = base or rate
            wall = statistics.median(r["wall"] for r in by_w[w])
            print(f"{name:<10} {w:>2} {toks:>9,} {secs:>8.2f} {rate:>9,.0f} {rate / (w * base):>10.2f} {wall:>7.1f}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _train_worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6])
    else:
        main()
