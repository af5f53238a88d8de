"""Density estimation of region attributes: how unusual is each region's velocity, pose, appearance.

- :class:`GroupedKNNEstimator` (pose, deep): mean distance to the ``n_neighbors`` nearest
  training features (shared k-NN search of ``components.nearest_neighbors``);
- :class:`GMMEstimator` (velocity): negative log-likelihood under a Gaussian mixture
  (shared ``components.gmm``);
- :class:`CombinedDensityEstimator`: each estimator's score min/max-normalised with the
  statistics of the training features. A region's score is the sum of its attributes'
  scores; a *frame's* score, as in the paper and anomalib, is the sum over attributes of
  that attribute's maximum over the frame's regions (``frame_scores``) — so a frame with a
  fast object and another oddly-looking one scores both.

Normalisation statistics of a k-NN estimator are computed leave-one-group-out: training
features from one group (a video, as in the paper; or a contiguous segment of one stream)
are compared with the other groups only, so near-duplicate frames of the same video do not
make every distance look like zero.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from oddeye.models.components.gmm import GaussianMixture
from oddeye.models.components.nearest_neighbors import MemoryBank, knn
from oddeye.models.video.ai_vad.features import FeatureType

__all__ = ["CombinedDensityEstimator", "GMMEstimator", "GroupedKNNEstimator"]

log = logging.getLogger(__name__)


class _MinMax(nn.Module):
    """Min/max of training scores (buffers); maps a score to (x - min) / (max - min)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("min", torch.tensor(0.0))
        self.register_buffer("max", torch.tensor(1.0))

    def fit(self, scores: torch.Tensor) -> None:
        self.min.fill_(float(scores.min()))
        self.max.fill_(float(scores.max()))

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        return (scores - self.min) / (self.max - self.min).clamp_min(1e-12)


class GroupedKNNEstimator(nn.Module):
    """Mean distance to the ``n_neighbors`` nearest training features, min/max-normalised."""

    def __init__(self, n_neighbors: int = 1) -> None:
        super().__init__()
        if n_neighbors < 1:
            raise ValueError(f"n_neighbors must be positive, got {n_neighbors}")
        self.n_neighbors = int(n_neighbors)
        self.memory_bank = MemoryBank()
        self.stats = _MinMax()

    @torch.no_grad()
    def fit(self, features: torch.Tensor, groups: torch.Tensor) -> GroupedKNNEstimator:
        """Keep ``features`` [N, D]; normalisation from leave-one-group-out distances (``groups`` [N])."""
        if features.shape[0] < 2:
            raise ValueError(f"k-NN density needs at least 2 training regions, got {features.shape[0]}")
        self.memory_bank.fit(features)
        bank = self.memory_bank.features
        groups = groups.to(bank.device)
        distances = torch.empty(bank.shape[0], device=bank.device)
        if groups.unique().numel() > 1:
            for g in groups.unique():
                own = groups == g
                k = min(self.n_neighbors, int((~own).sum()))
                distances[own] = knn(bank[own], bank[~own], k)[0].mean(1)
        else:  # one group: leave each feature itself out
            k = min(self.n_neighbors + 1, bank.shape[0])
            distances = knn(bank, bank, k)[0][:, 1:].mean(1)
        self.stats.fit(distances)
        return self

    @torch.no_grad()
    def predict(self, features: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Scores [M] of ``features`` [M, D]: higher is less like the training features."""
        k = min(self.n_neighbors, len(self.memory_bank))
        d = self.memory_bank(features.float(), k=k)[0].mean(1)
        return self.stats(d) if normalize else d


class GMMEstimator(nn.Module):
    """Negative log-likelihood under a Gaussian mixture of the training features, min/max-normalised."""

    def __init__(self, n_components: int = 2) -> None:
        super().__init__()
        self.gmm = GaussianMixture(n_components)
        self.stats = _MinMax()

    @torch.no_grad()
    def fit(self, features: torch.Tensor) -> GMMEstimator:
        if features.shape[0] < self.gmm.n_components:
            raise ValueError(
                f"a GMM with n_components_velocity={self.gmm.n_components} needs at least as many training "
                f"regions, got {features.shape[0]}"
            )
        self.gmm.fit(features)
        self.stats.fit(-self.gmm.score_samples(features))
        return self

    @torch.no_grad()
    def predict(self, features: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        nll = (-self.gmm.score_samples(features)).float()
        return self.stats(nll) if normalize else nll


class CombinedDensityEstimator(nn.Module):
    """Region score = sum of the normalised velocity (GMM), pose and deep (k-NN) scores in use."""

    def __init__(
        self,
        use_velocity_features: bool = True,
        use_pose_features: bool = True,
        use_deep_features: bool = True,
        n_components_velocity: int = 2,
        n_neighbors_pose: int = 1,
        n_neighbors_deep: int = 1,
    ) -> None:
        super().__init__()
        if not (use_velocity_features or use_pose_features or use_deep_features):
            raise ValueError("AI-VAD needs at least one of use_velocity_features, use_pose_features, use_deep_features")
        self.estimators = nn.ModuleDict()
        if use_velocity_features:
            self.estimators[FeatureType.VELOCITY.value] = GMMEstimator(n_components_velocity)
        if use_pose_features:
            self.estimators[FeatureType.POSE.value] = GroupedKNNEstimator(n_neighbors_pose)
        if use_deep_features:
            self.estimators[FeatureType.DEEP.value] = GroupedKNNEstimator(n_neighbors_deep)

    @property
    def feature_types(self) -> list[str]:
        return list(self.estimators)

    def fit(self, features: dict[str, torch.Tensor], groups: torch.Tensor) -> CombinedDensityEstimator:
        for name, estimator in self.estimators.items():
            if isinstance(estimator, GroupedKNNEstimator):
                estimator.fit(features[name], groups)
            else:
                estimator.fit(features[name])
            log.debug("AI-VAD %s density fitted on %d regions", name, features[name].shape[0])
        return self

    def predict(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """Region scores [M] for the features of M regions: the sum of their normalised attribute scores."""
        return torch.stack(list(self.predict_each(features).values())).sum(0)

    def frame_scores(self, each: dict[str, torch.Tensor], counts: list[int]) -> torch.Tensor:
        """Frame scores [B] from ``predict_each``'s attribute scores of the regions of B frames (``counts`` each):
        per attribute the maximum over the frame's regions, summed over attributes (0 for a frame without regions)."""
        total = torch.zeros(len(counts), dtype=torch.float32)
        for scores in each.values():
            parts = scores.float().cpu().split(counts)
            total += torch.stack([p.max() if p.numel() else p.new_zeros(()) for p in parts])
        return total

    def predict_each(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The normalised score of each feature type [M], to explain a region's score."""
        return {name: est.predict(features[name]).float() for name, est in self.estimators.items()}
