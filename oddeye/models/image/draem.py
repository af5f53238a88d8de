"""DRAEM: a reconstructive and a discriminative network trained on synthesised defects (Zavrtanik et al., 2021).

https://arxiv.org/abs/2108.07610 — parameter names follow anomalib's ``Draem``. The
reconstructive network learns to turn an image with a pasted defect back into the normal
image; the discriminative network sees the image beside its reconstruction and segments
the defect. At inference the segmentation is the anomaly map, and the image score is the
maximum of its 21×21 local mean (as in the paper; the window scales with the image).

Defects come from ``anomaly_source_path`` (e.g. DTD) or, with none, from the built-in
procedural textures (``oddeye.models.components.synthesis``).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.functional import mse_loss

from oddeye.models.base import register
from oddeye.models.components.losses import focal_loss, ssim_loss
from oddeye.models.components.scoring import local_mean_max
from oddeye.models.components.sspcab import SSPCAB
from oddeye.models.components.synthesis import AnomalySynthesizer
from oddeye.models.training import TrainedAnomalyModel

__all__ = ["DiscriminativeSubNetwork", "Draem", "ReconstructiveSubNetwork"]

log = logging.getLogger(__name__)

# The discriminative network halves the resolution five times.
DOWNSAMPLING = 32


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


def _up(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
        nn.Conv2d(cin, cout, 3, padding=1),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class ReconstructiveSubNetwork(nn.Module):
    """Encoder-decoder (4 poolings, no skips) that repaints defects as normal surface; optional SSPCAB at the bottom."""

    def __init__(self, base_width: int = 128, sspcab: bool = False) -> None:
        super().__init__()
        w = base_width
        widths = [w, 2 * w, 4 * w, 8 * w]
        self.encoder = nn.ModuleList([_block(3, widths[0])] + [_block(a, b) for a, b in itertools.pairwise(widths)])
        self.bottom = SSPCAB(8 * w) if sspcab else _block(8 * w, 8 * w)
        self.sspcab = sspcab
        self.decoder = nn.ModuleList(
            [
                nn.Sequential(_up(8 * w, 8 * w), _block(8 * w, 4 * w)),
                nn.Sequential(_up(4 * w, 4 * w), _block(4 * w, 2 * w)),
                nn.Sequential(_up(2 * w, 2 * w), _block(2 * w, w)),
                nn.Sequential(_up(w, w), _block(w, w)),
            ]
        )
        self.out = nn.Conv2d(w, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Reconstruction [B, 3, H, W] and, with SSPCAB, its self-reconstruction error (else None)."""
        for i, block in enumerate(self.encoder):
            x = block(x if i == 0 else nn.functional.max_pool2d(x, 2))
        x = nn.functional.max_pool2d(x, 2)
        bottom = self.bottom(x)
        sspcab_error = mse_loss(bottom, x) if self.sspcab else None
        x = bottom
        for block in self.decoder:
            x = block(x)
        return self.out(x), sspcab_error


class DiscriminativeSubNetwork(nn.Module):
    """U-Net on [image, reconstruction] (6 channels) → 2-class logits (normal, anomalous) per pixel."""

    def __init__(self, base_width: int = 64) -> None:
        super().__init__()
        w = base_width
        widths = [w, 2 * w, 4 * w, 8 * w, 8 * w, 8 * w]
        self.encoder = nn.ModuleList([_block(6, widths[0])] + [_block(a, b) for a, b in itertools.pairwise(widths)])
        ups, blocks = nn.ModuleList(), nn.ModuleList()
        for i in range(5, 0, -1):
            ups.append(_up(widths[i], widths[i - 1]))
            blocks.append(_block(2 * widths[i - 1], widths[i - 1]))
        self.ups, self.blocks = ups, blocks
        self.out = nn.Conv2d(w, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.encoder):
            x = block(x if i == 0 else nn.functional.max_pool2d(x, 2))
            skips.append(x)
        for up, block, skip in zip(self.ups, self.blocks, reversed(skips[:-1]), strict=True):
            x = block(torch.cat([up(x), skip], dim=1))
        return self.out(x)


