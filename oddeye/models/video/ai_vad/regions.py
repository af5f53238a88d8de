"""Region extraction: where the objects are in the last frame of a clip.

Backends:

- ``maskrcnn``: torchvision Mask R-CNN detections, filtered by score, class, area and
  overlap, plus foreground regions that the detector missed (anomalib's AI-VAD);
- ``foreground``: only the moving regions, found by differencing the clip's first and last
  frames (no weights). Slow or still objects are missed, and a moving object leaves a
  "ghost" region where it was;
- ``background``: objects as what differs from the scene's background, the per-pixel
  median of the training frames (no weights). For a fixed camera whose fit data shows the
  same scene: it finds whole objects, moving or still, and no ghosts.

Regions come back per image as boxes [N, 5]: x1, y1, x2, y2, confidence.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from torchvision.ops import box_area, box_iou
from torchvision.transforms.functional import gaussian_blur

from oddeye.models.components.buffers import DynamicBufferMixin
from oddeye.models.components.motion import frame_difference, mask_to_boxes
from oddeye.models.video.ai_vad.weights import build_torchvision

__all__ = ["REGION_BACKENDS", "RegionExtractor", "filter_overlapping", "foreground_boxes"]

log = logging.getLogger(__name__)

REGION_BACKENDS = ("maskrcnn", "foreground", "background")
_PERSON = 1  # COCO label of "person" in torchvision's detectors


class RegionExtractor(DynamicBufferMixin):
    """Boxes [N, 5] per clip for a batch of first and last frames [B, 3, H, W] in [0, 1]."""

    def __init__(
        self,
        backend: str = "maskrcnn",
        box_score_thresh: float = 0.8,
        persons_only: bool = False,
        min_bbox_area: int = 100,
        max_bbox_overlap: float = 0.65,
        enable_foreground_detections: bool = True,
        foreground_kernel_size: int = 3,
        foreground_binary_threshold: int = 18,
        pre_trained: bool = True,
        weights: str | None = None,
        detector_size: int | None = None,
    ) -> None:
        super().__init__()
        if backend not in REGION_BACKENDS:
            raise ValueError(f"unknown region backend {backend!r}; available: {list(REGION_BACKENDS)}")
        if foreground_kernel_size < 1 or foreground_kernel_size % 2 == 0:
            raise ValueError(f"foreground_kernel_size must be a positive odd number, got {foreground_kernel_size}")
        self.backend = backend
        self.persons_only = persons_only
        self.min_bbox_area = int(min_bbox_area)
        self.max_bbox_overlap = float(max_bbox_overlap)
        self.enable_foreground_detections = enable_foreground_detections or backend == "foreground"
        self.foreground_kernel_size = int(foreground_kernel_size)
        self.foreground_binary_threshold = float(foreground_binary_threshold)
        self.detector: nn.Module | None = None
        # The scene's background [3, H, W] (``background`` backend; learned by ``fit_background``).
        self.register_buffer("background", torch.empty(0))
        if backend == "maskrcnn":
            from torchvision.models.detection import MaskRCNN_ResNet50_FPN_V2_Weights, maskrcnn_resnet50_fpn_v2

            size = {} if detector_size is None else {"min_size": detector_size, "max_size": detector_size * 5 // 3}
            self.detector = build_torchvision(
                maskrcnn_resnet50_fpn_v2,
                MaskRCNN_ResNet50_FPN_V2_Weights.DEFAULT,
                "regions",
                pre_trained,
                weights,
                random_kwargs={"weights_backbone": None},
                box_score_thresh=box_score_thresh,
                **size,
            )

    def train(self, mode: bool = True) -> RegionExtractor:
        """The detector is frozen: it stays in eval mode."""
        super().train(mode)
        if self.detector is not None:
            self.detector.eval()
        return self

    @torch.no_grad()
    def forward(self, first_frame: torch.Tensor, last_frame: torch.Tensor) -> list[torch.Tensor]:
        b = last_frame.shape[0]
        if self.detector is not None:
            boxes = [self._post_process(d) for d in self.detector(list(last_frame))]
        elif self.backend == "background":
            boxes = self._background_boxes(last_frame)
        else:
            boxes = [last_frame.new_zeros(0, 5) for _ in range(b)]
        if self.enable_foreground_detections:
            fg = foreground_boxes(
                first_frame, last_frame, boxes, self.foreground_kernel_size, self.foreground_binary_threshold
            )
            boxes = [torch.cat([d, f[_area(f) >= self.min_bbox_area].to(d)]) for d, f in zip(boxes, fg, strict=True)]
        return boxes

    @property
    def needs_background(self) -> bool:
        return self.backend == "background"

    @torch.no_grad()
    def fit_background(self, frames: torch.Tensor) -> None:
        """Learn the scene's background from frames [N, 3, H, W]: their per-pixel median."""
        if frames.shape[0] == 0:
            raise ValueError("fit_background needs at least one frame")
        self.background = frames.float().median(dim=0).values.to(self.background.device)

    def _background_boxes(self, frames: torch.Tensor) -> list[torch.Tensor]:
        if self.background.numel() == 0:
            raise RuntimeError("the background region backend has not been fitted (fit_background)")
        if tuple(self.background.shape[-2:]) != tuple(frames.shape[-2:]):
            raise ValueError(
                f"frames of size {tuple(frames.shape[-2:])}; "
                f"the background was learned at {tuple(self.background.shape[-2:])}"
            )
        k = self.foreground_kernel_size
        blurred = gaussian_blur(frames, [k, k]) if k > 1 else frames
        background = gaussian_blur(self.background[None], [k, k]) if k > 1 else self.background[None]
        # Any channel: a figure may match the background's brightness but not its colour.
        diff = (blurred - background).abs().amax(1) * 255.0
        out = []
        for mask in diff > self.foreground_binary_threshold:
            found = mask_to_boxes(mask)
            found[:, 4] = 1.0
            found = found[_area(found) >= self.min_bbox_area].to(frames.device)
            out.append(found[filter_overlapping(found, _area(found), self.max_bbox_overlap)])
        return out

    def _post_process(self, det: dict[str, torch.Tensor]) -> torch.Tensor:
        """Detections → boxes [N, 5], filtered by class, area and overlap (sorted by score)."""
        boxes, scores, labels = det["boxes"], det["scores"], det["labels"]
        keep = _area(boxes) >= self.min_bbox_area
        if self.persons_only:
            keep &= labels == _PERSON
        boxes, scores = boxes[keep], scores[keep]
        keep = filter_overlapping(boxes, scores, self.max_bbox_overlap)
        return torch.cat([boxes[keep], scores[keep, None]], 1)


