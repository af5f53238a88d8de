"""Video anomaly datasets on disk: UCSD Ped2, CUHK Avenue and ShanghaiTech layouts.

A clip is a folder of frame images or one video file; test clips carry frame labels
(True = anomalous). ``open_video_dataset`` detects the layout; docs/datasets.md gives the
exact folder names each one expects.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from oddeye.data.images import DatasetError, list_images, read_image

__all__ = ["VIDEO_SUFFIXES", "Clip", "VideoDataset", "find_video_datasets", "is_video_dataset", "open_video_dataset"]

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".avi", ".mp4", ".mkv", ".mov", ".webm")


@dataclass
class Clip:
    """Frames of one clip (a frame folder or a video file) and, for test clips, labels [T] bool."""

    name: str
    frames: list[Path] | None = None
    video: Path | None = None
    labels: np.ndarray | None = None

    def read(self, size: tuple[int, int] | None = None) -> Iterator[np.ndarray]:
        """The clip's frames as H×W×3 uint8 RGB, resized to ``size`` (H, W) when given."""
        if self.frames is not None:
            for p in self.frames:
                yield read_image(p, size)
            return
        assert self.video is not None
        cap = cv2.VideoCapture(str(self.video))
        if not cap.isOpened():
            raise DatasetError(f"cannot open video {self.video}")
        try:
            while True:
                ok, bgr = cap.read()
                if not ok:
                    break
                rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
                if size is not None and rgb.shape[:2] != tuple(size):
                    rgb = cv2.resize(rgb, (size[1], size[0]), interpolation=cv2.INTER_AREA)
                yield rgb
        finally:
            cap.release()

    def load(self, size: tuple[int, int]) -> np.ndarray:
        """All frames as uint8 [T, H, W, 3]; checks the count against the labels."""
        frames = np.stack(list(self.read(size))) if self.frames or self.video else np.empty((0, *size, 3), np.uint8)
        if self.labels is not None and len(frames) != len(self.labels):
            raise DatasetError(
                f"clip {self.name}: {len(frames)} frames but {len(self.labels)} frame labels "
                f"({self.frames[0].parent if self.frames else self.video})"
            )
        return frames


@dataclass
class VideoDataset:
    """Normal training clips and labelled test clips of one scene or dataset."""

    name: str
    root: Path
    layout: str
    train: list[Clip]
    test: list[Clip]

    def describe(self) -> str:
        frames = sum(len(c.labels) for c in self.test if c.labels is not None)
        bad = sum(int(c.labels.sum()) for c in self.test if c.labels is not None)
        return (
            f"{self.name} ({self.layout}): {len(self.train)} train clips, {len(self.test)} test clips, "
            f"{frames} test frames ({bad} anomalous)"
        )


def _frame_folders(folder: Path) -> list[Clip]:
    clips = []
    for d in sorted(p for p in folder.iterdir() if p.is_dir()):
        frames = list_images(d)
        if frames:
            clips.append(Clip(d.name, frames=frames))
    return clips


def _video_files(folder: Path) -> list[Clip]:
    return [
        Clip(p.stem, video=p) for p in sorted(folder.iterdir()) if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES
    ]


def _need(path: Path, what: str, layout: str) -> Path:
    if not path.exists():
        raise DatasetError(f"{layout} layout: {what} {path} is missing")
    return path


# --------------------------------------------------------------------------- UCSD Ped1/Ped2


def _ucsd(root: Path) -> VideoDataset:
    train = [c for c in _frame_folders(root / "Train") if not c.name.endswith("_gt")]
    test = []
    for clip in _frame_folders(root / "Test"):
        if clip.name.endswith("_gt"):
            continue
        gt = _need(root / "Test" / f"{clip.name}_gt", "ground-truth mask folder", "UCSD")
        masks = list_images(gt)
        if not masks:
            raise DatasetError(f"UCSD layout: {gt} holds no mask images")
        clip.labels = np.array([bool((cv2.imread(str(m), cv2.IMREAD_GRAYSCALE) > 0).any()) for m in masks])
        test.append(clip)
    return VideoDataset(root.name, root, "ucsd", train, test)


# --------------------------------------------------------------------------- CUHK Avenue