@register("draem")
class Draem(TrainedAnomalyModel):
    """DRAEM: reconstruct, then segment the difference; trained on Perlin-masked texture defects."""

    def __init__(
        self,
        enable_sspcab: bool = False,
        sspcab_lambda: float = 0.1,
        anomaly_source_path: str | None = None,
        beta: float | Sequence[float] = (0.1, 1.0),
        learning_rate: float = 1e-4,
        base_width: int = 128,
        disc_base_width: int = 64,
        max_epochs: int | None = 700,
        max_steps: int | None = None,
        seed: int | None = 0,
        image_size: tuple[int, int] | list[int] = (256, 256),
    ) -> None:
        """``base_width``/``disc_base_width``: channel widths of the two sub-networks (the paper's 128 and 64;
        smaller ones make CPU training practical). ``max_epochs``: anomalib trains 700 epochs with the learning
        rate divided by 10 at 80% and 90% of them (here at 80% and 90% of ``max_epochs``)."""
        super().__init__(image_size=image_size)
        if any(s % DOWNSAMPLING for s in self.image_size):
            fit = [max(DOWNSAMPLING, s // DOWNSAMPLING * DOWNSAMPLING) for s in self.image_size]
            raise ValueError(
                f"draem: image_size {list(self.image_size)} must be divisible by {DOWNSAMPLING} "
                f"(the discriminative network halves it five times), e.g. {fit}"
            )
        if sspcab_lambda < 0:
            raise ValueError(f"draem: sspcab_lambda must be >= 0, got {sspcab_lambda}")
        self.enable_sspcab = bool(enable_sspcab)
        self.sspcab_lambda = float(sspcab_lambda)
        self.learning_rate = float(learning_rate)
        self.max_epochs, self.max_steps, self.seed = max_epochs, max_steps, seed
        self.reconstructive = ReconstructiveSubNetwork(base_width, sspcab=self.enable_sspcab)
        self.discriminative = DiscriminativeSubNetwork(disc_base_width)
        self.anomaly_source_path = anomaly_source_path
        self.beta = beta
        # Built when training starts: a loaded checkpoint never needs the texture folder.
        self.synthesizer: AnomalySynthesizer | None = None

    # -- training
    def configure_optimizers(self) -> Any:
        opt = torch.optim.Adam(self.parameters(), lr=self.learning_rate)
        if not self.max_epochs:
            return opt
        milestones = [int(self.max_epochs * 0.8), int(self.max_epochs * 0.9)]
        return [opt], [torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)]

    def on_train_start(self, batches: Iterable[torch.Tensor]) -> None:
        self.synthesizer = AnomalySynthesizer(
            self.anomaly_source_path, style="draem", beta=self.beta, seed=self.seed or 0, owner="draem"
        )

    def on_train_end(self, batches: Iterable[torch.Tensor]) -> None:
        self.synthesizer = None

    def training_step(self, batch: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        assert self.synthesizer is not None, "training_step runs inside Trainer.fit"
        augmented, mask = self.synthesizer(batch)
        reconstruction, sspcab_error = self.reconstructive(augmented)
        logits = self.discriminative(torch.cat([augmented, reconstruction], dim=1))
        prob = torch.softmax(logits, dim=1)[:, 1:2]
        l2 = mse_loss(reconstruction, batch)
        ssim = ssim_loss(reconstruction, batch)
        focal = focal_loss(prob, mask)
        loss = l2 + 2 * ssim + focal
        out = {"loss": loss, "l2": l2, "ssim": ssim, "focal": focal}
        if sspcab_error is not None:
            out["loss"] = loss + self.sspcab_lambda * sspcab_error
            out["sspcab"] = sspcab_error
        return out

    # -- scoring
    @torch.no_grad()
    def raw_forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images = images.to(self.discriminative.out.weight.device)
        reconstruction, _ = self.reconstructive(images)
        logits = self.discriminative(torch.cat([images, reconstruction], dim=1))
        amap = torch.softmax(logits, dim=1)[:, 1]
        return local_mean_max(amap), amap
