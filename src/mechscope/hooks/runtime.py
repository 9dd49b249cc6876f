"""The hook runtime: places canonical sites on a real `transformers` forward and removes them after.

Placement of each site (all on the model's own forward path, nothing recomputed unless asked):

- module outputs (forward hooks): embed, pos_embed, ln1/ln2/ln_final, attention and MLP branches,
  MLP projections, decoder-layer output (resid_post);
- module inputs (forward pre-hooks): decoder-layer input (resid_pre), output projection (hook_z),
  MLP down projection (mlp.hook_post);
- the attention function: transformers 5 dispatches attention through a registry; mechscope
  registers ``mechscope_<impl>`` which calls the original ``<impl>`` unchanged unless q/k/v or the
  pattern are requested. The pattern is only materialised when ``hook_attn_scores`` or
  ``hook_pattern`` is asked for; when it is only cached, the output still comes from the original
  kernel, so logits stay bit-identical;
- derived sites: ``hook_resid_mid`` = resid_pre + attn_out (when only cached, the second norm's input,
  which is that sum as the model computed it; an edit is written back through the attention branch),
  ``hook_result`` = z_h @ W_O[h] per head (an edit replaces the projection output
  with the sum over heads plus b_O). When only cached with ``backward=``, their gradient is routed
  through them with the forward values left bit-identical (:func:`_through`).

Sessions nest (a ``run()`` inside a ``hooks()`` context): each acts in the order it was entered.
Every handle is removed when the context exits, also when the forward raises.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import weakref
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from mechscope.core.errors import HookDidNotFireError, InputError
from mechscope.core.names import axes as site_axes
from mechscope.core.names import parse
from mechscope.hooks.cache import ActivationCache
from mechscope.hooks.derived import defer_pattern, head_results, masked_scores

# attention module -> [(session, layer), ...] of the active sessions, outermost first (they nest)
_ACTIVE: "weakref.WeakKeyDictionary[nn.Module, list[tuple[_Session, int]]]" = weakref.WeakKeyDictionary()
PREFIX = "mechscope_"


class StopForward(Exception):
    """Raised inside the forward to stop at a layer (stop_at_layer); caught by run()."""


@dataclass
class SiteSpec:
    interventions: list = field(default_factory=list)
    cache: bool = False
    grad: bool = False
    hooks: list[Callable[[Tensor], Tensor | None]] = field(default_factory=list)


def _original_attention(impl: str, module: nn.Module) -> Callable:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if impl == "eager":
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[impl]


def _make_wrapper(impl: str) -> Callable:
    def attention(module, query, key, value, attention_mask, **kwargs):
        entries = _ACTIVE.get(module)
        orig = _original_attention(impl, module)
        if not entries:
            return orig(module, query, key, value, attention_mask, **kwargs)
        return _attention(entries, orig, module, query, key, value, attention_mask, **kwargs)

    attention.__name__ = f"{PREFIX}{impl}"
    return attention


def install_attention_wrapper(hf_model: nn.Module) -> str:
    """Switch a model to mechscope's pass-through attention function; returns the original name.

    The registered function calls the original implementation with the same arguments when no
    hook is active, so outputs are bit-identical (tested per family).
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    impl = hf_model.config._attn_implementation or "eager"
    if impl.startswith(PREFIX):
        return impl[len(PREFIX):]
    name = PREFIX + impl
    if name not in AttentionInterface._global_mapping:
        AttentionInterface.register(name, _make_wrapper(impl))
        mask_fn = ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.get(impl)
        if mask_fn is not None:
            ALL_MASK_ATTENTION_FUNCTIONS.register(name, mask_fn)
    hf_model.set_attn_implementation(name)
    return impl


def _through(actual: Tensor, derived: Tensor) -> Tensor:
    """``actual``'s values (bit-identical) with the gradient routed through ``derived`` instead.

    ``derived`` must equal ``actual`` mathematically (e.g. the sum of per-head results plus b_O equals
    the output projection). A derived site that is only cached is otherwise off the autograd path, so
    ``run(backward=...)`` would record no gradient for it.
    """
    return actual.detach() + (derived - derived.detach())


@functools.lru_cache(maxsize=4096)
def _pos_dim(name: str) -> int | None:
    """Index of the ``pos`` axis of the value at a hook name, or None (names are parsed once, not per value)."""
    names = site_axes(name)
    return names.index("pos") if "pos" in names else None


