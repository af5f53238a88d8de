"""k-means clustering in torch: k-means++ seeding, Lloyd iterations, chunked assignments."""

from __future__ import annotations

import logging

import torch

from oddeye.models.components.buffers import DynamicBufferMixin
from oddeye.models.components.nearest_neighbors import DEFAULT_CHUNK_SIZE, knn

__all__ = ["KMeans"]

log = logging.getLogger(__name__)


class KMeans(DynamicBufferMixin):
    """k-means with ``n_clusters`` centres (buffer ``cluster_centers`` [K, D]).

    Seeding is k-means++ from a seeded generator, so a fit is reproducible; iterations
    stop after ``max_iter`` or when no centre moves more than ``tol`` (relative to the
    data's spread). An empty cluster keeps its previous centre.
    """

    cluster_centers: torch.Tensor

    def __init__(
        self,
        n_clusters: int,
        max_iter: int = 10,
        tol: float = 1e-4,
        seed: int = 0,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        super().__init__()
        if n_clusters <= 0:
            raise ValueError(f"n_clusters must be positive, got {n_clusters}")
        if max_iter < 1:
            raise ValueError(f"max_iter must be at least 1, got {max_iter}")
        self.n_clusters = int(n_clusters)
        self.max_iter = int(max_iter)
        self.tol = float(tol)
        self.seed = seed
        self.chunk_size = int(chunk_size)
        self.register_buffer("cluster_centers", torch.empty(0))

    @property
    def fitted(self) -> bool:
        return self.cluster_centers.numel() > 0

    @torch.no_grad()
    def fit(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cluster ``inputs`` [N, D]; returns labels [N] and the centres [K, D]."""
        if inputs.ndim != 2:
            raise ValueError(f"expected inputs [N, D], got {tuple(inputs.shape)}")
        n = inputs.shape[0]
        if n < self.n_clusters:
            raise ValueError(f"k-means with {self.n_clusters} clusters needs at least as many points, got {n}")
        x = inputs.detach().float()
        centers = self._plus_plus(x)
        threshold = self.tol * float(x.var(dim=0).mean())
        labels = self._assign(x, centers)
        for iteration in range(self.max_iter):
            sums = torch.zeros_like(centers).index_add_(0, labels, x)
            counts = torch.bincount(labels, minlength=self.n_clusters).to(x.dtype)
            new = torch.where(counts.unsqueeze(1) > 0, sums / counts.clamp_min(1).unsqueeze(1), centers)
            shift = float((new - centers).pow(2).sum(dim=1).max())
            centers = new
            labels = self._assign(x, centers)
            if shift <= threshold:
                log.debug("k-means converged after %d iterations", iteration + 1)
                break
        self.cluster_centers = centers.to(self.cluster_centers.device)
        return labels, self.cluster_centers

    @torch.no_grad()
    def predict(self, inputs: torch.Tensor) -> torch.Tensor:
        """Index [N] of the nearest centre for each row of ``inputs`` [N, D]."""
        if not self.fitted:
            raise RuntimeError("KMeans is not fitted")
        return self._assign(inputs.float(), self.cluster_centers.to(inputs.device))

    def _assign(self, x: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
        return knn(x, centers, k=1, chunk_size=self.chunk_size, squared=True)[1].squeeze(1)

    def _plus_plus(self, x: torch.Tensor) -> torch.Tensor:
        """k-means++: each next centre drawn with probability proportional to its squared distance."""
        generator = torch.Generator(device=x.device).manual_seed(self.seed)
        sq_norms = x.pow(2).sum(dim=1)
        chosen = torch.empty(self.n_clusters, dtype=torch.long, device=x.device)
        idx = torch.randint(x.shape[0], (1,), generator=generator, device=x.device)
        closest = torch.full_like(sq_norms, float("inf"))
        for i in range(self.n_clusters):
            chosen[i] = idx[0]
            distance = torch.addmv(sq_norms, x, x.index_select(0, idx).squeeze(0), alpha=-2) + sq_norms[idx]
            torch.minimum(closest, distance.clamp_min_(0), out=closest)
            # The tiny floor keeps the draw defined when every point coincides with a centre.
            idx = torch.multinomial(closest + 1e-30, 1, generator=generator)
        return x[chosen].clone()
