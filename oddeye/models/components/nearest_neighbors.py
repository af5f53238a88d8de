"""Exact k-nearest-neighbour search in a memory bank, chunked so memory stays bounded.

Distances are computed block by block with one matrix product each
(``|q|² + |b|² - 2 q·b``, after centring on the bank's mean), so the largest temporary
is a ``chunk_size``-element distance block whatever the sizes of the queries and the
bank; the distances of the neighbours found are then recomputed exactly. Runs on whatever device the tensors are on.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from oddeye.models.components.buffers import DynamicBufferMixin

__all__ = ["DEFAULT_CHUNK_SIZE", "MemoryBank", "knn", "knn_heads", "squared_distances"]

# Elements of one query × bank distance block: 2^24 floats are 64 MiB.
DEFAULT_CHUNK_SIZE = 1 << 24
# Fewest queries per block when the bank alone exceeds the chunk (keeps matmuls efficient).
_MIN_QUERY_BLOCK = 128


def squared_distances(
    x: torch.Tensor, y: torch.Tensor, x_sq: torch.Tensor | None = None, y_sq: torch.Tensor | None = None
) -> torch.Tensor:
    """Squared Euclidean distances [N, M] between rows of ``x`` [N, D] and ``y`` [M, D] (clamped at 0).

    ``x_sq``/``y_sq`` are the rows' squared norms when the caller already has them.
    """
    if x_sq is None:
        x_sq = x.pow(2).sum(dim=1)
    if y_sq is None:
        y_sq = y.pow(2).sum(dim=1)
    d2 = torch.addmm(y_sq.unsqueeze(0), x, y.T, beta=1, alpha=-2)
    return d2.add_(x_sq.unsqueeze(1)).clamp_min_(0)


def _block_sizes(n_queries: int, n_bank: int, dim: int, k: int, chunk_size: int) -> tuple[int, int]:
    """Queries and bank rows per block: the centred bank block [rows, D] and the distance block
    [queries, rows] each hold about ``chunk_size`` elements at most."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    bank_block = min(n_bank, max(k, chunk_size // max(dim, 1)))
    query_block = min(n_queries, max(_MIN_QUERY_BLOCK, chunk_size // bank_block))
    return max(query_block, 1), bank_block


@torch.no_grad()
def knn(
    queries: torch.Tensor,
    bank: torch.Tensor,
    k: int = 1,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    squared: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` nearest rows of ``bank`` [M, D] to each row of ``queries`` [Q, D].

    Returns distances [Q, k] (Euclidean, or squared with ``squared``) in increasing
    order and their indices [Q, k] into the bank. Working memory is bounded by
    ``chunk_size`` distance elements plus the [Q, k] results.

    Batched: ``queries`` [n, Q, D] and ``bank`` [n, M, D] search each batch row's own bank
    (per-camera heads) in batched matmuls, and return [n, Q, k].
    """
    batched = bank.ndim == 3
    if batched:
        if queries.ndim != 3 or queries.shape[0] != bank.shape[0] or queries.shape[2] != bank.shape[2]:
            raise ValueError(
                f"expected queries [n, Q, D] and banks [n, M, D], got {tuple(queries.shape)} and {tuple(bank.shape)}"
            )
    elif queries.ndim != 2 or bank.ndim != 2 or queries.shape[1] != bank.shape[1]:
        raise ValueError(f"expected queries [Q, D] and bank [M, D], got {tuple(queries.shape)} and {tuple(bank.shape)}")
    else:
        queries, bank = queries.unsqueeze(0), bank.unsqueeze(0)
    n, n_queries, dim = queries.shape
    n_bank = bank.shape[1]
    if not 1 <= k <= n_bank:
        raise ValueError(f"k must be between 1 and the bank size {n_bank}, got {k}")
    queries = queries.to(device=bank.device, dtype=bank.dtype)
    out_d = torch.empty(n, n_queries, k, dtype=bank.dtype, device=bank.device)
    out_i = torch.empty(n, n_queries, k, dtype=torch.long, device=bank.device)
    if n_queries > 0 and n > 0:
        query_block, bank_block = _block_sizes(n_queries, n_bank, dim, k, max(1, chunk_size // n))
        # Distances do not change under a shift; centring on the bank's mean keeps the expanded form
        # accurate for features that share a large offset (as post-ReLU CNN features do).
        centre = bank.mean(dim=1, keepdim=True)
        whole = bank - centre if bank_block >= n_bank else None
        whole_sq = whole.pow(2).sum(dim=2) if whole is not None else None
        own = torch.arange(n, device=bank.device).view(-1, 1, 1)
        for qs in range(0, n_queries, query_block):
            q = queries[:, qs : qs + query_block]
            qc = q - centre
            best_d: torch.Tensor | None = None
            best_i: torch.Tensor | None = None
            for bs in range(0, n_bank, bank_block):
                block = whole if whole is not None else bank[:, bs : bs + bank_block] - centre
                block_sq = whole_sq if whole_sq is not None else block.pow(2).sum(dim=2)
                # |q|² is the same for every bank row: rank by |b|² - 2 q·b (one pass over the block, no
                # clamp); the winners' distances are recomputed exactly below.
                d2 = torch.baddbmm(block_sq.unsqueeze(1), qc, block.transpose(1, 2), alpha=-2)
                if k == 1:
                    d, i = d2.min(dim=2, keepdim=True)
                else:
                    d, i = d2.topk(min(k, block.shape[1]), dim=2, largest=False)
                i += bs
                if best_d is None:
                    best_d, best_i = d, i
                else:
                    d, pos = torch.cat([best_d, d], dim=2).topk(k, dim=2, largest=False)
                    best_i = torch.cat([best_i, i], dim=2).gather(2, pos)
                    best_d = d
            assert best_i is not None
            # The expanded form loses precision for nearby points: recompute the k winners exactly.
            exact = (q.unsqueeze(2) - bank[own, best_i]).pow(2).sum(dim=3)
            exact, order = exact.sort(dim=2)
            out_d[:, qs : qs + query_block] = exact
            out_i[:, qs : qs + query_block] = best_i.gather(2, order)
    if not squared:
        out_d.sqrt_()
    return (out_d, out_i) if batched else (out_d[0], out_i[0])


@torch.no_grad()
def knn_heads(
    queries: torch.Tensor,
    banks: Sequence[torch.Tensor],
    index: torch.Tensor,
    k: int = 1,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """Distances [B, Q, k] (Euclidean, increasing) from each row ``i`` of ``queries`` [B, Q, D] to its ``k``
    nearest rows of ``banks[index[i]]`` (per-camera heads' banks, of one size [M, D]).

    Rows go a block at a time to the batched ``knn``, their banks gathered (about ``chunk_size``
    elements of distances or banks): each bank row serves all Q queries of a row, so the copy is
    small beside the search.
    """
    if len({tuple(bank.shape) for bank in banks}) != 1 or queries.ndim != 3 or queries.shape[2] != banks[0].shape[1]:
        raise ValueError(f"expected queries [B, Q, D] and banks [M, D] of one shape, got {tuple(queries.shape)}")
    b, q, _ = queries.shape
    m, dim = banks[0].shape
    heads = index.tolist()
    out = torch.empty(b, q, k, dtype=banks[0].dtype, device=banks[0].device)
    rows = max(1, chunk_size // max(q * m, m * dim, 1))
    for start in range(0, b, rows):
        bank = torch.stack([banks[i] for i in heads[start : start + rows]])  # [n, M, D]: each row's bank
        out[start : start + rows] = knn(queries[start : start + rows], bank, k=k, chunk_size=chunk_size)[0]
    return out


class MemoryBank(DynamicBufferMixin):
    """A bank of feature vectors (buffer ``features`` [M, D]) searched by exact k-NN.

    The buffer starts empty and takes its shape from ``fit`` or a loaded state_dict.
    """

    features: torch.Tensor

    def __init__(self, chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        super().__init__()
        self.chunk_size = int(chunk_size)
        self.register_buffer("features", torch.empty(0))

    @property
    def fitted(self) -> bool:
        return self.features.numel() > 0

    @property
    def nbytes(self) -> int:
        return self.features.numel() * self.features.element_size()

    def __len__(self) -> int:
        return self.features.shape[0] if self.fitted else 0

    @torch.no_grad()
    def fit(self, features: torch.Tensor) -> MemoryBank:
        """Keep ``features`` [M, D] (float32, on this module's device)."""
        if features.ndim != 2 or features.shape[0] == 0:
            raise ValueError(f"expected a non-empty feature matrix [M, D], got {tuple(features.shape)}")
        self.features = features.detach().to(device=self.features.device, dtype=torch.float32).contiguous()
        return self

    def forward(self, queries: torch.Tensor, k: int = 1, squared: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Distances [Q, k] and indices [Q, k] of the ``k`` nearest bank rows to ``queries`` [Q, D]."""
        if not self.fitted:
            raise RuntimeError("MemoryBank is empty: fit it first")
        return knn(queries, self.features, k=k, chunk_size=self.chunk_size, squared=squared)
