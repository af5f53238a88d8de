"""Rows of a batch grouped by the per-camera head that scores them, for batched head passes.

A batch mixing cameras is scored by several heads of one model. Padding each head's rows to
the largest group gives [K, width, ...] tensors, so that one batched matmul over the heads
reads each head's state once for all its rows (``mahalanobis_heads``, DFM's PCA); ``rows(k)``
serves heads that score their own rows one head at a time.
"""

from __future__ import annotations

import torch

__all__ = ["HeadGroups"]


class HeadGroups:
    """Row ``i`` of a batch belongs to head ``index[i]`` (of ``heads``); ``slot[i]`` is its place in that
    head's group, and ``width`` the largest group."""

    def __init__(self, index: torch.Tensor, heads: int) -> None:
        counts = torch.bincount(index, minlength=heads)
        order = torch.argsort(index, stable=True)
        self.index = index
        self.heads = heads
        self.width = int(counts.max())
        starts = counts.cumsum(0) - counts
        self.slot = torch.empty_like(index)
        self.slot[order] = torch.arange(len(index), device=index.device) - starts[index[order]]
        self._order = order
        self._bounds = list(zip(starts.tolist(), (starts + counts).tolist(), strict=True))

    def rows(self, k: int) -> torch.Tensor:
        """Batch positions [n_k] of head ``k``'s rows, in batch order (empty when it has none)."""
        start, stop = self._bounds[k]
        return self._order[start:stop]

    def pad(self, rows: torch.Tensor) -> torch.Tensor:
        """[B, ...] → [K, width, ...]: each head's rows, zeros after them."""
        out = rows.new_zeros(self.heads, self.width, *rows.shape[1:])
        out[self.index, self.slot] = rows
        return out

    def unpad(self, grouped: torch.Tensor) -> torch.Tensor:
        """[K, width, ...] → [B, ...]: each row's result back in batch order."""
        return grouped[self.index, self.slot]
