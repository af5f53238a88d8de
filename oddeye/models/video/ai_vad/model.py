"""AI-VAD: attribute-based video anomaly detection (Reiss & Hoshen, arXiv:2212.00789).

For the last frame of every clip: find the object regions, describe each by its
velocity (optical-flow histogram), pose (body keypoints) and appearance (deep or colour
features), and score it by how unlike the training regions it is (GMM for velocity,
k-NN for pose and appearance, each min/max-normalised, summed). A frame scores as its
most unusual region, so every alert says which object in which frame is anomalous.
Every stage has a weight-free backend for CPUs without pretrained weights.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch

from oddeye.models.base import FitError, VideoAnomalyModel, register
from oddeye.models.video.ai_vad.density import CombinedDensityEstimator
from oddeye.models.video.ai_vad.features import (
    ColorHistogramExtractor,
    DeepExtractor,
    FeatureType,
    PoseExtractor,
    VelocityExtractor,
    box_tensor,
)
from oddeye.models.video.ai_vad.flow import FlowExtractor
from oddeye.models.video.ai_vad.regions import RegionExtractor
from oddeye.models.video.ai_vad.weights import STAGES
from oddeye.progress import progress_bar

__all__ = ["POSE_BACKENDS", "AiVad"]

log = logging.getLogger(__name__)

POSE_BACKENDS = ("keypointrcnn", "none")
COLOR_HISTOGRAM = "color_histogram"


@register("ai_vad")
class AiVad(VideoAnomalyModel):
    """AI-VAD with pluggable backends; parameters named as anomalib's ``AiVad``.

    Backends: ``region_backend`` maskrcnn | foreground | background; ``flow_backend`` raft | raft_small |
    farneback | dis; ``pose_backend`` keypointrcnn | none; ``deep_backend`` clip | any timm
    name | color_histogram | none. ``weights`` maps a stage (regions, flow, pose, deep) to a
    local state_dict file; ``detector_size`` is the shorter side the R-CNNs resize to
    (torchvision's 800 when None).
    """

    def __init__(
        self,
        image_size: tuple[int, int] | list[int] = (256, 256),
        clip_length: int = 2,
        region_backend: str = "maskrcnn",
        flow_backend: str = "raft",
        pose_backend: str = "keypointrcnn",
        deep_backend: str = "clip",
        box_score_thresh: float = 0.8,
        persons_only: bool = False,
        min_bbox_area: int = 100,
        max_bbox_overlap: float = 0.65,
        enable_foreground_detections: bool = True,
        foreground_kernel_size: int = 3,
        foreground_binary_threshold: int = 18,
        n_velocity_bins: int = 8,
        use_velocity_features: bool = True,
        use_pose_features: bool = True,
        use_deep_features: bool = True,
        n_components_velocity: int = 2,
        n_neighbors_pose: int = 1,
        n_neighbors_deep: int = 1,
        pre_trained: bool = True,
        weights: dict[str, str] | None = None,
        detector_size: int | None = None,
    ) -> None:
        super().__init__(image_size, clip_length)
        if clip_length < 2:
            raise ValueError(
                f"AI-VAD compares the first and last frame of a clip: clip_length must be >= 2, got {clip_length}"
            )
        if pose_backend not in POSE_BACKENDS:
            raise ValueError(f"unknown pose backend {pose_backend!r}; available: {list(POSE_BACKENDS)}")
        weights = dict(weights or {})
        unknown = sorted(set(weights) - set(STAGES))
        if unknown:
            raise ValueError(f"weights has unknown stage(s) {unknown}; allowed: {list(STAGES)}")
        self.use_velocity = use_velocity_features
        self.use_pose = use_pose_features and pose_backend != "none"
        self.use_deep = use_deep_features and deep_backend != "none"
        self.region_extractor = RegionExtractor(
            region_backend,
            box_score_thresh=box_score_thresh,
            persons_only=persons_only,
            min_bbox_area=min_bbox_area,
            max_bbox_overlap=max_bbox_overlap,
            enable_foreground_detections=enable_foreground_detections,
            foreground_kernel_size=foreground_kernel_size,
            foreground_binary_threshold=foreground_binary_threshold,
            pre_trained=pre_trained,
            weights=weights.get("regions"),
            detector_size=detector_size,
        )
        self.flow_extractor = (
            FlowExtractor(flow_backend, pre_trained, weights.get("flow")) if self.use_velocity else None
        )
        self.velocity_extractor = VelocityExtractor(n_velocity_bins) if self.use_velocity else None
        self.pose_extractor = PoseExtractor(pre_trained, weights.get("pose"), detector_size) if self.use_pose else None
        self.deep_extractor: DeepExtractor | ColorHistogramExtractor | None = None
        if self.use_deep:
            self.deep_extractor = (
                ColorHistogramExtractor()
                if deep_backend == COLOR_HISTOGRAM
                else DeepExtractor(deep_backend, pre_trained, weights.get("deep"))
            )
        self.density = CombinedDensityEstimator(
            use_velocity_features=self.use_velocity,
            use_pose_features=self.use_pose,
            use_deep_features=self.use_deep,
            n_components_velocity=n_components_velocity,
            n_neighbors_pose=n_neighbors_pose,
            n_neighbors_deep=n_neighbors_deep,
        )

    @torch.no_grad()
    def extract(self, clips: torch.Tensor) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        """Regions of each clip's last frame ([N_i, 5] boxes) and their features ({type: [M, D]}, M = ΣN_i)."""
        first, last = clips[:, 0], clips[:, -1]
        boxes = self.region_extractor(first, last)
        rois = box_tensor(boxes).to(last)
        features: dict[str, torch.Tensor] = {}
        if self.velocity_extractor is not None and self.flow_extractor is not None:
            flow = self.flow_extractor(first, last) if rois.shape[0] else last.new_zeros(last.shape[0], 2, 1, 1)
            features[FeatureType.VELOCITY.value] = self.velocity_extractor(flow, rois)
        if self.pose_extractor is not None:
            features[FeatureType.POSE.value] = self.pose_extractor(last, boxes)
        if self.deep_extractor is not None:
            features[FeatureType.DEEP.value] = self.deep_extractor(last, rois)
        return boxes, features

    @torch.no_grad()
    def _fit_normal(self, batches: Iterator[torch.Tensor], progress: bool) -> None:
        if self.region_extractor.needs_background:
            batches = self._fit_background(batches)
        collected: dict[str, list[torch.Tensor]] = {name: [] for name in self.density.feature_types}
        groups: list[torch.Tensor] = []
        clips_seen = 0
        for group, clips in enumerate(
            progress_bar(batches, desc="ai_vad: region features", unit="batch", disable=not progress)
        ):
            boxes, features = self.extract(clips)
            clips_seen += clips.shape[0]
            n = sum(b.shape[0] for b in boxes)
            # A batch is a group: a run of consecutive clips whose regions look alike.
            groups.append(torch.full((n,), group, dtype=torch.long))
            for name in collected:
                collected[name].append(features[name].cpu())
        if clips_seen == 0:
            return
        n_regions = sum(g.numel() for g in groups)
        if n_regions < 2:
            raise FitError(
                f"AI-VAD found {n_regions} region(s) in {clips_seen} training clips: it needs moving or detected "
                "objects (lower foreground_binary_threshold / box_score_thresh, or check the fit data)"
            )
        log.info("AI-VAD: fitting density estimators on %d regions from %d clips", n_regions, clips_seen)
        device = next(iter(self.density.buffers())).device
        self.density.fit({k: torch.cat(v).to(device) for k, v in collected.items()}, torch.cat(groups).to(device))

    def _fit_background(self, batches: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
        """Learn the background from every training clip's last frame; the clips come back (kept as uint8)."""
        kept = [(clips * 255).round().to(torch.uint8).cpu() for clips in batches]
        if kept:
            self.region_extractor.fit_background(torch.cat([c[:, -1] for c in kept]).float() / 255)
        device = self.region_extractor.background.device
        return (c.to(device).float() / 255 for c in kept)

    @torch.no_grad()
    def raw_forward(self, clips: torch.Tensor) -> tuple[torch.Tensor, None, list[torch.Tensor]]:
        """Frame score [B] (the max region score, 0 with no regions), no map, boxes [N_i, 5] with region scores."""
        boxes, features = self.extract(clips)
        counts = [b.shape[0] for b in boxes]
        region_scores = self.density.predict(features).to(clips.device) if sum(counts) else clips.new_zeros(0)
        out_boxes, scores = [], []
        for b, s in zip(boxes, region_scores.split(counts), strict=True):
            out_boxes.append(torch.cat([b[:, :4].float(), s[:, None].float()], 1))
            scores.append(s.max() if s.numel() else s.new_zeros(()))
        return torch.stack(scores).float(), None, out_boxes
