"""A weight-free video baseline: per-pixel motion statistics of normal footage.

From normal clips it learns, for every pixel, the mean and spread of the (blurred)
frame-to-frame luma difference. A frame scores by how far its motion exceeds what that
place normally sees: a figure running where people walk, movement in a static area, a
sudden change. Regions above the alert level come back as boxes. Cheap on a CPU, and
the live test vehicle for clip handling; AI-VAD is the model that explains objects.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from oddeye.models.base import VideoAnomalyModel, register
from oddeye.models.components.blur import GaussianBlur2d
from oddeye.models.components.motion import frame_difference, mask_to_boxes
from oddeye.progress import progress_bar


@register("frame_diff")
class FrameDiff(VideoAnomalyModel):
    """Motion anomalies from per-pixel frame-difference statistics (no weights needed)."""

    def __init__(
        self,
        image_size: tuple[int, int] | list[int] = (256, 256),
        clip_length: int = 2,
        sigma: float = 4.0,
        min_std: float = 2.0,
        min_region_area: int = 16,
        box_fraction: float = 0.5,
    ) -> None:
        super().__init__(image_size, clip_length)
        self.box_fraction = float(box_fraction)
        self.min_std = float(min_std)
        self.min_region_area = int(min_region_area)
        self.blur = GaussianBlur2d(sigma)
        h, w = self.image_size
        self.register_buffer("mean", torch.zeros(h, w))
        self.register_buffer("std", torch.ones(h, w))

    def _motion(self, clips: torch.Tensor) -> torch.Tensor:
        """Blurred luma difference between the last two frames of each clip: [B, H, W]."""
        d = frame_difference(clips[:, -2], clips[:, -1])
        return self.blur(d.unsqueeze(1)).squeeze(1)

    @torch.no_grad()
    def _fit_normal(self, batches: Iterator[torch.Tensor], progress: bool) -> None:
        total = total_sq = None
        n = 0
        for clips in progress_bar(batches, desc="frame_diff: motion statistics", unit="batch", disable=not progress):
            m = self._motion(clips).double()
            total = m.sum(0) if total is None else total + m.sum(0)
            total_sq = (m * m).sum(0) if total_sq is None else total_sq + (m * m).sum(0)
            n += m.shape[0]
        if n == 0:
            return
        mean = total / n
        var = (total_sq / n - mean * mean).clamp_min(0)
        self.mean.copy_(mean.float())
        self.std.copy_(var.sqrt().float())

    @torch.no_grad()
    def raw_forward(self, clips: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        z = (self._motion(clips) - self.mean) / self.std.clamp_min(self.min_std)
        score = z.flatten(1).amax(1)
        # A region's extent: motion above ``box_fraction`` of the level where the normalised
        # score crosses 0.5 (before fitting: no regions).
        level = self.box_fraction * float(self.normalizer.threshold) if self.fitted else float("inf")
        boxes = [mask_to_boxes(zi > level, self.min_region_area, zi) for zi in z]
        return score, z, boxes
