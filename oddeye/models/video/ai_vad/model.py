"""AI-VAD: attribute-based video anomaly detection (Reiss & Hoshen, arXiv:2212.00789).

For the last frame of every clip: find the object regions, describe each by its
velocity (optical-flow histogram), pose (body keypoints) and appearance (deep or colour
features), and score it by how unlike the training regions it is (GMM for velocity,
k-NN for pose and appearance, each min/max-normalised on its own training scores). As in
the paper and anomalib, a frame scores the sum over attributes of each attribute's
maximum over the frame's regions; each region's box carries the sum of its own attribute
scores, so every alert says which object in which frame is anomalous. k-NN statistics are
leave-one-video-out (a contiguous segment stands in for a video when the fit data is one
stream). ``smoothing_sigma`` smooths a video's frame scores over time for evaluation
(``oddeye eval``), as the authors do (sigma 3 on Ped2 and Avenue, 7 on ShanghaiTech); the
live pipeline, which cannot see future frames, scores frames unsmoothed.
Every stage has a weight-free backend for CPUs without pretrained weights.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from scipy.ndimage import gaussian_filter1d

from oddeye.models.base import DEFAULT_FOLDS, AnomalyModel, FitError, VideoAnomalyModel, fold_assignment, register
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
    (torchvision's 800 when None). ``smoothing_sigma`` (frames, 0 = off) is the Gaussian
    smoothing of frame scores over time that ``oddeye eval`` applies (``smooth_frame_scores``).
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
        smoothing_sigma: float = 0.0,
    ) -> None:
        super().__init__(image_size, clip_length)
        if smoothing_sigma < 0:
            raise ValueError(f"smoothing_sigma must be >= 0 (0 turns smoothing off), got {smoothing_sigma}")
        self.smoothing_sigma = float(smoothing_sigma)
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
        self._density_params = {
            "use_velocity_features": self.use_velocity,
            "use_pose_features": self.use_pose,
            "use_deep_features": self.use_deep,
            "n_components_velocity": n_components_velocity,
            "n_neighbors_pose": n_neighbors_pose,
            "n_neighbors_deep": n_neighbors_deep,
        }
        self.density = CombinedDensityEstimator(**self._density_params)
        self._fit_cache: dict[str, Any] | None = None

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
    def _fit_normal(self, batches: Iterable[torch.Tensor], progress: bool) -> None:
        source = batches  # a checked loader names each clip's video (``videos``) once iterated
        if self.region_extractor.needs_background:
            batches = self._fit_background(batches)
        collected: dict[str, list[torch.Tensor]] = {name: [] for name in self.density.feature_types}
        region_clip: list[torch.Tensor] = []  # the training clip each region comes from
        clips_seen = 0
        for clips in progress_bar(batches, desc="ai_vad: region features", unit="batch", disable=not progress):
            boxes, features = self.extract(clips)
            for i, b in enumerate(boxes):
                region_clip.append(torch.full((b.shape[0],), clips_seen + i, dtype=torch.long))
            clips_seen += clips.shape[0]
            for name in collected:
                collected[name].append(features[name].cpu())
        if clips_seen == 0:
            return
        region_of = torch.cat(region_clip)
        if region_of.numel() < 2:
            raise FitError(
                f"AI-VAD found {region_of.numel()} region(s) in {clips_seen} training clips: it needs moving or "
                "detected objects (lower foreground_binary_threshold / box_score_thresh, or check the fit data)"
            )
        videos = getattr(source, "videos", None)
        clip_group = _clip_groups(clips_seen, videos)
        features = {k: torch.cat(v) for k, v in collected.items()}
        log.info(
            "AI-VAD: fitting density estimators on %d regions from %d clips (%d k-NN groups)",
            region_of.numel(),
            clips_seen,
            int(clip_group.max()) + 1,
        )
        device = next(iter(self.density.buffers())).device
        self.density.fit({k: v.to(device) for k, v in features.items()}, clip_group[region_of].to(device))
        self._fit_cache = {"features": features, "region_of": region_of, "n_clips": clips_seen, "videos": videos}

    @torch.no_grad()
    def heldout_scores(
        self,
        train_loader: object,
        folds: int,
        n: int,
        videos: torch.Tensor | None,
        template: AnomalyModel | None,
        progress: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Frame scores of training clips from density estimators fitted without their fold (whole videos,
        or contiguous blocks of one stream). The regions and features of the fit are reused, so this costs
        k density fits, not k feature passes; the learnt background (``background`` regions) saw every clip."""
        cache = self._fit_cache
        self._fit_cache = None
        if cache is None:
            raise FitError("AI-VAD has no fit features to hold out (call fit)")
        n_clips, region_of = cache["n_clips"], cache["region_of"]
        assign = fold_assignment(n_clips, folds, cache["videos"])
        counts = torch.bincount(region_of, minlength=n_clips).tolist()
        if int(assign.max()) < 1:
            log.warning("AI-VAD: %d training clip(s) are too few to hold any out; normalising on them", n_clips)
            return self.density.frame_scores(self.density.predict_each(cache["features"]), counts).double(), None
        scores = torch.zeros(n_clips, dtype=torch.float64)
        clip_group = _clip_groups(n_clips, cache["videos"])
        for fold in range(int(assign.max()) + 1):
            held_clip = assign == fold
            held = held_clip[region_of]
            if held.all() or (~held).sum() < 2:
                continue  # nothing to learn from without this fold: its clips keep 0
            density = CombinedDensityEstimator(**self._density_params)
            try:
                density.fit({k: v[~held] for k, v in cache["features"].items()}, clip_group[region_of[~held]])
            except ValueError as e:  # too few regions left for an estimator (e.g. the GMM's components)
                log.warning("AI-VAD: fold %d left too few regions to refit (%s); its clips keep 0", fold, e)
                continue
            each = density.predict_each({k: v[held] for k, v in cache["features"].items()})
            fold_counts = [c for c, h in zip(counts, held_clip.tolist(), strict=True) if h]
            scores[held_clip] = density.frame_scores(each, fold_counts).double()
        return scores, None

    def smooth_frame_scores(self, scores: np.ndarray) -> np.ndarray:
        """One video's frame scores [T] smoothed over time (Gaussian, ``smoothing_sigma`` frames; 0: unchanged)."""
        scores = np.asarray(scores, np.float64)
        if self.smoothing_sigma <= 0 or scores.size < 2:
            return scores
        return gaussian_filter1d(scores, self.smoothing_sigma, mode="nearest")

    def _fit_background(self, batches: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
        """Learn the background from every training clip's last frame; the clips come back (kept as uint8)."""
        kept = [(clips * 255).round().to(torch.uint8).cpu() for clips in batches]
        if kept:
            self.region_extractor.fit_background(torch.cat([c[:, -1] for c in kept]).float() / 255)
        device = self.region_extractor.background.device
        return (c.to(device).float() / 255 for c in kept)

    @torch.no_grad()
    def raw_forward(self, clips: torch.Tensor) -> tuple[torch.Tensor, None, list[torch.Tensor]]:
        """Frame score [B] (per attribute the max over the frame's regions, summed; 0 with no regions), no map,
        boxes [N_i, 5] with each region's summed attribute scores."""
        boxes, features = self.extract(clips)
        counts = [b.shape[0] for b in boxes]
        if not sum(counts):
            return clips.new_zeros(len(counts)), None, [b[:, :4].float().new_zeros(0, 5) for b in boxes]
        each = self.density.predict_each(features)
        region_scores = torch.stack(list(each.values())).sum(0).to(clips.device)
        out_boxes = [
            torch.cat([b[:, :4].float().to(clips.device), s[:, None].float()], 1)
            for b, s in zip(boxes, region_scores.split(counts), strict=True)
        ]
        return self.density.frame_scores(each, counts).to(clips.device), None, out_boxes


def _clip_groups(n_clips: int, videos: torch.Tensor | None) -> torch.Tensor:
    """The k-NN group [n_clips] of each training clip: its video when the fit data names videos (the paper's
    leave-one-video-out), else one of ``DEFAULT_FOLDS`` contiguous segments of the stream."""
    if videos is not None and videos.numel() == n_clips and videos.unique().numel() > 1:
        return torch.unique(videos, return_inverse=True)[1]
    return fold_assignment(n_clips, DEFAULT_FOLDS)
