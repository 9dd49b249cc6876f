"""Edge-level forward passes on the real `transformers` forward: patched edges, and per-receiver gradients.

Every receiver of :class:`~mechscope.circuits.graph.Graph` gets its own input. For a head's query, key or
value that means its own normalised input and its own columns of the projection: the layer's norm module
runs on the receiver's input, the projection's rows for that head are applied, and the projection module's
output is replaced in those columns only; the model's own code then applies everything after the
projection (per-head q/k norms, rotary embeddings, attention, the output projection). An MLP receiver
replaces its norm's output, the logits receiver the final norm's. Columns come from the adapter
(``qkv``, ``qkv_layout``), so no family has code of its own here.

Two uses:

- **Patched edges, many masks per forward** (:func:`patched_logits`): variants are stacked along the batch
  axis; at each receiver, input = input in this run + Σ over the variant's patched edges of (source output
  on the corrupted run - source output in this run). Only receivers with a patched edge are recomputed,
  so with nothing patched the forward is the model's own, bit for bit.
- **Receiver gradients** (:class:`GradientRun`): every receiver reads a private copy of its residual
  input, so the gradient of the metric with respect to each receiver's input is captured separately
  (what EAP multiplies with the source differences), optionally with the input embeddings or one node
  group's outputs interpolated (EAP-IG).

Shape key: V variants, B prompts, P positions, D d_model, S sources, R receivers, H heads.

References:
    Hanna et al. 2024, "Have Faith in Faithfulness" (EAP-IG; its evaluate_graph is the mask trick);
    Li et al. 2023 / auto-circuit (patching edges by their source difference in one forward).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mechscope.circuits.binary_masks import BinaryMasks
from mechscope.circuits.graph import Graph
from mechscope.core.errors import InputError


# -- the outputs of every node on one run --------------------------------------------------------------------
@dataclass
class Sources:
    """What every node wrote on one run of ``B`` prompts.

    Attributes:
        input: ``[B, P, D]`` the residual stream entering block 0 (embeddings, with positions where learned).
        z: per layer ``[B, P, H, d_head]``, the heads' mixed values (a head's output is ``z_h @ W_O[h]``).
        mlp: per layer ``[B, P, D]``, the MLP's output.
        logits: ``[B, k, d_vocab]`` the run's last ``k`` logits.
    """

    input: Tensor
    z: list[Tensor]
    mlp: list[Tensor]
    logits: Tensor

    @property
    def batch(self) -> int:
        return self.input.shape[0]


@torch.no_grad()
def capture_sources(model, tokens: Tensor, *, logits_to_keep: int = 1) -> Sources:
    """Run ``tokens`` once and keep every node's output (see :class:`Sources`)."""
    n = model.cfg.n_layers
    sites = ["blocks.0.hook_resid_pre", "blocks.*.attn.hook_z", "blocks.*.hook_mlp_out"]
    logits, cache = model.run(tokens, cache=sites, logits_to_keep=logits_to_keep)
    return Sources(cache["blocks.0.hook_resid_pre"], [cache[f"blocks.{L}.attn.hook_z"] for L in range(n)],
                   [cache[f"blocks.{L}.hook_mlp_out"] for L in range(n)], logits)


def head_outputs(model, layer: int, z: Tensor) -> Tensor:
    """Per-head outputs ``[H, B, P, D]`` of ``z [B, P, H, d_head]`` (``z_h @ W_O[h]``, without b_O)."""
    W_O = model.W_O(layer)
    return torch.einsum("bphd,hdm->hbpm", z, W_O.to(z.dtype))


# -- where each receiver's columns sit -----------------------------------------------------------------------
def _weights(module: nn.Module, conv1d: bool) -> tuple[Tensor, Tensor | None]:
    """(weight as [d_in, d_out], bias [d_out] or None)."""
    w = module.weight if conv1d else module.weight.T
    return w, getattr(module, "bias", None)


