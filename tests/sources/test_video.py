"""The video file source: every frame in order, clear errors, unreadable tails counted."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from oddeye.sources.base import SourceError
from oddeye.sources.video import VideoFileSource

N_FRAMES = 30
FPS = 10.0


def _write_video(path: Path, n: int = N_FRAMES) -> Path:
    """An MJPG AVI whose frame i is a flat grey of level 8*i (in the red channel 255-8*i)."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), FPS, (64, 48))
    assert writer.isOpened()
    for i in range(n):
        bgr = np.empty((48, 64, 3), np.uint8)
        bgr[:] = (8 * i, 8 * i, 255 - 8 * i)  # BGR: red falls as the frame number rises
        writer.write(bgr)
    writer.release()
    return path


def _frame_number(rgb: np.ndarray) -> int:
    return round(float(rgb[..., 1].mean()) / 8)


@pytest.fixture
def video(tmp_path: Path) -> Path:
    return _write_video(tmp_path / "dock-cam.avi")


def test_reads_every_frame_in_order(video: Path) -> None:
    src = VideoFileSource(str(video))
    start = time.time()
    frames = list(src)
    assert len(frames) == N_FRAMES
    assert src.skipped == {}
    assert src.camera_id == "dock-cam" and src.live is False
    assert src.fps == pytest.approx(FPS)
    for i, f in enumerate(frames):
        assert f.camera_id == "dock-cam"
        assert f.seq == i
        assert f.origin == {"source": "video", "path": str(video), "frame_index": i}
        assert isinstance(f.image, np.ndarray) and f.image.shape == (48, 64, 3) and f.image.dtype == np.uint8
        assert _frame_number(f.image) == i
        assert abs(float(f.image[..., 0].mean()) - (255 - 8 * i)) < 6  # red first: converted from BGR
        assert f.timestamp == pytest.approx(frames[0].timestamp + i / FPS)
    assert start - 1 <= frames[0].timestamp <= time.time()


def test_camera_id_override_and_loop(video: Path) -> None:
    src = VideoFileSource(str(video), camera_id="gate", loop=True)
    it = iter(src)
    frames = [next(it) for _ in range(2 * N_FRAMES + 5)]
    assert {f.camera_id for f in frames} == {"gate"}
    assert [f.seq for f in frames] == list(range(2 * N_FRAMES + 5))
    assert [f.origin["frame_index"] for f in frames] == [i % N_FRAMES for i in range(2 * N_FRAMES + 5)]
    assert [_frame_number(f.image) for f in frames] == [i % N_FRAMES for i in range(2 * N_FRAMES + 5)]
    stamps = [f.timestamp for f in frames]
    assert all(b > a for a, b in itertools.pairwise(stamps))


def test_realtime_paces_at_the_file_fps(tmp_path: Path) -> None:
    src = VideoFileSource(str(_write_video(tmp_path / "short.avi", n=4)), realtime=True)
    assert src.live is True
    t0 = time.monotonic()
    assert len(list(src)) == 4
    assert 0.25 <= time.monotonic() - t0 < 2.0  # 3 intervals of 100 ms


def test_missing_path_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope.mp4"
    with pytest.raises(SourceError, match=r"nope\.mp4"):
        VideoFileSource(str(missing))


@pytest.mark.parametrize("content", [b"this is not a video\n" * 50, b""])
def test_non_video_file_is_rejected(tmp_path: Path, content: bytes) -> None:
    bogus = tmp_path / "notes.avi"
    bogus.write_bytes(content)
    with pytest.raises(SourceError, match=r"notes\.avi") as info:
        VideoFileSource(str(bogus))
    assert "cannot open" in str(info.value) or "no frames" in str(info.value)


def test_truncated_file_ends_early_and_counts_unread_frames(video: Path, tmp_path: Path) -> None:
    truncated = tmp_path / "cut.avi"
    data = video.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    src = VideoFileSource(str(truncated))
    assert src.frame_count == N_FRAMES
    frames = list(src)
    assert 0 < len(frames) < N_FRAMES
    assert [_frame_number(f.image) for f in frames] == list(range(len(frames)))
    assert len(frames) + src.skipped["read_error"] == N_FRAMES
