"""A circuit task as data: clean and corrupted prompts of equal token length, the answers, and a metric.

A :class:`Task` is what circuit discovery and evaluation run on: every clean prompt has a corrupted
counterpart of the same token length (so activations match position by position), a correct next token
and a wrong one at the scored position, and a metric that :meth:`Task.values` computes per prompt.
:func:`check_task` says whether a model solves the task before anything is built on it.

Built-in tasks are in :mod:`mechscope.data.task_builtins`; :func:`mechscope.data.tasks.load_task` reads
a task from a JSONL file or by name.
"""

from __future__ import annotations

import dataclasses
import random
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechscope.core.errors import InputError, ShapeError

#: The metrics a task can score, see :meth:`Task.values`.
TASK_METRICS = ("logit_diff", "prob", "kl", "prob_mass")


def _index_sets(sets: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor]:
    """Ragged per-prompt id sets as a padded int64 index [n, k] and a float32 mask [n, k]."""
    k = max(len(s) for s in sets)
    idx = torch.zeros(len(sets), k, dtype=torch.long)
    mask = torch.zeros(len(sets), k)
    for i, s in enumerate(sets):
        idx[i, :len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[i, :len(s)] = 1.0
    return idx, mask


@dataclass(frozen=True, eq=False)
class Task:
    """Clean and corrupted prompts of one token length, their answers and a metric.

    Attributes:
        name: "ioi", "induction", "greater_than", "factual_recall", "docstring", or a JSONL file's stem.
        clean_tokens / corrupt_tokens: int64 [n, pos], equal shapes, BOS only where the model's tokenizer
            adds one (``model.to_tokens``).
        answer: int64 [n], the correct next token at ``position`` of each clean prompt.
        wrong: int64 [n], the wrong one (typically the corrupted prompt's answer).
        metric: "logit_diff", "prob", "kl" or "prob_mass" (see :meth:`values`).
        position: the scored position, a negative index (-1: the last), so logits of only the last
            positions fit.
        clean_text / corrupt_text: the prompts as text (empty for tasks built from token ids).
        groups: per prompt, the template or scenario it came from (empty: none); :meth:`split` keeps a
            group on one side.
        answer_sets / wrong_sets: ``prob_mass`` only: per prompt, the token ids counted as correct and
            as wrong.
        positions: named token positions, e.g. IOI's "IO", "S1", "S2", "end" -> int64 [n].
    """

    name: str
    clean_tokens: Int[Tensor, "n pos"]
    corrupt_tokens: Int[Tensor, "n pos"]
    answer: Int[Tensor, " n"]
    wrong: Int[Tensor, " n"]
    metric: str = "logit_diff"
    position: int = -1
    clean_text: tuple[str, ...] = ()
    corrupt_text: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    answer_sets: tuple[tuple[int, ...], ...] | None = None
    wrong_sets: tuple[tuple[int, ...], ...] | None = None
    positions: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self):
        n, n_pos = self.clean_tokens.shape
        if n == 0:
            raise InputError(f"task {self.name!r} has no prompts; a task needs at least one.")
        if self.corrupt_tokens.shape != self.clean_tokens.shape:
            raise ShapeError(
                f"task {self.name!r}: clean tokens {tuple(self.clean_tokens.shape)} and corrupted tokens "
                f"{tuple(self.corrupt_tokens.shape)} differ in shape; every corrupted prompt must have its clean "
                "prompt's token length.")
        for what, t in (("clean_tokens", self.clean_tokens), ("corrupt_tokens", self.corrupt_tokens),
                        ("answer", self.answer), ("wrong", self.wrong)):
            if t.dtype != torch.int64:
                raise InputError(f"task {self.name!r}: {what} must be int64 token ids, got {t.dtype}.")
        for what, t in (("answer", self.answer), ("wrong", self.wrong)):
            if t.shape != (n,):
                raise ShapeError(f"task {self.name!r}: {what} must be [n] = [{n}], got {tuple(t.shape)}.")
        if self.metric not in TASK_METRICS:
            raise InputError(f"task {self.name!r}: unknown metric {self.metric!r}; use one of {TASK_METRICS}.")
        if not -n_pos <= self.position < 0:
            raise InputError(
                f"task {self.name!r}: position {self.position} must be a negative index inside the {n_pos} "
                "positions (-1 is the last), so logits of only the last positions fit.")
        for what, seq in (("clean_text", self.clean_text), ("corrupt_text", self.corrupt_text),
                          ("groups", self.groups)):
            if seq and len(seq) != n:
                raise ShapeError(f"task {self.name!r}: {what} has {len(seq)} entries for {n} prompts.")
        for key, t in self.positions.items():
            if t.shape != (n,):
                raise ShapeError(f"task {self.name!r}: positions[{key!r}] must be int64 [{n}], got {tuple(t.shape)}.")
        if self.metric == "prob_mass":
            for what, sets in (("answer_sets", self.answer_sets), ("wrong_sets", self.wrong_sets)):
                if sets is None or len(sets) != n or any(len(s) == 0 for s in sets):
                    raise InputError(
                        f"task {self.name!r}: metric 'prob_mass' needs {what}, one non-empty tuple of token ids "
                        "per prompt; give them, or use metric 'logit_diff'.")
            object.__setattr__(self, "_answer_index", _index_sets(self.answer_sets))
            object.__setattr__(self, "_wrong_index", _index_sets(self.wrong_sets))

    def __len__(self) -> int:
        return self.clean_tokens.shape[0]

    def __repr__(self) -> str:
        return (f"Task({self.name!r}, n={len(self)}, pos={self.clean_tokens.shape[1]}, metric={self.metric!r}, "
                f"position={self.position}, groups={len(set(self.groups))})")

    def _at(self, logits: Tensor, what: str = "logits") -> Tensor:
        if logits.dim() != 3 or logits.shape[0] != len(self):
            raise ShapeError(
                f"task {self.name!r} has {len(self)} prompts, so {what} must be [{len(self)}, pos, d_vocab]; got "
                f"{tuple(logits.shape)}. Score a batch of prompts with task.subset(idx).values(...).")
        if not -logits.shape[1] <= self.position:
            raise InputError(
                f"task {self.name!r} scores position {self.position}, outside {what} with {logits.shape[1]} "
                f"positions; keep at least the last {-self.position} positions (logits_to_keep={-self.position}).")
        return logits[:, self.position].float()

    def values(
        self,
        logits: Float[Tensor, "n k d_vocab"],
        clean_logits: Float[Tensor, "n k2 d_vocab"] | None = None,
    ) -> Float[Tensor, " n"]:
        """Per-prompt raw metric, differentiable, float32.

        - ``logit_diff``: logit(answer) - logit(wrong) at ``position`` (natural-log units);
        - ``prob``: p(answer) (0..1);
        - ``kl``: KL(clean || logits) of the next-token distributions at ``position`` (nats; needs
          ``clean_logits``; 0 on the clean run);
        - ``prob_mass``: sum of p over ``answer_sets`` minus sum over ``wrong_sets`` (-1..1), the
          probability difference of Hanna et al. 2023.

        Args:
            logits: [n, k, d_vocab] for the task's n prompts; only the last k positions need be present,
                as long as ``position`` lies among them.
            clean_logits: the clean run's logits in the same layout (``kl`` only).

        Returns:
            float32 [n] on the logits' device.

        Raises:
            ShapeError: logits not [n, k, d_vocab] for this task's n prompts.
            InputError: ``position`` outside the logits; ``kl`` without ``clean_logits``.

        References:
            Wang et al. 2022 (IOI), section 2 (logit difference); Hanna et al. 2023, "How does GPT-2 compute
            greater-than?", section 3 (probability difference); Conmy et al. 2023 (ACDC), section 3 (KL).
        """
        at = self._at(logits)
        device = at.device
        if self.metric == "logit_diff":
            return at.gather(1, self.answer.to(device)[:, None])[:, 0] - at.gather(1, self.wrong.to(device)[:, None])[:, 0]
        logprobs = torch.log_softmax(at, dim=-1)
        if self.metric == "prob":
            return logprobs.gather(1, self.answer.to(device)[:, None])[:, 0].exp()
        if self.metric == "kl":
            if clean_logits is None:
                raise InputError(f"task {self.name!r} uses metric 'kl', which needs clean_logits (the clean run's logits).")
            ref = torch.log_softmax(self._at(clean_logits, "clean_logits"), dim=-1)
            return (ref.exp() * (ref - logprobs)).sum(-1)
        probs = logprobs.exp()
        (a_idx, a_mask), (w_idx, w_mask) = self._answer_index, self._wrong_index
        mass = (probs.gather(1, a_idx.to(device)) * a_mask.to(device)).sum(-1)
        return mass - (probs.gather(1, w_idx.to(device)) * w_mask.to(device)).sum(-1)

    def prefers_answer(self, logits: Float[Tensor, "n k d_vocab"]) -> Tensor:
        """bool [n]: whether each prompt prefers the answer, i.e. logit(answer) > logit(wrong), or for
        ``prob_mass`` tasks more probability on ``answer_sets`` than on ``wrong_sets``."""
        if self.metric == "prob_mass":
            return self.values(logits) > 0
        at = self._at(logits)
        device = at.device
        return at.gather(1, self.answer.to(device)[:, None])[:, 0] > at.gather(1, self.wrong.to(device)[:, None])[:, 0]

    def subset(self, idx: Sequence[int] | Tensor | slice) -> Task:
        """The task restricted to the prompts ``idx`` (indices, a bool mask or a slice), in that order.

        Raises:
            InputError: an empty selection.
            IndexError: an index outside the task.
        """
        rows = torch.arange(len(self))[idx if not isinstance(idx, Sequence) else torch.as_tensor(idx, dtype=torch.long)]
        keep = rows.reshape(-1).tolist()
        if not keep:
            raise InputError(f"task {self.name!r}: the selection holds no prompts.")

        def pick(seq):
            return seq if not seq else tuple(seq[i] for i in keep)

        index = torch.tensor(keep, dtype=torch.long)
        return dataclasses.replace(
            self,
            clean_tokens=self.clean_tokens[index.to(self.clean_tokens.device)],
            corrupt_tokens=self.corrupt_tokens[index.to(self.corrupt_tokens.device)],
            answer=self.answer[index.to(self.answer.device)],
            wrong=self.wrong[index.to(self.wrong.device)],
            clean_text=pick(self.clean_text), corrupt_text=pick(self.corrupt_text), groups=pick(self.groups),
            answer_sets=pick(self.answer_sets), wrong_sets=pick(self.wrong_sets),
            positions={k: v[index.to(v.device)] for k, v in self.positions.items()},
        )

    def split(self, test_fraction: float = 0.5, seed: int = 0) -> tuple[Task, Task]:
        """(train, test): a random split, by group when the task has groups, else by prompt.

        With groups, whole groups (templates, scenarios) are shuffled and moved to the test side until it
        holds at least ``test_fraction`` of the prompts, so no group is on both sides and the test side can
        overshoot. Each side keeps the task's prompt order. Deterministic given ``seed``.

        Raises:
            InputError: test_fraction outside (0, 1); fewer than two prompts, or (with groups) fewer than
                two groups.
        """
        if not 0 < test_fraction < 1:
            raise InputError(f"test_fraction must lie in (0, 1), got {test_fraction}.")
        n = len(self)
        rng = random.Random(seed)
        target = min(max(1, round(test_fraction * n)), n - 1)
        if self.groups:
            names = list(dict.fromkeys(self.groups))
            if len(names) < 2:
                raise InputError(
                    f"task {self.name!r}: all {n} prompts are in one group ({names[0]!r}), so a split that keeps "
                    "groups apart is impossible; give the prompts several groups, or drop the groups "
                    "(dataclasses.replace(task, groups=())) to split by prompt.")
            rng.shuffle(names)
            test_groups: set[str] = set()
            size = 0
            for g in names[:-1]:  # the last group always stays on the train side
                if size >= target:
                    break
                test_groups.add(g)
                size += self.groups.count(g)
            test = [i for i in range(n) if self.groups[i] in test_groups]
        else:
            if n < 2:
                raise InputError(f"task {self.name!r} has one prompt; a split needs at least two.")
            test = sorted(rng.sample(range(n), target))
        chosen = set(test)
        return self.subset([i for i in range(n) if i not in chosen]), self.subset(test)


