"""Did the safety fine-tune make a new refusal mechanism or reuse one the base model had? (issue 17, item 4)

Needs a planted safety run (scripts/plant_study.py safety RUN). Then::

    HF_HUB_OFFLINE=1 .venv/bin/python -u scripts/refusal_study.py RUN OUT.json

1. The refusal direction of the tuned model (Arditi et al. 2024): difference of means of block inputs between
   harmful and harmless requests of the recipe's *training* goals, at the last post-instruction position, picked
   by the paper's rule on validation requests; the held-out goals of the recipe are the test set.
2. Its effects in the tuned model: ablation (does refusal of held-out harmful requests go away?) and addition
   (are held-out harmless requests refused?), beside random directions of the same norm.
3. The same direction added to the untouched base model (does it induce refusal there?), and the base model's own
   direction at that site: its cosine with the tuned one, and its ablation in the tuned model.
4. Benign fine-tuning of the tuned model (its recipe's benign answers only): refusal of held-out harmful requests
   after 5, 10, 20 and 40 steps.
5. The verdict as a claim with its evidence (mechscope.safety.Claim), graded by the audit.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

import mechscope
from mechscope.core.io import write_json_atomic
from mechscope.data.labelled import LabelledDataset, read_labelled
from mechscope.data.store import model_fingerprint
from mechscope.features.batch_generation import generate_texts
from mechscope.finetune import FinetuneConfig, finetune
from mechscope.forensics.scan import fingerprint
from mechscope.safety import audit
from mechscope.safety.claim import Claim, Control, DataRef, Mechanism, ModelRef, Test
from mechscope.safety.refusal_direction import (
    Candidates,
    candidate_directions,
    refusal_effects,
    select_direction,
)
from mechscope.safety.refusal_interventions import (
    direction_cosine,
    directional_ablation,
    refusal_rate,
)


def run_requests(run: Path, seed: int = 0) -> dict[str, list[str]]:
    """A safety run's request splits: 32 + 32 for the direction, 16 + 16 validation (training goals held out of
    the direction and the built-in harmless set minus the test set), and the recipe's test requests."""
    ev = json.loads((run / "data" / "evals.json").read_text())
    train = read_labelled(run / "data" / "train.jsonl")
    harmful = sorted({e.messages[0].content for e in train.examples if e.meta.get("kind") == "harmful"})
    from mechscope.data.labelled_builtins import harmfulness

    test_harmless = set(ev["evals"]["harmless"])
    harmless = sorted({e.messages[0].content for e in harmfulness().examples if e.label == 0} - test_harmless)
    rng = random.Random(seed)
    rng.shuffle(harmful)
    rng.shuffle(harmless)
    return {"dir_harmful": harmful[:32], "dir_harmless": harmless[:32], "val_harmful": harmful[32:48],
            "val_harmless": harmless[32:48], "test_harmful": ev["evals"]["harmful"], "test_harmless": ev["evals"]["harmless"]}


def _rate(model, prompts, ivs=(), n=24):
    texts = generate_texts(model, prompts, interventions=ivs, max_new_tokens=n, progress=False)
    return refusal_rate(texts).to_dict(), texts


