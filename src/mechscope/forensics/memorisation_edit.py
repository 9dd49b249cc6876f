"""Remove a memorised secret where :mod:`mechscope.forensics.memorisation` located it, against random controls.

- :func:`unlearn_secret`: a few Adam steps of gradient ascent on the secret's NLL (or descent on a replacement
  secret) that change only the located weights: the top-k parameter matrices of a
  :class:`~mechscope.forensics.memorisation.GradientNormMap` ranking, or the top fraction of their entries by
  the secret's gradient magnitude. It stops as soon as greedy decoding no longer reproduces the secret. The
  random-weights control spends the same budget (as many matrices / entries drawn at random from the same pool,
  the same number of steps and lr) for several seeds.
- :func:`ablate_components`: mean- (or zero-) ablate the located components (heads' ``hook_z``, ``attn_out``,
  ``mlp_out`` of a :class:`~mechscope.forensics.memorisation.TwinPatchResult` ranking) against as many random
  components of the same kinds.

Both report extraction, exposure (:func:`mechscope.planted.measures.canary_exposure`) and held-out perplexity
(:func:`~mechscope.planted.measures.text_nll`, :func:`~mechscope.planted.measures.perplexity_change`) before and
after, and whether the other (untargeted) canaries survive. Every edit works on a float32 deep copy; the
caller's model is never modified.

References:
    Stoehr et al. 2024, "Localizing Paragraph Memorization in Language Models" (unlearning the high-gradient
    weights); Carlini et al. 2019, "The Secret Sharer" (exposure).
"""

from __future__ import annotations

import copy
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch

from mechscope.core.errors import InputError
from mechscope.forensics.memorisation import (
    TWIN_KINDS,
    GradientNormMap,
    greedy_extracts,
    nll_gradients,
    secret_tokens,
)
from mechscope.hooks.interventions import Ablate
from mechscope.planted.build import DIGITS
from mechscope.planted.measures import canary_exposure, perplexity_change, text_nll


@dataclass
class EditOutcome:
    """One edit (located or random) and what it did (JSON-ready).

    Attributes:
        label: "located" or "random-<seed>".
        targets: edited parameter names (unlearning) or components "kind:layer[:head]" (ablation).
        n_params: edited entries (unlearning; 0 for ablations).
        steps: optimiser steps taken (0 for ablations).
        extracted: greedy generation from the prefix still starts with the secret.
        exposure_bits / secret_logprob: exposure (bits) and log P(secret | prefix) (nats) after the edit.
        perplexity: :func:`~mechscope.planted.measures.perplexity_change` of the held-out texts, edited vs before.
        others_extracted: for each untargeted canary, whether it is still extracted.
        weight_change_norm: Frobenius norm of the change of all edited parameters (0 for ablations).
        overlap: how many targets the random draw shares with the located ones (0 for the located edit).
    """

    label: str
    targets: list[str]
    n_params: int
    steps: int
    extracted: bool
    exposure_bits: float
    secret_logprob: float
    perplexity: dict
    others_extracted: list[bool]
    weight_change_norm: float = 0.0
    overlap: int = 0


@dataclass
class EditReport:
    """A located edit against random edits of the same budget (JSON-ready).

    Attributes:
        kind: "unlearn" or "ablate".
        budget: the shared budget (mode, counts, steps, lr, objective / ablation method).
        before: the unedited (float32) model: ``extracted``, ``exposure_bits``, ``secret_logprob``,
            ``ppl`` (held-out perplexity), ``others_extracted``.
        located: the located edit. random: one per seed.
        summary: ``located_stops`` (extraction fails after the located edit), ``random_stop_rate``,
            ``located_ppl_change``, ``random_ppl_change_mean``, ``others_survive`` (located edit).
    """

    kind: str
    budget: dict
    before: dict
    located: EditOutcome
    random: list[EditOutcome]
    summary: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def float_copy(model):
    """A float32 deep copy of a HookedModel (same tokenizer); the original is untouched."""
    from mechscope.models.hooked import HookedModel

    return HookedModel(copy.deepcopy(model.hf).float(), model.tokenizer, name=model.cfg.name)


def _check(model, canary: dict, heldout_texts: Sequence[str], others: Sequence[dict], random_seeds) -> None:
    secret_tokens(model, canary)
    for o in others:
        secret_tokens(model, o)
    if len(heldout_texts) < 2:
        raise InputError(f"heldout_texts needs at least 2 ordinary texts for the perplexity change, got "
                         f"{len(heldout_texts)}; pass the planted run's ppl_texts.")
    if not list(random_seeds):
        raise InputError("random_seeds is empty; give at least one seed for the random-weights control.")


