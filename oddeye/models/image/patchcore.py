"""PatchCore: a coreset memory bank of locally aware patch features (Roth et al., 2022).

https://arxiv.org/abs/2106.08265 — parameter names follow anomalib's ``Patchcore``.
A patch's score is its distance to the nearest bank feature; the image score is the
largest patch score, re-weighted by how isolated that patch's nearest bank feature is.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import torch
from torch.nn.functional import avg_pool2d, interpolate, softmax

from oddeye.models.base import AnomalyModel, FitError, register
from oddeye.models.components import GaussianBlur2d, HeadGroups, KCenterGreedy, MemoryBank, TimmFeatureExtractor
from oddeye.progress import progress_bar

__all__ = ["Patchcore"]

log = logging.getLogger(__name__)

# Seed of the coreset's random projection and first centre (reproducible fits).
CORESET_SEED = 0


@register("patchcore")
class Patchcore(AnomalyModel):
    """PatchCore with a timm backbone; ``raw_forward`` gives nearest-neighbour distance maps."""

    def __init__(
        self,
        backbone: str = "wide_resnet50_2",
        layers: Sequence[str] = ("layer2", "layer3"),
        pre_trained: bool = True,
        coreset_sampling_ratio: float = 0.1,
        num_neighbors: int = 9,
        weights: str | None = None,
        image_size: tuple[int, int] | list[int] = (256, 256),
    ) -> None:
        super().__init__(image_size=image_size)
        layers = [layers] if isinstance(layers, str) else list(layers)
        if not 0 < coreset_sampling_ratio <= 1:
            raise ValueError(f"coreset_sampling_ratio must be in (0, 1], got {coreset_sampling_ratio}")
        if num_neighbors < 1:
            raise ValueError(f"num_neighbors must be at least 1, got {num_neighbors}")
        self.backbone = backbone
        self.layers = layers
        self.coreset_sampling_ratio = float(coreset_sampling_ratio)
        self.num_neighbors = int(num_neighbors)
        self.feature_extractor = TimmFeatureExtractor(backbone, layers, pre_trained=pre_trained, weights=weights)
        self.memory_bank = MemoryBank()
        self.blur = GaussianBlur2d(sigma=4.0)

    @property
    def device(self) -> torch.device:
        return self.feature_extractor.mean.device

    def backbone_module(self) -> torch.nn.Module:
        return self.feature_extractor

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self._embedding(images)

    def _embedding(self, images: torch.Tensor) -> torch.Tensor:
        """Locally aware patch features [B, C, h, w]: 3×3-averaged maps of all layers at the first layer's size."""
        maps = [avg_pool2d(f, 3, stride=1, padding=1) for f in self.feature_extractor(images.to(self.device)).values()]
        size = maps[0].shape[-2:]
        maps = [m if m.shape[-2:] == size else interpolate(m, size=size, mode="bilinear") for m in maps]
        return torch.cat(maps, dim=1)

    @torch.no_grad()
    def _fit_normal(self, batches: Iterator[torch.Tensor], progress: bool) -> None:
        chunks = []
        for images in progress_bar(batches, desc="patchcore: collecting features", unit="batch", disable=not progress):
            embedding = self.embedding_of(images)
            chunks.append(embedding.permute(0, 2, 3, 1).reshape(-1, embedding.shape[1]).cpu())
        if not chunks:
            raise FitError("fit received no images: the training data is empty")
        sampler = KCenterGreedy(
            chunks, self.coreset_sampling_ratio, seed=CORESET_SEED, device=self.device, progress=progress
        )
        log.info(
            "patchcore: selecting %d of %d patch features (dimension %d)",
            sampler.coreset_size,
            sampler.n_samples,
            sampler.n_features,
        )
        self.memory_bank.fit(sampler.sample_coreset())
        log.info("patchcore: memory bank %.1f MB", self.memory_bank.nbytes / 1e6)

    def _image_score(self, queries: torch.Tensor, patch_scores: torch.Tensor, locations: torch.Tensor) -> torch.Tensor:
        """The paper's re-weighted image score from each image's most anomalous patch.

        ``queries`` [B, N, C], ``patch_scores`` / ``locations`` [B, N] (distance and index of the nearest bank feature).
        """
        batch = torch.arange(patch_scores.shape[0], device=patch_scores.device)
        worst = patch_scores.argmax(dim=1)
        score = patch_scores[batch, worst]
        k = min(self.num_neighbors, len(self.memory_bank))
        if k == 1:
            return score
        test_feature = queries[batch, worst]  # [B, C]
        nearest = self.memory_bank.features[locations[batch, worst]]  # [B, C]
        _, support = self.memory_bank(nearest, k=k)  # that bank feature's own neighbourhood [B, k]
        distances = (test_feature.unsqueeze(1) - self.memory_bank.features[support]).pow(2).sum(dim=2).sqrt()
        weights = 1 - softmax(distances, dim=1)[:, 0]
        return weights * score

    @torch.no_grad()
    def raw_forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw score [B] (re-weighted worst patch) and anomaly map [B, H, W] (patch distances, upsampled, blurred)."""
        return self.score_embedding(self.embedding_of(images), self.map_size(images))

    @torch.no_grad()
    def score_embedding(self, embedding: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The head: nearest-bank distances of the patch features ``embedding`` [B, C, h, w], maps at ``size``."""
        if not self.memory_bank.fitted:
            raise RuntimeError("patchcore: the memory bank is empty; fit the model or load a checkpoint")
        score, patch_scores = self._patch_scores(embedding)
        return score, self._maps(patch_scores, embedding.shape, size)

    @classmethod
    @torch.no_grad()
    def score_embedding_heads(
        cls, heads: Sequence[AnomalyModel], embedding: torch.Tensor, index: torch.Tensor, size: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each head searches its own memory bank for its own rows (banks differ in size, can be large, and
        the search is chunked per bank), then every row's map is upsampled and blurred in one pass."""
        models: list[Patchcore] = list(heads)  # type: ignore[arg-type]
        score = embedding.new_empty(embedding.shape[0])
        patch_scores = embedding.new_empty(embedding.shape[0], embedding.shape[2] * embedding.shape[3])
        groups = HeadGroups(index, len(models))
        for k, model in enumerate(models):
            rows = groups.rows(k)
            score[rows], patch_scores[rows] = model._patch_scores(embedding.index_select(0, rows))
        return score, models[0]._maps(patch_scores, embedding.shape, size)

    def _patch_scores(self, embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image scores [B] and patch scores [B, h*w] of patch features ``embedding`` [B, C, h, w]."""
        b, c, h, w = embedding.shape
        queries = embedding.permute(0, 2, 3, 1).reshape(b, h * w, c)
        distances, locations = self.memory_bank(queries.reshape(-1, c), k=1)
        patch_scores = distances.view(b, h * w)
        return self._image_score(queries, patch_scores, locations.view(b, h * w)), patch_scores

    def _maps(self, patch_scores: torch.Tensor, shape: torch.Size, size: tuple[int, int]) -> torch.Tensor:
        """Maps [B, *size]: patch scores [B, h*w] of embeddings of ``shape`` [B, C, h, w], upsampled and blurred."""
        b, _, h, w = shape
        amap = interpolate(patch_scores.view(b, 1, h, w), size=size, mode="bilinear", align_corners=False)
        return self.blur(amap).squeeze(1)
