"""The fine-tuning loop: full or LoRA, loss on the scored (assistant) tokens only (optionally an unlikelihood term on
rejected answers), checkpoints with exact resume.

Layout of ``out_dir``::

    metrics.jsonl                 one line per optimizer step: step, loss (nats per scored token), lr, tokens
                                  (scored tokens in the step), with ``unlikelihood`` > 0 also unlikelihood
                                  (mean -log(1 - p) per rejected token) and rejected_tokens, seconds (wall time)
    checkpoints/step-N/           trainable.safetensors, optimizer.safetensors, rng.safetensors, state.json
    model/                        a transformers model folder (LoRA merged) with the tokenizer
    adapter/                      (LoRA only) the peft adapter, for PeftModel.from_pretrained
    finetune.json                 config, data fingerprint, base model, steps, final loss

Data order: example indices come from an endless stream of seeded permutations (epoch ``e`` is
``randperm(n, generator=seed + e)``); micro-batch ``k`` takes stream positions ``k * batch_size`` onwards. The data
position of a checkpoint is therefore its step, and a resumed run reads the very batches the uninterrupted one
would, with the model, optimizer and RNG states restored, so its float32 weights equal it bit for bit.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mechscope.core.errors import InputError
from mechscope.core.io import (
    load_safetensors,
    save_safetensors_atomic,
    write_folder_atomic,
    write_json_atomic,
)
from mechscope.core.padding import right_pad
from mechscope.data.labelled import Example, LabelledDataset, Message, read_labelled
from mechscope.data.labelled_render import render
from mechscope.finetune.config import FinetuneConfig

_RESUMABLE_CHANGES = {"n_steps", "n_epochs", "checkpoint_every", "diverge_factor"}
_DIVERGE_WINDOW = 5


class FinetuneDiverged(InputError):
    """The loss of a fine-tune became non-finite or grew past ``diverge_factor`` times its start.

    Attributes: step (the optimizer step that tripped the check, 1-based), loss (its loss, possibly nan),
    checkpoint (the latest checkpoint folder on disk, or None).
    """

    def __init__(self, message: str, step: int, loss: float, checkpoint: Path | None):
        super().__init__(message)
        self.step, self.loss, self.checkpoint = step, loss, checkpoint
_PROJ_CLASSES = ("Linear", "Conv1D")


@dataclass(frozen=True)
class FinetuneResult:
    """What :func:`finetune` did.

    Attributes:
        out_dir: the run folder. model_dir: the HF model folder (``out_dir / "model"``).
        n_steps: optimizer steps done in total (a resumed run counts the earlier ones).
        losses: mean cross-entropy (nats per scored token) of each optimizer step of this call.
        final_loss: the loss of the last step (None when a resume found nothing left to do).
        trainable: names of the parameters that trained.
    """

    out_dir: Path
    model_dir: Path
    n_steps: int
    losses: tuple[float, ...]
    final_loss: float | None
    trainable: tuple[str, ...]


# -- inputs -------------------------------------------------------------------------------------

def _load_model(model_or_path):
    from mechscope.models.loading import load

    hooked = load(os.fspath(model_or_path)) if isinstance(model_or_path, (str, os.PathLike)) else model_or_path
    if not hasattr(hooked, "hf"):
        raise InputError(f"finetune needs a model name, a model folder or a HookedModel, got {type(model_or_path).__name__}.")
    tok = hooked._need_tokenizer()
    hf = copy.deepcopy(hooked.hf).float()  # never train the caller's model in place
    return hf, tok, hooked.cfg.name


def _load_data(data) -> LabelledDataset:
    if isinstance(data, LabelledDataset):
        return data
    if isinstance(data, (str, os.PathLike)):
        return read_labelled(data)
    raise InputError(f"data must be a .jsonl path or a LabelledDataset, got {type(data).__name__}.")


def _encode(tok, dataset: LabelledDataset, max_len: int, loss_on: str = "answer") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input ids, labels) per example: labels are the ids at scored tokens (every token for ``loss_on="all"``),
    -100 elsewhere (cut to max_len)."""
    out = []
    for i, r in enumerate(render(tok, dataset)):
        ids, mask = r.tokens[:max_len], r.score_mask[:max_len]
        if loss_on == "all":
            mask = torch.ones_like(mask)
        labels = torch.where(mask, ids, torch.full_like(ids, -100))
        if not bool(mask[1:].any()):  # position 0 is never predicted
            raise InputError(f"dataset {dataset.name!r}, example {i}: no scored token after the first within max_len="
                             f"{max_len} tokens; the answer must follow a prompt. Put a prompt before the scored span "
                             "or raise max_len.")
        out.append((ids, labels))
    return out


