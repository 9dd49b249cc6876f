"""Induction heads from scratch (Olsson et al. 2022, "In-context Learning and Induction Heads").

A two-layer attention-only transformer is trained on real text from mechscope's corpora (by default
``pysource``, the Python standard library's source code), and checkpoints
are scored as it learns: the in-context-learning score (loss at token 500 minus loss at token 50, on
held-out text, each averaged over +-5 tokens), and every head's induction (prefix-matching) and
previous-token scores on repeated random tokens (the core's
:func:`~mechscope.analysis.head_scores.head_scores`). The phase change is located as
the step where the training loss bump, the ICL score and the induction score move together; the circuit
is confirmed by ablating the previous-token head and the induction head (mechscope's ``Ablate`` on
``hook_z``).

The model is a ``transformers`` GPT-2 whose MLPs are width 1 with output weights fixed at zero, so every
block adds attention only (and every canonical hook name still exists; ``hook_mlp_out`` is exactly zero).
Text runs give it shortformer positions (sinusoidal, added to the queries' and keys' input only,
:class:`PositionalQK`); ``positions`` chooses GPT-2's learned positions or a rotary Llama instead.
Text is tokenized with a small byte-level BPE trained on the training split (``vocab`` ids, a few
seconds), which keeps the unembedding small enough for a CPU and gives every token its own id; the
alternative (``tokenizer="smollm2"``) maps the default model's tokens onto the ``vocab - 1`` most frequent
plus one "other" id.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from mechscope.core.errors import InputError
from mechscope.toys.common import finish, seed_everything
from mechscope.toys.induction_config import (  # noqa: F401  (re-exported: the toy's public names)
    POSITIONS, SYNTHETIC, InductionConfig, _check_device,
)
from mechscope.toys.induction_figures import induction_figures
from mechscope.toys.induction_model import (  # noqa: F401  (re-exported: the toy's public names)
    PositionalQK, build_model, sinusoidal_positions,
)
from mechscope.toys.induction_data import (  # noqa: F401  (re-exported: the toy's public names)
    _synthetic_batch, probe_tokens, remap_vocab, repeated_tokens, text_data, train_bpe, trigram_sequences,
)

PAPER = {"cite": "Olsson et al. 2022, In-context Learning and Induction Heads (Transformer Circuits Thread)",
         "url": "https://transformer-circuits.pub/2022/in-context-learning-and-induction-heads/index.html"}


@torch.no_grad()
def per_position_loss(model, rows: Int[Tensor, "n pos"], batch: int = 16, interventions=()) -> Float[Tensor, " pos_minus_1"]:
    """Mean next-token loss (nats) at each position 0..pos-2 over ``rows`` (with ``interventions`` applied)."""
    out = []
    for s in range(0, rows.shape[0], batch):
        x = rows[s:s + batch].to(model.device)
        logits = model.run(x, interventions=list(interventions))[0].float()
        out.append(F.cross_entropy(logits[:, :-1].transpose(1, 2), x[:, 1:], reduction="none"))
    return torch.cat(out).mean(0)


def icl_score(loss_by_pos: Tensor, early: int, late: int, window: int = 0) -> float:
    """Loss at token ``late`` minus loss at token ``early`` (Olsson et al.: 500 and 50), in nats; negative =
    in-context learning. Token t's loss is the prediction of token t from tokens 0..t-1 (index t - 1).

    ``window`` > 0 averages each over tokens t - window .. t + window (clipped to the row), which cuts the
    noise of a single position on a few hundred held-out contexts. Rows shorter than ``late`` use their
    last token."""
    n = loss_by_pos.numel()

    def at(t: int) -> Tensor:
        return loss_by_pos[max(1, t - window) - 1:min(n, t + window)].mean()

    return float(at(min(late, n)) - at(early))


def _lr(cfg: InductionConfig, step: int) -> float:
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))


@torch.no_grad()
def checkpoint_scores(model, eval_rows: Tensor | None, probe: Tensor, cfg: InductionConfig) -> dict:
    """ICL score and per-position loss on ``eval_rows``; induction and previous-token scores of every head."""
    from mechscope.analysis.head_scores import head_scores

    out = {}
    if eval_rows is not None:
        by_pos = per_position_loss(model, eval_rows)
        out["icl"] = icl_score(by_pos, cfg.icl_early, cfg.icl_late, cfg.icl_window)
        out["eval_loss"] = float(by_pos.mean())
        out["loss_by_pos"] = by_pos
    s = head_scores(model, probe)
    out["induction"] = s["induction"]
    out["previous_token"] = s["previous_token"]
    out["repeat_loss"] = float(per_position_loss(model, probe)[cfg.repeat_len + 1:].mean())
    return out


def train(cfg: InductionConfig, *, progress: bool = True, data: tuple[Tensor, Tensor] | None = None,
          probe: Tensor | None = None) -> tuple[object, dict]:
    """Train the attention-only model, scoring a checkpoint every ``cfg.eval_every`` steps.

    Args:
        data: (train rows, eval rows) of remapped token ids; None loads the corpora (or, with
            ``cfg.synthetic``, draws repeated random sequences every step and has no eval text).
        probe: the head-score prompts (:func:`probe_tokens`); None draws them from ``cfg`` and the rows.

    Returns:
        (model, history) with per-step ``train_loss`` and per-checkpoint ``step``, ``icl``, ``eval_loss``,
        ``induction`` / ``previous_token`` (``[n_layers][n_heads]`` lists) and ``repeat_loss``.
    """
    from tqdm.auto import tqdm

    cfg.check()
    g = seed_everything(cfg.seed)
    model = build_model(cfg)
    if cfg.synthetic:
        train_rows = eval_rows = None
    else:
        train_rows, eval_rows = data if data is not None else text_data(cfg)[:2]
        if train_rows.shape[1] != cfg.context_len:
            raise InputError(f"data rows have {train_rows.shape[1]} tokens but context_len is {cfg.context_len}.")
    probe = probe_tokens(cfg, train_rows) if probe is None else probe
    hf = model.hf
    dev = model.device
    if train_rows is not None:  # rows are drawn by index on the CPU generator, then read on the device
        train_rows = train_rows.to(dev)
    params = [q for q in hf.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr(cfg, s))
    hist: dict = {"train_loss": [], "step": [], "icl": [], "eval_loss": [], "induction": [], "previous_token": [],
                  "repeat_loss": []}
    order = None if train_rows is None else torch.randperm(train_rows.shape[0], generator=g)
    cursor = 0
    pending: list[Tensor] = []
    bar = tqdm(range(cfg.steps + 1), desc="induction heads", unit="step", disable=not progress)
    for step in bar:
        if step % cfg.eval_every == 0 or step == cfg.steps:
            if pending:  # one device-to-host copy per checkpoint, not one per step
                hist["train_loss"] += torch.stack(pending).float().tolist()
                pending = []
            hf.eval()
            sc = checkpoint_scores(model, eval_rows, probe, cfg)
            hist["step"].append(step)
            for k in ("icl", "eval_loss"):
                hist[k].append(sc.get(k))
            hist["induction"].append(sc["induction"].tolist())
            hist["previous_token"].append(sc["previous_token"].tolist())
            hist["repeat_loss"].append(sc["repeat_loss"])
            bar.set_postfix(induction=f"{float(sc['induction'].max()):.2f}",
                            icl=f"{sc['icl']:.2f}" if sc.get("icl") is not None else "-")
            hf.train()
        if step == cfg.steps:
            break
        if train_rows is None:
            x = _synthetic_batch(cfg, g).to(dev)
        else:
            if cursor + cfg.batch > order.numel():
                order, cursor = torch.randperm(train_rows.shape[0], generator=g), 0
            x = train_rows[order[cursor:cursor + cfg.batch].to(dev)]
            cursor += cfg.batch
        logits = hf(x).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), x[:, 1:].flatten())
        loss.backward()
        if cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        pending.append(loss.detach())
    hf.eval()
    return model, hist


def phase_change(hist: dict, cfg: InductionConfig) -> dict:
    """Steps where the three signals of the phase change move fastest, between consecutive checkpoints:

    - ``induction``: the best induction score among heads of layer >= 1 rises most;
    - ``icl``: the ICL score falls most (text runs only);
    - ``loss``: the training loss's fall per unit of log(step) peaks (the loss-curve bump), past the first
      10% of training (the very first steps fall fastest in any run).

    Each step is the midpoint of its checkpoint interval. ``span`` is max - min of the located steps.
    """
    steps = hist["step"]
    mids = [(a + b) / 2 for a, b in zip(steps[:-1], steps[1:])]
    best = [max(max(row) for row in layers[1:]) for layers in hist["induction"]]
    out = {"induction_curve": best}
    rise = [b - a for a, b in zip(best[:-1], best[1:])]
    out["induction"] = mids[max(range(len(rise)), key=rise.__getitem__)] if rise else None
    if hist["icl"] and hist["icl"][0] is not None:
        fall = [a - b for a, b in zip(hist["icl"][:-1], hist["icl"][1:])]
        out["icl"] = mids[max(range(len(fall)), key=fall.__getitem__)]
    tl = hist["train_loss"]
    win = [sum(tl[a:b]) / max(1, len(tl[a:b])) for a, b in zip(steps[:-1], steps[1:])]
    slope = []
    for i in range(len(win) - 1):
        dx = math.log(mids[i + 1]) - math.log(max(mids[i], 1.0))
        slope.append((win[i] - win[i + 1]) / dx if dx > 0 else 0.0)
    start = max(1, int(0.1 * len(slope)))
    if len(slope) > start:
        i = max(range(start, len(slope)), key=slope.__getitem__)
        out["loss"] = steps[i + 1]
    located = [out[k] for k in ("induction", "icl", "loss") if out.get(k) is not None]
    out["span"] = max(located) - min(located) if located else None
    return out


@torch.no_grad()
def ablate_circuit(model, probe: Tensor, eval_rows: Tensor | None, cfg: InductionConfig,
                   loss_by_pos: Tensor | None = None) -> dict:
    """Zero-ablate (mechscope's ``Ablate`` on ``blocks.L.attn.hook_z``) the circuit's heads and report, for
    each case, the strongest induction head's score, the loss on the repeated half of the probe and (text
    runs) the ICL score. ``loss_by_pos``: the unablated model's :func:`per_position_loss` on ``eval_rows``
    where the caller has it already (the "none" case reuses it instead of a second pass).

    Roles: previous-token heads are the layer-0 heads whose previous-token score is at least half the
    best; induction heads are the heads of later layers whose induction score is at least half the best.
    Heads of a role often come several at a time, so a role is ablated whole. The control ablates the
    layer-0 heads outside the previous-token role (absent when every layer-0 head is one).
    """
    from mechscope.analysis.head_scores import head_scores
    from mechscope.hooks.interventions import Ablate

    base = head_scores(model, probe)
    prev_scores, later = base["previous_token"][0], base["induction"][1:]
    prev = [h for h in range(cfg.n_heads) if prev_scores[h] >= 0.5 * float(prev_scores.max())]
    ind = [(1 + i // cfg.n_heads, i % cfg.n_heads) for i in range(later.numel())
           if later.flatten()[i] >= 0.5 * float(later.max())]
    top_l, top_h = max(ind, key=lambda lh: float(base["induction"][lh]))
    control = [h for h in range(cfg.n_heads) if h not in prev]

    def heads_ablation(pairs):
        by_layer: dict[int, list[int]] = {}
        for layer, h in pairs:
            by_layer.setdefault(layer, []).append(h)
        return [Ablate(f"blocks.{layer}.attn.hook_z", heads=hs) for layer, hs in by_layer.items()]

    cases = {"none": [], "previous-token heads": heads_ablation([(0, h) for h in prev]),
             "induction heads": heads_ablation(ind)}
    if control:
        cases["control: other layer-0 heads"] = heads_ablation([(0, h) for h in control])
    out = {"induction_heads": [list(x) for x in ind], "previous_token_heads": [[0, h] for h in prev],
           "control_heads": [[0, h] for h in control], "top_induction_head": [top_l, top_h], "cases": {}}
    for name, iv in cases.items():
        s = head_scores(model, probe, interventions=iv)
        row = {"induction_score": float(s["induction"][top_l, top_h]),
               "repeat_loss": float(per_position_loss(model, probe, interventions=iv)[cfg.repeat_len + 1:].mean())}
        if eval_rows is not None:
            by_pos = loss_by_pos if name == "none" and loss_by_pos is not None else (
                per_position_loss(model, eval_rows, interventions=iv))
            row["icl"] = icl_score(by_pos, cfg.icl_early, cfg.icl_late, cfg.icl_window)
        out["cases"][name] = row
    return out


def _vocab_note(cfg: InductionConfig, kept: float | None) -> str:
    if cfg.synthetic:
        return "(synthetic repeated sequences)."
    if cfg.tokenizer == "bpe":
        return f"(a byte-level BPE trained on the training split of {', '.join(cfg.corpus)})."
    cover = f"; they cover {kept:.1%} of training tokens" if kept is not None else ""
    return f"(the most frequent tokens of SmolLM2's tokenizer plus 'other'{cover})."


def run_induction(cfg: InductionConfig = InductionConfig(), *, progress: bool = True,
                  data: tuple[Tensor, Tensor] | None = None) -> dict:
    """Train, score checkpoints, locate the phase change, ablate the circuit; the result dict
    (``mechscope.toys.common``) with the paper's numbers beside ours."""
    t0 = time.perf_counter()
    cfg.check()
    kept = None
    if not cfg.synthetic and data is None:
        tr, ev, kept = text_data(cfg)
        data = (tr, ev)
    probe = probe_tokens(cfg, None if cfg.synthetic else data[0])
    model, hist = train(cfg, progress=progress, data=data, probe=probe)
    eval_rows = None if cfg.synthetic else data[1]
    pc = phase_change(hist, cfg)
    by_pos = None if eval_rows is None else per_position_loss(model, eval_rows)
    abl = ablate_circuit(model, probe, eval_rows, cfg, loss_by_pos=by_pos)
    best_ind = max(max(row) for row in hist["induction"][-1][1:])
    peak_ind = max(pc["induction_curve"])
    tokens_per_step = cfg.batch * cfg.context_len
    by_pos_last = None if by_pos is None else by_pos.tolist()
    metrics = {"phase_change": pc, "tokens_per_step": tokens_per_step, "final_icl": hist["icl"][-1],
               "best_induction_score": best_ind, "peak_induction_score": peak_ind, "ablation": abl, "history": hist,
               "vocab_coverage": kept, "final_loss_by_position": by_pos_last}
    cases = abl["cases"]
    icl_note = "no held-out text (synthetic)" if eval_rows is None else (
        f"loss@{cfg.icl_late} - loss@{cfg.icl_early} on {len(eval_rows)} held-out rows"
        + (f", each averaged over +-{cfg.icl_window} tokens" if cfg.icl_window else ""))
    ind_name, prev_name = "induction heads", "previous-token heads"
    comparisons = [
        {"quantity": "ICL score after the phase change (loss@500 - loss@50, nats)", "paper": -0.4,
         "ours": hist["icl"][-1], "note": icl_note},
        {"quantity": "best induction (prefix-matching) score, layer >= 1", "paper": "high for induction heads",
         "ours": best_ind, "note": f"final model (peak over training {peak_ind:.3f}); repeated random tokens, "
                                   f"{cfg.repeat_len} tokens repeated"},
        {"quantity": "phase change: induction score rises fastest (step)", "paper": "one narrow window",
         "ours": pc.get("induction"), "note": ("up to " if cfg.synthetic else "") + f"{tokens_per_step:,} tokens a step"},
        {"quantity": "phase change: ICL score falls fastest (step)", "paper": "the same window", "ours": pc.get("icl"),
         "note": ""},
        {"quantity": "phase change: loss-curve bump (step)", "paper": "the same window", "ours": pc.get("loss"),
         "note": "largest fall of the training loss per log-step, past the first 10% of training"},
        {"quantity": "ablating the previous-token heads: top induction head's score", "paper": "drops (K-composition broken)",
         "ours": cases[prev_name]["induction_score"], "note": f"unablated {cases['none']['induction_score']:.3f}; "
                                                              f"heads {abl['previous_token_heads']}"},
        {"quantity": "ablating the induction heads: repeated-token loss (nats)", "paper": "rises",
         "ours": cases[ind_name]["repeat_loss"], "note": f"unablated {cases['none']['repeat_loss']:.3f}; "
                                                         f"heads {abl['induction_heads']}"},
    ]
    if "icl" in cases["none"]:
        comparisons.append({"quantity": "ablating the induction heads: ICL score (nats)",
                            "paper": "in-context learning goes", "ours": cases[ind_name]["icl"],
                            "note": f"unablated {cases['none']['icl']:.3f}"})
    arch = POSITIONS[cfg.positions]
    notes = [f"Model: transformers {arch}, {cfg.n_layers} layers, attention only (MLP output fixed at 0), d_model "
             f"{cfg.d_model}, {cfg.n_heads} heads, context {cfg.context_len}, vocabulary {cfg.vocab} "
             + _vocab_note(cfg, kept)]
    if pc.get("span") is not None:
        notes.append(f"The located steps span {pc['span']:.0f} steps (checkpoints every {cfg.eval_every}).")
    result = {"toy": "induction", "title": "Induction heads and the phase change", "paper": PAPER, "seed": cfg.seed,
              "settings": asdict(cfg), "metrics": metrics, "comparisons": comparisons,
              "figures": induction_figures(model, hist, pc, abl, probe, by_pos_last, cfg), "notes": notes,
              "command": rerun_command(cfg)}
    return finish(result, t0)


_FLAGS = {"steps": "--steps", "batch": "--batch", "lr": "--lr", "eval_every": "--eval-every",
          "context_len": "--context-len", "vocab": "--vocab", "tokenizer": "--tokenizer", "d_model": "--d-model",
          "n_heads": "--heads", "positions": "--positions", "device": "--device"}


def rerun_command(cfg: InductionConfig) -> str:
    """The ``mechscope toy induction`` command line that reruns ``cfg``: the seed, steps, batch, learning
    rate and checkpoint spacing always, every other CLI setting where it differs from the preset."""
    base = SYNTHETIC if cfg.synthetic else InductionConfig()
    parts = ["mechscope toy induction", f"--seed {cfg.seed}"] + (["--synthetic"] if cfg.synthetic else [])
    for field, flag in _FLAGS.items():
        v = getattr(cfg, field)
        if field in ("steps", "batch", "lr", "eval_every") or v != getattr(base, field):
            parts.append(f"{flag} {v:g}" if isinstance(v, float) else f"{flag} {v}")
    if not cfg.synthetic and cfg.corpus != base.corpus:
        parts += [f"--corpus {c}" for c in cfg.corpus]
    return " ".join(parts)
