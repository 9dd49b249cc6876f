"""Where does a model keep a memorised secret? Gradient-norm maps and activation patching from a twin prompt.

A canary is a dict as :func:`mechscope.planted.build` writes it: ``prefix`` (the sentence up to the secret, e.g.
"The access code of Ann is"), ``secret`` ("4 8 1 5 1 6") and ``name``. The secret's tokens are those of
``f"{prefix} {secret}"`` after the prefix's own tokens (text mode, the model's BOS rule), as in
:func:`mechscope.planted.measures.continuation_logprob`.

- :func:`gradient_norm_map`: the gradient of the secret's mean NLL (nats per secret token) with respect to every
  parameter of the model, one Frobenius norm per parameter matrix (q/k/v/o, gate/up/down, norms, embeddings),
  beside the same norms for control texts that the model never memorised (the same template with another name
  and secret, ordinary text). Memorised secrets have a small loss and so small gradients everywhere; the
  *share* of the squared gradient norm that a matrix takes is scale free, and ``share_ratio`` (memorised share
  / mean control share) ranks the matrices.
- :func:`twin_patching`: the twin is the same prefix with another name whose secret was never trained (same
  token length; :func:`pick_twin` finds one). Each component's activation in the twin run replaces the
  memorised run's at the prefix positions (or only where the two prompts differ), and the drop in
  log P(secret | prefix) is measured as the share of the memorised-vs-twin gap it removes.

The edits that use these maps are in :mod:`mechscope.forensics.memorisation_edit`.

References:
    Stoehr et al. 2024, "Localizing Paragraph Memorization in Language Models" (gradients of memorised
    paragraphs concentrate in low layers; a low-layer head attends to rare tokens; unlearning the high-gradient
    weights removes the memorisation). Carlini et al. 2019, "The Secret Sharer" (canaries, exposure).
    Meng et al. 2022 (ROME) for activation patching.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from jaxtyping import Int
from torch import Tensor

from mechscope.core.errors import InputError
from mechscope.hooks.interventions import Patch
from mechscope.planted.build import DIGITS, secret_digits

#: Patchable kinds and their site templates (z is patched per head, the others per layer).
TWIN_KINDS: dict[str, str] = {
    "resid_pre": "blocks.{L}.hook_resid_pre",
    "attn_out": "blocks.{L}.hook_attn_out",
    "mlp_out": "blocks.{L}.hook_mlp_out",
    "z": "blocks.{L}.attn.hook_z",
}


# -- tokens and the secret's log-probability ---------------------------------------------------------------------
def secret_tokens(model, canary: dict) -> tuple[Int[Tensor, "1 pos"], int]:
    """The ids of ``f"{prefix} {secret}"`` [1, pos] and the number of prefix tokens.

    Raises:
        InputError: the canary lacks prefix/secret, or the secret is not a token continuation of the prefix (end
            the prefix at a word boundary and give the secret without leading space).
    """
    for key in ("prefix", "secret"):
        if not isinstance(canary.get(key), str) or not canary[key].strip():
            raise InputError(f"the canary needs a non-empty {key!r} string (as mechscope.planted.build writes it); "
                             f"got {canary.get(key)!r}.")
    head = model.to_tokens(canary["prefix"])[0]
    full = model.to_tokens(f"{canary['prefix']} {canary['secret']}")
    if full.shape[1] <= len(head) or not torch.equal(full[0, : len(head)], head):
        raise InputError(f"the secret {canary['secret']!r} is not a continuation of the prefix {canary['prefix']!r}: "
                         "the prefix's tokens are not the start of the full sentence's tokens. End the prefix at a "
                         "word boundary (no trailing space) and give the secret without a leading space.")
    return full, len(head)


def _secret_logprob(logits: Tensor, ids: Tensor, n_head: int) -> Tensor:
    """Sum over the secret tokens of log p(token | everything before), per row [batch] (nats)."""
    c = ids.shape[1] - n_head
    lp = torch.log_softmax(logits[:, -c - 1:-1].float(), -1)
    return lp.gather(-1, ids[:, n_head:].expand(lp.shape[0], c)[..., None])[..., 0].sum(-1)


def secret_logprob(model, canary: dict) -> float:
    """log P(secret | prefix) in nats (the sum over the secret's tokens), float.

    Raises:
        InputError: see :func:`secret_tokens`.
    """
    ids, n_head = secret_tokens(model, canary)
    with torch.no_grad():
        logits = model.hf(input_ids=ids).logits
    return float(_secret_logprob(logits, ids, n_head)[0])


def greedy_extracts(model, canary: dict, *, interventions: Sequence = ()) -> bool:
    """Whether greedy decoding from the prefix reproduces the secret's tokens: with teacher forcing, the argmax
    at every secret position is the secret's token (equal to greedy generation up to exact ties)."""
    ids, n_head = secret_tokens(model, canary)
    with torch.no_grad(), model.hooks(interventions=interventions):
        logits = model.hf(input_ids=ids).logits
    return bool((logits[0, n_head - 1:-1].argmax(-1) == ids[0, n_head:]).all())


def with_name(canary: dict, name: str, secret: str | None = None) -> dict:
    """The canary's sentence for another name (the prefix with ``canary["name"]`` replaced), keeping or
    replacing the secret.

    Raises:
        InputError: the canary has no name, or its name does not occur in its prefix.
    """
    old = canary.get("name")
    if not old or old not in canary.get("prefix", ""):
        raise InputError(f"the canary's name {old!r} does not occur in its prefix {canary.get('prefix')!r}; give "
                         "the twin's prefix directly.")
    return {**canary, "name": name, "prefix": canary["prefix"].replace(old, name),
            "secret": canary["secret"] if secret is None else secret, "repeats": 0}


def control_canaries(canary: dict, names: Sequence[str], *, alphabet: Sequence[str] = DIGITS,
                     seed: int = 0) -> list[dict]:
    """Same-template sentences that were never trained: each of ``names`` with a random secret of as many
    symbols of ``alphabet`` as the canary's secret (seeded)."""
    rng = random.Random(seed)
    n = len(canary["secret"].split())
    return [with_name(canary, nm, secret_digits(n, rng, alphabet)) for nm in names]


def pick_twin(model, canary: dict, candidates: Sequence[str]) -> dict:
    """The first of ``candidates`` (names) whose prefix has as many tokens as the canary's and whose secret
    sentence tokenizes the same way after the prefix: the twin for :func:`twin_patching`.

    Raises:
        InputError: no candidate fits (try names of the same token length as the canary's).
    """
    ids, n_head = secret_tokens(model, canary)
    for nm in candidates:
        if nm == canary.get("name"):
            continue
        twin = with_name(canary, nm)
        t_ids, t_head = secret_tokens(model, twin)
        if t_head == n_head and torch.equal(t_ids[0, n_head:], ids[0, n_head:]) and t_ids.shape == ids.shape:
            return twin
    raise InputError(f"none of the {len(candidates)} candidate names gives a twin prefix of {n_head} tokens like "
                     f"{canary['prefix']!r}; offer names that tokenize to as many tokens as {canary.get('name')!r}.")


# -- 1. gradient-norm map ------------------------------------------------------------------------------------------
@dataclass
class GradientNormMap:
    """Per-parameter gradient norms of the memorised secret's NLL and of control texts (JSON-ready).

    Attributes:
        params: parameter names (``model.hf.named_parameters()``, tied ones once), in model order.
        layer: each parameter's block index, or None outside the blocks (embeddings, final norm, unembedding).
        module: the parameter's name inside its block (``self_attn.q_proj.weight``, ``mlp.down_proj.weight``,
            ``input_layernorm.weight``) or its full name outside the blocks.
        n_params: entries of each parameter.
        memorised: Frobenius norm of d(mean NLL of the secret tokens)/d(parameter) (nats per token per unit).
        control: mean over the controls of the same norm (control sentences: NLL of their secret tokens; ordinary
            texts: mean next-token NLL).
        ratio: memorised / control (raw; small everywhere when the secret's loss is small).
        memorised_share / control_share: the parameter's share of the total squared gradient norm (control: the
            mean share over controls).
        share_ratio: memorised_share / control_share (scale free; > 1 where the secret's gradient concentrates).
        secret_nll: the memorised secret's mean NLL (nats per token); control_nll: each control's.
        n_controls: number of control texts.
    """

    params: list[str]
    layer: list[int | None]
    module: list[str]
    n_params: list[int]
    memorised: list[float]
    control: list[float]
    ratio: list[float]
    memorised_share: list[float]
    control_share: list[float]
    share_ratio: list[float]
    secret_nll: float
    control_nll: list[float]
    n_controls: int

    def ranking(self, by: str = "share_ratio", *, blocks_only: bool = False) -> list[str]:
        """Parameter names sorted by ``by`` (a per-parameter list field), largest first; ``blocks_only`` keeps the
        parameters inside the transformer blocks."""
        vals = getattr(self, by, None)
        if not isinstance(vals, list) or len(vals) != len(self.params) or by in ("params", "module", "layer"):
            raise InputError(f"cannot rank by {by!r}; use 'share_ratio', 'ratio', 'memorised' or 'memorised_share'.")
        idx = [i for i in range(len(self.params)) if not blocks_only or self.layer[i] is not None]
        return [self.params[i] for i in sorted(idx, key=lambda i: -vals[i])]

    def by_layer(self, field: str = "memorised") -> dict[str, dict[str, float]]:
        """``{module: {layer: value}}`` for block parameters: the layer x module table of ``field``."""
        out: dict[str, dict[str, float]] = {}
        for i, p in enumerate(self.params):
            if self.layer[i] is not None:
                out.setdefault(self.module[i], {})[str(self.layer[i])] = getattr(self, field)[i]
        return out

    def to_dict(self) -> dict:
        return {**asdict(self), "ranking": self.ranking()}


def _param_table(model) -> tuple[list[str], list[Tensor], list[int | None], list[str]]:
    prefix = model.adapter.layers + "."
    names, params, layers, modules = [], [], [], []
    for n, p in model.hf.named_parameters():
        names.append(n)
        params.append(p)
        if n.startswith(prefix):
            idx, _, rest = n[len(prefix):].partition(".")
            layers.append(int(idx))
            modules.append(rest)
        else:
            layers.append(None)
            modules.append(n)
    return names, params, layers, modules


def _loss_fn(model, item) -> tuple[Tensor, Tensor]:
    """(ids [1, pos], a boolean mask [pos-1] of the predicted positions whose NLL is averaged)."""
    if isinstance(item, dict):
        ids, n_head = secret_tokens(model, item)
        mask = torch.zeros(ids.shape[1] - 1, dtype=torch.bool, device=ids.device)
        mask[n_head - 1:] = True
        return ids, mask
    if not isinstance(item, str) or not item.strip():
        raise InputError(f"a control text must be a non-empty string or a canary dict, got {item!r}.")
    ids = model.to_tokens(item)
    if ids.shape[1] < 2:
        raise InputError(f"the control text {item!r} has fewer than 2 tokens; give a longer one.")
    return ids, torch.ones(ids.shape[1] - 1, dtype=torch.bool, device=ids.device)


def nll_gradients(model, item: dict | str) -> tuple[float, list[Tensor]]:
    """The mean NLL of ``item`` (a canary dict: its secret tokens; a string: every next token) in nats per token,
    and its gradient with respect to every parameter of ``model.hf`` (``named_parameters`` order, float32).

    The caller's model is not changed: ``torch.autograd.grad`` leaves ``.grad`` alone, and parameters that do
    not require grad are switched on only for the call.
    """
    _, params, _, _ = _param_table(model)
    frozen = [p for p in params if not p.requires_grad]
    try:
        for p in frozen:
            p.requires_grad_(True)
        ids, mask = _loss_fn(model, item)
        with torch.enable_grad():
            logits = model.hf(input_ids=ids).logits[0, :-1].float()
            nll = -torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None])[:, 0]
            loss = nll[mask].mean()
            grads = torch.autograd.grad(loss, params, allow_unused=True)
    finally:
        for p in frozen:
            p.requires_grad_(False)
    return float(loss.detach()), [torch.zeros_like(p, dtype=torch.float32) if g is None else g.float()
                         for p, g in zip(params, grads)]