def default_targets(hf: nn.Module) -> list[str]:
    """Module-name suffixes of every linear projection of the decoder layers (attention and MLP), e.g.
    ``["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]`` for Llama."""
    skip = ("lm_head", "embed", "wte", "wpe", "score")
    names = {n.rsplit(".", 1)[-1] for n, m in hf.named_modules()
             if type(m).__name__ in _PROJ_CLASSES and not any(k in n for k in skip)}
    if not names:
        raise InputError("found no linear projections in the decoder layers for LoRA; pass lora_target_modules.")
    return sorted(names)


def _wrap(hf: nn.Module, cfg: FinetuneConfig) -> nn.Module:
    if cfg.method == "full":
        for p in hf.parameters():
            p.requires_grad_(True)
        return hf
    from peft import LoraConfig, get_peft_model

    targets = list(cfg.lora_target_modules or default_targets(hf))
    present = {n.rsplit(".", 1)[-1] for n, _ in hf.named_modules()}
    missing = sorted(set(targets) - present)
    if missing:
        raise InputError(f"lora_target_modules {missing} name no module of this model; use some of "
                         f"{default_targets(hf)}.")
    lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=targets,
                      bias="none", task_type="CAUSAL_LM")
    return get_peft_model(hf, lcfg)


def _checkpoints(out_dir: Path) -> list[Path]:
    """The complete checkpoint folders of a run, oldest first (skips temporary folders of an interrupted write)."""
    folder = out_dir / "checkpoints"
    ckpts = [c for c in folder.glob("step-*") if re.fullmatch(r"step-\d+", c.name) and (c / "state.json").is_file()] \
        if folder.is_dir() else []
    return sorted(ckpts, key=lambda c: int(c.name[5:]))


def _check_out_dir(out_dir: Path, resume: bool) -> Path | None:
    """The latest checkpoint folder when resuming, else None; checks the folder can hold a run."""
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"out_dir {out_dir} is a file; give a folder path (it is created if missing).")
    ckpts = _checkpoints(out_dir)
    if resume:
        if not ckpts:
            raise InputError(f"resume=True but {out_dir} holds no checkpoint (checkpoints/step-N/); run without "
                             "resume to start afresh, or point out_dir at the run to continue.")
        return ckpts[-1]
    if ckpts:
        raise InputError(f"{out_dir} already holds a run (checkpoints up to {ckpts[-1].name}); pass resume=True to "
                         "continue it, or choose another out_dir.")
    return None


# -- checkpoints -------------------------------------------------------------------------------

def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _save_checkpoint(folder: Path, model, opt, step: int, run_info: dict) -> None:
    params = _trainable(model)
    index = {id(p): n for n, p in params.items()}
    opt_tensors, opt_scalars = {}, {}
    for group in opt.param_groups:
        for p in group["params"]:
            for key, val in opt.state.get(p, {}).items():
                if torch.is_tensor(val):
                    opt_tensors[f"{index[id(p)]}::{key}"] = val
                else:
                    opt_scalars[f"{index[id(p)]}::{key}"] = val
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]

    def write(tmp: Path):
        save_safetensors_atomic({n: p.detach() for n, p in params.items()}, tmp / "trainable.safetensors")
        save_safetensors_atomic(opt_tensors, tmp / "optimizer.safetensors")
        save_safetensors_atomic({"torch_cpu": torch.get_rng_state()}, tmp / "rng.safetensors")
        write_json_atomic({"step": step, "param_groups": groups, "optimizer_scalars": opt_scalars, **run_info},
                          tmp / "state.json")

    write_folder_atomic(folder, write)


def _load_checkpoint(folder: Path, model, opt) -> dict:
    state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    params = _trainable(model)
    saved = load_safetensors(folder / "trainable.safetensors", "checkpoint weights")
    if set(saved) != set(params):
        raise InputError(f"checkpoint {folder} holds other trainable parameters than this model has; resume with the "
                         "same base model and method, or start a new out_dir.")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(saved[n])
    opt_saved = load_safetensors(folder / "optimizer.safetensors", "optimizer state")
    sd = opt.state_dict()
    sd["state"] = {}
    for i, n in enumerate(params):  # one param group, parameters in named_parameters order
        entry = {key.split("::", 1)[1]: t for key, t in opt_saved.items() if key.split("::", 1)[0] == n}
        entry.update({key.split("::", 1)[1]: v for key, v in state["optimizer_scalars"].items()
                      if key.split("::", 1)[0] == n})
        if entry:
            sd["state"][i] = entry
    for g, saved_g in zip(sd["param_groups"], state["param_groups"]):
        g.update({k: (tuple(v) if isinstance(v, list) else v) for k, v in saved_g.items()})
    opt.load_state_dict(sd)
    rng = load_safetensors(folder / "rng.safetensors", "RNG state")
    torch.set_rng_state(rng["torch_cpu"])
    return state


