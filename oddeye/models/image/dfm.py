"""DFM: PCA over pooled deep features of normal images (Ahuja et al., 2019).

https://arxiv.org/abs/1909.11786 — parameter names follow anomalib's ``Dfm``. An image's
pooled feature map is one vector; ``score_type="fre"`` scores it by its PCA
reconstruction error (with a coarse error map), ``"nll"`` by its negative log-likelihood
under a Gaussian in PCA space (image-level only).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import torch
from torch.nn.functional import avg_pool2d, interpolate

from oddeye.models.base import AnomalyModel, FitError, fold_assignment, register
from oddeye.models.components import PCA, HeadGroups, TimmFeatureExtractor
from oddeye.progress import progress_bar

__all__ = ["Dfm"]

log = logging.getLogger(__name__)

SCORE_TYPES = ("fre", "nll")


@register("dfm")
class Dfm(AnomalyModel):
    """DFM with a timm backbone layer, average pooling and PCA."""

    def __init__(
        self,
        backbone: str = "resnet50",
        layer: str = "layer3",
        pre_trained: bool = True,
        pooling_kernel_size: int = 4,
        pca_level: float = 0.97,
        score_type: str = "fre",
        weights: str | None = None,
        image_size: tuple[int, int] | list[int] = (256, 256),
    ) -> None:
        super().__init__(image_size=image_size)
        if score_type not in SCORE_TYPES:
            raise ValueError(f"score_type must be one of {list(SCORE_TYPES)}, got {score_type!r}")
        if pooling_kernel_size < 1:
            raise ValueError(f"pooling_kernel_size must be at least 1, got {pooling_kernel_size}")
        self.backbone = backbone
        self.layer = layer
        self.pooling_kernel_size = int(pooling_kernel_size)
        self.score_type = score_type
        self.feature_extractor = TimmFeatureExtractor(backbone, [layer], pre_trained=pre_trained, weights=weights)
        # An int is a number of components, a float the share of variance to keep (anomalib's n_comps).
        self.pca_model = PCA(n_components=pca_level)

    @property
    def device(self) -> torch.device:
        return self.feature_extractor.mean.device

    def backbone_module(self) -> torch.nn.Module:
        return self.feature_extractor

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self._features(images)

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled feature maps [B, C, h, w] of the chosen layer."""
        features = self.feature_extractor(images.to(self.device))[self.layer]
        if self.pooling_kernel_size > 1:
            features = avg_pool2d(features, self.pooling_kernel_size)
        return features

    @torch.no_grad()
    def _fit_normal(self, batches: Iterator[torch.Tensor], progress: bool) -> None:
        rows = [
            self.embedding_of(images).flatten(1).cpu()
            for images in progress_bar(batches, desc="dfm: collecting features", unit="batch", disable=not progress)
        ]
        if not rows:
            raise FitError("fit received no images: the training data is empty")
        features = torch.cat(rows).to(self.device)
        if features.shape[0] < 2:
            raise FitError(f"dfm needs at least 2 training images, got {features.shape[0]}")
        self.pca_model.fit(features)
        self._fit_features = features  # kept until heldout_scores has refitted the PCA per fold
        log.info(
            "dfm: PCA keeps %d of %d dimensions (%d images)",
            self.pca_model.num_components,
            features.shape[1],
            features.shape[0],
        )
        if self.pca_model.num_components >= features.shape[0] - 1:
            log.warning(
                "dfm: the PCA keeps all %d components that %d training images allow (pca_level=%s): every "
                "unseen image reconstructs badly and scores high; fit on more images",
                self.pca_model.num_components,
                features.shape[0],
                self.pca_model.n_components,
            )

    @torch.no_grad()
    def heldout_scores(
        self,
        train_loader: object,
        folds: int,
        n: int,
        videos: torch.Tensor | None,
        template: AnomalyModel | None,
        progress: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """k-fold held-out scores at the cost of one feature pass: the pooled features of the fit are
        kept, and only the PCA is refitted per fold (the backbone is frozen, so this equals refitting DFM)."""
        features: torch.Tensor = self.__dict__.pop("_fit_features")
        assign = fold_assignment(features.shape[0], folds, videos).to(features.device)
        k = int(assign.max()) + 1
        if k < 2:
            log.warning("dfm: %d training image(s) are too few to hold any out; normalising on them", n)
            return self._score_features(features, self.pca_model, self.image_size)
        scores = torch.empty(features.shape[0], dtype=torch.float64)
        peaks = torch.empty(features.shape[0], dtype=torch.float64)
        for fold in range(k):
            held = assign == fold
            pca = PCA(n_components=self.pca_model.n_components).to(features.device)
            pca.fit(features[~held])
            s, amap = self._score_features(features[held], pca, self.image_size)
            scores[held.cpu()] = s.double().cpu()
            if amap is not None:
                peaks[held.cpu()] = amap.flatten(1).amax(1).double().cpu()
        return scores, peaks if self.score_type == "fre" else None

    @torch.no_grad()
    def raw_forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Raw score [B]; for ``fre`` also the reconstruction-error map [B, H, W] (upsampled feature grid)."""
        return self.score_embedding(self.embedding_of(images), self.map_size(images))

    @torch.no_grad()
    def score_embedding(
        self, embedding: torch.Tensor, size: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The head: PCA scores of the pooled feature maps ``embedding`` [B, C, h, w] (``fre`` maps at ``size``)."""
        if not self.pca_model.fitted:
            raise RuntimeError("dfm: PCA is not fitted; fit the model or load a checkpoint")
        self._grid = tuple(embedding.shape[1:])
        return self._score_features(embedding.flatten(1), self.pca_model, size)

    @classmethod
    @torch.no_grad()
    def score_embedding_heads(
        cls, heads: Sequence[AnomalyModel], embedding: torch.Tensor, index: torch.Tensor, size: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Every head at once: rows grouped by head, each group projected on its own head's PCA (one matmul
        each, the basis read where it is: used once per row, a basis gathered per row would copy as much as
        the matmul reads), then every row's error and map in one pass."""
        models: list[Dfm] = list(heads)  # type: ignore[arg-type]
        groups = HeadGroups(index.to(models[0].device), len(models))
        flat = groups.pad(embedding.flatten(1))  # [K, rows, D]
        if models[0].score_type == "nll":
            score = torch.stack([m._score_features(flat[k], m.pca_model, size)[0] for k, m in enumerate(models)])
            return groups.unpad(score), None
        pcas = [m.pca_model for m in models]
        reconstruction = torch.stack([pca.inverse_transform(pca.transform(flat[k])) for k, pca in enumerate(pcas)])
        grid = tuple(embedding.shape[1:])
        return models[0]._reconstruction_scores(embedding.flatten(1), groups.unpad(reconstruction), grid, size)

    def _score_features(
        self, flat: torch.Tensor, pca: PCA, size: tuple[int, ...]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Scores [B] (and ``fre`` maps [B, *size]) of pooled, flattened features [B, C*h*w] under ``pca``."""
        projected = pca.transform(flat)
        if self.score_type == "nll":
            variance = pca.explained_variance.clamp_min(1e-12)
            return (projected.pow(2) / variance).sum(dim=1) + variance.log().sum(), None
        return self._reconstruction_scores(flat, pca.inverse_transform(projected), self._feature_grid(), size)

    def _reconstruction_scores(
        self, flat: torch.Tensor, reconstruction: torch.Tensor, grid: tuple[int, ...], size: tuple[int, ...]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``fre``: scores [B] and maps [B, *size] from flattened features [B, C*h*w] of ``grid`` (C, h, w)
        and their PCA reconstruction."""
        error = (flat - reconstruction).pow(2)
        error_map = error.view(flat.shape[0], *grid).sum(dim=1, keepdim=True)
        amap = interpolate(error_map, size=size, mode="bilinear", align_corners=False).squeeze(1)
        return error.sum(dim=1), amap

    def _feature_grid(self) -> tuple[int, ...]:
        """(C, h, w) of the pooled feature map, from a dry run on the model's image size when not yet known."""
        if getattr(self, "_grid", None) is None:
            probe = torch.zeros(1, 3, *self.image_size, device=self.device)
            self._grid = tuple(self._features(probe).shape[1:])
        return self._grid
