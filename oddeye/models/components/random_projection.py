"""Sparse random projection (Achlioptas / Li et al.), sized by the Johnson-Lindenstrauss lemma.

Pairwise distances of ``n_samples`` points survive, within a factor ``1 ± eps``, a
projection to ``4 ln(n) / (eps²/2 - eps³/3)`` dimensions. Each entry of the projection
matrix is ``±sqrt(1/density)/sqrt(n_components)`` with probability ``density/2`` each,
else 0, with ``density = 1/sqrt(n_features)``.
"""

from __future__ import annotations

import logging
import math

import torch

from oddeye.models.components.buffers import DynamicBufferMixin

__all__ = ["SparseRandomProjection", "johnson_lindenstrauss_min_dim"]

log = logging.getLogger(__name__)

# Rows projected at once by ``transform``'s chunked loop.
_ROWS_PER_CHUNK = 1 << 16


def johnson_lindenstrauss_min_dim(n_samples: int, eps: float = 0.1) -> int:
    """Dimensions that keep pairwise distances of ``n_samples`` points within ``1 ± eps``."""
    if not 0 < eps < 1:
        raise ValueError(f"eps must be in (0, 1), got {eps}")
    if n_samples < 1:
        raise ValueError(f"n_samples must be positive, got {n_samples}")
    return int(4 * math.log(n_samples) / (eps**2 / 2 - eps**3 / 3))


class SparseRandomProjection(DynamicBufferMixin):
    """Projects [N, n_features] → [N, n_components]; the matrix is a buffer, so a checkpoint reproduces it.

    ``n_components`` defaults to the Johnson-Lindenstrauss dimension for the fitted
    number of samples and ``eps``, capped at ``n_features`` (more would not reduce anything).
    """

    components: torch.Tensor

    def __init__(self, eps: float = 0.1, random_state: int | None = None, n_components: int | None = None) -> None:
        super().__init__()
        if not 0 < eps < 1:
            raise ValueError(f"eps must be in (0, 1), got {eps}")
        self.eps = float(eps)
        self.random_state = random_state
        self.n_components = n_components
        self.register_buffer("components", torch.empty(0))  # [n_components, n_features]

    @property
    def fitted(self) -> bool:
        return self.components.numel() > 0

    @torch.no_grad()
    def fit(self, embedding: torch.Tensor) -> SparseRandomProjection:
        """Draw the matrix for data shaped like ``embedding`` [N, n_features] (only its shape is used)."""
        if embedding.ndim != 2 or embedding.shape[0] == 0:
            raise ValueError(f"expected a non-empty embedding [N, n_features], got {tuple(embedding.shape)}")
        return self.fit_shape(embedding.shape[0], embedding.shape[1], device=embedding.device)

    @torch.no_grad()
    def fit_shape(
        self, n_samples: int, n_features: int, device: torch.device | str | None = None
    ) -> SparseRandomProjection:
        """Draw the matrix for ``n_samples`` points of ``n_features`` dimensions."""
        n_components = self.n_components or johnson_lindenstrauss_min_dim(n_samples, self.eps)
        if n_components > n_features:
            log.debug("random projection: %d dimensions > %d features; keeping all", n_components, n_features)
            n_components = n_features
        generator = torch.Generator()
        generator.manual_seed(self.random_state if self.random_state is not None else torch.seed())
        density = 1.0 / math.sqrt(n_features)
        draw = torch.rand(n_components, n_features, generator=generator)
        sign = torch.where(draw < density / 2, -1.0, 1.0)
        value = math.sqrt(1.0 / density) / math.sqrt(n_components)
        matrix = torch.where(draw < density, sign * value, torch.zeros(()))
        self.components = matrix.to(device=device if device is not None else self.components.device)
        return self

    def transform(self, embedding: torch.Tensor) -> torch.Tensor:
        """Project ``embedding`` [N, n_features] to [N, n_components], a row chunk at a time."""
        if not self.fitted:
            raise RuntimeError("SparseRandomProjection is not fitted")
        if embedding.ndim != 2 or embedding.shape[1] != self.components.shape[1]:
            raise ValueError(f"expected an embedding [N, {self.components.shape[1]}], got {tuple(embedding.shape)}")
        matrix = self.components.to(device=embedding.device, dtype=embedding.dtype)
        if embedding.shape[0] <= _ROWS_PER_CHUNK:
            return embedding @ matrix.T
        out = embedding.new_empty(embedding.shape[0], matrix.shape[0])
        for start in range(0, embedding.shape[0], _ROWS_PER_CHUNK):
            torch.mm(embedding[start : start + _ROWS_PER_CHUNK], matrix.T, out=out[start : start + _ROWS_PER_CHUNK])
        return out

    def fit_transform(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.fit(embedding).transform(embedding)

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.transform(embedding)
