"""Overhead of mechscope's hooks against a plain transformers forward, and against the peers.

Rows (all in one process, repetitions interleaved A, B, C, A, B, C, ...; the median is reported):

  plain HF forward         ``m.hf(tokens)`` under no_grad: the baseline every ratio divides by
  run(), no hooks          ``m.run(tokens)``                                      target <= 1.03x
  cache resid_post         ``m.run(tokens, cache="blocks.*.hook_resid_post")``   target <= 1.10x
  cache every hook         ``m.run(tokens, cache="*")`` (``hook_result``, only cached, is computed when first read)
  cache every hook, read   the same, then every value read once (``hook_result`` computed): the whole cost
  cache nnsight's set      ``m.run`` caching every site except attn_scores and hook_result (what nnsight saves)
  plain HF forward, eager  an untouched copy in eager attention, the peers' baseline (they need eager for patterns)
  TL bridge, no hooks      ``bridge(tokens)`` (TransformerLens forces eager attention)
  TL run_with_cache        ``bridge.run_with_cache(tokens, names_filter=<our sites, TL names>)``
                           with ``set_use_attn_result(True)``, so hook_result is computed as ours is
  TL run_with_cache, all   (``--tl-all``) every hook the bridge has, aliases included
  nnsight trace + saves    one ``trace`` saving the HF module values behind our sites (eager attention, for
                           the pattern): the set of "cache nnsight's set", with q/k before RoPE (q_proj/k_proj
                           outputs); attn_scores and hook_result are no module's value, so nnsight skips them

``x plain`` divides medians; ``x plain, paired`` is the median over repetitions of (row / the plain forward
timed just before it), steadier when other processes load the machine.

Memory (one untimed pass per row, after the timed ones): ``cache MiB`` is the exact size of the values the
row keeps; ``peak RSS +MiB`` is the process's resident-set high-water mark during the call minus its
size before (sampled every ms in a thread, after ``malloc_trim``; an estimate: the allocator reuses
freed pages).

Usage: ``.venv/bin/python bench/overhead.py [--batch 8] [--seq 128] [--reps 5] [--dtype float32] [--threads N]
[--clock wall|cpu]``. On a shared machine, ``--threads 1 --clock cpu`` measures compute, not waiting.
The peer rows are skipped when transformer-lens / nnsight are not installed (``pip install -e .[peers]``).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable

import torch

import mechscope
from mechscope.models.loading import DEFAULT_MODEL, cache_dir

# canonical per-layer template -> TransformerBridge name (see tests/real/test_peers.py for the mapping)
TL_NAMES = {
    "hook_resid_pre": "hook_resid_pre", "ln1.hook_normalized": "ln1.hook_out", "attn.hook_q": "attn.hook_rot_q",
    "attn.hook_k": "attn.hook_rot_k", "attn.hook_v": "attn.hook_v", "attn.hook_attn_scores": "attn.hook_attn_scores",
    "attn.hook_pattern": "attn.hook_pattern", "attn.hook_z": "attn.hook_z", "attn.hook_result": "attn.hook_result",
    "hook_attn_out": "hook_attn_out", "hook_resid_mid": "hook_resid_mid", "ln2.hook_normalized": "ln2.hook_out",
    "mlp.hook_pre": "mlp.hook_pre", "mlp.hook_pre_linear": "mlp.hook_pre_linear", "mlp.hook_post": "mlp.hook_post",
    "hook_mlp_out": "hook_mlp_out", "hook_resid_post": "hook_resid_post",
}
TL_GLOBAL = ["hook_embed", "ln_final.hook_out"]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _nbytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    if hasattr(obj, "items"):  # mechscope / TL caches
        return sum(_nbytes(v) for _, v in obj.items())
    return 0


def peak_memory(fn: Callable[[], object]) -> tuple[float, float]:
    """(peak RSS increase during fn, bytes of what fn returned as kept values), in MiB."""
    _trim()
    base = peak = _rss_bytes()
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss_bytes())
            time.sleep(0.001)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    kept = fn()
    done.set()
    t.join()
    peak = max(peak, _rss_bytes())
    size = _nbytes(kept)
    del kept
    return (peak - base) / 2**20, size / 2**20


def load_peers(folder, dtype: torch.dtype, tok, n_layers: int, tl_all: bool = False):
    """Build the peer rows; returns {} for a peer that is not installed."""
    import transformers

    rows: dict[str, Callable[[torch.Tensor], object]] = {}

    def copy():
        hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="eager")
        return hf.eval().requires_grad_(False)

    eager = copy()
    rows["plain HF forward, eager"] = lambda x: eager(x, use_cache=False).logits

    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError:
        print("transformer-lens not installed: TransformerLens rows skipped")
    else:
        bridge = TransformerBridge.boot_transformers(str(folder), hf_model=copy(), tokenizer=tok, device="cpu",
                                                     dtype=dtype)
        bridge.set_use_attn_result(True)
        wanted = {f"blocks.{L}.{t}" for L in range(n_layers) for t in TL_NAMES.values()} | set(TL_GLOBAL)
        rows["TL bridge, no hooks"] = lambda x: bridge(x)
        rows["TL run_with_cache"] = lambda x: bridge.run_with_cache(x, names_filter=lambda n: n in wanted)[1]
        if tl_all:
            rows["TL run_with_cache, all"] = lambda x: bridge.run_with_cache(x)[1]

    try:
        import nnsight
    except ImportError:
        print("nnsight not installed: nnsight row skipped")
    else:
        model_cls = getattr(nnsight, "TransformersModel", None)
        lm = (model_cls(copy(), tokenizer=tok, task="text-generation") if model_cls
              else nnsight.LanguageModel(copy(), tokenizer=tok))

        def trace(x):
            saved = []
            with lm.trace(x):
                saved.append(lm.model.embed_tokens.output.save())
                for L in range(n_layers):
                    layer = lm.model.layers[L]
                    attn, mlp = layer.self_attn, layer.mlp
                    saved += [layer.input.save(), layer.input_layernorm.output.save(), attn.q_proj.output.save(),
                              attn.k_proj.output.save(), attn.v_proj.output.save(), attn.o_proj.input.save(),
                              attn.output.save(), layer.post_attention_layernorm.input.save(),
                              layer.post_attention_layernorm.output.save(), mlp.gate_proj.output.save(),
                              mlp.up_proj.output.save(), mlp.down_proj.input.save(), mlp.output.save(),
                              layer.output.save()]
                saved.append(lm.model.norm.output.save())
                saved.append(lm.output.save())
            saved[-1] = saved[-1].logits
            return saved

        rows["nnsight trace + saves"] = trace
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per row (after one warm-up)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's choice); 1 is steadier on a shared machine")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="wall: perf_counter; cpu: this process's CPU time (with --threads 1, insensitive to other "
                        "processes taking turns on the cores)")
    p.add_argument("--no-peers", action="store_true", help="mechscope rows only")
    p.add_argument("--tl-all", action="store_true", help="add a row caching every TransformerBridge hook (~1400)")
    p.add_argument("--no-memory", action="store_true", help="skip the memory pass")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    m = mechscope.load(DEFAULT_MODEL, dtype=args.dtype)
    dtype = m.dtype
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, m.cfg.d_vocab, (args.batch, args.seq), generator=g)
    tokens[:, 0] = 1  # BOS, as every row gets the same ids

    nnsight_set = [n for n in m.hook_names() if not n.endswith(("attn.hook_attn_scores", "attn.hook_result"))]

    def plain(x):
        return m.hf(x, use_cache=False).logits

    def read_all(cache):  # every value read once: hook_result, computed on first read, included
        for name in cache:
            cache[name]
        return cache

    rows: dict[str, Callable[[torch.Tensor], object]] = {
        "plain HF forward": plain,
        "run(), no hooks": lambda x: m.run(x).logits,
        "cache resid_post": lambda x: m.run(x, cache="blocks.*.hook_resid_post").cache,
        "cache every hook": lambda x: m.run(x, cache="*").cache,
        "cache every hook, read": lambda x: read_all(m.run(x, cache="*").cache),
        "cache nnsight's set": lambda x: m.run(x, cache=nnsight_set).cache,
    }
    if not args.no_peers:
        rows.update(load_peers(cache_dir() / "models" / DEFAULT_MODEL, dtype, m.tokenizer, m.cfg.n_layers,
                               tl_all=args.tl_all))

    print(f"mechscope {mechscope.__version__}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, SmolLM2-135M {args.dtype}, batch {args.batch} x {args.seq} tokens, "
          f"{args.reps} reps (median, interleaved), {args.clock} clock")
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    times: dict[str, list[float]] = {k: [] for k in rows}
    memory: dict[str, tuple[float, float]] = {}
    with torch.no_grad():
        for fn in rows.values():  # warm-up
            fn(tokens)
        for _ in range(args.reps):
            for name, fn in rows.items():
                gc.collect()
                t0 = clock()
                out = fn(tokens)
                times[name].append(clock() - t0)
                del out
        if not args.no_memory:
            for name, fn in rows.items():
                memory[name] = peak_memory(lambda fn=fn: fn(tokens))

    base = statistics.median(times["plain HF forward"])
    header = (f"| {'row':24s} | {'ms (median)':>11s} | {'x plain':>7s} | {'x plain, paired':>15s} | "
              f"{'min..max ms':>15s} |")
    if memory:
        header += f" {'cache MiB':>9s} | {'peak RSS +MiB':>13s} |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for name, ts in times.items():
        med = statistics.median(ts)
        paired = statistics.median(t / b for t, b in zip(ts, times["plain HF forward"]))
        line = (f"| {name:24s} | {med * 1e3:11.1f} | {med / base:7.3f} | {paired:15.3f} | "
                f"{min(ts) * 1e3:7.0f}..{max(ts) * 1e3:<7.0f} |")
        if memory:
            peak, kept = memory[name]
            line += f" {kept:9.0f} | {peak:13.0f} |"
        print(line)


if __name__ == "__main__":
    main()
