"""STFPM: a student network learns to reproduce a frozen teacher's feature pyramid (Wang et al., 2021).

https://arxiv.org/abs/2103.04257 — parameter names and training defaults follow anomalib's ``Stfpm``
(SGD, lr 0.4, momentum 0.9, weight decay 1e-3). The student has the teacher's architecture with
random weights; where it fails to match the teacher, the image is unlike the training set.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch.nn import functional as F  # noqa: N812

from oddeye.models.base import register
from oddeye.models.components import TimmFeatureExtractor
from oddeye.models.training import TrainedAnomalyModel

__all__ = ["Stfpm", "stfpm_layer_maps", "stfpm_loss"]

log = logging.getLogger(__name__)


def stfpm_loss(teacher: dict[str, torch.Tensor], student: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum over layers of ``1/(2hw) * ||t̂ - ŝ||²`` with features normalised along channels (paper eq. 1)."""
    total = torch.zeros((), device=next(iter(teacher.values())).device)
    for layer, t in teacher.items():
        s = student[layer]
        h, w = t.shape[-2:]
        total = total + 0.5 / (h * w) * (F.normalize(t, dim=1) - F.normalize(s, dim=1)).pow(2).sum()
    return total


def stfpm_layer_maps(
    teacher: dict[str, torch.Tensor], student: dict[str, torch.Tensor], size: tuple[int, int]
) -> list[torch.Tensor]:
    """Per-layer anomaly maps ``½||t̂ - ŝ||²`` [B, 1, H, W], upsampled to ``size``."""
    maps = []
    for layer, t in teacher.items():
        d = 0.5 * (F.normalize(t, dim=1) - F.normalize(student[layer], dim=1)).pow(2).sum(1, keepdim=True)
        maps.append(F.interpolate(d, size=size, mode="bilinear", align_corners=False))
    return maps


@register("stfpm")
class Stfpm(TrainedAnomalyModel):
    """Student-teacher feature pyramid matching; the anomaly map is the product of the layer maps."""

    def __init__(
        self,
        backbone: str = "resnet18",
        layers: Sequence[str] = ("layer1", "layer2", "layer3"),
        pre_trained: bool = True,
        weights: str | None = None,
        lr: float = 0.4,
        momentum: float = 0.9,
        weight_decay: float = 0.001,
        max_epochs: int | None = 100,
        max_steps: int | None = None,
        seed: int | None = 0,
        image_size: tuple[int, int] | list[int] = (256, 256),
    ) -> None:
        super().__init__(image_size=image_size)
        layers = [layers] if isinstance(layers, str) else list(layers)
        self.backbone = backbone
        self.layers = layers
        self.lr, self.momentum, self.weight_decay = float(lr), float(momentum), float(weight_decay)
        self.max_epochs, self.max_steps, self.seed = max_epochs, max_steps, seed
        self.teacher = TimmFeatureExtractor(backbone, layers, pre_trained=pre_trained, weights=weights)
        self.student = TimmFeatureExtractor(backbone, layers, pre_trained=False, requires_grad=True)

    @property
    def device(self) -> torch.device:
        return self.teacher.mean.device

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(
            self.student.parameters(),
            lr=self.lr,
            momentum=self.momentum,
            dampening=0.0,
            weight_decay=self.weight_decay,
        )

    def training_step(self, batch: torch.Tensor, step: int) -> torch.Tensor:
        teacher = self.frozen_features(batch, self.teacher)  # only the teacher: the student trains
        return stfpm_loss(teacher, self.student(batch))

    @torch.no_grad()
    def validation_loss(self, batch: torch.Tensor) -> torch.Tensor:
        return stfpm_loss(self.teacher(batch), self.student(batch)) / batch.shape[0]

    @torch.no_grad()
    def raw_forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw score [B] (max of the map) and the product of the layer maps [B, H, W]."""
        images = images.to(self.device)
        maps = stfpm_layer_maps(self.teacher(images), self.student(images), tuple(images.shape[-2:]))
        amap = torch.stack(maps).prod(0).squeeze(1)
        return amap.flatten(1).amax(1), amap
