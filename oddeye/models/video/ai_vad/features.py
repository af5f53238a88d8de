"""Per-region attributes: velocity (optical-flow histogram), pose (keypoints) and appearance.

- velocity: the flow magnitude in each of ``n_velocity_bins`` direction bins, summed and
  divided by the region's pixel count — how fast, which way and how much of the object moves;
- pose: Keypoint R-CNN's 17 body keypoints for the region's box, relative to the box;
- deep (appearance): an embedding of the region's crop, CLIP's image tower by default or any
  timm backbone; or ``color_histogram``, a weight-free joint RGB histogram of the crop.
"""

from __future__ import annotations

import logging
import math
from enum import Enum

import timm
import torch
from torch import nn
from torchvision.ops import roi_align

from oddeye.models.components.feature_extractor import _env_offline, _hub_offline, _hub_reachable
from oddeye.models.video.ai_vad.weights import build_torchvision, load_local, weights_error

__all__ = [
    "ColorHistogramExtractor",
    "DeepExtractor",
    "FeatureType",
    "PoseExtractor",
    "VelocityExtractor",
    "box_tensor",
]

log = logging.getLogger(__name__)

CLIP_BACKBONE = "vit_base_patch16_clip_224.openai"
N_KEYPOINTS = 17


class FeatureType(str, Enum):
    """The attribute streams of AI-VAD."""

    VELOCITY = "velocity"
    POSE = "pose"
    DEEP = "deep"


def box_tensor(boxes: list[torch.Tensor]) -> torch.Tensor:
    """Per-image boxes [N_i, >=4] → one [M, 5] tensor of (image index, x1, y1, x2, y2)."""
    rows = [torch.cat([b.new_full((b.shape[0], 1), i), b[:, :4]], 1) for i, b in enumerate(boxes)]
    return torch.cat(rows) if rows else torch.zeros(0, 5)


