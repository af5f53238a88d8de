"""Reverse Distillation: a decoder rebuilds a frozen encoder's features from a one-class embedding (Deng & Li, 2022).

https://arxiv.org/abs/2201.10703 — parameter names and training defaults follow anomalib's
``ReverseDistillation`` (Adam, lr 0.005, betas (0.5, 0.99), cosine loss, ``anomaly_map_mode``).
The one-class bottleneck (OCBE) and the decoder are built from the encoder's layer widths and
strides (found by a dry run), so any timm backbone works, not only ResNets.
"""

from __future__ import annotations

import enum
import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from oddeye.models.base import register
from oddeye.models.components import GaussianBlur2d, TimmFeatureExtractor
from oddeye.models.training import TrainedAnomalyModel

__all__ = ["AnomalyMapGenerationMode", "ReverseDistillation", "reverse_distillation_loss"]

log = logging.getLogger(__name__)


class AnomalyMapGenerationMode(str, enum.Enum):
    """How the per-layer maps combine: summed (anomalib's default) or multiplied."""

    ADD = "add"
    MULTIPLY = "multiply"


def _conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class _ResidualDown(nn.Module):
    """A ResNet basic block with stride 2: the last step of the bottleneck."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
        )
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=2, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


class OneClassBottleneck(nn.Module):
    """OCBE: fuse the encoder layers at the deepest layer's resolution and compress them one stride further."""

    def __init__(self, channels: Sequence[int], reductions: Sequence[int]) -> None:
        super().__init__()
        last_c, last_r = channels[-1], reductions[-1]
        self.align = nn.ModuleList()
        for c, r in zip(channels[:-1], reductions[:-1], strict=True):
            steps = round(math.log2(last_r / r))
            convs: list[nn.Module] = []
            for i in range(steps):
                convs.append(_conv_bn_relu(c if i == 0 else last_c, last_c, stride=2))
            self.align.append(nn.Sequential(*convs) if convs else _conv_bn_relu(c, last_c))
        self.fuse = _ResidualDown(last_c * len(channels), 2 * last_c)
        self.out_channels = 2 * last_c

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        aligned = [align(f) for align, f in zip(self.align, features[:-1], strict=True)] + [features[-1]]
        return self.fuse(torch.cat(aligned, dim=1))


