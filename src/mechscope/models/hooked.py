"""HookedModel: a real `transformers` causal LM with canonical hook points, caching and interventions.

The wrapped module is the HuggingFace model itself (``model.hf``); nothing is re-implemented. With no
hooks attached, ``model.run(tokens).logits`` equals ``model.hf(tokens).logits`` exactly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from mechscope.core.errors import InputError, SiteUnavailableError
from mechscope.core.names import SITES, expand, parse, resolve
from mechscope.hooks.cache import ActivationCache
from mechscope.hooks.runtime import SiteSpec, StopForward, install_attention_wrapper, session
from mechscope.models.adapters import Adapter, adapter_for
from mechscope.models.placement import check_device, input_device, materialized, placement


@dataclass(frozen=True)
class ModelConfig:
    """Dimensions of a wrapped model (read from the transformers config and weights)."""

    name: str
    family: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_mlp: int
    d_vocab: int
    n_ctx: int
    attn_implementation: str
    dtype: str


class RunResult(NamedTuple):
    """What :meth:`HookedModel.run` returns: ``logits, cache = model.run(...)``.

    Attributes:
        logits: [batch, pos, d_vocab] (natural-log units, pre-softmax), or None with stop_at_layer.
        cache: the ActivationCache (empty when nothing was asked); ``cache.metric`` holds the value of
            the ``backward`` metric when one was given.
    """

    logits: Tensor | None
    cache: ActivationCache


def _weight_in_out(module: nn.Module, conv1d: bool) -> Tensor:
    """Weight as [d_in, d_out] (right-multiplication), from nn.Linear's [out, in] or Conv1D's [in, out]; an
    offloaded weight (device_map) is read in onto its module's execution device."""
    w = materialized(module, "weight")
    return w if conv1d else w.T


