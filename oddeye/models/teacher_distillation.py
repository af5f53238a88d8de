"""Distil an EfficientAd PDN teacher from any backbone oddeye can load, on any folder of natural images.

The paper distils WideResNet-101 features on ImageNet. Here the target is the PatchCore-style
descriptor of any timm backbone: each chosen layer averaged over 3×3 neighbourhoods, resized to
the shallowest layer, concatenated, averaged down to ``teacher_out_channels`` channels, resized to
the PDN's output grid and normalised per channel. The backbone sees the image at ``backbone_scale``
times the PDN's resolution (the paper: 512 px for a 256 px PDN). The PDN is fully convolutional,
so a teacher distilled on small crops serves any image size.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F  # noqa: N812

from oddeye.models.components.feature_extractor import TimmFeatureExtractor
from oddeye.models.components.natural_images import NaturalImages
from oddeye.models.components.pdn import PDN, pdn_out_size
from oddeye.progress import progress_bar

__all__ = ["DEFAULT_LAYERS", "DistillResult", "TeacherTarget", "distill_teacher"]

log = logging.getLogger(__name__)

# Layers whose concatenation gives at least 384 channels, for the backbones used most here.
DEFAULT_LAYERS = {
    "efficientnet_lite0": ["blocks.2", "blocks.4", "blocks.6"],  # strides 8, 16, 32: 40+112+320 = 472
    "resnet18": ["layer2", "layer3"],  # 128+256 = 384
    "wide_resnet50_2": ["layer2", "layer3"],
    "wide_resnet101_2": ["layer2", "layer3"],  # the paper's teacher source
}


class TeacherTarget(torch.nn.Module):
    """A backbone's PatchCore-style descriptors on the PDN's output grid, ``out_channels`` wide."""

    def __init__(self, extractor: TimmFeatureExtractor, out_channels: int, backbone_scale: float = 2.0) -> None:
        super().__init__()
        total = sum(extractor.out_channels)
        if total < out_channels:
            raise ValueError(
                f"backbone layers {extractor.layers} give {total} channels, fewer than teacher_out_channels="
                f"{out_channels}; add deeper layers (e.g. --layers ...) or lower --teacher-out-channels"
            )
        self.extractor = extractor
        self.out_channels = out_channels
        self.backbone_scale = backbone_scale

    @torch.no_grad()
    def forward(self, images: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        if self.backbone_scale != 1.0:
            images = F.interpolate(images, scale_factor=self.backbone_scale, mode="bilinear", align_corners=False)
        maps = list(self.extractor(images).values())
        size = maps[0].shape[-2:]
        parts = []
        for m in maps:
            m = F.avg_pool2d(m, 3, stride=1, padding=1)
            parts.append(m if m.shape[-2:] == size else F.interpolate(m, size=size, mode="bilinear"))
        feats = torch.cat(parts, 1)
        b, c, h, w = feats.shape
        reduced = F.adaptive_avg_pool1d(feats.permute(0, 2, 3, 1).reshape(-1, 1, c), self.out_channels)
        reduced = reduced.view(b, h, w, self.out_channels).permute(0, 3, 1, 2)
        return F.interpolate(reduced, size=grid, mode="bilinear", align_corners=False)


@dataclass
class DistillResult:
    teacher: PDN
    steps: int
    first_loss: float
    last_loss: float


def distill_teacher(
    target: TeacherTarget,
    images: NaturalImages,
    model_size: str = "small",
    crop_size: int = 128,
    steps: int = 1000,
    batch_size: int = 8,
    lr: float = 1e-4,
    weight_decay: float = 1e-5,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
    norm_batches: int = 8,
) -> DistillResult:
    """Train a PDN to reproduce ``target`` on random crops of ``images`` (Adam, MSE, as in the paper)."""
    if steps < 1 or batch_size < 1:
        raise ValueError("steps and batch_size must be at least 1")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    device = torch.device(device)
    teacher = PDN(target.out_channels, model_size, padding=False).to(device)
    target = target.to(device).eval()
    side = pdn_out_size(crop_size, padding=False)
    if side < 1:
        raise ValueError(f"crop_size {crop_size} is too small for a PDN (needs at least 36 pixels)")
    grid = (side, side)

    def batch() -> torch.Tensor:
        x = images.sample(batch_size, (crop_size, crop_size), rng, grayscale_p=0.1)
        flip = torch.from_numpy(rng.random(batch_size) < 0.5)
        x[flip] = x[flip].flip(-1)
        return x.to(device)

    # Channel statistics of the target over a few batches, so every channel counts equally in the loss.
    with torch.no_grad():
        stats = torch.cat([target(batch(), grid).transpose(0, 1).flatten(1) for _ in range(norm_batches)], 1)
        mean = stats.mean(1).view(1, -1, 1, 1)
        std = stats.std(1).clamp_min(1e-6).view(1, -1, 1, 1)

    opt = torch.optim.Adam(teacher.parameters(), lr=lr, weight_decay=weight_decay)
    first = last = float("nan")
    bar = progress_bar(total=steps, desc="distill-teacher", unit="step", disable=not progress)
    try:
        for step in range(steps):
            x = batch()
            y = (target(x, grid) - mean) / std
            loss = F.mse_loss(teacher(x), y)
            if not torch.isfinite(loss):
                raise RuntimeError(f"distill-teacher: loss became {float(loss)} at step {step}; try a lower --lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            last = float(loss.detach())
            if step == 0:
                first = last
            bar.update(1)
            bar.set_postfix({"loss": last}, refresh=False)
    finally:
        bar.close()
    teacher.eval()
    log.info("distill-teacher: %d steps, loss %.4g -> %.4g", steps, first, last)
    return DistillResult(teacher.cpu(), steps, first, last)


def default_layers(backbone: str) -> Sequence[str] | None:
    return DEFAULT_LAYERS.get(backbone)
