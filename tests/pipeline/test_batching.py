from __future__ import annotations

from oddeye.frames import Frame
from oddeye.pipeline.batching import Batcher


def _frames(n: int, cam: str = "c") -> list[Frame]:
    return [Frame(cam, i, float(i), b"") for i in range(n)]


def test_full_batch_released_at_once() -> None:
    b = Batcher(max_batch_size=4, max_wait_ms=1000)
    b.add(_frames(3), now=0.0)
    assert not b.ready(now=0.0)
    b.add(_frames(2), now=0.0)
    assert b.ready(now=0.0)
    assert [f.seq for f in b.pop()] == [0, 1, 2, 0]
    assert len(b) == 1


def test_partial_batch_released_after_max_wait() -> None:
    b = Batcher(max_batch_size=8, max_wait_ms=50)
    b.add(_frames(2), now=10.0)
    assert not b.ready(now=10.02)
    assert abs(b.time_to_ready(now=10.02) - 0.03) < 1e-9
    assert b.ready(now=10.05)
    assert len(b.pop()) == 2
    assert b.time_to_ready() is None


def test_flush_releases_anything_and_keeps_order() -> None:
    b = Batcher(max_batch_size=3, max_wait_ms=1e6)
    b.add(_frames(5, "a"), now=0.0)
    out = []
    while b.ready(now=0.0, flush=True):
        out += b.pop()
    assert [f.seq for f in out] == [0, 1, 2, 3, 4]
