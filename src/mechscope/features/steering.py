"""Steering: push a model along a direction (an SAE latent, a contrastive vector) and measure the effect.

- :func:`steer_latents` / :class:`LatentSteer`: add to or clamp dictionary latents through a splice
  with the error term kept (Templeton et al. 2024), :func:`decoder_direction` for plain ``Add``;
- :func:`contrastive_direction` / :func:`add_directions`: contrastive activation addition (CAA);
- :func:`generate` / :func:`compare_generations`: greedy or seeded sampling with the KV cache, steering
  applied from an *absolute* position on (:class:`FromPosition`, :class:`PositionTracker`);
- :func:`measure_steering`: the change in log-probability of target tokens (and of a linear probe
  score), steered minus unsteered, per prompt and on average.

Positions under the KV cache: with the cache on, each forward after the first sees only the new
token(s), so an intervention's ``positions`` (``Add(..., positions=[-1])``) select positions *of that
forward*, and ``positions=None`` means "every position of every forward", i.e. the whole prompt and
then every generated token. :class:`FromPosition` instead selects by the model's own position index
(``position_ids``, or the cache length plus the offset in the forward), which is the same with and
without the cache; :func:`generate` wraps every intervention in it (``from_position``) and refuses
interventions with their own ``positions`` there.

References:
    Turner et al. 2023, "Steering Language Models With Activation Engineering" (ActAdd);
    Rimsky et al. 2024, "Steering Llama 2 via Contrastive Activation Addition", section 3 (CAA: mean
    difference of residual activations over paired prompts, added at every position after the prompt);
    Templeton et al. 2024, "Scaling Monosemanticity", section "Feature steering" (clamping a feature's
    activation while keeping the SAE error term).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechscope.core.errors import InputError, ShapeError
from mechscope.core.names import axes as site_axes
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
            generation, where :func:`generate`'s ``from_position`` is the selector to use).

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
    return model.to_tokens(prompt)


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


# -- absolute positions under the KV cache ----------------------------------------------------------
class PositionTracker:
    """Knows the absolute positions of the tokens in the current forward of a model (KV-cache aware).

    A context manager: while entered, a pre-hook on ``model.hf`` reads each forward's ``position_ids``
    (when given, e.g. by ``transformers``' ``generate`` with left padding) or else the cache length
    (``past_key_values.get_seq_length()``) plus ``arange(new tokens)``.

    Example::

        with PositionTracker(model) as t, model.hooks(interventions=[from_position(Add(...), 7, t)]):
            model.hf.generate(tokens, max_new_tokens=20)
    """

    def __init__(self, model):
        self.model = model
        self.positions: Tensor | None = None  # [rows, pos] (rows 1 when shared by the batch)
        self._handle = None

    def _hook(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        x = ids if ids is not None else kwargs.get("inputs_embeds")
        if x is None:
            raise InputError("PositionTracker: the forward got neither input_ids nor inputs_embeds.")
        pos_ids = kwargs.get("position_ids")
        if pos_ids is not None:
            self.positions = pos_ids if pos_ids.dim() == 2 else pos_ids.unsqueeze(0)
            return
        past = kwargs.get("past_key_values")
        offset = int(past.get_seq_length()) if past is not None else 0
        self.positions = (torch.arange(x.shape[1], device=x.device) + offset).unsqueeze(0)

    def __enter__(self) -> "PositionTracker":
        if self._handle is not None:
            raise InputError("this PositionTracker is already active; make one per context.")
        self._handle = self.model.hf.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self._handle.remove()
        self._handle = None
        self.positions = None


@dataclass(frozen=True, eq=False)
class FromPosition(Replace):
    """Apply ``inner`` only at absolute positions ``>= start`` (correct with and without the KV cache).

    Make it with :func:`from_position` (``site`` is ``inner.site``). A :class:`~mechscope.Replace`
    whose new value is ``inner``'s where the tracked position is ``>= start``.

    Attributes:
        inner: an intervention with ``positions=None`` (Add, Replace, Ablate, LatentEdit, ...) at a site
            with ``batch`` first and a ``pos`` axis.
        start: the first absolute position (0-based; the model's own position index) it acts on.
        tracker: an entered :class:`PositionTracker` of the same model.

    Raises:
        InputError: ``inner`` has its own ``positions`` (relative to each forward: ambiguous under
            the cache) or is a Splice; when applied, no active tracker.
        ShapeError (when applied): the site has no ``pos`` axis, or the tracked positions do not fit.
    """

    inner: Any = None
    start: int = 0
    tracker: Any = field(default=None, repr=False)

    def __post_init__(self):
        if self.inner is None or self.tracker is None or self.site != getattr(self.inner, "site", None):
            raise InputError("make a FromPosition with from_position(inner, start, tracker).")
        if getattr(self.inner, "positions", None) is not None:
            raise InputError(
                f"{type(self.inner).__name__} at {self.inner.site} has positions={self.inner.positions!r}, which "
                "select positions of each forward (with the KV cache: of the new tokens only). Leave positions "
                "None and give the absolute start with from_position / FromPosition.start."
            )
        if getattr(self.inner, "emits", False):
            raise InputError("FromPosition cannot wrap a Splice; pass the dictionary in saes= and wrap the edit.")


    def apply(self, value: Tensor) -> Tensor:
        pos = self.tracker.positions
        if pos is None:
            raise InputError("FromPosition needs an active PositionTracker of this model (use generate(), or "
                             "`with PositionTracker(model) as t, model.hooks(...)`).")
        names = site_axes(self.site)
        if "pos" not in names or names[0] != "batch":
            raise ShapeError(f"FromPosition: {self.site} (axes {names}) has no [batch, ..., pos] axes to select.")
        d = names.index("pos")
        rows, n = pos.shape
        if n != value.shape[d] or rows not in (1, value.shape[0]):
            raise ShapeError(f"FromPosition at {self.site}: the forward has positions of shape {tuple(pos.shape)} "
                             f"but the site's value is {tuple(value.shape)}.")
        shape = [1] * value.dim()
        shape[0], shape[d] = rows, n
        mask = (pos >= self.start).to(value.device).view(shape)
        new = self.inner.apply(value)
        return torch.where(mask, new, value)


def from_position(inner, start: int, tracker: PositionTracker) -> FromPosition:
    """``inner`` restricted to absolute positions ``>= start`` of the forwards ``tracker`` sees."""
    return FromPosition(getattr(inner, "site", None), inner=inner, start=start, tracker=tracker)


# -- generation -------------------------------------------------------------------------------------
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


class Generation(NamedTuple):
    """What :func:`generate` returns.

    Attributes:
        text: the decoded continuation (special tokens skipped), or None without a tokenizer.
        tokens: prompt and continuation, [1, prompt_len + n_new] int64.
        new_tokens: the continuation, [n_new] int64.
        logits: the logits that chose each new token, [n_new, d_vocab] float32 (natural-log units,
            before temperature).
        prompt_len: number of prompt tokens.
    """

    text: str | None
    tokens: Tensor
    new_tokens: Tensor
    logits: Tensor
    prompt_len: int


def _eos_ids(model) -> set[int]:
    ids: set[int] = set()
    tok = getattr(model, "tokenizer", None)
    if tok is not None and tok.eos_token_id is not None:
        ids.add(int(tok.eos_token_id))
    gc = getattr(model.hf, "generation_config", None)
    e = getattr(gc, "eos_token_id", None)
    if e is not None:
        ids.update([int(e)] if isinstance(e, int) else [int(x) for x in e])
    return ids


@torch.no_grad()
def generate(model, prompt: str | Int[Tensor, "pos"] | Int[Tensor, "1 pos"], *, interventions=(), saes=(),
             max_new_tokens: int = 40, temperature: float = 0.0, seed: int = 0,
             from_position: str | int = "prompt_end", stop_at_eos: bool = True,
             use_kv_cache: bool = True) -> Generation:
    """Generate a continuation of one prompt with steering applied to every forward.

    Every intervention is wrapped in :class:`FromPosition`, so it acts at absolute positions
    ``>= start`` whether the KV cache is on or not: ``from_position="prompt_end"`` starts at the last
    prompt token (it predicts the first new token, so every new token is steered; the prompt's own
    earlier activations are not), ``"all"`` at 0, an int at that position (negative: from the prompt's
    end, -1 = ``"prompt_end"``). Splices (``saes``, and those of :class:`LatentSteer`) act everywhere.

    Args:
        model: a HookedModel.
        prompt: text or token ids of one prompt.
        interventions: Add / Replace / Ablate / LatentEdit / :class:`LatentSteer` objects, with
            ``positions=None``.
        saes: dictionaries or splices to splice in.
        max_new_tokens: at most this many new tokens.
        temperature: 0 for greedy decoding (ties to the lowest id); > 0 samples from
            ``softmax(logits / temperature)`` with a private generator seeded by ``seed``.
        stop_at_eos: stop after an end-of-sequence token (tokenizer's and generation config's).
        use_kv_cache: False re-runs the whole sequence each step (slow; the reference).

    Returns:
        :class:`Generation`.

    Raises:
        InputError: an intervention with its own positions, a bad ``from_position`` or temperature,
            a prompt longer than the context.
    """
    if temperature < 0 or max_new_tokens < 0:
        raise InputError(f"temperature and max_new_tokens must be >= 0, got {temperature}, {max_new_tokens}.")
    tokens = _prompt_tokens(model, prompt)
    n_prompt = tokens.shape[1]
    if from_position == "prompt_end":
        start = n_prompt - 1
    elif from_position == "all":
        start = 0
    elif isinstance(from_position, int) and not isinstance(from_position, bool):
        start = from_position if from_position >= 0 else n_prompt + from_position
    else:
        raise InputError(f"from_position must be 'prompt_end', 'all' or an int, got {from_position!r}.")
    splices, plain = _flatten(interventions, saes)
    tracker = PositionTracker(model)
    wrapped = [FromPosition(iv.site, inner=iv, start=start, tracker=tracker) for iv in plain]
    eos = _eos_ids(model) if stop_at_eos else set()
    g = torch.Generator(device="cpu").manual_seed(seed)
    ctx_len = getattr(model.cfg, "n_ctx", None)
    if ctx_len:
        max_new_tokens = min(max_new_tokens, max(ctx_len - n_prompt, 0))
    seq = tokens
    new, step_logits = [], []
    with contextlib.ExitStack() as stack:
        stack.enter_context(tracker)
        stack.enter_context(model.hooks(interventions=wrapped, saes=splices))
        past = None
        for step in range(max_new_tokens):
            if use_kv_cache:
                inp = seq if past is None else seq[:, -1:]
                out = model.hf(input_ids=inp, past_key_values=past, use_cache=True)
                past = out.past_key_values
            else:
                out = model.hf(input_ids=seq, use_cache=False)
            logits = out.logits[0, -1].float()
            if temperature == 0:
                nxt = int(logits.argmax())
            else:
                probs = torch.softmax(logits / temperature, dim=-1).cpu()
                nxt = int(torch.multinomial(probs, 1, generator=g))
            step_logits.append(logits.cpu())
            new.append(nxt)
            seq = torch.cat([seq, torch.tensor([[nxt]], dtype=seq.dtype, device=seq.device)], dim=1)
            if nxt in eos:
                break
    new_t = torch.tensor(new, dtype=torch.long)
    tok = getattr(model, "tokenizer", None)
    text = tok.decode(new, skip_special_tokens=True) if tok is not None else None
    logits_t = torch.stack(step_logits) if step_logits else torch.zeros(0, model.cfg.d_vocab)
    return Generation(text, seq.cpu(), new_t, logits_t, n_prompt)


def compare_generations(model, prompt, steer, **kwargs) -> tuple[str | None, str | None]:
    """``(unsteered text, steered text)``: :func:`generate` without and with ``steer`` (same kwargs).

    ``steer`` is an intervention, a :class:`LatentSteer`, or a list of them.
    """
    base = generate(model, prompt, **kwargs).text
    return base, generate(model, prompt, interventions=steer, **kwargs).text


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
    """

    target_ids: Tensor
    logprob_base: Tensor
    logprob_steered: Tensor
    probe_base: Tensor | None = None
    probe_steered: Tensor | None = None

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
                     probe: tuple[str, Tensor] | None = None) -> SteeringEffect:
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
    for p in prompts:
        tokens = _prompt_tokens(model, p)
        for key, kw in (("base", base_kw), ("steered", steer_kw)):
            logits, cache = model.run(tokens, cache=[probe_name] if probe_name else None,
                                      cache_positions=slice(-1, None) if probe_name else None,
                                      logits_to_keep=1, **kw)
            lp = torch.log_softmax(logits[0, -1].float(), dim=-1).cpu()
            rows[key].append(lp[ids])
            if probe_name:
                a = cache[probe_name][0, -1].float()
                probes[key].append((a * probe[1].to(a.device).float()).sum().cpu())
    pb = torch.stack(probes["base"]) if probe_name else None
    ps = torch.stack(probes["steered"]) if probe_name else None
    return SteeringEffect(ids, torch.stack(rows["base"]), torch.stack(rows["steered"]), pb, ps)