class VelocityExtractor(nn.Module):
    """Magnitude-weighted histogram of flow directions inside each box, per box pixel: [M, n_bins].

    Bin ``k`` holds directions around ``-pi + 2 pi k / n_bins`` (image coordinates, y down); its
    value is the sum of the flow magnitudes pointing that way divided by the box's pixel count, as
    in the authors' code (the box mean of each orientation's magnitude). anomalib divides by the
    pixels *in the bin* instead, so a bin that a few noisy pixels fall into reads as fast as a
    whole moving body: the GMM then sees near-empty bins at full speed, or exactly 0, and its
    likelihood swings by orders of magnitude on flow noise.
    """

    def __init__(self, n_bins: int = 8) -> None:
        super().__init__()
        if n_bins < 1:
            raise ValueError(f"n_velocity_bins must be positive, got {n_bins}")
        self.n_bins = int(n_bins)

    def forward(self, flows: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """``flows`` [B, 2, H, W]; ``boxes`` [M, 5] (image index, x1, y1, x2, y2) in pixels."""
        h, w = flows.shape[-2:]
        out = flows.new_zeros(boxes.shape[0], self.n_bins)
        for m, (i, x1, y1, x2, y2) in enumerate(boxes.tolist()):
            x1, y1 = min(max(int(x1), 0), w - 1), min(max(int(y1), 0), h - 1)
            x2, y2 = max(min(math.ceil(x2), w), x1 + 1), max(min(math.ceil(y2), h), y1 + 1)
            crop = flows[int(i), :, y1:y2, x1:x2].reshape(2, -1)
            magnitude = crop.norm(dim=0)
            angle = torch.atan2(crop[1], crop[0])  # (-pi, pi]
            # Bins centred on the directions (bin 0 = leftwards, n/2 = rightwards), so that motion
            # along an axis does not straddle two bins.
            bins = ((angle + math.pi) / (2 * math.pi) * self.n_bins + 0.5).floor().long() % self.n_bins
            out[m] = flows.new_zeros(self.n_bins).index_add_(0, bins, magnitude) / magnitude.numel()
        return out


class PoseExtractor(nn.Module):
    """Keypoint R-CNN body keypoints for given boxes, relative to each box: [M, 34]."""

    def __init__(self, pre_trained: bool = True, weights: str | None = None, detector_size: int | None = None) -> None:
        super().__init__()
        from torchvision.models.detection import KeypointRCNN_ResNet50_FPN_Weights, keypointrcnn_resnet50_fpn

        size = {} if detector_size is None else {"min_size": detector_size, "max_size": detector_size * 5 // 3}
        model = build_torchvision(
            keypointrcnn_resnet50_fpn,
            KeypointRCNN_ResNet50_FPN_Weights.DEFAULT,
            "pose",
            pre_trained,
            weights,
            random_kwargs={"weights_backbone": None},
            **size,
        )
        # Only what scoring given boxes needs: no proposals, no box head.
        self.transform = model.transform
        self.backbone = model.backbone
        self.keypoint_roi_pool = model.roi_heads.keypoint_roi_pool
        self.keypoint_head = model.roi_heads.keypoint_head
        self.keypoint_predictor = model.roi_heads.keypoint_predictor
        self.eval().requires_grad_(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, boxes: list[torch.Tensor]) -> torch.Tensor:
        from torchvision.models.detection.roi_heads import keypointrcnn_inference
        from torchvision.models.detection.transform import resize_boxes

        n = sum(b.shape[0] for b in boxes)
        if n == 0:
            return images.new_zeros(0, 2 * N_KEYPOINTS)
        resized, _ = self.transform(list(images))
        features = self.backbone(resized.tensors)
        size = tuple(images.shape[-2:])
        proposals = [resize_boxes(b[:, :4].float(), size, s) for b, s in zip(boxes, resized.image_sizes, strict=True)]
        x = self.keypoint_head(self.keypoint_roi_pool(features, proposals, resized.image_sizes))
        keypoints, _ = keypointrcnn_inference(self.keypoint_predictor(x), proposals)
        kp = torch.cat(keypoints)[..., :2]  # [M, 17, 2] in resized pixels
        box = torch.cat(proposals)
        rel = (kp - box[:, None, :2]) / (box[:, None, 2:] - box[:, None, :2]).clamp_min(1e-3)
        return rel.flatten(1)

    def train(self, mode: bool = True) -> PoseExtractor:
        return super().train(False)


class DeepExtractor(nn.Module):
    """An appearance embedding of each region's crop from a timm network: [M, D].

    ``backbone="clip"`` is CLIP ViT-B/16's image tower with its projection (512-d, as in
    the paper); any other timm name gives that network's pooled features.
    """

    def __init__(self, backbone: str = "clip", pre_trained: bool = True, weights: str | None = None) -> None:
        super().__init__()
        name = CLIP_BACKBONE if backbone == "clip" else backbone
        if not timm.is_model(name):
            raise ValueError(f"unknown deep backbone {backbone!r}: use 'clip' or a name from timm.list_models()")
        kwargs = {} if backbone == "clip" else {"num_classes": 0}
        if weights is not None or not pre_trained:
            self.model = timm.create_model(name, pretrained=False, **kwargs)
            if weights is not None:
                load_local(self.model, weights, "deep")
        else:
            self.model = _timm_pretrained(name, **kwargs)
        cfg = self.model.pretrained_cfg
        self.input_size = tuple(int(s) for s in cfg.get("input_size", (3, 224, 224))[1:])
        mean, std = cfg.get("mean", (0.485, 0.456, 0.406)), cfg.get("std", (0.229, 0.224, 0.225))
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.eval().requires_grad_(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """``images`` [B, 3, H, W]; ``boxes`` [M, 5] (image index, x1, y1, x2, y2)."""
        if boxes.shape[0] == 0:
            return images.new_zeros(
                0, self.model.num_features if self.model.num_classes == 0 else self.model.num_classes
            )
        crops = roi_align(images, boxes.to(images), self.input_size, aligned=True)
        return self.model((crops - self.mean) / self.std).float()

    def train(self, mode: bool = True) -> DeepExtractor:
        return super().train(False)


def _timm_pretrained(name: str, **kwargs: object) -> nn.Module:
    """timm's usual pretrained loading; an unreachable hub falls back to the cache, then fails clearly."""
    try:
        if _env_offline() or not _hub_reachable():
            with _hub_offline():
                return timm.create_model(name, pretrained=True, **kwargs)
        return timm.create_model(name, pretrained=True, **kwargs)
    except Exception as e:
        raise weights_error("deep", name, str(e).splitlines()[0] if str(e) else type(e).__name__) from e


class ColorHistogramExtractor(nn.Module):
    """A weight-free appearance feature: the crop's joint RGB histogram (``bins``³, square-rooted): [M, bins³]."""

    def __init__(self, bins: int = 4) -> None:
        super().__init__()
        self.bins = int(bins)

    def forward(self, images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        h, w = images.shape[-2:]
        q = (images * self.bins).long().clamp_(0, self.bins - 1)
        codes = (q[:, 0] * self.bins + q[:, 1]) * self.bins + q[:, 2]  # [B, H, W]
        out = images.new_zeros(boxes.shape[0], self.bins**3)
        for m, (i, x1, y1, x2, y2) in enumerate(boxes.tolist()):
            x1, y1 = min(max(int(x1), 0), w - 1), min(max(int(y1), 0), h - 1)
            x2, y2 = max(min(math.ceil(x2), w), x1 + 1), max(min(math.ceil(y2), h), y1 + 1)
            hist = torch.bincount(codes[int(i), y1:y2, x1:x2].flatten(), minlength=self.bins**3).to(images.dtype)
            out[m] = (hist / hist.sum()).sqrt()
        return out
