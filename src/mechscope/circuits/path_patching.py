"""Path patching (Wang et al. 2022, appendix B): the effect of senders on the metric through chosen receivers only.

For clean prompts x_orig and corrupted prompts x_new (a task's clean and corrupted tokens):

- (A) cache every head's ``hook_z`` (and MLP outputs) on x_orig and on x_new;
- (C) run x_orig with **every attention head frozen** to its x_orig value (its ``hook_z``, so its output
  ``z W_O`` is the clean one) except the senders, which are patched from x_new; MLPs and norms are
  recomputed. Save the receivers' recomputed inputs: a head's query (``attn.hook_q``), a key/value head's
  key or value (``attn.hook_k`` / ``hook_v``, per KV head, so grouped-query attention stays native), an
  MLP's normalised input (``ln2.hook_normalized``) or the final normalised residual
  (``ln_final.hook_normalized``, the logits receiver);
- (D) run x_orig with only the receivers patched to those values, everything else recomputed, and
  measure the task metric. The effect is metric(D) - metric(x_orig), per prompt; the mean over prompts
  carries a bootstrap interval.

So the senders' influence reaches a receiver only along paths that pass through no attention head: the
direct path through the residual stream and paths through MLPs (which recompute in C).

Senders are node names of :class:`~mechscope.circuits.graph.Graph`: heads ``a{L}.h{H}``, MLPs ``m{L}``
and ``input``. Wang et al. freeze heads only; an MLP sender is patched from x_new in C (its
``hook_mlp_out``) while every later MLP recomputes and every head stays frozen, so its effect reaches the
receivers through its direct path and later MLPs, the same rule as for a head sender. ``input`` patches the
residual stream entering block 0. Receivers are graph receiver names: ``a{L}.h{H}<q>``,
``a{L}.kv{G}<k|v>`` (``a{L}.h{H}<k|v>`` without GQA), ``m{L}`` or ``logits``.

Implemented with mechscope's hook runtime (``Patch`` on ``hook_z`` / ``hook_mlp_out`` / ``hook_q|k|v`` /
``ln2.hook_normalized`` / ``ln_final.hook_normalized``), independently of the edge engine's mask trick,
so each can check the other. Many sender sets run as variants of one batch (variant-major rows).

References:
    Wang, Variengien, Conmy, Shlegeris and Steinhardt 2022, "Interpretability in the Wild: a Circuit for
    Indirect Object Identification in GPT-2 small", appendix B (path patching, Algorithm 1).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field

import torch
from jaxtyping import Float
from torch import Tensor

from mechscope.analysis.bootstrap import CI, bootstrap_ci
from mechscope.circuits.graph import Graph, Receiver
from mechscope.core.errors import InputError
from mechscope.hooks.interventions import Patch


@dataclass
class PathPatchingResult:
    """Path patching of one sender set into one receiver set.

    Attributes:
        senders / receivers: the names used.
        per_prompt: ``[n]`` float64, metric(D) - metric(clean) per prompt (the task metric's raw units, e.g.
            nats of logit difference; negative = the senders' corrupted values, through these receivers,
            lower the metric).
        effect: the mean over prompts.
        ci: bootstrap interval of the mean (None with ``n_boot=0`` or a single prompt).
        clean_value: the task metric's mean on the clean prompts (for scale).
        info: task, metric, n_prompts, positions.
    """

    senders: list[str]
    receivers: list[str]
    per_prompt: Tensor
    effect: float
    ci: CI | None
    clean_value: float
    info: dict = field(default_factory=dict)

    def __str__(self) -> str:
        ci = f" [{self.ci.low:+.4f}, {self.ci.high:+.4f}]" if self.ci else ""
        return (f"path patching {', '.join(self.senders)} -> {', '.join(self.receivers)}: "
                f"{self.effect:+.4f}{ci} ({self.info.get('metric', 'metric')}, clean {self.clean_value:+.4f}, "
                f"n={self.per_prompt.numel()})")


@dataclass
class PathPatchingSweep:
    """Path patching of many single senders into one receiver set.

    Attributes:
        senders: ``[n_senders]`` names. receivers: the receiver names.
        per_prompt: ``[n, n_senders]`` float64 effects (raw metric units, see :class:`PathPatchingResult`).
        effect: ``[n_senders]`` means. ci: bootstrap intervals of every mean (float64 tensors) or None.
        clean_value: the task metric's mean on the clean prompts.
        n_layers / n_heads: the model's shape, for :meth:`head_map`.
    """

    senders: list[str]
    receivers: list[str]
    per_prompt: Tensor
    effect: Tensor
    ci: CI | None
    clean_value: float
    n_layers: int
    n_heads: int
    info: dict = field(default_factory=dict)

    def head_map(self, what: str = "effect") -> Float[Tensor, "n_layers n_heads"]:
        """A layer x head map of ``effect``, ``low`` or ``high`` (NaN for heads not swept: no path to any
        receiver, or not asked for)."""
        if what not in ("effect", "low", "high"):
            raise InputError(f"what must be 'effect', 'low' or 'high', got {what!r}.")
        if what != "effect" and self.ci is None:
            raise InputError("this sweep has no intervals (n_boot=0); run it with n_boot >= 10.")
        vals = self.effect if what == "effect" else getattr(self.ci, what)
        out = torch.full((self.n_layers, self.n_heads), float("nan"), dtype=torch.float64)
        for name, v in zip(self.senders, torch.as_tensor(vals).tolist()):
            if name.startswith("a"):
                layer, head = name[1:].split(".h")
                out[int(layer), int(head)] = v
        return out

    def top(self, k: int = 10) -> list[tuple[str, float]]:
        """The ``k`` senders with the largest absolute effect, as ``(name, effect)``."""
        order = self.effect.abs().argsort(descending=True)[:k].tolist()
        return [(self.senders[i], float(self.effect[i])) for i in order]


# -- names --------------------------------------------------------------------------------------------------
def _indices(names, what: str, example: str, lookup) -> list[int]:
    """Indices of a name or names by ``lookup``; refuses an empty set and a name given twice."""
    names = [names] if isinstance(names, str) else list(names)
    if not names:
        raise InputError(f"no {what}s given; name at least one, e.g. {example}.")
    out = [lookup(n) for n in names]
    if len(set(out)) != len(out):
        raise InputError(f"{what}s {names} name one {what} twice.")
    return out


def _receivers(graph: Graph, names) -> list[int]:
    index = {r.name: i for i, r in enumerate(graph.receivers)}
    gqa = graph.n_kv_heads != graph.n_heads

    def lookup(n: str) -> int:
        if n in index:
            return index[n]
        hint = ""
        if n.endswith(("<k>", "<v>")) and ".h" in n and gqa:
            layer, head = n.split("<")[0][1:].split(".h")
            g = int(head) // (graph.n_heads // graph.n_kv_heads) if head.isdigit() else 0
            hint = (f" {graph.model_name} groups keys and values ({graph.n_kv_heads} key/value heads): head {head}'s "
                    f"{n[-3:]} receiver is a{layer}.kv{g}{n[-3:]}.")
        close = difflib.get_close_matches(n, list(index), n=3, cutoff=0.6)
        raise InputError(f"{n!r} is not a receiver of {graph.model_name}'s graph (receivers: a{{L}}.h{{H}}<q>, "
                         f"a{{L}}.{'kv{G}' if gqa else 'h{H}'}<k|v>, m{{L}}, logits)."
                         f"{hint}{' Closest: ' + str(close) + '.' if close else ''}")

    return _indices(names, "receiver", "'a20.h0<q>', 'a20.kv0<k>', 'm5' or 'logits'", lookup)


def _senders(graph: Graph, names) -> list[int]:
    return _indices(names, "sender", "'a9.h6', 'm3' or 'input'", graph.node_index)  # node_index: close names


def _check_paths(graph: Graph, senders: list[int], receivers: list[int]) -> None:
    """Every sender must write before at least one receiver reads."""
    for s in senders:
        if not any(bool(graph.allowed[r, s]) for r in receivers):
            first = min(receivers, key=lambda r: graph.upstream_count(graph.receivers[r]))
            rec = graph.receivers[first]
            raise InputError(
                f"sender {graph.sources[s]} has no path to the receivers {[graph.receivers[r].name for r in receivers]}: "
                f"it writes to the residual stream after {rec.name} reads it (the earliest receiver reads the stream "
                f"entering {'the logits' if rec.kind == 'logits' else f'layer {rec.layer}'}"
                f"{'' if rec.kind != 'mlp' or graph.parallel else ' after its attention'}). Choose senders in earlier "
                "layers, or receivers in later ones.")


def _site(rec: Receiver) -> tuple[str, int | None]:
    """(hook site holding the receiver's input, head index on it or None)."""
    if rec.kind in ("q", "k", "v"):
        return f"blocks.{rec.layer}.attn.hook_{rec.kind}", rec.index
    if rec.kind == "mlp":
        return f"blocks.{rec.layer}.ln2.hook_normalized", None
    return "ln_final.hook_normalized", None


# -- the passes ---------------------------------------------------------------------------------------------
@torch.no_grad()
def _caches(model, graph: Graph, clean: Tensor, corrupt: Tensor, keep: int, need_mlp: bool):
    sites = ["blocks.*.attn.hook_z"] + (["blocks.*.hook_mlp_out", "blocks.0.hook_resid_pre"] if need_mlp else [])
    clean_logits, clean_cache = model.run(clean, cache=["blocks.*.attn.hook_z"], logits_to_keep=keep)
    _, corrupt_cache = model.run(corrupt, cache=sites)
    return clean_logits, clean_cache, corrupt_cache


@torch.no_grad()
def _receiver_inputs(model, graph: Graph, clean: Tensor, clean_cache, corrupt_cache, variants: list[list[int]],
                     receivers: list[int]):
    """Pass C for each variant (a sender set): the receivers' inputs, ``{site: [V*B, ...]}``."""
    V, B = len(variants), clean.shape[0]
    recs = [graph.receivers[r] for r in receivers]
    last = max(r.layer for r in recs)  # n_layers for the logits
    sites = sorted({_site(r)[0] for r in recs})
    ivs = []
    for L in range(min(last + 1, graph.n_layers)):
        z = clean_cache[f"blocks.{L}.attn.hook_z"].repeat(V, 1, 1, 1)
        heads, mlp = graph.layer_sources(L)
        for v, senders in enumerate(variants):
            for s in senders:
                if heads.start <= s < heads.stop:
                    h = s - heads.start
                    z[v * B:(v + 1) * B, :, h] = corrupt_cache[f"blocks.{L}.attn.hook_z"][:, :, h]
        ivs.append(Patch(f"blocks.{L}.attn.hook_z", source=z))
        for v, senders in enumerate(variants):
            rows = slice(v * B, (v + 1) * B)
            if mlp in senders:
                ivs.append(Patch(f"blocks.{L}.hook_mlp_out", source=corrupt_cache[f"blocks.{L}.hook_mlp_out"], batch=rows))
            if L == 0 and 0 in senders:
                ivs.insert(0, Patch("blocks.0.hook_resid_pre", source=corrupt_cache["blocks.0.hook_resid_pre"], batch=rows))
    stop = last + 1 if last < graph.n_layers else None
    _, cache = model.run(clean.repeat(V, 1), cache=sites, interventions=ivs, stop_at_layer=stop)
    return cache


@torch.no_grad()
def _patched_run(model, graph: Graph, clean: Tensor, V: int, cache, receivers: list[int], positions, keep: int):
    """Pass D: the clean prompts (``V`` copies) with only the receivers patched; logits ``[V*B, keep, vocab]``."""
    by_site: dict[str, list[int] | None] = {}
    for r in receivers:
        site, head = _site(graph.receivers[r])
        by_site[site] = None if head is None else [*by_site.get(site, []), head]
    ivs = [Patch(site, source=cache[site], heads=heads, positions=positions) for site, heads in by_site.items()]
    return model.run(clean.repeat(V, 1), interventions=ivs, logits_to_keep=keep).logits


def _effects(model, graph: Graph, task, variants: list[list[int]], receivers: list[int], *, positions, batch_size: int,
             chunk: int, progress: bool, desc: str) -> tuple[Tensor, float]:
    """Per prompt and variant, metric(D) - metric(clean): ``[n, len(variants)]`` float64; the clean mean."""
    from tqdm.auto import tqdm

    if batch_size < 1 or chunk < 1:
        raise InputError(f"batch_size and variants must be >= 1, got {batch_size} and {chunk}.")
    n, keep = len(task), -task.position
    out = torch.zeros(n, len(variants), dtype=torch.float64)
    clean_total = 0.0
    need_mlp = any(s == 0 or graph.sources[s].startswith("m") for v in variants for s in v)
    steps = [(s, c) for s in range(0, n, batch_size) for c in range(0, len(variants), chunk)]
    bar = tqdm(total=len(steps), desc=desc, unit="batch", disable=not progress or len(steps) < 2)
    for s in range(0, n, batch_size):
        rows = slice(s, min(n, s + batch_size))
        part = task.subset(rows)
        clean, corrupt = part.clean_tokens.to(model.device), part.corrupt_tokens.to(model.device)
        clean_logits, clean_cache, corrupt_cache = _caches(model, graph, clean, corrupt, keep, need_mlp)
        base = part.values(clean_logits, clean_logits).double().cpu()
        clean_total += float(base.sum())
        B = clean.shape[0]
        for c in range(0, len(variants), chunk):
            vs = variants[c:c + chunk]
            cache = _receiver_inputs(model, graph, clean, clean_cache, corrupt_cache, vs, receivers)
            logits = _patched_run(model, graph, clean, len(vs), cache, receivers, positions, keep)
            for j in range(len(vs)):
                vals = part.values(logits[j * B:(j + 1) * B], clean_logits).double().cpu()
                out[rows, c + j] = vals - base
            bar.update(1)
    bar.close()
    return out, clean_total / n


def path_patching(model, task, senders, receivers, *, positions=None, graph: Graph | None = None,
                  batch_size: int = 16, n_boot: int = 1000, seed: int = 0, progress: bool = False) -> PathPatchingResult:
    """Path patching of a set of senders into a set of receivers (Wang et al. 2022, App. B; module docstring).

    Args:
        model: a HookedModel of a pre-norm family (see :meth:`Graph.from_model`).
        task: a :class:`~mechscope.data.task.Task`: x_orig = its clean prompts, x_new = its corrupted ones;
            the effect is measured in its metric (``task.values``) at ``task.position``.
        senders: node names (``a{L}.h{H}``, ``m{L}``, ``input``), all patched from x_new together.
        receivers: receiver names (``a{L}.h{H}<q>``, ``a{L}.kv{G}<k>``, ``a{L}.kv{G}<v>``, ``m{L}``,
            ``logits``), all patched together in pass D.
        positions: the positions where receivers are patched in pass D (query positions for ``<q>``, key
            positions for ``<k>``/``<v>``; an int, list or slice); None: all.
        graph: the model's :class:`Graph` (built if None).
        batch_size: prompts per forward.
        n_boot: bootstrap resamples of the interval (0: none).
        seed: seed of the bootstrap.
        progress: a progress bar over prompt batches.

    Returns:
        :class:`PathPatchingResult`: per-prompt effects, their mean (raw metric units) and a 95% interval.

    Raises:
        InputError: empty sender or receiver sets; a name that is not a node or receiver (with the closest
            names; a GQA model's ``a{L}.h{H}<k>`` names its ``a{L}.kv{G}<k>``); a sender that writes after
            every receiver reads (no path); bad batch sizes.

    References:
        Wang et al. 2022, "Interpretability in the Wild", appendix B (Algorithm 1).
    """
    graph = graph or Graph.from_model(model)
    s_idx, r_idx = _senders(graph, senders), _receivers(graph, receivers)
    _check_paths(graph, s_idx, r_idx)
    per_prompt, clean = _effects(model, graph, task, [s_idx], r_idx, positions=positions, batch_size=batch_size,
                                 chunk=1, progress=progress, desc="path patching")
    pp = per_prompt[:, 0]
    ci = bootstrap_ci(pp, n_boot=n_boot, seed=seed) if n_boot and pp.numel() > 1 else None
    return PathPatchingResult([graph.sources[s] for s in s_idx], [graph.receivers[r].name for r in r_idx], pp,
                              float(pp.mean()), ci, clean,
                              {"task": task.name, "metric": task.metric, "n_prompts": len(task),
                               "positions": positions})


def path_patching_sweep(model, task, receivers, *, senders=None, positions=None, graph: Graph | None = None,
                        batch_size: int = 16, variants: int = 8, n_boot: int = 1000, seed: int = 0,
                        progress: bool = True) -> PathPatchingSweep:
    """Path patching of each sender alone into one receiver set: a layer x head map with intervals.

    Each sender is one variant; ``variants`` of them share a forward (passes C and D each run
    ``variants x batch_size`` rows), so a sweep of N senders costs about ``2 N / variants`` forwards per
    prompt batch.

    Args:
        model, task, receivers, positions, graph, batch_size, n_boot, seed: as :func:`path_patching`.
        senders: node names to sweep; None: every head that writes before at least one receiver reads.
        variants: senders per forward.
        progress: a progress bar.

    Returns:
        :class:`PathPatchingSweep` (``head_map()`` for the layer x head picture).

    Raises:
        InputError: as :func:`path_patching`, for any sender.

    References:
        Wang et al. 2022, appendix B; section 3 (path patching from every head into the name movers' queries).
    """
    graph = graph or Graph.from_model(model)
    r_idx = _receivers(graph, receivers)
    if senders is None:
        heads = [i for i, n in enumerate(graph.sources) if n.startswith("a")]
        s_idx = [s for s in heads if any(bool(graph.allowed[r, s]) for r in r_idx)]
        if not s_idx:
            raise InputError(f"no head writes before the receivers {receivers} read (they read the embeddings "
                             "only); choose receivers in later layers.")
    else:
        s_idx = _senders(graph, senders)
        for s in s_idx:
            _check_paths(graph, [s], r_idx)
    per_prompt, clean = _effects(model, graph, task, [[s] for s in s_idx], r_idx, positions=positions,
                                 batch_size=batch_size, chunk=variants, progress=progress, desc="path patching sweep")
    ci = bootstrap_ci(per_prompt, n_boot=n_boot, seed=seed) if n_boot and per_prompt.shape[0] > 1 else None
    return PathPatchingSweep([graph.sources[s] for s in s_idx], [graph.receivers[r].name for r in r_idx], per_prompt,
                             per_prompt.mean(0), ci, clean, graph.n_layers, graph.n_heads,
                             {"task": task.name, "metric": task.metric, "n_prompts": len(task), "positions": positions})


__all__ = ["PathPatchingResult", "PathPatchingSweep", "path_patching", "path_patching_sweep"]
