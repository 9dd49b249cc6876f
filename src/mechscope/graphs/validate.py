"""Validating an attribution graph by interventions (``mechscope graph validate``).

Two checks, on the same sample of feature nodes, each perturbed by doubling its activation (adding
``activation x decoder row`` to its layer's MLP output at its position) or by zeroing it (subtracting the same):

1. **Frozen replacement model** (attention patterns, norm scales and every other feature held): the change of
   every feature node's pre-activation and of every target logit (demeaned) must equal the graph's edge, the
   direct effect. circuit-tracer's tests check the same (doubling 100 features: atol 5e-4 on features, 1e-5 on
   logits). Reported: max absolute error, that error relative to the largest predicted effect, and the
   correlation of measured with predicted effects.
2. **Real model** (unfrozen: attention, norms and every later MLP recomputed; equivalently, the transcoders
   spliced in with their error terms): the change of the target logits against two linear predictions from
   the graph — the direct effect alone, and the sum over every path of the graph (downstream features respond
   by their pre-activation change; error nodes and attention held). How far they part says how local the
   replacement model's linearity is for this prompt.
3. **Where the real model departs** (the same perturbations, the top targets): three models between the frozen
   one and the real one. *Live features*: attention and norms frozen, every transcoder recomputed on its input
   (TopK/ReLU nonlinearity only) — against the path sums. *Unfrozen replacement*: every transcoder spliced in
   with its error held at the prompt's value, attention and norms recomputed — against the path sums. *Real*
   against the unfrozen replacement: what is left is the transcoders' mismatch with the MLPs' own response.

Shape key: k perturbations, P positions, D d_model, F feature nodes, T target logits.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from mechscope.core.errors import InputError
from mechscope.graphs.graph import AttributionGraph
from mechscope.graphs.replacement import feature_preactivations, frozen_forward, replacement_state
from mechscope.graphs.transcoders import TranscoderSet
from mechscope.hooks.interventions import Add


@dataclass
class Agreement:
    """Measured vs predicted effects of one set of perturbations.

    Attributes:
        n: number of (perturbation, target) pairs compared.
        max_abs_error: max |measured - predicted| (pre-activation units or logits).
        rel_error: ``max_abs_error / max |predicted|``.
        pearson: correlation of measured with predicted effects (nan when either is constant).
    """

    n: int
    max_abs_error: float
    rel_error: float
    pearson: float


def _agree(measured: Tensor, predicted: Tensor) -> Agreement:
    m, p = measured.double().flatten(), predicted.double().flatten()
    err = float((m - p).abs().max()) if len(m) else 0.0
    scale = float(p.abs().max()) if len(p) else 0.0
    r = float(torch.corrcoef(torch.stack([m, p]))[0, 1]) if len(m) > 1 and m.std() > 0 and p.std() > 0 else float("nan")
    return Agreement(len(m), err, err / scale if scale else float("nan"), r)


@dataclass
class Validation:
    """The report of :func:`validate`.

    Attributes:
        n_perturbed: feature nodes perturbed; mode: ``"double"`` or ``"zero"``.
        frozen_features / frozen_logits: check 1 on the feature nodes' pre-activations and on the target logits.
        real_direct / real_paths: check 2, the real model's target-logit changes against the direct effects and
            against the path sums.
        real_frozen_gap: median over perturbations of ``|real - path sum| / |path sum|`` for the top target logit.
        live_paths / replacement_paths / real_replacement: check 3 (live-feature model vs path sums, unfrozen
            replacement vs path sums, real vs unfrozen replacement), on the target logits.
        attention_paths / norms_paths: the live-feature model with only the attention patterns / only the norm
            scales recomputed, vs the path sums: which frozen quantity the real response turns on.
    """

    n_perturbed: int
    mode: str
    frozen_features: Agreement
    frozen_logits: Agreement
    real_direct: Agreement
    real_paths: Agreement
    real_frozen_gap: float
    live_paths: Agreement | None = None
    replacement_paths: Agreement | None = None
    real_replacement: Agreement | None = None
    attention_paths: Agreement | None = None
    norms_paths: Agreement | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        f, lo, rd, rp = self.frozen_features, self.frozen_logits, self.real_direct, self.real_paths
        how = {"double": "doubled", "zero": "zeroed"}.get(self.mode, "stepped")
        return (f"{self.n_perturbed} features {how}. Frozen replacement "
                f"model: features max error {f.max_abs_error:.2e} ({f.rel_error:.1e} of the largest edge, r = "
                f"{f.pearson:.6f}), logits max error {lo.max_abs_error:.2e} (r = {lo.pearson:.6f}). Real model, "
                f"target logits: r = {rd.pearson:.3f} with the direct effects, r = {rp.pearson:.3f} with the path "
                f"sums (median relative gap {self.real_frozen_gap:.2f}).") + (
            "" if self.live_paths is None else
            f" Where it departs (r with the path sums): live features {self.live_paths.pearson:.3f}, + live "
            f"attention {self.attention_paths.pearson:.3f}, + live norms {self.norms_paths.pearson:.3f}, unfrozen "
            f"replacement {self.replacement_paths.pearson:.3f}; real vs unfrozen replacement r = "
            f"{self.real_replacement.pearson:.3f}.")


def unfrozen_replacement_logits(model, transcoders: TranscoderSet, st, deltas: dict[int, Tensor] | None,
                                k: int) -> Tensor:
    """``[k, d_vocab]`` last-position logits of the *unfrozen* replacement model: every transcoder spliced in
    (recomputed on its live input), its error held at the prompt's value, attention and norms live, and
    ``deltas[L]`` ``[k, P, D]`` added to layer ``L``'s MLP output. On the prompt itself (no deltas) it is the
    real forward."""
    from mechscope.dictionaries.splice import Splice

    n, P = st.n_layers, st.n_pos
    with torch.no_grad():
        corr = [(st.mlp_out[L] - transcoders[L](st.mlp_in[L].to(transcoders[L].W_enc.dtype)).to(st.mlp_out.dtype))
                for L in range(n)]

    def add(L):
        def fn(x):
            y = x + corr[L].to(x.dtype)
            return y + deltas[L].to(x.dtype) if deltas and L in deltas else y
        return fn

    with torch.no_grad():
        res = model.run(st.tokens[None].expand(k, P).to(model.device), logits_to_keep=1,
                        saes=[Splice(transcoders[L]) for L in range(n)],
                        functions={f"blocks.{L}.hook_mlp_out": add(L) for L in range(n)})
    return res.logits[:, -1].double()


def _path_sums(graph: AttributionGraph, delta: Tensor) -> Tensor:
    """``[T, k]``: logit changes when feature nodes' activations change by ``delta`` ``[F, k]`` (absolute, the
    transcoders' units) and every feature downstream responds by its pre-activation change (the graph's paths
    through features; errors and tokens fixed).

    An edge ``A[t, s]`` is ``a_s`` times the gradient of ``t``'s input along ``s``'s decoder row, so a change
    ``Δa_s`` moves ``t`` by ``A[t, s] Δa_s / a_s``: the sum runs over relative changes ``u = Δa / a``,
    ``u = (delta + A_ff u) / a``, read by the logits as ``A_lf u`` (``a`` the nodes' activations; they are
    positive for TopK/ReLU transcoders).
    """
    F = graph.n_features
    A_ff = graph.edges[:F, :F].double()
    a = graph.activations[graph.selected].double()[:, None].clamp_min(1e-30)
    d = delta.to(A_ff.device).double()
    u = d / a
    for _ in range(graph.n_layers + 1):  # a path crosses at most n_layers feature layers
        u = (d + A_ff @ u) / a
    return graph.edges[F:, :F].double() @ u


def validate(model, transcoders: TranscoderSet, graph: AttributionGraph, *, n_features: int = 100,
             mode: str = "double", step: float | None = None, seed: int = 0, batch: int = 16) -> Validation:
    """Perturb sampled feature nodes and compare the measured effects with the graph's (see the module docstring).

    Args:
        n_features: how many feature nodes to perturb (sampled without replacement, seeded).
        mode: ``"double"`` (activation x 2) or ``"zero"`` (activation 0).
        step: instead of ``mode``, change each activation by ``step`` times itself (e.g. 0.05: a 5% step, to see
            how far the real model stays linear); ``mode`` is then recorded as ``"step"``.
        batch: perturbations per forward.

    The forwards run where the model runs (the transcoders must be there too); the measured effects come back to
    the CPU, where they are compared with the graph's edges.

    Raises:
        InputError: a graph of another model or prompt length, no feature nodes, a bad mode, a zero or
            non-finite step, transcoders on another device than the model.
    """
    if mode not in ("double", "zero"):
        raise InputError(f"mode must be 'double' or 'zero', got {mode!r}.")
    if graph.model_name and graph.model_name != model.cfg.name:
        raise InputError(f"the graph was made on {graph.model_name}, not {model.cfg.name}; load that model.")
    if graph.n_features == 0:
        raise InputError("the graph has no feature nodes to perturb.")
    st = replacement_state(model, transcoders, graph.tokens, zero_first=bool(graph.info.get("first_zeroed", True)))
    if len(st.features) != len(graph.active_features) or not torch.equal(st.features.index.cpu(),
                                                                          graph.active_features.cpu()):
        raise InputError("the transcoders' active features on this prompt differ from the graph's: it was made with "
                         "other transcoders (or another model dtype).")
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(graph.n_features, generator=g)[:n_features].sort().values
    sign = 1.0 if mode == "double" else -1.0
    if step is not None:
        if not (math.isfinite(step) and step != 0):
            raise InputError(f"step must be a finite non-zero fraction of the activation, got {step}.")
        sign, mode = float(step), "step"
    P, D = graph.n_pos, model.cfg.d_model
    dt = st.mlp_out.dtype
    logit_ids = graph.logit_tokens.to(model.device)
    E = graph.edges.double().cpu()
    F = graph.n_features
    meas_f, pred_f, meas_l, pred_l, real_l = [], [], [], [], []
    with frozen_forward(model, transcoders, st, 1, grad=False, logits_to_keep=1) as r0:
        pre0 = torch.stack([feature_preactivations(transcoders, r0, L)[0] for L in range(st.n_layers)])
        lg0 = r0.logits[0, -1].double()
    real0 = st.logits[-1].double()
    variants = {"live": {}, "attention": {"freeze_attention": False}, "norms": {"freeze_norms": False}}

    def variant_logits(kw, k, deltas=None):
        with frozen_forward(model, transcoders, st, k, deltas=deltas, grad=False, logits_to_keep=1,
                            live_features=True, **kw) as rv:
            return rv.logits[:, -1].double()

    base = {name: variant_logits(kw, 1)[0] for name, kw in variants.items()}
    rep0 = unfrozen_replacement_logits(model, transcoders, st, None, 1)[0]
    var_l = {name: [] for name in variants}
    rep_l = []

    def demeaned_change(x, x0):
        return ((x - x.mean(-1, keepdim=True)) - (x0 - x0.mean())[None])[:, logit_ids]
    feat = graph.active_features[graph.selected].cpu()  # [F, 3]
    feat_at = feat.to(pre0.device)  # to index the pre-activations where they are
    for c in range(0, len(pick), batch):
        nodes = pick[c:c + batch].tolist()
        k = len(nodes)
        deltas: dict[int, Tensor] = {}
        for b, i in enumerate(nodes):
            L, p, f = (int(v) for v in feat[i])
            a = float(graph.activations[graph.selected[i]])
            deltas.setdefault(L, torch.zeros(k, P, D, dtype=dt, device=st.mlp_out.device))
            deltas[L][b, p] += sign * a * transcoders[L].W_dec[f].detach().to(dt)
        with frozen_forward(model, transcoders, st, k, deltas=deltas, grad=False, logits_to_keep=1) as r:
            pre = torch.stack([feature_preactivations(transcoders, r, L) for L in range(st.n_layers)], 1)  # [k,L,P,S]
            lg = r.logits[:, -1].double()
        d_pre = (pre - pre0[None]).double()[:, feat_at[:, 0], feat_at[:, 1], feat_at[:, 2]]  # [k, F]
        meas_f.append(d_pre.cpu())  # measured where the model runs, compared on the CPU with the graph's edges
        pred_f.append(sign * E[:F, nodes].T)
        dlog = (lg - lg.mean(-1, keepdim=True)) - (lg0 - lg0.mean())[None]
        meas_l.append(dlog[:, logit_ids].cpu())
        pred_l.append(sign * E[F:, nodes].T)
        with torch.no_grad():
            res = model.run(graph.tokens[None].expand(k, P).to(model.device),
                            interventions=[Add(f"blocks.{L}.hook_mlp_out", direction=d) for L, d in deltas.items()])
        rl = res.logits[:, -1].double()
        real_l.append(demeaned_change(rl, real0).cpu())
        for name, kw in variants.items():
            var_l[name].append(demeaned_change(variant_logits(kw, k, deltas), base[name]).cpu())
        rep_l.append(demeaned_change(unfrozen_replacement_logits(model, transcoders, st, deltas, k), rep0).cpu())
    pred_direct = torch.cat(pred_l)
    delta = torch.zeros(graph.n_features, len(pick), dtype=torch.float64)
    delta[pick, torch.arange(len(pick))] = sign * graph.activations[graph.selected[pick]].double().cpu()
    paths = _path_sums(graph, delta).T.cpu()  # [k, T]
    real = torch.cat(real_l)
    gap = ((real[:, 0] - paths[:, 0]).abs() / paths[:, 0].abs().clamp_min(1e-12)).median()
    return Validation(n_perturbed=len(pick), mode=mode, frozen_features=_agree(torch.cat(meas_f), torch.cat(pred_f)),
                      frozen_logits=_agree(torch.cat(meas_l), pred_direct), real_direct=_agree(real, pred_direct),
                      real_paths=_agree(real, paths), real_frozen_gap=float(gap),
                      live_paths=_agree(torch.cat(var_l["live"]), paths),
                      replacement_paths=_agree(torch.cat(rep_l), paths),
                      real_replacement=_agree(real, torch.cat(rep_l)),
                      attention_paths=_agree(torch.cat(var_l["attention"]), paths),
                      norms_paths=_agree(torch.cat(var_l["norms"]), paths))
