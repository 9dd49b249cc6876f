"""mechscope.core.padding.right_pad: rows of unequal length stacked, real tokens first, the mask marking them."""

from __future__ import annotations

import torch

from mechscope.core.padding import right_pad


def test_right_pad_keeps_each_row_and_marks_the_padding():
    rows = [torch.tensor([5, 6, 7]), [8], (9, 10)]
    ids, mask = right_pad(rows, pad_id=-1)
    assert ids.dtype == mask.dtype == torch.long and ids.shape == mask.shape == (3, 3)
    assert ids.tolist() == [[5, 6, 7], [8, -1, -1], [9, 10, -1]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert right_pad([[1, 2]])[0].tolist() == [[1, 2]]
