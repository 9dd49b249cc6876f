"""Evaluating a sparse dictionary on held-out text: reconstruction, sparsity, and the model's loss with the
dictionary spliced in.

Definitions (../shared/REFERENCE.md, "Metric definitions"):

- **L0**: mean number of non-zero latents per token.
- **FVU**: sum of squared reconstruction error / sum of squared deviation of the target from its mean,
  over tokens and features, with the whole evaluation set as the batch. Explained variance = 1 - FVU.
  (Relative to the mean, not to zero: measuring against zero inflates explained variance.) Also given:
  ``fvu_batch_mean``, the mean of the same ratio over forward batches; and ``fvu_without_outliers``,
  pooled over the tokens whose target norm is at most ``outlier_factor`` x the batch's median norm.
  Some models have rare "massive activations" (on SmolLM2's residual stream, ~0.03% of tokens with
  norms ~100x the median hold ~80% of the variance): they dominate FVU, and a dictionary that
  reconstructs them gets a low FVU whatever it does elsewhere, so read both.
- **MSE**: mean squared error per element (activation units squared).
- **cosine similarity**: mean over tokens of cos(target, reconstruction).
- **CE loss recovered**: (CE_zero_ablation - CE_with_dictionary) / (CE_zero_ablation - CE_clean), where
  the dictionary's output (or zeros) replaces ``hook_out``; **delta LM loss** = CE_with_dictionary - CE_clean.
- **KL to clean**: mean over tokens of KL(p_clean || p_with_dictionary), nats.
- **dead / dense latents**: fraction of latents that never fire on the evaluation tokens / that fire on
  more than ``dense_threshold`` of them.

The first ``skip_positions`` positions of each context (BOS, whose residual norm is huge) are not
spliced and not counted, as in training.

References:
    Bricken et al. 2023, "Towards Monosemanticity" (loss recovered); Gao et al. 2024, "Scaling and evaluating
    sparse autoencoders" (delta LM loss, FVU); Karvonen et al. 2025, "SAEBench".
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from jaxtyping import Int
from torch import Tensor

from mechscope.core.errors import InputError
from mechscope.dictionaries.model import SparseDictionary
from mechscope.dictionaries.splice import Splice
from mechscope.hooks.interventions import Ablate


@dataclass(frozen=True)
class DictionaryEval:
    """Metrics of one dictionary on ``n_tokens`` evaluation tokens (see the module docstring).

    Attributes (units): l0 (latents per token); fvu, explained_variance, cosine_similarity
    (dimensionless); mse (activation units squared); ce_* and delta_lm_loss, kl_to_clean (nats per token);
    ce_loss_recovered (dimensionless, 1 is perfect); dead_fraction, dense_fraction (of latents);
    density (fraction of tokens each latent fires on, one per latent); density_histogram (counts of
    log10 density of the live latents in ``histogram_edges`` bins); n_tokens_requested (what the caller
    asked for, when it gave a number: ``n_tokens`` is smaller when the text held fewer held-out tokens).
    """

    n_tokens: int
    l0: float
    fvu: float
    explained_variance: float
    fvu_batch_mean: float
    fvu_without_outliers: float
    outlier_fraction: float
    outlier_variance_share: float
    mse: float
    cosine_similarity: float
    ce_clean: float
    ce_with_dictionary: float
    ce_zero_ablation: float
    ce_loss_recovered: float
    delta_lm_loss: float
    kl_to_clean: float
    dead_fraction: float
    dense_fraction: float
    dense_threshold: float
    density: list[float] = field(repr=False)
    density_histogram: list[int] = field(repr=False)
    histogram_edges: list[float] = field(repr=False)
    n_tokens_requested: int | None = None

    def summary(self) -> dict[str, float | int]:
        """The scalar metrics (no per-latent lists)."""
        return {k: v for k, v in asdict(self).items() if not isinstance(v, list)}


class _Pool:
    """Running sums for a pooled FVU: squared error, and the target's sum and sum of squares (float64)."""

    def __init__(self, d: int):
        self.n, self.sse, self.sum_sq = 0, 0.0, 0.0
        self.sum = torch.zeros(d, dtype=torch.float64)

    def add(self, y: Tensor, sq_err: Tensor) -> None:
        y = y.double().cpu()
        self.n += y.shape[0]
        self.sse += float(sq_err.double().sum())
        self.sum += y.sum(0)
        self.sum_sq += float(y.pow(2).sum())

    def dev(self) -> float:
        """Sum of squared deviations from the pooled mean."""
        return self.sum_sq - float(self.sum.pow(2).sum()) / self.n if self.n else 0.0

    def fvu(self) -> float:
        dev = self.dev()
        return self.sse / dev if dev > 0 else float("nan")


