"""Every built-in circuit task on the default real model (SmolLM2-135M-Instruct, fp32).

Claims tested: each built-in gives clean and corrupted prompts of one token length, answers that differ
from the wrong tokens, and corrupted prompts that differ from the clean ones; SmolLM2 solves each task
(clean accuracy) and the corruption takes the behaviour away (the mean metric falls, clean above
corrupted). Run with ``-s`` to see the numbers.

Measured here when written (seed 0, the n below): ioi 32 prompts, 30/32 (93.8%), logit difference
+3.85 clean vs -4.04 corrupted; induction (seq_len 12) 24, 24/24, +12.2 vs -1.3; greater_than 32,
32/32, probability mass +0.63 vs -0.64; factual_recall 77 (every fact that has a partner, once), 77/77,
+10.4 vs -10.6; docstring 32, 30/32 (93.8%), +3.71 vs -4.14. ~20 s with the model loaded.
"""

from __future__ import annotations

import pytest
import torch

from mechscope.data import check_task, induction_task, load_task

pytestmark = pytest.mark.real

#: task -> (n, lowest clean accuracy accepted)
EXPECTED = {"ioi": (32, 0.9), "induction": (24, 0.95), "greater_than": (32, 0.9), "factual_recall": (None, 0.95),
            "docstring": (32, 0.85)}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_builtin_task_is_well_formed_and_solved(real_model, name):
    n, floor = EXPECTED[name]
    # induction through its builder, for a shorter sequence (24 tokens) than the default
    task = induction_task(real_model, n, seq_len=12) if name == "induction" else load_task(name, real_model, n=n)
    assert task.name == name and task.clean_tokens.shape == task.corrupt_tokens.shape
    assert task.clean_tokens.dtype == torch.int64 and (n is None or len(task) == n)
    assert (task.answer != task.wrong).all()
    assert (task.clean_tokens != task.corrupt_tokens).any(1).all()
    if task.clean_text:
        lengths = {real_model.to_tokens(t).shape[1] for t in task.clean_text + task.corrupt_text}
        assert lengths == {task.clean_tokens.shape[1]}
    check = check_task(real_model, task)
    print(f"\n{check}")
    assert check.accuracy >= floor, str(check)
    assert check.clean_mean > check.corrupt_mean and check.corrupt_accuracy < 0.5, str(check)
    check.require(min_accuracy=floor, warn_below=floor)


def test_ioi_positions_point_at_the_names(real_model):
    task = load_task("ioi", real_model, n=8)
    rows = torch.arange(8)
    assert torch.equal(task.clean_tokens[rows, task.positions["IO"]], task.answer)
    assert torch.equal(task.clean_tokens[rows, task.positions["S1"]], task.wrong)
    assert torch.equal(task.clean_tokens[rows, task.positions["S2"]], task.wrong)
    assert torch.equal(task.corrupt_tokens[rows, task.positions["S2"]], task.answer)


def test_factual_recall_swaps_only_the_subject(real_model):
    task = load_task("factual_recall", real_model, n=20, seed=1)
    for i in range(20):
        differs = (task.clean_tokens[i] != task.corrupt_tokens[i]).nonzero()[:, 0]
        assert int(differs.max()) <= int(task.positions["subject_last"][i])
    assert len(set(task.groups)) == 20
