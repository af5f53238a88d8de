"""CFA: coupled-hypersphere-based feature adaptation (Lee et al., 2022).

https://arxiv.org/abs/2206.04325 — parameter names follow anomalib's ``Cfa``. A small
1×1 coord-conv adaptor maps frozen backbone patch features towards a memory bank of
normal centres (the mean training feature map, k-means-compressed by ``gamma_c``); it is
trained inside ``fit`` to pull each patch into the hypersphere of its nearest centres
and push hard negatives out. A patch's score is its soft-min distance to the bank.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import torch
from torch import nn
from torch.nn.functional import avg_pool2d, interpolate, relu, softmin

from oddeye.models.base import AnomalyModel, FitError, register
from oddeye.models.components import (
    GaussianBlur2d,
    KMeans,
    MemoryBank,
    TimmFeatureExtractor,
    knn_heads,
    squared_distances,
)
from oddeye.progress import progress_bar

__all__ = ["Cfa", "CoordConv1x1"]

log = logging.getLogger(__name__)

# anomalib's optimiser settings for the adaptor (AdamW with AMSGrad).
LEARNING_RATE = 1e-3
WEIGHT_DECAY = 5e-4
# Margin of the repulsion term (the paper's alpha).
REPULSION_MARGIN = 0.1
# anomalib scales the loss by this constant.
LOSS_SCALE = 1000.0
# Patches per chunk of the training distance computation (bounds its memory).
_DISTANCE_ROWS = 4096
SEED = 0


class CoordConv1x1(nn.Module):
    """A 1×1 convolution over the features plus two coordinate channels in [-1, 1]."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels + 2, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.with_coords(x))

    @staticmethod
    def with_coords(x: torch.Tensor) -> torch.Tensor:
        """The convolution's input: ``x`` [B, C, h, w] with the x and y coordinate channels appended."""
        b, _, h, w = x.shape
        ys = torch.linspace(-1, 1, h, device=x.device, dtype=x.dtype).view(1, 1, h, 1).expand(b, 1, h, w)
        xs = torch.linspace(-1, 1, w, device=x.device, dtype=x.dtype).view(1, 1, 1, w).expand(b, 1, h, w)
        return torch.cat([x, xs, ys], dim=1)


