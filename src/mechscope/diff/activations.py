"""Activation differences between a base and a tuned model on the same token ids.

For each site (by default every layer's ``hook_resid_post`` and, per head, ``attn.hook_z``) and each token,
with ``a_b`` / ``a_t`` the base / tuned activation vectors (one per head at per-head sites):

- ``norm_ratio`` = ||a_t|| / ||a_b||,
- ``cosine`` = a_t . a_b / (||a_t|| ||a_b||),
- ``rel_diff`` = ||a_t - a_b|| / ||a_b||,

each averaged over tokens (pooled over texts, so every token weighs the same). Two windows are reported:
``first_k``, the first ``first_k`` positions of each text, and ``all``, every position. Padding never
counts (batches are right-padded with an attention mask).

Position 0: with ``skip_first=True`` (the default) position 0 is left out of both windows, so ``first_k``
covers positions 1..first_k. The first token of a text (BOS, or whatever token comes first when the
tokenizer adds none, as SmolLM2's) is an attention sink with a residual norm tens of times the others and
attends only to itself, so it behaves unlike every other position and would make ``first_k`` mostly about
it. Pass ``skip_first=False`` to include it. A token whose base vector is exactly zero is left out of the
ratios at that site (it has no direction); ``n_tokens`` counts the tokens behind each window.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from mechscope.core.errors import InputError
from mechscope.core.names import axes as site_axes
from mechscope.core.padding import right_pad

METRICS: tuple[str, ...] = ("norm_ratio", "cosine", "rel_diff")
WINDOWS: tuple[str, ...] = ("first_k", "all")
DEFAULT_SITES: tuple[str, ...] = ("blocks.*.hook_resid_post", "blocks.*.attn.hook_z")


# -- tokens and batches (shared with mechscope.diff.kl) --------------------------------------------------------
def token_rows(model, inputs, max_len: int | None = 256) -> list[Tensor]:
    """One 1-D int64 CPU tensor of token ids per text (the tokenizer's own special tokens, cut to ``max_len``).

    Args:
        inputs: texts, a list of 1-D token-id tensors / lists, or a [batch, pos] tensor (rows taken whole).

    Raises:
        InputError: no inputs, an empty text, or text without a tokenizer.
    """
    if isinstance(inputs, str):
        inputs = [inputs]
    if isinstance(inputs, Tensor):
        inputs = list(inputs if inputs.dim() == 2 else inputs.unsqueeze(0))
    inputs = list(inputs)
    if not inputs:
        raise InputError("no texts given; pass at least one text (or token-id row).")
    limit = min(max_len or model.cfg.n_ctx, model.cfg.n_ctx)
    rows = []
    for i, x in enumerate(inputs):
        if isinstance(x, str):
            ids = torch.tensor(model._need_tokenizer()(x)["input_ids"], dtype=torch.long)
        else:
            ids = torch.as_tensor(x, dtype=torch.long).reshape(-1).cpu()
        if ids.numel() == 0:
            raise InputError(f"text {i} is empty (0 tokens); drop it.")
        if ids.numel() and (int(ids.max()) >= model.cfg.d_vocab or int(ids.min()) < 0):
            raise InputError(f"text {i}: token ids must lie in [0, {model.cfg.d_vocab}).")
        rows.append(ids[:limit])
    return rows


def padded_batches(rows: list[Tensor], batch_size: int, pad_id: int = 0):
    """Yield ``(indices, ids [b, P], mask [b, P])``: rows sorted by length, right-padded, ``batch_size`` at a time."""
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}.")
    order = sorted(range(len(rows)), key=lambda i: rows[i].numel())
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        ids, mask = right_pad([rows[i] for i in idx], pad_id)
        yield idx, ids, mask


def pad_id(model) -> int:
    tok = model.tokenizer
    pid = getattr(tok, "pad_token_id", None) if tok is not None else None
    if pid is None and tok is not None:
        pid = tok.eos_token_id
    return int(pid or 0)


def window_masks(mask: Tensor, first_k: int, skip_first: bool) -> dict[str, Tensor]:
    """Boolean [b, P] masks of the ``first_k`` and ``all`` windows over real (unpadded) positions."""
    real = mask.bool()
    pos = torch.arange(mask.shape[1])[None, :]
    start = 1 if skip_first else 0
    real = real & (pos >= start)
    return {"first_k": real & (pos < start + first_k), "all": real}


def token_stats(a_b: Tensor, a_t: Tensor) -> dict[str, Tensor]:
    """Per-vector norm ratio, cosine and relative difference over the last axis (float64), plus a validity mask."""
    a_b, a_t = a_b.double(), a_t.double()
    nb, nt = a_b.norm(dim=-1), a_t.norm(dim=-1)
    ok = nb > 0
    safe_b = torch.where(ok, nb, torch.ones_like(nb))
    cos = (a_b * a_t).sum(-1) / (safe_b * torch.where(nt > 0, nt, torch.ones_like(nt)))
    return {"norm_ratio": nt / safe_b, "cosine": cos, "rel_diff": (a_t - a_b).norm(dim=-1) / safe_b, "ok": ok}


@dataclass(frozen=True)
class ActivationDiff:
    """Per-site activation differences (see the module docstring for the definitions and windows).

    Attributes:
        sites: the hook names compared, in forward order.
        stats: window -> site -> metric -> float64 tensor: [] at vector sites, [n_heads] at per-head sites.
        n_tokens: window -> number of token positions behind it (per site the count can be lower where a
            base vector was zero).
        first_k / skip_first: the window settings.
        mean_diff: with ``mean_diff=True``, site -> mean over the ``all`` window of ``a_t - a_b`` (float32,
            the site's trailing shape, e.g. [d_model]): a steering direction from base towards tuned.
    """

    sites: list[str]
    stats: dict[str, dict[str, dict[str, Tensor]]]
    n_tokens: dict[str, int]
    first_k: int
    skip_first: bool
    mean_diff: dict[str, Tensor] | None = None
    n_layers: int = 0
    layer_of: dict[str, int] = field(default_factory=dict)

    def per_layer(self, metric: str = "rel_diff", window: str = "all", site: str = "hook_resid_post") -> Tensor:
        """[n_layers] of ``metric`` at ``blocks.L.<site>`` (float64; NaN where not compared)."""
        out = torch.full((self.n_layers,), float("nan"), dtype=torch.float64)
        for s, L in self.layer_of.items():
            if s == f"blocks.{L}.{site}":
                out[L] = self.stats[window][s][metric]
        return out

    def per_head(self, metric: str = "rel_diff", window: str = "all", site: str = "attn.hook_z") -> Tensor:
        """[n_layers, n_heads] of ``metric`` at ``blocks.L.<site>`` (float64)."""
        rows = [self.stats[window][f"blocks.{L}.{site}"][metric] for L in range(self.n_layers)
                if f"blocks.{L}.{site}" in self.stats[window]]
        return torch.stack(rows) if rows else torch.empty(0)

    def top_layers(self, k: int = 5, metric: str = "rel_diff", window: str = "all") -> list[tuple[int, float]]:
        """The ``k`` layers whose residual stream (``hook_resid_post``) changed most, as (layer, value)."""
        v = self.per_layer(metric, window)
        order = [i for i in torch.argsort(-v.nan_to_num(-1.0)).tolist()]
        return [(i, float(v[i])) for i in order[:k]]

    def to_dict(self) -> dict:
        return {
            "first_k": self.first_k, "skip_first": self.skip_first, "n_tokens": self.n_tokens,
            "sites": self.sites,
            "windows": {w: {s: {m: v.tolist() for m, v in per.items()} for s, per in ws.items()}
                        for w, ws in self.stats.items()},
        }


def activation_diff(
    base,
    tuned,
    inputs: Sequence[str] | Tensor | Sequence[Tensor] | Sequence[Sequence[int]],
    *,
    sites: Sequence[str] | str = DEFAULT_SITES,
    first_k: int = 5,
    skip_first: bool = True,
    batch_size: int = 8,
    max_len: int | None = 256,
    mean_diff: bool = False,
    progress: bool = True,
) -> ActivationDiff:
    """Compare the two models' activations at ``sites`` on the same token ids.

    Args:
        base / tuned: HookedModels of one architecture and tokenizer.
        inputs: texts (tokenized with the base's tokenizer, cut to ``max_len`` tokens), 1-D token-id
            rows, or a [batch, pos] tensor.
        sites: hook names or globs; per-head sites (with an ``n_heads`` axis) are compared head by head.
            Sites with a ``kv_pos`` axis (keys, values, patterns) are refused.
        first_k: length of the ``first_k`` window.
        skip_first: leave position 0 (the attention sink) out of both windows (see the module docstring).
        batch_size: texts per forward pass (sorted by length, right-padded, padding masked).
        mean_diff: also return the mean difference vector per site.
        progress: a tqdm bar over batches (shown from two batches on).

    Returns:
        ActivationDiff.

    Raises:
        InputError: first_k < 1, a site without a ``pos`` axis, no position in a window (texts too short).
    """
    from tqdm.auto import tqdm

    if first_k < 1:
        raise InputError(f"first_k must be >= 1, got {first_k}.")
    names = base.resolve([sites] if isinstance(sites, str) else list(sites))
    for s in names:
        ax = site_axes(s)
        if len(ax) < 2 or ax[1] != "pos":
            raise InputError(f"{s} has axes {ax}; activation_diff compares one vector per token position "
                             "(sites like hook_resid_post, hook_attn_out or attn.hook_z).")
    rows = token_rows(base, inputs, max_len)
    sums = {w: {s: None for s in names} for w in WINDOWS}
    counts = {w: {s: None for s in names} for w in WINDOWS}
    n_tokens = {w: 0 for w in WINDOWS}
    diff_sum: dict[str, Tensor] = {}
    batches = list(padded_batches(rows, batch_size, pad_id(base)))
    for _, ids, mask in tqdm(batches, desc="activation diff", unit="batch", disable=not progress or len(batches) < 2,
                             leave=False):
        cb = base.run(ids.to(base.device), cache=names, attention_mask=mask.to(base.device), logits_to_keep=1).cache
        ct = tuned.run(ids.to(tuned.device), cache=names, attention_mask=mask.to(tuned.device),
                       logits_to_keep=1).cache
        wm = window_masks(mask, first_k, skip_first)
        for w in WINDOWS:
            n_tokens[w] += int(wm[w].sum())
        for s in names:
            vb, vt = cb[s].cpu(), ct[s].cpu()
            st = token_stats(vb, vt)  # [b, P] or [b, P, H]
            for w in WINDOWS:
                m = wm[w].reshape(*wm[w].shape, *([1] * (st["ok"].dim() - 2))) & st["ok"]
                add = {k: torch.where(m, st[k], torch.zeros((), dtype=torch.float64)).sum((0, 1)) for k in METRICS}
                c = m.sum((0, 1))
                if sums[w][s] is None:
                    sums[w][s], counts[w][s] = add, c
                else:
                    sums[w][s] = {k: sums[w][s][k] + add[k] for k in METRICS}
                    counts[w][s] = counts[w][s] + c
            if mean_diff:
                m = wm["all"].reshape(*wm["all"].shape, *([1] * (vb.dim() - 2)))
                d = torch.where(m, vt.double() - vb.double(), torch.zeros((), dtype=torch.float64)).sum((0, 1))
                diff_sum[s] = d if s not in diff_sum else diff_sum[s] + d
    for w in WINDOWS:
        if n_tokens[w] == 0:
            raise InputError(f"no token position falls in the {w!r} window (the texts are too short"
                             f"{' once position 0 is skipped' if skip_first else ''}); pass longer texts"
                             f"{' or skip_first=False' if skip_first else ''}.")
    stats = {w: {s: {k: sums[w][s][k] / counts[w][s] for k in METRICS} for s in names} for w in WINDOWS}
    md = {s: (diff_sum[s] / n_tokens["all"]).float() for s in names} if mean_diff else None
    from mechscope.core.names import parse

    layer_of = {s: parse(s)[1] for s in names if parse(s)[1] is not None}
    return ActivationDiff(names, stats, n_tokens, first_k, skip_first, md, base.cfg.n_layers, layer_of)


__all__ = [
    "DEFAULT_SITES",
    "METRICS",
    "ActivationDiff",
    "activation_diff",
    "padded_batches",
    "token_rows",
    "window_masks",
]