def gradient_norm_map(model, canary: dict, *, controls: Sequence[dict] = (), control_texts: Sequence[str] = (),
                      progress: bool = True) -> GradientNormMap:
    """Gradient norms of the memorised secret's NLL per parameter matrix, against controls.

    Args:
        model: the tuned HookedModel (not modified).
        canary: the memorised canary (``prefix``, ``secret``).
        controls: non-memorised sentences of the same template (canary dicts; see :func:`control_canaries`).
        control_texts: ordinary texts (their mean next-token NLL).
        progress: a tqdm bar over the texts.

    Returns:
        GradientNormMap (norms: float, units of nats per token per unit of the parameter).

    Raises:
        InputError: no controls; a bad canary or control (see :func:`secret_tokens`).

    References:
        Stoehr et al. 2024, "Localizing Paragraph Memorization in Language Models", Sec. 4 (parameter gradients).
    """
    from tqdm.auto import tqdm

    items = [*controls, *control_texts]
    if not items:
        raise InputError("gradient_norm_map needs controls= (same-template sentences, see control_canaries) or "
                         "control_texts= (ordinary text) to compare the secret's gradients with.")
    names, params, layers, modules = _param_table(model)

    def norms(item) -> tuple[float, Tensor]:
        loss, grads = nll_gradients(model, item)
        return loss, torch.stack([g.double().norm() for g in grads])

    secret_nll, mem = norms(canary)
    c_norms, c_nll = [], []
    for it in tqdm(items, desc="control gradients", disable=not progress, leave=False):
        loss, n = norms(it)
        c_norms.append(n)
        c_nll.append(loss)
    ctrl = torch.stack(c_norms)  # [n_controls, n_params]
    def share(n: Tensor) -> Tensor:
        return n.pow(2) / n.pow(2).sum(-1, keepdim=True).clamp(min=1e-300)

    mem_share, ctrl_share = share(mem), share(ctrl).mean(0)
    ctrl_mean = ctrl.mean(0)
    tiny = 1e-30
    return GradientNormMap(
        params=names, layer=layers, module=modules, n_params=[p.numel() for p in params],
        memorised=mem.tolist(), control=ctrl_mean.tolist(), ratio=(mem / ctrl_mean.clamp(min=tiny)).tolist(),
        memorised_share=mem_share.tolist(), control_share=ctrl_share.tolist(),
        share_ratio=(mem_share / ctrl_share.clamp(min=tiny)).tolist(), secret_nll=secret_nll, control_nll=c_nll,
        n_controls=len(items))


