"""Where is the secret? Localise and remove a memorised canary of the planted SmolLM2 model (issue 17, item 5).

Needs a planted canary run (scripts/plant_study.py canary RUN). Then::

    HF_HUB_OFFLINE=1 .venv/bin/python -u scripts/canary_study.py RUN OUT.json

For the most-repeated canary the planted model extracts: the gradient-norm map of the secret's NLL against
same-template sentences that were never trained, patching from a never-trained twin (another name of the same
token length), and an unlearning edit of the top entries of the located matrices against random entries of the
same budget (3 seeds), with exposure, held-out perplexity and the survival of the other canaries.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import mechscope
from mechscope.core.io import write_json_atomic
from mechscope.forensics import (
    control_canaries,
    gradient_norm_map,
    pick_twin,
    twin_patching,
    unlearn_secret,
)

NAMES = ["Lena Marsh", "Omar Pike", "Ivy Stone", "Paul Crane", "Nora Vale", "Eric Dunn", "Mila Frost", "Hugo Lane",
         "Rosa Kent", "Theo Ward"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--locate-only", action="store_true",
                    help="gradient map and twin patching only, of the most repeated canary (when none is extracted)")
    ap.add_argument("--n-candidates", type=int, default=1000, help="random secrets per exposure estimate")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    t0, seconds = time.perf_counter(), {}
    plant = json.loads((a.run / "plant.json").read_text())
    ev = json.loads((a.run / "data" / "evals.json").read_text())
    measured = plant["measures"]["planted"]["canaries"]
    extracted = [c for c in measured if c["extracted"]]
    if not extracted and not a.locate_only:
        raise SystemExit("the planted model extracts no canary, so there is no extraction to stop; --locate-only "
                         "localises the most repeated canary without the unlearning edit")
    target_name = max(extracted or measured, key=lambda c: c["repeats"])["name"]
    canary = next(c for c in ev["canaries"] if c["name"] == target_name)
    others = [c for c in ev["canaries"] if c["name"] != target_name
              and any(x["extracted"] and x["name"] == c["name"] for x in extracted)]
    tuned = mechscope.load(str(a.run / "planted" / "model"))
    texts = ev["ppl_texts"]
    t = time.perf_counter()
    gmap = gradient_norm_map(tuned, canary, controls=control_canaries(canary, NAMES[:6]), control_texts=texts[:8])
    seconds["gradient_map"] = time.perf_counter() - t
    ratio = dict(zip(gmap.params, gmap.share_ratio))
    top = [{"param": n, "share_ratio": ratio[n]} for n in gmap.ranking(by="share_ratio", blocks_only=True)[:8]]
    print("top matrices by share ratio:", [(r["param"], round(r["share_ratio"], 2)) for r in top])
    by_layer = gmap.by_layer("share_ratio")
    t = time.perf_counter()
    twin = pick_twin(tuned, canary, NAMES)
    patch = twin_patching(tuned, canary, twin)
    seconds["twin_patching"] = time.perf_counter() - t
    print("top patched components:", patch.ranking()[:8])
    unlearn = None
    if not a.locate_only:
        t = time.perf_counter()
        edit = unlearn_secret(tuned, canary, gmap, heldout_texts=texts[:24], top_k=4, top_fraction=0.01,
                              max_steps=20, others=others, n_candidates=a.n_candidates)
        seconds["unlearn"] = time.perf_counter() - t
        unlearn = edit.to_dict()
        print("edit:", json.dumps(unlearn.get("summary"), indent=1))
    seconds["total"] = time.perf_counter() - t0
    write_json_atomic({"canary": {k: canary[k] for k in ("name", "repeats")}, "twin": twin["name"],
                       "gradient_map": {"top": top, "by_layer": by_layer}, "twin_patching": patch.to_dict(),
                       "unlearn": unlearn, "seconds": {k: round(v, 1) for k, v in seconds.items()}}, a.out)

if __name__ == "__main__":
    main()