@dataclass(frozen=True)
class TaskCheck:
    """How a model does on a task (see :func:`check_task`).

    Attributes:
        task / metric / model: names.
        n: prompts run.
        n_correct: clean prompts that prefer the answer (:meth:`Task.prefers_answer`).
        accuracy: n_correct / n.
        corrupt_accuracy: the same share on the corrupted prompts (low when the corruption works).
        clean_mean / clean_median / corrupt_mean / corrupt_median: the raw metric (:meth:`Task.values`)
            over the clean and the corrupted prompts, in the metric's units (for ``kl`` the clean run
            scores 0 and the corrupted run its KL to the clean one). Medians average the middle two.
    """

    task: str
    metric: str
    model: str
    n: int
    n_correct: int
    accuracy: float
    corrupt_accuracy: float
    clean_mean: float
    clean_median: float
    corrupt_mean: float
    corrupt_median: float

    def __str__(self) -> str:
        return (f"{self.task} on {self.model}: {self.n_correct}/{self.n} clean prompts prefer the answer "
                f"({self.accuracy:.1%}; corrupted {self.corrupt_accuracy:.1%}); {self.metric} mean "
                f"{self.clean_mean:+.4g} clean vs {self.corrupt_mean:+.4g} corrupted (median {self.clean_median:+.4g} "
                f"vs {self.corrupt_median:+.4g})")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def require(self, min_accuracy: float = 0.5, warn_below: float = 0.9) -> TaskCheck:
        """Refuse a task the model does not solve; warn when it solves it only partly. Returns ``self``.

        Raises:
            InputError: accuracy below ``min_accuracy`` (names the counts and the fix).

        Warns:
            UserWarning: accuracy below ``warn_below``.
        """
        if self.accuracy < min_accuracy:
            raise InputError(
                f"{self.model} does not solve task {self.task!r}: only {self.n_correct} of {self.n} clean prompts "
                f"({self.accuracy:.1%}) prefer the answer over the wrong token (needed {min_accuracy:.0%}); mean "
                f"{self.metric} {self.clean_mean:+.4g} clean vs {self.corrupt_mean:+.4g} corrupted. A circuit of "
                "a behaviour the model does not have means little: use a larger model, a task it solves, or "
                "keep only the prompts it solves (task.subset).")
        if self.accuracy < warn_below:
            warnings.warn(
                f"{self.model} solves task {self.task!r} only partly: {self.n_correct} of {self.n} clean prompts "
                f"({self.accuracy:.1%}) prefer the answer (below {warn_below:.0%}); circuit results average over "
                "prompts it gets wrong.", UserWarning, stacklevel=2)
        return self


