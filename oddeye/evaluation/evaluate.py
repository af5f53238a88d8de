"""Scoring a model on a dataset and computing its metrics: one category, or one video dataset.

Image models are any ``AnomalyModel``: ``forward(images [B, 3, H, W])`` → ``Prediction``
with normalised ``score`` and ``anomaly_map``. Video datasets work with two kinds of model:

- an image model scores every frame on its own (it is fitted on the training clips' frames);
- a video model (``is_video = True``, a ``VideoAnomalyModel``) scores windows of
  ``clip_length`` consecutive frames of one clip, [B, clip_length, 3, H, W]; a window's
  score is the score of its last frame, and the first ``clip_length - 1`` frames of a clip
  take the first window's score. It is fitted on such windows of the training clips
  (``video_windows``), never mixing clips. A model may instead provide
  ``score_clip(frames uint8 [T, 3, H, W]) -> [T]`` to score a whole clip itself.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from oddeye.data.images import ImageCategory, load_images, load_masks
from oddeye.data.video import VideoDataset
from oddeye.evaluation.metrics import MetricError, aupro, auroc, f1_max, frame_auroc, pixel_auroc
from oddeye.models.base import AnomalyModel

__all__ = [
    "CategoryResult",
    "ImageScores",
    "VideoResult",
    "evaluate_category",
    "evaluate_video",
    "is_video_model",
    "score_images",
    "score_video_clip",
    "video_windows",
]

log = logging.getLogger(__name__)


@dataclass
class CategoryResult:
    """Metrics of one image category (pixel metrics None when there are no masks or maps)."""

    name: str
    image_auroc: float
    pixel_auroc: float | None
    aupro: float | None
    f1_max: float
    threshold: float
    n_test: int
    n_anomalous: int
    frames_per_s: float = 0.0
    fit_seconds: float | None = None

    def record(self) -> dict[str, float | int | None]:
        return {k: v for k, v in asdict(self).items() if k != "name"}


@dataclass
class ImageScores:
    """What scoring a test set gives: normalised scores [N], maps [N, H, W] or None, masks, labels."""

    scores: np.ndarray
    maps: np.ndarray | None
    labels: np.ndarray
    masks: np.ndarray | None
    images: np.ndarray
    paths: list[Path] = field(default_factory=list)


@dataclass
class VideoResult:
    """Frame-level AUROC of one video dataset or scene."""

    name: str
    frame_auroc_micro: float
    frame_auroc_macro: float | None
    clips_used: int
    clips_skipped: int
    n_frames: int
    n_anomalous: int
    frames_per_s: float = 0.0

    def record(self) -> dict[str, float | int | None]:
        return {k: v for k, v in asdict(self).items() if k != "name"}


def is_video_model(model: object) -> bool:
    return bool(getattr(model, "is_video", False))


def _batches(images: np.ndarray, batch_size: int, device: torch.device) -> Iterator[torch.Tensor]:
    for i in range(0, len(images), batch_size):
        yield torch.from_numpy(images[i : i + batch_size]).permute(0, 3, 1, 2).to(device)


@torch.no_grad()
def score_images(
    model: AnomalyModel, images: np.ndarray, batch_size: int = 16, device: torch.device | str = "cpu"
) -> tuple[np.ndarray, np.ndarray | None, float]:
    """Normalised scores [N], maps [N, H, W] (or None) and frames/s for uint8 images [N, H, W, 3]."""
    device = torch.device(device)
    scores, maps = [], []
    t0 = time.perf_counter()
    for batch in _batches(images, batch_size, device):
        pred = model(batch)
        scores.append(pred.score.float().cpu().numpy())
        if pred.anomaly_map is not None:
            maps.append(pred.anomaly_map.float().cpu().numpy())
    seconds = time.perf_counter() - t0
    score = np.concatenate(scores)
    bad = ~np.isfinite(score)
    if bad.any():
        raise MetricError(f"the model returned NaN or infinite scores for {int(bad.sum())} of {score.size} images")
    amap = np.concatenate(maps) if len(maps) == len(scores) and maps else None
    return score, amap, len(images) / max(seconds, 1e-9)


def evaluate_category(
    model: AnomalyModel,
    category: ImageCategory,
    image_size: tuple[int, int],
    batch_size: int = 16,
    device: torch.device | str = "cpu",
) -> tuple[CategoryResult, ImageScores]:
    """Score the category's test set and compute image AUROC, F1-max and (with masks) pixel AUROC and AUPRO."""
    images = load_images([s.path for s in category.test], image_size)
    labels = np.array([s.label for s in category.test], bool)
    score, amap, fps = score_images(model, images, batch_size, device)
    f1, threshold = f1_max(score, labels)
    pix = pro = None
    masks = None
    if category.has_masks and amap is not None:
        masks = load_masks(category.test, image_size)
        if masks.any():
            pix = pixel_auroc(amap, masks)
            pro = aupro(amap, masks)
    result = CategoryResult(
        name=category.name,
        image_auroc=auroc(score, labels),
        pixel_auroc=pix,
        aupro=pro,
        f1_max=f1,
        threshold=threshold,
        n_test=int(labels.size),
        n_anomalous=int(labels.sum()),
        frames_per_s=fps,
    )
    return result, ImageScores(score, amap, labels, masks, images, [s.path for s in category.test])