# -- the loop ----------------------------------------------------------------------------------

def _rejected(tok, dataset: LabelledDataset, encoded, max_len: int) -> list[tuple[int, int] | None]:
    """Per example, ``(k, token)``: the position and id of the branching token, the first where its rejected
    answer (``meta["reject"]``) parts from the accepted one; None for examples without one. The two sequences
    agree on positions ``< k``, so the accepted answer's own forward already gives the distribution the
    branching token is drawn from (its logits at ``k - 1``): no second forward is needed. Later rejected
    tokens only continue a choice already penalised and are not read.

    Raises:
        InputError: a reject that is not a non-empty string, on an example that is not a chat ending in an
            assistant answer, or identical to the accepted answer within max_len.
    """
    idx, rejects = [], []
    for i, ex in enumerate(dataset.examples):
        r = (ex.meta or {}).get("reject")
        if r is None:
            continue
        if not isinstance(r, str) or not r.strip() or ex.messages is None or ex.messages[-1].role != "assistant":
            raise InputError(f"dataset {dataset.name!r}, example {i}: meta['reject'] must be a non-empty string on a "
                             "chat whose last message is the (accepted) assistant answer; it is the rejected answer "
                             "to that prompt.")
        rejects.append(Example(messages=(*ex.messages[:-1], Message("assistant", r)), group=ex.group))
        idx.append(i)
    out: list[tuple[int, int] | None] = [None] * len(dataset)
    if not rejects:
        return out
    for i, r in zip(idx, render(tok, LabelledDataset(f"{dataset.name}-rejected", tuple(rejects)))):
        ids, mask = r.tokens[:max_len], r.score_mask[:max_len]
        acc = encoded[i][0]
        k, n = 0, min(len(ids), len(acc))
        while k < n and ids[k] == acc[k]:
            k += 1
        if not 1 <= k < len(ids) or not bool(mask[k]):
            raise InputError(f"dataset {dataset.name!r}, example {i}: the rejected answer equals the accepted one "
                             f"within max_len={max_len} tokens; give a different meta['reject'] or drop it.")
        out[i] = (k, int(ids[k]))
    return out


