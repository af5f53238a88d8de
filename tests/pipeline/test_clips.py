from __future__ import annotations

import numpy as np

from oddeye.pipeline.clips import ClipBuffers


def img(v: int, shape: tuple[int, int] = (4, 4)) -> np.ndarray:
    return np.full((*shape, 3), v, np.uint8)


def test_clips_of_consecutive_frames_never_mix_cameras() -> None:
    b = ClipBuffers(clip_length=3)
    out = []
    for seq in range(5):  # two cameras interleaved
        out.append(("a", b.push("a", seq, img(seq))))
        out.append(("b", b.push("b", seq, img(100 + seq))))
    clips = [(cam, c) for cam, c in out if c is not None]
    assert len(clips) == 6
    for cam, clip in clips:
        values = clip[:, 0, 0, 0].tolist()
        base = 0 if cam == "a" else 100
        assert all(base <= v < base + 5 for v in values)
        assert values == list(range(values[0], values[0] + 3))


def test_gap_reorder_and_resolution_change_reset_and_count() -> None:
    b = ClipBuffers(clip_length=2)
    assert b.push("a", 0, img(0)) is None
    assert b.push("a", 1, img(1)) is not None
    assert b.push("a", 3, img(3)) is None  # gap
    assert b.push("a", 2, img(2)) is None  # reordered
    assert b.push("a", 3, img(3, (8, 8))) is None  # new resolution
    assert b.push("a", 4, img(4, (8, 8))).shape == (2, 8, 8, 3)
    assert b.resets == {"seq_gap": 1, "seq_reordered": 1, "resolution_change": 1}


def test_memory_bounded_by_max_cameras() -> None:
    b = ClipBuffers(clip_length=2, max_cameras=3)
    for i in range(10):
        b.push(f"cam{i}", 0, img(i))
    assert len(b) == 3 and b.resets["evicted"] == 7
