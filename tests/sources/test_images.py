"""The image folder source: raw bytes in path order; non-images and unreadable files counted."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from oddeye.frames import DecodeError, decode_image, encode_jpeg
from oddeye.sources.base import SourceError
from oddeye.sources.images import ImageFolderSource

T_FILES = 1_700_000_000.0


def _png(path: Path, level: int) -> bytes:
    ok, buf = cv2.imencode(".png", np.full((12, 16, 3), level, np.uint8))
    assert ok
    path.write_bytes(buf.tobytes())
    return buf.tobytes()


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "line-3"
    root.mkdir()
    for i in (2, 0, 1, 3):  # written out of order: the source sorts by path
        _png(root / f"img_{i:03d}.png", 40 * i)
    (root / "notes.txt").write_text("not an image")
    return root


def test_yields_every_image_in_path_order(folder: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="oddeye.sources.images"):
        src = ImageFolderSource(str(folder))
    frames = list(src)
    assert len(frames) == 4
    assert src.skipped == {"not_an_image": 1}
    assert len([r for r in caplog.records if "non-image" in r.getMessage()]) == 1
    assert [Path(f.origin["path"]).name for f in frames] == [f"img_{i:03d}.png" for i in range(4)]
    for i, f in enumerate(frames):
        assert f.camera_id == "line-3"
        assert f.seq == i
        assert f.origin == {"source": "images", "path": str(folder / f"img_{i:03d}.png")}
        assert isinstance(f.image, bytes)
        assert f.image == (folder / f"img_{i:03d}.png").read_bytes()
        assert decode_image(f.image)[0, 0, 0] == 40 * i
        assert f.timestamp == (folder / f"img_{i:03d}.png").stat().st_mtime  # the file's time, not the read time
        assert f.meta == {"still": True}


def test_recursive_loop_extensions_and_camera_id(folder: Path) -> None:
    sub = folder / "sub"
    sub.mkdir()
    _png(sub / "deep.PNG", 7)
    (sub / "photo.jpg").write_bytes(encode_jpeg(np.zeros((8, 8, 3), np.uint8)))

    assert len(list(ImageFolderSource(str(folder)))) == 4  # not recursive: sub/ ignored
    src = ImageFolderSource(str(folder), camera_id="cam-9", recursive=True, loop=True, extensions=["png"])
    assert src.skipped == {"not_an_image": 2}  # notes.txt, photo.jpg
    it = iter(src)
    frames = [next(it) for _ in range(12)]
    assert [f.seq for f in frames] == list(range(12))
    assert {f.camera_id for f in frames} == {"cam-9"}
    names = [Path(f.origin["path"]).name for f in frames[:5]]
    assert names == ["img_000.png", "img_001.png", "img_002.png", "img_003.png", "deep.PNG"]
    assert [f.origin["path"] for f in frames[5:10]] == [f.origin["path"] for f in frames[:5]]


def test_corrupt_jpeg_is_yielded_and_fails_downstream(tmp_path: Path) -> None:
    root = tmp_path / "cam"
    root.mkdir()
    good = encode_jpeg(np.full((16, 16, 3), 128, np.uint8))
    (root / "a.jpg").write_bytes(good)
    (root / "b.jpg").write_bytes(b"\xff\xd8garbage, not really a jpeg")
    src = ImageFolderSource(str(root))
    frames = list(src)
    assert len(frames) == 2 and src.skipped == {}
    assert decode_image(frames[0].image).shape == (16, 16, 3)
    with pytest.raises(DecodeError):
        decode_image(frames[1].image)


def test_file_vanishing_after_listing_is_counted(folder: Path) -> None:
    src = ImageFolderSource(str(folder))
    (folder / "img_001.png").unlink()
    frames = list(src)
    assert [Path(f.origin["path"]).name for f in frames] == ["img_000.png", "img_002.png", "img_003.png"]
    assert [f.seq for f in frames] == [0, 1, 2]
    assert src.skipped == {"not_an_image": 1, "read_error": 1}
    assert len(frames) + src.skipped["read_error"] == len(src.files)


def test_folder_without_images_names_folder_and_extensions(tmp_path: Path) -> None:
    empty = tmp_path / "empty-cam"
    empty.mkdir()
    with pytest.raises(SourceError, match="empty-cam") as info:
        ImageFolderSource(str(empty))
    assert ".jpg" in str(info.value) and ".png" in str(info.value)
    (empty / "readme.md").write_text("x")
    with pytest.raises(SourceError, match="empty-cam"):
        ImageFolderSource(str(empty))


def test_missing_folder_names_it(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="no-such-dir"):
        ImageFolderSource(str(tmp_path / "no-such-dir"))


def test_file_times_and_an_alert_per_image(tmp_path: Path) -> None:
    """24 defective images in a row, read within a fraction of a second, open 24 alerts; cooldown_s=2 swallows none."""
    from oddeye.frames import ScoredFrame
    from oddeye.pipeline.alerts import AlertPolicy, AlertTracker

    defective = set(range(3, 27))
    for i in range(40):
        _png(tmp_path / f"part_{i:03d}.png", 200 if i in defective else 10)
        os.utime(tmp_path / f"part_{i:03d}.png", (T_FILES + 60 * i, T_FILES + 60 * i))  # a part a minute
    policy = AlertPolicy(min_frames=3, close_frames=5, cooldown_s=2.0, update_interval_s=0)

    def alerts(src: ImageFolderSource) -> list:
        tracker, events = AlertTracker(policy), []
        for f in src:
            score = 0.9 if decode_image(f.image)[0, 0, 0] > 100 else 0.1  # stands in for the model
            sf = ScoredFrame(f.camera_id, f.seq, f.timestamp, score, score >= 0.5, "m", 1.0, meta=f.meta)
            events += tracker.update(sf)
        return events + tracker.close_all()

    t = time.monotonic()
    frames = list(ImageFolderSource(str(tmp_path)))
    assert time.monotonic() - t < 5
    assert [f.timestamp for f in frames] == [T_FILES + 60 * i for i in range(40)]
    per_image = alerts(ImageFolderSource(str(tmp_path)))
    opened = [a for a in per_image if a.state == "open"]
    assert len(opened) == 24 and [a.start_seq for a in opened] == sorted(defective)
    assert opened[0].started_at == T_FILES + 60 * 3
    stream = alerts(ImageFolderSource(str(tmp_path), alert_per_image=False))
    assert [a.state for a in stream] == ["open", "close"]  # one stream run: one alert, timed by file times
    assert stream[0].started_at == T_FILES + 60 * 3