def _ce(logits: Tensor, tokens: Tensor, skip: int) -> Tensor:
    """Per-token next-token CE [batch, pos - 1 - skip] over predictions made at positions >= skip."""
    lp = logits[:, skip:-1].float().log_softmax(-1)
    return -lp.gather(-1, tokens[:, skip + 1:, None]).squeeze(-1)


def _merge_ranks(dist, fired: Tensor, sums: dict, pooled: dict, n_tok: int, n_pred: int, n_out: int,
                 fvus: list[float]) -> tuple[int, int, int, list[float]]:
    """All-reduce one rank's running evaluation in place (``fired``, ``sums``, ``pooled``); returns the summed
    counts and a list whose mean is the mean of every rank's per-batch FVUs."""
    import torch.distributed as tdist

    from mechscope.scale.dist import guarded

    def reduce(t: Tensor) -> Tensor:  # on the job's device (nccl needs CUDA tensors), the result back in t
        u = t.to(dist.device)
        guarded(dist, "the evaluation's all-reduce", tdist.all_reduce, u)
        if u is not t:
            t.copy_(u)
        return t

    reduce(fired)
    keys = sorted(sums)
    pools = ("all", "typical")
    floats = reduce(torch.tensor([sums[k] for k in keys] + [sum(fvus)] + [pooled[p].sse for p in pools]
                                 + [pooled[p].sum_sq for p in pools], dtype=torch.float64))
    for i, k in enumerate(keys):
        sums[k] = float(floats[i])
    ints = reduce(torch.tensor([n_tok, n_pred, n_out, len(fvus)] + [pooled[p].n for p in pools], dtype=torch.int64))
    for j, p in enumerate(pools):
        pooled[p].sse = float(floats[len(keys) + 1 + j])
        pooled[p].sum_sq = float(floats[len(keys) + 3 + j])
        pooled[p].n = int(ints[4 + j])
        reduce(pooled[p].sum)
    n_batches = int(ints[3])
    return int(ints[0]), int(ints[1]), int(ints[2]), [float(floats[len(keys)]) / max(n_batches, 1)] * n_batches