# -- 2. activation patching from a twin ----------------------------------------------------------------------------
@dataclass
class TwinPatchResult:
    """Twin patching: each component's twin activation in the memorised run (JSON-ready).

    Attributes:
        memorised_logprob / twin_logprob: log P(secret | prefix) in nats on the memorised and the twin prompt.
        patched: kind -> per-layer list (resid_pre, attn_out, mlp_out) or per-layer list of per-head lists (z)
            of the patched log P(secret | prefix).
        share: same layout: (memorised - patched) / (memorised - twin), the share of the gap the component
            removes (None where the gap is 0).
        positions: the patched positions (token indices of the prompt).
        twin_prefix: the twin's prefix.
    """

    memorised_logprob: float
    twin_logprob: float
    patched: dict[str, list]
    share: dict[str, list]
    positions: list[int]
    twin_prefix: str

    @property
    def gap(self) -> float:
        return self.memorised_logprob - self.twin_logprob

    def ranking(self) -> list[dict]:
        """Every component as ``{"kind", "layer", "head", "share", "patched"}``, largest share first."""
        rows = []
        for kind, vals in self.patched.items():
            for L, v in enumerate(vals):
                for h, x in (enumerate(v) if isinstance(v, list) else [(None, v)]):
                    s = self.share[kind][L][h] if h is not None else self.share[kind][L]
                    rows.append({"kind": kind, "layer": L, "head": h, "share": s, "patched": x})
        return sorted(rows, key=lambda r: -(r["share"] if r["share"] is not None else float("-inf")))

    def to_dict(self) -> dict:
        return {**asdict(self), "gap": self.gap, "ranking": self.ranking()}


