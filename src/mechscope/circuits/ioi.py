"""The IOI circuit's head classes, by the evidence Wang et al. 2022 use for each.

For every head of a circuit, measured on the clean IOI prompts (each number a mean over prompts with a
bootstrap 95% interval):

- **direct effect** on ``logit(IO) - logit(S)`` at END (direct logit attribution: the final norm's scale
  frozen, so the head's own output through the unembedding; nats);
- **attention** from END to IO, to S1 and to S2; from S2 to S1 (duplicate token) and to S1+1 (induction);
  from S1+1 to S1 (previous token);
- **copy score** (Wang et al. 3.1): the head's OV circuit applied to the residual stream after block 0 at
  the IO and S1 tokens, through the final norm and the unembedding: the share of those names that land in
  the top 5 tokens; the **negative copy score** uses minus the OV output;
- **head scores** on repeated random tokens (induction, previous-token, duplicate-token; Olsson et al.);
- **S-inhibition** evidence: path patching from the head into the name movers' queries (Wang et al.
  App. B), supplied by the caller.

:func:`classify_heads` then names each head's class by the rules in :data:`RULES` (documented thresholds,
not hand-picked heads); a head meeting no rule stays "unclassified", with its numbers.

References:
    Wang et al. 2022, "Interpretability in the Wild: a Circuit for Indirect Object Identification in GPT-2
    small", sections 3.1-3.4 and App. B; McDougall et al. 2023, "Copy Suppression" (heads that attend to a
    token and write minus it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from mechscope.analysis.bootstrap import CI, bootstrap_ci
from mechscope.core.errors import InputError

ROLES = ("name mover", "negative name mover", "s suppression", "s-inhibition", "induction", "duplicate token",
         "previous token")

#: The rules, in order: the first that a head meets names its class. Attention thresholds are
#: probabilities (mean over prompts); "dla > 0" means the interval's low end is above 0.
RULES = {
    "name mover": "attention END->IO >= 0.2, direct effect interval above 0, copy score >= 0.5",
    "negative name mover": "attention END->IO >= 0.2, direct effect interval below 0, negative copy score >= 0.5",
    "s suppression": "attention END->S1 + END->S2 >= 0.2, direct effect interval above 0, negative copy score "
                     ">= 0.5 (a class Wang et al. do not have: it attends to the subject and writes minus its "
                     "name, which raises IO over S; copy suppression, McDougall et al. 2023)",
    "s-inhibition": "path patching into the name movers' queries lowers the logit difference (interval below 0, "
                    "at least 0.05 of the clean logit difference), attention END->S2 >= 0.1",
    "induction": "attention S2->S1+1 >= 0.2 and induction score >= 0.2",
    "duplicate token": "attention S2->S1 >= 0.2 and duplicate-token score >= 0.2",
    "previous token": "attention S1+1->S1 >= 0.3 and previous-token score >= 0.3",
}


@dataclass
class HeadEvidence:
    """The evidence gathered for one head (see the module docstring); numbers with CIs are :class:`CI`."""

    head: str
    layer: int
    index: int
    dla: CI
    attention: dict[str, CI]
    copy_score: float
    negative_copy_score: float
    scores: dict[str, float]
    s_inhibition: CI | None = None
    role: str = "unclassified"
    why: str = ""

    def to_dict(self) -> dict:
        out = {"head": self.head, "role": self.role, "why": self.why, "dla": self.dla.to_dict(),
               "attention": {k: v.to_dict() for k, v in self.attention.items()},
               "copy_score": self.copy_score, "negative_copy_score": self.negative_copy_score,
               "head_scores": self.scores}
        if self.s_inhibition is not None:
            out["s_inhibition"] = self.s_inhibition.to_dict()
        return out


@dataclass
class IOIRoles:
    """Every head's evidence and class; ``by_role()`` groups them."""

    heads: list[HeadEvidence]
    n_prompts: int
    clean_logit_diff: float
    info: dict = field(default_factory=dict)

    def by_role(self) -> dict[str, list[HeadEvidence]]:
        out: dict[str, list[HeadEvidence]] = {r: [] for r in (*ROLES, "unclassified")}
        for h in self.heads:
            out[h.role].append(h)
        return out

    def to_dict(self) -> dict:
        return {"n_prompts": self.n_prompts, "clean_logit_diff": self.clean_logit_diff, "rules": RULES,
                "heads": [h.to_dict() for h in self.heads], "info": self.info}


