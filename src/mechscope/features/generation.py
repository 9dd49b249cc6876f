"""Generation with steering applied from an absolute position, with the KV cache.

With the cache on, each forward after the first sees only the new token(s), so an intervention's
``positions`` select positions *of that forward*, and ``positions=None`` means every position of every
forward. :class:`FromPosition` selects by the model's own position index instead (``position_ids``, or
the cache length plus the offset in the forward), which is the same with and without the cache;
:func:`generate` wraps every intervention in it and refuses interventions with their own ``positions``.

References:
    Turner et al. 2023, "Steering Language Models With Activation Engineering" (ActAdd); Rimsky et al. 2024,
    "Steering Llama 2 via Contrastive Activation Addition" (steering every position after the prompt).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from jaxtyping import Int
from torch import Tensor

from mechscope.core.errors import InputError, ShapeError
from mechscope.core.names import axes as site_axes
from mechscope.features.steering import _flatten, _prompt_tokens
from mechscope.hooks.interventions import Replace


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


def eos_ids(model) -> set[int]:
    """The end-of-sequence token ids generation stops at: the tokenizer's and the generation config's."""
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
    eos = eos_ids(model) if stop_at_eos else set()
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
