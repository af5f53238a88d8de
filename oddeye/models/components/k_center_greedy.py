"""k-center greedy coreset selection (Sener & Savarese, 2018), as PatchCore subsamples its memory bank.

Scales to millions of rows: the features are first reduced with a sparse random
projection (written chunk by chunk into one [N, d] matrix on the chosen device), and
centres are chosen in rounds: the greedy rule runs inside a small pool of the farthest rows,
then one matrix product updates every row's distance to the round's centres. Memory is
O(N·d) — never an N × N matrix — and the device is read once per round, not per centre.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from oddeye.models.components.random_projection import SparseRandomProjection, johnson_lindenstrauss_min_dim
from oddeye.progress import progress_bar

__all__ = ["KCenterGreedy"]

log = logging.getLogger(__name__)

# Rows moved to the device and projected at once.
_PROJECT_ROWS = 1 << 15
# Rows whose distances to a round's new centres are computed at once (bounds the [rows, b] block).
_UPDATE_ROWS = 1 << 16
# A round's candidate pool holds this many rows per centre it may pick.
_POOL_FACTOR = 4


class KCenterGreedy:
    """Picks ``int(N * sampling_ratio)`` rows of ``embedding`` that cover it with the smallest radius.

    ``embedding`` is a tensor [N, D] or a sequence of row chunks [n_i, D] (kept where
    they are, e.g. on the CPU, and read twice: to project and to gather the coreset).
    Distances are measured after a sparse random projection with Johnson-Lindenstrauss
    ``eps`` (0.9 as in anomalib; skipped when it would not reduce the dimension).
    """

    def __init__(
        self,
        embedding: torch.Tensor | Sequence[torch.Tensor],
        sampling_ratio: float,
        eps: float = 0.9,
        seed: int | None = 0,
        device: torch.device | str | None = None,
        progress: bool = False,
        batch_size: int = 256,
        tolerance: float = 0.0,
    ) -> None:
        self.chunks = [embedding] if isinstance(embedding, torch.Tensor) else list(embedding)
        if not self.chunks or any(c.ndim != 2 for c in self.chunks):
            raise ValueError("embedding must be a tensor [N, D] or a non-empty sequence of [n, D] chunks")
        if len({c.shape[1] for c in self.chunks}) != 1:
            raise ValueError(f"embedding chunks differ in width: {sorted({c.shape[1] for c in self.chunks})}")
        if not 0 < sampling_ratio <= 1:
            raise ValueError(f"sampling_ratio must be in (0, 1], got {sampling_ratio}")
        self.n_samples = sum(c.shape[0] for c in self.chunks)
        if self.n_samples == 0:
            raise ValueError("embedding has no rows")
        self.n_features = self.chunks[0].shape[1]
        self.sampling_ratio = float(sampling_ratio)
        self.coreset_size = max(1, int(self.n_samples * self.sampling_ratio))
        self.eps = eps
        self.seed = seed
        self.device = torch.device(device) if device is not None else self.chunks[0].device
        self.progress = progress
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if not 0 <= tolerance < 1:
            raise ValueError(f"tolerance must be in [0, 1), got {tolerance}")
        self.batch_size = int(batch_size)
        self.tolerance = float(tolerance)
        self.features: torch.Tensor | None = None  # the projected rows, built on first use

    def _project(self) -> torch.Tensor:
        if self.features is not None:
            return self.features
        target = johnson_lindenstrauss_min_dim(self.n_samples, self.eps)
        projection = None
        if target < self.n_features:
            projection = SparseRandomProjection(eps=self.eps, random_state=self.seed)
            projection.fit_shape(self.n_samples, self.n_features, device=self.device)
        width = target if projection is not None else self.n_features
        features = torch.empty(self.n_samples, width, dtype=torch.float32, device=self.device)
        row = 0
        for chunk in self.chunks:
            for start in range(0, chunk.shape[0], _PROJECT_ROWS):
                part = chunk[start : start + _PROJECT_ROWS].to(device=self.device, dtype=torch.float32)
                features[row : row + part.shape[0]] = projection.transform(part) if projection is not None else part
                row += part.shape[0]
        log.debug("k-center greedy: %d rows projected from %d to %d dimensions", self.n_samples, self.n_features, width)
        self.features = features
        return features

    @torch.no_grad()
    def select_coreset_idxs(self, selected_idxs: Sequence[int] | None = None) -> torch.Tensor:
        """Indices [coreset_size] of the chosen rows, in the order chosen (after ``selected_idxs``, if given).

        Centres are chosen in rounds. Each round takes the ``pool`` rows farthest from the
        centres so far, runs the greedy rule inside that pool (its own small distance
        matrix), and then updates every row's distance to the round's new centres with one
        matrix product — a compute-bound [N, d] × [d, b] instead of ``b`` memory-bound
        matrix-vector products. A round stops as soon as the best pool row is nearer to the
        centres than the farthest row left outside the pool: with ``tolerance`` 0 every pick
        is the one the one-at-a-time rule would make (up to float rounding). A ``tolerance``
        t accepts pool rows down to (1 - t) times that distance: longer rounds, and each pick
        is still at least (1 - t) times as far as the farthest row, which keeps the covering
        radius within a factor 2 / (1 - t) of the optimum (exact greedy's bound is 2).
        """
        features = self._project()
        n = self.n_samples
        sq_norms = features.pow(2).sum(dim=1)
        min_distances = torch.full((n,), float("inf"), device=self.device)
        selected = torch.empty(self.coreset_size, dtype=torch.long, device=self.device)
        generator = torch.Generator()
        generator.manual_seed(self.seed if self.seed is not None else torch.seed())

        def update(idx: torch.Tensor) -> None:
            """Lower each row's squared distance to its nearest centre by the new centres ``idx`` [b]."""
            for start in range(0, n, _UPDATE_ROWS):
                rows = features[start : start + _UPDATE_ROWS]
                d = torch.addmm(sq_norms[start : start + _UPDATE_ROWS, None], rows, features[idx].T, alpha=-2)
                d.add_(sq_norms[idx].unsqueeze(0))
                torch.minimum(
                    min_distances[start : start + _UPDATE_ROWS],
                    d.amin(dim=1),
                    out=min_distances[start : start + _UPDATE_ROWS],
                )
            min_distances.index_fill_(0, idx, 0.0)

        already = torch.as_tensor(list(selected_idxs or []), dtype=torch.long, device=self.device)
        count = 0
        if already.numel():
            update(already)
        else:
            first = torch.randint(n, (1,), generator=generator).to(self.device)
            selected[0] = first[0]
            update(first)
            count = 1
        bar = progress_bar(total=self.coreset_size, desc="coreset", unit="pt", disable=not self.progress)
        bar.update(count)
        while count < self.coreset_size:
            picks = self._round(features, sq_norms, min_distances, self.coreset_size - count)
            selected[count : count + picks.numel()] = picks
            update(picks)
            count += picks.numel()
            bar.update(picks.numel())
        bar.close()
        return selected

    def _round(
        self, features: torch.Tensor, sq_norms: torch.Tensor, min_distances: torch.Tensor, remaining: int
    ) -> torch.Tensor:
        """One round's centres [b] (1 <= b <= min(batch_size, remaining)), chosen by the greedy rule in a pool."""
        n = self.n_samples
        size = min(n, max(self.batch_size * _POOL_FACTOR, 1))
        values, pool = min_distances.topk(size)
        # Every row outside the pool is at most this far from its centre (rows only get closer).
        # Squared distances: accept a pool row down to (1 - tolerance)^2 of the outside bound.
        outside = float(values[-1]) * (1 - self.tolerance) ** 2 if size < n else float("-inf")
        pool_feats = features[pool]
        within = torch.addmm(sq_norms[pool, None], pool_feats, pool_feats.T, alpha=-2).add_(sq_norms[pool][None])
        within = within.cpu()
        closest = values.cpu().clone()
        picks: list[int] = []
        for _ in range(min(self.batch_size, remaining)):
            best = int(closest.argmax())
            if closest[best] <= 0 or (picks and float(closest[best]) < outside):
                break  # no row left uncovered, or a row outside the pool may be farther: next round
            picks.append(best)
            torch.minimum(closest, within[best], out=closest)
            closest[best] = 0.0
        if not picks:  # every row sits on a centre already (duplicates): take the farthest anyway
            picks.append(int(closest.argmax()))
        return pool[torch.tensor(picks, device=pool.device)]

    def sample_coreset(self, selected_idxs: Sequence[int] | None = None) -> torch.Tensor:
        """The chosen rows [coreset_size, D] of the original (unprojected) embedding, on ``device``."""
        idxs = self.select_coreset_idxs(selected_idxs).cpu()
        out = torch.empty(self.coreset_size, self.n_features, dtype=self.chunks[0].dtype, device=self.device)
        offset = 0
        for chunk in self.chunks:
            inside = (idxs >= offset) & (idxs < offset + chunk.shape[0])
            if inside.any():
                rows = (idxs[inside] - offset).to(chunk.device)
                out[inside.nonzero().squeeze(1).to(self.device)] = chunk.index_select(0, rows).to(self.device)
            offset += chunk.shape[0]
        return out
