"""Scoring a model on a dataset and computing its metrics: one category, or one video dataset.

Image models are any ``AnomalyModel``: ``forward(images [B, 3, H, W])`` → ``Prediction``
with normalised ``score`` and ``anomaly_map``. Rankings (AUROC, pixel AUROC, AUPRO, F1-max)
use the model's unsaturated ``logits`` in float64 where it has them: the [0, 1] score
saturates at 1.0 in float32, so clear anomalies and the worst normal images would tie.
The [0, 1] score still gives the calibration columns (share of normal / anomalous test
images at or above 0.5, the alert threshold). Video datasets work with two kinds of model:

- an image model scores every frame on its own (it is fitted on the training clips' frames);
- a video model (``is_video = True``, a ``VideoAnomalyModel``) scores windows of
  ``clip_length`` consecutive frames of one clip, [B, clip_length, 3, H, W]; a window's
  score is the score of its last frame, and the first ``clip_length - 1`` frames of a clip
  take the first window's score. It is fitted on such windows of the training clips
  (``video_windows``), never mixing clips. A model may instead provide
  ``score_clip(frames uint8 [T, 3, H, W]) -> [T]`` to score a whole clip itself, and
  ``smooth_frame_scores(scores [T]) -> [T]`` to smooth a clip's frame scores over time
  (AI-VAD's ``temporal_smoothing``, as its authors evaluate).
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
    normal_over_half: float
    """Share of normal test images scored at or above 0.5 (false alerts at the default threshold)."""
    anomalous_over_half: float
    """Share of anomalous test images scored at or above 0.5 (recall at the default threshold)."""
    n_anomalous: int
    frames_per_s: float = 0.0
    fit_seconds: float | None = None

    def record(self) -> dict[str, float | int | None]:
        return {k: v for k, v in asdict(self).items() if k != "name"}


@dataclass
class ImageScores:
    """What scoring a test set gives: normalised scores [N], maps [N, H, W] or None, masks, labels,
    and the unsaturated ranking values (``logits`` [N] float64)."""

    scores: np.ndarray
    maps: np.ndarray | None
    labels: np.ndarray
    masks: np.ndarray | None
    images: np.ndarray
    paths: list[Path] = field(default_factory=list)
    logits: np.ndarray | None = None


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


def ranking_output(model: AnomalyModel, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scores [B] and maps to rank by: the model's float64 ``logits`` when it has them, else ``forward``'s."""
    if hasattr(model, "logits"):
        return model.logits(batch)
    pred = model(batch)
    return pred.score, pred.anomaly_map


def normalised(logits: np.ndarray, model: AnomalyModel) -> np.ndarray:
    """The [0, 1] scores ``forward`` gives, from ``ranking_output``'s values (float64, so unsaturated)."""
    if not hasattr(model, "logits"):
        return logits
    return 0.5 * (1.0 + np.tanh(0.5 * logits))  # the sigmoid, without overflow warnings


@torch.no_grad()
def score_images(
    model: AnomalyModel, images: np.ndarray, batch_size: int = 16, device: torch.device | str = "cpu"
) -> tuple[np.ndarray, np.ndarray | None, float]:
    """Ranking scores [N] and maps [N, H, W] (or None), float64 (``ranking_output``), and frames/s
    for uint8 images [N, H, W, 3]."""
    device = torch.device(device)
    scores, maps = [], []
    t0 = time.perf_counter()
    for batch in _batches(images, batch_size, device):
        score, amap = ranking_output(model, batch)
        scores.append(score.double().cpu().numpy())
        if amap is not None:
            maps.append(amap.double().cpu().numpy())
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
    """Score the category's test set and compute image AUROC, F1-max and (with masks) pixel AUROC and AUPRO.

    Rankings use the unsaturated values (``score_images``); ``threshold`` (F1-max's) and the
    calibration columns are on the [0, 1] scale alerts use.
    """
    images = load_images([s.path for s in category.test], image_size)
    labels = np.array([s.label for s in category.test], bool)
    score, amap, fps = score_images(model, images, batch_size, device)
    f1, rank_threshold = f1_max(score, labels)
    threshold = float(normalised(np.array([rank_threshold]), model)[0])
    unit = normalised(score, model)
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
        normal_over_half=float((unit[~labels] >= 0.5).mean()) if (~labels).any() else 0.0,
        anomalous_over_half=float((unit[labels] >= 0.5).mean()) if labels.any() else 0.0,
        n_anomalous=int(labels.sum()),
        frames_per_s=fps,
    )
    unit_maps = None if amap is None else normalised(amap, model).astype(np.float32)
    paths = [s.path for s in category.test]
    return result, ImageScores(unit, unit_maps, labels, masks, images, paths, logits=score)


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
        with_video: bool = False,
    ) -> None:
        self.with_video = with_video
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

    def __iter__(self) -> Iterator[torch.Tensor | dict[str, torch.Tensor]]:
        """Windows [B, length, 3, H, W]; with ``with_video``, ``{"image": windows, "video": clip index [B]}``."""
        for i in range(0, len(self.starts), self.batch_size):
            starts = self.starts[i : i + self.batch_size]
            chunk = [self.clips[c][t : t + self.length] for c, t in starts]
            windows = torch.from_numpy(np.stack(chunk)).permute(0, 1, 4, 2, 3).to(self.device)
            yield {"image": windows, "video": torch.tensor([c for c, _ in starts])} if self.with_video else windows


@torch.no_grad()
def score_video_clip(
    model: AnomalyModel, frames: np.ndarray, batch_size: int = 16, device: torch.device | str = "cpu"
) -> np.ndarray:
    """Per-frame ranking scores [T] (float64 logits where the model has them) of one clip [T, H, W, 3] uint8
    from a video model, smoothed over time when the model offers ``smooth_frame_scores``."""
    if hasattr(model, "score_clip"):
        out = model.score_clip(torch.from_numpy(frames).permute(0, 3, 1, 2).to(device))
        scores = torch.as_tensor(out).double().cpu().numpy().ravel()
    else:
        length = int(getattr(model, "clip_length", 1))
        if len(frames) < length:
            raise MetricError(f"a clip of {len(frames)} frames is shorter than the model's clip_length={length}")
        windows = video_windows([frames], length, batch_size, device)
        scores = np.concatenate([ranking_output(model, batch)[0].double().cpu().numpy() for batch in windows])
        scores = np.concatenate([np.full(length - 1, scores[0]), scores])
    smooth = getattr(model, "smooth_frame_scores", None)
    return np.asarray(smooth(scores), np.float64) if smooth is not None else scores


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
