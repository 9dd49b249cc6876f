"""The refusal direction: candidates, selection and effects (Arditi et al. 2024), for any HookedModel.

- :func:`candidate_directions`: the mean difference of ``blocks.{l}.hook_resid_pre`` between harmful and harmless
  instructions, at every layer and every post-instruction template position (the tokens the chat template puts
  after the user's content, e.g. ``<|im_end|>\\n<|im_start|>assistant\\n``);
- :func:`select_direction`: the paper's rule (:func:`select_from_scores`, pure): drop the last 20% of layers,
  drop candidates whose ablation moves harmless last-position next-token distributions by KL > 0.1, keep those
  whose addition makes the harmless refusal score > 0, pick the one whose ablation lowers the harmful refusal
  score most. Scores come from single batched forwards (no generation);
- :func:`refusal_effects`: greedy completions (batched) with no intervention, with ablation and with addition;
  refusal rates with bootstrap intervals, CE on ordinary text, and same-norm random directions as the control.

Refusal score (``score=``): ``"tokens"`` (default, the paper's) is the log-odds of the next token being a refusal
token at the last prompt position, ``log p - log(1 - p)`` with ``p`` the summed probability of the first tokens of
"I'm sorry", "I cannot", "Sorry", "As an AI" (the paper uses "I" for Llama/Gemma, "I" and "As" for Qwen); one
forward per prompt. ``"prefix"`` is ``log P(REFUSAL) - log P(COMPLIANCE)`` by teacher forcing (the prefixes of
:mod:`mechscope.safety.refusal`); two forwards per prompt, and it does not count "I" openings of compliant
answers. Both are natural-log units; > 0 means refusal is favoured.

Prompts are request strings rendered as one user message through the chat template with the generation prompt
(``chat=False``: the raw text), left-padded in batches with ``position_ids`` counting each row's own tokens (as
:mod:`mechscope.safety.monitor_batch`), so each row's activations are those of its prompt alone up to rounding.

References:
    Arditi et al. 2024, "Refusal in Language Models Is Mediated by a Single Direction": sec. 2.3 (difference in
    means at post-instruction positions), appendix C (direction selection), sec. 3 (effects), sec. 4.2 (CE).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from mechscope.core.errors import InputError
from mechscope.features.batch_generation import generate_texts
from mechscope.safety.refusal import COMPLIANCE, REFUSAL
from mechscope.safety.refusal_interventions import (
    _chunks,
    _forward,
    _render,
    _tok,
    activation_addition,
    ce_loss,
    directional_ablation,
    prompt_ids,
    random_direction,
    refusal_rate,
)

#: Phrases whose first token counts as a refusal token for ``score="tokens"``.
REFUSAL_OPENINGS = ("I'm sorry", "I cannot", "Sorry", "As an AI")


def refusal_token_ids(model, openings: Sequence[str] = REFUSAL_OPENINGS) -> list[int]:
    """The first token of each opening phrase (deduplicated, in order): the refusal tokens of ``score="tokens"``."""
    tok = _tok(model)
    ids = [tok(o, add_special_tokens=False)["input_ids"][:1] for o in openings]
    return list(dict.fromkeys(i[0] for i in ids if i))


class RefusalScorer:
    """Refusal scores of a fixed set of prompts, with or without interventions, by forwards alone (no generation).

    Args:
        model: a HookedModel.
        seqs: token-id lists, one rendered prompt each (e.g. from
            :func:`~mechscope.safety.refusal_interventions.prompt_ids`).
        score: ``"tokens"`` (logit of the summed probability of the refusal tokens at the next position, nats) or
            ``"prefix"`` (``log P(REFUSAL) - log P(COMPLIANCE)``, the two answer openings teacher-forced, nats).
        refusal_tokens: token ids for ``"tokens"``; None: :func:`refusal_token_ids`.
        batch_size: prompts per forward.

    Raises:
        InputError: an unknown ``score``; an empty refusal-token list.
    """

    def __init__(self, model, seqs, score: str = "prefix", refusal_tokens=None, batch_size: int = 16):
        if score not in ("tokens", "prefix"):
            raise InputError(f"score must be 'tokens' or 'prefix', got {score!r}.")
        self.model, self.seqs, self.score, self.bs = model, seqs, score, batch_size
        tok = _tok(model)
        self.ref_ids = torch.tensor(refusal_tokens if refusal_tokens is not None else refusal_token_ids(model))
        if self.ref_ids.numel() == 0:
            raise InputError("no refusal tokens; give refusal_tokens= token ids.")
        self.answers = [tok(a, add_special_tokens=False)["input_ids"] for a in (REFUSAL, COMPLIANCE)]

    def logprobs(self, interventions=()) -> Tensor:
        """float64 [n, vocab]: log-softmax of the next token after each prompt."""
        return torch.cat([_forward(self.model, c, interventions)[:, -1].double().log_softmax(-1).cpu()
                          for c in _chunks(self.seqs, self.bs)])

    def refusal(self, interventions=(), logprobs: Tensor | None = None) -> Tensor:
        """float64 [n]: the refusal score of each prompt (nats)."""
        if self.score == "tokens":
            lp = self.logprobs(interventions) if logprobs is None else logprobs
            p = lp[:, self.ref_ids].exp().sum(-1).clamp(1e-8, 1 - 1e-8)
            return p.log() - (1 - p).log()
        totals = []
        for ans in self.answers:  # sum of log P(answer token | prompt, earlier answer tokens)
            k = len(ans)
            rows = []
            for c in _chunks([s + ans for s in self.seqs], self.bs):
                lp = _forward(self.model, c, interventions, keep=k + 1)[:, :-1].double().log_softmax(-1).cpu()
                rows.append(lp.gather(-1, torch.tensor(ans)[None, :, None].expand(lp.shape[0], -1, 1))[..., 0].sum(-1))
            totals.append(torch.cat(rows))
        return totals[0] - totals[1]


def _kl(lp_clean: Tensor, lp: Tensor) -> float:
    """Mean over prompts of KL(clean || intervened) of next-token distributions (nats)."""
    return float((lp_clean.exp() * (lp_clean - lp)).sum(-1).mean())


# -- candidates ------------------------------------------------------------------------------------------------
class Candidates(NamedTuple):
    """What :func:`candidate_directions` returns.

    Attributes:
        directions: float32 [n_pos, n_layers, d_model]: mean(harmful) - mean(harmless) of ``hook_resid_pre``
            (activation units), at positions ``positions``.
        positions: the position of each row, counted from the prompt's end (-n_pos .. -1).
        tokens: the token text at each position (the same for every prompt).
    """

    directions: Tensor
    positions: list[int]
    tokens: list[str]


def _post_instruction_count(model, requests: Sequence[str]) -> int:
    """Number of trailing tokens lying wholly in the template's text after the user content (the same suffix for
    every request)."""
    tok = _tok(model)
    mark = "\x00MARK\x00"
    blank = _render(model, mark, True)
    suffix = blank[blank.rindex(mark) + len(mark):]
    if not suffix:
        raise InputError("the chat template adds no tokens after the user's content; give positions=<k> instead.")
    counts = []
    for r in requests:
        text = _render(model, r, True)
        if not text.endswith(suffix):
            raise InputError(f"the chat template does not end {r[:40]!r} with its post-instruction text {suffix!r}; "
                             "give positions=<k last tokens> instead.")
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        edge = len(text) - len(suffix)
        counts.append(sum(1 for s, e in enc["offset_mapping"] if s >= edge and e > s))
    return min(counts)


@torch.no_grad()
def candidate_directions(model, harmful: Sequence[str], harmless: Sequence[str],
                         positions: str | int = "post_instruction", *, chat: bool = True,
                         batch_size: int = 16) -> Candidates:
    """Difference-in-means candidates at every layer's block input and every post-instruction position.

    Args:
        model: a HookedModel with a tokenizer.
        harmful / harmless: request strings (e.g. the user messages of ``harmfulness`` labels 1 / 0).
        positions: ``"post_instruction"``: the tokens the chat template appends after the user's content (found by
            rendering with ``add_generation_prompt``); an int k: the last k tokens of each prompt.
        chat: render requests through the chat template (False: raw text; then positions must be an int).
        batch_size: prompts per forward.

    Returns:
        :class:`Candidates`: directions float32 [n_pos, n_layers, d_model], positions, tokens.

    Raises:
        InputError: empty request lists; no chat template; a template that does not end every prompt with the
            same post-instruction tokens; k larger than the shortest prompt.

    References:
        Arditi et al. 2024, sec. 2.3 (eq. 1-2).
    """
    if not len(harmful) or not len(harmless):
        raise InputError(f"give harmful and harmless requests, got {len(harmful)} and {len(harmless)}.")
    if positions == "post_instruction":
        if not chat:
            raise InputError("positions='post_instruction' needs the chat template; with chat=False give an int k.")
        n_pos = _post_instruction_count(model, list(harmful) + list(harmless))
    elif isinstance(positions, int) and not isinstance(positions, bool) and positions >= 1:
        n_pos = positions
    else:
        raise InputError(f"positions must be 'post_instruction' or an int >= 1, got {positions!r}.")
    n_layers, d = model.cfg.n_layers, model.cfg.d_model
    means, tails = [], set()
    for group in (harmful, harmless):
        seqs = prompt_ids(model, group, chat=chat)
        if min(len(s) for s in seqs) < n_pos:
            raise InputError(f"a prompt has fewer than {n_pos} tokens; use fewer positions.")
        tails |= {tuple(s[-n_pos:]) for s in seqs}
        total = torch.zeros(n_pos, n_layers, d, dtype=torch.float64)

        def add(layer, total=total):
            def fn(x):
                total[:, layer] += x[:, -n_pos:].detach().double().sum(0).cpu()
            return fn

        fns = {f"blocks.{layer}.hook_resid_pre": add(layer) for layer in range(n_layers)}
        for c in _chunks(seqs, batch_size):
            _forward(model, c, functions=fns)
        means.append(total / len(seqs))
    if positions == "post_instruction" and len(tails) > 1:
        raise InputError(f"the prompts' last {n_pos} tokens differ ({len(tails)} variants); the template's "
                         "post-instruction text tokenizes differently after some requests: give positions=<k>.")
    tail = next(iter(tails))
    tok = _tok(model)
    tokens = [tok.decode([i]) for i in tail] if len(tails) == 1 else [f"[{-n_pos + i}]" for i in range(n_pos)]
    return Candidates((means[0] - means[1]).float(), list(range(-n_pos, 0)), tokens)


# -- selection -------------------------------------------------------------------------------------------------
def select_from_scores(bypass: np.ndarray, induce: np.ndarray, kl: np.ndarray, *, prune_layer_fraction: float = 0.2,
                       kl_threshold: float = 0.1, induce_threshold: float = 0.0) -> tuple[tuple[int, int] | None, np.ndarray]:
    """The paper's selection rule on score arrays [n_pos, n_layers] (layer = column index).

    A candidate is dropped when (first reason recorded): its layer ``l >= int(n_layers * (1 - prune_layer_fraction))``
    (``"late_layer"``); a score is NaN (``"nan"``); ``kl > kl_threshold`` (``"kl"``); ``induce < induce_threshold``
    (``"no_induce"``; induce = harmless refusal score under addition). Among the rest, the one with the lowest
    ``bypass`` (harmful refusal score under ablation) wins; ties go to the first in (position, layer) order.

    Returns:
        ``((position index, layer) or None when nothing is kept, reasons)`` with reasons a [n_pos, n_layers] array
        of strings, ``""`` for kept candidates.

    References:
        Arditi et al. 2024, appendix C.
    """
    bypass, induce, kl = (np.asarray(x, dtype=np.float64) for x in (bypass, induce, kl))
    if not bypass.shape == induce.shape == kl.shape or bypass.ndim != 2:
        raise InputError(f"score arrays must share one [n_pos, n_layers] shape, got {bypass.shape}, {induce.shape}, "
                         f"{kl.shape}.")
    n_layers = bypass.shape[1]
    reasons = np.full(bypass.shape, "", dtype=object)
    cut = int(n_layers * (1.0 - prune_layer_fraction))
    reasons[:, cut:] = "late_layer"
    rules = ((np.isnan(bypass) | np.isnan(induce) | np.isnan(kl), "nan"), (kl > kl_threshold, "kl"),
             (induce < induce_threshold, "no_induce"))
    for bad, why in rules:
        reasons[(reasons == "") & bad] = why
    kept = np.argwhere(reasons == "")
    if not len(kept):
        return None, reasons
    best = min(kept.tolist(), key=lambda pl: (bypass[pl[0], pl[1]], pl[0], pl[1]))
    return (int(best[0]), int(best[1])), reasons


@dataclass
class Selection:
    """What :func:`select_direction` returns.

    Attributes:
        position / position_token / layer: the chosen candidate (position counted from the prompt's end).
        direction: float32 [d_model], the raw mean difference there (activation units; its norm is what
            activation addition adds).
        table: one JSON-ready row per candidate: position, token, layer, bypass_score (mean harmful refusal score
            under ablation), induce_score (mean harmless refusal score under addition), kl (nats), filtered (the
            reason it was dropped, "" if kept). Late layers and zero candidates (layer 0 at the template's own
            tokens: the same embedding for every prompt) are not scored (NaN -> None; filtered "late_layer" / "nan").
        baseline_harmful / baseline_harmless: mean refusal scores with no intervention (nats).
        score: "tokens" or "prefix"; fallback: True when no candidate passed every filter and the induce filter
            was dropped (see :func:`select_direction`).
    """

    position: int
    position_token: str
    layer: int
    direction: Tensor
    table: list[dict]
    baseline_harmful: float
    baseline_harmless: float
    score: str
    fallback: bool = False
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-ready: everything but the direction tensor (its norm is included)."""
        return {"position": self.position, "position_token": self.position_token, "layer": self.layer,
                "direction_norm": float(self.direction.norm()), "baseline_harmful": self.baseline_harmful,
                "baseline_harmless": self.baseline_harmless, "score": self.score, "fallback": self.fallback,
                "settings": self.settings, "table": self.table}


def _num(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


@torch.no_grad()
def select_direction(model, candidates: Candidates, harmful_val: Sequence[str], harmless_val: Sequence[str], *,
                     score: str = "tokens", refusal_tokens: Sequence[int] | None = None,
                     prune_layer_fraction: float = 0.2, kl_threshold: float = 0.1, induce_threshold: float = 0.0,
                     chat: bool = True, batch_size: int = 16, progress: bool = True) -> Selection:
    """Score every candidate on validation requests and apply :func:`select_from_scores`.

    Per candidate (position i, layer l, not in the pruned late layers): the mean harmful refusal score under
    :func:`directional_ablation` (bypass), the mean harmless refusal score under :func:`activation_addition` of the
    raw vector at layer l (induce), and the mean KL of harmless next-token distributions at the last position
    under ablation. Scores are single batched forwards (see the module docstring for ``score``).

    If no candidate passes every filter (expected for a model that does not refuse), the induce filter is dropped,
    the candidate with the lowest bypass among those passing the layer and KL filters is returned with
    ``fallback=True``, and a warning says so.

    Raises:
        InputError: empty validation sets; no candidate passes even the layer and KL filters; a bad ``score``.

    References:
        Arditi et al. 2024, appendix C (selection; thresholds 0.2, 0.1 and 0 are the paper's defaults).
    """
    if not len(harmful_val) or not len(harmless_val):
        raise InputError("give harmful_val and harmless_val requests.")
    from tqdm.auto import tqdm

    harm = RefusalScorer(model, prompt_ids(model, harmful_val, chat=chat), score, refusal_tokens, batch_size)
    safe = RefusalScorer(model, prompt_ids(model, harmless_val, chat=chat), score, refusal_tokens, batch_size)
    safe_lp = safe.logprobs()
    base_harm = float(harm.refusal().mean())
    base_safe = float(safe.refusal(logprobs=safe_lp if score == "tokens" else None).mean())
    dirs = candidates.directions
    n_pos, n_layers = dirs.shape[:2]
    cut = int(n_layers * (1.0 - prune_layer_fraction))
    bypass, induce, kl = (np.full((n_pos, n_layers), np.nan) for _ in range(3))
    todo = [(i, layer) for i in range(n_pos) for layer in range(min(cut, n_layers))]
    for i, layer in tqdm(todo, desc="refusal direction candidates", unit="cand", disable=not progress):
        r = dirs[i, layer]
        if not torch.isfinite(r).all() or r.norm() == 0:
            continue  # NaN scores: filtered as "nan"
        abl = directional_ablation(r, model)
        bypass[i, layer] = float(harm.refusal(abl).mean())
        lp = safe.logprobs(abl)
        kl[i, layer] = _kl(safe_lp, lp)
        induce[i, layer] = float(safe.refusal(activation_addition(r, layer)).mean())
    chosen, reasons = select_from_scores(bypass, induce, kl, prune_layer_fraction=prune_layer_fraction,
                                         kl_threshold=kl_threshold, induce_threshold=induce_threshold)
    fallback = False
    if chosen is None:
        soft = np.where(reasons == "no_induce", "", reasons)
        kept = np.argwhere(soft == "")
        if not len(kept):
            raise InputError(f"no candidate passes the layer and KL filters (KL <= {kl_threshold}); give more or other "
                             "requests, or a larger kl_threshold.")
        chosen = tuple(int(x) for x in min(kept.tolist(), key=lambda pl: (bypass[pl[0], pl[1]], pl[0], pl[1])))
        fallback = True
        warnings.warn(f"no candidate's addition raises the harmless refusal score to {induce_threshold} or more (the "
                      "model may not refuse); chose the lowest-bypass candidate without that filter (fallback=True).",
                      UserWarning, stacklevel=2)
    i, layer = chosen
    table = [{"position": candidates.positions[p], "token": candidates.tokens[p], "layer": lay,
              "bypass_score": _num(bypass[p, lay]), "induce_score": _num(induce[p, lay]), "kl": _num(kl[p, lay]),
              "filtered": str(reasons[p, lay])} for p in range(n_pos) for lay in range(n_layers)]
    settings = {"prune_layer_fraction": prune_layer_fraction, "kl_threshold": kl_threshold,
                "induce_threshold": induce_threshold, "n_harmful_val": len(harmful_val),
                "n_harmless_val": len(harmless_val), "refusal_tokens": harm.ref_ids.tolist() if score == "tokens" else None}
    return Selection(candidates.positions[i], candidates.tokens[i], layer, dirs[i, layer].clone(), table, base_harm,
                     base_safe, score, fallback, settings)


# -- effects ----------------------------------------------------------------------------------------------------
@dataclass
class RefusalEffects:
    """What :func:`refusal_effects` returns (JSON-ready with :meth:`to_dict`).

    Attributes:
        rates: condition -> {"harmful": CI dict, "harmless": CI dict}: substring refusal rates (share in [0, 1]) with
            bootstrap intervals. Conditions: "none", "ablation", "addition", and per control seed s
            "random_ablation/s", "random_addition/s" (a random direction of the same norm).
        ce: condition -> mean next-token CE on the control texts (nats per token); ce_delta: minus "none"'s.
        completions: condition -> {"harmful": [...], "harmless": [...]}.
        layer / alpha / direction_norm / max_new_tokens: the settings.
    """

    rates: dict
    ce: dict
    ce_delta: dict
    completions: dict
    layer: int
    alpha: float
    direction_norm: float
    max_new_tokens: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _default_texts(n: int = 8) -> list[str]:
    from mechscope.data.labelled_builtins import control

    return [e.text for e in control().examples if e.text is not None][:n]


@torch.no_grad()
def refusal_effects(model, direction: Float[Tensor, " d_model"], layer: int, harmful_test: Sequence[str],
                    harmless_test: Sequence[str], *, max_new_tokens: int = 32, alpha: float = 1.0,
                    control_texts: Sequence[str] | None = None, n_random: int = 3, seed: int = 0, chat: bool = True,
                    batch_size: int = 16, n_boot: int = 1000, progress: bool = True) -> RefusalEffects:
    """Greedy completions of harmful and harmless requests with no intervention, under :func:`directional_ablation`
    of ``direction`` and under :func:`activation_addition` of ``alpha * direction`` at ``layer``; refusal rates
    (:func:`refusal_rate`) with bootstrap intervals; CE on ordinary text under each; the same for ``n_random``
    random directions of the same norm (seeds ``seed .. seed + n_random - 1``), the control.

    Args:
        direction: the raw mean difference [d_model] (e.g. :attr:`Selection.direction`); ablation uses its unit
            vector, addition the vector itself.
        control_texts: ordinary texts for the CE (default: 8 paragraphs of the ``control`` data set).
        max_new_tokens: tokens generated per completion (the substring rule reads only these).

    Raises:
        InputError: fewer than 2 requests in a set (no interval); bad sizes.

    References:
        Arditi et al. 2024, sec. 3 (refusal and safety scores under ablation and addition), sec. 4.2 (CE loss).
    """
    from tqdm.auto import tqdm

    if len(harmful_test) < 2 or len(harmless_test) < 2:
        raise InputError("give at least 2 harmful and 2 harmless test requests (a rate needs an interval).")
    sets = {"harmful": prompt_ids(model, harmful_test, chat=chat), "harmless": prompt_ids(model, harmless_test, chat=chat)}
    texts = list(control_texts) if control_texts is not None else _default_texts()
    d = direction.detach().float().to(model.device)
    conditions = {"none": [], "ablation": directional_ablation(d, model),
                  "addition": activation_addition(d, layer, alpha)}
    for k in range(n_random):
        r = random_direction(d, seed + k)
        conditions[f"random_ablation/{seed + k}"] = directional_ablation(r, model)
        conditions[f"random_addition/{seed + k}"] = activation_addition(r, layer, alpha)
    rates, ce, completions = {}, {}, {}
    for name, ivs in tqdm(conditions.items(), desc="refusal effects", unit="cond", disable=not progress):
        completions[name] = {k: generate_texts(model, [torch.tensor(s) for s in seqs], interventions=ivs,
                                               max_new_tokens=max_new_tokens, batch_size=batch_size, progress=False)
                             for k, seqs in sets.items()}
        rates[name] = {k: refusal_rate(v, n_boot=n_boot, seed=seed).to_dict() for k, v in completions[name].items()}
        ce[name] = ce_loss(model, texts, ivs)
    return RefusalEffects(rates, ce, {k: v - ce["none"] for k, v in ce.items()}, completions, int(layer), float(alpha),
                          float(d.norm()), max_new_tokens)


__all__ = ["REFUSAL_OPENINGS", "Candidates", "RefusalEffects", "RefusalScorer", "Selection", "candidate_directions",
           "refusal_effects", "refusal_token_ids", "select_direction", "select_from_scores"]