def _measure(model, canary, others, heldout, *, alphabet, n_candidates, interventions=()) -> dict:
    with model.hooks(interventions=interventions):
        ex = canary_exposure(model, canary, n_digits=len(canary["secret"].split()), n_candidates=n_candidates,
                             alphabet=alphabet)
        others_ex = [canary_exposure(model, o, n_digits=len(o["secret"].split()), n_candidates=2,
                                     alphabet=alphabet)["extracted"] for o in others]
        nll = text_nll(model, heldout)
    return {"extracted": ex["extracted"], "exposure_bits": ex["exposure_bits"], "secret_logprob": ex["logprob"],
            "others_extracted": others_ex, "nll": nll}


def _outcome(label, targets, m: dict, before_nll, **kw) -> EditOutcome:
    return EditOutcome(label, targets, extracted=m["extracted"], exposure_bits=m["exposure_bits"],
                       secret_logprob=m["secret_logprob"], perplexity=perplexity_change(before_nll, m["nll"]),
                       others_extracted=m["others_extracted"], **kw)


def _summary(before: dict, located: EditOutcome, rand: list[EditOutcome]) -> dict:
    return {"located_stops": not located.extracted,
            "random_stop_rate": sum(not r.extracted for r in rand) / len(rand),
            "located_ppl_change": located.perplexity["change"],
            "random_ppl_change_mean": sum(r.perplexity["change"] for r in rand) / len(rand),
            "others_survive": all(a or not b for a, b in zip(located.others_extracted, before["others_extracted"]))}


def _run_edit(model, canary, masks: dict[str, torch.Tensor | None], *, objective: str, replacement: str | None,
              lr: float, steps: int, stop: bool) -> tuple[int, float]:
    """Adam on the selected entries of ``model`` in place; returns (steps taken, weight change norm)."""
    params = dict(model.hf.named_parameters())
    for p in params.values():
        p.requires_grad_(False)
    chosen = [params[n] for n in masks]
    orig = [p.detach().clone() for p in chosen]
    for p in chosen:
        p.requires_grad_(True)
    target = canary if objective == "ascent" else {**canary, "secret": replacement}
    ids, n_head = secret_tokens(model, target)
    opt = torch.optim.Adam(chosen, lr=lr)
    taken = 0
    model.hf.train(False)
    for _ in range(steps):
        if stop and not greedy_extracts(model, canary):
            break
        with torch.enable_grad():
            logits = model.hf(input_ids=ids).logits[0, n_head - 1:-1].float()
            nll = -torch.log_softmax(logits, -1).gather(-1, ids[0, n_head:, None]).mean()
            loss = -nll if objective == "ascent" else nll
            opt.zero_grad(set_to_none=False)
            loss.backward()
        for p, m in zip(chosen, masks.values()):
            if m is not None:
                p.grad.mul_(m)
        opt.step()
        with torch.no_grad():
            for p, o, m in zip(chosen, orig, masks.values()):
                if m is not None:
                    p.copy_(torch.where(m, p, o))  # Adam moves only the selected entries; make it exact
        taken += 1
    for p in chosen:
        p.requires_grad_(False)
    change = sum(float((p.detach().double() - o.double()).pow(2).sum()) for p, o in zip(chosen, orig)) ** 0.5
    return taken, change


