"""R-KDE: kernel density of the regions a detector proposes (Vandeweijer et al., 2020).

https://ieeexplore.ieee.org/abstract/document/8999287 — parameter names and defaults follow anomalib's
``Rkde``. A torchvision R-CNN (AI-VAD's Mask R-CNN v2 region detector, built by the same wrapper) proposes
regions: its final detections (``roi_stage: rcnn``) or its region proposals (``rpn``), kept above
``roi_score_threshold``, at least ``min_box_size`` pixels wide and high, after non-maximum suppression at
``iou_threshold``, at most ``max_detections_per_image``. Each region is described by the detector's own
box-head features (RoIAlign + box head: 1024-d), and the shared ``KDEClassifier`` (PCA to
``n_pca_components``, ``feature_scaling_method``, Gaussian KDE on at most ``max_training_points``) scores
how unlike the training regions it is. The image score is its most anomalous region's; the boxes and
their scores come back with every prediction, as AI-VAD's do.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Iterable
from typing import Any

import torch
from torchvision.ops import remove_small_boxes

from oddeye.models.base import AnomalyModel, FitError, _CheckedBatches, fold_assignment, register
from oddeye.models.components import KDEClassifier
from oddeye.models.components.kde import FeatureScalingMethod
from oddeye.models.video.ai_vad.regions import RegionExtractor
from oddeye.progress import progress_bar

__all__ = ["Rkde", "RoiStage"]

log = logging.getLogger(__name__)


class RoiStage(str, enum.Enum):
    """Where the regions come from: the detector's final detections or its region proposals."""

    RCNN = "rcnn"
    RPN = "rpn"


