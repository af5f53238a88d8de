"""Evaluation metrics: image/pixel AUROC, AUPRO, F1-max, frame-level AUROC for video."""

from oddeye.evaluation.metrics import (
    FrameAUROC,
    MetricError,
    aupro,
    auroc,
    f1_max,
    frame_auroc,
    pixel_auroc,
    pro_curve,
    roc_curve,
)

__all__ = [
    "FrameAUROC",
    "MetricError",
    "aupro",
    "auroc",
    "f1_max",
    "frame_auroc",
    "pixel_auroc",
    "pro_curve",
    "roc_curve",
]