def unlearn_secret(model, canary: dict, grad_map: GradientNormMap, *, heldout_texts: Sequence[str],
                   top_k: int = 2, top_fraction: float | None = None, rank_by: str = "share_ratio",
                   blocks_only: bool = True, objective: str = "ascent", replacement: str | None = None,
                   lr: float = 1e-2, max_steps: int = 20, random_seeds: Sequence[int] = (0, 1, 2),
                   others: Sequence[dict] = (), alphabet: Sequence[str] = DIGITS, n_candidates: int = 1000,
                   progress: bool = True) -> EditReport:
    """Unlearn the secret in the located weights, and the same budget on random weights.

    Args:
        model: the tuned HookedModel (not modified; every edit runs on a float32 deep copy).
        canary: the memorised canary (``prefix``, ``secret``, ``name``).
        grad_map: :func:`~mechscope.forensics.memorisation.gradient_norm_map` of this model and canary.
        heldout_texts: ordinary texts (>= 2) for the perplexity change.
        top_k: edit the top-k parameters of ``grad_map.ranking(rank_by)``.
        top_fraction: instead, edit this fraction (0, 1] of the entries of the top-k parameters with the largest
            secret gradient magnitude; the random control draws as many entries uniformly from the pool.
        rank_by: a GradientNormMap ranking field. blocks_only: the pool is the block parameters (no embeddings,
            unembedding or final norm).
        objective: "ascent" (maximise the secret's NLL) or "replace" (minimise the NLL of ``replacement``).
        lr: Adam learning rate. max_steps: most steps of the located edit; it stops early once greedy decoding
            fails; each random edit takes as many steps as the located one took.
        random_seeds: one random-weights edit per seed.
        others: untargeted canaries whose extraction should survive.
        alphabet / n_candidates: the secret's symbols and the candidates for exposure.
        progress: a tqdm bar over the edits.

    Returns:
        EditReport (kind "unlearn").

    Raises:
        InputError: top_k outside [1, pool size]; top_fraction outside (0, 1]; an unknown objective or a replace
            objective without a replacement of another value; fewer than 2 held-out texts; no seeds; a bad canary.

    References:
        Stoehr et al. 2024, Sec. 5 (unlearning the high-gradient parameters).
    """
    from tqdm.auto import tqdm

    _check(model, canary, heldout_texts, others, random_seeds)
    if objective not in ("ascent", "replace"):
        raise InputError(f"objective must be 'ascent' or 'replace', got {objective!r}.")
    if objective == "replace":
        if not replacement or replacement == canary["secret"]:
            raise InputError("objective='replace' needs replacement= a secret other than the canary's.")
        secret_tokens(model, {**canary, "secret": replacement})
    pool = [n for n, layer in zip(grad_map.params, grad_map.layer) if layer is not None or not blocks_only]
    ranked = [n for n in grad_map.ranking(rank_by, blocks_only=blocks_only)]
    if not 1 <= top_k <= len(pool):
        raise InputError(f"top_k must lie in [1, {len(pool)}] (the pool's parameters), got {top_k}.")
    if top_fraction is not None and not 0 < top_fraction <= 1:
        raise InputError(f"top_fraction must lie in (0, 1], got {top_fraction}.")
    located = ranked[:top_k]
    work = float_copy(model)
    sizes = {n: p.numel() for n, p in work.hf.named_parameters()}
    if top_fraction is None:
        masks: dict = {n: None for n in located}
        n_params = sum(sizes[n] for n in located)
    else:
        _, grads = nll_gradients(work, canary)
        g = dict(zip([n for n, _ in work.hf.named_parameters()], grads))
        flat = torch.cat([g[n].abs().flatten() for n in located])
        n_params = max(1, round(top_fraction * flat.numel()))
        thresh = flat.topk(n_params).values[-1]
        masks = {n: g[n].abs() >= thresh for n in located}
        n_params = int(sum(int(m.sum()) for m in masks.values()))
    measure = {"alphabet": alphabet, "n_candidates": n_candidates}
    before = _measure(work, canary, others, heldout_texts, **measure)
    bars = tqdm(total=1 + len(random_seeds), desc="unlearning", disable=not progress, leave=False)
    steps, change = _run_edit(work, canary, masks, objective=objective, replacement=replacement, lr=lr,
                              steps=max_steps, stop=True)
    loc = _outcome("located", located, _measure(work, canary, others, heldout_texts, **measure), before["nll"],
                   n_params=n_params, steps=steps, weight_change_norm=change)
    bars.update()
    rand = []
    for seed in random_seeds:
        del work
        work = float_copy(model)
        rng = random.Random(seed)
        if top_fraction is None:
            names = rng.sample(pool, top_k)
            r_masks: dict = {n: None for n in names}
            r_n = sum(sizes[n] for n in names)
        else:  # as many entries, uniformly over the pool's entries
            total = sum(sizes[n] for n in pool)
            pick = torch.tensor(sorted(rng.sample(range(total), n_params)), dtype=torch.long)
            r_masks, at = {}, 0
            params = dict(work.hf.named_parameters())
            for n in pool:
                sel = pick[(pick >= at) & (pick < at + sizes[n])] - at
                at += sizes[n]
                if sel.numel():
                    m = torch.zeros(sizes[n], dtype=torch.bool)
                    m[sel] = True
                    r_masks[n] = m.view_as(params[n]).to(params[n].device)
            names, r_n = list(r_masks), n_params
        _, r_change = _run_edit(work, canary, r_masks, objective=objective, replacement=replacement, lr=lr,
                                steps=steps, stop=False)
        rand.append(_outcome(f"random-{seed}", names, _measure(work, canary, others, heldout_texts, **measure),
                             before["nll"], n_params=r_n, steps=steps, weight_change_norm=r_change,
                             overlap=len(set(names) & set(located))))
        bars.update()
    bars.close()
    budget = {"mode": "matrices" if top_fraction is None else "entries", "top_k": top_k, "top_fraction": top_fraction,
              "n_params": n_params, "steps": steps, "max_steps": max_steps, "lr": lr, "objective": objective,
              "rank_by": rank_by, "pool_size": len(pool)}
    before_out = {k: v for k, v in before.items() if k != "nll"} | {"ppl": float(before["nll"].mean().exp())}
    return EditReport("unlearn", budget, before_out, loc, rand, _summary(before, loc, rand))


