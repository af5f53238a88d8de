"""k-center greedy coreset selection (Sener & Savarese, 2018), as PatchCore subsamples its memory bank.

Scales to millions of rows: the features are first reduced with a sparse random
projection (written chunk by chunk into one [N, d] matrix on the chosen device), and
each greedy step is one matrix-vector product against the newest centre, so memory is
O(N·d) — never an N × N matrix. The loop does not synchronise with the device.
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
        """Indices [coreset_size] of the chosen rows, in the order chosen (after ``selected_idxs``, if given)."""
        features = self._project()
        sq_norms = features.pow(2).sum(dim=1)
        min_distances = torch.full((self.n_samples,), float("inf"), device=self.device)
        selected = torch.empty(self.coreset_size, dtype=torch.long, device=self.device)
        generator = torch.Generator()
        generator.manual_seed(self.seed if self.seed is not None else torch.seed())

        def update(idx: torch.Tensor) -> None:
            centre = features.index_select(0, idx.view(1)).squeeze(0)
            distance = torch.addmv(sq_norms, features, centre, alpha=-2).add_(sq_norms.index_select(0, idx.view(1)))
            torch.minimum(min_distances, distance, out=min_distances)

        already = list(selected_idxs or [])
        for i in already:
            update(torch.tensor(int(i), device=self.device))
        if already:
            idx = min_distances.argmax()
        else:
            idx = torch.randint(self.n_samples, (), generator=generator).to(self.device)
        for i in progress_bar(range(self.coreset_size), desc="coreset", unit="pt", disable=not self.progress):
            selected[i] = idx
            update(idx)
            min_distances.index_fill_(0, idx.view(1), 0.0)
            idx = min_distances.argmax()
        return selected

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
