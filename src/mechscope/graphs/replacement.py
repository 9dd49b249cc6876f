"""The local replacement model of one prompt (Ameisen et al. 2025, "Circuit Tracing", section 2).

Every MLP is replaced by its transcoder plus an error node (the true MLP output minus the reconstruction,
per layer and position); attention patterns and normalisation scales are frozen at their values on the
prompt. With the error nodes the replacement model reproduces the real forward on that prompt (to float
rounding); with everything frozen it is linear in the residual stream, so each direct effect between two
nodes is an exact product of a gradient and an activation.

Both passes run on the real `transformers` model:

- :func:`replacement_state` runs the real forward once (mechscope's hooks cache the MLP inputs and outputs
  and the attention patterns; module hooks record each norm's input) and encodes each layer's MLP input with
  its transcoder;
- :func:`frozen_forward` runs the frozen, linear replacement model on ``batch`` copies of the prompt: norms
  apply the recorded scales, attention uses the recorded patterns (a ``hook_pattern`` function), and each MLP
  writes the constant ``reconstruction - skip + error`` plus its skip connection on the current input, plus a
  leaf tensor (gradients at the MLP outputs) and optional deltas (interventions on features).

Both run where the model runs (the transcoders must sit on the same device): the state's tensors stay on that
device, except ``tokens``, which is kept on the CPU.

Shape key: B batch copies, P positions, D d_model, L layers, H heads, S d_sae.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import Tensor

from mechscope.analysis._norm import FrozenNorm, freeze_norm
from mechscope.core.errors import InputError
from mechscope.graphs.transcoders import TranscoderSet


@dataclass
class ActiveFeatures:
    """The non-zero transcoder features of one prompt, in (layer, position, feature) order.

    Attributes:
        index: int64 ``[n, 3]`` rows ``(layer, pos, feature)``, on the model's device.
        values: ``[n]`` activations (the transcoder's units, model dtype), on the model's device.
    """

    index: Tensor
    values: Tensor

    def __len__(self) -> int:
        return int(self.index.shape[0])

    def layer(self, L: int) -> tuple[Tensor, Tensor, Tensor]:
        """(row numbers, positions, feature ids) of layer ``L``'s active features."""
        rows = torch.nonzero(self.index[:, 0] == L).flatten()
        return rows, self.index[rows, 1], self.index[rows, 2]


@dataclass
class ReplacementState:
    """What the local replacement model freezes for one prompt.

    Every tensor but ``tokens`` is on the model's device.

    Attributes:
        tokens: int64 ``[P]``, on the CPU.
        logits: ``[P, d_vocab]`` the real model's logits.
        features: the active features.
        mlp_in: ``[L, P, D]`` each MLP's real input (the transcoder's input, ``ln2.hook_normalized``).
        mlp_out: ``[L, P, D]`` each MLP's real output.
        errors: ``[L, P, D]`` true MLP output minus the transcoder's reconstruction (the error nodes; zero at
            position 0 with ``first_zeroed``).
        embed: ``[P, D]`` the token embeddings (``hook_embed``).
        patterns: per layer ``[H, P, P]`` attention patterns.
        norms: ``(module path, layer) -> FrozenNorm`` of every frozen norm (layer None: the final norm).
        first_zeroed: the features at position 0 were dropped (BOS, the attention sink).
    """

    tokens: Tensor
    logits: Tensor
    features: ActiveFeatures
    mlp_in: Tensor
    mlp_out: Tensor
    errors: Tensor
    embed: Tensor
    patterns: list[Tensor]
    norms: dict[tuple[str, int | None], FrozenNorm] = field(repr=False)
    first_zeroed: bool = True

    @property
    def n_pos(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def n_layers(self) -> int:
        return int(self.mlp_in.shape[0])


def _norm_paths(model) -> list[tuple[str, int | None]]:
    """Every norm the replacement model freezes: (module path, layer); the final norm has layer None."""
    a = model.adapter
    out: list[tuple[str, int | None]] = []
    for L in range(model.cfg.n_layers):
        out += [(a.ln1, L), (a.ln2, L)]
        if a.post_attn_norm:
            out.append((a.attn_branch, L))
    return out + [(a.final_norm, None)]


def _module(model, path: str, layer: int | None):
    return model.module(path) if layer is None else model.layer_module(layer, path)


def check_supported(model) -> None:
    """Raises InputError for families the frozen replacement model does not cover yet."""
    if model.adapter.is_parallel(model.hf.config):
        raise InputError(f"{model.cfg.name} runs attention and MLP in parallel (GPT-NeoX layout); attribution graphs "
                         "support serial blocks (Llama, Mistral, Qwen, Gemma, GPT-2) so far.")


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def replacement_state(model, transcoders: TranscoderSet, tokens: Tensor, *,
                      zero_first: bool = True) -> ReplacementState:
    """Run the real model on one prompt and record what the local replacement model freezes.

    Args:
        tokens: int64 ``[P]`` (or ``[1, P]``).
        zero_first: position 0 gets no features and no error node: its MLP outputs are constants of the prompt
            (like biases), kept in the forward but not attributed. Position 0 holds BOS (text prompts get one) and
            is the attention sink, its residual norm orders of magnitude above the others'; the trainer skips it,
            so the transcoders do not model it. circuit-tracer zeroes position 0's features and errors the same way.

    Raises:
        InputError: transcoders of another model or with a layer missing, or not on the model's device; a family
            not supported.
    """
    transcoders.check_model(model)
    transcoders.check_device(model)
    check_supported(model)
    tokens = tokens.reshape(-1).to(model.device)
    n = model.cfg.n_layers
    names = ["hook_embed"] + [f"blocks.{L}.{s}" for L in range(n)
                              for s in ("ln2.hook_normalized", "hook_mlp_out", "attn.hook_pattern")]
    norm_in: dict[tuple[str, int | None], Tensor] = {}
    handles = []
    try:
        for path, L in _norm_paths(model):
            def keep(mod, args, out, key=(path, L)):
                norm_in[key] = (args[0], _first(out))
            handles.append(_module(model, path, L).register_forward_hook(keep))
        res = model.run(tokens[None], cache=names)
    finally:
        for h in handles:
            h.remove()
    c = res.cache
    norms = {key: freeze_norm(model, _module(model, key[0], key[1]), x[0], expected=y[0])
             for key, (x, y) in norm_in.items()}
    mlp_in = torch.stack([c[f"blocks.{L}.ln2.hook_normalized"][0] for L in range(n)])
    mlp_out = torch.stack([c[f"blocks.{L}.hook_mlp_out"][0] for L in range(n)])
    index, values, errors = [], [], []
    with torch.no_grad():
        for L in range(n):
            t = transcoders[L]
            x = mlp_in[L].to(t.W_enc.dtype)
            acts = t.encode(x)
            if zero_first:
                acts[0] = 0
            recon = t.decode(acts, x)
            err = mlp_out[L] - recon.to(mlp_out.dtype)
            if zero_first:
                err[0] = 0  # position 0's MLP output is a constant of the prompt, not an error node
            errors.append(err)
            pos, feat = torch.nonzero(acts, as_tuple=True)
            index.append(torch.stack([torch.full_like(pos, L), pos, feat], 1))
            values.append(acts[pos, feat].to(mlp_out.dtype))
    feats = ActiveFeatures(torch.cat(index), torch.cat(values))
    return ReplacementState(tokens=tokens.cpu(), logits=res.logits[0], features=feats, mlp_in=mlp_in, mlp_out=mlp_out,
                            errors=torch.stack(errors), embed=c["hook_embed"][0],
                            patterns=[c[f"blocks.{L}.attn.hook_pattern"][0] for L in range(n)], norms=norms,
                            first_zeroed=zero_first)


def _apply_frozen(fn: FrozenNorm, x: Tensor) -> Tensor:
    """The frozen norm on ``x`` [B, P, D], in ``x``'s dtype."""
    dt = x.dtype
    xc = x - x.mean(-1, keepdim=True) if fn.centre else x
    y = xc * fn.scale.to(dt) * fn.gain.to(dt)
    return y + fn.bias.to(dt) if fn.bias is not None else y


@dataclass
class FrozenRun:
    """The tensors of one frozen forward (see :func:`frozen_forward`).

    Attributes:
        embed: ``[B, P, D]`` leaf: the token embeddings (gradients here give token edges).
        mlp_leaf: per layer ``[B, P, D]`` zero leaves added to each MLP output (gradients give feature and
            error edges).
        mlp_in: per layer ``[B, P, D]`` each MLP's (transcoder's) input in this run; injecting a feature's
            encoder vector here gives its row.
        final: ``[B, P, D]`` the final norm's output; injecting a demeaned unembedding column gives a logit's row.
        logits: ``[B, P, d_vocab]`` (None until the forward ran).
    """

    embed: Tensor
    mlp_leaf: list[Tensor]
    mlp_in: list[Tensor | None]
    final: Tensor | None = None
    logits: Tensor | None = None


@contextlib.contextmanager
def frozen_forward(model, transcoders: TranscoderSet, state: ReplacementState, batch: int = 1, *,
                   deltas: dict[int, Tensor] | None = None, embed_delta: Tensor | None = None,
                   functions: dict | None = None, live_features: bool = False, freeze_attention: bool = True,
                   freeze_norms: bool = True, grad: bool = True, logits_to_keep: int = 0):
    """Run the frozen local replacement model on ``batch`` copies of the prompt; yields a :class:`FrozenRun`.

    Each MLP output is ``(recon - skip(x_real) + error) + skip(x) + mlp_leaf[L] + deltas[L]``, where ``x`` is
    the MLP input in this run (through the frozen norm) and the constant part is detached, so the model is
    linear in the residual stream and gradients reach earlier nodes only through the residual stream, the
    attention value/output paths (patterns frozen), the frozen norms and the skip connections.

    Args:
        deltas: layer -> ``[B, P, D]`` added to that layer's MLP output (an intervention on features: a
            feature's activation change times its decoder row); moved to the model's device and dtype.
        embed_delta: ``[B, P, D]`` added to the token embeddings (after the leaf: gradients are unchanged); moved
            likewise.
        functions: more hook functions (``{hook name: fn}``, as ``model.hooks``), e.g. to keep ``attn.hook_z``;
            not ``hook_pattern`` (the frozen patterns are set there).
        live_features: recompute every transcoder on this run's MLP input instead of holding its features: each
            MLP writes ``transcoder(x) + (out_real - transcoder(x_real))`` (the error held), so the model is
            nonlinear again through the TopK/ReLU and equals the real forward on the prompt itself; no gradients
            at ``mlp_leaf`` then mean edges (a check of how far the features' own nonlinearity matters).
        freeze_attention / freeze_norms: False recomputes the attention patterns / the norms' scales (diagnostics
            of which frozen quantity a real response depends on; the graph's edges assume both frozen). With
            ``live_features`` and both False this is the unfrozen replacement model.
        grad: build the autograd graph (for attribution); False for plain evaluation.
        logits_to_keep: compute logits for the last that many positions only (0: all).

    The MLP modules do not run: their forward is swapped for the replacement's output while the context is open.
    """
    a = model.adapter
    n, P = state.n_layers, state.n_pos
    dt = state.mlp_out.dtype
    run = FrozenRun(embed=state.embed.detach().expand(batch, P, -1).clone().requires_grad_(grad),
                    mlp_leaf=[torch.zeros(batch, P, state.mlp_out.shape[-1], dtype=dt, device=state.mlp_out.device,
                                          requires_grad=grad) for _ in range(n)],
                    mlp_in=[None] * n)
    const = []  # each MLP's output minus its skip connection on the real input: reconstruction - skip + error
    for L in range(n):  # (live_features: minus the whole transcoder on the real input, i.e. the error)
        t = transcoders[L]
        with torch.no_grad():
            if live_features:
                minus = t(state.mlp_in[L].to(t.W_enc.dtype)).to(dt)
            else:
                minus = 0 if t.W_skip is None else (state.mlp_in[L].to(t.W_skip.dtype) @ t.W_skip).to(dt)
        const.append((state.mlp_out[L] - minus).detach())
    handles, swapped = [], []

    def hook_norm(key):
        def fn(mod, args, out):
            y = _apply_frozen(state.norms[key], args[0]) if freeze_norms else _first(out)
            path, L = key
            if path == a.ln2 and L is not None:
                run.mlp_in[L] = y
            if L is None:
                run.final = y
            if not freeze_norms:
                return None
            return y.to(_first(out).dtype) if not isinstance(out, tuple) else (y.to(out[0].dtype), *out[1:])
        return fn

    def replaced_mlp(L):
        def forward(*args, **kwargs):  # the MLP's output in the replacement model; the real MLP is not computed
            t = transcoders[L]
            y = const[L].expand(batch, P, -1) + run.mlp_leaf[L]
            if live_features:
                y = y + t(run.mlp_in[L].to(t.W_enc.dtype)).to(dt)
            elif t.W_skip is not None:
                y = y + (run.mlp_in[L].to(t.W_skip.dtype) @ t.W_skip).to(dt)
            if deltas and L in deltas:
                y = y + deltas[L].to(device=y.device, dtype=dt)
            return y
        return forward

    def hook_embed(mod, args, out):
        return run.embed if embed_delta is None else run.embed + embed_delta.to(run.embed.device, run.embed.dtype)

    patterns = {f"blocks.{L}.attn.hook_pattern": (lambda p, L=L: state.patterns[L].to(p.dtype).expand_as(p))
                for L in range(n)} if freeze_attention else {}
    clash = set(patterns) & set(functions or {})
    if clash:
        raise InputError(f"frozen_forward sets {sorted(clash)[0]} itself (the frozen pattern); hook another site.")
    patterns.update(functions or {})
    ctx = torch.enable_grad() if grad else torch.no_grad()
    try:
        handles.append(model.module(a.embed).register_forward_hook(hook_embed))
        for key in state.norms:
            handles.append(_module(model, *key).register_forward_hook(hook_norm(key)))
        for L in range(n):
            mlp = model.layer_module(L, a.mlp_branch)
            mlp.forward = replaced_mlp(L)  # an instance attribute: nn.Module.__call__ runs it, hooks still fire
            swapped.append(mlp)
        kw = {"logits_to_keep": logits_to_keep} if logits_to_keep else {}
        with ctx, model.hooks(functions=patterns):
            run.logits = model.hf(state.tokens[None].expand(batch, P).to(model.device), use_cache=False, **kw).logits
        yield run
    finally:
        for h in handles:
            h.remove()
        for mlp in swapped:
            del mlp.forward


def feature_preactivations(transcoders: TranscoderSet, run: FrozenRun, layer: int) -> Tensor:
    """``[B, P, S]`` pre-activations of layer ``layer``'s transcoder on this run's MLP input."""
    t = transcoders[layer]
    with torch.no_grad():
        return t.encode_pre(run.mlp_in[layer].detach().to(t.W_enc.dtype))