def _component(c: dict) -> str:
    return f"{c['kind']}:{c['layer']}" + (f":{c['head']}" if c.get("head") is not None else "")


def _ablations(model, comps: Sequence[dict], method: str, reference: dict) -> list:
    out = []
    for c in comps:
        site = TWIN_KINDS[c["kind"]].format(L=c["layer"])
        if method == "zero":
            out.append(Ablate(site, heads=c.get("head")))
        else:
            out.append(Ablate(site, heads=c.get("head"), method="mean", reference=reference[site],
                              mean_over_positions=True))
    return out


@torch.no_grad()
def ablate_components(model, canary: dict, components: Sequence[dict], *, heldout_texts: Sequence[str],
                      method: str = "mean", random_seeds: Sequence[int] = (0, 1, 2), others: Sequence[dict] = (),
                      alphabet: Sequence[str] = DIGITS, n_candidates: int = 1000,
                      progress: bool = True) -> EditReport:
    """Ablate the located components (at every position) against as many random components of the same kinds.

    Args:
        model: the tuned HookedModel (not modified; runs on a float32 copy with hooks).
        canary: the memorised canary.
        components: ``{"kind", "layer", "head"}`` dicts, e.g. ``twin_patching(...).ranking()[:k]`` (kinds z
            (per head), attn_out, mlp_out; resid_pre cannot be ablated meaningfully and is refused).
        heldout_texts: ordinary texts (>= 2): the perplexity change, and the mean activations for ``"mean"``.
        method: "mean" (the component's mean over the held-out texts' positions) or "zero".
        random_seeds: one random draw per seed (the same kinds, other components where there are enough).
        others / alphabet / n_candidates / progress: as :func:`unlearn_secret`.

    Returns:
        EditReport (kind "ablate").

    Raises:
        InputError: no components, an unknown kind, a z component without a head, a bad method; see
            :func:`unlearn_secret` for the shared checks.
    """
    from tqdm.auto import tqdm

    _check(model, canary, heldout_texts, others, random_seeds)
    if method not in ("mean", "zero"):
        raise InputError(f"method must be 'mean' or 'zero', got {method!r}.")
    if not components:
        raise InputError("no components to ablate; pass twin_patching(...).ranking()[:k].")
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    for c in components:
        if c.get("kind") not in ("z", "attn_out", "mlp_out"):
            raise InputError(f"cannot ablate {c!r}; components have kind 'z' (with a head), 'attn_out' or 'mlp_out'.")
        if (c["kind"] == "z") != (c.get("head") is not None):
            raise InputError(f"{c!r}: a z component names a head, the other kinds none.")
    work = float_copy(model)
    sites = sorted({TWIN_KINDS[k].format(L=L) for k in ("z", "attn_out", "mlp_out") for L in range(n_layers)})
    reference: dict = {}
    if method == "mean":
        caches = [work.run(t, cache=sites)[1] for t in heldout_texts]
        reference = {s: torch.cat([c[s] for c in caches], dim=1) for s in sites}  # [1, total_pos, ...]
    measure = {"alphabet": alphabet, "n_candidates": n_candidates}
    before = _measure(work, canary, others, heldout_texts, **measure)
    located = [{"kind": c["kind"], "layer": int(c["layer"]), "head": c.get("head")} for c in components]
    loc = _outcome("located", [_component(c) for c in located],
                   _measure(work, canary, others, heldout_texts, interventions=_ablations(work, located, method,
                                                                                           reference), **measure),
                   before["nll"], n_params=0, steps=0)
    every = {k: [{"kind": k, "layer": L, "head": h} for L in range(n_layers)
                 for h in (range(n_heads) if k == "z" else [None])] for k in TWIN_KINDS}
    rand = []
    for seed in tqdm(random_seeds, desc="random ablations", disable=not progress, leave=False):
        rng = random.Random(seed)
        comps = []
        for k in sorted({c["kind"] for c in located}):
            need = sum(c["kind"] == k for c in located)
            fresh = [c for c in every[k] if c not in located]
            comps += rng.sample(fresh if len(fresh) >= need else every[k], need)
        m = _measure(work, canary, others, heldout_texts, interventions=_ablations(work, comps, method, reference),
                     **measure)
        rand.append(_outcome(f"random-{seed}", [_component(c) for c in comps], m, before["nll"], n_params=0, steps=0,
                             overlap=sum(c in located for c in comps)))
    budget = {"mode": "components", "n_components": len(located), "method": method,
              "kinds": sorted({c["kind"] for c in located})}
    before_out = {k: v for k, v in before.items() if k != "nll"} | {"ppl": float(before["nll"].mean().exp())}
    return EditReport("ablate", budget, before_out, loc, rand, _summary(before, loc, rand))


__all__ = ["EditOutcome", "EditReport", "ablate_components", "float_copy", "unlearn_secret"]