@register("rkde")
class Rkde(AnomalyModel):
    """Region-based KDE: detector regions, box-head features, PCA + Gaussian KDE; boxes in every prediction."""

    def __init__(
        self,
        roi_stage: RoiStage | str = RoiStage.RCNN,
        roi_score_threshold: float = 0.001,
        min_box_size: int = 25,
        iou_threshold: float = 0.3,
        max_detections_per_image: int = 100,
        n_pca_components: int = 16,
        feature_scaling_method: FeatureScalingMethod | str = FeatureScalingMethod.SCALE,
        max_training_points: int = 40000,
        pre_trained: bool = True,
        weights: str | None = None,
        detector_size: int | None = None,
        image_size: tuple[int, int] | list[int] = (256, 256),
    ) -> None:
        """``weights``: a local state_dict of torchvision's ``maskrcnn_resnet50_fpn_v2``; ``detector_size``:
        the detector's input size (torchvision resizes to 800 px by default; smaller is faster)."""
        super().__init__(image_size=image_size)
        try:
            self.roi_stage = RoiStage(roi_stage)
        except ValueError:
            raise ValueError(f"roi_stage must be one of {[s.value for s in RoiStage]}, got {roi_stage!r}") from None
        if not 0.0 <= roi_score_threshold < 1.0:
            raise ValueError(f"roi_score_threshold must be in [0, 1), got {roi_score_threshold}")
        if max_detections_per_image < 1:
            raise ValueError(f"max_detections_per_image must be at least 1, got {max_detections_per_image}")
        self.roi_score_threshold = float(roi_score_threshold)
        self.min_box_size = int(min_box_size)
        self.iou_threshold = float(iou_threshold)
        self.max_detections_per_image = int(max_detections_per_image)
        self.regions = RegionExtractor(
            backend="maskrcnn",
            box_score_thresh=self.roi_score_threshold,
            enable_foreground_detections=False,
            pre_trained=pre_trained,
            weights=weights,
            detector_size=detector_size,
        )
        detector = self.regions.detector
        detector.roi_heads.score_thresh = self.roi_score_threshold
        detector.roi_heads.nms_thresh = self.iou_threshold
        detector.roi_heads.detections_per_img = self.max_detections_per_image
        detector.roi_heads.mask_roi_pool = None  # boxes only: the mask branch is never run
        self.classifier = KDEClassifier(n_pca_components, feature_scaling_method, max_training_points)
        self._fit_features: list[torch.Tensor] | None = None

    @property
    def device(self) -> torch.device:
        return self.classifier.max_length.device

    @torch.no_grad()
    def regions_and_features(self, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per image: boxes [N, 5] (x1, y1, x2, y2, detector confidence) in input pixels, and features [N, 1024]."""
        det = self.regions.detector
        images = images.to(self.device)
        sizes = [tuple(im.shape[-2:]) for im in images]
        batch, _ = det.transform(list(images))
        features = det.backbone(batch.tensors)
        proposals, _ = det.rpn(batch, features)
        if self.roi_stage == RoiStage.RCNN:
            found = det.roi_heads(features, proposals, batch.image_sizes)[0]
            boxes = [d["boxes"] for d in found]
            scores = [d["scores"] for d in found]
        else:  # proposals come sorted by objectness; the RPN has already suppressed overlaps
            boxes = [p[: self.max_detections_per_image] for p in proposals]
            scores = [torch.ones(len(b), device=b.device) for b in boxes]
        kept_boxes, kept_feats = [], []
        for i, (b, s) in enumerate(zip(boxes, scores, strict=True)):
            scale = b.new_tensor([sizes[i][1] / batch.image_sizes[i][1], sizes[i][0] / batch.image_sizes[i][0]] * 2)
            keep = remove_small_boxes(b * scale, float(self.min_box_size))
            b, s = b[keep], s[keep]
            kept_boxes.append(torch.cat([b * scale, s[:, None]], 1))
            pooled = det.roi_heads.box_roi_pool(features_of(features, i), [b], [batch.image_sizes[i]])
            kept_feats.append(det.roi_heads.box_head(pooled))
        return kept_boxes, kept_feats

    def _fit_normal(self, batches: Iterable[torch.Tensor], progress: bool) -> None:
        per_image: list[torch.Tensor] = []
        for images in progress_bar(batches, desc="rkde: detecting regions", unit="batch", disable=not progress):
            per_image.extend(self.regions_and_features(images)[1])
        if not per_image:
            return  # the caller reports an empty training set
        if sum(len(f) for f in per_image) == 0:
            raise FitError(
                f"rkde: the detector found no region in any of the {len(per_image)} fit images with "
                f"roi_score_threshold={self.roi_score_threshold} and min_box_size={self.min_box_size}; "
                "lower them, or check that the fit frames show objects"
            )
        self._fit_kde(self.classifier, per_image)
        self._fit_features = per_image

    def _fit_kde(self, classifier: KDEClassifier, per_image: list[torch.Tensor]) -> None:
        embeddings = torch.cat(per_image)
        if len(embeddings) <= classifier.n_pca_components:
            raise FitError(
                f"rkde: {len(embeddings)} region(s) in the fit images; n_pca_components={classifier.n_pca_components} "
                "needs more (fit on more frames, or lower roi_score_threshold or n_pca_components)"
            )
        log.info("rkde: fitting the KDE on %d regions of %d images", len(embeddings), len(per_image))
        classifier.fit(embeddings)

    def heldout_scores(
        self,
        train_loader: Iterable[Any],
        folds: int,
        n: int,
        videos: torch.Tensor | None,
        template: AnomalyModel | None,
        progress: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Refit only the KDE per fold, on the regions found while fitting: one detector pass in all."""
        per_image, self._fit_features = self._fit_features, None
        assign = fold_assignment(n, folds, videos) if per_image is not None else torch.zeros(0)
        if per_image is None or len(per_image) != n or int(assign.max()) < 1:
            return self._score_raw(_CheckedBatches(train_loader, self._check_input))
        scores = torch.zeros(n, dtype=torch.float64)
        for fold in range(int(assign.max()) + 1):
            held = (assign == fold).nonzero().flatten().tolist()
            rest = [per_image[i] for i in (assign != fold).nonzero().flatten().tolist()]
            classifier = KDEClassifier(
                self.classifier.n_pca_components,
                self.classifier.feature_scaling_method,
                self.classifier.max_training_points,
            ).to(self.device)
            try:
                self._fit_kde(classifier, rest)
            except FitError:
                classifier = self.classifier  # too few regions outside this fold: the final model scores it
            for i in held:
                scores[i] = float(self._image_score(self._region_scores(classifier, per_image[i])))
        return scores, None

    @staticmethod
    def _region_scores(classifier: KDEClassifier, features: torch.Tensor) -> torch.Tensor:
        """Unsaturated anomaly logits: anomalib's probability is ``sigmoid`` of this."""
        if len(features) == 0:
            return features.new_zeros(0)
        return -0.05 * (classifier.score_samples(features) - 12)

    def _image_score(self, region_scores: torch.Tensor) -> torch.Tensor:
        # No region: nothing unusual was found (anomalib scores such images 0; 0 is sigmoid's -inf side here).
        floor = torch.tensor(-1e4, dtype=region_scores.dtype, device=region_scores.device)
        return region_scores.max() if region_scores.numel() else floor

    @torch.no_grad()
    def raw_forward(self, images: torch.Tensor) -> tuple[torch.Tensor, None, list[torch.Tensor]]:
        """The most anomalous region's score [B], no map, and each image's boxes [N, 5] with region scores."""
        boxes, features = self.regions_and_features(images)
        scores, out_boxes = [], []
        for b, f in zip(boxes, features, strict=True):
            s = self._region_scores(self.classifier, f)
            scores.append(self._image_score(s))
            out_boxes.append(torch.cat([b[:, :4], s[:, None].to(b.dtype)], 1))
        return torch.stack(scores), None, out_boxes


def features_of(features: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    """The FPN feature maps of batch item ``i`` (kept 4-D)."""
    return {k: v[i : i + 1] for k, v in features.items()}
