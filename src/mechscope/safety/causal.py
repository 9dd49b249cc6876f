"""The causal check of a direction: does pushing the residual stream along a probe's direction change the
behaviour the probe claims to read, more than pushing along random directions does?

A probe that separates honest from deceptive answers is correlational evidence; steering or ablating along
its direction and watching the behaviour move is causal evidence (SAFETY.md, "Claims and their evidence").
:func:`causal_check` measures it on twin examples (a group = one prompt with a label-0 and a label-1
continuation, like ``deception_scenarios``):

    metric(pair) = log P(label-1 continuation | prompt) - log P(label-0 continuation | prompt)   (nats)

summed over the continuation's tokens by teacher forcing (the continuation = the tokens of the rendered
example's ``score_mask``, the assistant answer by default). The effect at a steering strength ``alpha`` is the
mean over pairs of ``metric(steered) - metric(clean)``, with a bootstrap CI over pairs; the control is the
same for ``n_random`` seeded Gaussian directions; the side effect is KL(clean || steered) of the next-token
distribution on ordinary text.

Letter key for locals: R = steering conditions (direction x alpha) in one batch, P = positions, D = d_model.

References:
    Arditi et al. 2024, "Refusal in Language Models Is Mediated by a Single Direction", sec. 2.3
    (directional ablation x - (x.u)u and activation addition) and sec. 3 (KL on harmless prompts as the
    side-effect check); Marks & Tegmark 2023, "The Geometry of Truth", sec. 5 (probe directions tested by
    steering); Turner et al. 2023 (ActAdd); Makelov et al. 2023 (interpretability illusions: the reason
    for the random-direction control).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from jaxtyping import Float
from torch import Tensor

from mechscope.analysis.bootstrap import CI, bootstrap_ci
from mechscope.core.errors import InputError
from mechscope.hooks.interventions import Add, Replace
from mechscope.safety.probes import Probe

MODES = ("add", "ablate")
VERDICTS = ("causal", "correlational")
#: The rule :func:`causal_check` applies, recorded in every result.
RULE = ("causal when, at some tested alpha (nonzero in add mode), the direction's bootstrap CI of the mean "
        "effect excludes 0 and its |mean effect| exceeds the largest |mean effect| of all random directions "
        "at that alpha; else correlational")


@dataclass(frozen=True)
class CausalCheck:
    """The result of :func:`causal_check`. Effects are changes of the pair metric, in nats.

    Attributes:
        alphas: the steering strengths, in units of :attr:`norm_unit` (the site's per-coordinate RMS).
        effect: one bootstrap CI per alpha of the mean over pairs of metric(steered) - metric(clean).
        pair_effects: float64 [n_pairs, n_alphas], the per-pair effects the CIs resample.
        pair_clean: float64 [n_pairs], each pair's unsteered metric (nats), in the order of ``info["groups"]``.
        random_effects: float64 [n_random, n_alphas], the mean effect of each random direction.
        kl: float64 [n_alphas] mean KL(clean || steered) of the next-token distribution over every position
            of ``control_texts`` (nats), or None without control texts.
        kl_random: float64 [n_random, n_alphas], the same for each random direction, or None.
        verdict: ``"causal"`` or ``"correlational"`` (by :data:`RULE`); reason: why, with the numbers (and a
            note when, in add mode, a passing effect has the sign opposite to alpha's).
        passing_alphas: the alphas at which the rule holds.
        clean_metric: mean over pairs of the unsteered metric (nats; > 0: the label-1 answer is likelier).
        norm_unit: ``mean_norm / sqrt(d_model)``, where mean_norm is the mean L2 norm of the site's clean
            activations over the pairs' tokens (position 0 left out; in ``info["mean_norm"]``): the RMS of one
            coordinate, i.e. the typical ``|x.u|`` along a random unit direction u. Activation units;
            ``alpha * norm_unit`` is the added vector's norm.
        n_pairs, site, mode: what was measured. info: groups, seed, n_boot, rule, control token count.
    """

    alphas: tuple[float, ...]
    effect: tuple[CI, ...]
    pair_effects: Tensor
    pair_clean: Tensor
    random_effects: Tensor
    kl: Tensor | None
    kl_random: Tensor | None
    verdict: str
    reason: str
    passing_alphas: tuple[float, ...]
    clean_metric: float
    norm_unit: float
    n_pairs: int
    site: str
    mode: str
    info: dict = field(default_factory=dict)

    @property
    def estimate(self) -> Tensor:
        """float64 [n_alphas]: the mean effect at each alpha (nats)."""
        return torch.tensor([c.estimate for c in self.effect], dtype=torch.float64)

    @property
    def random_mean(self) -> Tensor:
        """float64 [n_alphas]: mean over random directions of their mean effect."""
        return self.random_effects.mean(0)

    @property
    def random_std(self) -> Tensor:
        """float64 [n_alphas]: spread (sample std, ddof 1; NaN with one direction) of the random effects."""
        if self.random_effects.shape[0] < 2:
            return torch.full_like(self.random_mean, math.nan)
        return self.random_effects.std(0)

    @property
    def random_max_abs(self) -> Tensor:
        """float64 [n_alphas]: the largest |mean effect| among the random directions."""
        return self.random_effects.abs().max(0).values

    @property
    def z(self) -> Tensor:
        """float64 [n_alphas]: (effect - random mean) / random std, reported, not used by the rule."""
        return (self.estimate - self.random_mean) / self.random_std

    def to_dict(self) -> dict:
        """JSON-ready."""
        def plain(t):
            return None if t is None else t.tolist()

        return {"alphas": list(self.alphas), "effect": [c.to_dict() for c in self.effect],
                "pair_effects": plain(self.pair_effects), "pair_clean": plain(self.pair_clean),
                "random_effects": plain(self.random_effects), "random_mean": plain(self.random_mean),
                "random_std": plain(self.random_std), "random_max_abs": plain(self.random_max_abs),
                "z": plain(self.z), "kl": plain(self.kl), "kl_random": plain(self.kl_random),
                "kl_random_mean": None if self.kl_random is None else self.kl_random.mean(0).tolist(),
                "verdict": self.verdict, "reason": self.reason, "passing_alphas": list(self.passing_alphas),
                "clean_metric": self.clean_metric, "norm_unit": self.norm_unit, "n_pairs": self.n_pairs,
                "site": self.site, "mode": self.mode, "info": self.info}

    def __str__(self) -> str:
        head = (f"causal check of a direction at {self.site} ({self.mode}; alpha in units of the "
                f"per-coordinate RMS {self.norm_unit:.4g} = mean norm / sqrt(d_model)), {self.n_pairs} pairs, "
                f"clean metric {self.clean_metric:+.3f} nats")
        cols = f"{'alpha':>7} {'effect [95% CI] (nats)':>30} {'random mean±sd':>16} {'max|rand|':>9} {'z':>7}"
        if self.kl is not None:
            cols += f" {'KL dir':>8} {'KL rand':>8}"
        lines = [head, cols]
        for j, a in enumerate(self.alphas):
            c = self.effect[j]
            row = (f"{a:>7g} {f'{c.estimate:+.3f} [{c.low:+.3f}, {c.high:+.3f}]':>30} "
                   f"{f'{float(self.random_mean[j]):+.3f}±{float(self.random_std[j]):.3f}':>16} "
                   f"{float(self.random_max_abs[j]):>9.3f} {float(self.z[j]):>7.2f}")
            if self.kl is not None:
                row += f" {float(self.kl[j]):>8.4f} {float(self.kl_random[:, j].mean()):>8.4f}"
            lines.append(row + ("  *" if a in self.passing_alphas else ""))
        lines.append(f"verdict: {self.verdict} — {self.reason}")
        return "\n".join(lines)


# -- inputs ------------------------------------------------------------------------------------------
def _direction(model, direction_or_probe, site: str | None) -> tuple[Tensor, str]:
    """The unit direction (float64 [d_model], CPU) and the resolved site."""
    if isinstance(direction_or_probe, Probe):
        probe = direction_or_probe
        if site is not None and probe.site is not None and site != probe.site:
            raise InputError(f"the probe reads {probe.site} but site={site!r}; drop site=, or pass "
                             "probe.raw_direction as a tensor to steer at another site.")
        site = site or probe.site
        vec = probe.raw_direction
    elif isinstance(direction_or_probe, Tensor):
        vec = direction_or_probe.detach().to("cpu", torch.float64)
    else:
        raise InputError(f"direction_or_probe must be a Probe or a Tensor [d_model], got "
                         f"{type(direction_or_probe).__name__}.")
    if site is None:
        raise InputError("a bare direction does not say where to steer; pass site= (e.g. 'blocks.6.hook_resid_post').")
    (name,) = model.resolve([site])  # HookNameError with the closest names; SiteUnavailableError
    axes = model.hook_names()[name]
    if axes != "batch pos d_model":
        raise InputError(f"{name} has axes ({axes}); steer at a residual-width site with axes (batch pos d_model), "
                         "e.g. blocks.L.hook_resid_post.")
    d = model.cfg.d_model
    if vec.dim() != 1 or vec.shape[0] != d:
        raise InputError(f"the direction has shape {tuple(vec.shape)} but {name} of {model.cfg.name} is "
                         f"[{d}] wide; give a direction of that model and site (a probe fitted on it).")
    norm = float(vec.norm())
    if not math.isfinite(norm) or norm == 0:
        raise InputError(f"the direction has norm {norm}; it must be finite and nonzero.")
    return vec / norm, name


def _texts(control_texts) -> list[str]:
    if control_texts is None:
        return []
    if isinstance(control_texts, str):
        raise InputError("control_texts must be a list of strings, not one string.")
    if hasattr(control_texts, "examples"):  # a LabelledDataset of text examples
        texts = [ex.text for ex in control_texts.examples if ex.text is not None]
    else:
        texts = list(control_texts)
    if not texts or not all(isinstance(t, str) and t for t in texts):
        raise InputError("control_texts must be non-empty strings of ordinary text (or None to skip the KL).")
    return texts


# -- forward passes ----------------------------------------------------------------------------------
def _steer(site: str, mode: str, u_RD: Tensor, c_R: Tensor):
    """The intervention for R rows: add ``c * u`` (add) or set the component along ``u`` to ``c`` (ablate)."""
    if mode == "add":
        return Add(site, direction=(c_R[:, None] * u_RD)[:, None, :].float(), scale=1.0)

    def clamp(x):
        u = u_RD[:, None, :].to(x.device, torch.float32)
        xf = x.float()
        out = xf - (xf * u).sum(-1, keepdim=True) * u + c_R.to(x.device, torch.float32)[:, None, None] * u
        return out.to(x.dtype)

    return Replace(site, value=clamp)


def _run_rows(model, tokens: Tensor, site, mode, u_RD, c_R, batch_size, reduce):
    """``reduce(logits [r, pos, vocab]) -> [r]`` for every steering row, in chunks of ``batch_size``."""
    out = []
    for i in range(0, u_RD.shape[0], batch_size):
        u, c = u_RD[i:i + batch_size], c_R[i:i + batch_size]
        logits = model.run(tokens.expand(u.shape[0], -1), interventions=[_steer(site, mode, u, c)]).logits
        out.append(reduce(logits))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def _continuation_logprob(logits: Tensor, tokens: Tensor, mask: Tensor) -> Tensor:
    """float64 [r]: sum over scored positions t of log_softmax(logits[:, t - 1])[tokens[t]] (teacher forcing)."""
    idx = mask.nonzero()[:, 0].to(logits.device)
    lp = logits[:, idx - 1].float().log_softmax(-1)
    tgt = tokens.to(logits.device)[idx]
    return lp.gather(-1, tgt[None, :, None].expand(lp.shape[0], -1, 1))[..., 0].double().sum(-1).cpu()


def _kl(clean_logits: Tensor, logits: Tensor) -> Tensor:
    """float64 [r]: sum over positions of KL(clean || steered) (nats)."""
    lc = clean_logits.float().log_softmax(-1)
    ls = logits.float().log_softmax(-1)
    return (lc.exp() * (lc - ls)).sum(-1).double().sum(-1).cpu()


# -- the check ---------------------------------------------------------------------------------------
@torch.no_grad()
def causal_check(model, direction_or_probe: Probe | Float[Tensor, " d_model"], pairs, *, site: str | None = None,
                 alphas: Sequence[float | int] = (-8, -4, -2, 0, 2, 4, 8), mode: str = "add", n_random: int = 8,
                 control_texts=None, n_boot: int = 1000, seed: int = 0, batch_size: int = 16) -> CausalCheck:
    """Steer (or ablate) along a direction and measure the change of a twin-pair metric against random directions.

    Per pair: ``metric = log P(cont_1 | prompt) - log P(cont_0 | prompt)`` (nats), each a sum over the
    continuation's tokens by teacher forcing, one forward per example (the continuation is the rendered
    example's ``score_mask``: the assistant answer by default; the tokens before its first scored token are
    the prompt, which twins must share). Steering acts at ``site`` at every position of the sequence
    (prompt and continuation), batched over (direction, alpha):

    - ``mode="add"``: ``x + alpha * norm_unit * u`` (activation addition; alpha = 0 is the clean run itself,
      since adding 0 changes no bit, and is not run again);
    - ``mode="ablate"``: ``x - (x.u)u + alpha * norm_unit * u`` (directional ablation, then the component
      along u set to ``alpha * norm_unit``; alpha = 0 is plain ablation). Ablation is sign-blind.

    ``u`` is the unit direction (a probe's :attr:`~Probe.raw_direction`, whose positive side is label 1,
    so alpha > 0 should raise the metric). ``alpha`` is in units of ``norm_unit = mean_norm / sqrt(d_model)``,
    where mean_norm is the mean L2 norm of the clean activations at the site over the pairs' tokens
    (position 0, often an outlier "attention sink" with a norm 100x the rest, left out): the RMS of one
    coordinate, which is the typical size of the component ``x.u`` along a random unit direction. So
    alpha = 1 is a push the size of a typical component, strengths are comparable across layers and
    models, and alpha = sqrt(d_model) adds a vector as long as the activation itself (on SmolLM2-135M,
    d_model 576, the default alpha 8 is a third of the norm). Divide by ``result.norm_unit`` for raw units.
    The control repeats everything for ``n_random`` Gaussian directions (seeded by ``seed``), normalised to
    unit norm like ``u``. The verdict follows :data:`RULE`: a direction with no special role beats all n
    random ones at one alpha with chance 1 / (n + 1) (0.11 at the default 8; use n_random >= 19 for a 5%
    level), which is why the CI must also exclude 0.

    Args:
        model: a HookedModel with a tokenizer.
        direction_or_probe: a :class:`Probe` (its site is the default) or a float tensor [d_model].
        pairs: a :class:`~mechscope.data.labelled.LabelledDataset` of twin groups (one label-0 and one label-1
            example each, same prompt), or a built-in name such as ``"deception_scenarios"``. Groups that are
            not twins are skipped with a warning.
        site: a residual-width hook name (axes batch pos d_model); required for a bare tensor.
        alphas: steering strengths in units of ``norm_unit`` (dimensionless; see above).
        mode: ``"add"`` or ``"ablate"``.
        n_random: random control directions (>= 1).
        control_texts: ordinary texts (a list of strings, or a dataset of text examples) for the KL side
            effect, or None to skip it.
        n_boot: bootstrap resamples of the pairs (>= 10). seed: random directions and bootstrap.
        batch_size: steering rows per forward (memory: batch_size x pos x d_vocab logits).

    Cost: per example one clean forward and ``(1 + n_random) * n_alphas / batch_size`` steered forwards of
    ``batch_size`` rows; the same per control text.

    Returns:
        :class:`CausalCheck`.

    Raises:
        InputError: fewer than 2 twin groups (the message counts them); twins whose prompts differ; a
            continuation at position 0; a direction of the wrong width, zero or non-finite; a site that is
            not residual-width, missing for a bare tensor, or different from the probe's; empty or non-finite
            alphas; add mode with only alpha 0; an unknown mode; n_random < 1; bad control texts.
        HookNameError: an unknown site (names the closest valid ones).
    """
    from mechscope.data.labelled_builtins import load_labelled
    from mechscope.data.labelled_render import render

    if mode not in MODES:
        raise InputError(f"mode must be one of {MODES}, got {mode!r}.")
    alphas = tuple(float(a) for a in alphas)
    if not alphas or not all(math.isfinite(a) for a in alphas):
        raise InputError(f"alphas must be a non-empty list of finite numbers, got {alphas}; e.g. (-8, -4, 0, 4, 8).")
    if mode == "add" and all(a == 0 for a in alphas):
        raise InputError("in add mode alpha 0 is the clean run; give at least one nonzero alpha.")
    if not isinstance(n_random, int) or n_random < 1:
        raise InputError(f"n_random must be an integer >= 1 (random control directions; 8 or more), got {n_random}.")
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}.")
    u, site = _direction(model, direction_or_probe, site)
    texts = _texts(control_texts)
    ds = load_labelled(pairs) if isinstance(pairs, str) else pairs
    by_group = ds.twins()
    twins, groups = list(by_group.values()), list(by_group)
    n_other = len(set(ds.groups)) - len(twins)
    if len(twins) < 2:
        raise InputError(f"dataset {ds.name!r} has {len(twins)} twin groups (one example of each label) of "
                         f"{len(twins) + n_other}; the causal check needs at least 2. Group each prompt's label-0 and "
                         "label-1 continuations under one group name (as deception_scenarios does).")
    if n_other:
        warnings.warn(f"causal_check: {n_other} groups of {ds.name!r} are not twins (one example of each label) and "
                      "are skipped.", UserWarning, stacklevel=2)
    rendered = render(model, ds)
    for (i0, i1), g in zip(twins, groups):
        for i in (i0, i1):
            if bool(rendered[i].score_mask[0]):
                raise InputError(f"group {g!r}: the continuation starts at token 0, which nothing predicts; the "
                                 "example needs a prompt before its scored span.")
        p0, p1 = (rendered[i].tokens[:int(rendered[i].score_mask.nonzero()[0])] for i in (i0, i1))
        if not torch.equal(p0, p1):
            raise InputError(f"group {g!r}: the twins' prompts differ (tokens before the scored continuation); the "
                             "metric compares two continuations of one prompt. Put the difference in the scored span.")

    # Random controls: Gaussian, seeded, unit norm like u. Row 0 = the direction, rows 1.. = random.
    gen = torch.Generator().manual_seed(seed)
    rand = torch.randn(n_random, u.shape[0], generator=gen, dtype=torch.float64)
    dirs = torch.cat([u[None], rand / rand.norm(dim=1, keepdim=True)])  # [1 + n_random, D]
    n_a, n_dirs = len(alphas), dirs.shape[0]
    run_alpha = [j for j, a in enumerate(alphas) if mode == "ablate" or a != 0]

    # Clean pass: the metric and the activation norm.
    used = sorted({i for pair in twins for i in pair})
    clean, norm_sum, norm_count = {}, 0.0, 0
    for i in used:
        r = rendered[i]
        res = model.run(r.tokens[None], cache=[site])
        clean[i] = float(_continuation_logprob(res.logits, r.tokens, r.score_mask)[0])
        acts = res.cache[site][0, 1:] if r.tokens.shape[0] > 1 else res.cache[site][0]
        norms = acts.double().norm(dim=-1)
        norm_sum += float(norms.sum())
        norm_count += norms.numel()
    mean_norm = norm_sum / norm_count
    norm_unit = mean_norm / math.sqrt(u.shape[0])

    # Steered passes: one batch of rows (direction k, alpha j) per example.
    rows = [(k, j) for k in range(n_dirs) for j in run_alpha]
    u_RD = torch.stack([dirs[k] for k, _ in rows]) if rows else torch.zeros(0, u.shape[0], dtype=torch.float64)
    c_R = torch.tensor([alphas[j] * norm_unit for _, j in rows], dtype=torch.float64)
    k_idx = torch.tensor([k for k, _ in rows], dtype=torch.long)
    j_idx = torch.tensor([j for _, j in rows], dtype=torch.long)
    logp = {}
    for i in used:
        r = rendered[i]
        steered = _run_rows(model, r.tokens[None], site, mode, u_RD, c_R, batch_size,
                            lambda lg, r=r: _continuation_logprob(lg, r.tokens, r.score_mask))
        grid = torch.full((n_dirs, n_a), clean[i], dtype=torch.float64)  # add mode, alpha 0: the clean run
        grid[k_idx, j_idx] = steered
        logp[i] = grid
    clean_pair = torch.tensor([clean[i1] - clean[i0] for i0, i1 in twins], dtype=torch.float64)  # [n_pairs]
    steered_pair = torch.stack([logp[i1] - logp[i0] for i0, i1 in twins])  # [n_pairs, n_dirs, n_a]
    effects = steered_pair - clean_pair[:, None, None]
    pair_effects = effects[:, 0]  # [n_pairs, n_a]
    random_effects = effects[:, 1:].mean(0)  # [n_random, n_a]
    ci = bootstrap_ci(pair_effects, n_boot=n_boot, seed=seed)
    effect = tuple(CI(float(ci.estimate[j]), float(ci.low[j]), float(ci.high[j]), ci.n, ci.n_boot, ci.alpha)
                   for j in range(n_a))

    # Side effect on ordinary text.
    kl = kl_random = None
    n_tokens = 0
    if texts:
        total = torch.zeros(n_dirs, n_a, dtype=torch.float64)
        for t in texts:
            tokens = model.to_tokens(t)
            clean_logits = model.run(tokens).logits
            sums = _run_rows(model, tokens, site, mode, u_RD, c_R, batch_size, lambda lg, cl=clean_logits: _kl(cl, lg))
            total[k_idx, j_idx] += sums
            n_tokens += tokens.shape[1]
        total /= n_tokens
        kl, kl_random = total[0], total[1:]

    # Verdict.
    max_rand = random_effects.abs().max(0).values
    passing = tuple(alphas[j] for j in run_alpha
                    if (effect[j].low > 0 or effect[j].high < 0) and abs(effect[j].estimate) > float(max_rand[j]))
    if passing:
        j = max(run_alpha, key=lambda jj: abs(effect[jj].estimate) if alphas[jj] in passing else -1)
        reason = (f"at alpha {alphas[j]:g} the mean effect {effect[j].estimate:+.3f} nats [{effect[j].low:+.3f}, "
                  f"{effect[j].high:+.3f}] excludes 0 and exceeds every one of {n_random} random directions "
                  f"(max |effect| {float(max_rand[j]):.3f}); passes at alphas {list(passing)}")
        verdict = "causal"
        against = [a for a in passing if mode == "add" and a * effect[alphas.index(a)].estimate < 0]
        if against:
            reason += (f"; note: at alphas {against} the effect has the sign opposite to alpha, so the direction's "
                       "positive side pushes towards the label-0 continuation, not the label-1 one")
    else:
        j = max(run_alpha, key=lambda jj: abs(effect[jj].estimate))
        why = []
        if not (effect[j].low > 0 or effect[j].high < 0):
            why.append(f"its CI [{effect[j].low:+.3f}, {effect[j].high:+.3f}] contains 0")
        if abs(effect[j].estimate) <= float(max_rand[j]):
            why.append(f"a random direction moves the metric as much (max |effect| {float(max_rand[j]):.3f})")
        reason = (f"no alpha passes; at the largest effect (alpha {alphas[j]:g}, {effect[j].estimate:+.3f} nats) "
                  + " and ".join(why))
        verdict = "correlational"
    info = {"groups": groups, "n_skipped_groups": n_other, "n_random": n_random, "seed": seed, "n_boot": n_boot,
            "rule": RULE, "mean_norm": mean_norm, "n_control_texts": len(texts), "n_control_tokens": n_tokens,
            "dataset": ds.name, "fingerprint": ds.fingerprint(), "model": model.cfg.name}
    return CausalCheck(alphas, effect, pair_effects, clean_pair, random_effects, kl, kl_random, verdict, reason,
                       passing, float(clean_pair.mean()), norm_unit, len(twins), site, mode, info)


__all__ = ["MODES", "RULE", "VERDICTS", "CausalCheck", "causal_check"]
