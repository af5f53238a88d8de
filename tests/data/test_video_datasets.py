"""Video dataset layouts (UCSD, Avenue, ShanghaiTech) and the synthetic scenes."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from oddeye.data import DatasetError, find_video_datasets, is_video_dataset, open_video_dataset
from oddeye.data.synth_video import SynthVideoSpec, _draw_event, _Walker, write_video_benchmark

SPEC = SynthVideoSpec(width=96, height=72, scenes=1, train_clips=1, test_clips=3, frames=40, walkers=2)


def _frames(folder: Path, n: int, value: int = 100) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for t in range(n):
        cv2.imwrite(str(folder / f"{t:03d}.png"), np.full((24, 32, 3), value, np.uint8))


def test_synthetic_scenes_in_shanghaitech_layout(tmp_path: Path) -> None:
    write_video_benchmark(tmp_path, seed=1, spec=SPEC)
    assert is_video_dataset(tmp_path)
    (ds,) = find_video_datasets(tmp_path)
    assert ds.layout == "shanghaitech" and len(ds.train) == 1 and len(ds.test) == 3
    for clip in ds.test:
        frames = clip.load((72, 96))
        assert frames.shape == (40, 72, 96, 3)
        assert clip.labels is not None and 0 < clip.labels.sum() < 40  # every event is visible, not always
    assert ds.train[0].labels is None


def test_synthetic_event_labels_follow_its_pixels_not_its_centre() -> None:
    """A frame is anomalous when any pixel of the event is in it: not while a walker's centre is merely near."""
    w, height = 96, 16.0
    walker = _Walker((40, 80, 200), 0.0, 60.0, -1.0, 0.0, height)
    img = np.zeros((72, w, 3), np.uint8)
    assert not _draw_event(img, "wrong_direction", walker, w + 0.6 * height, 0) and not img.any()
    assert _draw_event(img, "wrong_direction", walker, w + 0.1 * height, 0) and img.any()
    img[:] = 0  # a cart is wider than the walker's height: it shows while its centre is still outside
    assert _draw_event(img, "object", walker, -1.5 * height, 0) and img.any()


def test_ucsd_layout_labels_from_masks(tmp_path: Path) -> None:
    root = tmp_path / "UCSDped2"
    _frames(root / "Train" / "Train001", 5)
    _frames(root / "Test" / "Test001", 4)
    gt = root / "Test" / "Test001_gt"
    gt.mkdir()
    for t in range(4):
        m = np.zeros((24, 32), np.uint8)
        if t >= 2:
            m[3:6, 3:6] = 255
        cv2.imwrite(str(gt / f"{t:03d}.bmp"), m)
    ds = open_video_dataset(root)
    assert ds.layout == "ucsd" and [c.name for c in ds.test] == ["Test001"]
    assert ds.test[0].labels.tolist() == [False, False, True, True]
    gt.rename(root / "Test" / "elsewhere")
    with pytest.raises(DatasetError, match="Test001_gt"):
        open_video_dataset(root)


def test_avenue_layout_with_video_files_and_npy_labels(tmp_path: Path) -> None:
    root = tmp_path / "Avenue"
    for split in ("training_videos", "testing_videos"):
        (root / split).mkdir(parents=True)
        writer = cv2.VideoWriter(str(root / split / "01.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 10, (32, 24))
        for _ in range(6):
            writer.write(np.full((24, 32, 3), 90, np.uint8))
        writer.release()
    with pytest.raises(DatasetError, match=r"1_label\.mat"):
        open_video_dataset(root)
    (root / "testing_labels").mkdir()
    np.save(root / "testing_labels" / "01.npy", np.array([0, 0, 1, 1, 0, 0]))
    ds = open_video_dataset(root)
    assert ds.layout == "avenue" and ds.test[0].load((24, 32)).shape == (6, 24, 32, 3)


def test_not_a_video_dataset(tmp_path: Path) -> None:
    assert not is_video_dataset(tmp_path)
    with pytest.raises(DatasetError, match="Train/ \\+ Test/"):
        open_video_dataset(tmp_path)
    (tmp_path / "training" / "frames").mkdir(parents=True)
    (tmp_path / "testing").mkdir()
    with pytest.raises(DatasetError, match="no training clips"):
        open_video_dataset(tmp_path)