def qkv_columns(model) -> dict[str, list[tuple[int, Tensor]]]:
    """``kind -> [(projection module number, output columns)]`` per head (q) or key/value head (k, v)."""
    a, c = model.adapter, model.cfg
    H, G, dh = c.n_heads, c.n_kv_heads, c.d_head
    ar = torch.arange(dh)
    if a.qkv_layout == "separate":
        return {"q": [(0, h * dh + ar) for h in range(H)], "k": [(1, g * dh + ar) for g in range(G)],
                "v": [(2, g * dh + ar) for g in range(G)]}
    if a.qkv_layout == "concat":
        kv = G * dh
        return {"q": [(0, h * dh + ar) for h in range(H)], "k": [(0, H * dh + g * dh + ar) for g in range(G)],
                "v": [(0, H * dh + kv + g * dh + ar) for g in range(G)]}
    if a.qkv_layout == "interleaved":
        if G != H:
            raise InputError(f"{model.cfg.name}: an interleaved q/k/v layout with grouped keys is not supported.")
        return {"q": [(0, h * 3 * dh + ar) for h in range(H)], "k": [(0, h * 3 * dh + dh + ar) for h in range(H)],
                "v": [(0, h * 3 * dh + 2 * dh + ar) for h in range(H)]}
    raise InputError(f"unknown qkv_layout {a.qkv_layout!r} in the {a.family} adapter.")


class Layout:
    """What the engine needs of a model, gathered once: per layer the norm, MLP-norm and projection modules,
    and per projection module its receivers' weights stacked ``[n, D, d_head]`` (bias ``[n, d_head]``) and
    output columns ``[n, d_head]``, so a layer's heads are projected in one batched matmul."""

    def __init__(self, model, graph: Graph):
        a = model.adapter
        cols = qkv_columns(model)
        n = graph.n_layers
        self.ln1 = [model.layer_module(L, a.ln1) for L in range(n)]
        self.ln2 = [model.layer_module(L, a.ln2) for L in range(n)]
        self.proj = [[model.layer_module(L, p) for p in a.qkv] for L in range(n)]
        self.o_proj = [model.layer_module(L, a.o_proj) for L in range(n)]
        self.mlp = [model.layer_module(L, a.mlp_branch) for L in range(n)]
        self.final_norm = model.module(a.final_norm)
        self.attn = [graph.receivers_of_layer(L) for L in range(n)]
        self.module_of: dict[int, tuple[int, int]] = {}  # receiver -> (module number, row in its stack)
        self.stack: list[list[tuple[Tensor, Tensor | None, Tensor]]] = []  # [layer][module] (W, b, cols)
        for L in range(n):
            per_module: list[list[Tensor]] = [[] for _ in a.qkv]
            for r in self.attn[L]:
                rec = graph.receivers[r]
                m, c = cols[rec.kind][rec.index]
                self.module_of[r] = (m, len(per_module[m]))
                per_module[m].append(c)
            stacks = []
            for m, module in enumerate(self.proj[L]):
                w, b = _weights(module, a.conv1d)
                c = torch.stack(per_module[m]).to(w.device)  # [n, d_head]
                stacks.append((w[:, c].permute(1, 0, 2), None if b is None else b[c], c))
            self.stack.append(stacks)
        self.mlp_receiver = [graph.receivers_of_layer(L, ("mlp",))[0] for L in range(n)]
        self.logits_receiver = graph.n_receivers - 1


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _replace_first(out, new):
    return (new, *out[1:]) if isinstance(out, tuple) else new