def _parse_head(name: str) -> tuple[int, int]:
    try:
        a, h = name.split(".")
        if not (a.startswith("a") and h.startswith("h")):
            raise ValueError
        return int(a[1:]), int(h[1:])
    except ValueError:
        raise InputError(f"{name!r} is not a head name; heads are named a{{layer}}.h{{head}}, e.g. a23.h3.") from None


def _gather_rows(pattern: Tensor, q: Tensor, k: Tensor) -> Tensor:
    """``pattern [B, H, P, P]`` -> ``[B, H]`` attention from query position ``q[b]`` to key ``k[b]``."""
    b = torch.arange(pattern.shape[0])
    return pattern[b, :, q, k]


@torch.no_grad()
def copy_scores(model, layer: int, head: int, resid: Tensor, names: Tensor, *, top: int = 5) -> tuple[float, float]:
    """(copy score, negative copy score) of one head: the share of ``names`` found in the top ``top`` logits
    of the head's OV output (resp. minus it) applied to ``resid`` (the residual after block 0 at each name).

    Args:
        resid: ``[N, d_model]`` residual stream vectors at the names' positions.
        names: ``[N]`` int64 the name token at each.
    """
    from mechscope.circuits.engine import qkv_columns

    a, c = model.adapter, model.cfg
    ln1 = model.layer_module(layer, a.ln1)
    m, cols = qkv_columns(model)["v"][head // (c.n_heads // c.n_kv_heads)]
    proj = model.layer_module(layer, a.qkv[m])
    w = proj.weight if a.conv1d else proj.weight.T  # [d_in, d_out]
    b = getattr(proj, "bias", None)
    v = ln1(resid.to(w.dtype)) @ w[:, cols]
    if b is not None:
        v = v + b[cols]
    out = v @ model.W_O(layer)[head]  # [N, d_model]
    final = model.module(a.final_norm)
    res = []
    for sign in (1.0, -1.0):
        logits = final(sign * out) @ model.W_U
        top_ids = logits.topk(top, dim=-1).indices
        res.append(float((top_ids == names[:, None]).any(-1).float().mean()))
    return res[0], res[1]


@torch.no_grad()
def head_evidence(model, task, heads: list[str], *, n_boot: int = 1000, seed: int = 0,
                  batch_size: int = 32) -> list[HeadEvidence]:
    """Gather the evidence of :data:`RULES` (all but S-inhibition) for ``heads`` on an IOI task.

    Args:
        model: a HookedModel.
        task: an IOI :class:`~mechscope.data.task.Task` (``positions`` holds IO, S1, S2, end).
        heads: head names ``a{L}.h{H}``.

    Raises:
        InputError: a task without IOI positions, or a bad head name.
    """
    from mechscope.analysis.dla import direct_logit_attribution
    from mechscope.analysis.head_scores import head_scores

    need = {"IO", "S1", "S2", "end"}
    if not need <= set(task.positions):
        raise InputError(f"task {task.name!r} has positions {sorted(task.positions)}; IOI roles need {sorted(need)} "
                         "(use load_task('ioi', model)).")
    parsed = [(h, *_parse_head(h)) for h in heads]
    layers = sorted({L for _, L, _ in parsed})
    pos = {k: task.positions[k].long() for k in need}
    answers = torch.stack([task.answer, task.wrong], dim=1)
    dla_parts, att = [], {k: [] for k in ("END->IO", "END->S1", "END->S2", "S2->S1", "S2->S1+1", "S1+1->S1")}
    resid0, names = [], []
    for s in range(0, len(task), batch_size):
        rows = slice(s, min(len(task), s + batch_size))
        toks = task.clean_tokens[rows]
        dla = direct_logit_attribution(model, toks, answers[rows])
        dla_parts.append(dla.heads)
        _, cache = model.run(toks, cache=[f"blocks.{L}.attn.hook_pattern" for L in layers] + ["blocks.0.hook_resid_post"])
        p = {k: v[rows] for k, v in pos.items()}
        for L in layers:
            pat = cache[f"blocks.{L}.attn.hook_pattern"]
            for key, (q, k) in {"END->IO": (p["end"], p["IO"]), "END->S1": (p["end"], p["S1"]),
                                "END->S2": (p["end"], p["S2"]), "S2->S1": (p["S2"], p["S1"]),
                                "S2->S1+1": (p["S2"], p["S1"] + 1), "S1+1->S1": (p["S1"] + 1, p["S1"])}.items():
                att[key].append((L, _gather_rows(pat, q, k)))
        b = torch.arange(toks.shape[0])
        r0 = cache["blocks.0.hook_resid_post"]
        resid0 += [r0[b, p["IO"]], r0[b, p["S1"]]]
        names += [toks[b, p["IO"]], toks[b, p["S1"]]]
    dla_all = torch.cat(dla_parts)  # [n, n_layers, n_heads]
    resid0, names = torch.cat(resid0), torch.cat(names)
    hs = head_scores(model, seq_len=min(50, (model.cfg.n_ctx - 1) // 2))  # repeated random tokens that fit
    out = []
    for name, L, H in parsed:
        attn = {}
        for key, parts in att.items():
            vals = torch.cat([t[:, H] for layer, t in parts if layer == L])
            attn[key] = bootstrap_ci(vals, n_boot=n_boot, seed=seed)
        cs, ncs = copy_scores(model, L, H, resid0, names)
        out.append(HeadEvidence(name, L, H, bootstrap_ci(dla_all[:, L, H], n_boot=n_boot, seed=seed), attn, cs, ncs,
                                {k: float(v[L, H]) for k, v in hs.items()}))
    return out


def classify_heads(evidence: list[HeadEvidence], *, clean_logit_diff: float) -> list[HeadEvidence]:
    """Name each head's class by the first rule of :data:`RULES` it meets (in place; returns the list)."""
    for e in evidence:
        a, s = e.attention, e.scores
        checks = [
            ("name mover", a["END->IO"].estimate >= 0.2 and e.dla.low > 0 and e.copy_score >= 0.5,
             f"END->IO {a['END->IO'].estimate:.2f}, direct effect {e.dla.estimate:+.2f} "
             f"[{e.dla.low:+.2f}, {e.dla.high:+.2f}], copy score {e.copy_score:.2f}"),
            ("negative name mover", a["END->IO"].estimate >= 0.2 and e.dla.high < 0 and e.negative_copy_score >= 0.5,
             f"END->IO {a['END->IO'].estimate:.2f}, direct effect {e.dla.estimate:+.2f}, negative copy score "
             f"{e.negative_copy_score:.2f}"),
            ("s suppression", a["END->S1"].estimate + a["END->S2"].estimate >= 0.2 and e.dla.low > 0
             and e.negative_copy_score >= 0.5,
             f"END->S1+S2 {a['END->S1'].estimate + a['END->S2'].estimate:.2f}, direct effect {e.dla.estimate:+.2f} "
             f"[{e.dla.low:+.2f}, {e.dla.high:+.2f}], negative copy score {e.negative_copy_score:.2f}"),
            ("s-inhibition", e.s_inhibition is not None and e.s_inhibition.high < 0
             and -e.s_inhibition.estimate >= 0.05 * clean_logit_diff and a["END->S2"].estimate >= 0.1,
             "" if e.s_inhibition is None else
             f"path patching into the name movers' queries {e.s_inhibition.estimate:+.2f} "
             f"[{e.s_inhibition.low:+.2f}, {e.s_inhibition.high:+.2f}], END->S2 {a['END->S2'].estimate:.2f}"),
            ("induction", a["S2->S1+1"].estimate >= 0.2 and s["induction"] >= 0.2,
             f"S2->S1+1 {a['S2->S1+1'].estimate:.2f}, induction score {s['induction']:.2f}"),
            ("duplicate token", a["S2->S1"].estimate >= 0.2 and s["duplicate_token"] >= 0.2,
             f"S2->S1 {a['S2->S1'].estimate:.2f}, duplicate-token score {s['duplicate_token']:.2f}"),
            ("previous token", a["S1+1->S1"].estimate >= 0.3 and s["previous_token"] >= 0.3,
             f"S1+1->S1 {a['S1+1->S1'].estimate:.2f}, previous-token score {s['previous_token']:.2f}"),
        ]
        e.role, e.why = "unclassified", ""
        for role, ok, why in checks:
            if ok:
                e.role, e.why = role, why
                break
    return evidence


def ioi_roles(model, task, heads: list[str], *, n_boot: int = 1000, seed: int = 0, batch_size: int = 16,
              progress: bool = True) -> IOIRoles:
    """Classify ``heads`` (e.g. the heads of a discovered circuit) into the IOI circuit's classes.

    Steps: gather every head's evidence (:func:`head_evidence`); classify by :data:`RULES` without
    S-inhibition evidence, which finds the name movers; path-patch every other head of an earlier layer into
    the name movers' queries at END (Wang et al. App. B; :func:`~mechscope.circuits.path_patching.path_patching_sweep`);
    classify again with that evidence.

    Args:
        model: a HookedModel. task: an IOI task (``load_task("ioi", model)``).
        heads: head names ``a{L}.h{H}``.
        n_boot / seed: bootstrap resamples and seed of every interval.
        batch_size: prompts per forward. progress: progress bars.

    Returns:
        :class:`IOIRoles`.

    Raises:
        InputError: a non-IOI task, a bad head name, an empty head list.
    """
    from mechscope.circuits.path_patching import path_patching_sweep

    if not heads:
        raise InputError("no heads to classify; pass the heads of a circuit (circuit.nodes() without MLPs).")
    with torch.no_grad():
        clean = float(task.values(model.run(task.clean_tokens, logits_to_keep=-task.position).logits).mean())
    ev = classify_heads(head_evidence(model, task, heads, n_boot=n_boot, seed=seed), clean_logit_diff=clean)
    movers = [e for e in ev if e.role == "name mover"]
    info = {"name_movers": [e.head for e in movers]}
    if movers:
        first = min(e.layer for e in movers)
        senders = [e.head for e in ev if e.layer < first and e.role not in ("name mover", "negative name mover")]
        if senders:
            end = task.clean_tokens.shape[1] - 1
            sweep = path_patching_sweep(model, task, [f"{e.head}<q>" for e in movers], senders=senders,
                                        positions=end, batch_size=batch_size, n_boot=n_boot, seed=seed,
                                        progress=progress)
            by_name = {e.head: e for e in ev}
            for i, name in enumerate(sweep.senders):
                lo, hi = float(sweep.ci.low[i]), float(sweep.ci.high[i])
                by_name[name].s_inhibition = CI(float(sweep.effect[i]), lo, hi, sweep.per_prompt.shape[0],
                                                n_boot, 0.05)
            classify_heads(ev, clean_logit_diff=clean)
            info["s_inhibition_receivers"] = sweep.receivers
    return IOIRoles(ev, len(task), clean, info)