def _store(name: str, t: Tensor, positions, dtype, device) -> Tensor:
    """What the cache keeps of a value or its gradient: ``positions`` along pos, then ``dtype``/``device``.

    Without positions / dtype / device this is ``t.detach()``: a reference to the model's own tensor, not a copy
    (transformers does not modify these tensors in place afterwards; the parity tests compare every cached site
    with an independent recomputation after the forward).
    """
    if positions is not None:
        dim = _pos_dim(name)
        if dim is not None:
            idx = [slice(None)] * t.dim()
            idx[dim] = positions
            t = t[tuple(idx)]
    t = t.detach()
    if dtype is None and device is None:
        return t
    return t.to(dtype=dtype or t.dtype, device=device or t.device)


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _replace_first(out, new):
    return (new, *out[1:]) if isinstance(out, tuple) else new


@functools.cache
def _attn_names(layer: int) -> tuple[tuple[tuple[str, str], ...], str, str]:
    """The attention-function sites of one layer: ((q|k|v, name), ...), scores name, pattern name."""
    pre = f"blocks.{layer}.attn."
    return tuple((nm, f"{pre}hook_{nm}") for nm in ("q", "k", "v")), pre + "hook_attn_scores", pre + "hook_pattern"


def _attention(entries, orig, module, query, key, value, attention_mask, **kwargs):
    """Attention with the q/k/v/scores/pattern sites of every session active on ``module``.

    Sessions act in the order they were entered (outer first, as PyTorch runs module hooks), so a
    ``run()`` inside a ``hooks()`` context sees the outer context's edits and adds its own.
    """
    # transformers layout [batch, heads, pos, d_head]; canonical [batch, pos, heads, d_head]
    qkv = {"q": query, "k": key, "v": value}
    wanted = []
    for session, layer in entries:
        qkv_names, scores_name, pattern_name = _attn_names(layer)
        specs = session.specs
        for nm, name in qkv_names:
            if name in specs:
                qkv[nm] = session.site(name, qkv[nm].transpose(1, 2)).transpose(1, 2)
        if scores_name in specs or pattern_name in specs:
            wanted.append((session, scores_name, pattern_name))
    query, key, value = qkv["q"], qkv["k"], qkv["v"]
    if not wanted:
        return orig(module, query, key, value, attention_mask, **kwargs)
    groups = query.shape[1] // key.shape[1]
    scaling = kwargs.get("scaling")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    if all(s.can_defer(n) for s, sn, pn in wanted for n in (sn, pn) if n in s.specs):
        # only cached: the kernel runs as if unhooked, the scores and pattern are computed when first read
        defer_pattern(wanted, query, key, attention_mask, scaling, kwargs.get("softcap"))
        return orig(module, query, key, value, attention_mask, **kwargs)
    scores, empty_rows = masked_scores(query, key, attention_mask, scaling, kwargs.get("softcap"))
    before = scores
    for session, scores_name, _ in wanted:
        scores = session.site(scores_name, scores)
    pattern = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    if empty_rows or scores is not before:
        # fully masked rows (padding) -> 0; in place unless autograd saved the softmax output
        pattern = torch.nan_to_num(pattern) if pattern.requires_grad else pattern.nan_to_num_()
    before_p = pattern
    for session, _, pattern_name in wanted:
        pattern = session.site(pattern_name, pattern)

    def mix():  # pattern @ values, [batch, pos, n_heads, d_head] like the attention functions return
        v_rep = value.repeat_interleave(groups, dim=1) if groups > 1 else value
        if pattern.shape[0] > 1 and pattern.stride(0) == 0:
            # one pattern expanded over the batch (frozen attention): one matmul over every row's values side by
            # side, so autograd keeps the single pattern rather than a [batch, heads, pos, pos] copy of it
            b, h, q, k = pattern.shape
            d = v_rep.shape[-1]
            out = torch.matmul(pattern[0], v_rep.permute(1, 2, 0, 3).reshape(h, k, b * d))
            return out.reshape(h, q, b, d).permute(2, 1, 0, 3).contiguous()
        return torch.matmul(pattern, v_rep).transpose(1, 2).contiguous()

    if scores is before and pattern is before_p:
        # only cached: the output comes from the model's own kernel, bit-identical
        out = orig(module, query, key, value, attention_mask, **kwargs)
        if any(s.wants_grad(sn) or s.wants_grad(pn) for s, sn, pn in wanted):
            out = (_through(out[0], mix()), *out[1:])
        return out
    return mix(), pattern