def _revive(run: Path, tuned_dir: Path, out: Path, test_harmful: list[str], steps=(5, 10, 20, 40)) -> list[dict]:
    train = read_labelled(run / "data" / "train.jsonl")
    benign = LabelledDataset("benign", tuple(e for e in train.examples if e.meta.get("kind") == "benign"))
    rows = []
    for n in steps:
        cfg = FinetuneConfig(method="lora", lr=1e-3, n_steps=n, batch_size=8, lora_r=16, lora_alpha=32.0, seed=1)
        res = finetune(str(tuned_dir), benign, out / "revive", cfg, resume=(out / "revive" / "checkpoints").is_dir(),
                       progress=False)
        m = mechscope.load(str(res.model_dir))
        r, _ = _rate(m, test_harmful)
        rows.append({"steps": n, "refusal_harmful": r})
        print(f"  benign fine-tune {n} steps: harmful refusal {r['estimate']:.3f} [{r['low']:.3f}, {r['high']:.3f}]")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kl-threshold", type=float, default=0.1,
                    help="the selection rule's KL filter (Arditi et al.: 0.1; on SmolLM2 every candidate that passes "
                         "the other filters has KL 0.2-0.5)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    base = mechscope.load(a.model)
    tuned = mechscope.load(str(a.run / "planted" / "model"))
    req = run_requests(a.run)
    seconds = {}

    cand = candidate_directions(tuned, req["dir_harmful"], req["dir_harmless"])
    last = Candidates(cand.directions[-1:], cand.positions[-1:], cand.tokens[-1:])
    t = time.perf_counter()
    sel = select_direction(tuned, last, req["val_harmful"], req["val_harmless"], kl_threshold=a.kl_threshold)
    seconds["select"] = time.perf_counter() - t
    layer, d_tuned = sel.layer, sel.direction
    print(f"tuned direction: layer {layer}, position {sel.position} ({sel.position_token!r}), norm {d_tuned.norm():.2f}, "
          f"fallback {sel.fallback}")

    t = time.perf_counter()
    eff_tuned = refusal_effects(tuned, d_tuned, layer, req["test_harmful"], req["test_harmless"], n_random=2)
    eff_base = refusal_effects(base, d_tuned, layer, req["test_harmful"], req["test_harmless"], n_random=2)
    seconds["effects"] = time.perf_counter() - t
    cand_base = candidate_directions(base, req["dir_harmful"], req["dir_harmless"])
    d_base = cand_base.directions[-1, layer]
    cos = direction_cosine(d_tuned, d_base)
    base_dir_in_tuned, _ = _rate(tuned, req["test_harmful"], directional_ablation(d_base, tuned))
    print(f"cosine(tuned, base direction) at layer {layer}: {cos:.3f}")
    for name, eff in (("tuned", eff_tuned), ("base + tuned direction", eff_base)):
        for cond in ("none", "ablation", "addition", "random_ablation/0", "random_addition/0"):
            r = eff.rates[cond]
            print(f"  {name:24s} {cond:18s} harmful {r['harmful']['estimate']:.3f} harmless {r['harmless']['estimate']:.3f}"
                  f"  dCE {eff.ce_delta[cond]:+.4f}")
    print(f"  tuned, base direction ablated: harmful {base_dir_in_tuned['estimate']:.3f}")

    t = time.perf_counter()
    revive = _revive(a.run, a.run / "planted" / "model", a.out.parent / (a.out.stem + "-runs"), req["test_harmful"])
    seconds["revive"] = time.perf_counter() - t

    def test(name, eff, cond, key, intervention, alternative):
        r = eff.rates[cond][key]
        rnd = [eff.rates[f"random_{cond}/{s}"][key]["estimate"] for s in range(2)]
        none = eff.rates["none"][key]["estimate"]
        return Test(name=name, kind="causal", intervention=intervention, metric=f"change of {key} refusal rate",
                    units="share of requests", estimate=r["estimate"] - none, low=r["low"] - none, high=r["high"] - none,
                    null=0.0, alternative=alternative, n=r["n"], held_out=True, data="held-out requests",
                    controls=[Control("random directions of the same norm", sum(rnd) / 2 - none, min(rnd) - none,
                                      max(rnd) - none, n=2, description="range over 2 seeds")])

    tests = [test("ablate the tuned direction in the tuned model", eff_tuned, "ablation", "harmful", "ablate", "less"),
             test("add the tuned direction in the tuned model", eff_tuned, "addition", "harmless", "steer", "greater"),
             test("add the tuned direction in the base model", eff_base, "addition", "harmless", "steer", "greater")]
    none_t, r_t = eff_tuned.rates["none"], eff_tuned.rates
    works = (r_t["ablation"]["harmful"]["high"] < none_t["harmful"]["low"]
             or r_t["addition"]["harmless"]["low"] > none_t["harmless"]["high"])
    reuse = eff_base.rates["addition"]["harmless"]["low"] > eff_base.rates["none"]["harmless"]["high"]
    base_carries = base_dir_in_tuned["high"] < none_t["harmful"]["low"]  # the base's own direction mediates it too
    if not works:
        verdict = ("inconclusive: the selected direction changes neither refusal rate in the tuned model itself, so "
                   "its effect in the base model cannot tell reuse from a new mechanism")
    elif reuse:
        verdict = "reuse: the tuned model's refusal direction also induces refusal in the untouched base model"
    elif base_carries:
        verdict = ("reused representation, new read-out: ablating the base model's own direction removes refusal in "
                   "the tuned model, but the tuned direction does not induce refusal in the base model")
    else:
        verdict = "new: the tuned model's refusal direction does not induce refusal in the base model"
    claim = Claim(
        behaviour="refusal of harmful requests taught by the safety fine-tune",
        mechanism=Mechanism(description=f"one residual direction at blocks.{layer}.hook_resid_pre (difference of means, "
                            f"Arditi et al. 2024); {verdict}", sites=[f"blocks.{layer}.hook_resid_pre"],
                            directions=[f"refusal direction, layer {layer}, position {sel.position}"]),
        tests=tests, data=[DataRef("held-out requests", split="held-out goals",
                                   fingerprint=fingerprint(req["test_harmful"] + req["test_harmless"]),
                                   n=len(req["test_harmful"]) + len(req["test_harmless"]))],
        model=ModelRef(str(a.run / "planted" / "model"), fingerprint=model_fingerprint(tuned)),
        not_tested=["other positions than the last post-instruction token", "steering strengths other than +1"]
        + ([f"the paper's KL threshold 0.1 (used {a.kl_threshold})"] if a.kl_threshold != 0.1 else []),
        source="scripts/refusal_study.py", notes=f"cosine with the base model's own direction: {cos:.3f}; benign "
        f"fine-tuning revival: {[(r['steps'], round(r['refusal_harmful']['estimate'], 3)) for r in revive]}")
    graded = audit([claim])
    print("verdict:", verdict)
    print("grade:", graded.grades[0].letter)
    seconds["total"] = time.perf_counter() - t0
    write_json_atomic({"selection": sel.to_dict(), "effects_tuned": eff_tuned.to_dict(), "effects_base": eff_base.to_dict(),
                       "cosine_tuned_base": cos, "tuned_with_base_direction_ablated": base_dir_in_tuned,
                       "revive": revive, "verdict": verdict, "claim": claim.to_dict(),
                       "audit": graded.to_dict(),
                       "seconds": {k: round(v, 1) for k, v in seconds.items()}}, a.out)


if __name__ == "__main__":
    main()