def _input_arg(args, kwargs) -> Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_input(args, kwargs, new):
    if args:
        return (new, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": new}


# -- the hooks of one forward --------------------------------------------------------------------------------
class _Hooks:
    """Raw module hooks for one forward; ``remove()`` always runs (context manager)."""

    def __init__(self):
        self.handles = []

    def pre(self, module, fn):
        self.handles.append(module.register_forward_pre_hook(fn, with_kwargs=True))

    def post(self, module, fn):
        self.handles.append(module.register_forward_hook(fn))

    def remove(self):
        for h in reversed(self.handles):
            h.remove()
        self.handles.clear()


class _ReceiverInputs:
    """Gives receivers their own inputs. Subclasses decide each receiver's input (``inputs``)."""

    def __init__(self, model, graph: Graph, layout: Layout):
        self.model, self.graph, self.lay = model, graph, layout
        self.x_attn: dict[int, Tensor] = {}
        self.normed: dict[int, tuple[list[int], Tensor]] = {}

    def inputs(self, receivers: list[int], x: Tensor) -> tuple[list[int], Tensor | None]:
        """(the receivers whose input differs from ``x``, their inputs ``[R', B, P, D]``)."""
        raise NotImplementedError

    def normed_inputs(self, receivers: list[int], x: Tensor, norm) -> tuple[list[int], Tensor | None]:
        """(the receivers whose input differs from ``x``, ``norm`` of their inputs ``[R', B, P, D]``)."""
        recv, xr = self.inputs(receivers, x)
        return recv, norm(xr) if recv else None

    def install(self, hooks: _Hooks) -> None:
        lay = self.lay
        for L in range(self.graph.n_layers):
            def ln1_pre(mod, args, kwargs, L=L):
                x = _input_arg(args, kwargs)
                self.on_layer_input(L, x)
                self.normed[L] = self.normed_inputs(lay.attn[L], x, lay.ln1[L].forward)
            hooks.pre(lay.ln1[L], ln1_pre)
            for m, module in enumerate(lay.proj[L]):
                def proj_post(mod, args, out, L=L, m=m):
                    recv, normed = self.normed[L]
                    if m == len(lay.proj[L]) - 1:  # the layer's last projection: the copies are not needed after
                        del self.normed[L]
                    mine = [(i, lay.module_of[r][1]) for i, r in enumerate(recv) if lay.module_of[r][0] == m]
                    if not mine:
                        return None
                    return _replace_first(out, self.project(L, m, mine, normed, _first(out)))
                hooks.post(module, proj_post)

            def ln2_post(mod, args, out, L=L):
                recv, xr = self.inputs([lay.mlp_receiver[L]], args[0])
                return lay.ln2[L].forward(xr[0]) if recv else None
            hooks.post(lay.ln2[L], ln2_post)

        def final_post(mod, args, out):
            recv, xr = self.inputs([lay.logits_receiver], args[0])
            return lay.final_norm.forward(xr[0]) if recv else None
        hooks.post(lay.final_norm, final_post)

    def project(self, L: int, m: int, mine: list[tuple[int, int]], normed: Tensor, t: Tensor) -> Tensor:
        """Projection module ``m``'s output ``t [B, P, n_cols]`` with the columns of the receivers ``mine`` ((index
        in ``normed``, row in the module's weight stack)) computed from their own normalised inputs."""
        W, b, cols = self.lay.stack[L][m]
        rows = torch.tensor([j for _, j in mine], device=W.device)
        x = normed[torch.tensor([i for i, _ in mine], device=normed.device)]  # [n, B, P, D]
        vals = torch.matmul(x.flatten(1, 2), W[rows].to(x.dtype))  # [n, B*P, d_head]
        if b is not None:
            vals = vals + b[rows].to(x.dtype)[:, None, :]
        vals = vals.permute(1, 0, 2).reshape(*t.shape[:-1], -1)  # [B, P, n*d_head], receiver-major
        c = cols[rows].flatten()
        if c.numel() == t.shape[-1]:  # every column replaced: keep the autograd graph clean
            return vals[..., torch.argsort(c)]
        new = t.clone()
        new[..., c] = vals
        return new

    def on_layer_input(self, layer: int, x: Tensor) -> None:
        """Called with the residual stream entering a layer's attention (before its receivers read it)."""


class _Patched(BinaryMasks, _ReceiverInputs):
    """Receivers read their input plus, for each patched edge, (corrupted - current) source output.

    ``masks`` is ``[V, R, S]`` (1 = patched) and the batch is V variants of B prompts, variant-major. Float
    masks take the general product over every upstream source; bool masks the cheaper path of
    :mod:`mechscope.circuits.binary_masks` (same values up to float rounding).
    """

    def __init__(self, model, graph, layout, corrupt: Sources, masks: Tensor):
        super().__init__(model, graph, layout)
        self.V = masks.shape[0]
        self.B = corrupt.batch
        self.masks = masks
        self.corrupt = corrupt
        self.active = (masks != 0).any(dim=0)  # [R, S]: patched in some variant
        self.need_source = self.active.any(dim=0)  # [S]
        self.need_receiver = self.active.any(dim=1)  # [R]
        self.D: Tensor | None = None  # [S, V*B, P, D] corrupted - current output, filled as the forward runs
        # binary masks: running sums of the stored rows of D, (number of sources summed, sum [V*B, P, D])
        self.binary = masks.dtype == torch.bool
        self.prefix: list[tuple[int, Tensor]] = []
        self.in_D = torch.zeros(graph.n_sources, dtype=torch.bool, device=masks.device)  # sources recorded so far
        self.ready = torch.zeros(graph.n_sources, dtype=torch.bool, device=masks.device)  # rows of D filled in
        self.dz: dict[int, Tensor] = {}  # binary masks: layer -> z difference [V*B, P, H, d_head]; head rows of D
        # are filled from it when a receiver first needs them

    def _rep(self, t: Tensor) -> Tensor:
        return t.repeat(self.V, *([1] * (t.dim() - 1)))

    def _store(self, rows, delta: Tensor | None, total: Tensor | None = None) -> None:
        """Record sources ``rows`` (an index, or a layer's heads as a slice): their rows of D (``delta``), or for
        binary masks possibly only their sum ``total`` [V*B, P, D] (the rows then come from :attr:`dz`)."""
        if self.D is None:
            VB, P, D = (delta if delta is not None else total).shape[-3:]
            like = delta if delta is not None else total
            alloc = torch.empty if self.binary else torch.zeros  # the binary path reads filled rows only
            self.D = alloc(self.graph.n_sources, VB, P, D, dtype=like.dtype, device=like.device)
        if delta is not None:
            self.D[rows] = delta
            self.ready[rows] = True
        self.in_D[rows] = True
        if self.binary:
            end = rows.stop if isinstance(rows, slice) else rows + 1
            if total is None:
                total = delta.sum(0) if delta.dim() == 4 else delta
            self.prefix.append((end, total if not self.prefix else self.prefix[-1][1] + total))

    def on_layer_input(self, layer, x):
        if layer == 0 and bool(self.need_source[0]):
            self._store(0, self._rep(self.corrupt.input).to(x.dtype) - x)

    def install(self, hooks):
        super().install(hooks)
        g, lay = self.graph, self.lay
        for L in range(g.n_layers):
            heads, mlp_row = g.layer_sources(L)
            if bool(self.need_source[heads].any()):
                def o_pre(mod, args, kwargs, L=L, heads=heads):
                    z = args[0]
                    z = z.view(*z.shape[:-1], g.n_heads, -1)
                    dz = self._rep(self.corrupt.z[L]).to(z.dtype) - z
                    if self.binary:  # the heads' sum now (o_proj without its bias), single heads when needed
                        self.dz[L] = dz
                        W_O = self.model.W_O(L)
                        self._store(heads, None, dz.flatten(-2) @ W_O.reshape(-1, W_O.shape[-1]).to(dz.dtype))
                    else:
                        self._store(heads, head_outputs(self.model, L, dz))
                hooks.pre(lay.o_proj[L], o_pre)
            if bool(self.need_source[mlp_row]):
                def mlp_post(mod, args, out, L=L, row=mlp_row):
                    t = _first(out)
                    self._store(row, self._rep(self.corrupt.mlp[L]).to(t.dtype) - t)
                hooks.post(lay.mlp[L], mlp_post)

    def inputs(self, receivers, x):
        recv = [r for r in receivers if bool(self.need_receiver[r])]
        if not recv or self.D is None:
            return [], None
        S = max(self.graph.upstream_count(self.graph.receivers[r]) for r in recv)
        if self.binary:
            return recv, self.binary_inputs(recv, S, x)
        V, VB = self.V, x.shape[0]
        M = self.masks[:, recv, :S].to(x.dtype)  # [V, R', S]
        Dv = self.D[:S].view(S, V, -1).transpose(0, 1)  # [V, S, B*P*D]
        delta = torch.bmm(M, Dv)  # [V, R', B*P*D]
        delta = delta.view(V, len(recv), VB // V, *x.shape[1:]).transpose(0, 1).reshape(len(recv), *x.shape)
        return recv, x.unsqueeze(0) + delta

    def normed_inputs(self, receivers, x, norm):
        recv = [r for r in receivers if bool(self.need_receiver[r])]
        if not self.binary or not recv or self.D is None:
            return super().normed_inputs(receivers, x, norm)
        S = max(self.graph.upstream_count(self.graph.receivers[r]) for r in recv)
        return recv, self.binary_normed_inputs(recv, S, x, norm)

    def project(self, L, m, mine, normed, t):
        if not isinstance(normed, tuple):  # float masks, or every variant of the layer mid-sized
            return super().project(L, m, mine, normed, t)
        return self.binary_project(L, m, mine, normed, t)


@torch.no_grad()
def patched_logits(model, graph: Graph, clean_tokens: Tensor, corrupt: Sources, patched: Tensor, *,
                   logits_to_keep: int = 1, layout: Layout | None = None) -> Tensor:
    """Logits of the clean prompts with the given edges patched, one forward for all variants.

    Args:
        model: the HookedModel the graph was built from.
        graph: its :class:`Graph`.
        clean_tokens: ``[B, P]`` int64.
        corrupt: :func:`capture_sources` of the corrupted prompts (same ``B`` and ``P``).
        patched: bool ``[V, n_edges]`` (or ``[n_edges]``): True = the edge carries the corrupted value. A
            float mask patches by that fraction (input + w * (corrupted - current)), e.g. for finite
            differences.
        logits_to_keep: logits of the last this many positions.
        layout: ``Layout(model, graph)``, to reuse across calls (gathered here if None).

    Returns:
        ``[V, B, logits_to_keep, d_vocab]`` logits (natural-log units). With nothing patched the hooks change
        nothing: the logits are the model's own, bit for bit.

    Raises:
        InputError: shapes that do not fit.
    """
    if patched.dim() == 1:
        patched = patched.unsqueeze(0)
    if patched.shape[-1] != graph.n_edges:
        raise InputError(f"the mask has {patched.shape[-1]} edges; {graph.model_name}'s graph has {graph.n_edges}.")
    if corrupt.input.shape[:2] != clean_tokens.shape:
        raise InputError(f"corrupted sources of {tuple(corrupt.input.shape[:2])} (batch, pos) do not fit clean tokens "
                         f"of {tuple(clean_tokens.shape)}; capture them from the corrupted prompts of the same task.")
    V = patched.shape[0]
    masks = graph.dense(patched.to(model.device) if patched.is_floating_point() else patched.bool().to(model.device))
    tokens = clean_tokens.to(model.device).repeat(V, 1)
    hooks = _Hooks()
    try:
        _Patched(model, graph, layout or Layout(model, graph), corrupt, masks).install(hooks)
        logits = model.hf(tokens, use_cache=False, logits_to_keep=logits_to_keep).logits
    finally:
        hooks.remove()
    return logits.view(V, clean_tokens.shape[0], *logits.shape[1:])


# -- receiver gradients --------------------------------------------------------------------------------------
class _Split(_ReceiverInputs):
    """Every receiver reads a private copy of its input; ``on_grad(receivers, grad [R', B, P, D])`` is called
    for each layer's receivers during the backward pass. Optional edits of the forward: ``input_value``
    replaces the residual stream entering block 0; ``source_edit = (kind, layer, fn)`` replaces one node
    group's output by ``fn(output)``: ``("input", 0, fn)`` the residual entering block 0, ``("heads", L, fn)``
    the layer's z ``[B, P, H, d_head]``, ``("mlp", L, fn)`` its MLP output."""

    def __init__(self, model, graph, layout, on_grad: Callable[[list[int], Tensor], None],
                 input_value: Tensor | None = None, source_edit=None):
        super().__init__(model, graph, layout)
        self.on_grad = on_grad
        self.input_value = input_value
        self.source_edit = source_edit

    def inputs(self, receivers, x):
        xr = x.unsqueeze(0).repeat(len(receivers), *([1] * x.dim()))
        if not xr.requires_grad:
            xr.requires_grad_(True)
        xr.register_hook(lambda g, receivers=list(receivers): self.on_grad(receivers, g))
        return list(receivers), xr

    def install(self, hooks):
        lay, kind = self.lay, (self.source_edit[0] if self.source_edit else None)
        block0 = self.model.layers[0]
        if self.input_value is not None or kind == "input":
            def in_pre(mod, args, kwargs):
                x = _input_arg(args, kwargs)
                new = self.input_value.to(x.dtype) if self.input_value is not None else x
                if kind == "input":
                    new = self.source_edit[2](new)
                return _with_input(args, kwargs, new)
            hooks.pre(block0, in_pre)
        if kind == "heads":
            L = self.source_edit[1]

            def z_pre(mod, args, kwargs):
                z = args[0]
                new = self.source_edit[2](z.view(*z.shape[:-1], self.graph.n_heads, -1)).reshape(z.shape)
                return (new, *args[1:]), kwargs
            hooks.pre(lay.o_proj[L], z_pre)
        if kind == "mlp":
            L = self.source_edit[1]
            hooks.post(lay.mlp[L], lambda mod, args, out: _replace_first(out, self.source_edit[2](_first(out))))
        super().install(hooks)


@contextlib.contextmanager
def split_receivers(model, graph: Graph, on_grad, *, input_value=None, source_edit=None, layout: Layout | None = None):
    """Context: forwards of ``model.hf`` inside give every receiver a private input copy (see :class:`_Split`)."""
    hooks = _Hooks()
    try:
        _Split(model, graph, layout or Layout(model, graph), on_grad, input_value, source_edit).install(hooks)
        yield
    finally:
        hooks.remove()