class video_windows:  # noqa: N801 - used like a function, re-iterable like a loader
    """Re-iterable batches of ``length``-frame windows [B, length, 3, H, W] uint8 from clips [T, H, W, 3].

    ``starts`` lists (clip index, first frame) of the windows; a window never spans two clips.
    """

    def __init__(
        self,
        clips: list[np.ndarray],
        length: int,
        batch_size: int,
        device: torch.device | str = "cpu",
        starts: list[tuple[int, int]] | None = None,
    ) -> None:
        self.clips = clips
        self.length = length
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.starts = (
            starts
            if starts is not None
            else [(c, t) for c, clip in enumerate(clips) for t in range(len(clip) - length + 1)]
        )

    def __len__(self) -> int:
        return (len(self.starts) + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[torch.Tensor]:
        for i in range(0, len(self.starts), self.batch_size):
            chunk = [self.clips[c][t : t + self.length] for c, t in self.starts[i : i + self.batch_size]]
            yield torch.from_numpy(np.stack(chunk)).permute(0, 1, 4, 2, 3).to(self.device)


@torch.no_grad()
def score_video_clip(
    model: AnomalyModel, frames: np.ndarray, batch_size: int = 16, device: torch.device | str = "cpu"
) -> np.ndarray:
    """Per-frame normalised scores [T] of one clip [T, H, W, 3] uint8 from a video model."""
    if hasattr(model, "score_clip"):
        out = model.score_clip(torch.from_numpy(frames).permute(0, 3, 1, 2).to(device))
        return torch.as_tensor(out).float().cpu().numpy().ravel()
    length = int(getattr(model, "clip_length", 1))
    if len(frames) < length:
        raise MetricError(f"a clip of {len(frames)} frames is shorter than the model's clip_length={length}")
    windows = video_windows([frames], length, batch_size, device)
    scores = np.concatenate([model(batch).score.float().cpu().numpy() for batch in windows])
    return np.concatenate([np.full(length - 1, scores[0]), scores])


@torch.no_grad()
def evaluate_video(
    model: AnomalyModel,
    dataset: VideoDataset,
    image_size: tuple[int, int],
    batch_size: int = 16,
    device: torch.device | str = "cpu",
) -> VideoResult:
    """Per-frame scores for every test clip → micro and macro frame AUROC."""
    device = torch.device(device)
    scores: dict[str, np.ndarray] = {}
    labels: dict[str, np.ndarray] = {}
    frames_total, seconds = 0, 0.0
    for clip in dataset.test:
        frames = clip.load(image_size)
        t0 = time.perf_counter()
        if is_video_model(model):
            s = score_video_clip(model, frames, batch_size, device)
        else:
            s, _, _ = score_images(model, frames, batch_size, device)
        seconds += time.perf_counter() - t0
        frames_total += len(frames)
        if s.size != len(frames):
            raise MetricError(f"clip {clip.name}: the model gave {s.size} scores for {len(frames)} frames")
        scores[clip.name] = s
        labels[clip.name] = clip.labels if clip.labels is not None else np.zeros(len(frames), bool)
    fa = frame_auroc(scores, labels)
    n_bad = int(sum(int(v.sum()) for v in labels.values()))
    return VideoResult(
        name=dataset.name,
        frame_auroc_micro=fa.micro,
        frame_auroc_macro=fa.macro,
        clips_used=fa.clips_used,
        clips_skipped=fa.clips_skipped,
        n_frames=frames_total,
        n_anomalous=n_bad,
        frames_per_s=frames_total / max(seconds, 1e-9),
    )
