"""Batched monitored generation: several prompts at once with the KV cache, one watcher per row.

:meth:`mechscope.safety.monitor.Monitor.generate` calls :func:`generate_batched` when ``batch_size > 1``,
passing its own per-prompt watcher (the object that keeps a prompt's scores, rule state, alarms and actions,
and checks activations for NaN) and the exception that watcher raises to end a forward. This module never
imports the monitor, so imports point one way; a batched run makes the same :class:`MonitoredGeneration`
records and alarm-log lines as ``batch_size=1`` (log lines in another order: rows interleave).

Padding: each batch is left-padded to its longest prompt, with a 2D ``attention_mask`` (0 at pads) and
``position_ids = max(cumsum(mask) - 1, 0)``, which is how HF causal LMs (Llama, GPT-2, ...) read a padded batch
with ``past_key_values``: the mask hides the pads from every query and the position ids count only a row's own
tokens, so each row's activations are those of its prompt alone up to float rounding (batched and masked
kernels round differently in the last bits). Left padding puts every row's newest token in the last column.
The pad id is never read by a real token (masked): the tokenizer's pad token, else its EOS, else 0; a model
without a pad token works the same.

A row ends at EOS (``stop_at_eos``), at its ``max_new_tokens`` (less where the context is shorter, as in
:func:`~mechscope.features.generation.generate`), or at an alarm that stops it. Its last token is scored by
the next forward; after that it stays in the batch, fed a pad with mask 0, and is neither scored nor sampled
(dropping rows would mean slicing every cache layout of every family; the cost is the ended rows' share of
each later forward). The batch's last forward, once no row samples any more, ends right after the probe's
layer, as the single-prompt path's extra forward does.

Sampling (``temperature > 0``): each row draws with its own ``torch.Generator`` seeded with ``seed``, by the
same call as ``generate``, so a row's tokens are those of ``batch_size=1`` with the same seed (as for greedy
decoding, unless float rounding flips a near-tie).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from mechscope.core.errors import InputError
from mechscope.features.generation import eos_ids
from mechscope.safety.monitor_rules import MonitoredGeneration


class _Done(Exception):
    """Raised from the site hook when no row needs this forward's logits (every row has ended)."""


class _Row:
    """One prompt of a batch: its watcher, its pad count, and whether it still samples or is read."""

    def __init__(self, watch, ids: list[int], pad: int, max_new: int, seed: int):
        self.w, self.pad, self.max_new = watch, pad, max_new
        self.w.ids = ids  # the watcher's token list: alarms read their token from it
        self.n_new = 0
        self.sampling = max_new > 0  # draws another token after this forward
        self.ended = False  # scored to its last token (or stopped); no later forward reads it
        self.g = torch.Generator(device="cpu").manual_seed(seed)


def pad_id(model) -> int:
    """The id fed at pads (masked, so never read): the tokenizer's pad token, else EOS, else 0."""
    tok = getattr(model, "tokenizer", None)
    for i in (getattr(tok, "pad_token_id", None), getattr(tok, "eos_token_id", None)):
        if isinstance(i, int) and 0 <= i < model.cfg.d_vocab:
            return i
    return 0


