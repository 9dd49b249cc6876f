"""Feature statistics cost against the plain forward passes they need, and feature-database query latency.

Measured in one process, on the same batches of real text (default corpora, train split, 128-token
contexts, SmolLM2-135M-Instruct in bf16, 1 torch thread unless ``--threads``):

  forward     ``model.run(batch, stop_at_layer=16)`` for every batch (the least any statistic needs:
              the residual stream at block 15).
  pass        ``compute_feature_stats`` alone: forward + SAE encode + every running statistic, no
              checkpoints (``--no-pass-row`` skips it).
  build       ``build_feature_db`` as the CLI runs it: the pass with checkpoints every 50 batches,
              ``finalize`` (sorting, quantile examples, logit effects, co-activation ranking) and the
              DuckDB write.

The forward row runs first, then the build; both are timed with the wall clock and this process's CPU
clock (on a shared machine the CPU clock ignores time other processes take). Peak memory is the
process's resident-set high-water mark (``ru_maxrss``) after each phase.

Query latency: ``FeatureDB.feature(i)`` for random ids (median and p95 of ``--queries`` calls, after
one warm-up call) on the built database and on a synthetic database of ``--synthetic-latents`` latents
(default 100k) with the real database's shape per latent (20 top + 20 quantile examples of 128 tokens,
sparse activations as a SAE latent's are; 20 logit effects, 10 co-activations; rows generated inside DuckDB).

Usage::

    .venv/bin/python bench/features.py --tokens 200000
    .venv/bin/python bench/features.py --tokens 1000000 --no-pass-row   # the target size (~25 min here)
    .venv/bin/python bench/features.py --tokens 0                # only the synthetic 100k-latent database
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def clocks():
    return time.perf_counter(), time.process_time()


def since(t0):
    w, c = clocks()
    return w - t0[0], c - t0[1]


def query_latency(db, n: int, seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, db.n_latents, n + 1).tolist()
    db.feature(ids[0])
    times = []
    for i in ids[1:]:
        t = time.perf_counter()
        db.feature(i)
        times.append(time.perf_counter() - t)
    times.sort()
    return statistics.median(times) * 1e3, times[int(0.95 * (len(times) - 1))] * 1e3


def synthetic_db(path: Path, n_latents: int, n_contexts: int = 7800, P: int = 128) -> float:
    """A feature database of ``n_latents`` with the real per-latent shape, generated in SQL. Returns seconds."""
    import duckdb

    from mechscope.features.db import FORMAT_VERSION, INDEXES, SCHEMA

    t = time.perf_counter()
    con = duckdb.connect(str(path))
    con.execute(SCHEMA)
    con.execute("INSERT INTO meta VALUES ('format_version', ?), ('model', '\"synthetic\"')", [str(FORMAT_VERSION)])
    con.execute(f"""INSERT INTO latents SELECT i, random() * 0.01, random() * 10, random(), (random() * 1e4)::BIGINT,
        list_transform(range(70), lambda x: (random() * 100)::INTEGER), [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]::FLOAT[]
        FROM range({n_latents}) t(i)""")
    con.execute(f"""INSERT INTO contexts SELECT i, list_transform(range({P}), lambda x: (random() * 49152)::INTEGER),
        list_transform(range({P}), lambda x: 'tok' || (x % 97)::VARCHAR), repeat('tok ', {P})
        FROM range({n_contexts}) t(i)""")
    con.execute(f"""INSERT INTO examples SELECT i // 40, CASE WHEN i % 40 < 20 THEN 'top' ELSE 'quantile' END,
        CASE WHEN i % 40 < 20 THEN -1 ELSE (i % 40 - 20) // 4 END, i % 20, (hash(i) % {n_contexts})::INTEGER,
        (i % {P})::SMALLINT, 'tok', random(),
        list_transform(range({P}), lambda x: CASE WHEN (x * 31 + i) % 11 = 0 THEN ((x + i) % 97) / 10.0 ELSE 0 END)
        FROM range({n_latents * 40}) t(i) ORDER BY i""")
    con.execute(f"""INSERT INTO logit_effects SELECT i // 20, CASE WHEN i % 20 < 10 THEN 'up' ELSE 'down' END,
        i % 10, (hash(i) % 49152)::INTEGER, 'tok', random() FROM range({n_latents * 20}) t(i)""")
    con.execute(f"""INSERT INTO coactivation SELECT i // 10, (hash(i) % {n_latents})::INTEGER, i % 10,
        (random() * 1000)::BIGINT, random() FROM range({n_latents * 10}) t(i)""")
    con.execute(INDEXES)
    con.execute("CHECKPOINT")
    con.close()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sae", default="/work/runs/sae-smollm2-L15")
    ap.add_argument("--tokens", type=int, default=200_000, help="tokens of text (0: only the synthetic database)")
    ap.add_argument("--batch-contexts", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--encode-dtype", default="float32", help="float32 (exact) or bfloat16 (TopK encoder matmul)")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--synthetic-latents", type=int, default=100_000, help="0: skip the synthetic database")
    ap.add_argument("--checkpoint-every", type=int, default=50, help="batches between checkpoints in the build (the CLI default)")
    ap.add_argument("--no-pass-row", dest="pass_row", action="store_false",
                    help="skip the separate streaming-pass row (saves one pass)")
    ap.add_argument("--out", default=None, help="keep the built database here (default: a temporary folder)")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="mechscope-bench-features-"))
    if args.tokens:
        import mechscope
        from mechscope.data import corpus_tokens
        from mechscope.dictionaries import load_dictionary
        from mechscope.features.build import build_feature_db
        from mechscope.features.sources import FeatureSource
        from mechscope.features.stats import StatsConfig, compute_feature_stats

        model = mechscope.load("smollm2-135m", dtype="bfloat16")
        sae = load_dictionary(args.sae)
        tokens = corpus_tokens(["pydoc", "wikipedia", "austen", "shakespeare"], model.tokenizer, 128, "train",
                               max_tokens=args.tokens).tokens
        print(f"{tokens.shape[0]} contexts x 128 = {tokens.numel():,} tokens; SAE {sae.cfg.d_sae} latents; "
              f"{torch.get_num_threads()} thread(s); RSS after loading {rss_gib():.2f} GiB")
        from mechscope.core.names import parse

        stop = parse(sae.cfg.hook_in)[1] + 1
        B = args.batch_contexts
        t0 = clocks()
        with torch.no_grad():
            for s in range(0, len(tokens), B):
                model.run(tokens[s:s + B], stop_at_layer=stop)
        fwd = since(t0)
        rss_fwd = rss_gib()
        print(f"forward only      wall {fwd[0]:7.1f} s  cpu {fwd[1]:7.1f} s   peak RSS {rss_fwd:.2f} GiB")
        cfg = StatsConfig(batch_contexts=B, checkpoint_every=args.checkpoint_every)
        src = FeatureSource(model, dictionary=sae, dictionary_path=args.sae, encode_dtype=args.encode_dtype)
        if args.pass_row:
            t0 = clocks()
            compute_feature_stats(src, tokens, cfg, progress=False)  # the result is dropped at once
            pas = since(t0)
            print(f"streaming pass    wall {pas[0]:7.1f} s  cpu {pas[1]:7.1f} s   x forward {pas[0] / fwd[0]:.2f} (wall) "
                  f"{pas[1] / fwd[1]:.2f} (cpu)   peak RSS {rss_gib():.2f} GiB   (no checkpoints)")
        out = Path(args.out) if args.out else tmp / "features.duckdb"
        t0 = clocks()
        db = build_feature_db(src, tokens, out, cfg, progress=False)
        full = since(t0)
        print(f"full build        wall {full[0]:7.1f} s  cpu {full[1]:7.1f} s   x forward {full[0] / fwd[0]:.2f} (wall) "
              f"{full[1] / fwd[1]:.2f} (cpu)   peak RSS {rss_gib():.2f} GiB   file {out.stat().st_size / 2**20:.0f} MiB")
        med, p95 = query_latency(db, args.queries)
        print(f"feature(i) on the built DB ({db.n_latents} latents): median {med:.1f} ms, p95 {p95:.1f} ms")
        for q in ("def", " the", "Elizabeth"):
            t = time.perf_counter()
            r = db.search_tokens(q, 10)
            print(f"search_tokens({q!r}) -> {r[:5]} in {(time.perf_counter() - t) * 1e3:.1f} ms")
        t = time.perf_counter()
        r = db.search_text("import os", 10)
        print(f"search_text('import os') -> {r[:5]} in {(time.perf_counter() - t) * 1e3:.1f} ms")
        db.close()
    if args.synthetic_latents:
        from mechscope.features.db import FeatureDB

        path = tmp / "synthetic.duckdb"
        secs = synthetic_db(path, args.synthetic_latents)
        with FeatureDB(path) as db:
            med, p95 = query_latency(db, args.queries)
            t = time.perf_counter()
            db.list_latents("density", 50_000, 100)
            lst = (time.perf_counter() - t) * 1e3
        print(f"synthetic DB: {args.synthetic_latents:,} latents built in {secs:.0f} s, "
              f"{path.stat().st_size / 2**30:.2f} GiB; feature(i) median {med:.1f} ms, p95 {p95:.1f} ms; "
              f"list_latents(density, offset 50k) {lst:.1f} ms")


if __name__ == "__main__":
    main()
