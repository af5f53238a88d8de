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


@pytest.mark.parametrize("decode_workers", [1, 3])
def test_decodes_resizes_and_dead_letters_corrupt_frames(decode_workers: int) -> None:
    """With a decode pool too, frames come out in the source's order and every bad one is a dead letter."""
    src = ListSource(_jpeg_frames(20, corrupt={3, 11}))
    w = IngestWorker(lambda: src, "cam", (32, 48), "block", queue_size=4, decode_workers=decode_workers)
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


@pytest.mark.parametrize("decode_workers", [1, 3])
def test_stop_counts_queued_frames_as_shutdown(decode_workers: int) -> None:
    src = ListSource(_jpeg_frames(10))
    w = IngestWorker(lambda: src, "cam", (32, 32), "block", queue_size=3, decode_workers=decode_workers)
    w.start()
    time.sleep(0.3)
    got = w.take(1, 1.0).frames
    stats = w.stop()
    assert len(got) == 1
    # one taken, the queue's three and the one the blocked reader held are counted, the rest never read
    assert stats.ingested == len(got) + stats.dropped.get("shutdown", 0)
    assert stats.dropped["shutdown"] >= 3


def test_frames_in_the_decode_pool_count_as_waiting() -> None:
    """A blocked worker with a decode pool: every frame read is queued or being decoded, none unaccounted."""
    src = ListSource(_jpeg_frames(10))
    w = IngestWorker(lambda: src, "cam", (32, 32), "block", queue_size=2, decode_workers=3)
    w.start()
    deadline = time.monotonic() + 10
    while w.stats.ingested < 10 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    w._sync_source_skips()
    assert w.stats.ingested == 10 and w.stats.queue_depth == 10 and w.stats.unacked == 10
    frames, _, last = _drain(w, max_n=100)
    assert [f.seq for f in frames] == list(range(10)) and last.stats.queue_depth == 0
    w.stop()


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


class DlqSource(ListSource):
    """A source with a dead-letter path that fails the first ``fail`` times."""

    def __init__(self, frames: list[Frame], fail: int = 0) -> None:
        super().__init__(frames)
        self.fail = fail
        self.dead: list[tuple[int, bytes, str]] = []

    def dead_letter(self, frame: Frame, error: str) -> bool:
        if self.fail > 0:
            self.fail -= 1
            return False
        self.dead.append((frame.seq, bytes(frame.image), error))
        self.ack(frame)
        return True


def _png_bomb() -> bytes:
    """A 57-byte PNG whose header declares 40000×40000 pixels."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 40000, 40000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_any_decoder_failure_is_a_dead_letter_and_the_source_goes_on() -> None:
    good = _jpeg_frames(3)
    bad = [Frame("cam", 10, 0.0, _png_bomb()), Frame("cam", 11, 0.0, b""), Frame("cam", 12, 0.0, b"\x89PNG\r\n")]
    src = DlqSource(good[:1] + bad + good[1:])
    w = IngestWorker(lambda: src, "cam", (32, 32), "block", queue_size=4, max_pixels=50_000_000)
    w.start()
    frames, dead, _ = _drain(w)
    assert [f.seq for f in frames] == [0, 1, 2]  # the reader thread survived every bad frame
    assert sorted(d.frame.seq for d in dead) == [10, 11, 12]
    assert [s for s, _, _ in src.dead] == [10, 11, 12]  # with their original bytes on the source's DLQ
    assert src.dead[0][1] == _png_bomb() and "max_pixels" in src.dead[0][2]
    w.stop()


def test_frames_that_fail_to_score_go_to_the_dead_letter_path_with_original_bytes() -> None:
    originals = _jpeg_frames(4)
    payloads = [bytes(f.image) for f in originals]  # the worker decodes the frames in place
    src = DlqSource(list(originals), fail=1)
    w = IngestWorker(lambda: src, "cam", (32, 32), "block", queue_size=8)
    w.start()
    frames, _, _ = _drain(w)
    tokens = [f.meta["_token"] for f in frames]
    assert w.pending() == 4
    out = w.dead_letter([(tokens[1], "ValueError: boom", "model_error")])
    assert [d.frame.seq for d in out] == [1] and out[0].reason == "model_error"
    assert out[0].frame.image == b"" and out[0].frame.meta["payload_bytes"] == len(payloads[1])
    assert src.dead == [] and src.acked == []  # the DLQ failed once: kept, not acked, not lost
    w.take(1, 0.0)  # each take retries pending dead letters
    assert [s for s, _, _ in src.dead] == [1] and src.dead[0][1] == payloads[1] and src.acked == [1]
    w.ack([tokens[0], tokens[2], tokens[3]])
    assert sorted(src.acked) == [0, 1, 2, 3] and w.pending() == 0
    w.stop()


def test_camera_cap_dead_letters_new_cameras_and_forgets_idle_ones() -> None:
    frames_in = [Frame(f"cam-{i % 3}", i, 0.0, f.image) for i, f in enumerate(_jpeg_frames(6))]
    src = DlqSource(frames_in)
    w = IngestWorker(lambda: src, "kafka", (32, 32), "block", queue_size=8, max_cameras=2)
    w.start()
    frames, dead, _ = _drain(w)
    assert sorted({f.camera_id for f in frames}) == ["cam-0", "cam-1"]
    assert [d.frame.seq for d in dead] == [2, 5] and {d.reason for d in dead} == {"too_many_cameras"}
    w.stop()
    w2 = IngestWorker(lambda: DlqSource([]), "k", (32, 32), "block", queue_size=2, max_cameras=1, camera_idle_s=0.0)
    assert w2._admit_camera(Frame("a", 0, 0.0, b"")) and w2._admit_camera(Frame("b", 1, 0.0, b""))  # a was idle


def test_lossy_policy_without_permission_never_acks_dropped_frames() -> None:
    src = ListSource(_jpeg_frames(30))
    w = IngestWorker(lambda: src, "cam", (32, 32), "drop_oldest", queue_size=5, ack_dropped=False)
    w.start()
    deadline = time.monotonic() + 10
    while w.stats.ingested < 30 and time.monotonic() < deadline:
        time.sleep(0.02)
    stats = w.stop()
    assert stats.dropped.get("queue_full", 0) > 0 and src.acked == []
