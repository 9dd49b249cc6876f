"""SAE training throughput: mechscope's trainer beside SAELens's, on the same cached activations.

Both trainers train a TopK SAE (k=32, d_in=576, d_sae=4608: 8x SmolLM2-135M's width) with Adam at the
same learning rate, on the same in-memory batches of real SmolLM2 activations (``blocks.15.hook_resid_post``,
harvested once into a temporary folder and materialised as a fixed list of float32 [batch, 576] tensors),
in the same process, repetitions interleaved (mechscope, SAELens, matmul, mechscope, SAELens, matmul, ...).
Data loading is excluded from both: each timed step receives a tensor already in memory.

What is timed, per training step (each trainer built and initialised before timing; one untimed warm-up):

  mechscope   the body of ``Trainer.fit``'s loop: ``Trainer._check_batch(batch)`` (NaN/inf check of the
              input) and ``Trainer._step(member, batch, step)`` (scale, loss, isfinite(loss), backward,
              decoder-gradient projection, Adam, decoder renormalisation, dead counters, fvu and l0).
              Not timed: the metrics.jsonl line every 10 steps and the tqdm bar.
  SAELens     the body of ``SAETrainer.fit``'s loop with W&B off: ``maybe_reset_sparsity()``, ``step(batch)``
              (activation scaler, ``training_forward_pass`` under its autocast, dead-neuron and firing-
              frequency bookkeeping, backward, ``clip_grad_norm_(1.0)``, Adam, lr scheduler),
              ``_checkpoint_if_needed()`` (no checkpoints configured) and the step counter.
              Not timed: the tqdm bar.

Each library keeps its own defaults where they are part of its training recipe (and they cost time):
mechscope projects the decoder gradient and renormalises decoder rows after each step and clips no
gradient; SAELens (``TopKTrainingSAEConfig`` defaults) uses ``rescale_acts_by_decoder_norm=True`` (the
decoder norms are computed in each forward instead of kept at 1), always clips the gradient norm to 1,
and uses dense activations (``use_sparse_activations=False``). Both normalise inputs to mean norm
sqrt(d_in) (mechscope's default; SAELens ``normalize_activations="expected_average_only_in"``) and
subtract b_dec from the input.

AuxK depends on which latents are dead, and the two trainers' short runs would kill different latents
at different steps, so dead latents are controlled:

  no dead     mechscope ``dead_after_tokens`` and SAELens ``dead_feature_window`` set beyond the run: AuxK is
              skipped by both (a healthy SAE; also every SAE early in training).
  N% dead     before each step the same fixed N% of latents are marked dead in both trainers' counters
              (``--dead-percent``, default 10: 460 dead > k_aux = 288), so both compute AuxK with k_aux=288
              every step (mechscope aux coefficient 1/32, SAELens's default 1; the cost is the same).

Machine matmul throughput (the ``matmul`` row, timed inside the same repetitions): the six dense matmuls of
one dense SAE step at these shapes, in the compute dtype: forward ``x @ W_enc`` [B,576]@[576,4608] and
``a @ W_dec`` [B,4608]@[4608,576]; backward ``g @ W_dec.T``, ``a.T @ g``, ``g_pre @ W_enc.T``, ``x.T @ g_pre``.
Together they are 12 * 576 * 4608 FLOPs per token, the dense-training FLOP count used for ``% of matmul``:
achieved FLOP/s = tokens/s * 12 * d_in * d_sae, divided by the matmul row's FLOP/s.

Usage::

    .venv/bin/python bench/sae_training.py --dtype float32 --threads 1 --clock cpu
    .venv/bin/python bench/sae_training.py --dtype bfloat16 --threads 1 --clock cpu
    .venv/bin/python bench/sae_training.py --profile     # torch.profiler table of mechscope's _step

Needs SAELens (``pip install sae-lens``) for its rows; without it, the mechscope rows still run.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars (read when tqdm is imported) would garble the table

import torch  # noqa: E402

import mechscope  # noqa: E402
from mechscope.data import ShardedActivations, corpus_tokens, harvest  # noqa: E402
from mechscope.dictionaries import DictionaryConfig  # noqa: E402
from mechscope.training import DictionarySpec, TrainConfig, Trainer  # noqa: E402

HOOK = "blocks.15.hook_resid_post"
D_IN = 576
NEVER = 10**15  # a dead window no run reaches


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def real_batches(n_batches: int, batch: int, n_contexts: int, ctx: int) -> list[torch.Tensor]:
    """``n_batches`` float32 [batch, 576] tensors of SmolLM2 activations at HOOK (shuffled, epochs repeat)."""
    m = mechscope.load(dtype="bfloat16")
    contexts = corpus_tokens(["pydoc"], m.tokenizer, ctx, "train").tokens[:n_contexts]
    with tempfile.TemporaryDirectory(prefix="mechscope-bench-acts-") as folder:
        harvest(m, [HOOK], contexts, folder, dtype=torch.bfloat16, progress=False)
        it = ShardedActivations(folder).batches(batch, seed=0)
        out = [next(it)[HOOK].clone() for _ in range(n_batches)]
    del m
    gc.collect()
    return out


# -- mechscope ------------------------------------------------------------------------------------
class MechscopeRow:
    def __init__(self, batches, args, dead_mask, tmp: Path):
        self.batches, self.dead_mask = batches, dead_mask
        d_sae = D_IN * args.expansion
        spec = DictionarySpec("b", DictionaryConfig("topk", D_IN, d_sae, HOOK, k=args.k), lr=args.lr)
        n_steps = 1 + args.warmup + args.reps * args.steps
        cfg = TrainConfig(n_tokens=n_steps * args.batch, batch_tokens=args.batch, dtype=args.dtype,
                          checkpoint_every_steps=0, log_every_steps=10, norm_estimation_batches=1,
                          dead_after_tokens=NEVER, lr_warmup_steps=1)
        self.trainer = Trainer([spec], cfg, tmp, progress=False)
        self.member = self.trainer._new_member(spec)  # what fit() does before its loop
        self.trainer._estimate_scales(lambda start: iter({HOOK: b} for b in batches[start:]), [self.member])
        self.step = 0
        self.last: dict[str, float] = {}

    def run(self, n: int) -> None:
        for _ in range(n):
            b = {HOOK: self.batches[self.step % len(self.batches)]}
            if self.dead_mask is not None:
                self.member.tokens_since_fired[self.dead_mask] = NEVER
            Trainer._check_batch(b, self.step)
            self.last = self.trainer._step(self.member, b, self.step)
            self.step += 1

    def summary(self) -> str:
        r = self.last
        return (f"mse {r['mse']:.2f}, fvu {r['fvu']:.3f}, l0 {r['l0']:.1f}, aux {r.get('aux', 0.0):.4f}, "
                f"dead {r['dead_fraction']:.2f}")


# -- SAELens --------------------------------------------------------------------------------------
class SAELensRow:
    def __init__(self, batches, args, dead_mask):
        from sae_lens.config import LoggingConfig, SAETrainerConfig
        from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
        from sae_lens.training.sae_trainer import SAETrainer

        self.batches, self.dead_mask = batches, dead_mask
        d_sae = D_IN * args.expansion
        torch.manual_seed(0)
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D_IN, d_sae=d_sae, k=args.k, dtype="float32", device="cpu",
                                                    normalize_activations="expected_average_only_in"))
        self.defaults = {"rescale_acts_by_decoder_norm": sae.cfg.rescale_acts_by_decoder_norm,
                         "aux_loss_coefficient": sae.cfg.aux_loss_coefficient,
                         "decoder_init_norm": sae.cfg.decoder_init_norm,
                         "use_sparse_activations": sae.cfg.use_sparse_activations}
        n_steps = 1 + args.warmup + args.reps * args.steps
        cfg = SAETrainerConfig(total_training_samples=n_steps * args.batch, train_batch_size_samples=args.batch,
                               lr=args.lr, lr_end=args.lr / 10, device="cpu", autocast=args.dtype == "bfloat16",
                               dead_feature_window=NEVER, n_checkpoints=0, save_final_checkpoint=False,
                               logger=LoggingConfig(log_to_wandb=False), n_batches_for_norm_estimate=1)
        self.pos = 0

        def provider():
            while True:
                yield self.batches[self.pos % len(self.batches)]
                self.pos += 1

        self.trainer = SAETrainer(cfg=cfg, sae=sae, data_provider=provider())
        # what fit() does before its loop (sae.to(device) is a no-op on CPU)
        self.trainer.activation_scaler.estimate_scaling_factor(D_IN, self.trainer.data_provider, 1)
        self.pos = 0
        self.last = None

    def run(self, n: int) -> None:
        t = self.trainer
        for _ in range(n):
            batch = self.batches[self.pos % len(self.batches)]
            self.pos += 1
            if self.dead_mask is not None:
                t.n_forward_passes_since_fired[self.dead_mask] = 2.0 * NEVER  # > dead_feature_window
            t.maybe_reset_sparsity()
            self.last = t.step(batch)
            t._checkpoint_if_needed()
            t.n_training_steps += 1

    def summary(self) -> str:
        o = self.last
        mse = float(o.losses["mse_loss"])
        aux = float(o.losses.get("auxiliary_reconstruction_loss", torch.tensor(0.0)))
        l0 = float((o.feature_acts > 0).float().sum(-1).mean())
        return f"mse {mse:.2f}, l0 {l0:.1f}, aux {aux:.4f}, dead {float(self.trainer.dead_neurons.float().mean()):.2f}"


# -- the machine's matmul throughput ---------------------------------------------------------------
class MatmulRow:
    """The six dense matmuls of one dense SAE training step, in the compute dtype."""

    def __init__(self, args):
        dt = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
        g = torch.Generator().manual_seed(0)
        B, I, S = args.batch, D_IN, D_IN * args.expansion

        def r(*shape):
            return torch.randn(*shape, generator=g).to(dt)

        self.x, self.W_enc, self.W_dec = r(B, I), r(I, S), r(S, I)
        self.a, self.g_out, self.g_pre = r(B, S), r(B, I), r(B, S)
        self.flops = 6 * 2 * B * I * S

    def run(self, n: int) -> None:
        for _ in range(n):
            self.x @ self.W_enc            # forward encode      [B,I]@[I,S]
            self.a @ self.W_dec            # forward decode      [B,S]@[S,I]
            self.g_out @ self.W_dec.T      # d acts              [B,I]@[I,S]
            self.a.T @ self.g_out          # d W_dec             [S,B]@[B,I]
            self.g_pre @ self.W_enc.T      # d x                 [B,S]@[S,I]
            self.x.T @ self.g_pre          # d W_enc             [I,B]@[B,S]


def profile_mechscope(row: MechscopeRow, steps: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    row.run(1)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        row.run(steps)
    print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=30,
                                                             max_name_column_width=40, max_shapes_column_width=45))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="compute dtype; bfloat16 = autocast in both trainers (fp32 weights and Adam state)")
    p.add_argument("--batch", type=int, default=4096, help="tokens per step")
    p.add_argument("--expansion", type=int, default=8, help="d_sae = expansion * 576")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-4 / (8 * 576 / 2**14) ** 0.5,
                   help="Adam lr for both (default: mechscope's rule for d_sae=4608)")
    p.add_argument("--steps", type=int, default=3, help="training steps per timed repetition")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per row (interleaved)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per row before the first repetition")
    p.add_argument("--dead-percent", type=float, default=10.0,
                   help="the 'dead' rows mark this percentage of latents dead in both trainers (0: no such rows)")
    p.add_argument("--no-dead-rows", action="store_true", help="only the rows without dead latents")
    p.add_argument("--n-batches", type=int, default=12, help="distinct batches materialised (cycled)")
    p.add_argument("--contexts", type=int, default=200, help="contexts of 128 tokens harvested from pydoc")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="cpu",
                   help="cpu (default): this process's CPU time, with 1 thread insensitive to waiting for a core")
    p.add_argument("--no-peers", action="store_true", help="mechscope rows only")
    p.add_argument("--profile", action="store_true", help="after the timing, profile mechscope's steps")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("sae_lens").setLevel(logging.ERROR)
    os.environ.setdefault("WANDB_MODE", "disabled")

    t0 = time.perf_counter()
    batches = real_batches(args.n_batches, args.batch, args.contexts, 128)
    print(f"harvested and materialised {len(batches)} batches of {tuple(batches[0].shape)} "
          f"{batches[0].dtype} in {time.perf_counter() - t0:.0f} s")

    d_sae = D_IN * args.expansion
    dead_mask = torch.zeros(d_sae, dtype=torch.bool)
    order = torch.randperm(d_sae, generator=torch.Generator().manual_seed(1))
    dead_mask[order[: int(d_sae * args.dead_percent / 100)]] = True
    conditions = [("no dead", None)]
    if args.dead_percent > 0 and not args.no_dead_rows:
        conditions.append((f"{args.dead_percent:g}% dead", dead_mask))

    have_peer = False
    if not args.no_peers:
        try:
            import sae_lens  # noqa: F401
            have_peer = True
        except ImportError:
            print("sae-lens not installed: SAELens rows skipped")

    tmp = Path(tempfile.mkdtemp(prefix="mechscope-bench-train-"))
    rows: dict[str, object] = {}
    for label, mask in conditions:
        folder = tmp / label.replace(" ", "_").replace("%", "pc")
        rows[f"mechscope, {label}"] = MechscopeRow(batches, args, mask, folder)
        if have_peer:
            rows[f"SAELens, {label}"] = SAELensRow(batches, args, mask)
    rows["matmul"] = MatmulRow(args)

    versions = f"sae-lens {sys.modules['sae_lens'].__version__}" if have_peer else "no sae-lens"
    print(f"mechscope {mechscope.__version__}, torch {torch.__version__}, {versions}, {cpu_name()} "
          f"({os.cpu_count()} cores), {torch.get_num_threads()} threads (torch.set_num_threads), {args.clock} clock")
    print(f"TopK k={args.k}, d_in={D_IN}, d_sae={d_sae}, batch {args.batch} tokens, compute {args.dtype}, "
          f"lr {args.lr:.3g}, {args.steps} steps x {args.reps} reps per row (+{args.warmup} warm-up), interleaved")
    print("command: " + " ".join(shlex.quote(a) for a in [sys.executable.replace(os.getcwd() + '/', '')] + sys.argv))
    if have_peer:
        peer_row = next(r for k, r in rows.items() if k.startswith("SAELens"))
        print(f"SAELens TopKTrainingSAEConfig defaults used: {peer_row.defaults}")

    clock = time.perf_counter if args.clock == "wall" else time.process_time
    times: dict[str, list[float]] = {k: [] for k in rows}
    for row in rows.values():
        row.run(args.warmup)
    for _ in range(args.reps):
        for name, row in rows.items():
            gc.collect()
            t = clock()
            row.run(args.steps)
            times[name].append((clock() - t) / args.steps)

    flop_per_token = 12 * D_IN * d_sae
    peak = statistics.median(rows["matmul"].flops / t for t in times["matmul"])
    header = (f"| {'row':22s} | {'s/step':>6s} | {'tokens/s':>8s} | {'min..max tok/s':>15s} | {'GFLOP/s':>7s} | "
              f"{'% of matmul':>11s} | {'x SAELens':>9s} | {'x SAELens, paired':>17s} |")
    print()
    print(header)
    print("|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|")
    for name, ts in times.items():
        med = statistics.median(ts)
        if name == "matmul":
            gf = rows["matmul"].flops / med / 1e9
            print(f"| {'matmul (6 of a step)':22s} | {med:6.3f} | {'':>8s} | {'':>15s} | {gf:7.1f} | {100.0:10.1f}% | "
                  f"{'':>9s} | {'':>17s} |")
            continue
        tps = args.batch / med
        peer = name.replace("mechscope", "SAELens")
        ratio = paired = ""
        if name.startswith("mechscope") and peer in times:
            ratio = f"{statistics.median(times[peer]) / med:.2f}"
            paired = f"{statistics.median(p / m for p, m in zip(times[peer], ts)):.2f}"
        gflops = tps * flop_per_token / 1e9
        print(f"| {name:22s} | {med:6.3f} | {tps:8.0f} | {args.batch / max(ts):6.0f}..{args.batch / min(ts):<7.0f} | "
              f"{gflops:7.1f} | {100 * gflops * 1e9 / peak:10.1f}% | {ratio:>9s} | {paired:>17s} |")
    print()
    for name, row in rows.items():
        if name != "matmul":
            print(f"last step, {name}: {row.summary()}")

    if args.profile:
        print(f"\nprofile of mechscope's steps ({conditions[-1][0]}):")
        profile_mechscope(rows[f"mechscope, {conditions[-1][0]}"], max(2, args.steps))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
