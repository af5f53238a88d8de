"""Principal component analysis in torch, with the basis kept in buffers (checkpoints reproduce it)."""

from __future__ import annotations

import torch

from oddeye.models.components.buffers import DynamicBufferMixin

__all__ = ["PCA"]


class PCA(DynamicBufferMixin):
    """PCA with ``n_components`` given as a count (int) or as a fraction of variance to keep (float in (0, 1]).

    Buffers: ``mean`` [D], ``singular_vectors`` [D, k] (columns are components),
    ``singular_values`` [k] and ``explained_variance`` [k] (unbiased variance along each).
    The decomposition runs in float64; the buffers are float32.
    """

    mean: torch.Tensor
    singular_vectors: torch.Tensor
    singular_values: torch.Tensor
    explained_variance: torch.Tensor

    def __init__(self, n_components: int | float) -> None:
        super().__init__()
        if isinstance(n_components, bool) or not isinstance(n_components, (int, float)):
            raise TypeError(f"n_components must be an int or a float, got {n_components!r}")
        if isinstance(n_components, float) and not 0 < n_components <= 1:
            raise ValueError(f"a fractional n_components is the variance to keep, in (0, 1]; got {n_components}")
        if isinstance(n_components, int) and n_components < 1:
            raise ValueError(f"n_components must be at least 1, got {n_components}")
        self.n_components = n_components
        for name in ("mean", "singular_vectors", "singular_values", "explained_variance"):
            self.register_buffer(name, torch.empty(0))

    @property
    def fitted(self) -> bool:
        return self.singular_vectors.numel() > 0

    @property
    def num_components(self) -> int:
        return int(self.singular_vectors.shape[1]) if self.fitted else 0

    @torch.no_grad()
    def fit(self, dataset: torch.Tensor) -> PCA:
        """Fit to ``dataset`` [N, D]."""
        if dataset.ndim != 2 or dataset.shape[0] < 2:
            raise ValueError(f"PCA needs a dataset [N >= 2, D], got {tuple(dataset.shape)}")
        n, d = dataset.shape
        x = dataset.detach().to(torch.float64)
        mean = x.mean(dim=0)
        x = x - mean
        if n > d:
            # Tall data: eigen-decompose the D × D scatter matrix (less memory and time than an SVD of X).
            eigvals, eigvecs = torch.linalg.eigh(x.T @ x)
            eigvals, eigvecs = eigvals.flip(0).clamp_min(0), eigvecs.flip(1)
            singular_values, vectors = eigvals.sqrt(), eigvecs
        else:
            _, singular_values, vh = torch.linalg.svd(x, full_matrices=False)
            vectors = vh.T
        power = singular_values.pow(2)
        if isinstance(self.n_components, float):
            ratio = power.cumsum(0) / power.sum().clamp_min(torch.finfo(power.dtype).tiny)
            # The fewest components whose cumulative share reaches the level.
            k = min(int((ratio < self.n_components - 1e-12).sum()) + 1, vectors.shape[1])
        else:
            k = self.n_components
            if k > vectors.shape[1]:
                raise ValueError(f"n_components={k} exceeds min(n_samples, n_features) = {vectors.shape[1]}")
        vectors = vectors[:, :k]
        # Fix each component's sign (largest coefficient positive) so fits are reproducible.
        signs = torch.sign(vectors.gather(0, vectors.abs().argmax(dim=0, keepdim=True)))
        vectors = vectors * torch.where(signs == 0, 1.0, signs)
        device = dataset.device
        self.mean = mean.to(device=device, dtype=torch.float32)
        self.singular_vectors = vectors.to(device=device, dtype=torch.float32).contiguous()
        self.singular_values = singular_values[:k].to(device=device, dtype=torch.float32)
        self.explained_variance = (power[:k] / max(n - 1, 1)).to(device=device, dtype=torch.float32)
        return self

    def transform(self, features: torch.Tensor) -> torch.Tensor:
        """Project ``features`` [N, D] onto the components → [N, k]."""
        self._check_fitted()
        return (features.to(self.mean.dtype) - self.mean) @ self.singular_vectors

    def inverse_transform(self, features: torch.Tensor) -> torch.Tensor:
        """Map projected ``features`` [N, k] back to the input space → [N, D]."""
        self._check_fitted()
        return features.to(self.mean.dtype) @ self.singular_vectors.T + self.mean

    def fit_transform(self, dataset: torch.Tensor) -> torch.Tensor:
        return self.fit(dataset).transform(dataset)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.transform(features)

    def _check_fitted(self) -> None:
        if not self.fitted:
            raise RuntimeError("PCA is not fitted")