class _Session:
    """One activation of hooks on one model: which sites, what to do there, what was seen."""

    def __init__(self, model, specs: dict[str, SiteSpec], cache: ActivationCache | None,
                 cache_positions=None, cache_dtype=None, cache_device=None, stop_at_layer=None,
                 grad_leaf: bool = False):
        self.model = model
        self.specs = specs
        self.cache = cache
        self.cache_positions = cache_positions
        self.cache_dtype = cache_dtype
        self.cache_device = cache_device
        self.stop_at_layer = stop_at_layer
        self.grad_leaf = grad_leaf
        self.fired: dict[str, int] = defaultdict(int)
        self.resid_pre: dict[int, Tensor] = {}
        self.handles: list = []

    # -- the one place where a value meets the user's requests -------------------------------
    def wants(self, name: str) -> bool:
        return name in self.specs

    def wants_grad(self, name: str) -> bool:
        spec = self.specs.get(name)
        return spec is not None and spec.grad and torch.is_grad_enabled()

    def site(self, name: str, value: Tensor) -> Tensor:
        spec = self.specs.get(name)
        if spec is None:
            return value
        self.fired[name] += 1
        if spec.grad and torch.is_grad_enabled() and not value.requires_grad:
            value = value.detach().requires_grad_(True)  # a leaf (e.g. GPT-2's position embedding)
        for iv in spec.interventions:
            # an intervention with sub-sites (a spliced dictionary) routes its inner values through site()
            value = iv.apply(value, emit=self.site) if getattr(iv, "emits", False) else iv.apply(value)
        for fn in spec.hooks:
            out = fn(value)
            if out is not None:
                if not isinstance(out, Tensor) or out.shape != value.shape:
                    raise InputError(f"hook function at {name} must return None or a tensor of shape {tuple(value.shape)}.")
                value = out
        if spec.cache and self.cache is not None:
            if name in self.cache:
                raise InputError(
                    f"{name} fired twice while caching (several forward passes in one hooks() context, "
                    "e.g. generate()). Cache one forward at a time with run()."
                )
            if spec.grad and value.requires_grad:
                grads = self.cache.grads
                value.register_hook(lambda g, name=name: grads.__setitem__(name, self._stored(name, g)))
            self.cache._set(name, self._stored(name, value))
        return value

    def _stored(self, name: str, t: Tensor) -> Tensor:
        """What the cache keeps of a value or its gradient (see :func:`_store`)."""
        return _store(name, t, self.cache_positions, self.cache_dtype, self.cache_device)

    def can_defer(self, name: str) -> bool:
        """Whether the site is only cached (no edit, hook function or gradient needs its value during the forward),
        so that its value may be computed when first read."""
        spec = self.specs.get(name)
        return (spec is not None and spec.cache and self.cache is not None and not spec.interventions
                and not spec.hooks and not spec.grad)

    def defer(self, name: str, compute: Callable[[], Tensor]) -> None:
        """Record that the site fired and cache ``compute()`` (the full value) to run when first read."""
        self.fired[name] += 1
        if name in self.cache:
            raise InputError(f"{name} fired twice while caching (several forward passes in one hooks() context, "
                             "e.g. generate()). Cache one forward at a time with run().")
        where = (self.cache_positions, self.cache_dtype, self.cache_device)
        self.cache._defer(name, lambda: _store(name, compute(), *where))

    def defer_result(self, name: str, z_flat: Tensor, W_O: Tensor, n_heads: int, d_head: int) -> bool:
        """Cache ``hook_result`` to be computed when first read, if it is only cached. Returns True when deferred.

        The per-head outputs cost as much arithmetic as the output projection and n_heads times its memory;
        deferred, a run that caches every hook pays for them only if they are read. What is kept: the
        projection's input (a reference to the model's tensor) and a copy of ``W_O`` taken now (so a later
        weight edit does not change the value); the read computes exactly what the eager path does.
        """
        if not self.can_defer(name):
            return False
        z, W = z_flat.detach(), W_O.detach().clone()
        self.defer(name, lambda: head_results(z, W, n_heads, d_head))
        return True

    # -- installing module hooks -------------------------------------------------------------
    def install(self):
        m = self.model
        a = m.adapter
        names = set(self.specs)
        by_layer: dict[int | None, set[str]] = defaultdict(set)
        for n in names:
            t, layer = parse(n)
            by_layer[layer].add(t)

        def out_hook(site_name, view=None, unview=None):
            def hook(mod, args, out):
                t = _first(out)
                v = view(t) if view else t
                nv = self.site(site_name, v)
                if nv is v:
                    return None
                return _replace_first(out, unview(nv, t) if unview else nv)
            return hook

        def add_fwd(module, fn):
            self.handles.append(module.register_forward_hook(fn))

        def add_pre(module, fn):
            self.handles.append(module.register_forward_pre_hook(fn, with_kwargs=True))

        # global sites
        embed = m.module(a.embed)
        if self.grad_leaf:
            def leaf(mod, args, out):
                if not out.requires_grad:
                    out = out.detach().requires_grad_(True)
                return self.site("hook_embed", out) if "hook_embed" in names else out
            add_fwd(embed, leaf)
        elif "hook_embed" in names:
            add_fwd(embed, out_hook("hook_embed"))
        if "hook_pos_embed" in names:
            # GPT-2 looks positions up once, [1, pos, d_model]; the site shows it per row (a broadcast view)
            rows = {}
            add_fwd(embed, lambda mod, args, out: rows.__setitem__("batch", _first(out).shape[0]))
            add_fwd(m.module(a.pos_embed), out_hook(
                "hook_pos_embed", view=lambda t: t.expand(rows.get("batch", t.shape[0]), *t.shape[1:])))
        if "ln_final.hook_normalized" in names:
            add_fwd(m.module(a.final_norm), out_hook("ln_final.hook_normalized"))

        def contiguous(mod, args, kwargs):
            # transformers slices the kept positions (logits_to_keep) before lm_head; F.linear on that
            # non-contiguous [batch, k, d_model] view takes a batched matmul that copies the whole
            # unembedding per row (measured on CPU, SmolLM2, 144 x 6 tokens: bf16 38x, fp32 1.4x slower)
            if args and isinstance(args[0], Tensor) and not args[0].is_contiguous():
                return (args[0].contiguous(), *args[1:]), kwargs
            return None

        add_pre(m.module(a.unembed), contiguous)

        heads, d_head = m.cfg.n_heads, m.cfg.d_head

        def to_heads(t):
            return t.view(*t.shape[:-1], heads, d_head)

        def from_heads(nv, t):
            return nv.reshape(t.shape)

        for layer in range(m.cfg.n_layers):
            L = f"blocks.{layer}."
            want = by_layer.get(layer, set())
            block = m.layers[layer]
            if self.stop_at_layer is not None and layer == self.stop_at_layer:
                def stop(mod, args, kwargs):
                    raise StopForward
                add_pre(block, stop)
                break
            if not want:
                continue
            attn = m.layer_module(layer, a.attn)
            if want & {"blocks.{L}.attn.hook_q", "blocks.{L}.attn.hook_k", "blocks.{L}.attn.hook_v",
                       "blocks.{L}.attn.hook_attn_scores", "blocks.{L}.attn.hook_pattern"}:
                entry = (self, layer)
                _ACTIVE.setdefault(attn, []).append(entry)
                self.handles.append(_AttnHandle(attn, entry))
            mid = self.specs.get(L + "hook_resid_mid")
            # a resid_mid that is only cached is the second norm's input (the model's own sum, no extra add);
            # one that is edited, hooked or differentiated is computed as resid_pre + attn_out and written back
            # through the attention branch, so the residual and the MLP both see the edit
            mid_computed = mid is not None and bool(mid.interventions or mid.hooks or mid.grad)
            need_pre = "blocks.{L}.hook_resid_pre" in want or mid_computed
            if need_pre:
                def pre_hook(mod, args, kwargs, layer=layer, L=L):
                    if args:
                        t = args[0]
                        nt = self.site(L + "hook_resid_pre", t)
                        self.resid_pre[layer] = nt
                        return ((nt, *args[1:]), kwargs) if nt is not t else None
                    t = kwargs["hidden_states"]
                    nt = self.site(L + "hook_resid_pre", t)
                    self.resid_pre[layer] = nt
                    return (args, {**kwargs, "hidden_states": nt}) if nt is not t else None
                add_pre(block, pre_hook)
            if "blocks.{L}.ln1.hook_normalized" in want:
                add_fwd(m.layer_module(layer, a.ln1), out_hook(L + "ln1.hook_normalized"))
            if "blocks.{L}.attn.hook_z" in want:
                def z_hook(mod, args, kwargs, L=L):
                    t = args[0]
                    v = to_heads(t)
                    nv = self.site(L + "attn.hook_z", v)
                    if nv is v and not self.wants_grad(L + "attn.hook_z"):
                        return None
                    return ((nv.reshape(t.shape), *args[1:]), kwargs)  # a view: values unchanged
                add_pre(m.layer_module(layer, a.o_proj), z_hook)
            if "blocks.{L}.attn.hook_result" in want:
                def result_hook(mod, args, out, L=L, layer=layer):
                    if self.defer_result(L + "attn.hook_result", args[0], m.W_O(layer), heads, d_head):
                        return None
                    res = head_results(args[0], m.W_O(layer), heads, d_head)
                    nres = self.site(L + "attn.hook_result", res)
                    if nres is res and not self.wants_grad(L + "attn.hook_result"):
                        return None
                    b = m.b_O(layer)
                    new = nres.sum(dim=2)
                    new = new + b.to(new.dtype) if b is not None else new
                    return _through(out, new) if nres is res else new
                add_fwd(m.layer_module(layer, a.o_proj), result_hook)
            if "blocks.{L}.hook_attn_out" in want or mid_computed:
                def branch_hook(mod, args, out, L=L, layer=layer, mid_computed=mid_computed):
                    t = _first(out)
                    nt = self.site(L + "hook_attn_out", t)
                    if mid_computed:
                        mid = self.resid_pre[layer] + nt
                        nmid = self.site(L + "hook_resid_mid", mid)
                        if nmid is not mid:
                            nt = nmid - self.resid_pre[layer]
                        elif self.wants_grad(L + "hook_resid_mid"):
                            nt = _through(nt, mid - self.resid_pre[layer])
                    return None if nt is t else _replace_first(out, nt)
                add_fwd(m.layer_module(layer, a.attn_branch), branch_hook)
            if mid is not None and not mid_computed:
                def mid_hook(mod, args, kwargs, L=L):
                    self.site(L + "hook_resid_mid", args[0] if args else next(iter(kwargs.values())))
                add_pre(m.layer_module(layer, a.ln2), mid_hook)
            if "blocks.{L}.ln2.hook_normalized" in want:
                add_fwd(m.layer_module(layer, a.ln2), out_hook(L + "ln2.hook_normalized"))
            if "blocks.{L}.mlp.hook_pre" in want:
                add_fwd(m.layer_module(layer, a.mlp_in), out_hook(L + "mlp.hook_pre"))
            if "blocks.{L}.mlp.hook_pre_linear" in want:
                add_fwd(m.layer_module(layer, a.mlp_in_linear), out_hook(L + "mlp.hook_pre_linear"))
            if "blocks.{L}.mlp.hook_post" in want:
                def post_hook(mod, args, kwargs, L=L):
                    t = args[0]
                    nt = self.site(L + "mlp.hook_post", t)
                    return ((nt, *args[1:]), kwargs) if nt is not t else None
                add_pre(m.layer_module(layer, a.mlp_out_proj), post_hook)
            if "blocks.{L}.hook_mlp_out" in want:
                add_fwd(m.layer_module(layer, a.mlp_branch), out_hook(L + "hook_mlp_out"))
            if "blocks.{L}.hook_resid_post" in want:
                add_fwd(block, out_hook(L + "hook_resid_post"))
        if self.stop_at_layer is not None and self.stop_at_layer >= m.cfg.n_layers:
            def stop_final(mod, args, kwargs):  # after the last block: no final norm, no logits
                raise StopForward
            add_pre(m.module(a.final_norm), stop_final)

    def remove(self):
        for h in reversed(self.handles):
            h.remove()
        self.handles.clear()
        self.resid_pre.clear()

    def check_fired(self):
        missing = [n for n in self.specs if self.fired[n] == 0]
        if missing:
            raise HookDidNotFireError(
                f"requested hook sites never ran: {missing[:6]}{'...' if len(missing) > 6 else ''}. "
                "Was the forward stopped early (stop_at_layer), or did the model skip this module?"
            )


class _AttnHandle:
    """Removes an attention module from the active registry (same interface as a hook handle)."""

    def __init__(self, module, entry):
        self.module = module
        self.entry = entry

    def remove(self):
        entries = _ACTIVE.get(self.module, [])
        if any(e is self.entry for e in entries):
            entries[:] = [e for e in entries if e is not self.entry]
        if not entries:
            _ACTIVE.pop(self.module, None)


@contextlib.contextmanager
def session(model, specs, cache=None, **kwargs):
    """Install hooks for ``specs`` on ``model``; always remove them on exit (also on error)."""
    s = _Session(model, specs, cache, **kwargs)
    try:
        s.install()
        yield s
    finally:
        s.remove()