def _area(boxes: torch.Tensor) -> torch.Tensor:
    return box_area(boxes[:, :4]) if boxes.numel() else boxes.new_zeros(0)


def filter_overlapping(boxes: torch.Tensor, scores: torch.Tensor, max_overlap: float) -> torch.Tensor:
    """Indices of boxes to keep: greedily by score, dropping a box whose IoU with a kept one exceeds ``max_overlap``."""
    order = scores.argsort(descending=True)
    if order.numel() < 2:
        return order
    iou = box_iou(boxes[order, :4], boxes[order, :4])
    kept: list[int] = []
    for i in range(order.numel()):
        if not kept or bool(iou[i, kept].max() <= max_overlap):
            kept.append(i)
    return order[kept]


@torch.no_grad()
def foreground_boxes(
    first_frame: torch.Tensor,
    last_frame: torch.Tensor,
    known: list[torch.Tensor],
    kernel_size: int = 3,
    binary_threshold: float = 18,
) -> list[torch.Tensor]:
    """Moving regions not covered by ``known`` boxes: blurred luma difference > threshold, as boxes [N, 5].

    The fifth column of a foreground box is 1.0 (it is not a detector confidence).
    """
    if kernel_size > 1:
        first_frame = gaussian_blur(first_frame, [kernel_size, kernel_size])
        last_frame = gaussian_blur(last_frame, [kernel_size, kernel_size])
    moving = frame_difference(first_frame, last_frame) > binary_threshold
    h, w = moving.shape[-2:]
    out = []
    for mask, boxes in zip(moving, known, strict=True):
        for x1, y1, x2, y2 in boxes[:, :4].round().long().tolist():
            mask[max(y1, 0) : min(y2, h), max(x1, 0) : min(x2, w)] = False
        found = mask_to_boxes(mask)
        found[:, 4] = 1.0
        out.append(found.to(last_frame.device))
    return out
