"""Benchmark: circuit discovery and evaluation on IOI (SmolLM2-135M by default) against plain forwards.

Rows, all in one process, every ratio against a plain forward of the same prompts measured in the same run:

  (a) attribution   ``attribute(model, task, method=...)`` over every edge, EAP and EAP-IG (m steps): time,
                    x the plain forward of all the prompts, peak RSS increase.
  (b) patched       one patched variant of a batch (the clean prompts with every edge outside a top-n circuit
                    carrying the corrupted value) against a plain forward of that batch, repetitions
                    interleaved (plain, bool mask, float mask, plain, ...), medians. ``bool`` is the engine's
                    0/1-mask path (what evaluation uses); ``float`` the same masks as floats, which take the
                    general [R, S] x [S, B*P*D] product (the engine before the 0/1 path). Sizes from 10 edges
                    to every edge (every edge ablates nothing: the clean run).
      evaluate      ``evaluate_circuit`` of that circuit on all the prompts (clean forward, corrupted capture,
                    m(empty) and m(C) stacked in one forward per batch): time, x the plain forward of all the
                    prompts, peak RSS increase, and the faithfulness with its 95% interval.
  (c) curves        ``faithfulness_curve`` (MIB's 10 sizes) for CPR and CMD from each scoring: time, x plain,
                    the area with its interval (skip with ``--no-curves``).
  (d) robustness    ``robustness_table`` of the top-200 EAP-IG circuit (3 ablations x 2 levels, one pass) and
                    Wang et al.'s ``completeness`` (mean ablation; K = ∅, C and 4 random subsets); with
                    ``--minimality`` also ``minimality`` (K = ∅: one variant per node).

Usage:
    .venv/bin/python bench/circuits.py                              # 64 IOI prompts, 1 thread, CPU clock
    .venv/bin/python bench/circuits.py --n-prompts 32 --clock wall --threads 2 --no-curves

``--clock cpu`` (default) times this process's CPU time, which with one thread ignores time other processes
take on a shared machine. Peak RSS is sampled every ms in a thread (an estimate; see bench/overhead.py).
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

import mechscope
from mechscope.circuits import (Circuit, Graph, attribute, capture_sources, completeness, evaluate_circuit,
                                faithfulness_curve, minimality, robustness_table)
from mechscope.circuits.engine import Layout, patched_logits
from mechscope.data import load_task
from overhead import peak_memory  # bench/ is this script's folder, first on sys.path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n-prompts", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5, help="EAP-IG interpolation steps")
    ap.add_argument("--sizes", default="10,100,1000,10000,35000,all", help="circuit sizes in edges")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    ap.add_argument("--no-curves", action="store_true")
    ap.add_argument("--minimality", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    warnings.simplefilter("ignore", UserWarning)  # wide intervals are printed, not warned

    def timed(fn):
        start = clock()
        out = fn()
        return out, clock() - start

    def measured(fn):
        """(result, seconds, peak RSS +MiB) of one call."""
        box = {}

        def run():
            box["out"], box["t"] = timed(fn)
        mib, _ = peak_memory(run)
        return box["out"], box["t"], mib

    model = mechscope.load(args.model)
    task = load_task("ioi", model, n=args.n_prompts)
    graph = Graph.from_model(model)
    n, pos = task.clean_tokens.shape
    B = args.batch_size

    def plain_all():
        with torch.no_grad():
            for s in range(0, n, B):
                model.hf(task.clean_tokens[s:s + B], use_cache=False, logits_to_keep=1)

    plain_all()  # warm
    _, t_plain = timed(plain_all)
    print(f"{model.cfg.name}, {n} IOI prompts x {pos} tokens, batches of {B}, {graph.n_edges:,} edges, "
          f"torch threads {torch.get_num_threads()}, {args.clock} clock")
    print(f"plain forward of the {n} prompts: {t_plain:.2f} s\n")

    print("(a) attribution over every edge")
    print(f"{'method':<14} {'seconds':>8} {'x plain':>8} {'peak RSS +MiB':>14}")
    scores = {}
    for method in ("eap", "eap-ig"):
        s, t, mib = measured(lambda method=method: attribute(model, task, graph=graph, method=method, steps=args.steps,
                                                             batch_size=B, progress=False))
        scores[method] = s
        label = method if method == "eap" else f"eap-ig (m={args.steps})"
        print(f"{label:<14} {t:>8.2f} {t / t_plain:>8.2f} {mib:>14.0f}")

    sizes = [graph.n_edges if x == "all" else int(x) for x in args.sizes.split(",")]
    ct, xt = task.clean_tokens[:B], task.corrupt_tokens[:B]
    layout = Layout(model, graph)
    with torch.no_grad():
        corrupt = capture_sources(model, xt)
    print(f"\n(b) circuits from EAP-IG |score|: one patched variant of {ct.shape[0]} prompts vs a plain forward of them "
          f"(median of {args.reps}), and evaluate_circuit on all {n} prompts")
    print(f"{'edges':>7} {'bool x plain':>13} {'float x plain':>14} {'eval s':>7} {'eval x plain':>13} "
          f"{'peak RSS +MiB':>14} {'faithfulness [95% CI]':>26}")
    for k in sizes:
        circuit = Circuit.from_scores(scores["eap-ig"], top_n=k)
        mask = (~circuit.edges)[None]
        ratios = {"bool": [], "float": []}
        with torch.no_grad():
            for _ in range(args.reps):
                _, tp = timed(lambda: model.hf(ct, use_cache=False, logits_to_keep=1))
                for kind, m in (("bool", mask), ("float", mask.float())):
                    _, tv = timed(lambda m=m: patched_logits(model, graph, ct, corrupt, m, layout=layout))
                    ratios[kind].append(tv / tp)
        ev, te, mib = measured(lambda c=circuit: evaluate_circuit(model, task, c, batch_size=B))
        f = ev.faithfulness
        print(f"{k:>7,} {statistics.median(ratios['bool']):>13.2f} {statistics.median(ratios['float']):>14.2f} "
              f"{te:>7.2f} {te / t_plain:>13.2f} {mib:>14.0f} {f'{f.estimate:.3f} [{f.low:.3f}, {f.high:.3f}]':>26}")

    if not args.no_curves:
        curves(model, task, scores, B, t_plain, timed)
    circuit = Circuit.from_scores(scores["eap-ig"], top_n=200)
    table, t = timed(lambda: robustness_table(model, task, circuit, batch_size=B))
    print(f"\n(d) the top-200 EAP-IG circuit ({len(circuit.nodes)} nodes) under every ablation: {t:.2f} s = "
          f"{t / t_plain:.2f}x plain\n{table}")
    comp, t = timed(lambda: completeness(model, task, circuit, n_random=4, batch_size=B))
    w = comp.worst
    print(f"completeness (mean ablation, {len(comp.gaps)} sets K, {comp.n_forwards} variants per batch): {t:.2f} s; "
          f"F(M) = {comp.f_model:+.3f}; |F(C\\K) - F(M\\K)|: K = ∅ {comp.gaps[0].gap:.3f}, K = C {comp.gaps[1].gap:.3f}, "
          f"worst {w.gap:.3f} [{w.low:.3f}, {w.high:.3f}] ({w.relative:.1%} of F(M), |K| = {len(w.knocked_out)})")
    if args.minimality:
        mini, t = timed(lambda: minimality(model, task, circuit, k_sets=[[]], batch_size=B))
        gaps = sorted(mini.nodes.items(), key=lambda kv: -kv[1].gap)
        print(f"minimality (K = ∅, {mini.n_forwards} variants per batch): {t:.2f} s; {len(mini.unneeded)} of "
              f"{len(gaps)} nodes below {mini.threshold:.0%} of F(M); largest " +
              ", ".join(f"{n} {g.gap:.2f}" for n, g in gaps[:5]))


def curves(model, task, scores, B, t_plain, timed) -> None:
    n = len(task)
    print(f"\n(c) MIB curves on all {n} prompts (10 sizes, corrupted ablation, edge level)")
    print(f"{'scores':<8} {'kind':<5} {'seconds':>8} {'x plain':>8} {'area [95% CI]':>24}")
    for method, s in scores.items():
        for kind in ("cpr", "cmd"):
            curve, t = timed(lambda s=s, kind=kind: faithfulness_curve(model, task, s, kind=kind, batch_size=B))
            a = curve.area
            print(f"{method:<8} {kind:<5} {t:>8.2f} {t / t_plain:>8.2f} {f'{a.estimate:.3f} [{a.low:.3f}, {a.high:.3f}]':>24}")
            print("   f by size:", " ".join(f"{p:g}%:{float(v):.2f}" for p, v in zip(curve.percents,
                                                                                    curve.faithfulness.estimate)))


if __name__ == "__main__":
    main()
