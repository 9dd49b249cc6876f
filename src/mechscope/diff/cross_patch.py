"""Cross-model activation patching: which component of the tuned model carries the change?

On the same prompts, the BASE model's activation at one component (a layer's residual stream, attention or
MLP output, or one head's ``hook_z``) replaces the TUNED model's, one component at a time, and a metric of the
tuned model's logits is measured. With ``m_t`` the tuned value, ``m_b`` the base value and ``m_p`` the patched
one:

- ``effect = m_t - m_p``: how much the metric falls when the tuned model gets the base's component;
- ``recovered = (m_p - m_t) / (m_b - m_t)``: the fraction of the base-tuned gap that patching that one
  component closes (1: the component carries the whole change, as the last layer's residual stream does;
  0: none of it; None where the gap is 0).

Kinds (sites are canonical hook names; every position is patched):

=============  ==================================  ==========  ===========================
kind           site                                per         values
=============  ==================================  ==========  ===========================
resid_pre      ``blocks.L.hook_resid_pre``         layer       [n_layers]
resid_post     ``blocks.L.hook_resid_post``        layer       [n_layers]
attn_out       ``blocks.L.hook_attn_out``          layer       [n_layers]
mlp_out        ``blocks.L.hook_mlp_out``           layer       [n_layers]
z              ``blocks.L.attn.hook_z``            layer/head  [n_layers] / [n_layers, n_heads]
=============  ==================================  ==========  ===========================

Patched variants are stacked along the batch axis (``Patch(..., batch=rows)``) as
:func:`mechscope.analysis.activation_patching` does, and a component whose base activation equals the tuned
one is not run at all (patching it changes nothing, so it scores ``m_t`` exactly).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from mechscope.core.errors import InputError, ShapeError
from mechscope.hooks.interventions import Patch

CROSS_KINDS: dict[str, str] = {
    "resid_pre": "blocks.{L}.hook_resid_pre",
    "resid_post": "blocks.{L}.hook_resid_post",
    "attn_out": "blocks.{L}.hook_attn_out",
    "mlp_out": "blocks.{L}.hook_mlp_out",
    "z": "blocks.{L}.attn.hook_z",
}

#: Rows (prompts x variants) x positions per forward pass.
TOKENS_PER_PASS = 2048


def logprob_metric(target_ids=None, *, continuation: Tensor | Sequence[Sequence[int]] | None = None,
                   prob: bool = False) -> Callable:
    """A metric for :func:`cross_model_patching`: the mean log-probability of target tokens.

    Args:
        target_ids: the token read at the last position: one id for every prompt, or one id per prompt.
        continuation: instead, [batch, c] ids of a continuation the prompts already end with; the metric is
            the mean over prompts and the c positions of log p(continuation token | everything before it).
        prob: average probabilities instead of log-probabilities: bounded in [0, 1], so a prompt whose target
            a patch pushes far into the tail weighs no more than one where the target merely lost its mass.

    Returns:
        ``metric(logits [batch, pos, d_vocab]) -> scalar tensor`` with a ``position`` attribute (how many
        trailing positions of logits it reads, negative) and a ``name``.
    """
    if (target_ids is None) == (continuation is None):
        raise InputError("logprob_metric takes target_ids= (next token at the last position) or continuation= "
                         "(a continuation the prompts end with), not both or neither.")
    if continuation is not None:
        cont = torch.as_tensor(continuation, dtype=torch.long)
        if cont.dim() == 1:
            cont = cont[None]
        c = cont.shape[1]
        if c < 1:
            raise InputError("continuation= is empty; give at least one token.")

        def metric(logits: Tensor) -> Tensor:
            lp = torch.log_softmax(logits[:, -c - 1:-1].float(), -1)
            tgt = cont.to(lp.device).expand(lp.shape[0], c)
            got = lp.gather(-1, tgt[..., None]).squeeze(-1)
            return (got.exp() if prob else got).mean()

        metric.position = -(c + 1)
        metric.name = f"mean {'probability' if prob else 'logprob'} of a {c}-token continuation"
        return metric
    tgt = torch.as_tensor(target_ids, dtype=torch.long).reshape(-1)

    def metric(logits: Tensor) -> Tensor:
        lp = torch.log_softmax(logits[:, -1].float(), -1)
        t = tgt.to(lp.device)
        if t.numel() not in (1, lp.shape[0]):
            raise ShapeError(f"logprob_metric has {t.numel()} target ids for {lp.shape[0]} prompts; give one id, or "
                             "one per prompt.")
        got = lp.gather(-1, t.expand(lp.shape[0])[:, None])
        return (got.exp() if prob else got).mean()

    metric.position = -1
    metric.name = f"mean {'probability' if prob else 'logprob'} of the target at the last position"
    return metric


def _keep(metric) -> int:
    pos = getattr(metric, "position", None)
    return -pos if isinstance(pos, int) and pos < 0 else 0


@dataclass(frozen=True)
class CrossPatchResult:
    """Cross-model patching maps (see the module docstring).

    Attributes:
        tuned_value / base_value: the metric on the tuned and on the base model (``m_t``, ``m_b``).
        patched: kind -> float64 tensor of ``m_p``, [n_layers] (per layer) or [n_layers, n_heads] (z per head).
        per: "layer" or "head".
        metric: the metric's name.
    """

    tuned_value: float
    base_value: float
    patched: dict[str, Tensor]
    per: str
    metric: str

    @property
    def gap(self) -> float:
        """m_b - m_t."""
        return self.base_value - self.tuned_value

    def effect(self, kind: str) -> Tensor:
        """m_t - m_p for each component of ``kind``."""
        return self.tuned_value - self.patched[kind]

    def recovered(self, kind: str) -> Tensor:
        """(m_p - m_t) / (m_b - m_t) for each component (NaN where the gap is 0)."""
        if self.gap == 0:
            return torch.full_like(self.patched[kind], float("nan"))
        return (self.patched[kind] - self.tuned_value) / self.gap

    def to_dict(self) -> dict:
        return {"metric": self.metric, "per": self.per, "tuned_value": self.tuned_value,
                "base_value": self.base_value, "gap": self.gap,
                "kinds": {k: {"patched": v.tolist(), "effect": self.effect(k).tolist(),
                              "recovered": self.recovered(k).tolist()} for k, v in self.patched.items()}}


@torch.no_grad()
def cross_model_patching(
    base,
    tuned,
    prompts,
    metric: Callable[[Tensor], Tensor],
    *,
    per: str = "layer",
    kinds: Sequence[str] | None = None,
    batch_size: int | None = None,
    progress: bool = True,
) -> CrossPatchResult:
    """Patch the base model's activations into the tuned model one component at a time.

    Args:
        base / tuned: HookedModels of one architecture and tokenizer.
        prompts: texts of equal token length, or token ids [batch, pos] (both models read the same ids).
        metric: ``metric(logits [batch, pos', d_vocab]) -> scalar`` over the prompts, e.g.
            :func:`logprob_metric` or :func:`mechscope.analysis.make_metric`; a ``position`` attribute (negative)
            limits the logits computed to the trailing positions it reads.
        per: "layer" (one layer's site, all heads and positions) or "head" (one head's ``hook_z``).
        kinds: site kinds of :data:`CROSS_KINDS`; default ("resid_pre", "attn_out", "mlp_out") per layer,
            ("z",) per head (the only per-head kind).
        batch_size: patched variants per forward pass; None fits about ``TOKENS_PER_PASS`` tokens.

    Returns:
        CrossPatchResult.

    Raises:
        InputError: an unknown per or kind, a per-head kind other than z, prompts of different token length.
    """
    from tqdm.auto import tqdm

    if per not in ("layer", "head"):
        raise InputError(f"per must be 'layer' or 'head', got {per!r}.")
    kinds = list(kinds or (("resid_pre", "attn_out", "mlp_out") if per == "layer" else ("z",)))
    for k in kinds:
        if k not in CROSS_KINDS:
            raise InputError(f"unknown kind {k!r}; use some of {list(CROSS_KINDS)}.")
        if per == "head" and k != "z":
            raise InputError(f"per='head' patches one head's hook_z; kind {k!r} has no heads (use per='layer').")
    if batch_size is not None and batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}.")
    tokens = base._tokens(prompts, None)
    n, n_pos = tokens.shape
    n_layers, n_heads = tuned.cfg.n_layers, tuned.cfg.n_heads
    sites = {k: [CROSS_KINDS[k].format(L=L) for L in range(n_layers)] for k in kinds}
    all_sites = [s for k in kinds for s in sites[k]]
    keep = _keep(metric)
    base_logits, cb = base.run(tokens, cache=all_sites, logits_to_keep=keep)
    tuned_logits, ct = tuned.run(tokens.to(tuned.device), cache=all_sites, logits_to_keep=keep)
    m_b = float(metric(base_logits.to(tuned_logits.device)))
    m_t = float(metric(tuned_logits))
    patched = {k: torch.full((n_layers, n_heads) if per == "head" else (n_layers,), m_t, dtype=torch.float64)
               for k in kinds}
    todo: list[tuple[str, tuple[int, ...], Patch]] = []  # (kind, index, intervention without batch rows)
    for k in kinds:
        for L, s in enumerate(sites[k]):
            src = cb[s].to(tuned.device)
            if per == "head":
                for h in range(n_heads):
                    if not torch.equal(src[:, :, h], ct[s][:, :, h]):
                        todo.append((k, (L, h), Patch(s, source=src, heads=h)))
            elif not torch.equal(src, ct[s]):
                todo.append((k, (L,), Patch(s, source=src)))
    per_pass = batch_size or max(1, TOKENS_PER_PASS // (n * n_pos))
    chunks = [todo[i:i + per_pass] for i in range(0, len(todo), per_pass)]
    t_tokens = tokens.to(tuned.device)
    for chunk in tqdm(chunks, desc="cross-model patching", unit="pass", disable=not progress or len(chunks) < 2,
                      leave=False):
        v = len(chunk)
        ivs = [Patch(p.site, source=p.source, heads=p.heads, batch=slice(j, None, v))
               for j, (_, _, p) in enumerate(chunk)]  # prompt i of variant j is row i * v + j
        logits, _ = tuned.run(t_tokens.repeat_interleave(v, dim=0), interventions=ivs, logits_to_keep=keep)
        for j, (k, idx, _) in enumerate(chunk):
            patched[k][idx] = float(metric(logits[j::v]))
    name = getattr(metric, "name", None) or getattr(metric, "__name__", None) or "metric"
    return CrossPatchResult(m_t, m_b, patched, per, name)


__all__ = ["CROSS_KINDS", "CrossPatchResult", "cross_model_patching", "logprob_metric"]