def check_task(model, task: Task, *, batch_size: int = 32) -> TaskCheck:
    """Run the model on a task's clean and corrupted prompts and say how well it solves the task.

    Args:
        model: a HookedModel.
        task: the task.
        batch_size: prompts per forward pass.

    Returns:
        TaskCheck; call ``.require()`` to refuse a task the model does not solve.

    Raises:
        InputError: batch_size < 1; token ids outside the model's vocabulary or context.
    """
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1 (prompts per forward pass), got {batch_size}.")
    keep = -task.position
    clean_vals, corrupt_vals, ok_clean, ok_corrupt = [], [], [], []
    with torch.no_grad():
        for start in range(0, len(task), batch_size):
            part = task.subset(slice(start, start + batch_size))
            clean = model.run(part.clean_tokens, logits_to_keep=keep).logits
            corrupt = model.run(part.corrupt_tokens, logits_to_keep=keep).logits
            clean_vals.append(part.values(clean, clean).cpu())
            corrupt_vals.append(part.values(corrupt, clean).cpu())
            ok_clean.append(part.prefers_answer(clean).cpu())
            ok_corrupt.append(part.prefers_answer(corrupt).cpu())
    cv, xv = torch.cat(clean_vals), torch.cat(corrupt_vals)
    n_correct = int(torch.cat(ok_clean).sum())
    return TaskCheck(
        task=task.name, metric=task.metric, model=model.cfg.name, n=len(task), n_correct=n_correct,
        accuracy=n_correct / len(task), corrupt_accuracy=float(torch.cat(ok_corrupt).float().mean()),
        clean_mean=float(cv.mean()), clean_median=float(cv.quantile(0.5)),
        corrupt_mean=float(xv.mean()), corrupt_median=float(xv.quantile(0.5)),
    )


__all__ = ["Task", "TaskCheck", "TASK_METRICS", "check_task"]
