"""Training sparse dictionaries from an activation source, with checkpoints and exact resume.

One pass over the source trains every :class:`DictionarySpec` of a run (different widths, k, layers,
architectures): each batch is read once and given to each dictionary.

A run folder holds:

- ``<name>/`` the trained dictionary (mechscope format, input normalisation folded into the weights);
- ``metrics.jsonl`` one line per dictionary every ``log_every_steps``;
- ``checkpoints/step_XXXXXXXX/`` weights, Adam state, dead-latent counters, scales (safetensors + JSON);
- ``run.json`` the configuration, and ``training_curves.html``.

Resume (``resume=True``) reloads the newest checkpoint and continues from its step with the same
batches, so the resumed metrics equal an uninterrupted run's (with the same number of threads).

Data parallel (``dist=``, under torchrun): every rank trains on its rows of each global batch and the
gradients are all-reduced (:mod:`mechscope.training.parallel`), so the parameters, Adam state and dead-latent
counters stay replicated and equal a one-process run with the same ``batch_tokens`` to rounding. Rank 0 alone
writes checkpoints, metrics and the results; a checkpoint records the global step (the data cursor is
``step * batch_tokens``), not the world size, so a run resumes at any world size.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from mechscope.core.errors import InputError, MechscopeError
from mechscope.core.io import (write_json_atomic,
                               write_text_atomic)
from mechscope.dictionaries.io import save_dictionary
from mechscope.dictionaries.model import SparseDictionary
from mechscope.training.config import DictionarySpec, TrainConfig
from mechscope.training.losses import compute_loss
from mechscope.training.checkpoints import latest_checkpoint, load_checkpoint, save_checkpoint
from mechscope.training.parallel import all_reduce_gradients, is_parallel, local_rows, make_layout
from mechscope.training.tensor_parallel import (clip_grad_norm_sharded, compute_loss_sharded, gather_dictionary,
                                                shard_dictionary)


class TrainingDivergedError(MechscopeError, FloatingPointError):
    """The loss or an input batch became NaN/inf; the last checkpoint is intact."""


@dataclass
class _Member:
    """One dictionary under training and everything its exact resume needs."""

    spec: DictionarySpec
    dictionary: SparseDictionary
    optimizer: torch.optim.Adam
    tokens_since_fired: Tensor  # int64 [d_sae]
    scale_in: float = 1.0
    scale_out: float = 1.0
    threshold_ema: float | None = None  # batchtopk


def _batches(source, cfg: TrainConfig, start_step: int, dist=None) -> Iterator[dict[str, Tensor]]:
    """Batches of ``cfg.batch_tokens`` rows from step ``start_step`` on (batch t is a pure function of t).

    ``source`` is a ``ShardedActivations`` or an ``ActivationStream`` (both have ``training_batches``), or a
    callable ``start_step -> iterable of batches``. Data parallel: this rank's rows of each batch
    (:func:`~mechscope.training.parallel.local_rows`); harvested shards read only those rows, the other sources
    make the whole batch on every rank and keep the rank's part (harvest first for large runs).
    """
    if is_parallel(dist):
        part = local_rows(cfg.batch_tokens, dist)
        from mechscope.data.shards import ShardedActivations

        if isinstance(source, ShardedActivations):
            return iter(source.training_batches(cfg.batch_tokens, cfg.seed, start_step, part=part))
        return ({k: v[part] for k, v in b.items()} for b in _batches(source, cfg, start_step))
    if hasattr(source, "training_batches"):
        return iter(source.training_batches(cfg.batch_tokens, cfg.seed, start_step))
    if callable(source):
        return iter(source(start_step))
    raise InputError(f"cannot train from a {type(source).__name__}: give ShardedActivations (harvest), an "
                     "ActivationStream, or a callable start_step -> iterable of {hook: [batch, d_in]} batches.")


def plan_training_memory(specs: Sequence[DictionarySpec], cfg: TrainConfig) -> dict[str, int]:
    """Bytes a run needs, by term: parameters, gradients and Adam state (fp32), and per-batch activations.

    Every dictionary holds 4 copies of its parameters (weights, gradient, Adam's two moments); a batch
    holds about 6 tensors of [batch_tokens, d_sae] (pre-activations, activations, their gradients, AuxK).
    """
    terms: dict[str, int] = {}
    for s in specs:
        c = s.dictionary
        n = (c.d_in * c.d_sae + c.d_sae * c.d_out + c.d_sae + c.d_out + (c.d_in * c.d_out if c.skip else 0)
             + (c.d_sae if c.architecture == "jumprelu" else 0))  # batchtopk's threshold is a buffer: no grad, no Adam
        terms[f"{s.name}: weights, grads, Adam (fp32)"] = 4 * 4 * n
        terms[f"{s.name}: batch activations"] = 6 * 4 * cfg.batch_tokens * c.d_sae
    return terms


class Trainer:
    """Trains one or more dictionaries from one activation source.

    Args:
        specs: the dictionaries and their objectives; names must be unique.
        cfg: the shared schedule.
        out_dir: the run folder.
        on_step: optional ``fn(step)`` called after each step (progress hooks, fault injection in tests).
        dist: the :class:`~mechscope.scale.dist.DistInfo` of a torchrun job (None: one process); see the
            module docstring.
        tp: latent shards per dictionary (tensor parallel, :mod:`~mechscope.training.tensor_parallel`); the
            world size is ``dp × tp`` replicas × shards. Every ``d_sae`` must be divisible by ``tp``.
        device: where the dictionaries train ("cpu", "cuda", "cuda:N"); default: the job's device (torchrun:
            ``cuda:LOCAL_RANK`` with nccl), else cpu. Batches are moved there; saved files are always read
            and written on the CPU.

    Raises:
        InputError: duplicate names, a ``tp`` that does not divide the world size or a ``d_sae``, a spec whose
            hooks the source lacks, a memory plan over budget,
            an existing run in ``out_dir`` without ``resume=True``, ``resume=True`` with nothing to resume,
            or a resume whose configuration differs.
    """

    def __init__(self, specs: Sequence[DictionarySpec], cfg: TrainConfig, out_dir: str | Path, *,
                 on_step: Callable[[int], None] | None = None, progress: bool = True, dist=None, tp: int = 1,
                 device: str | torch.device | None = None):
        specs = list(specs)
        if not specs:
            raise InputError("no dictionaries to train; pass at least one DictionarySpec.")
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise InputError(f"dictionary names must be unique, got {names}.")
        self.specs, self.cfg, self.out = specs, cfg, Path(out_dir)
        self.on_step, self.progress = on_step, progress
        self.layout = make_layout(dist if is_parallel(dist) else None, tp)
        self.is_main = self.layout is None or self.layout.is_main
        self.device = torch.device(device) if device is not None else (
            self.layout.info.device if self.layout is not None else torch.device("cpu"))
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise InputError(f"device {str(self.device)!r} asked but CUDA is not available here; use device='cpu'.")
        if tp > 1:
            from mechscope.training.tensor_parallel import shard_bounds

            for s in specs:
                shard_bounds(s.dictionary.d_sae, 0, tp)
        plan = plan_training_memory(specs, cfg)
        total = sum(plan.values())
        if cfg.memory_budget_bytes is not None and total > cfg.memory_budget_bytes:
            lines = "\n".join(f"  {k}: {v / 2**20:.1f} MiB" for k, v in plan.items())
            raise InputError(
                f"this training run needs about {total / 2**20:.1f} MiB but memory_budget_bytes is "
                f"{cfg.memory_budget_bytes / 2**20:.1f} MiB:\n{lines}\nLower batch_tokens or d_sae, train fewer "
                "dictionaries at once, or raise the budget."
            )

    # -- set-up ------------------------------------------------------------------------------
    def _run_record(self) -> dict:
        return {"train": self.cfg.to_dict(), "dictionaries": [s.to_dict() for s in self.specs]}

    def _new_member(self, spec: DictionarySpec) -> _Member:
        d = SparseDictionary(spec.dictionary, device=self.device).initialize(
            self.cfg.seed, decoder_norm=spec.decoder_init_norm, jumprelu_init_threshold=spec.jumprelu_init_threshold)
        d.train()
        if self.layout is not None and self.layout.tp_size > 1:  # the unsharded initialisation, sliced
            d = shard_dictionary(d, self.layout)
        opt = torch.optim.Adam(d.parameters(), lr=spec.learning_rate, betas=self.cfg.adam_betas, eps=self.cfg.adam_eps)
        return _Member(spec, d, opt, torch.zeros(d.cfg.d_sae, dtype=torch.long, device=self.device))

    def _estimate_scales(self, source, members: list[_Member]) -> None:
        """Normalisation scales (mean norm -> sqrt(d)) and b_dec's initial value from the first batches."""
        it = _batches(source, self.cfg, 0, self.layout)
        sums: dict[str, Tensor] = {}
        norms: dict[str, float] = {}
        n = n_batches = 0
        for _ in range(self.cfg.norm_estimation_batches):
            try:
                b = next(it)
            except StopIteration:
                break
            self._check_batch(b, n_batches)
            n_batches += 1
            for hook, x in b.items():
                if hook.startswith("__"):
                    continue
                x = x.to(self.device).float()  # sums in float64: the same to the last bit whatever the split
                sums[hook] = sums.get(hook, 0) + x.double().sum(0)
                norms[hook] = norms.get(hook, 0.0) + float(x.norm(dim=-1).double().sum())
            n += next(iter(v for k, v in b.items() if not k.startswith("__"))).shape[0]
        if self.layout is not None:  # each replica saw its rows: the sums over the batches' whole rows, in float64
            hooks = sorted(norms)
            flat = torch.cat([torch.tensor([float(n)], dtype=torch.float64, device=self.device)]
                             + [torch.tensor([norms[h]], dtype=torch.float64, device=self.device) for h in hooks]
                             + [sums[h].double() for h in hooks])
            self.layout.over_dp("the normalisation estimate's all-reduce", flat)
            n, off = int(flat[0]), 1 + len(hooks)
            for i, h in enumerate(hooks):
                norms[h] = float(flat[1 + i])
                sums[h] = flat[off:off + sums[h].numel()].clone()
                off += sums[h].numel()
        if n == 0:
            raise InputError("the activation source yielded no batch; is it empty?")
        for m in members:
            c = m.spec.dictionary
            for hook in (c.hook_in, c.hook_out):
                if hook not in norms:
                    raise InputError(f"the activation source has no {hook} (it has {sorted(norms)}); harvest or "
                                     f"stream that hook for dictionary {m.spec.name!r}.")
            if self.cfg.normalize_inputs:
                m.scale_in = math.sqrt(c.d_in) / (norms[c.hook_in] / n)
                m.scale_out = math.sqrt(c.d_out) / (norms[c.hook_out] / n)
            if c.is_sae:
                m.scale_out = m.scale_in
            with torch.no_grad():  # b_dec starts at the mean, so the first latents explain deviations
                m.dictionary.b_dec.copy_(sums[c.hook_out] / n * m.scale_out)

    # -- checkpoints -------------------------------------------------------------------------
    @property
    def ckpt_dir(self) -> Path:
        return self.out / "checkpoints"

    def _save_checkpoint(self, members: list[_Member], step: int) -> Path | None:
        state = {"step": step, "tokens": step * self.cfg.batch_tokens, "run": self._run_record(),
                 "members": {m.spec.name: {"scale_in": m.scale_in, "scale_out": m.scale_out,
                                           "threshold_ema": m.threshold_ema} for m in members}}
        return save_checkpoint(self.ckpt_dir, members, step, state, self.layout, self.cfg.keep_checkpoints)

    def latest_checkpoint(self) -> Path | None:
        """The newest complete checkpoint folder, or None."""
        return latest_checkpoint(self.ckpt_dir)

    def _load_checkpoint(self, folder: Path, members: list[_Member]) -> int:
        return int(load_checkpoint(folder, members, self._run_record(), self.layout)["step"])

    # -- one step ----------------------------------------------------------------------------
    def _step(self, m: _Member, batch: dict[str, Tensor], step: int) -> dict[str, float]:
        spec, d, cfg = m.spec, m.dictionary, self.cfg
        c = spec.dictionary
        x = batch[c.hook_in].to(self.device, non_blocking=True).float() * m.scale_in
        y = x if c.is_sae else batch[c.hook_out].to(self.device, non_blocking=True).float() * m.scale_out
        dead = m.tokens_since_fired >= cfg.dead_tokens
        l1 = spec.l1_coefficient
        if c.architecture == "relu":
            warm = spec.l1_warmup_steps if spec.l1_warmup_steps is not None else max(1, cfg.n_steps // 20)
            l1 = l1 * min(1.0, (step + 1) / warm)
        lr = spec.learning_rate * cfg.lr_factor(step)
        for g in m.optimizer.param_groups:
            g["lr"] = lr
        ctx = (torch.autocast(self.device.type, dtype=torch.bfloat16) if cfg.dtype == "bfloat16"
               else contextlib.nullcontext())
        par = self.layout
        rows = cfg.batch_tokens if par is not None else x.shape[0]  # the global batch's rows
        sharded = par is not None and par.tp_size > 1
        with ctx:
            kw = dict(l1_coefficient=l1, l0_coefficient=spec.l0_coefficient, aux_coefficient=spec.aux_coefficient,
                      dead=dead, k_aux=spec.k_aux)
            if sharded:
                out = compute_loss_sharded(d, x, y, par, k=c.k, batch_rows=rows, **kw)
            else:
                out = compute_loss(d, x, y, batch_rows=rows if par is not None else None, dist=par, **kw)
        total = out.total.detach()
        if par is not None:  # every rank must see a divergence, or the others wait on its collective
            total = par.over_all(f"{spec.name}: the loss all-reduce", total.double().reshape(1))[0]
        if not torch.isfinite(total):
            raise TrainingDivergedError(
                f"dictionary {spec.name!r}: the loss is {float(total)} at step {step} (terms "
                f"{ {k: float(v) for k, v in out.terms.items()} }). Lower its lr, use dtype='float32', or check the "
                f"activations; the last checkpoint ({self.latest_checkpoint()}) is intact."
            )
        m.optimizer.zero_grad(set_to_none=True)
        out.total.backward()
        if par is not None and par.dp_size > 1:
            all_reduce_gradients(list(d.parameters()), par, spec.name, par.dp_group)
        unit_decoder = c.architecture != "relu"
        if unit_decoder:
            d.remove_parallel_decoder_grad()
        if cfg.grad_clip_norm is not None:
            if sharded:
                clip_grad_norm_sharded(d, cfg.grad_clip_norm, par)
            else:
                torch.nn.utils.clip_grad_norm_(d.parameters(), cfg.grad_clip_norm)
        m.optimizer.step()
        with torch.no_grad():
            if unit_decoder:
                d.normalize_decoder()
            if c.architecture == "jumprelu":
                d.threshold.clamp_(min=1e-6)
            m.tokens_since_fired += rows
            fired = out.fired()
            if par is not None:  # fired on any replica's rows
                fired = par.over_dp(f"{spec.name}: the fired-latents all-reduce", fired.to(torch.uint8),
                                    torch.distributed.ReduceOp.MAX).bool()
            m.tokens_since_fired[fired] = 0
            if c.architecture == "batchtopk":  # threshold for inference: EMA of the smallest kept activation
                acts = out.acts.detach()
                pos = acts[acts > 0]
                mn = float(pos.min()) if pos.numel() else math.inf
                if par is not None:
                    mn = float(par.over_all(f"{spec.name}: the threshold all-reduce",
                                            torch.tensor([mn], dtype=torch.float64, device=self.device),
                                            torch.distributed.ReduceOp.MIN)[0])
                if math.isfinite(mn):
                    m.threshold_ema = mn if m.threshold_ema is None else 0.99 * m.threshold_ema + 0.01 * mn
                    d.threshold.fill_(m.threshold_ema)
            if par is None:
                var = (y - y.mean(0)).pow(2).sum()
                fvu = float((out.recons.float() - y).pow(2).sum() / var) if var > 0 else float("nan")
                l0 = out.l0()
                row = {k: float(v.detach()) for k, v in out.terms.items()}
                row["loss"] = float(out.total.detach())
            else:
                row, fvu, l0 = self._global_metrics(out, y, rows, spec.name)
        n_dead = dead.sum().double().reshape(1)
        if sharded:  # this rank's shard holds d_sae / tp of the latents
            par.over_tp(f"{spec.name}: the dead-latent count all-reduce", n_dead)
        row.update(fvu=fvu, l0=l0, dead_fraction=float(n_dead[0]) / c.d_sae, lr=lr)
        return row

    def _global_metrics(self, out, y: Tensor, rows: int, name: str) -> tuple[dict[str, float], float, float]:
        """The loss terms, FVU (around the global batch's mean) and L0 of the whole batch, from every rank's part."""
        par = self.layout  # terms and reconstructions are whole on each shard: summed over replicas only
        mean = par.over_dp(f"{name}: the metrics' mean all-reduce", y.double().sum(0)) / rows
        keys = list(out.terms)  # the same order on every rank
        act = out.acts.detach() > 0 if out.dense_acts is not None else out.top_vals.detach() > 0
        vec = torch.stack([out.terms[k].detach().double() for k in keys] + [
            out.total.detach().double(),
            (y.double() - mean).pow(2).sum(),
            (out.recons.double() - y.double()).pow(2).sum()])
        par.over_dp(f"{name}: the metrics' all-reduce", vec)
        l0 = par.over_all(f"{name}: the L0 all-reduce", act.sum().double().reshape(1)) / rows
        row = {k: float(v) for k, v in zip(keys, vec)}
        row["loss"] = float(vec[len(keys)])
        var, sse = (float(v) for v in vec[len(keys) + 1:])
        return row, (sse / var if var > 0 else float("nan")), float(l0)

    # -- the loop ----------------------------------------------------------------------------
    def fit(self, source, *, resume: bool = False) -> dict[str, SparseDictionary]:
        """Train to ``cfg.n_tokens`` and save each dictionary to ``out_dir/<name>``.

        Args:
            source: :class:`~mechscope.data.ShardedActivations` (harvested shards),
                :class:`~mechscope.data.ActivationStream`, or a callable ``start_step -> iterator`` of
                ``{hook: Tensor[batch_tokens, d]}`` dicts.
            resume: continue from the newest checkpoint in ``out_dir`` (an error if there is none).

        Returns:
            name -> trained dictionary (eval mode, normalisation folded in, as saved; on every rank of a
            data-parallel job, rank 0 alone saving).

        Raises:
            InputError: see the class; also a source that runs out before ``n_tokens``.
            TrainingDivergedError: NaN/inf in an input batch or in the loss.
            DiskFullError: the disk filled up while checkpointing (earlier checkpoints intact).
        """
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        members = [self._new_member(s) for s in self.specs]
        metrics_path = self.out / "metrics.jsonl"
        latest = self.latest_checkpoint()
        if resume:
            if latest is None:
                raise InputError(f"resume=True but {self.ckpt_dir} has no checkpoint; nothing would be resumed. "
                                 "Start without resume (and set checkpoint_every_steps to make checkpoints).")
            start = self._load_checkpoint(latest, members)
        elif latest is not None or metrics_path.exists():
            raise InputError(f"{self.out} already holds a training run; pass resume=True (CLI: --resume) to "
                             "continue it, or choose a new folder.")
        self._agree(start if resume else 0)  # every rank has checked the folder before rank 0 writes to it
        if resume:
            if self.is_main:
                self._truncate_metrics(metrics_path, start)
        else:
            self._estimate_scales(source, members)
            start = 0
        if self.is_main:
            write_json_atomic(self._run_record(), self.out / "run.json")
        wandb_run = self._wandb() if self.is_main else None
        t0 = time.perf_counter()
        it = _batches(source, cfg, start, self.layout)
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.n_steps, initial=start, unit="step", desc="training",
                   disable=not (self.progress and self.is_main))
        step = start
        log_file = open(metrics_path, "a", encoding="utf-8") if self.is_main else contextlib.nullcontext()
        try:
            with log_file as log:
                while step < cfg.n_steps:
                    try:
                        batch = next(it)
                    except StopIteration:
                        raise InputError(
                            f"the activation source ran out after {step} steps ({step * cfg.batch_tokens} tokens); "
                            f"n_tokens={cfg.n_tokens} needs {cfg.n_steps} steps. Harvest more tokens or lower n_tokens."
                        ) from None
                    self._check_batch(batch, step)
                    rows = [self._step(m, batch, step) for m in members]
                    step += 1
                    if self.is_main and (step % cfg.log_every_steps == 0 or step == cfg.n_steps):
                        for m, r in zip(members, rows):
                            line = {"step": step, "tokens": step * cfg.batch_tokens, "name": m.spec.name, **r}
                            log.write(json.dumps(line) + "\n")
                            if wandb_run is not None:
                                wandb_run.log({f"{m.spec.name}/{k}": v for k, v in r.items()}, step=step)
                        log.flush()
                        r = rows[0]
                        bar.set_postfix(fvu=f"{r['fvu']:.3f}", l0=f"{r['l0']:.1f}", dead=f"{r['dead_fraction']:.2f}")
                    bar.update(1)
                    if cfg.checkpoint_every_steps and step % cfg.checkpoint_every_steps == 0 and step < cfg.n_steps:
                        self._save_checkpoint(members, step)
                    if self.on_step is not None:
                        self.on_step(step)
        finally:
            bar.close()
            if wandb_run is not None:
                wandb_run.finish()
        elapsed = time.perf_counter() - t0
        if start < step:
            self._save_checkpoint(members, step)  # the final state, before folding (a later resume is a no-op)
        results = {}
        for m in members:
            d = m.dictionary
            if self.layout is not None and self.layout.tp_size > 1:  # the whole dictionary, from every shard
                d = gather_dictionary(d, m.spec.dictionary, self.layout)
            d = d.cpu()  # results and files on the CPU, whatever the training device
            d.eval()
            d.fold_scaling(m.scale_in, m.scale_out)
            if d.cfg.architecture == "batchtopk":
                d.batchtopk_use_threshold = True
            meta = dict(d.cfg.metadata, training_tokens=cfg.n_steps * cfg.batch_tokens, seed=cfg.seed,
                        train_seconds=round(elapsed, 1), resumed_from_step=start or None)
            d.cfg = d.cfg.replace(metadata=meta)
            if self.is_main:
                save_dictionary(d, self.out / m.spec.name)
            results[m.spec.name] = d
        if not self.is_main:
            return results
        try:
            from mechscope.training.curves import write_training_curves

            write_text_atomic(write_training_curves(metrics_path), self.out / "training_curves.html")
        except ImportError:  # pragma: no cover - plotly is a dependency
            pass
        return results

    def _agree(self, start: int) -> None:
        """Every rank starts from the same step (they read the same checkpoint), or all stop with the numbers."""
        if self.layout is None:
            return
        from mechscope.scale.dist import guarded

        got = torch.empty(self.layout.info.world_size, dtype=torch.int64, device=self.device)
        guarded(self.layout.info, "the training start-up all-gather", torch.distributed.all_gather_single, got,
                torch.tensor([start], dtype=torch.int64, device=self.device))
        if len(set(got.tolist())) > 1:
            raise InputError(f"the ranks would resume from different steps {got.tolist()} (rank r's is entry r): "
                             f"they do not see the same {self.ckpt_dir}. Put out_dir on storage every node shares.")

    @staticmethod
    def _check_batch(batch: dict[str, Tensor], step: int) -> None:
        for hook, x in batch.items():
            if x.is_floating_point() and not torch.isfinite(x).all():
                bad = int((~torch.isfinite(x)).any(-1).sum())
                raise TrainingDivergedError(
                    f"the activations of {hook} in batch {step} contain NaN/inf ({bad} rows). The model overflowed "
                    "in its dtype (use bfloat16 or float32, not float16) or the harvested shards are damaged "
                    "(re-harvest them)."
                )

    @staticmethod
    def _truncate_metrics(path: Path, step: int) -> None:
        """Drop metric lines written after the checkpoint being resumed (they will be written again)."""
        if not path.exists():
            return
        keep = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()
                and json.loads(ln)["step"] <= step]
        write_text_atomic("".join(ln + "\n" for ln in keep), path)

    def _wandb(self):
        if not self.cfg.wandb_project:
            return None
        try:
            import wandb
        except ImportError:
            raise InputError("wandb_project is set but wandb is not installed: pip install wandb, or drop it.") from None
        return wandb.init(project=self.cfg.wandb_project, config=self._run_record(), dir=str(self.out),
                          mode=os.environ.get("WANDB_MODE", "online"))


def train(specs: DictionarySpec | Sequence[DictionarySpec], cfg: TrainConfig, source, out_dir: str | Path, *,
          resume: bool = False, progress: bool = True) -> dict[str, SparseDictionary]:
    """Train dictionaries from an activation source; see :class:`Trainer` and :meth:`Trainer.fit`."""
    if isinstance(specs, DictionarySpec):
        specs = [specs]
    return Trainer(specs, cfg, out_dir, progress=progress).fit(source, resume=resume)