def _avenue_labels(root: Path, clip: Clip) -> np.ndarray:
    for folder in (root / "testing_labels", root / "testing_label"):
        for suffix in (".npy", ".txt"):
            f = folder / f"{clip.name}{suffix}"
            if f.is_file():
                return (np.load(f) if suffix == ".npy" else np.loadtxt(f)).astype(bool).ravel()
    number = str(int(clip.name)) if clip.name.isdigit() else clip.name  # 01.avi -> 1_label.mat
    mat = root / "ground_truth_demo" / "testing_label_mask" / f"{number}_label.mat"
    _need(mat, "label file", "Avenue")
    from scipy.io import loadmat

    vol = loadmat(str(mat))["volLabel"]
    return np.array([bool(np.asarray(m).any()) for m in vol.ravel()])


def _avenue(root: Path) -> VideoDataset:
    train = _video_files(_need(root / "training_videos", "folder", "Avenue"))
    test = _video_files(_need(root / "testing_videos", "folder", "Avenue"))
    for clip in test:
        clip.labels = _avenue_labels(root, clip)
    return VideoDataset(root.name, root, "avenue", train, test)


# --------------------------------------------------------------------------- ShanghaiTech


def _shanghaitech(root: Path) -> VideoDataset:
    tr = root / "training"
    train = _frame_folders(tr / "frames") if (tr / "frames").is_dir() else []
    if not train and (tr / "videos").is_dir():
        train = _video_files(tr / "videos")
    if not train:
        raise DatasetError(f"ShanghaiTech layout: no training clips in {tr}/frames/<clip>/ or {tr}/videos/*.avi")
    te = root / "testing"
    test = _frame_folders(_need(te / "frames", "folder", "ShanghaiTech"))
    labels = _need(te / "test_frame_mask", "label folder", "ShanghaiTech")
    for clip in test:
        f = _need(labels / f"{clip.name}.npy", "frame-label file", "ShanghaiTech")
        clip.labels = np.load(f).astype(bool).ravel()
    return VideoDataset(root.name, root, "shanghaitech", train, test)


_LAYOUTS = (
    ("ucsd", lambda p: (p / "Train").is_dir() and (p / "Test").is_dir(), _ucsd),
    ("avenue", lambda p: (p / "training_videos").is_dir() or (p / "testing_videos").is_dir(), _avenue),
    ("shanghaitech", lambda p: (p / "training").is_dir() and (p / "testing").is_dir(), _shanghaitech),
)
_EXPECTED = (
    "Train/ + Test/ (UCSD Ped2), training_videos/ + testing_videos/ (CUHK Avenue) "
    "or training/ + testing/ (ShanghaiTech)"
)


def is_video_dataset(path: str | Path) -> bool:
    """Does ``path``, or a folder directly inside it, look like a video dataset?"""
    path = Path(path)
    if not path.is_dir():
        return False
    dirs = [path, *(d for d in path.iterdir() if d.is_dir())]
    return any(match(d) for d in dirs for _, match, _ in _LAYOUTS)


def open_video_dataset(path: str | Path) -> VideoDataset:
    """Read one video dataset (or one synthetic scene) in any known layout."""
    path = Path(path)
    if not path.is_dir():
        raise DatasetError(f"video dataset folder {path} does not exist")
    for _, match, build in _LAYOUTS:
        if match(path):
            ds = build(path)
            if not ds.train:
                raise DatasetError(f"{path}: no training clips found")
            if not ds.test:
                raise DatasetError(f"{path}: no test clips found")
            return ds
    raise DatasetError(f"{path} is not a video dataset: expected {_EXPECTED}")


def find_video_datasets(path: str | Path) -> list[VideoDataset]:
    """``path`` as one video dataset, or each one directly inside it (sorted by name)."""
    path = Path(path)
    if not path.is_dir():
        raise DatasetError(f"video dataset folder {path} does not exist")
    if any(match(path) for _, match, _ in _LAYOUTS):
        return [open_video_dataset(path)]
    found = [
        open_video_dataset(d)
        for d in sorted(p for p in path.iterdir() if p.is_dir())
        if any(match(d) for _, match, _ in _LAYOUTS)
    ]
    if not found:
        raise DatasetError(f"{path} is neither a video dataset nor a folder of them: expected {_EXPECTED}")
    return found