class _UpBlock(nn.Module):
    """Upsample by ``factor`` (a power of two) with transposed convolutions, then refine; the output is linear."""

    def __init__(self, cin: int, cout: int, factor: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = cin
        for _ in range(round(math.log2(max(factor, 1)))):
            layers += [
                nn.ConvTranspose2d(c, cout, 2, stride=2, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            ]
            c = cout
        layers += [
            nn.Conv2d(c, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1),
        ]
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class ReverseDecoder(nn.Module):
    """Mirror of the encoder: from the embedding back up through each layer's width and stride."""

    def __init__(self, embed_channels: int, channels: Sequence[int], reductions: Sequence[int]) -> None:
        super().__init__()
        blocks = []
        c_in, r_in = embed_channels, 2 * reductions[-1]
        for c, r in zip(reversed(channels), reversed(reductions), strict=True):
            blocks.append(_UpBlock(c_in, c, r_in // r))
            c_in, r_in = c, r
        self.blocks = nn.ModuleList(blocks)

    def forward(self, embedding: torch.Tensor, sizes: Sequence[torch.Size]) -> list[torch.Tensor]:
        """Decoded features in encoder order, each resized to the encoder's map size (odd sizes round)."""
        out, x = [], embedding
        for block, size in zip(self.blocks, reversed(sizes), strict=True):
            x = block(x)
            if x.shape[-2:] != size:
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            out.append(x)
        return out[::-1]


def reverse_distillation_loss(encoder: Sequence[torch.Tensor], decoder: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum over layers of the mean ``1 - cos`` between each image's flattened encoder and decoder features."""
    total = torch.zeros((), device=encoder[0].device)
    for e, d in zip(encoder, decoder, strict=True):
        total = total + (1 - F.cosine_similarity(e.flatten(1), d.flatten(1), dim=1)).mean()
    return total


@register("reverse_distillation")
class ReverseDistillation(TrainedAnomalyModel):
    """Encoder → one-class bottleneck → decoder; anomalies are where the decoder cannot rebuild the encoder."""

    def __init__(
        self,
        backbone: str = "wide_resnet50_2",
        layers: Sequence[str] = ("layer1", "layer2", "layer3"),
        anomaly_map_mode: str = "add",
        pre_trained: bool = True,
        weights: str | None = None,
        lr: float = 0.005,
        beta1: float = 0.5,
        beta2: float = 0.99,
        max_epochs: int | None = 200,
        max_steps: int | None = None,
        seed: int | None = 0,
        image_size: tuple[int, int] | list[int] = (256, 256),
    ) -> None:
        super().__init__(image_size=image_size)
        try:
            self.anomaly_map_mode = AnomalyMapGenerationMode(str(getattr(anomaly_map_mode, "value", anomaly_map_mode)))
        except ValueError:
            allowed = [m.value for m in AnomalyMapGenerationMode]
            raise ValueError(f"anomaly_map_mode must be one of {allowed}, got {anomaly_map_mode!r}") from None
        layers = [layers] if isinstance(layers, str) else list(layers)
        self.backbone, self.layers = backbone, layers
        self.lr, self.betas = float(lr), (float(beta1), float(beta2))
        self.max_epochs, self.max_steps, self.seed = max_epochs, max_steps, seed
        self.encoder = TimmFeatureExtractor(backbone, layers, pre_trained=pre_trained, weights=weights)
        pairs = sorted(zip(self.encoder.reductions, self.encoder.out_channels, layers, strict=True))
        if [p[2] for p in pairs] != layers or len({p[0] for p in pairs}) != len(pairs):
            raise ValueError(
                f"layers must be listed from shallow to deep with distinct strides; {backbone} gives "
                f"{dict(zip(layers, self.encoder.reductions, strict=True))}"
            )
        channels, reductions = self.encoder.out_channels, self.encoder.reductions
        self.bottleneck = OneClassBottleneck(channels, reductions)
        self.decoder = ReverseDecoder(self.bottleneck.out_channels, channels, reductions)
        self.blur = GaussianBlur2d(sigma=4.0)

    @property
    def device(self) -> torch.device:
        return self.encoder.mean.device

    def _encoded(self, images: torch.Tensor) -> list[torch.Tensor]:
        with torch.no_grad():
            return list(self.encoder(images).values())

    def _features(
        self, images: torch.Tensor, encoded: list[torch.Tensor] | None = None
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Encoder and decoder maps per layer (``encoded``: the frozen encoder's maps of ``images``, if known)."""
        if encoded is None:
            encoded = self._encoded(images)
        decoded = self.decoder(self.bottleneck(encoded), [e.shape[-2:] for e in encoded])
        return encoded, decoded

    def configure_optimizers(self) -> Any:
        params = list(self.decoder.parameters()) + list(self.bottleneck.parameters())
        return torch.optim.Adam(params, lr=self.lr, betas=self.betas)

    def training_step(self, batch: torch.Tensor, step: int) -> torch.Tensor:
        # Only the encoder's maps are cached: the bottleneck and decoder train.
        return reverse_distillation_loss(*self._features(batch, self.frozen_features(batch, self._encoded)))

    @torch.no_grad()
    def validation_loss(self, batch: torch.Tensor) -> torch.Tensor:
        return reverse_distillation_loss(*self._features(batch))

    @torch.no_grad()
    def raw_forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw score [B] (max of the blurred map) and the combined ``1 - cos`` map [B, H, W]."""
        images = images.to(self.device)
        encoded, decoded = self._features(images)
        size = tuple(images.shape[-2:])
        amap: torch.Tensor | None = None
        for e, d in zip(encoded, decoded, strict=True):
            layer = F.interpolate((1 - F.cosine_similarity(e, d, dim=1)).unsqueeze(1), size=size, mode="bilinear")
            if amap is None:
                amap = layer
            elif self.anomaly_map_mode == AnomalyMapGenerationMode.ADD:
                amap = amap + layer
            else:
                amap = amap * layer
        assert amap is not None
        amap = self.blur(amap).squeeze(1)
        return amap.flatten(1).amax(1), amap
