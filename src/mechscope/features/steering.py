"""Steering: push a model along a direction (an SAE latent, a contrastive vector) and measure the effect.

- :func:`steer_latents` / :class:`LatentSteer`: add to or clamp dictionary latents through a splice
  with the error term kept (Templeton et al. 2024), :func:`decoder_direction` for plain ``Add``;
- :func:`contrastive_direction` / :func:`add_directions`: contrastive activation addition (CAA);
- generation with steering from an absolute position under the KV cache: :mod:`mechscope.features.generation`;
- :func:`measure_steering`: the change in log-probability of target tokens (and of a linear probe
  score), steered minus unsteered, per prompt and on average.

Positions under the KV cache: with the cache on, each forward after the first sees only the new
token(s), so an intervention's ``positions`` (``Add(..., positions=[-1])``) select positions *of that
forward*, and ``positions=None`` means "every position of every forward", i.e. the whole prompt and
then every generated token. :class:`~mechscope.features.generation.FromPosition` instead selects by the model's own position index
(``position_ids``, or the cache length plus the offset in the forward), which is the same with and
without the cache; :func:`~mechscope.features.generation.generate` wraps every intervention in it (``from_position``) and refuses
interventions with their own ``positions`` there.

References:
    Turner et al. 2023, "Steering Language Models With Activation Engineering" (ActAdd);
    Rimsky et al. 2024, "Steering Llama 2 via Contrastive Activation Addition", section 3 (CAA: mean
    difference of residual activations over paired prompts, added at every position after the prompt);
    Templeton et al. 2024, "Scaling Monosemanticity", section "Feature steering" (clamping a feature's
    activation while keeping the SAE error term).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from mechscope.core.errors import InputError, ShapeError
from mechscope.core.names import parse
from mechscope.dictionaries.splice import Splice
from mechscope.hooks.interventions import Add, Replace

MODES = ("add", "clamp")


# -- latent steering ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class LatentEdit(Replace):
    """Add to (``mode="add"``) or set (``mode="clamp"``) some latents at a ``[batch, pos, d_sae]`` site.

    Usually made by :class:`LatentSteer`; the site is a spliced dictionary's
    ``<hook>.sae.hook_sae_acts_post``. Other latents and unselected positions are left bit-identical.
    (A :class:`~mechscope.Replace` whose new value is computed from the latents, so it goes wherever
    interventions go.)

    Attributes:
        latents: latent indices.
        values: one value per latent, in the dictionary's activation units.
        mode: ``"add"`` (activation + value) or ``"clamp"`` (activation := value).
    """

    latents: tuple[int, ...] = ()
    values: tuple[float, ...] = ()
    mode: str = "add"

    def __post_init__(self):
        if self.mode not in MODES:
            raise InputError(f"LatentEdit.mode must be 'add' or 'clamp', got {self.mode!r}.")
        if len(self.latents) != len(self.values) or not self.latents:
            raise InputError(f"LatentEdit at {self.site}: give one value per latent (got {len(self.latents)} "
                             f"latents and {len(self.values)} values).")

    def apply(self, value: Tensor) -> Tensor:
        idx = torch.as_tensor(self.latents, dtype=torch.long, device=value.device)
        if int(idx.max()) >= value.shape[-1]:
            raise ShapeError(f"LatentEdit at {self.site}: latent {int(idx.max())} is out of range for "
                             f"{value.shape[-1]} latents.")
        vals = torch.as_tensor(self.values, dtype=value.dtype, device=value.device)
        new = value.clone()
        new[..., idx] = value[..., idx] + vals if self.mode == "add" else vals.expand_as(value[..., idx])
        return self._select(value, new)


@dataclass(frozen=True, eq=False)
class LatentSteer:
    """Steer with dictionary latents: a splice of ``dictionary`` plus a :class:`LatentEdit` of its latents.

    Pass it wherever this module takes interventions, or to ``model.run(tokens, **steer.run_kwargs())``.

    Attributes:
        dictionary: a :class:`~mechscope.dictionaries.SparseDictionary` (SAE or transcoder).
        latents: ``{latent index: value}`` (stored as a sorted tuple of pairs), values in the
            dictionary's activation units.
        mode: ``"add"``: activation + value, which with ``error_term=True`` adds exactly
            ``value * W_dec[latent]`` to the dictionary's output site; ``"clamp"``: activation := value
            (Templeton et al. 2024), which adds ``(value - activation) * W_dec[latent]``.
        error_term: keep the reconstruction error, so only the edit changes the model. With False the
            reconstruction replaces the activation everywhere the splice writes (steering plus the
            dictionary's own reconstruction loss).
        positions: positions of the edit (as for any intervention; see the module docstring for
            generation, where :func:`~mechscope.features.generation.generate`'s ``from_position`` is the selector to use).

    Raises:
        InputError: an unknown mode, no latents, a latent index out of ``[0, d_sae)``, a non-finite value.
    """

    dictionary: Any
    latents: Any
    mode: str = "add"
    error_term: bool = True
    positions: Any = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise InputError(f"mode must be 'add' or 'clamp', got {self.mode!r}.")
        pairs = tuple(sorted((int(k), float(v)) for k, v in dict(self.latents).items()))
        if not pairs:
            raise InputError("LatentSteer needs at least one latent: latents={index: value}.")
        d_sae = self.dictionary.cfg.d_sae
        for i, v in pairs:
            if not 0 <= i < d_sae:
                raise InputError(f"latent {i} is out of range for a dictionary of d_sae={d_sae}.")
            if not torch.isfinite(torch.tensor(v)):
                raise InputError(f"the value for latent {i} is {v}; give a finite number.")
        object.__setattr__(self, "latents", pairs)

    @property
    def site(self) -> str:
        """The latent site the edit acts on, ``<hook_out>.sae.hook_sae_acts_post``."""
        return f"{self.dictionary.cfg.hook_out}.sae.hook_sae_acts_post"

    def splice(self) -> Splice:
        return Splice(self.dictionary, error_term=self.error_term)

    def edit(self) -> LatentEdit:
        return LatentEdit(self.site, positions=self.positions, latents=tuple(i for i, _ in self.latents),
                          values=tuple(v for _, v in self.latents), mode=self.mode)

    def run_kwargs(self) -> dict[str, list]:
        """``{"saes": [splice], "interventions": [edit]}`` for ``model.run`` / ``model.hooks``."""
        return {"saes": [self.splice()], "interventions": [self.edit()]}


def steer_latents(dictionary, latents: Mapping, mode: str = "add", *, error_term: bool = True,
                  positions=None) -> LatentSteer:
    """Steering by dictionary latents; see :class:`LatentSteer` (this is its constructor as a function).

    Example::

        steer = steer_latents(sae, {1234: 20.0}, mode="clamp")
        logits, _ = model.run(tokens, **steer.run_kwargs())
        print(generate(model, "I went to", interventions=[steer]).text)

    References:
        Templeton et al. 2024, "Scaling Monosemanticity", "Feature steering".
    """
    return LatentSteer(dictionary, latents, mode=mode, error_term=error_term, positions=positions)


def decoder_direction(dictionary, latent: int) -> Float[Tensor, "d_out"]:
    """Latent ``latent``'s decoder row ``W_dec[latent]`` (float32, detached), for ``Add(hook_out, ...)``.

    ``Add(d.cfg.hook_out, decoder_direction(d, i), scale=v)`` equals ``steer_latents(d, {i: v})``
    (with the error term) without splicing the dictionary in.

    Raises:
        InputError: if ``latent`` is outside ``[0, d_sae)``.
    """
    d_sae = dictionary.cfg.d_sae
    if not 0 <= int(latent) < d_sae:
        raise InputError(f"latent {latent} is out of range for a dictionary of d_sae={d_sae}.")
    return dictionary.W_dec[int(latent)].detach().float().clone()


def promoted_tokens(model, direction: Float[Tensor, "d_model"], k: int = 10) -> list[tuple[int, str, float]]:
    """The tokens a residual direction promotes most directly: top ``k`` of ``direction @ W_U``.

    The "logit weights" of Bricken et al. 2023: the final norm is ignored (its gain is folded in, its
    scale is not), so this ranks tokens, it does not predict the size of a logit change.

    Returns:
        ``[(token id, token string or "", weight)]``, largest first; weights in logit units per unit of
        direction.
    """
    W_U = model.W_U.float()
    gain = _final_norm_gain(model)
    d = direction.float().to(W_U.device)
    w = (d * gain if gain is not None else d) @ W_U
    top = w.topk(k)
    tok = getattr(model, "tokenizer", None)
    return [(int(i), tok.decode([int(i)]) if tok is not None else "", float(v))
            for v, i in zip(top.values, top.indices)]


def _final_norm_gain(model) -> Tensor | None:
    norm = model.module(model.adapter.final_norm)
    w = getattr(norm, "weight", None)
    if w is None:
        return None
    w = w.detach().float()
    return 1 + w if getattr(model.adapter, "norm", "") == "rms1p" else w


# -- contrastive activation addition ----------------------------------------------------------------
def _hook_name(model, layer: int | str) -> str:
    name = f"blocks.{layer}.hook_resid_post" if isinstance(layer, int) else layer
    return model.resolve([name])[0]


def _prompt_tokens(model, prompt) -> Tensor:
    if isinstance(prompt, Tensor):
        t = prompt if prompt.dim() == 2 else prompt.unsqueeze(0)
        if t.shape[0] != 1:
            raise InputError(f"give one prompt at a time as a [pos] or [1, pos] tensor, got {tuple(t.shape)}.")
        return model._tokens(t, None)
    if not isinstance(prompt, str):
        raise InputError(f"a prompt must be a string or token ids, got {type(prompt).__name__}.")
    tokens = model.to_tokens(prompt)
    if tokens.shape[1] == 0:  # e.g. only whitespace for a tokenizer that drops it, and no BOS
        raise InputError(f"the prompt {prompt[:40]!r} has no tokens for this tokenizer; give some text.")
    return tokens


def contrastive_direction(model, positive_prompts: Sequence, negative_prompts: Sequence,
                          layers: int | str | Sequence[int | str], *, position: str = "last",
                          ) -> dict[str, Float[Tensor, "d_model"]]:
    """Contrastive steering vectors: mean activation difference, positive minus negative, per hook.

    ``v_hook = mean_i (a_hook(pos_i) - a_hook(neg_i))`` where ``a`` is the activation at the last token
    (``position="last"``, CAA) or the mean over the prompt's tokens (``"mean"``; the BOS position is
    left out, its norm is orders of magnitude larger on many models). Prompts are run one at a time, so
    they may have different lengths; the pairs are (positive_prompts[i], negative_prompts[i]).

    Args:
        model: a HookedModel.
        positive_prompts, negative_prompts: equally many strings (or [pos] token tensors).
        layers: a layer (int: ``blocks.{L}.hook_resid_post``), a hook name, or a list of them.
        position: ``"last"`` or ``"mean"``.

    Returns:
        ``{hook name: direction [d_model] float32}`` in activation units; apply it with
        :func:`add_directions` (or ``Add(hook, v, scale=...)``).

    Raises:
        InputError: unequal or empty prompt lists, an unknown ``position``, a bad hook name.

    References:
        Rimsky et al. 2024, section 3 (mean difference over paired prompts); Turner et al. 2023 (ActAdd,
        one pair).
    """
    if position not in ("last", "mean"):
        raise InputError(f"position must be 'last' or 'mean', got {position!r}.")
    if len(positive_prompts) != len(negative_prompts) or not positive_prompts:
        raise InputError(f"give equally many positive and negative prompts (pairs), got {len(positive_prompts)} "
                         f"and {len(negative_prompts)}.")
    names = [_hook_name(model, x) for x in ([layers] if isinstance(layers, (int, str)) else layers)]
    bos = getattr(getattr(model, "tokenizer", None), "bos_token_id", None)
    layer_ids = [parse(n)[1] for n in names]  # run only the blocks the hooks need
    stop = None if None in layer_ids or max(layer_ids) + 1 >= model.cfg.n_layers else max(layer_ids) + 1

    def acts(prompt) -> dict[str, Tensor]:
        tokens = _prompt_tokens(model, prompt)
        _, cache = model.run(tokens, cache=names, cache_positions=slice(-1, None) if position == "last" else None,
                             stop_at_layer=stop)
        out = {}
        for n in names:
            a = cache[n][0].float()  # [pos, d_model]
            if position == "mean" and a.shape[0] > 1 and bos is not None and int(tokens[0, 0]) == bos:
                a = a[1:]
            out[n] = a.mean(0)
        return out

    total = {n: 0.0 for n in names}
    for p, q in zip(positive_prompts, negative_prompts):
        ap, aq = acts(p), acts(q)
        for n in names:
            total[n] = total[n] + (ap[n] - aq[n])
    return {n: total[n] / len(positive_prompts) for n in names}


def add_directions(directions: Mapping[str, Tensor], scale: float = 1.0, positions=None) -> list:
    """``[Add(hook, v, scale, positions) for hook, v in directions.items()]``: apply steering vectors."""
    return [Add(h, direction=v, scale=scale, positions=positions) for h, v in directions.items()]


# -- steering arguments ----------------------------------------------------------------------------
def _flatten(interventions, saes) -> tuple[list, list]:
    """Expand LatentSteers into (one splice per dictionary, edits); plain interventions pass through."""
    items = [interventions] if isinstance(interventions, LatentSteer) or hasattr(interventions, "apply") \
        else list(interventions or ())
    splices: dict[int, Splice] = {}
    for s in saes or ():
        sp = s if isinstance(s, Splice) else (s.as_intervention() if hasattr(s, "as_intervention") else s)
        splices[id(sp.dictionary)] = sp
    plain = []
    for it in items:
        if isinstance(it, LatentSteer):
            have = splices.get(id(it.dictionary))
            if have is None:
                splices[id(it.dictionary)] = it.splice()
            elif have.error_term != it.error_term:
                raise InputError(f"two splices of the dictionary at {it.dictionary.cfg.hook_out} disagree on "
                                 "error_term; give each dictionary once.")
            plain.append(it.edit())
        elif getattr(it, "emits", False):
            splices.setdefault(id(it.dictionary), it)
        else:
            plain.append(it)
    return list(splices.values()), plain


def steering_kwargs(steer, saes=()) -> dict[str, list]:
    """``{"saes": ..., "interventions": ...}`` for ``model.run``/``model.hooks`` from interventions and
    :class:`LatentSteer` objects (one splice per dictionary)."""
    sp, iv = _flatten(steer, saes)
    return {"saes": sp, "interventions": iv}


# -- measured effect --------------------------------------------------------------------------------
@dataclass(frozen=True)
class SteeringEffect:
    """The measured effect of steering on the next-token distribution at each prompt's last position.

    Attributes (P prompts, T target tokens; log-probabilities in nats, float32):
        target_ids: [T] token ids.
        logprob_base, logprob_steered: [P, T] log p(target | prompt) without / with steering.
        delta_logprob, delta_prob: [P, T] steered minus unsteered (log-probability; probability).
        mean_delta_logprob, mean_delta_prob: [T] means over prompts.
        probe_base, probe_steered, delta_probe: [P] ``direction . activation`` at the probe hook's last
            position (activation units x direction units), or None without a probe.
        kl: [P] KL(steered || unsteered) of the whole next-token distribution, nats: how far steering
            moved the prediction at all, whatever the targets.
        raised_ids, raised_delta_prob: [P, R] the R tokens whose probability steering raised most, and by
            how much (probability, not log-probability, so improbable tokens do not dominate).
    """

    target_ids: Tensor
    logprob_base: Tensor
    logprob_steered: Tensor
    probe_base: Tensor | None = None
    probe_steered: Tensor | None = None
    kl: Tensor | None = None
    raised_ids: Tensor | None = None
    raised_delta_prob: Tensor | None = None

    @property
    def delta_logprob(self) -> Tensor:
        return self.logprob_steered - self.logprob_base

    @property
    def delta_prob(self) -> Tensor:
        return self.logprob_steered.exp() - self.logprob_base.exp()

    @property
    def mean_delta_logprob(self) -> Tensor:
        return self.delta_logprob.mean(0)

    @property
    def mean_delta_prob(self) -> Tensor:
        return self.delta_prob.mean(0)

    @property
    def delta_probe(self) -> Tensor | None:
        return None if self.probe_base is None else self.probe_steered - self.probe_base


def _target_ids(model, targets) -> Tensor:
    if isinstance(targets, Tensor):
        return targets.reshape(-1).long().cpu()
    items = [targets] if isinstance(targets, (str, int)) else list(targets)
    ids = []
    for t in items:
        if isinstance(t, int):
            ids.append(t)
            continue
        row = model.to_tokens(t, prepend_bos=False)[0].tolist()
        if len(row) != 1:
            raise InputError(f"target {t!r} is {len(row)} tokens {model.to_str_tokens(t)}; give single tokens "
                             "(often with a leading space, e.g. ' Paris').")
        ids.append(row[0])
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def measure_steering(model, prompts: Sequence, steer, target_tokens, *, saes=(),
                     probe: tuple[str, Tensor] | None = None, n_raised: int = 5) -> SteeringEffect:
    """Change in next-token log-probability of ``target_tokens``, steered minus unsteered, per prompt.

    Each prompt is run alone (lengths may differ), once as is and once with ``steer``; the next
    position is the prompt's last. ``saes`` are spliced into both runs (so with ``error_term=False``
    the baseline includes the reconstruction too; LatentSteer's own splice keeps the error term by
    default, making its baseline the clean model).

    Args:
        model: a HookedModel.
        prompts: strings or [pos] token tensors.
        steer: an intervention, a :class:`LatentSteer`, or a list of them (positions relative to each
            prompt, as in ``model.run``).
        target_tokens: a string/int, a list of single-token strings or ids, or a tensor of ids.
        probe: optional ``(hook name, direction [d_model])``: also report ``direction . activation`` at
            the last position of that hook (cached after the steering interventions at that hook).
        n_raised: how many of the tokens steering raised most to report (``raised_ids``).

    Returns:
        :class:`SteeringEffect`.

    Raises:
        InputError: no prompts, a target that is not one token.
    """
    if len(prompts) == 0:
        raise InputError("measure_steering needs at least one prompt.")
    ids = _target_ids(model, target_tokens)
    base_kw = steering_kwargs((), saes)
    steer_kw = steering_kwargs(steer, saes)
    probe_name = model.resolve([probe[0]])[0] if probe is not None else None
    rows = {"base": [], "steered": []}
    probes = {"base": [], "steered": []}
    kls, raised_ids, raised = [], [], []
    for p in prompts:
        tokens = _prompt_tokens(model, p)
        full = {}
        for key, kw in (("base", base_kw), ("steered", steer_kw)):
            logits, cache = model.run(tokens, cache=[probe_name] if probe_name else None,
                                      cache_positions=slice(-1, None) if probe_name else None,
                                      logits_to_keep=1, **kw)
            lp = torch.log_softmax(logits[0, -1].float(), dim=-1).cpu()
            full[key] = lp
            rows[key].append(lp[ids])
            if probe_name:
                a = cache[probe_name][0, -1].float()
                probes[key].append((a * probe[1].to(a.device).float()).sum().cpu())
        lp_s, lp_b = full["steered"], full["base"]
        kls.append((lp_s.exp() * (lp_s - lp_b)).sum())
        top = (lp_s.exp() - lp_b.exp()).topk(n_raised)
        raised_ids.append(top.indices)
        raised.append(top.values)
    pb = torch.stack(probes["base"]) if probe_name else None
    ps = torch.stack(probes["steered"]) if probe_name else None
    return SteeringEffect(ids, torch.stack(rows["base"]), torch.stack(rows["steered"]), pb, ps,
                          kl=torch.stack(kls), raised_ids=torch.stack(raised_ids), raised_delta_prob=torch.stack(raised))