def _prefix_positions(ids: Tensor, twin_ids: Tensor, n_head: int, positions) -> list[int]:
    if positions == "prefix":
        return list(range(n_head))
    if positions == "name":
        return [i for i in range(n_head) if ids[0, i] != twin_ids[0, i]]
    if isinstance(positions, Sequence) and not isinstance(positions, str) and all(isinstance(i, int) for i in positions):
        return [int(i) for i in positions]
    raise InputError(f"positions must be 'prefix', 'name' or a list of token indices, got {positions!r}.")


def _twin_inputs(model, canary: dict, twin: dict | str) -> tuple[Tensor, Tensor, int, str]:
    ids, n_head = secret_tokens(model, canary)
    tw = twin if isinstance(twin, dict) else {**canary, "prefix": twin}
    tw = {**tw, "secret": canary["secret"]}
    t_ids, t_head = secret_tokens(model, tw)
    if t_head != n_head or t_ids.shape != ids.shape or not torch.equal(t_ids[0, n_head:], ids[0, n_head:]):
        raise InputError(f"the twin prefix {tw['prefix']!r} has {t_head} tokens (with the secret {t_ids.shape[1]}), "
                         f"the canary's {canary['prefix']!r} {n_head} ({ids.shape[1]}); patching needs equal token "
                         "lengths: pick a twin name of the same token length (see pick_twin).")
    return ids, t_ids, n_head, tw["prefix"]


