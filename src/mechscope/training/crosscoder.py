"""Training crosscoders and diff-SAEs for model diffing, and collecting the paired activations both read.

- :func:`paired_activations`: the activations of two models at one site on the same tokens, row-aligned.
- :func:`train_crosscoder`: a BatchTopK crosscoder (:class:`~mechscope.dictionaries.crosscoder.Crosscoder`)
  from paired tensors or a batch callable; Adam, warm-up and decay, joint unit-norm decoders, AuxK.
- :func:`train_diff_sae`: a standard mechscope SAE (the :class:`~mechscope.training.Trainer`) on
  ``a_tuned - a_base``.

Letter key: B rows, M models, D d_in, S d_sae.

Loss of one batch (the SparseDictionary convention, summed over models)::

    mse_m = mean_rows ||x[:, m] - x_hat[:, m]||^2,   loss = sum_m mse_m (+ aux_coefficient * AuxK)

AuxK (Gao et al. 2024, appendix A.2): the ``k_aux`` largest pre-activations among dead latents decode
(without bias) the detached residual of every model, weighted by ``min(n_dead / k_aux, 1)``.

References:
    Lindsey et al. 2024, "Sparse Crosscoders"; Minder et al. 2025, arXiv 2504.02922 (BatchTopK crosscoder;
    section 4); Bussmann et al. 2024 (BatchTopK threshold); Aranguri et al. 2025 and Minder et al. 2025
    discuss SAEs on activation differences ("diff-SAEs").
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor

from mechscope.core.errors import InputError
from mechscope.core.padding import right_pad
from mechscope.dictionaries.crosscoder import Crosscoder, CrosscoderConfig, stack_models
from mechscope.training.trainer import TrainingDivergedError


@dataclass(frozen=True)
class CrosscoderTrainConfig:
    """The schedule of one crosscoder run.

    Attributes:
        n_steps: optimizer steps.
        batch_rows: rows (tokens) per step.
        lr: Adam learning rate; None picks ``2e-4 / sqrt(d_sae / 2**14)`` as the SAE trainer does.
        lr_warmup_steps: linear warm-up from 0; None = 1% of the steps (at least 1).
        lr_decay_fraction: linear decay to 0 over this final fraction of the steps.
        adam_betas: Adam's betas.
        aux_coefficient: weight of the AuxK dead-latent loss (0 disables it).
        k_aux: dead latents used by AuxK; None = d_in // 2.
        dead_after_rows: a latent silent for this many rows is dead; None = min(10M, n_steps * batch_rows // 5).
        normalize_inputs: scale every model's activations by one factor so their mean norm is sqrt(d_in);
            folded into the weights at the end (one factor, so relative decoder norms are unchanged).
        seed: initialisation and row order.
        same_init: start each latent's decoders as one direction shared by every model
            (:meth:`Crosscoder.initialize`); False draws them independently.
        log_every_steps: steps between entries of the history.
        eval_rows: rows on which the final FVU is measured (inference threshold, eval mode).
    """

    n_steps: int
    batch_rows: int = 1024
    lr: float | None = None
    lr_warmup_steps: int | None = None
    lr_decay_fraction: float = 0.2
    adam_betas: tuple[float, float] = (0.9, 0.999)
    aux_coefficient: float = 1 / 32
    k_aux: int | None = None
    dead_after_rows: int | None = None
    normalize_inputs: bool = True
    seed: int = 0
    same_init: bool = True
    log_every_steps: int = 10
    eval_rows: int = 16384

    def __post_init__(self):
        for f in ("n_steps", "batch_rows", "log_every_steps", "eval_rows"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise InputError(f"{f} must be a positive int, got {v!r}.")
        if self.lr is not None and not self.lr > 0:
            raise InputError(f"lr must be > 0, got {self.lr}.")
        if not 0 <= self.lr_decay_fraction <= 1:
            raise InputError(f"lr_decay_fraction must be in [0, 1], got {self.lr_decay_fraction}.")
        if not self.aux_coefficient >= 0:
            raise InputError(f"aux_coefficient must be >= 0, got {self.aux_coefficient}.")
        object.__setattr__(self, "adam_betas", tuple(self.adam_betas))

    def learning_rate(self, d_sae: int) -> float:
        return self.lr if self.lr is not None else 2e-4 / math.sqrt(d_sae / 2**14)

    def lr_factor(self, step: int) -> float:
        """Multiplier of the learning rate at ``step`` (0-based): linear warm-up, flat, linear decay to 0."""
        warm = self.lr_warmup_steps if self.lr_warmup_steps is not None else max(1, self.n_steps // 100)
        if step < warm:
            return (step + 1) / warm
        decay = int(self.n_steps * self.lr_decay_fraction)
        if decay and step >= self.n_steps - decay:
            return max(0.0, (self.n_steps - step) / decay)
        return 1.0


@dataclass
class CrosscoderTrainResult:
    """A trained crosscoder and how training went.

    Attributes:
        crosscoder: eval mode, inference threshold on, input scale folded in (reads raw activations).
        history: one dict every ``log_every_steps``: ``step, loss, mse.<model>, fvu.<model>, aux, l0,
            dead_fraction, lr`` (training-batch values, normalised units; FVU is dimensionless).
        fvu: model name -> fraction of variance unexplained of the final crosscoder on up to ``eval_rows``
            rows (inference threshold), 0 is perfect.
        l0: mean active latents per row on those rows (inference threshold).
        seconds: wall time of the training loop.
        scale: the input scale used while training (folded into the weights).
    """

    crosscoder: Crosscoder
    history: list[dict[str, float | int]] = field(default_factory=list)
    fvu: dict[str, float] = field(default_factory=dict)
    l0: float = float("nan")
    seconds: float = 0.0
    scale: float = 1.0


def _as_rows(data, n_models: int) -> Tensor:
    """Paired activations as one ``[N, M, D]`` tensor: from a tuple/list of ``[N, D]`` tensors (base first)
    or an already stacked tensor."""
    if isinstance(data, Tensor):
        if data.dim() != 3 or data.shape[1] != n_models:
            raise InputError(f"stacked paired activations must be [rows, n_models={n_models}, d_in], got "
                             f"{tuple(data.shape)}; or pass (base_acts, tuned_acts) as [rows, d_in] each.")
        return data
    if isinstance(data, (tuple, list)) and all(isinstance(t, Tensor) for t in data):
        if len(data) != n_models:
            raise InputError(f"got activations of {len(data)} models but the crosscoder has {n_models}.")
        return stack_models(*data)
    raise InputError(f"cannot train from a {type(data).__name__}: pass (base_acts, tuned_acts) tensors [rows, d_in], "
                     "a stacked tensor [rows, n_models, d_in], or a callable step -> [batch_rows, n_models, d_in].")


def _aux_loss(cc: Crosscoder, pre: Tensor, residual: Tensor, dead: Tensor, k_aux: int) -> Tensor:
    """AuxK over every model's residual (see the module docstring); 0 when no latent is dead."""
    n_dead = int(dead.sum())
    if n_dead == 0:
        return pre.new_zeros(())
    dead_idx = dead.nonzero().squeeze(1)
    top = pre[:, dead_idx].topk(min(k_aux, n_dead), dim=-1, sorted=False)
    acts = torch.zeros(pre.shape[0], n_dead, dtype=pre.dtype, device=pre.device).scatter(-1, top.indices,
                                                                                        top.values.relu())
    e_hat = torch.einsum("bs,msd->bmd", acts, cc.W_dec[:, dead_idx])
    return min(n_dead / k_aux, 1.0) * (e_hat - residual).pow(2).sum(-1).mean(0).sum()


def crosscoder_loss(cc: Crosscoder, x: Float[Tensor, "rows n_models d_in"]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(mse [M], recons [B, M, D], pre [B, S], acts [B, S])`` of one batch: ``mse[m] = mean_b ||x - x_hat||^2``.

    The training loss is ``mse.sum()`` (plus AuxK in :func:`train_crosscoder`).
    """
    pre = cc.encode_pre(x)
    acts = cc.activate(pre)
    recons = cc.decode(acts)
    mse = (recons - x.to(recons.dtype)).pow(2).sum(-1).mean(0)
    return mse, recons, pre, acts


def _fvu(x: Tensor, recons: Tensor) -> Tensor:
    """Per model: ``sum ||x - x_hat||^2 / sum ||x - mean(x)||^2`` ([M])."""
    var = (x - x.mean(0)).pow(2).sum((0, 2))
    return (recons - x).pow(2).sum((0, 2)) / var.clamp_min(1e-30)


def train_crosscoder(data, cfg: CrosscoderConfig, train_cfg: CrosscoderTrainConfig, *, progress: bool = True,
                     device=None) -> CrosscoderTrainResult:
    """Train a BatchTopK crosscoder on paired activations.

    Args:
        data: ``(base_acts, tuned_acts)`` as ``[rows, d_in]`` tensors of the same rows (from
            :func:`paired_activations`), a stacked ``[rows, n_models, d_in]`` tensor, or a callable
            ``step -> [batch_rows, n_models, d_in]`` that streams batches (called with 0, 1, 2, ...).
        cfg: the crosscoder's configuration (``d_in`` must match the activations).
        train_cfg: the schedule.
        progress: a tqdm progress bar.
        device: where to train (default: the data's device, CPU for a callable).

    Returns:
        :class:`CrosscoderTrainResult` (the crosscoder reads raw activations).

    Raises:
        InputError: activations of different shapes for the two models, the wrong number of
            models, a width other than ``cfg.d_in``, or fewer rows than one batch.
        TrainingDivergedError: NaN/inf in the activations or the loss.

    References:
        Minder et al. 2025, arXiv 2504.02922, section 4 (BatchTopK crosscoder); Gao et al. 2024, appendix A.2
        (AuxK) and section 2.4 (unit-norm decoders, parallel gradient removed).
    """
    from tqdm.auto import tqdm

    M, D, S = cfg.n_models, cfg.d_in, cfg.d_sae
    if callable(data) and not isinstance(data, Tensor):
        rows = None
        fetch = data
        sample = fetch(0)
        if not isinstance(sample, Tensor) or sample.dim() != 3 or tuple(sample.shape[1:]) != (M, D):
            raise InputError(f"the batch callable must return [batch_rows, n_models={M}, d_in={D}], got "
                             f"{tuple(sample.shape) if isinstance(sample, Tensor) else type(sample).__name__}.")
        device = device if device is not None else "cpu"
    else:
        rows = _as_rows(data, M)
        if rows.shape[-1] != D:
            raise InputError(f"the activations have d_in={rows.shape[-1]} but the crosscoder config says d_in={D}.")
        if rows.shape[0] < train_cfg.batch_rows:
            raise InputError(f"{rows.shape[0]} rows are fewer than one batch (batch_rows={train_cfg.batch_rows}); "
                             "collect more tokens or lower batch_rows.")
        device = device if device is not None else rows.device
        sample = rows[: max(train_cfg.batch_rows, min(rows.shape[0], 65536))]
    sample = sample.float()
    if not torch.isfinite(sample).all():
        raise TrainingDivergedError("the paired activations contain NaN/inf; check the models' dtype (fp16 overflows) "
                                    "and the harvested rows.")
    scale = math.sqrt(D) / float(sample.norm(dim=-1).mean()) if train_cfg.normalize_inputs else 1.0

    g = torch.Generator(device="cpu").manual_seed(train_cfg.seed)
    queue = torch.empty(0, dtype=torch.long)  # row indices still to visit: epochs of seeded permutations

    def batch_at(step: int) -> Tensor:
        if rows is None:
            x = fetch(step)
            if not isinstance(x, Tensor) or tuple(x.shape[1:]) != (M, D):
                raise InputError(f"batch {step} from the callable has shape "
                                 f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}; expected "
                                 f"[batch_rows, {M}, {D}].")
            return x.to(device).float()
        nonlocal queue
        while queue.numel() < train_cfg.batch_rows:
            queue = torch.cat([queue, torch.randperm(rows.shape[0], generator=g)])
        take, queue = queue[:train_cfg.batch_rows], queue[train_cfg.batch_rows:]
        return rows[take.to(rows.device)].to(device).float()

    cc = Crosscoder(cfg, device=device).initialize(train_cfg.seed, same_init=train_cfg.same_init)
    with torch.no_grad():  # b_dec starts at each model's mean, so the latents explain deviations
        cc.b_dec.copy_((sample.mean(0) * scale).to(cc.b_dec))
    cc.train()
    lr = train_cfg.learning_rate(S)
    opt = torch.optim.Adam(cc.parameters(), lr=lr, betas=train_cfg.adam_betas)
    k_aux = train_cfg.k_aux or max(1, D // 2)
    dead_rows = (train_cfg.dead_after_rows if train_cfg.dead_after_rows is not None
                 else min(10_000_000, train_cfg.n_steps * train_cfg.batch_rows // 5))
    since_fired = torch.zeros(S, dtype=torch.long, device=device)
    threshold_ema: float | None = None
    history: list[dict[str, float | int]] = []
    t0 = time.perf_counter()
    bar = tqdm(range(train_cfg.n_steps), unit="step", desc="crosscoder", disable=not progress)
    for step in bar:
        x = batch_at(step) * scale
        if not torch.isfinite(x).all():
            raise TrainingDivergedError(f"batch {step} of the paired activations contains NaN/inf.")
        for group in opt.param_groups:
            group["lr"] = lr * train_cfg.lr_factor(step)
        dead = since_fired >= dead_rows
        mse, recons, pre, acts = crosscoder_loss(cc, x)
        loss = mse.sum()
        aux = pre.new_zeros(())
        if train_cfg.aux_coefficient and bool(dead.any()):
            aux = train_cfg.aux_coefficient * _aux_loss(cc, pre, (x - recons).detach(), dead, k_aux)
            loss = loss + aux
        if not torch.isfinite(loss):
            raise TrainingDivergedError(f"the crosscoder loss is {float(loss)} at step {step}; lower lr.")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        cc.remove_parallel_decoder_grad()
        opt.step()
        with torch.no_grad():
            cc.normalize_decoder()
            fired = (acts > 0).any(0)
            since_fired += x.shape[0]
            since_fired[fired] = 0
            pos = acts[acts > 0]
            if pos.numel():
                mn = float(pos.min())
                threshold_ema = mn if threshold_ema is None else 0.99 * threshold_ema + 0.01 * mn
            if (step + 1) % train_cfg.log_every_steps == 0 or step + 1 == train_cfg.n_steps:
                fvu = _fvu(x, recons)
                row = {"step": step + 1, "loss": float(loss), "aux": float(aux), "lr": lr * train_cfg.lr_factor(step),
                       "l0": float((acts > 0).float().sum(-1).mean()), "dead_fraction": float(dead.float().mean())}
                for m, name in enumerate(cfg.models):
                    row[f"mse.{name}"] = float(mse[m])
                    row[f"fvu.{name}"] = float(fvu[m])
                history.append(row)
                bar.set_postfix({f"fvu.{n}": f"{float(fvu[m]):.3f}" for m, n in enumerate(cfg.models)})
    bar.close()
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        cc.threshold.fill_(threshold_ema if threshold_ema is not None else 0.0)
        cc.eval()
        cc.use_threshold = True
        cc.fold_scaling(scale)
        cc.cfg = cfg.replace(metadata=dict(cfg.metadata, training_rows=train_cfg.n_steps * train_cfg.batch_rows,
                                           seed=train_cfg.seed, train_seconds=round(seconds, 2)))
        ev = (rows[: train_cfg.eval_rows] if rows is not None else batch_at(train_cfg.n_steps)).to(device).float()
        acts = cc.encode(ev)
        fvu = _fvu(ev, cc.decode(acts))
    return CrosscoderTrainResult(cc, history, {n: float(fvu[m]) for m, n in enumerate(cfg.models)},
                                 float((acts > 0).float().sum(-1).mean()), seconds, scale)


# -- paired activations ------------------------------------------------------------------------
@dataclass
class PairedActivations:
    """Two models' activations at one site on the same tokens (padding dropped), row-aligned.

    Attributes:
        site: the hook name.
        base, tuned: float32 ``[rows, d]``; row i of each is the same token of the same document.
        doc: int64 ``[rows]``, index of the row's document in the inputs.
        pos: int64 ``[rows]``, the row's position in its document.
        tokens: each document's token ids (int64 ``[pos]``), for contexts.
    """

    site: str
    base: Tensor
    tuned: Tensor
    doc: Tensor
    pos: Tensor
    tokens: list[Tensor]

    def __len__(self) -> int:
        return int(self.doc.numel())

    @property
    def diff(self) -> Tensor:
        """``tuned - base``, ``[rows, d]``."""
        return self.tuned - self.base

    def stacked(self) -> Tensor:
        """``[rows, 2, d]``, base first: a crosscoder's input."""
        return stack_models(self.base, self.tuned)


def _tokenize(model, texts, max_tokens: int | None, prepend_bos: bool | None) -> list[Tensor]:
    out = []
    for i, t in enumerate(texts):
        if isinstance(t, str):  # as HookedModel.to_tokens, but truncated before its context-length check
            tok = model._need_tokenizer()
            ids = tok(t, add_special_tokens=prepend_bos is not False)["input_ids"]
            if prepend_bos and tok.bos_token_id is not None and (not ids or ids[0] != tok.bos_token_id):
                ids = [tok.bos_token_id] + ids
            ids = torch.tensor(ids, dtype=torch.long)
        elif isinstance(t, Tensor) and t.dim() == 1 and not t.is_floating_point():
            ids = t.long().cpu()
        else:
            raise InputError(f"input {i} is a {type(t).__name__}; pass texts (str) or 1-D integer token id tensors.")
        if max_tokens is not None:
            ids = ids[:max_tokens]
        if ids.numel() == 0:
            raise InputError(f"input {i} has no tokens; drop empty texts.")
        out.append(ids)
    return out


@torch.no_grad()
def paired_activations(base, tuned, texts: Sequence[str] | Sequence[Tensor], site: str, *,
                       batch_size: int = 8, max_tokens: int | None = 128, prepend_bos: bool | None = None,
                       skip_first: int = 0, progress: bool = True) -> PairedActivations:
    """Run two models on the same token batches and keep both activations at ``site`` for every real token.

    Texts are tokenized once, with ``base``'s tokenizer (the models must share a vocabulary: a fine-tune and
    its base do), sorted by length and right-padded; the attention mask hides the padding and padded
    positions are dropped, so each row is the activation of a real token in its own unpadded context (in a
    causal model the padding after a sequence never reaches it).

    Args:
        base, tuned: HookedModels (base first).
        texts: strings, or 1-D int64 token id tensors (used as given).
        site: one hook with one vector per position, e.g. ``blocks.6.hook_resid_post``.
        batch_size: documents per forward.
        max_tokens: truncate each document to this many tokens (None: no truncation).
        prepend_bos: see ``HookedModel.to_tokens``.
        skip_first: drop the first this-many positions of every document (e.g. 1 for BOS, whose activation is
            huge and the same everywhere).
        progress: a progress bar.

    Returns:
        :class:`PairedActivations` with rows in document order, then position order.

    Raises:
        InputError: no texts, an empty text, models with different vocabularies or widths at ``site``, a site
            that is not ``[batch, pos, d]``, or NaN/inf activations.
        HookNameError: a site a model does not have.
    """
    from tqdm.auto import tqdm

    if len(texts) == 0:
        raise InputError("no texts to collect activations on; pass at least one.")
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}.")
    if base.cfg.d_vocab != tuned.cfg.d_vocab:
        raise InputError(f"the models have different vocabularies ({base.cfg.d_vocab} vs {tuned.cfg.d_vocab} tokens); "
                         "model diffing compares a model with its fine-tune on the same tokens.")
    (name,) = base.resolve([site])
    tuned.resolve([site])
    docs = _tokenize(base, texts, max_tokens, prepend_bos)
    order = sorted(range(len(docs)), key=lambda i: docs[i].numel())
    per_doc: dict[int, tuple[Tensor, Tensor]] = {}
    starts = range(0, len(docs), batch_size)
    for s in tqdm(starts, desc="paired activations", unit="batch", disable=not progress or len(starts) < 2):
        idx = order[s:s + batch_size]
        ids, attn = right_pad([docs[i] for i in idx])
        values = []
        for model in (base, tuned):
            v = model.run(ids.to(model.device), cache=[name], attention_mask=attn.to(model.device),
                          logits_to_keep=1).cache[name]
            if v.dim() != 3:
                raise InputError(f"site {name} has shape {tuple(v.shape)}; paired activations need one vector per "
                                 "position ([batch, pos, d]), e.g. blocks.L.hook_resid_post.")
            values.append(v.float().cpu())
        if values[0].shape != values[1].shape:
            raise InputError(f"the models' activations at {name} differ in shape ({tuple(values[0].shape)} vs "
                             f"{tuple(values[1].shape)}); a crosscoder needs the same site width in both.")
        for j, i in enumerate(idx):
            n = docs[i].numel()
            per_doc[i] = (values[0][j, skip_first:n], values[1][j, skip_first:n])
    b = torch.cat([per_doc[i][0] for i in range(len(docs))])
    t = torch.cat([per_doc[i][1] for i in range(len(docs))])
    if b.shape[0] == 0:
        raise InputError(f"no rows left: every document has at most skip_first={skip_first} tokens.")
    for what, a in (("base", b), ("tuned", t)):
        bad = int((~torch.isfinite(a)).any(-1).sum())
        if bad:
            raise InputError(f"{bad} rows of the {what} model's activations at {name} are NaN/inf; load it in "
                             "float32 or bfloat16 (fp16 overflows).")
    doc = torch.cat([torch.full((max(0, docs[i].numel() - skip_first),), i, dtype=torch.long) for i in range(len(docs))])
    pos = torch.cat([torch.arange(skip_first, max(skip_first, docs[i].numel())) for i in range(len(docs))])
    return PairedActivations(name, b, t, doc, pos, docs)


# -- diff-SAE --------------------------------------------------------------------------------
def train_diff_sae(base_acts: Float[Tensor, "_rows _d"], tuned_acts: Float[Tensor, "_rows _d"], *, d_sae: int,
                   k: int = 8, architecture: str = "topk", n_steps: int = 1000, batch_rows: int = 1024,
                   lr: float | None = None, seed: int = 0, hook: str = "diff", out_dir: str | Path | None = None,
                   progress: bool = True):
    """Train a standard mechscope SAE on the activation difference ``tuned - base`` (a "diff-SAE").

    The SAE is a :class:`~mechscope.dictionaries.SparseDictionary` trained by the usual
    :class:`~mechscope.training.Trainer` (normalisation, AuxK, unit-norm decoders, checkpoints). Its
    ``hook_in`` is a label for the difference, not a site to splice it into: its metadata says
    ``input: "tuned - base"``. Rows are drawn by a seeded permutation per epoch.

    Args:
        base_acts, tuned_acts: ``[rows, d]`` of the same tokens (from :func:`paired_activations`).
        d_sae, k, architecture: the SAE (``k`` only for topk/batchtopk).
        n_steps, batch_rows, lr, seed: the schedule (``lr`` None: the trainer's default for ``d_sae``).
        hook: the label stored as the SAE's ``hook_in`` (e.g. ``"blocks.6.hook_resid_post.diff"``).
        out_dir: the run folder (None: a temporary folder, removed afterwards).

    Returns:
        The trained :class:`~mechscope.dictionaries.SparseDictionary` (eval mode, reads raw differences).

    Raises:
        InputError: the two tensors differ in shape.
        InputError: fewer rows than one batch, or a bad SAE configuration (k > d_sae, ...).
    """
    from mechscope.dictionaries import DictionaryConfig
    from mechscope.training.config import DictionarySpec, TrainConfig
    from mechscope.training.trainer import train

    if base_acts.shape != tuned_acts.shape or base_acts.dim() != 2:
        raise InputError(f"base and tuned activations must be [rows, d] of one shape (the same tokens), got "
                         f"{tuple(base_acts.shape)} and {tuple(tuned_acts.shape)}.")
    diff = (tuned_acts.float() - base_acts.float()).cpu()
    n = diff.shape[0]
    if n < batch_rows:
        raise InputError(f"{n} rows are fewer than one batch (batch_rows={batch_rows}); collect more tokens or "
                         "lower batch_rows.")
    cfg = DictionaryConfig(architecture=architecture, d_in=diff.shape[1], d_sae=d_sae, hook_in=hook,
                           k=k if architecture in ("topk", "batchtopk") else None,
                           metadata={"input": "tuned - base", "kind": "diff-sae"})
    spec = DictionarySpec(name="diff_sae", dictionary=cfg, lr=lr)
    tcfg = TrainConfig(n_tokens=n_steps * batch_rows, batch_tokens=batch_rows, seed=seed,
                       log_every_steps=max(1, n_steps // 100))

    def source(start: int):  # batch t is a pure function of t: epoch e uses permutation seed + e
        per_epoch = n // batch_rows
        t = start
        perms: dict[int, Tensor] = {}
        while True:
            epoch, i = divmod(t, per_epoch)
            if epoch not in perms:
                perms.clear()
                perms[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
            perm = perms[epoch]
            yield {hook: diff[perm[i * batch_rows:(i + 1) * batch_rows]]}
            t += 1

    if out_dir is not None:
        return train(spec, tcfg, source, out_dir, progress=progress)["diff_sae"]
    with tempfile.TemporaryDirectory(prefix="diff-sae-") as tmp:
        return train(spec, tcfg, source, Path(tmp) / "run", progress=progress)["diff_sae"]


__all__ = [
    "CrosscoderTrainConfig",
    "CrosscoderTrainResult",
    "PairedActivations",
    "crosscoder_loss",
    "paired_activations",
    "train_crosscoder",
    "train_diff_sae",
]