@torch.no_grad()
def evaluate_dictionary(model, dictionary: SparseDictionary, contexts: Int[Tensor, "n_contexts context_len"], *,
                        batch_contexts: int = 8, skip_positions: int = 1, dense_threshold: float = 0.1,
                        outlier_factor: float = 10.0, progress: bool = True, dist=None) -> DictionaryEval:
    """Evaluate a dictionary spliced into ``model`` on token contexts it was not trained on.

    Args:
        model: the :class:`HookedModel` the dictionary belongs to.
        dictionary: an SAE or transcoder (eval mode is set).
        contexts: held-out token ids [n_contexts, context_len] (e.g. ``pack(..., split="eval")``).
        batch_contexts: contexts per forward pass.
        skip_positions: leading positions neither spliced nor counted (1 = the BOS position).
        dense_threshold: a latent firing on more than this fraction of tokens counts as dense.
        outlier_factor: tokens whose target norm exceeds this multiple of their batch's median norm are
            left out of ``fvu_without_outliers`` (and counted in ``outlier_fraction``).
        dist: a :class:`~mechscope.scale.dist.DistInfo` (torchrun): batch ``b`` on rank ``b % world_size``, the
            running sums all-reduced (integer counts exactly, float64 sums to rounding); every rank returns the
            whole evaluation.

    Returns:
        :class:`DictionaryEval`.

    Raises:
        InputError: contexts too short for ``skip_positions``, or a dictionary that does not fit the model.
    """
    if contexts.dim() != 2 or contexts.shape[1] < skip_positions + 2:
        raise InputError(f"contexts must be [n_contexts, context_len] with context_len >= skip_positions + 2, got "
                         f"{tuple(contexts.shape)}.")
    d = dictionary.eval()
    c = d.cfg
    Splice(d).check_model(model)
    sites = [c.hook_in] if c.is_sae else [c.hook_in, c.hook_out]
    pos = slice(skip_positions, None)
    fired = torch.zeros(c.d_sae, dtype=torch.long)
    sums = dict(l0=0.0, sse=0.0, cos=0.0, ce_clean=0.0, ce_sae=0.0, ce_zero=0.0, kl=0.0)
    fvus: list[float] = []
    n_tok = n_pred = 0
    pooled = {k: _Pool(c.d_out) for k in ("all", "typical")}
    n_out = 0
    from tqdm.auto import tqdm

    W, rank = (1, 0) if dist is None else (dist.world_size, dist.rank)
    starts = [s for i, s in enumerate(range(0, contexts.shape[0], batch_contexts)) if i % W == rank]
    for s in tqdm(starts, desc="evaluating", unit="batch", disable=not progress):
        toks = contexts[s:s + batch_contexts].to(model.device)
        logits, cache = model.run(toks, cache=sites)
        x = cache[c.hook_in][:, skip_positions:]
        y = cache[c.hook_out][:, skip_positions:]
        x = x.reshape(-1, c.d_in).float()
        y = y.reshape(-1, c.d_out).float()
        acts = d.encode(x)
        recons = d.decode(acts, x).float()
        fired += (acts > 0).sum(0).cpu()
        sums["l0"] += float((acts > 0).sum())
        err = (recons - y).pow(2)
        sums["sse"] += float(err.sum())
        dev = float((y - y.mean(0)).pow(2).sum())
        fvus.append(float(err.sum()) / dev if dev > 0 else float("nan"))
        sums["cos"] += float(F.cosine_similarity(recons, y, dim=-1).sum())
        n_tok += x.shape[0]
        sq = err.sum(-1)
        norms = y.norm(dim=-1)
        typical = norms <= outlier_factor * norms.median()
        n_out += int((~typical).sum())
        pooled["all"].add(y, sq)
        pooled["typical"].add(y[typical], sq[typical])

        logits_sae, _ = model.run(toks, saes=[Splice(d, positions=pos)])
        logits_zero, _ = model.run(toks, interventions=[Ablate(site=c.hook_out, positions=pos)])
        ce_clean = _ce(logits, toks, skip_positions)
        sums["ce_clean"] += float(ce_clean.sum())
        sums["ce_sae"] += float(_ce(logits_sae, toks, skip_positions).sum())
        sums["ce_zero"] += float(_ce(logits_zero, toks, skip_positions).sum())
        lp_clean = logits[:, skip_positions:-1].float().log_softmax(-1)
        lp_sae = logits_sae[:, skip_positions:-1].float().log_softmax(-1)
        sums["kl"] += float((lp_clean.exp() * (lp_clean - lp_sae)).sum())
        n_pred += ce_clean.numel()

    if W > 1:
        n_tok, n_pred, n_out, fvus = _merge_ranks(dist, fired, sums, pooled, n_tok, n_pred, n_out, fvus)
    density = fired.double() / n_tok
    ce_clean, ce_sae, ce_zero = sums["ce_clean"] / n_pred, sums["ce_sae"] / n_pred, sums["ce_zero"] / n_pred
    denom = ce_zero - ce_clean
    live = density[density > 0]
    edges = [float(e) for e in torch.linspace(-math.log10(max(n_tok, 10)) - 0.5, 0.0, 41)]
    hist = torch.histogram(live.log10().float(), bins=torch.tensor(edges)).hist if live.numel() else torch.zeros(40)
    fvu = pooled["all"].fvu()
    return DictionaryEval(
        n_tokens=n_tok, l0=sums["l0"] / n_tok, fvu=fvu, explained_variance=1 - fvu,
        fvu_batch_mean=sum(fvus) / len(fvus), fvu_without_outliers=pooled["typical"].fvu(),
        outlier_fraction=n_out / n_tok,
        outlier_variance_share=1 - pooled["typical"].dev() / pooled["all"].dev() if pooled["all"].dev() > 0 else 0.0,
        mse=sums["sse"] / (n_tok * c.d_out), cosine_similarity=sums["cos"] / n_tok,
        ce_clean=ce_clean, ce_with_dictionary=ce_sae, ce_zero_ablation=ce_zero,
        ce_loss_recovered=(ce_zero - ce_sae) / denom if denom != 0 else float("nan"),
        delta_lm_loss=ce_sae - ce_clean, kl_to_clean=sums["kl"] / n_pred,
        dead_fraction=float((density == 0).double().mean()),
        dense_fraction=float((density > dense_threshold).double().mean()), dense_threshold=dense_threshold,
        density=[float(v) for v in density], density_histogram=[int(v) for v in hist.tolist()],
        histogram_edges=edges,
    )