def generate_batched(model, site: str, prompts: Sequence[Int[Tensor, "1 _pos"]], watch: Callable[[int, int], Any],
                     halt: type[Exception], *, batch_size: int, max_new_tokens: int, temperature: float, seed: int,
                     stop_at_eos: bool, use_kv_cache: bool) -> list[MonitoredGeneration]:
    """Monitored generation of ``prompts`` in batches of ``batch_size`` rows (see the module docstring).

    Args:
        model: a HookedModel; site: the probe's concrete site on it ([batch, pos, d]).
        prompts: token ids, one [1, pos_i] int64 tensor per prompt (lengths may differ), on the model's device.
        watch: ``watch(prompt_index, prompt_len)`` makes a prompt's watcher: an object with ``ids``, ``scores``,
            ``values``, ``alarms``, ``offset``, ``stopped``, ``flagged``, ``index``, ``n_prompt`` and
            ``site(value)``, which scores ``value[0, len(scores) - offset:]`` ([1, pos, d]), runs the rule and the
            actions, raises InputError on NaN activations and ``halt`` once the generation is stopped.
        halt: the exception ``site`` raises to stop a generation.
        batch_size: rows per batch, >= 1.
        max_new_tokens, temperature, seed, stop_at_eos, use_kv_cache: as
            :func:`~mechscope.features.generation.generate` (``seed`` per prompt; ``use_kv_cache=False`` re-runs
            the whole padded batch each step).

    Returns:
        One :class:`MonitoredGeneration` per prompt, in order.

    Raises:
        InputError: ``batch_size`` not an int >= 1; ``temperature`` or ``max_new_tokens`` < 0; NaN or infinite
            activations (from the watcher: names the site, position and prompt).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be an int >= 1 (prompts generated together), got {batch_size!r}.")
    if temperature < 0 or max_new_tokens < 0:
        raise InputError(f"temperature and max_new_tokens must be >= 0, got {temperature}, {max_new_tokens}.")
    out: list[MonitoredGeneration] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        out += _batch(model, site, chunk, start, watch, halt, max_new_tokens, temperature, seed, stop_at_eos,
                      use_kv_cache)
    return out


def _batch(model, site, prompts, start, watch, halt, max_new_tokens, temperature, seed, stop_at_eos, use_kv_cache):
    ctx = getattr(model.cfg, "n_ctx", None)
    width = max(p.shape[1] for p in prompts)
    rows = []
    for i, p in enumerate(prompts):
        n = p.shape[1]
        max_new = min(max_new_tokens, max(ctx - n, 0)) if ctx else max_new_tokens
        rows.append(_Row(watch(start + i, n), p[0].tolist(), width - n, max_new, seed))
    eos = eos_ids(model) if stop_at_eos else set()
    pad = pad_id(model)
    device = prompts[0].device
    tokens = torch.tensor([[pad] * r.pad + r.w.ids for r in rows], dtype=torch.long, device=device)
    mask = torch.tensor([[0] * r.pad + [1] * len(r.w.ids) for r in rows], dtype=torch.long, device=device)
    first = 0  # the first column this forward reads

    def on_site(value: Tensor) -> None:  # value [rows, pos, d]; returns None: the value is never changed
        for i, r in enumerate(rows):
            if r.ended:
                continue
            w = r.w
            w.offset = n = len(w.scores)  # so the watcher scores all of the slice: this row's unscored tokens
            try:
                w.site(value[i:i + 1, n + r.pad - first:])
            except halt:
                pass
            r.ended = w.stopped or not r.sampling
        if all(r.ended or not r.sampling for r in rows):
            raise _Done

    past = None
    with model.hooks(functions={site: on_site}):
        while True:
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            try:
                o = model.hf(input_ids=tokens[:, first:], attention_mask=mask, position_ids=positions[:, first:],
                             past_key_values=past, use_cache=use_kv_cache)
            except _Done:
                break
            past = o.past_key_values if use_kv_cache else None
            logits = o.logits[:, -1].float()
            col = []
            for i, r in enumerate(rows):
                if r.ended:
                    col.append((pad, 0))
                    continue
                if temperature == 0:
                    nxt = int(logits[i].argmax())
                else:
                    probs = torch.softmax(logits[i] / temperature, dim=-1).cpu()
                    nxt = int(torch.multinomial(probs, 1, generator=r.g))
                r.w.ids.append(nxt)
                r.n_new += 1
                r.sampling = nxt not in eos and r.n_new < r.max_new
                col.append((nxt, 1))
            first = tokens.shape[1] if use_kv_cache else 0
            new = torch.tensor(col, dtype=torch.long, device=device).T  # [2, rows]: ids, mask
            tokens = torch.cat([tokens, new[0, :, None]], dim=1)
            mask = torch.cat([mask, new[1, :, None]], dim=1)
    return [r.w.record() for r in rows]


__all__ = ["generate_batched", "pad_id"]