class HookedModel:
    """A transformers causal LM with canonical hook points.

    Args:
        hf_model: a loaded ``transformers`` causal LM of a supported family.
        tokenizer: its tokenizer (optional; needed for text input).
        name: display name.

    Raises:
        UnsupportedArchitectureError: for a family without an adapter (message lists supported ones).

    Note:
        Wrapping switches the model's attention implementation to ``mechscope_<impl>``, a registered
        pass-through to the original ``<impl>``: outputs are bit-identical.
    """

    def __init__(self, hf_model: nn.Module, tokenizer=None, *, name: str | None = None):
        self.adapter: Adapter = adapter_for(hf_model.config)
        self.hf = hf_model.eval()
        self.tokenizer = tokenizer
        impl = install_attention_wrapper(hf_model)
        self.layers = self.module(self.adapter.layers)
        c = hf_model.config.get_text_config()
        n_heads = c.num_attention_heads
        d_model = c.hidden_size
        d_head = getattr(c, "head_dim", None) or d_model // n_heads
        mlp_in = self.layer_module(0, self.adapter.mlp_in)
        self.cfg = ModelConfig(
            name=name or getattr(c, "_name_or_path", "") or type(hf_model).__name__,
            family=self.adapter.family,
            n_layers=len(self.layers),
            d_model=d_model,
            n_heads=n_heads,
            n_kv_heads=getattr(c, "num_key_value_heads", None) or n_heads,
            d_head=d_head,
            d_mlp=mlp_in.weight.shape[1 if self.adapter.conv1d else 0],
            d_vocab=self.module(self.adapter.unembed).weight.shape[0],
            n_ctx=getattr(c, "max_position_embeddings", None) or 10**9,
            attn_implementation=impl,
            dtype=str(next(hf_model.parameters()).dtype).replace("torch.", ""),
        )
        self._missing = self.adapter.missing_sites(c)
        self.text_config = c
        self._names = expand([t for t in SITES if t not in self._missing], self.cfg.n_layers)

    # -- modules and weights ---------------------------------------------------------------
    def module(self, path: str) -> nn.Module:
        return self.hf.get_submodule(path)

    def layer_module(self, layer: int, path: str) -> nn.Module:
        return self.layers[layer].get_submodule(path)

    @property
    def device(self) -> torch.device:
        """Where token ids go and logits come back (for a split model, accelerate's main device)."""
        return input_device(self.hf)

    def placement(self) -> dict[str, str]:
        """What runs where: module name -> device, ``"disk -> cpu"`` for a module stored on disk and run on cpu
        (read in at each forward), ``{"": device}`` for a model that was not split (see ``load(device_map=)``)."""
        return placement(self.hf)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf.parameters()).dtype

    @property
    def W_U(self) -> Float[Tensor, "d_model d_vocab"]:
        """Unembedding matrix [d_model, d_vocab] (a transposed view of lm_head.weight; read in when offloaded)."""
        return materialized(self.module(self.adapter.unembed), "weight").T

    @property
    def b_U(self) -> Tensor | None:
        return materialized(self.module(self.adapter.unembed), "bias")

    @property
    def W_E(self) -> Float[Tensor, "d_vocab d_model"]:
        return materialized(self.module(self.adapter.embed), "weight")

    def W_O(self, layer: int) -> Float[Tensor, "n_heads d_head d_model"]:
        """Per-head output projection of a layer, [n_heads, d_head, d_model]."""
        w = _weight_in_out(self.layer_module(layer, self.adapter.o_proj), self.adapter.conv1d)
        return w.reshape(self.cfg.n_heads, self.cfg.d_head, self.cfg.d_model)

    def b_O(self, layer: int) -> Tensor | None:
        """Output-projection bias [d_model], or None."""
        return materialized(self.layer_module(layer, self.adapter.o_proj), "bias")

    # -- names -----------------------------------------------------------------------------
    def hook_names(self) -> dict[str, str]:
        """Every hook point of this model -> its axes, in forward order."""
        return {n: SITES[parse(n)[0]][0] for n in self._names}

    def resolve(self, patterns: str | Iterable[str], extra: Sequence[str] = ()) -> list[str]:
        """Resolve names and globs to concrete hook names of this model.

        Args:
            extra: further valid names for this call, e.g. the ``<site>.sae.*`` sites of spliced dictionaries.

        Raises:
            SiteUnavailableError: for a site this architecture lacks (says why and what to use).
            HookNameError: for an unknown name (lists the closest valid names).
        """
        if isinstance(patterns, str):
            patterns = [patterns]
        patterns = list(patterns)
        for p in patterns:
            try:
                t, _ = parse(p)
            except KeyError:
                continue
            if t in self._missing:
                raise SiteUnavailableError(f"{p}: {self._missing[t]}")
            _, layer = parse(p)
            if layer is not None and layer >= self.cfg.n_layers:
                raise InputError(f"{p}: layer {layer} does not exist; this model has layers 0..{self.cfg.n_layers - 1}.")
        return resolve(patterns, self._names + [n for n in extra if n not in self._names])

    # -- tokens ----------------------------------------------------------------------------
    def _need_tokenizer(self):
        if self.tokenizer is None:
            raise InputError("this HookedModel has no tokenizer; pass token ids, or load with mechscope.load().")
        return self.tokenizer

    def to_tokens(self, text: str | Sequence[str], prepend_bos: bool | None = None) -> Int[Tensor, "batch pos"]:
        """Tokenize text to [batch, pos] int64 ids on the model's device.

        Args:
            prepend_bos: None uses the tokenizer's own default; True makes sure the first token is
                BOS; False adds no special tokens.

        Raises:
            InputError: if the prompts tokenize to different lengths, or exceed the context length.
        """
        tok = self._need_tokenizer()
        texts = [text] if isinstance(text, str) else list(text)
        if not texts:
            raise InputError("no text given.")
        rows = []
        for t in texts:
            ids = tok(t, add_special_tokens=prepend_bos is not False)["input_ids"]
            if prepend_bos and tok.bos_token_id is not None and (not ids or ids[0] != tok.bos_token_id):
                ids = [tok.bos_token_id] + ids
            rows.append(ids)
        lengths = {len(r) for r in rows}
        if len(lengths) > 1:
            raise InputError(
                f"the prompts tokenize to different lengths {sorted(lengths)}; batch prompts of equal token "
                "length (check with model.to_str_tokens), or run them one at a time."
            )
        tokens = torch.tensor(rows, dtype=torch.long, device=self.device)
        self._check_length(tokens)
        return tokens

    def to_str_tokens(self, text_or_tokens) -> list[str]:
        tok = self._need_tokenizer()
        ids = text_or_tokens if isinstance(text_or_tokens, Tensor) else self.to_tokens(text_or_tokens)[0]
        if ids.dim() > 1:
            ids = ids[0]
        return [tok.decode([int(i)]) for i in ids]

    def _check_length(self, tokens: Tensor):
        if tokens.shape[-1] > self.cfg.n_ctx:
            raise InputError(
                f"input has {tokens.shape[-1]} tokens but {self.cfg.name} has a context of {self.cfg.n_ctx}; "
                "truncate the prompt or split it into windows."
            )

    def _tokens(self, inputs, prepend_bos) -> Tensor:
        if isinstance(inputs, Tensor):
            tokens = inputs if inputs.dim() == 2 else inputs.unsqueeze(0)
            if tokens.dtype not in (torch.int64, torch.int32):
                raise InputError(f"token ids must be an integer tensor, got {tokens.dtype}.")
            if tokens.numel() and (int(tokens.max()) >= self.cfg.d_vocab or int(tokens.min()) < 0):
                raise InputError(f"token ids must lie in [0, {self.cfg.d_vocab}); got {int(tokens.min())}..{int(tokens.max())}.")
            self._check_length(tokens)
            return tokens.to(self.device)
        return self.to_tokens(inputs, prepend_bos=prepend_bos)

    # -- hooks -------------------------------------------------------------------------------
    def _specs(self, cache, interventions, grad, hooks=None, saes=()) -> dict[str, SiteSpec]:
        interventions = list(interventions or ())
        for d in saes or ():  # dictionaries (anything with as_intervention()) or ready-made splices
            interventions.append(d.as_intervention() if hasattr(d, "as_intervention") else d)
        specs: dict[str, SiteSpec] = {}
        extra: list[str] = []  # sites that exist only in this call: the spliced dictionaries' latents
        for iv in interventions:
            if getattr(iv, "emits", False):
                iv.check_model(self)
                extra += iv.sub_sites()
        for name in self.resolve(cache, extra) if cache else []:
            specs.setdefault(name, SiteSpec()).cache = True
            specs[name].grad = grad
        for iv in interventions:
            if not hasattr(iv, "apply") or not hasattr(iv, "site"):
                raise InputError(f"interventions must be Patch/Ablate/Add/Replace/Splice objects, got {type(iv).__name__}.")
            (name,) = self.resolve([iv.site], extra) if not any(c in iv.site for c in "*?[") else (None,)
            if name is None:
                raise InputError(f"an intervention needs one concrete site, not the pattern {iv.site!r}.")
            specs.setdefault(name, SiteSpec()).interventions.append(iv)
            for site, fn in (iv.captures().items() if getattr(iv, "emits", False) else ()):
                specs.setdefault(self.resolve([site])[0], SiteSpec()).hooks.append(fn)
        for name, fn in (hooks or {}).items():
            for n in self.resolve([name], extra):
                specs.setdefault(n, SiteSpec()).hooks.append(fn)
        return specs

    @contextlib.contextmanager
    def hooks(self, *, cache: Iterable[str] | str | None = None, interventions: Sequence = (),
              functions: dict[str, Callable[[Tensor], Tensor | None]] | None = None,
              saes: Sequence = (), cache_positions=None, cache_dtype: torch.dtype | None = None,
              cache_device=None):
        """Context manager: every forward of ``model.hf`` inside it runs with the given hooks.

        Yields the ActivationCache being filled. Every hook is removed on exit, also on error.

        Args:
            cache: hook names or glob patterns to record.
            interventions: Patch / Ablate / Add / Replace objects, applied in order per site.
            functions: raw hook functions ``name -> fn(value) -> Tensor | None`` (None keeps the value).
            saes: dictionaries to splice in (see :meth:`run`).
        """
        if cache_device is not None:
            check_device(cache_device, "cache_device")
        c = ActivationCache(positions=cache_positions)
        specs = self._specs(cache, interventions, grad=False, hooks=functions, saes=saes)
        with session(self, specs, c, cache_positions=cache_positions, cache_dtype=cache_dtype,
                     cache_device=cache_device):
            yield c

    def run(
        self,
        inputs: str | Sequence[str] | Int[Tensor, "batch pos"] | Int[Tensor, "pos"],  # 1-D: one row
        *,
        cache: Iterable[str] | str | None = None,
        interventions: Sequence = (),
        functions: dict[str, Callable[[Tensor], Tensor | None]] | None = None,
        saes: Sequence = (),
        cache_positions: int | slice | Sequence[int] | None = None,
        cache_dtype: torch.dtype | None = None,
        cache_device: str | torch.device | None = None,
        stop_at_layer: int | None = None,
        backward: Callable[[Tensor], Tensor] | None = None,
        prepend_bos: bool | None = None,
        attention_mask: Tensor | None = None,
        logits_to_keep: int = 0,
    ) -> RunResult:
        """One forward pass with caching and interventions.

        Args:
            inputs: text, a list of texts of equal token length, or token ids [batch, pos].
            cache: hook names or globs to record, e.g. ``["blocks.*.hook_resid_post"]``.
            interventions: Patch / Ablate / Add / Replace objects.
            functions: raw hook functions by site name.
            saes: sparse dictionaries (SAEs, transcoders) to splice in, each replacing its ``hook_out``
                with its reconstruction; pass ``Splice(d, error_term=True)`` to keep the model's output
                exact while exposing the latents. Their sites ``<hook>.sae.hook_sae_acts_post`` (and
                ``hook_sae_input|acts_pre|recons|error|output``) can be cached, patched and ablated in
                the same call.
            cache_positions: keep only these positions of cached values (pos axis; query pos for patterns).
            cache_dtype / cache_device: how and where cached values (and their gradients) are stored. The
                default keeps each value where it was produced: on the model's device, or, for a model split
                with ``device_map``, on the execution device of the module it came from (so a cache of a model
                split over two GPUs spans both; ``cache_device="cpu"`` gathers it in host memory, which is also
                what frees the GPUs for the next batch).
            stop_at_layer: run blocks 0..L-1 only (no logits); cache what those blocks produce.
            backward: ``metric(logits) -> scalar``; the metric is back-propagated and the gradient of
                every cached site is stored in ``cache.grads`` (value in ``cache.metric``).
            prepend_bos: see :meth:`to_tokens`.
            logits_to_keep: if > 0, compute logits only for the last that many positions (faster).

        Returns:
            RunResult(logits [batch, pos, d_vocab], cache).

        Raises:
            HookNameError / SiteUnavailableError: bad or unavailable hook names.
            InputError: bad input (lengths, context, token ids, stop_at_layer out of range).
            ShapeError: an intervention value that does not fit its site.
            HookDidNotFireError: a requested site did not run.
        """
        tokens = self._tokens(inputs, prepend_bos)
        if cache_device is not None:
            check_device(cache_device, "cache_device")
        if stop_at_layer is not None and not 0 <= stop_at_layer <= self.cfg.n_layers:
            raise InputError(f"stop_at_layer must be in 0..{self.cfg.n_layers}, got {stop_at_layer}.")
        if stop_at_layer is not None and backward is not None:
            raise InputError("backward needs logits; it cannot be combined with stop_at_layer.")
        specs = self._specs(cache, interventions, grad=backward is not None, hooks=functions, saes=saes)
        if stop_at_layer is not None:
            late = [n for n in specs if (parse(n)[1] is not None and parse(n)[1] >= stop_at_layer)
                    or n == "ln_final.hook_normalized"]
            if late:
                raise InputError(f"stop_at_layer={stop_at_layer} stops before {late[:4]}; cache earlier sites.")
        c = ActivationCache(positions=cache_positions)
        c.metric = None
        kwargs = {"use_cache": False}
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        if logits_to_keep:
            kwargs["logits_to_keep"] = logits_to_keep
        grad_ctx = torch.enable_grad() if backward is not None else torch.no_grad()
        logits = None
        with grad_ctx, session(self, specs, c, cache_positions=cache_positions, cache_dtype=cache_dtype,
                               cache_device=cache_device, stop_at_layer=stop_at_layer,
                               grad_leaf=backward is not None) as s:
            try:
                logits = self.hf(tokens, **kwargs).logits
            except StopForward:
                logits = None
            s.check_fired()
            if backward is not None:
                metric = backward(logits)
                if not isinstance(metric, Tensor) or metric.numel() != 1:
                    raise InputError("backward must return a scalar tensor (e.g. mean logit difference).")
                metric.backward()
                c.metric = float(metric.detach())
                logits = logits.detach()
        return RunResult(logits, c)

    def __repr__(self) -> str:
        c = self.cfg
        return (f"HookedModel({c.name!r}, family={c.family}, layers={c.n_layers}, d_model={c.d_model}, "
                f"heads={c.n_heads}/{c.n_kv_heads} kv, dtype={c.dtype})")
