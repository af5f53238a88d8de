"""Snapshot sink: the JPEG decodes, shows the heat map, stays inside out_dir, keeps a bounded number."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

from oddeye.frames import Alert, ScoredFrame, decode_image
from oddeye.sinks.snapshots import SnapshotSink, safe_name

T0 = 1_700_000_000.0
H, W = 120, 160


def make_frame(cam: str = "cam-1", seq: int = 5, with_map: bool = True, image: bool = True) -> ScoredFrame:
    img = np.full((H, W, 3), 128, np.uint8)  # mid grey
    amap = None
    if with_map:
        amap = np.zeros((H // 2, W // 2), np.uint8)  # half size: the sink resizes it
        amap[:, W // 4 :] = 230  # right half anomalous (JET: bright red; 255 is dark red)
    return ScoredFrame(
        cam,
        seq,
        T0 + seq,
        0.93,
        True,
        "padim",
        4.0,
        image=img if image else None,
        anomaly_map=amap,
        boxes=[[90, 30, 150, 100, 0.9]],
    )


def make_alert(cam: str = "cam-1", seq: int = 5) -> Alert:
    return Alert(f"{cam}-{seq}", cam, "open", T0 + seq, None, 0.93, 3, "padim", seq=seq)


def test_snapshot_decodes_at_image_size_with_heat_on_the_anomaly(tmp_path: Path) -> None:
    sink = SnapshotSink(tmp_path)
    path = sink.save(make_alert(), make_frame())
    assert path == str(tmp_path / "snapshots" / "cam-1" / "cam-1-5.jpg")
    rgb = decode_image(Path(path).read_bytes())
    assert rgb.shape == (H, W, 3)
    region = (slice(H // 2, H - 10), slice(W // 2 + 5, W - 20))  # high map, inside the box, below the caption
    hot = rgb[region].astype(float).mean(axis=(0, 1))
    cold = rgb[H // 2 :, 5 : W // 2 - 5].astype(float).mean(axis=(0, 1))
    assert hot[0] > 128 + 30 and hot[0] > hot[2] + 60  # red-ish, redder than the grey original
    assert cold[2] > cold[0] + 30  # the low part is blue-ish (JET at 0)
    red_edge = rgb[60, 150]  # a box edge (x2 = 150) is drawn in red
    assert red_edge[0] > 180 and red_edge[1] < 100
    assert sink.failures == 0 and sink.saved == 1


def test_no_map_is_plain_image_with_caption(tmp_path: Path) -> None:
    sink = SnapshotSink(tmp_path)
    frame = make_frame(with_map=False)
    frame.boxes = None
    rgb = decode_image(Path(sink.save(make_alert(), frame)).read_bytes())
    body = rgb[40:, :].astype(int)
    assert np.abs(body - 128).max() < 12  # untouched below the caption band (JPEG noise only)
    assert rgb[:12].astype(int).mean() < 100  # the dark caption band


def test_no_image_returns_none_and_logs_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    sink = SnapshotSink(tmp_path)
    assert sink.save(make_alert(), make_frame(image=False)) is None
    assert sink.save(make_alert(), make_frame(image=False)) is None
    assert len([r for r in caplog.records if "no snapshot" in r.getMessage()]) == 1
    assert sink.failures == 0


def test_retention_keeps_newest_per_camera(tmp_path: Path) -> None:
    old_dir = tmp_path / "snapshots" / "cam-1"
    old_dir.mkdir(parents=True)
    (old_dir / "cam-1-0.jpg").write_bytes(b"from an earlier run")
    sink = SnapshotSink(tmp_path, max_per_camera=3)
    for seq in range(10, 15):
        assert sink.save(make_alert(seq=seq), make_frame(seq=seq))
    sink.save(make_alert("cam-2", 1), make_frame("cam-2", 1))
    assert sorted(p.name for p in old_dir.iterdir()) == ["cam-1-12.jpg", "cam-1-13.jpg", "cam-1-14.jpg"]
    assert [p.name for p in (tmp_path / "snapshots" / "cam-2").iterdir()] == ["cam-2-1.jpg"]
    # a replayed alert rewrites its file without counting twice
    sink.save(make_alert(seq=13), make_frame(seq=13))
    assert len(list(old_dir.iterdir())) == 3


def test_camera_id_cannot_escape_out_dir(tmp_path: Path) -> None:
    out = tmp_path / "out"
    sink = SnapshotSink(out)
    for cam in ("../../evil", "..", "a/b\\c", "/etc/passwd", ""):
        path = sink.save(make_alert(cam), make_frame(cam))
        assert path is not None
        resolved = Path(path).resolve()
        assert resolved.is_relative_to((out / "snapshots").resolve()), path
        assert resolved.parent.parent == (out / "snapshots").resolve()
    assert not (tmp_path / "evil").exists()
    assert safe_name("../x") == "_._x" and safe_name("..") == "_." and safe_name("cam 1:ok") == "cam_1_ok"


def test_unwritable_returns_none_and_counts(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    sink = SnapshotSink(blocker)  # constructing never raises
    assert sink.save(make_alert(), make_frame()) is None
    assert sink.failures == 1
    assert any("cannot write snapshot" in r.getMessage() for r in caplog.records)


def test_write_and_write_alert_are_noops(tmp_path: Path) -> None:
    sink = SnapshotSink(tmp_path)
    sink.write([make_frame()])
    sink.write_alert(make_alert())
    sink.close()
    assert not (tmp_path / "snapshots").exists()


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"max_per_camera": 0}, "max_per_camera"), ({"quality": 0}, "quality"), ({"alpha": 2}, "alpha")],
)
def test_invalid_arguments(tmp_path: Path, kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SnapshotSink(tmp_path, **kwargs)


def test_retention_by_age(tmp_path: Path) -> None:
    old_dir = tmp_path / "snapshots" / "cam-1"
    old_dir.mkdir(parents=True)
    stale = old_dir / "cam-1-0.jpg"
    stale.write_bytes(b"from a run an hour ago")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    sink = SnapshotSink(tmp_path, max_per_camera=100, max_age_s=60)
    assert sink.save(make_alert(seq=10), make_frame(seq=10))
    assert sorted(p.name for p in old_dir.iterdir()) == ["cam-1-10.jpg"]
    sink.max_age_s = 0.05
    time.sleep(0.1)
    assert sink.save(make_alert(seq=11), make_frame(seq=11))
    assert sorted(p.name for p in old_dir.iterdir()) == ["cam-1-11.jpg"]  # the newest is always kept
