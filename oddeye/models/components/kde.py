"""Gaussian kernel density estimation and anomalib's KDE classifier (PCA → scaling → KDE).

Densities are computed as log-densities with a log-sum-exp over the data in chunks, so
points far from every training sample still get distinct finite scores (a plain density
underflows to 0 there), and memory stays bounded for large datasets.
"""

from __future__ import annotations

import enum
import logging
import math

import torch

from oddeye.models.components.buffers import DynamicBufferMixin
from oddeye.models.components.nearest_neighbors import DEFAULT_CHUNK_SIZE, squared_distances
from oddeye.models.components.pca import PCA

__all__ = ["FeatureScalingMethod", "GaussianKDE", "KDEClassifier"]

log = logging.getLogger(__name__)


class GaussianKDE(DynamicBufferMixin):
    """Gaussian KDE with Scott's bandwidth and the data's full covariance (as scipy's ``gaussian_kde``).

    Buffers: ``dataset`` [N, D] (already whitened by the bandwidth), ``bw_transform``
    [D, D] and ``log_norm`` (log of the kernel's normalising constant).
    """

    dataset: torch.Tensor
    bw_transform: torch.Tensor
    log_norm: torch.Tensor

    def __init__(self, dataset: torch.Tensor | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        super().__init__()
        self.chunk_size = int(chunk_size)
        self.register_buffer("dataset", torch.empty(0))
        self.register_buffer("bw_transform", torch.empty(0))
        self.register_buffer("log_norm", torch.tensor(0.0))
        if dataset is not None:
            self.fit(dataset)

    @property
    def fitted(self) -> bool:
        return self.dataset.numel() > 0

    @staticmethod
    def cov(tensor: torch.Tensor) -> torch.Tensor:
        """Unbiased covariance of ``tensor`` [D, N] (variables in rows, as ``numpy.cov``)."""
        centred = tensor - tensor.mean(dim=1, keepdim=True)
        return centred @ centred.T / (tensor.shape[1] - 1)

    @torch.no_grad()
    def fit(self, dataset: torch.Tensor) -> GaussianKDE:
        """Fit to ``dataset`` [N, D]; needs N > D so the covariance is invertible."""
        if dataset.ndim != 2:
            raise ValueError(f"expected a dataset [N, D], got {tuple(dataset.shape)}")
        n, d = dataset.shape
        if n <= d:
            raise ValueError(f"a Gaussian KDE in {d} dimensions needs more than {d} points, got {n}")
        x = dataset.detach().to(torch.float64)
        factor = n ** (-1.0 / (d + 4))  # Scott's rule
        inv_cov = torch.linalg.inv(self.cov(x.T)) / factor**2
        bw_transform = torch.linalg.cholesky(inv_cov)  # inv_cov = L Lᵀ, so |(x - y) L|² is the Mahalanobis distance
        log_norm = torch.log(torch.diagonal(bw_transform)).sum() - d / 2 * math.log(2 * math.pi)
        device = dataset.device
        self.bw_transform = bw_transform.to(device=device, dtype=torch.float32)
        self.dataset = (x @ bw_transform).to(device=device, dtype=torch.float32)
        self.log_norm = log_norm.to(device=device, dtype=torch.float32)
        return self

    @torch.no_grad()
    def score_samples(self, features: torch.Tensor) -> torch.Tensor:
        """Log-density [M] of ``features`` [M, D]."""
        if not self.fitted:
            raise RuntimeError("GaussianKDE is not fitted")
        if features.ndim != 2 or features.shape[1] != self.dataset.shape[1]:
            raise ValueError(f"expected features [M, {self.dataset.shape[1]}], got {tuple(features.shape)}")
        points = features.to(self.bw_transform) @ self.bw_transform
        n = self.dataset.shape[0]
        data_sq = self.dataset.pow(2).sum(dim=1)
        rows = max(1, self.chunk_size // n)
        out = torch.empty(points.shape[0], dtype=torch.float32, device=points.device)
        for start in range(0, points.shape[0], rows):
            d2 = squared_distances(points[start : start + rows], self.dataset, y_sq=data_sq)
            out[start : start + rows] = torch.logsumexp(-0.5 * d2, dim=1)
        return out + self.log_norm - math.log(n)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Density estimates [M] (may underflow to 0 far from the data; ``score_samples`` does not)."""
        return self.score_samples(features).exp()


class FeatureScalingMethod(str, enum.Enum):
    """How the PCA-reduced features are scaled before the KDE."""

    NORM = "norm"  # each vector to unit length
    SCALE = "scale"  # all vectors by the largest training vector length


class KDEClassifier(DynamicBufferMixin):
    """anomalib's KDE classifier: PCA to ``n_pca_components``, scaling, then a Gaussian KDE.

    At most ``max_training_points`` (a seeded random subset) are kept as KDE data.
    ``score_samples`` gives log-likelihoods (higher = more normal); ``predict`` maps them
    to anomalib's anomaly probabilities.
    """

    max_length: torch.Tensor

    def __init__(
        self,
        n_pca_components: int = 16,
        feature_scaling_method: FeatureScalingMethod | str = FeatureScalingMethod.SCALE,
        max_training_points: int = 40000,
        seed: int = 0,
    ) -> None:
        super().__init__()
        try:
            self.feature_scaling_method = FeatureScalingMethod(feature_scaling_method)
        except ValueError:
            allowed = [m.value for m in FeatureScalingMethod]
            raise ValueError(
                f"feature_scaling_method must be one of {allowed}, got {feature_scaling_method!r}"
            ) from None
        if max_training_points < 1:
            raise ValueError(f"max_training_points must be positive, got {max_training_points}")
        self.n_pca_components = int(n_pca_components)
        self.max_training_points = int(max_training_points)
        self.seed = seed
        self.pca_model = PCA(n_components=self.n_pca_components)
        self.kde_model = GaussianKDE()
        self.register_buffer("max_length", torch.tensor(1.0))

    @property
    def fitted(self) -> bool:
        return self.kde_model.fitted

    def pre_process(
        self, feature_stack: torch.Tensor, max_length: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale features [N, k]; returns them and the length used by the ``scale`` method."""
        lengths = torch.linalg.vector_norm(feature_stack, ord=2, dim=1)
        if max_length is None:
            max_length = lengths.max()
        tiny = torch.finfo(feature_stack.dtype).tiny
        if self.feature_scaling_method == FeatureScalingMethod.NORM:
            feature_stack = feature_stack / lengths.clamp_min(tiny).unsqueeze(1)
        else:
            feature_stack = feature_stack / max_length.clamp_min(tiny)
        return feature_stack, max_length

    @torch.no_grad()
    def fit(self, embeddings: torch.Tensor) -> bool:
        """Fit PCA and KDE to ``embeddings`` [N, D]; needs more than ``n_pca_components`` points."""
        n = embeddings.shape[0]
        if n <= self.n_pca_components:
            raise ValueError(
                f"the KDE classifier needs more than n_pca_components={self.n_pca_components} training points, got {n}"
            )
        if n > self.max_training_points:
            generator = torch.Generator().manual_seed(self.seed)
            keep = torch.randperm(n, generator=generator)[: self.max_training_points].sort().values
            embeddings = embeddings[keep.to(embeddings.device)]
        features = self.pca_model.fit_transform(embeddings)
        features, max_length = self.pre_process(features)
        self.max_length = max_length.detach().to(self.max_length.device)
        self.kde_model.fit(features)
        return True

    def score_samples(self, features: torch.Tensor) -> torch.Tensor:
        """Log-likelihood [N] of ``features`` [N, D] under the fitted KDE."""
        if not self.fitted:
            raise RuntimeError("KDEClassifier is not fitted")
        reduced, _ = self.pre_process(self.pca_model.transform(features), self.max_length)
        return self.kde_model.score_samples(reduced)

    def compute_kde_scores(self, features: torch.Tensor, as_log_likelihood: bool = False) -> torch.Tensor:
        """KDE densities of ``features`` (or their logs with ``as_log_likelihood``)."""
        log_likelihood = self.score_samples(features)
        return log_likelihood if as_log_likelihood else log_likelihood.exp()

    @staticmethod
    def compute_probabilities(scores: torch.Tensor) -> torch.Tensor:
        """anomalib's map from log-density to an anomaly probability: ``1 / (1 + exp(0.05 (s - 12)))``."""
        return torch.sigmoid(-0.05 * (scores - 12))

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """Probabilities [N] that ``features`` are anomalous."""
        return self.compute_probabilities(self.compute_kde_scores(features, as_log_likelihood=True))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.predict(features)
