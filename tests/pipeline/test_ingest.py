"""The ingest stage without Ray: decoding, drop policies and accounting of every frame."""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import pytest

from oddeye.frames import Frame, encode_jpeg
from oddeye.pipeline.ingest import IngestWorker, TakeResult
from oddeye.sources.base import Source, SourceError


class ListSource(Source):
    def __init__(self, frames: list[Frame], delay_s: float = 0.0) -> None:
        super().__init__()
        self.frames = frames
        self.delay_s = delay_s
        self.acked: list[int] = []

    def __iter__(self) -> Iterator[Frame]:
        for f in self.frames:
            if self.delay_s:
                time.sleep(self.delay_s)
            yield f

    def ack(self, frame: Frame) -> None:
        self.acked.append(frame.seq)


def _jpeg_frames(n: int, corrupt: set[int] = frozenset()) -> list[Frame]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        img = rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)
        data = b"\xff\xd8garbage" if i in corrupt else encode_jpeg(img)
        out.append(Frame("cam", i, float(i), data, origin={"i": i}))
    return out


def _drain(w: IngestWorker, max_n: int = 4, limit_s: float = 10.0) -> tuple[list[Frame], list, TakeResult]:
    frames, dead = [], []
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        r = w.take(max_n, 0.2)
        frames += r.frames
        dead += r.dead_letters
        if r.exhausted:
            return frames, dead, r
    raise AssertionError("ingest did not finish")


def test_decodes_resizes_and_dead_letters_corrupt_frames() -> None:
    src = ListSource(_jpeg_frames(20, corrupt={3, 11}))
    w = IngestWorker(lambda: src, "cam", (32, 48), "block", queue_size=4)
    assert w.start() == {"ok": True, "error": None}
    frames, dead, _last = _drain(w)
    assert [f.seq for f in frames] == [i for i in range(20) if i not in (3, 11)]
    assert all(f.image.shape == (32, 48, 3) and f.image.dtype == np.uint8 for f in frames)
    assert [d.frame.seq for d in dead] == [3, 11]
    assert all(isinstance(d.frame.image, bytes) and "decode" in d.error for d in dead)
    stats = w.stop()
    assert stats.ingested == 20 and stats.decode_errors == 2 and stats.dead_letters == 2
    assert stats.dropped == {}
    token = next(f.meta["_token"] for f in frames if f.seq == 5)
    w.ack([token])
    assert src.acked == [5]


def test_drop_oldest_keeps_newest_and_counts_every_drop() -> None:
    src = ListSource(_jpeg_frames(30))
    w = IngestWorker(lambda: src, "cam", (32, 32), "drop_oldest", queue_size=5)
    w.start()
    deadline = time.monotonic() + 10
    while not w._finished and time.monotonic() < deadline:  # let the model "fall behind" completely
        time.sleep(0.01)
    frames, _, last = _drain(w, max_n=100)
    assert [f.seq for f in frames] == list(range(25, 30))
    assert last.stats.dropped == {"queue_full": 25}
    assert last.stats.ingested == len(frames) + last.stats.dropped["queue_full"]


def test_drop_newest_keeps_oldest() -> None:
    src = ListSource(_jpeg_frames(12))
    w = IngestWorker(lambda: src, "cam", (32, 32), "drop_newest", queue_size=4)
    w.start()
    time.sleep(0.5)
    frames, _, last = _drain(w, max_n=100)
    assert [f.seq for f in frames] == [0, 1, 2, 3]
    assert last.stats.dropped == {"queue_full": 8}


def test_stop_counts_queued_frames_as_shutdown() -> None:
    src = ListSource(_jpeg_frames(10))
    w = IngestWorker(lambda: src, "cam", (32, 32), "block", queue_size=3)
    w.start()
    time.sleep(0.3)
    got = w.take(1, 1.0).frames
    stats = w.stop()
    assert len(got) == 1
    # one taken, the queue's three and the one the blocked reader held are counted, the rest never read
    assert stats.ingested == len(got) + stats.dropped.get("shutdown", 0)
    assert stats.dropped["shutdown"] >= 3


def test_source_that_cannot_open_reports_error() -> None:
    def boom() -> Source:
        raise SourceError("video file /nope.mp4 does not exist")

    w = IngestWorker(boom, "cam", (32, 32), "block", queue_size=3)
    r = w.start()
    assert r["ok"] is False and "/nope.mp4" in r["error"]
    assert w.take(4, 0.1).exhausted


def test_bad_policy_rejected() -> None:
    with pytest.raises(ValueError, match="drop_policy"):
        IngestWorker(lambda: ListSource([]), "cam", (32, 32), "newest", queue_size=3)