@torch.no_grad()
def twin_patched_logprob(model, canary: dict, twin: dict | str, sites: Sequence[str], *,
                         positions: str | Sequence[int] = "prefix", heads: Sequence[int | None] | None = None) -> float:
    """log P(secret | prefix) in nats when the twin's activations at all of ``sites`` (jointly) replace the
    memorised run's at ``positions`` ("prefix": every prefix token; "name": where the prompts differ; or
    indices); ``heads`` gives one head (or None for all) per site.

    Raises:
        InputError: see :func:`twin_patching`.
    """
    ids, t_ids, n_head, _ = _twin_inputs(model, canary, twin)
    pos = _prefix_positions(ids, t_ids, n_head, positions)
    _, cache = model.run(t_ids, cache=list(sites))
    heads = list(heads) if heads is not None else [None] * len(sites)
    ivs = [Patch(s, source=cache[s], positions=pos, heads=h) for s, h in zip(sites, heads)]
    logits, _ = model.run(ids, interventions=ivs, logits_to_keep=ids.shape[1] - n_head + 1)
    return float(_secret_logprob(logits, ids, n_head)[0])


@torch.no_grad()
def twin_patching(model, canary: dict, twin: dict | str, *, kinds: Sequence[str] = ("resid_pre", "attn_out",
                  "mlp_out", "z"), positions: str | Sequence[int] = "prefix", batch_size: int = 32,
                  progress: bool = True) -> TwinPatchResult:
    """Patch a never-trained twin prompt's activations into the memorised run, one component at a time.

    Args:
        model: the tuned HookedModel (not modified).
        canary: the memorised canary (``prefix``, ``secret``).
        twin: the twin canary (see :func:`pick_twin`) or its prefix string; it must tokenize to as many tokens.
        kinds: of :data:`TWIN_KINDS`; ``z`` is patched per head, the others per layer.
        positions: "prefix" (every prefix token), "name" (the tokens where the prompts differ) or indices.
        batch_size: patched variants per forward pass.
        progress: a tqdm bar over passes.

    Returns:
        TwinPatchResult (log-probabilities in nats; shares dimensionless, 1: the component carries the gap).

    Raises:
        InputError: a twin of another token length (pick another name); a secret that is not a continuation of
            the prefix; an unknown kind or bad positions.

    References:
        Meng et al. 2022, "Locating and Editing Factual Associations in GPT" (causal tracing); Stoehr et al. 2024.
    """
    from tqdm.auto import tqdm

    for k in kinds:
        if k not in TWIN_KINDS:
            raise InputError(f"unknown kind {k!r}; use some of {list(TWIN_KINDS)}.")
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}.")
    ids, t_ids, n_head, twin_prefix = _twin_inputs(model, canary, twin)
    pos = _prefix_positions(ids, t_ids, n_head, positions)
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    sites = [TWIN_KINDS[k].format(L=L) for k in kinds for L in range(n_layers)]
    keep = ids.shape[1] - n_head + 1
    m_logits, m_cache = model.run(ids, cache=sites, logits_to_keep=keep)
    t_logits, cache = model.run(t_ids, cache=sites, logits_to_keep=keep)
    m_mem = float(_secret_logprob(m_logits, ids, n_head)[0])
    m_twin = float(_secret_logprob(t_logits, ids, n_head)[0])
    values: dict[tuple, float] = {}
    todo = []
    for k in kinds:
        for L in range(n_layers):
            s = TWIN_KINDS[k].format(L=L)
            for h in range(n_heads) if k == "z" else [None]:
                a, b = m_cache[s][:, pos], cache[s][:, pos]
                if torch.equal(a if h is None else a[:, :, h], b if h is None else b[:, :, h]):
                    values[(k, L, h)] = m_mem  # the twin's activation is the memorised one: nothing changes
                else:
                    todo.append((k, L, h))
    for i in tqdm(range(0, len(todo), batch_size), desc="twin patching", disable=not progress, leave=False):
        chunk = todo[i:i + batch_size]
        ivs = []
        for j, (k, L, h) in enumerate(chunk):
            s = TWIN_KINDS[k].format(L=L)
            ivs.append(Patch(s, source=cache[s], positions=pos, heads=h, batch=[j]))
        logits, _ = model.run(ids.repeat(len(chunk), 1), interventions=ivs, logits_to_keep=keep)
        for j, key in enumerate(chunk):
            values[key] = float(_secret_logprob(logits[j:j + 1], ids, n_head)[0])
    gap = m_mem - m_twin

    def share(v: float) -> float | None:
        return None if gap == 0 else (m_mem - v) / gap

    patched: dict[str, list] = {}
    shares: dict[str, list] = {}
    for k in kinds:
        if k == "z":
            patched[k] = [[values[(k, L, h)] for h in range(n_heads)] for L in range(n_layers)]
            shares[k] = [[share(v) for v in row] for row in patched[k]]
        else:
            patched[k] = [values[(k, L, None)] for L in range(n_layers)]
            shares[k] = [share(v) for v in patched[k]]
    return TwinPatchResult(m_mem, m_twin, patched, shares, pos, twin_prefix)


__all__ = ["TWIN_KINDS", "GradientNormMap", "TwinPatchResult", "control_canaries", "gradient_norm_map",
           "greedy_extracts", "nll_gradients", "pick_twin", "secret_logprob", "secret_tokens", "twin_patched_logprob",
           "twin_patching", "with_name"]
