"""A cheap form of the refusal-direction study (issue 17, item 4): refusal *scores* by single forwards, no generation.

    HF_HUB_OFFLINE=1 .venv/bin/python -u scripts/refusal_scores.py SAFETY_RUN OUT.json

For every other layer: the tuned model's refusal direction (difference of means of block inputs at the last
post-instruction token, Arditi et al. 2024, from the recipe's training goals), its cosine with the base model's
own direction there, and the mean refusal score (log P(refusal prefix) - log P(compliance prefix), teacher forced,
nats) on 16 validation requests of the training goals' other half: in the tuned model with no intervention, with
the direction ablated everywhere (harmful requests), with it added at its layer (harmless requests); in the base
model with the tuned direction added (harmless requests); and the same for a random direction of the same norm.
scripts/refusal_study.py is the full study with generated refusal rates (about 80 min on a busy 2-core CPU).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from refusal_study import run_requests  # same folder

import mechscope
from mechscope.core.io import write_json_atomic
from mechscope.safety.refusal_direction import RefusalScorer, candidate_directions
from mechscope.safety.refusal_interventions import (
    activation_addition,
    direction_cosine,
    directional_ablation,
    prompt_ids,
    random_direction,
)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    base = mechscope.load()
    tuned = mechscope.load(str(a.run / "planted" / "model"))
    req = run_requests(a.run)
    d_t = candidate_directions(tuned, req["dir_harmful"], req["dir_harmless"]).directions[-1]
    d_b = candidate_directions(base, req["dir_harmful"], req["dir_harmless"]).directions[-1]
    sc = {(m, k): RefusalScorer(model, prompt_ids(model, req[f"val_{k}"]), "prefix", None, 16)
          for m, model in (("tuned", tuned), ("base", base)) for k in ("harmful", "harmless")}
    none = {f"{m}/{k}": float(s.refusal().mean()) for (m, k), s in sc.items()}
    print("no intervention:", {k: round(v, 2) for k, v in none.items()})
    rows = []
    for layer in range(2, tuned.cfg.n_layers, 2):
        d, r = d_t[layer], random_direction(d_t[layer], layer)
        row = {"layer": layer, "norm": float(d.norm()), "cosine_tuned_base": direction_cosine(d, d_b[layer]),
               "tuned_ablate_harmful": float(sc["tuned", "harmful"].refusal(directional_ablation(d, tuned)).mean()),
               "tuned_add_harmless": float(sc["tuned", "harmless"].refusal(activation_addition(d, layer)).mean()),
               "base_add_harmless": float(sc["base", "harmless"].refusal(activation_addition(d, layer)).mean()),
               "base_own_add_harmless": float(sc["base", "harmless"].refusal(activation_addition(d_b[layer], layer)).mean()),
               "random_tuned_ablate_harmful": float(sc["tuned", "harmful"].refusal(directional_ablation(r, tuned)).mean()),
               "random_base_add_harmless": float(sc["base", "harmless"].refusal(activation_addition(r, layer)).mean())}
        rows.append(row)
        print({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()})
    write_json_atomic({"score": "log P(refusal prefix) - log P(compliance prefix), nats, mean over 16 requests",
                       "no_intervention": none, "layers": rows, "seconds": round(time.perf_counter() - t0, 1)}, a.out)


if __name__ == "__main__":
    main()