@register("cfa")
class Cfa(AnomalyModel):
    """CFA with a timm backbone; ``raw_forward`` gives soft-min distance maps to the adapted memory bank."""

    def __init__(
        self,
        backbone: str = "wide_resnet50_2",
        gamma_c: int = 1,
        gamma_d: int = 1,
        num_nearest_neighbors: int = 3,
        num_hard_negative_features: int = 3,
        radius: float = 1e-5,
        epochs: int = 30,
        layers: Sequence[str] = ("layer1", "layer2", "layer3"),
        pre_trained: bool = True,
        weights: str | None = None,
        image_size: tuple[int, int] | list[int] = (256, 256),
    ) -> None:
        super().__init__(image_size=image_size)
        layers = [layers] if isinstance(layers, str) else list(layers)
        for name, value in (
            ("gamma_c", gamma_c),
            ("gamma_d", gamma_d),
            ("num_nearest_neighbors", num_nearest_neighbors),
        ):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if num_hard_negative_features < 0 or epochs < 0:
            raise ValueError("num_hard_negative_features and epochs must not be negative")
        self.backbone = backbone
        self.layers = layers
        self.gamma_c = int(gamma_c)
        self.gamma_d = int(gamma_d)
        self.num_nearest_neighbors = int(num_nearest_neighbors)
        self.num_hard_negative_features = int(num_hard_negative_features)
        self.radius = float(radius)
        self.epochs = int(epochs)
        self.feature_extractor = TimmFeatureExtractor(backbone, layers, pre_trained=pre_trained, weights=weights)
        dim = sum(self.feature_extractor.out_channels)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SEED)  # the adaptor's initial weights shape the memory bank: keep them reproducible
            self.descriptor = CoordConv1x1(dim, dim // self.gamma_d)
        self.memory_bank = MemoryBank()
        self.blur = GaussianBlur2d(sigma=4.0)
        self.loss_history: list[float] = []  # mean training loss of each epoch of the last fit

    @property
    def device(self) -> torch.device:
        return self.feature_extractor.mean.device

    def backbone_module(self) -> torch.nn.Module:
        return self.feature_extractor

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self._patch_features(images)

    def _patch_features(self, images: torch.Tensor) -> torch.Tensor:
        """Frozen backbone features, 3×3-averaged and stacked at the first layer's size: [B, C, h, w]."""
        with torch.no_grad():
            maps = [avg_pool2d(f, 3, 1, 1) for f in self.feature_extractor(images.to(self.device)).values()]
            size = maps[0].shape[-2:]
            maps = [m if m.shape[-2:] == size else interpolate(m, size=size, mode="bilinear") for m in maps]
            return torch.cat(maps, dim=1)

    def _target_features(self, images: torch.Tensor) -> torch.Tensor:
        """Adapted patch features [B, h*w, C'] (differentiable in the descriptor)."""
        return self.descriptor(self.embedding_of(images)).flatten(2).transpose(1, 2)

    @torch.no_grad()
    def _init_memory_bank(self, batches: Iterator[torch.Tensor], progress: bool) -> list[torch.Tensor]:
        """Mean adapted feature map of the training images → centres; returns the images kept for training."""
        kept, total, count = [], None, 0
        for images in progress_bar(batches, desc="cfa: memory bank", unit="batch", disable=not progress):
            kept.append(images.to("cpu", torch.float16))  # re-read every epoch; half precision halves the copy
            target = self._target_features(images)
            total = target.sum(dim=0) if total is None else total + target.sum(dim=0)
            count += images.shape[0]
        if total is None:
            raise FitError("fit received no images: the training data is empty")
        centres = total / count  # [h*w, C']
        if self.gamma_c > 1:
            n_clusters = max(1, centres.shape[0] // self.gamma_c)
            _, centres = KMeans(n_clusters, max_iter=300, seed=SEED).fit(centres)
        self.memory_bank.fit(centres)
        log.info("cfa: %d memory bank centres of dimension %d", *self.memory_bank.features.shape)
        return kept

    def _loss(self, target: torch.Tensor) -> torch.Tensor:
        """Attraction to the K nearest centres and repulsion of the J next ones, chunked over patches."""
        k, j = self.num_nearest_neighbors, self.num_hard_negative_features
        bank = self.memory_bank.features
        bank_sq = bank.pow(2).sum(dim=1)
        n = min(k + j, bank.shape[0])
        flat = target.reshape(-1, target.shape[-1])
        r2 = self.radius**2
        attract, repel = flat.new_zeros(()), flat.new_zeros(())
        for start in range(0, flat.shape[0], _DISTANCE_ROWS):
            d2 = squared_distances(flat[start : start + _DISTANCE_ROWS], bank, y_sq=bank_sq)
            nearest = d2.topk(n, dim=1, largest=False).values
            attract = attract + relu(nearest[:, :k] - r2).sum()
            if n > k:
                repel = repel + relu(r2 - nearest[:, k:] - REPULSION_MARGIN).sum()
        loss = attract / (flat.shape[0] * k)
        if n > k:
            loss = loss + repel / (flat.shape[0] * (n - k))
        return loss * LOSS_SCALE

    def _fit_normal(self, batches: Iterator[torch.Tensor], progress: bool) -> None:
        kept = self._init_memory_bank(batches, progress)
        images = torch.cat(kept)
        batch_size = kept[0].shape[0]
        optimizer = torch.optim.AdamW(
            self.descriptor.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY, amsgrad=True
        )
        generator = torch.Generator().manual_seed(SEED)
        self.loss_history = []
        self.descriptor.train()
        bar = progress_bar(range(self.epochs), desc="cfa: training adaptor", unit="epoch", disable=not progress)
        try:
            for _ in bar:
                total, steps = 0.0, 0
                for idx in torch.randperm(images.shape[0], generator=generator).split(batch_size):
                    loss = self._loss(self._target_features(images[idx].to(self.device, torch.float32)))
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    total, steps = total + float(loss.detach()), steps + 1
                self.loss_history.append(total / max(steps, 1))
                bar.set_postfix(loss=f"{self.loss_history[-1]:.4g}")
        finally:
            self.descriptor.eval()
        log.info("cfa: adaptor trained for %d epochs on %d images", self.epochs, images.shape[0])

    @torch.no_grad()
    def raw_forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw score [B] (max of the map) and anomaly map [B, H, W] (soft-min distances, upsampled, blurred)."""
        return self.score_embedding(self.embedding_of(images), self.map_size(images))

    @torch.no_grad()
    def score_embedding(self, embedding: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The head: the adaptor over frozen patch features ``embedding`` [B, C, h, w], soft-min distances."""
        if not self.memory_bank.fitted:
            raise RuntimeError("cfa: the memory bank is empty; fit the model or load a checkpoint")
        features = self.descriptor(embedding)
        b, c, h, w = features.shape
        k = min(self.num_nearest_neighbors, len(self.memory_bank))
        distances, _ = self.memory_bank(features.flatten(2).transpose(1, 2).reshape(-1, c), k=k)
        return self._maps(distances, (b, h, w), size)

    @classmethod
    @torch.no_grad()
    def score_embedding_heads(
        cls, heads: Sequence[AnomalyModel], embedding: torch.Tensor, index: torch.Tensor, size: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Every head at once: each row through its own head's adaptor (the 1×1 convolutions' weights gathered
        per row, one batched matmul: a weight serves every position, so the gather copies far less than the
        matmul computes), then a search of its own head's memory bank (``knn_heads``). Banks of different
        sizes (a ``gamma_c`` k-means that found fewer centres) fall back to one head at a time (None)."""
        models: list[Cfa] = list(heads)  # type: ignore[arg-type]
        banks = [m.memory_bank.features for m in models]
        if len({tuple(bank.shape) for bank in banks}) != 1:
            return None
        convs = [m.descriptor.conv for m in models]
        weight = torch.stack([conv.weight.flatten(1) for conv in convs])[index]  # [B, C', C + 2]
        bias = torch.stack([conv.bias for conv in convs])[index].unsqueeze(2)  # [B, C', 1]
        b, _, h, w = embedding.shape
        features = torch.baddbmm(bias, weight, CoordConv1x1.with_coords(embedding).flatten(2))  # [B, C', h*w]
        k = min(models[0].num_nearest_neighbors, len(banks[0]))
        distances = knn_heads(features.transpose(1, 2), banks, index, k=k)  # [B, h*w, k]
        return models[0]._maps(distances.flatten(0, 1), (b, h, w), size)

    def _maps(
        self, distances: torch.Tensor, grid: tuple[int, int, int], size: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Score [B] and map [B, *size] from each patch's distances [B*h*w, k] to its nearest centres."""
        b, h, w = grid
        patch_scores = softmin(distances, dim=1)[:, 0] * distances[:, 0]
        amap = interpolate(patch_scores.view(b, 1, h, w), size=size, mode="bilinear", align_corners=False)
        amap = self.blur(amap).squeeze(1)
        return amap.flatten(1).amax(dim=1), amap