def _pad(rows) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad (ids, labels) rows into (ids, attention mask, labels)."""
    ids, att = right_pad([t for t, _ in rows])
    return ids, att, right_pad([lb for _, lb in rows], -100)[0]


def _batches(encoded, cfg: FinetuneConfig, step: int, rejected=None):
    """The micro-batches of optimizer step ``step``: (ids, attention mask, labels, rejected) each, right-padded;
    ``rejected`` is an int64 [n, 3] tensor of (row, branching position, branching token) for the micro-batch's
    examples with a rejected answer, or None."""
    n, b = len(encoded), cfg.batch_size
    perms: dict[int, list[int]] = {}
    out = []
    for k in range(step * cfg.grad_accum, (step + 1) * cfg.grad_accum):
        idx = []
        for pos in range(k * b, (k + 1) * b):
            epoch, at = divmod(pos, n)
            if epoch not in perms:
                perms[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed + epoch)).tolist()
            idx.append(perms[epoch][at])
        rej = [(row, *rejected[i]) for row, i in enumerate(idx) if rejected[i] is not None] \
            if rejected is not None else []
        out.append((*_pad([encoded[i] for i in idx]), torch.tensor(rej, dtype=torch.long) if rej else None))
    return out


def _step_loss(model, batches, bf16: bool, unlikelihood: float = 0.0) -> tuple[float, int, float, int]:
    """Forward and backward over one optimizer step's micro-batches.

    Returns (the mean cross-entropy over all scored tokens, their count, the mean unlikelihood loss over the
    rejected tokens, their count); the gradient is that of ``(sum of cross-entropies + unlikelihood * sum of
    unlikelihoods) / scored tokens``: a rejected token weighs as much as ``unlikelihood`` scored tokens. The
    unlikelihood of a branching token is read from the same forward as the accepted answer (see
    :func:`_rejected`).
    """
    n_tok = sum(int((b[2][:, 1:] != -100).sum()) for b in batches)
    n_rej = sum(len(b[3]) for b in batches if b[3] is not None) if unlikelihood else 0
    total = ul_total = 0.0
    for ids, att, lab, rej in batches:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(input_ids=ids, attention_mask=att).logits
        loss = nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), lab[:, 1:].flatten(),
                                           ignore_index=-100, reduction="sum") / max(n_tok, 1)
        total += float(loss.detach())
        if rej is not None and n_rej:
            row, pos, token = rej.unbind(-1)
            logp = torch.log_softmax(logits[row, pos - 1].float(), -1).gather(-1, token[:, None])[:, 0]
            # -log(1 - p), computed as -log(-expm1(log p)) so it stays finite as p -> 1
            ul = -torch.log(-torch.expm1(logp.clamp(max=-1e-6))).sum()
            loss = loss + unlikelihood * ul / max(n_tok, 1)  # each rejected token weighs `unlikelihood` scored tokens
            ul_total += float(ul.detach()) / n_rej
        loss.backward()
    return total, n_tok, ul_total, n_rej


def _diverged(history: list[float], factor: float) -> str | None:
    """Why the run diverged (None if it did not): a non-finite last loss, or the last window's mean loss above
    ``factor`` times the first step's (the untouched model's loss on its batch)."""
    last = history[-1]
    if not math.isfinite(last):
        return f"the loss is {last}"
    w = _DIVERGE_WINDOW
    if factor and len(history) > w:
        start, now = history[0], sum(history[-w:]) / w
        if now > factor * start:
            return f"the mean loss of the last {w} steps ({now:.3g}) is above {factor:g} x the first step's ({start:.3g})"
    return None


def _logged_step(line: str) -> int | None:
    """The step of a metrics line, None for a blank or torn one (a run killed mid-write)."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def finetune(model_or_path, data, out_dir: str | os.PathLike, cfg: FinetuneConfig | None = None, *,
             resume: bool = False, progress: bool = True) -> FinetuneResult:
    """Fine-tune a causal LM on labelled text or chat examples, training on the scored tokens (or all, see
    ``cfg.loss_on``).

    Args:
        model_or_path: a model name or folder (opened with :func:`mechscope.load`) or a HookedModel (copied;
            the caller's model is left as it was). Trained in float32.
        data: a labelled-data ``.jsonl`` path or a :class:`~mechscope.data.labelled.LabelledDataset`. The loss
            covers each example's scored tokens (the last message of a chat, i.e. the assistant answer, or its
            ``score_span``); ``label`` is ignored. A chat's ``meta["reject"]`` (a rejected answer to its prompt) is
            read when ``cfg.unlikelihood`` > 0.
        out_dir: the run folder (layout in the module docstring).
        cfg: the settings (default :class:`FinetuneConfig`()).
        resume: continue from the latest checkpoint of ``out_dir``; the settings must match the earlier run
            except ``n_steps``, ``n_epochs`` and ``checkpoint_every``.
        progress: show a tqdm progress bar.

    Returns:
        FinetuneResult; the losses are mean cross-entropy in nats per scored token.

    Raises:
        FinetuneDiverged: (an InputError) the loss became non-finite or grew past ``cfg.diverge_factor`` times its
            start; nothing after the latest checkpoint is written.
        InputError: an out_dir that is a file; an out_dir holding a run without resume, or resume without a
            checkpoint; a resume with other settings, data or base model; data that is empty or has no scored
            token after the first of an example; LoRA target modules the model lacks; unlikelihood > 0 with no
            rejected answer in the data, or a bad one (see ``meta["reject"]``); settings as
            :class:`FinetuneConfig` raises.
    """
    from tqdm.auto import tqdm

    cfg = cfg or FinetuneConfig()
    out_dir = Path(out_dir).expanduser()
    ckpt = _check_out_dir(out_dir, resume)
    dataset = _load_data(data)
    hf, tok, base_name = _load_model(model_or_path)
    encoded = _encode(tok, dataset, cfg.max_len, cfg.loss_on)
    rejected = _rejected(tok, dataset, encoded, cfg.max_len) if cfg.unlikelihood else None
    if rejected is not None and not any(r is not None for r in rejected):
        raise InputError(f"unlikelihood is {cfg.unlikelihood:g} but no example of {dataset.name!r} has a rejected "
                         "answer (meta['reject']); add them, or set unlikelihood to 0.")
    run_info = {"config": cfg.to_dict(), "data_fingerprint": dataset.fingerprint(), "base_model": base_name}

    torch.manual_seed(cfg.seed)
    model = _wrap(hf, cfg)
    model.train()
    opt = torch.optim.AdamW(list(_trainable(model).values()), lr=cfg.lr, weight_decay=cfg.weight_decay)
    start = 0
    if ckpt is not None:
        prev = json.loads((ckpt / "state.json").read_text(encoding="utf-8"))
        now, defaults = cfg.to_dict(), FinetuneConfig().to_dict()  # a setting added later reads as its default
        changed = sorted(k for k in now if now[k] != prev["config"].get(k, defaults[k]))
        if set(changed) - _RESUMABLE_CHANGES or prev["data_fingerprint"] != run_info["data_fingerprint"] \
                or prev["base_model"] != base_name:
            what = [k for k in changed if k not in _RESUMABLE_CHANGES]
            what += ["the data"] * (prev["data_fingerprint"] != run_info["data_fingerprint"])
            what += ["the base model"] * (prev["base_model"] != base_name)
            raise InputError(f"cannot resume {out_dir}: {', '.join(what)} differ from the checkpointed run; resume "
                             "with the same settings, data and model (only n_steps, n_epochs and checkpoint_every "
                             "may change), or start a new out_dir.")
        start = _load_checkpoint(ckpt, model, opt)["step"]
    total = cfg.total_steps(len(dataset))

    metrics_path = out_dir / "metrics.jsonl"
    out_dir.mkdir(parents=True, exist_ok=True)
    kept = []
    if start and metrics_path.is_file():
        kept = [ln for ln in metrics_path.read_text(encoding="utf-8").splitlines(keepends=True)
                if _logged_step(ln) is not None and _logged_step(ln) <= start]
    metrics_path.write_text("".join(kept), encoding="utf-8")
    history = [float("nan") if json.loads(ln)["loss"] is None else json.loads(ln)["loss"] for ln in kept]

    losses: list[float] = []
    bar = tqdm(total=total, initial=min(start, total), unit="step", desc=f"finetune ({cfg.method})",
               disable=not progress, dynamic_ncols=True)
    with open(metrics_path, "a", encoding="utf-8") as log:
        for step in range(start, total):
            t0 = time.perf_counter()
            lr = cfg.lr_at(step, total)
            for group in opt.param_groups:
                group["lr"] = lr
            opt.zero_grad(set_to_none=True)
            loss, n_tok, ul, n_rej = _step_loss(model, _batches(encoded, cfg, step, rejected), cfg.bf16,
                                                cfg.unlikelihood)
            history.append(loss)
            line = {"step": step + 1, "loss": loss if math.isfinite(loss) else None, "lr": lr, "tokens": n_tok}
            if cfg.unlikelihood:
                line.update(unlikelihood=ul if math.isfinite(ul) else None, rejected_tokens=n_rej)
            line["seconds"] = round(time.perf_counter() - t0, 6)
            log.write(json.dumps(line) + "\n")
            log.flush()
            why = _diverged(history, cfg.diverge_factor)
            if why is not None:
                bar.close()
                last = (_checkpoints(out_dir) or [None])[-1]
                raise FinetuneDiverged(
                    f"the fine-tune diverged at step {step + 1}: {why}. Lower lr (it is {cfg.lr:g}), add warmup_steps "
                    f"or a cosine schedule, or check the data. The weights of this step were not kept; "
                    + (f"the latest checkpoint is {last}." if last else "no checkpoint was written."),
                    step + 1, loss, last)
            opt.step()
            losses.append(loss)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
            done = step + 1
            if done == total or (cfg.checkpoint_every and done % cfg.checkpoint_every == 0):
                _save_checkpoint(out_dir / "checkpoints" / f"step-{done}", model, opt, done, run_info)
    bar.close()
    n_done = max(start, total)
    trainable = tuple(_trainable(model))
    n_trainable = sum(p.numel() for p in _trainable(model).values())
    _write_outputs(out_dir, model, tok, cfg)
    final = losses[-1] if losses else None
    write_json_atomic({**run_info, "n_steps": n_done, "n_examples": len(dataset),
                       "final_loss": final if final is None or math.isfinite(final) else None,
                       "trainable_parameters": n_trainable},
                      out_dir / "finetune.json")
    return FinetuneResult(out_dir, out_dir / "model", n_done, tuple(losses), final, trainable)


def _write_outputs(out_dir: Path, model, tok, cfg: FinetuneConfig) -> None:
    model.eval()
    if cfg.method == "lora":
        write_folder_atomic(out_dir / "adapter", lambda tmp: model.save_pretrained(tmp))
        model = model.merge_and_unload()
    for p in model.parameters():
        p.requires_grad_(False)

    def write(tmp: Path):
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    write_folder_atomic(out_dir / "model", write)


__all__ = ["FinetuneDiverged", "FinetuneResult", "default_targets", "finetune"]
