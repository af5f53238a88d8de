"""HeadGroups: a mixed batch's rows grouped by head, padded and back, or one head's rows."""

from __future__ import annotations

import torch

from oddeye.models.components import HeadGroups


def test_pad_unpad_and_rows_group_a_mixed_batch_by_head() -> None:
    index = torch.tensor([2, 0, 2, 2, 0])
    groups = HeadGroups(index, heads=4)  # head 1 and head 3 have no rows
    rows = torch.arange(5.0).view(5, 1) * 10
    padded = groups.pad(rows)
    assert padded.shape == (4, 3, 1) and groups.width == 3
    assert padded[2, :, 0].tolist() == [0.0, 20.0, 30.0] and padded[0, :2, 0].tolist() == [10.0, 40.0]
    assert torch.equal(groups.unpad(padded), rows)
    assert [groups.rows(k).tolist() for k in range(4)] == [[1, 4], [], [0, 2, 3], []]
