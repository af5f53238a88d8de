"""DFKDE: kernel density over PCA-reduced, globally pooled deep features (image-level).

Parameter names follow anomalib's ``Dfkde``. Each image becomes one vector (the
average-pooled maps of the chosen layers); the raw score is its negative log-likelihood
under a Gaussian KDE of the training vectors. There is no anomaly map, as in anomalib.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import torch

from oddeye.models.base import AnomalyModel, FitError, register
from oddeye.models.components import FeatureScalingMethod, KDEClassifier, TimmFeatureExtractor
from oddeye.progress import progress_bar

__all__ = ["Dfkde"]

log = logging.getLogger(__name__)


@register("dfkde")
class Dfkde(AnomalyModel):
    """DFKDE with a timm backbone; ``raw_forward`` gives a score and no map."""

    def __init__(
        self,
        backbone: str = "resnet18",
        layers: Sequence[str] = ("layer4",),
        pre_trained: bool = True,
        n_pca_components: int = 16,
        feature_scaling_method: FeatureScalingMethod | str = FeatureScalingMethod.SCALE,
        max_training_points: int = 40000,
        weights: str | None = None,
        image_size: tuple[int, int] | list[int] = (256, 256),
    ) -> None:
        super().__init__(image_size=image_size)
        layers = [layers] if isinstance(layers, str) else list(layers)
        self.classifier = KDEClassifier(
            n_pca_components=n_pca_components,
            feature_scaling_method=feature_scaling_method,
            max_training_points=max_training_points,
        )
        self.backbone = backbone
        self.layers = layers
        self.feature_extractor = TimmFeatureExtractor(backbone, layers, pre_trained=pre_trained, weights=weights)

    @property
    def device(self) -> torch.device:
        return self.feature_extractor.mean.device

    def backbone_module(self) -> torch.nn.Module:
        return self.feature_extractor

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self._features(images)

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        """One vector per image [B, C]: every layer's map averaged over space, concatenated."""
        maps = self.feature_extractor(images.to(self.device)).values()
        return torch.cat([m.mean(dim=(2, 3)) for m in maps], dim=1)

    @torch.no_grad()
    def _fit_normal(self, batches: Iterator[torch.Tensor], progress: bool) -> None:
        rows = [
            self.embedding_of(images).cpu()
            for images in progress_bar(batches, desc="dfkde: collecting features", unit="batch", disable=not progress)
        ]
        if not rows:
            raise FitError("fit received no images: the training data is empty")
        features = torch.cat(rows).to(self.device)
        try:
            self.classifier.fit(features)
        except ValueError as e:
            raise FitError(f"dfkde: {e}") from None
        log.info("dfkde: KDE of %d images in %d dimensions", *self.classifier.kde_model.dataset.shape)

    @torch.no_grad()
    def raw_forward(self, images: torch.Tensor) -> tuple[torch.Tensor, None]:
        """Raw score [B]: the negative log-likelihood of each image's pooled features."""
        return self.score_embedding(self.embedding_of(images), self.map_size(images))

    @torch.no_grad()
    def score_embedding(self, embedding: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, None]:
        """The head: negative log-likelihood of pooled features ``embedding`` [B, C] (no map)."""
        if not self.classifier.fitted:
            raise RuntimeError("dfkde: the KDE is not fitted; fit the model or load a checkpoint")
        return -self.classifier.score_samples(embedding), None
