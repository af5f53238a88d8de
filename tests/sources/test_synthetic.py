"""The synthetic camera: reproducible frames, the anomaly schedule and its ground truth."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest

from oddeye.frames import decode_image
from oddeye.sources.synthetic import ANOMALY_KINDS, SyntheticCamera


def test_same_seed_and_seq_give_identical_frames() -> None:
    a = list(SyntheticCamera(num_frames=12, seed=3, start_time=0.0))
    b = list(SyntheticCamera(num_frames=12, seed=3, start_time=0.0))
    assert len(a) == len(b) == 12
    for fa, fb in zip(a, b, strict=True):
        assert fa.seq == fb.seq
        np.testing.assert_array_equal(fa.image, fb.image)
        assert fa.meta == fb.meta
    # Frame k does not depend on where iteration started.
    late = next(iter(SyntheticCamera(num_frames=1, seed=3, start_seq=7)))
    np.testing.assert_array_equal(late.image, a[7].image)
    other = next(iter(SyntheticCamera(num_frames=1, seed=4)))
    assert not np.array_equal(other.image, a[0].image)


def test_frames_have_the_documented_shape_and_fields() -> None:
    cam = SyntheticCamera(camera_id="cam-a", width=160, height=120, fps=5.0, num_frames=6, start_time=100.0)
    frames = list(cam)
    assert [f.seq for f in frames] == list(range(6))
    for f in frames:
        assert f.camera_id == "cam-a"
        assert isinstance(f.image, np.ndarray)
        assert f.image.shape == (120, 160, 3) and f.image.dtype == np.uint8
        assert f.timestamp == pytest.approx(100.0 + f.seq / 5.0)
        assert f.origin == {"source": "synthetic", "seq": f.seq}
        assert f.meta == {"anomaly": False, "kind": None, "box": None}
    assert cam.live is False
    assert frames[1].image.std() > 20  # a textured scene, not a flat colour


def test_objects_move_between_frames() -> None:
    cam = SyntheticCamera(anomaly_every=0, num_frames=None)
    a, b = cam.render(0)[0], cam.render(30)[0]
    changed = np.abs(a.astype(int) - b.astype(int)).max(axis=2) > 40
    assert changed.sum() > 200


def test_anomaly_schedule_labels_and_kind_cycle() -> None:
    every, duration = 10, 3
    frames = list(SyntheticCamera(num_frames=60, anomaly_every=every, anomaly_duration=duration))
    assert len(frames) == 60
    for f in frames:
        anomalous = f.seq % every >= every - duration
        assert f.meta["anomaly"] is anomalous
        if anomalous:
            assert f.meta["kind"] == ANOMALY_KINDS[(f.seq // every) % len(ANOMALY_KINDS)]
            assert f.meta["box"] is not None
        else:
            assert f.meta["kind"] is None and f.meta["box"] is None
    assert sum(f.meta["anomaly"] for f in frames) == 6 * duration
    assert [f.meta["kind"] for f in frames if f.seq % every == every - 1] == list(ANOMALY_KINDS) * 2


def test_no_anomalies_when_disabled() -> None:
    frames = list(SyntheticCamera(num_frames=250, anomaly_every=0, width=64, height=48))
    assert len(frames) == 250
    assert not any(f.meta["anomaly"] for f in frames)


@pytest.mark.parametrize("kind", ANOMALY_KINDS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_anomaly_is_visible_inside_its_box(kind: str, seed: int) -> None:
    every, duration = 20, 5
    # Without figures nothing can stand in front of a defect (with figures it may be partly hidden, as in life).
    n = 3 if kind == "wrong_motion" else 0
    kw = {"seed": seed, "num_objects": n}
    cam = SyntheticCamera(anomaly_every=every, anomaly_duration=duration, anomaly_kinds=[kind], **kw)
    reference = SyntheticCamera(anomaly_every=0, **kw)
    for seq in range(every - duration, 3 * every, every // 2):
        image, meta = cam.render(seq)
        if not meta["anomaly"]:
            assert np.array_equal(image, reference.render(seq)[0])
            continue
        assert meta["kind"] == kind
        x1, y1, x2, y2 = meta["box"]
        assert 0 <= x1 < x2 <= cam.width and 0 <= y1 < y2 <= cam.height
        inside = np.abs(image[y1:y2, x1:x2].astype(int) - reference.render(seq)[0][y1:y2, x1:x2].astype(int))
        changed = inside.max(axis=2)
        assert changed.mean() > 15 and (changed > 30).mean() > 0.2, (seq, meta)
        outside = np.abs(image.astype(int) - reference.render(seq)[0].astype(int))
        outside[y1:y2, x1:x2] = 0
        if kind != "wrong_motion":  # a wrongly moving figure is missing from its normal place
            assert outside.max() == 0


def test_anomaly_location_stays_put_within_a_period() -> None:
    cam = SyntheticCamera(anomaly_every=40, anomaly_duration=20, anomaly_kinds=["foreign_object", "texture_defect"])
    for start in (20, 60):
        boxes = np.array([cam.render(seq)[1]["box"] for seq in range(start, start + 20)])
        assert np.abs(boxes - boxes[0]).max() <= 10


def test_encode_gives_decodable_jpeg() -> None:
    frames = list(SyntheticCamera(num_frames=3, encode=True, width=160, height=120))
    assert len(frames) == 3
    for f in frames:
        assert isinstance(f.image, bytes) and f.image[:2] == b"\xff\xd8"
        assert decode_image(f.image).shape == (120, 160, 3)


def test_realtime_paces_to_fps() -> None:
    cam = SyntheticCamera(fps=20.0, num_frames=6, realtime=True, width=64, height=48)
    assert cam.live is True
    t0 = time.time()
    frames = list(cam)
    elapsed = time.time() - t0
    assert len(frames) == 6
    assert 0.2 <= elapsed < 2.0  # 5 intervals of 50 ms
    stamps = [f.timestamp for f in frames]
    assert all(b > a for a, b in itertools.pairwise(stamps))
    assert t0 - 0.01 <= stamps[0] and stamps[-1] <= time.time() + 0.01


def test_endless_when_num_frames_is_none() -> None:
    it = iter(SyntheticCamera(num_frames=None, width=64, height=48))
    assert [next(it).seq for _ in range(700)][-1] == 699


def test_unknown_kind_names_the_allowed_kinds() -> None:
    with pytest.raises(ValueError, match="allowed") as info:
        SyntheticCamera(anomaly_kinds=["foreign_object", "meteor"])
    assert "meteor" in str(info.value)
    for kind in ANOMALY_KINDS:
        assert kind in str(info.value)


def test_wrong_motion_needs_an_object() -> None:
    with pytest.raises(ValueError, match="num_objects"):
        SyntheticCamera(num_objects=0, anomaly_kinds=["wrong_motion"])
    assert len(list(SyntheticCamera(num_objects=0, num_frames=5, anomaly_every=0))) == 5
