"""PaDiM: a Gaussian per patch position over multi-layer CNN features (Defard et al., 2020).

https://arxiv.org/abs/2011.08785 — parameter names follow anomalib's ``Padim``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import torch
from torch.nn.functional import interpolate

from oddeye.models.base import AnomalyModel, FitError, register
from oddeye.models.components import (
    GaussianAccumulator,
    GaussianBlur2d,
    MultiVariateGaussian,
    TimmFeatureExtractor,
    mahalanobis_heads,
)
from oddeye.progress import progress_bar

__all__ = ["Padim"]

log = logging.getLogger(__name__)

# Channels kept after random selection, from the paper.
N_FEATURES_DEFAULTS = {"resnet18": 100, "wide_resnet50_2": 550}
# Seed of the random channel subset (the chosen indices are also saved as a buffer).
CHANNEL_SEED = 0
# Above this size the running outer-product sums are kept in float32 (shifted, still accurate).
_FLOAT64_BUDGET_BYTES = 4 << 30


@register("padim")
class Padim(AnomalyModel):
    """PaDiM with a timm backbone; ``raw_forward`` gives the Mahalanobis distance map."""

    idx: torch.Tensor

    def __init__(
        self,
        backbone: str = "resnet18",
        layers: Sequence[str] = ("layer1", "layer2", "layer3"),
        pre_trained: bool = True,
        n_features: int | None = None,
        weights: str | None = None,
        image_size: tuple[int, int] | list[int] = (256, 256),
    ) -> None:
        super().__init__(image_size=image_size)
        layers = [layers] if isinstance(layers, str) else list(layers)
        self.backbone = backbone
        self.layers = layers
        self.feature_extractor = TimmFeatureExtractor(backbone, layers, pre_trained=pre_trained, weights=weights)

        total = sum(self.feature_extractor.out_channels)
        if n_features is None:
            n_features = N_FEATURES_DEFAULTS.get(backbone, total)
            if n_features > total:
                log.info("padim: %d channels available in %s, using all (paper default %d)", total, layers, n_features)
                n_features = total
        elif not 0 < n_features <= total:
            raise ValueError(
                f"n_features must be between 1 and {total} (the channels of {backbone} layers {layers}), "
                f"got {n_features}"
            )
        self.n_features = int(n_features)
        generator = torch.Generator().manual_seed(CHANNEL_SEED)
        idx = torch.randperm(total, generator=generator)[: self.n_features].sort().values
        self.register_buffer("idx", idx)
        self.gaussian = MultiVariateGaussian()
        self.blur = GaussianBlur2d(sigma=4.0)

    @property
    def device(self) -> torch.device:
        return self.idx.device

    def backbone_module(self) -> torch.nn.Module:
        return self.feature_extractor

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self._embedding(images)

    def _embedding(self, images: torch.Tensor) -> torch.Tensor:
        """Selected channels of all layers at the first layer's resolution: [B, n_features, h, w]."""
        features = self.feature_extractor(images.to(self.device))
        maps = list(features.values())
        size = maps[0].shape[-2:]
        parts, offset = [], 0
        for fmap in maps:
            c = fmap.shape[1]
            local = self.idx[(self.idx >= offset) & (self.idx < offset + c)] - offset
            offset += c
            if local.numel() == 0:
                continue
            part = fmap.index_select(1, local)  # select before upsampling: less to move
            if part.shape[-2:] != size:
                part = interpolate(part, size=size, mode="nearest")
            parts.append(part)
        return torch.cat(parts, dim=1)

    @torch.no_grad()
    def _fit_normal(self, batches: Iterator[torch.Tensor], progress: bool) -> None:
        acc: GaussianAccumulator | None = None
        for images in progress_bar(batches, desc="padim: collecting features", unit="batch", disable=not progress):
            embedding = self.embedding_of(images).flatten(2)
            if acc is None:
                c, n = embedding.shape[1:]
                big = n * c * c * 8 > _FLOAT64_BUDGET_BYTES
                acc = GaussianAccumulator(dtype=torch.float32 if big else torch.float64)
            acc.update(embedding)
        if acc is None or acc.count == 0:
            raise FitError("fit received no images: the training data is empty")
        log.info(
            "padim: fitting %d Gaussians of dimension %d on %d images", acc.sum.shape[1], self.n_features, acc.count
        )
        self.gaussian.fit_accumulated(acc)

    @torch.no_grad()
    def raw_forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw score [B] (max of the map) and anomaly map [B, H, W] at the input resolution."""
        return self.score_embedding(self.embedding_of(images), self.map_size(images))

    @torch.no_grad()
    def score_embedding(self, embedding: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The head: Mahalanobis distances of ``embedding`` [B, n_features, h, w], upsampled to ``size`` and blurred."""
        return self._maps(self.gaussian(embedding.flatten(2)), embedding.shape, size)

    @classmethod
    @torch.no_grad()
    def score_embedding_heads(
        cls, heads: Sequence[AnomalyModel], embedding: torch.Tensor, index: torch.Tensor, size: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every head at once: each row's Mahalanobis distances to its own head's Gaussians, one batched pass."""
        gaussians = [h.gaussian for h in heads]  # type: ignore[attr-defined]
        distances = mahalanobis_heads(embedding.flatten(2), gaussians, index)
        return heads[0]._maps(distances, embedding.shape, size)  # type: ignore[attr-defined]

    def _maps(
        self, distances: torch.Tensor, shape: torch.Size, size: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Score [B] and map [B, *size] from the distances [B, h*w] of embeddings of ``shape`` [B, C, h, w]."""
        b, _, h, w = shape
        amap = interpolate(distances.view(b, 1, h, w), size=size, mode="bilinear", align_corners=False)
        amap = self.blur(amap).squeeze(1)
        return amap.flatten(1).amax(dim=1), amap
