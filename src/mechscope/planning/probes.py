"""The measurements behind a calibration: each times (and where it matters, weighs) one piece of a real run.

Timing: one warm-up call, then over ``repeats`` calls the median CPU time with one torch thread (the work
itself: time the machine gives to other processes is not counted, while their effect on shared caches, as a
real run sees it, is). :func:`measure` times everything with one thread and scales the compute rates by the
speedup of several threads on a matmul (:func:`thread_speedup`): timed directly with several threads, a busy
machine makes torch's threads wait for each other and the rates come out several times too low (one calibration
here measured the forward at 17 GFLOP/s instead of ~300). Memory: the resident set (``/proc/self/status``), with the
high-water mark reset between probes (``echo 5 > /proc/self/clear_refs``, Linux).

:func:`measure` runs every probe and returns a JSON-ready dict. For a model given by name,
:func:`~mechscope.planning.calibrate.calibrate` runs them in two fresh processes (``python -m
mechscope.planning.probes process|model ...``), so the process-level numbers are a run's: the interpreter with
torch and mechscope imported, what the first optimizer and the curves page import, what training steps leave
behind (one process, no model, as a training run), and a loaded model's bytes beyond its weights (the other).
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

_DTYPES = ("float32", "bfloat16")
_ARCHS = ("relu", "jumprelu", "topk", "batchtopk")


def rss_bytes() -> int:
    """Resident set size of this process, bytes (0 where /proc is missing)."""
    return _status("VmRSS")


def peak_bytes() -> int:
    """High-water mark of the resident set since the process started or :func:`reset_peak`, bytes."""
    return _status("VmHWM")


def reset_peak() -> bool:
    """Reset the high-water mark to the current resident set (Linux); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def trim() -> None:
    """Collect garbage and hand the allocator's free memory back to the system (glibc ``malloc_trim``), so that
    the growth measured next is new memory, not reused free blocks."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _status(key: str) -> int:
    try:
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith(key + ":"))
    except (OSError, StopIteration, ValueError):
        return 0


def best_time(fn, repeats: int = 5) -> float:
    """Seconds of one ``fn()`` after a warm-up: the median CPU time of ``repeats`` calls with one torch thread,
    the minimum wall time with several."""
    fn()
    one = torch.get_num_threads() == 1
    clock = time.process_time if one else time.perf_counter
    ts = []
    for _ in range(max(1, repeats)):
        t0 = clock()
        fn()
        ts.append(clock() - t0)
    return max(statistics.median(ts) if one else min(ts), 1e-9)


def _solve(rows: list[list[int | float]], ts: list[float]) -> list[float]:
    """Non-negative least squares by hand for 2-3 unknowns: solve, then drop negative terms and solve again."""
    keep = list(range(len(rows[0])))
    while True:
        A = torch.tensor([[r[j] for j in keep] for r in rows], dtype=torch.float64)
        x = torch.linalg.lstsq(A, torch.tensor(ts, dtype=torch.float64)[:, None]).solution[:, 0].tolist()
        if min(x) >= 0 or len(keep) == 1:
            out = [0.0] * len(rows[0])
            for j, v in zip(keep, x):
                out[j] = max(v, 0.0)
            return out
        keep.pop(min(range(len(x)), key=x.__getitem__))


# -- the LM forward --------------------------------------------------------------------------------------
def forward_probe(model, repeats: int = 5, batch_contexts: int = 8, context_len: int = 128) -> dict:
    """Seconds per forward batch (fixed) and FLOP/s of the blocks, from forwards through 1 and 8 blocks.

    Returns:
        ``{"fixed_s", "flop_per_s"}``: a forward of ``L`` blocks takes ``fixed_s + FLOP / flop_per_s`` with the
        FLOP of :meth:`~mechscope.planning.costs.ModelDims.forward_flop_per_token` (embedding, hook set-up and
        the per-call overhead land in ``fixed_s``).
    """
    from mechscope.planning.costs import ModelDims

    dims = ModelDims.from_model(model)
    context_len = min(context_len, getattr(model.cfg, "n_ctx", None) or context_len)
    toks = torch.randint(3, dims.d_vocab, (batch_contexts, context_len), generator=torch.Generator().manual_seed(0))
    rows, ts = [], []
    for L in sorted({1, min(8, dims.n_layers)}):
        hook = f"blocks.{L - 1}.hook_resid_post"
        ts.append(best_time(lambda: model.run(toks, cache=[hook], stop_at_layer=L, cache_device="cpu",
                                              logits_to_keep=0), repeats))
        rows.append([1.0, batch_contexts * context_len * dims.forward_flop_per_token(L, context_len)])
    if len(rows) == 1:  # a one-block model: no fixed part to separate
        return {"fixed_s": 0.0, "flop_per_s": rows[0][1] / ts[0]}
    fixed, inv = _solve(rows, ts)
    return {"fixed_s": fixed, "flop_per_s": 1 / inv if inv > 0 else rows[-1][1] / ts[-1]}


# -- a training step -------------------------------------------------------------------------------------
def train_step_probe(d: int, repeats: int = 5) -> dict:
    """Seconds of the trainer's own step (:class:`~mechscope.training.trainer.Trainer`: loss, backward, Adam,
    decoder normalisation, dead-latent counters, metrics) for every architecture and compute dtype.

    Three sizes per case (``B x m`` = ``512 x 4d``, ``64 x 4d``, ``64 x d/2``) give ``fixed_s + B * flop_per_token
    / flop_per_s + params * s_per_param`` (per-step Python and dispatch; the matmuls and the ``[B, m]`` passes;
    Adam's and the decoder's passes over the parameters).

    Returns:
        ``{arch: {dtype: {"fixed_s", "flop_per_s", "s_per_param"}}}``.
    """
    from mechscope.planning.costs import dictionary_params, train_flop_per_token

    out: dict = {}
    sizes = ((512, 4 * d), (64, 4 * d), (64, max(8, d // 2)))
    for arch in _ARCHS:
        out[arch] = {}
        for dt in _DTYPES:
            rows, ts = [], []
            for B, m in sizes:
                k = min(32, m // 2)
                step = _trainer_step(arch, d, m, B, k, dt)
                ts.append(best_time(step, repeats))
                rows.append([1.0, B * train_flop_per_token(d, m, arch, k),
                             dictionary_params(d, m, threshold=arch == "jumprelu")])
            fixed, inv, per_param = _solve(rows, ts)
            out[arch][dt] = {"fixed_s": fixed, "flop_per_s": 1 / inv if inv > 0 else rows[0][1] / ts[0],
                             "s_per_param": per_param}
    return out


def _trainer_step(arch: str, d: int, m: int, B: int, k: int, dtype: str):
    """``fn()`` running one step of a real Trainer member (the loop's batch check included)."""
    from mechscope.dictionaries import DictionaryConfig
    from mechscope.training import DictionarySpec, TrainConfig
    from mechscope.training.trainer import Trainer

    spec = DictionarySpec("probe", DictionaryConfig(arch, d, m, "blocks.0.hook_resid_post",
                                                    k=k if arch in ("topk", "batchtopk") else None))
    tr = Trainer([spec], TrainConfig(n_tokens=B * 1000, batch_tokens=B, dtype=dtype), tempfile.gettempdir(),
                 progress=False)
    member = tr._new_member(spec)  # the trainer's own member and step: what a run executes
    batch = {"blocks.0.hook_resid_post": torch.randn(B, d, generator=torch.Generator().manual_seed(0))}
    state = {"step": 0}

    def step():
        tr._check_batch(batch, state["step"])
        tr._step(member, batch, state["step"])
        state["step"] += 1

    return step


# -- disk, memory, shards --------------------------------------------------------------------------------
def disk_probe(folder: Path, repeats: int = 2) -> dict:
    """Write (safetensors bytes + sha256 + fsync + rename, as a harvest writes) and read bytes/s, and random-row
    reads from a mapped file (bytes/s of the rows gathered, as :meth:`ShardedActivations.gather`)."""
    import hashlib

    from safetensors.torch import save as st_save

    folder.mkdir(parents=True, exist_ok=True)
    x = torch.randn(2**23).to(torch.bfloat16)  # 16 MiB
    clock = time.perf_counter
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        f = os.path.join(tmp, "probe.safetensors")

        def write():
            data = st_save({"x": x})
            hashlib.sha256(data).hexdigest()
            with open(f + ".tmp", "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(f + ".tmp", f)

        tw = _best_wall(write, repeats, clock)
        tr = _best_wall(lambda: open(f, "rb").read(), repeats, clock)
        rows_d = 512
        raw = torch.from_file(f, shared=False, size=os.path.getsize(f), dtype=torch.uint8)
        n = (raw.numel() - 4096) // (2 * rows_d)
        table = raw[4096:4096 + n * rows_d * 2].view(torch.bfloat16).view(n, rows_d)
        idx = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:4096].sort().values
        tg = best_time(lambda: torch.index_select(table, 0, idx).float(), repeats)
    return {"write_bytes_per_s": x.nbytes / tw, "read_bytes_per_s": x.nbytes / tr,
            "gather_bytes_per_s": len(idx) * rows_d * 2 / tg}


def _best_wall(fn, repeats: int, clock) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = clock()
        fn()
        best = min(best, clock() - t0)
    return max(best, 1e-9)


def memory_bandwidth_probe(repeats: int = 5) -> float:
    """Bytes/s of a 128 MiB copy (read + write)."""
    x = torch.empty(2**25, dtype=torch.float32)
    return 2 * x.nbytes / best_time(lambda: x.clone(), repeats)


def matmul_probe(d: int, repeats: int = 5) -> dict:
    """FLOP/s of an encoder-shaped matmul ``[1024, d] @ [d, 8d]`` in float32 and bfloat16."""
    out = {}
    for dt in _DTYPES:
        a, b = torch.randn(1024, d).to(getattr(torch, dt)), torch.randn(d, 8 * d).to(getattr(torch, dt))
        out[dt] = 2 * 1024 * d * 8 * d / best_time(lambda: a @ b, repeats)
    return out


# -- feature databases -----------------------------------------------------------------------------------
def logit_effects_probe(model, repeats: int = 2, n: int = 256) -> float:
    """Seconds per latent of :func:`~mechscope.features.sources.logit_effects` through the model's ``W_U``."""
    from mechscope.features.sources import final_norm_gain, logit_effects

    dirs = torch.randn(n, model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    gain, W_U = final_norm_gain(model), model.W_U
    return best_time(lambda: logit_effects(dirs, gain, W_U), repeats) / n


def stats_probe(d: int, repeats: int = 2) -> dict:
    """Seconds of :meth:`FeatureStats.update` per firing entry and per latent x context, from two synthetic
    batches (8 contexts of 128; 32 firing latents per token of 4d, and 8 of 16d)."""
    from mechscope.features.stats import FeatureStats, StatsConfig

    cfg = StatsConfig()
    B, P = 8, 128
    rows, ts = [], []
    for n, l0 in ((4 * d, 32), (16 * d, 8)):
        g = torch.Generator().manual_seed(0)
        idx = torch.rand(B, P, n, generator=g).topk(l0, dim=-1).indices
        acts = torch.zeros(B, P, n).scatter_(-1, idx, torch.rand(B, P, l0, generator=g) + 0.1)
        acts[:, 0] = 0
        b, p, lat = (acts > 0).nonzero(as_tuple=True)
        entries = (b, p, lat, acts[b, p, lat])
        st = FeatureStats.empty(n, P, cfg)
        i = [0]

        def upd():
            st.update(acts, entries, torch.arange(B) + B * i[0], i[0], cfg)
            i[0] += 1

        ts.append(best_time(upd, repeats))
        rows.append([len(b), B * n])
    per_entry, per_latent_ctx = _solve(rows, ts)
    return {"s_per_entry": per_entry, "s_per_latent_context": per_latent_ctx}


def db_probe(tokenizer, d_vocab: int, folder: Path, n: int = 512, P: int = 128, n_contexts: int = 64) -> dict:
    """Write synthetic feature databases (``n`` latents, then ``n`` and ``4n`` twice each; 20 top + 20 quantile
    examples of ``P`` positions, 3 firing positions per example as measured on SmolLM2 TopK dictionaries) with the
    real writer.

    Returns:
        ``{"s_per_row", "fixed_s", "bytes_per_row", "fixed_bytes", "memory_per_value", "memory_fixed"}``: seconds,
        file bytes (per-latent and per-context rows amortised) and peak resident bytes while writing as a fixed
        part (the first write also imports and starts DuckDB) plus a part per example row (memory: per stored
        activation value).
    """
    rows, meas = [], []
    # the first write also imports and starts DuckDB and pyarrow (a run pays that once); then each size twice,
    # keeping the larger peak (DuckDB's threads make it vary)
    for nn in (n, n, 4 * n, n, 4 * n):
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            final, tokens = _synthetic_final(nn, P, n_contexts, d_vocab)
            trim()
            base = rss_bytes()
            reset_peak()
            t0 = time.perf_counter()
            from mechscope.features.db import FeatureDB

            FeatureDB.create(Path(tmp) / "probe.duckdb", final, tokens, tokenizer, {}).close()
            meas.append((time.perf_counter() - t0, os.path.getsize(Path(tmp) / "probe.duckdb"),
                         max(0, peak_bytes() - base)))
            rows.append(nn * 40)
    (t0_, _, m0), (t1, f1, m1), (t2, f2, m2), (t3, _, m3), (t4, _, m4) = meas
    t1, t2, m1, m2 = min(t1, t3), min(t2, t4), max(m1, m3), max(m2, m4)
    dr = rows[2] - rows[1]
    s_row, b_row, m_val = max(t2 - t1, 0) / dr, max(f2 - f1, 0) / dr, max(m2 - m1, 0) / (dr * P)
    return {"s_per_row": s_row, "fixed_s": max(0.0, t0_ - s_row * rows[0]), "bytes_per_row": b_row,
            "fixed_bytes": max(0.0, f1 - b_row * rows[1]), "memory_per_value": m_val,
            "memory_fixed": max(0.0, m0 - m_val * rows[0] * P)}


def _synthetic_final(n: int, P: int, n_contexts: int, d_vocab: int):
    from mechscope.features.build import FinalStats

    g = torch.Generator().manual_seed(0)
    K = Q = 20
    tokens = torch.randint(3, d_vocab, (n_contexts, P), generator=g)

    def examples(S):
        acts = torch.zeros(n, S, P)
        acts.scatter_(2, torch.randint(1, P, (n, S, 3), generator=g), torch.rand(n, S, 3, generator=g))
        return {"ctx": torch.randint(0, n_contexts, (n, S), generator=g), "pos": torch.randint(1, P, (n, S)),
                "val": acts.amax(2), "acts": acts}

    quant = dict(examples(Q), bin=torch.arange(Q).repeat(n, 1) // 4, edges=torch.rand(n, 6).sort(1).values)
    ids = torch.randint(0, d_vocab, (2, n, 10), generator=g)
    logits = (torch.rand(n, 10), ids[0], -torch.rand(n, 10), ids[1])
    coact = {"ids": torch.randint(0, n, (n, 10)), "count": torch.randint(1, 99, (n, 10)), "jaccard": torch.rand(n, 10)}
    fired = torch.randint(1, 1000, (n,))
    final = FinalStats(n_contexts * P, fired / (n_contexts * P), torch.rand(n), torch.rand(n), fired,
                       torch.randint(0, 50, (n, 70)), [0.0] * 71, examples(K), quant, logits, coact, [])
    return final, tokens


# -- the process ---------------------------------------------------------------------------------------
def process_probe(folder: Path) -> dict:
    """What a run's process holds and spends outside its own work: the resident bytes with torch and mechscope
    imported (``runtime_bytes``), and the bytes and seconds of what a training run imports on the way (the first
    optimizer imports ``torch._dynamo``; the curves page imports plotly and renders ~5 MB of HTML)."""
    import mechscope.data  # noqa: F401 - what every run imports
    import mechscope.dictionaries  # noqa: F401
    import mechscope.features  # noqa: F401
    import mechscope.training  # noqa: F401

    gc.collect()
    out = {"runtime_bytes": rss_bytes()}
    for key, fn in (("optimizer_import", lambda: __import__("torch._dynamo")),
                    ("curves_page", lambda: _curves(folder))):
        before, t0 = rss_bytes(), time.process_time()  # one thread of Python work: its CPU time
        fn()
        out[key + "_s"] = time.process_time() - t0
        gc.collect()
        out[key + "_bytes"] = max(0, rss_bytes() - before)
    return out


def workspace_probe(d: int, steps: int = 3) -> int:
    """Resident bytes a training step leaves behind beyond the dictionary's state (16 B per parameter): the
    autograd engine, kernel workspaces and allocator slack, from a TopK dictionary of width ``4d`` (bytes)."""
    from mechscope.planning.costs import dictionary_params

    trim()
    before = rss_bytes()
    step = _trainer_step("topk", d, 4 * d, 64, 32, "float32")
    for _ in range(steps):
        step()
    gc.collect()
    return max(0, rss_bytes() - before - 16 * dictionary_params(d, 4 * d))


def _curves(folder: Path) -> None:
    from mechscope.training.curves import write_training_curves

    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        f = Path(tmp) / "metrics.jsonl"
        f.write_text("".join(json.dumps(dict(step=i, tokens=i, name="a", mse=1.0, fvu=1.0, l0=1.0, dead_fraction=0.0))
                             + "\n" for i in (1, 2)))
        write_training_curves(f)


def measure(model, *, dtype: str = "bfloat16", folder: Path | None = None, repeats: int = 5,
            process: bool = True) -> dict:
    """Run the probes: with ``model`` a name, load it first (measuring its resident bytes beyond its weights),
    else use the loaded model.

    Args:
        process: also run :func:`process_probe` and :func:`workspace_probe` here (their numbers are a run's
            only in a fresh process: ``python -m mechscope.planning.probes process ...``).

    Returns:
        JSON-ready: ``process`` (``model_extra_bytes``, and with ``process`` the process probes),
        ``forward``, ``train``, ``disk``, ``memory_bytes_per_s``, ``matmul``, ``logit_s_per_latent``, ``stats``,
        ``db``, ``name``, ``dtype``, ``threads``.
    """
    folder = Path(folder or tempfile.gettempdir())
    proc = {"model_extra_bytes": 0}
    if not hasattr(model, "hf"):
        import mechscope
        import mechscope.data  # noqa: F401 - what a run has imported before it loads the model
        import mechscope.features  # noqa: F401

        gc.collect()  # as a run would: its free blocks count
        before = rss_bytes()
        model = mechscope.load(str(model), dtype=dtype)
        gc.collect()
        weights = sum(p.nbytes for p in model.hf.parameters()) + sum(b.nbytes for b in model.hf.buffers())
        proc["model_extra_bytes"] = max(0, rss_bytes() - before - weights)
    d = model.cfg.d_model
    if process:
        proc.update(process_probe(folder), train_workspace_bytes=workspace_probe(d))
    threads = torch.get_num_threads()
    speedup = thread_speedup(d, threads)
    torch.set_num_threads(1)  # one thread: CPU time is the work, whatever else the machine runs
    try:
        out = {"name": model.cfg.name, "dtype": model.cfg.dtype, "threads": threads, "speedup": speedup,
               "process": proc, "forward": forward_probe(model, repeats), "train": train_step_probe(d, repeats),
               "disk": disk_probe(folder), "memory_bytes_per_s": memory_bandwidth_probe(repeats),
               "matmul": matmul_probe(d, repeats), "logit_s_per_latent": logit_effects_probe(model),
               "stats": stats_probe(d), "db": db_probe(model.tokenizer, model.cfg.d_vocab, folder)}
    finally:
        torch.set_num_threads(threads)
    return scale_to_threads(out, speedup["value"])


def thread_speedup(d: int, threads: int, repeats: int = 7) -> dict:
    """How much faster ``threads`` torch threads run an encoder-shaped bf16 matmul than one.

    Returns:
        ``{"value", "measured", "utilisation"}``: the speedup (1 for one thread); measured is False when the
        cores were busy during the multi-threaded timing (CPU time below 80% of wall time x threads: a thread
        waited for a core) and ``0.85 x threads`` was assumed instead.
    """
    if threads == 1:
        return {"value": 1.0, "measured": True, "utilisation": 1.0}
    a, b = torch.randn(1024, d).to(torch.bfloat16), torch.randn(d, 8 * d).to(torch.bfloat16)
    torch.set_num_threads(1)
    one = best_time(lambda: a @ b, repeats)
    torch.set_num_threads(threads)
    a @ b
    best, util = float("inf"), 0.0
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        a @ b
        w, c = time.perf_counter() - w0, time.process_time() - c0
        if w < best:
            best, util = w, c / (w * threads)
    if util < 0.8:
        return {"value": 0.85 * threads, "measured": False, "utilisation": util}
    return {"value": min(float(threads), max(1.0, one / best)), "measured": True, "utilisation": util}


def scale_to_threads(meas: dict, speedup: float) -> dict:
    """Rates measured with one thread, for a run with ``speedup`` times the throughput of its compute (matmuls and
    the elementwise passes torch parallelises; per-call overheads, statistics updates and disk stay as measured)."""
    if speedup == 1.0:
        return meas
    meas["forward"]["flop_per_s"] *= speedup
    meas["matmul"] = {k: v * speedup for k, v in meas["matmul"].items()}
    meas["logit_s_per_latent"] /= speedup
    meas["memory_bytes_per_s"] *= min(speedup, 2.0)
    for by in meas["train"].values():
        for fit in by.values():
            fit["flop_per_s"] *= speedup
            fit["s_per_param"] /= speedup
    return meas


def main(argv: list[str] | None = None) -> None:
    """``python -m mechscope.planning.probes process D_MODEL THREADS FOLDER`` (the process probes) or
    ``... model NAME DTYPE THREADS FOLDER`` (:func:`measure` without them): print the result as JSON."""
    args = argv or sys.argv[1:]
    if args[0] == "process":
        d, threads, folder = int(args[1]), int(args[2]), Path(args[3])
        torch.set_num_threads(threads)
        out = process_probe(folder)
        out["train_workspace_bytes"] = workspace_probe(d)
    else:
        name, dtype, threads, folder = args[1], args[2], int(args[3]), Path(args[4])
        torch.set_num_threads(threads)
        out = measure(name, dtype=dtype, folder=folder, process=False)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
