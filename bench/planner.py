"""Predicted vs measured: a small harvest, a few hundred training steps and a small feature database on the
default model, each run in a fresh process.

What is measured is what a plan predicts:

- memory: the peak resident set of the run's process *after* its set-up (imports, the model and dictionary
  loaded, the tokens in memory), with the set-up's resident bytes still held: the high-water mark is reset
  (``echo 5 > /proc/self/clear_refs``) once the set-up is done, then read from ``VmHWM`` when the run ends.
  So it includes the interpreter, the libraries and the model weights (the plan's runtime and weight terms)
  and leaves out the transient of loading the checkpoint (printed separately);
- disk: bytes in the run's output at the end (training keeps every checkpoint, so its peak is its end);
- time: wall-clock seconds of the run call alone, and its CPU seconds / threads beside it (with one thread,
  the run's own time however busy the machine is: the calibration measures CPU time then too).

    .venv/bin/python bench/planner.py [--recalibrate] [--threads N]   # about 2 minutes on 2 idle cores
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HOOK = "blocks.6.hook_resid_post"
MODEL = "smollm2-135m"
HARVEST_TOKENS = 20480  # 160 contexts of 128
TRAIN = dict(d_sae=2304, k=32, batch_tokens=512, steps=300, checkpoint_every=100, keep=5)
FEATURE_CONTEXTS = 80

RUN = r"""
import gc, json, sys, time
stage, threads, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
import torch
torch.set_num_threads(threads)
import mechscope, mechscope.data, mechscope.training, mechscope.dictionaries  # what a run imports

def status():
    d = {}
    for ln in open("/proc/self/status"):
        k, _, v = ln.partition(":")
        if k in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            d[k] = int(v.split()[0]) * 1024
    return d

setup = {}
if stage in ("harvest", "features"):
    from mechscope.data import corpus_tokens
    m = mechscope.load(%(model)r, dtype="bfloat16")
    toks = corpus_tokens(["pydoc"], m.tokenizer, 128, "train", max_tokens=%(tokens)d, seed=0).tokens
    setup["load_peak"] = status()["VmHWM"]
if stage == "harvest":
    from mechscope.data.harvesting import harvest
    run = lambda: harvest(m, [%(hook)r], toks, out + "/acts", progress=False)
elif stage == "train":
    from mechscope.data import ShardedActivations
    from mechscope.dictionaries import DictionaryConfig
    from mechscope.training import DictionarySpec, TrainConfig, train
    t = %(train)r
    spec = DictionarySpec("sae", DictionaryConfig("topk", 576, t["d_sae"], %(hook)r, k=t["k"]), lr=1e-3)
    cfg = TrainConfig(n_tokens=t["steps"] * t["batch_tokens"], batch_tokens=t["batch_tokens"], dtype="bfloat16",
                      checkpoint_every_steps=t["checkpoint_every"], keep_checkpoints=t["keep"])
    src = ShardedActivations(out + "/acts")
    run = lambda: train([spec], cfg, src, out + "/run", progress=False)
else:
    from mechscope.dictionaries import load_dictionary
    from mechscope.features import FeatureSource, build_feature_db
    from mechscope.features.stats import StatsConfig
    src = FeatureSource(m, dictionary=load_dictionary(out + "/run/sae"), encode_dtype="bfloat16")
    run = lambda: build_feature_db(src, toks[:%(contexts)d], out + "/f.duckdb", StatsConfig(), progress=False).close()
gc.collect()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # VmHWM := VmRSS now
before = status()
t0, c0 = time.perf_counter(), time.process_time()
run()
seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
print(json.dumps(dict(setup, seconds=seconds, cpu_seconds=cpu, peak=status()["VmHWM"], before=before["VmRSS"])))
""" % {"hook": HOOK, "model": MODEL, "tokens": HARVEST_TOKENS, "train": TRAIN, "contexts": FEATURE_CONTEXTS}


def plans(dev):
    from mechscope.planning.plan import plan_features, plan_harvest, plan_train

    t = TRAIN
    return {
        "harvest": plan_harvest(MODEL, HOOK, HARVEST_TOKENS, device=dev),
        "train": plan_train(576, t["d_sae"], t["steps"] * t["batch_tokens"], architecture="topk", k=t["k"],
                            batch_tokens=t["batch_tokens"], compute_dtype="bfloat16",
                            checkpoint_every_steps=t["checkpoint_every"], keep_checkpoints=t["keep"],
                            data_rows=HARVEST_TOKENS // 128 * 127, device=dev),
        "features": plan_features(MODEL, HOOK, t["d_sae"], FEATURE_CONTEXTS * 128, device=dev),
    }


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recalibrate", action="store_true", help="measure this machine again first")
    ap.add_argument("--threads", type=int, default=None, help="torch threads of every run (default: torch's)")
    ap.add_argument("--verbose", action="store_true", help="print every plan's terms")
    args = ap.parse_args()
    import torch

    from mechscope.planning.calibrate import calibrate

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    dev = calibrate(MODEL, dtype="bfloat16", refresh=args.recalibrate)
    print(dev.notes[0])
    with open("/proc/loadavg") as f:
        print(f"load average before: {f.read().split()[0]} on {os.cpu_count()} cores; {threads} torch threads")
    ps = plans(dev)
    rows = []
    with tempfile.TemporaryDirectory() as out:
        for stage, p in ps.items():
            r = subprocess.run([sys.executable, "-c", RUN, stage, str(threads), out], capture_output=True, text=True)
            if r.returncode:
                raise SystemExit(r.stderr[-3000:])
            meas = json.loads(r.stdout.strip().splitlines()[-1])
            folder = {"harvest": "acts", "train": "run", "features": "f.duckdb"}[stage]
            rows.append((stage, p, meas, _size(Path(out) / folder)))
            if args.verbose:
                for kind in ("memory", "disk", "time"):
                    print(f"{stage} {kind}:\n{p.lines(kind)}")
                print(f"{stage} measured: {meas}")
    print(f"\n{'run':<9} {'memory pred':>11} {'measured':>9} {'ratio':>6}  {'disk pred':>9} {'measured':>9} "
          f"{'ratio':>6}  {'time pred':>9} {'wall':>7} {'ratio':>6}  {'cpu/thr':>7} {'ratio':>6}")
    for s, p, m, disk in rows:
        cpu = m["cpu_seconds"] / threads
        print(f"{s:<9} {p.memory_bytes / 1e6:>9.0f}MB {m['peak'] / 1e6:>7.0f}MB {p.memory_bytes / m['peak']:>6.2f}  "
              f"{p.disk_bytes / 1e6:>7.1f}MB {disk / 1e6:>7.1f}MB {p.disk_bytes / max(disk, 1):>6.2f}  "
              f"{p.seconds:>8.1f}s {m['seconds']:>6.1f}s {p.seconds / m['seconds']:>6.2f}  {cpu:>6.1f}s "
              f"{p.seconds / cpu:>6.2f}")
    load = max(m.get("load_peak", 0) for _, _, m, _ in rows)
    with open("/proc/loadavg") as f:
        print(f"load average after: {f.read().split()[0]}")
    print(f"ratio = predicted / measured; cpu/thr = the run's CPU seconds / threads (with one thread: its time "
          f"without the other processes' share of the cores); not planned: loading the fp32 checkpoint into "
          f"bfloat16 peaks at {load / 1e6:.0f} MB before any run")


if __name__ == "__main__":
    main()
