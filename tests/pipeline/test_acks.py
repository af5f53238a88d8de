"""Acknowledgements wait for confirming sinks, without blocking, in write order."""

from __future__ import annotations

from oddeye.pipeline.acks import AckTracker
from oddeye.sinks.base import Sink


class ConfirmingSink(Sink):
    acknowledges = True

    def __init__(self, limit: int = 100) -> None:
        self.accepted = 0
        self.delivered = 0
        self.limit = limit

    def write(self, frames) -> None:  # type: ignore[no-untyped-def]
        self.accepted += len(frames)

    def mark(self) -> int:
        return self.accepted

    def confirmed(self) -> int:
        return self.delivered

    @property
    def saturated(self) -> bool:
        return self.accepted - self.delivered >= self.limit


def test_frames_are_released_only_after_every_confirming_sink_delivers() -> None:
    a, b, plain = ConfirmingSink(), ConfirmingSink(), Sink()
    acks = AckTracker([a, plain, b])
    a.write([1, 2]), b.write([1, 2])
    acks.add(0, [10, 11])
    a.write([3]), b.write([3])
    acks.add(1, [12])
    assert acks.ready() == {} and acks.pending == 3
    a.delivered = 3  # a has everything, b nothing yet
    assert acks.ready() == {}
    b.delivered = 2  # b delivered the first batch only
    assert acks.ready() == {0: [10, 11]} and acks.pending == 1
    b.delivered = 3
    assert acks.ready() == {1: [12]} and acks.pending == 0


def test_no_confirming_sink_releases_at_once() -> None:
    acks = AckTracker([Sink()])
    acks.add(0, [1, 2])
    acks.add(0, [3])
    assert acks.ready() == {0: [1, 2, 3]}


def test_saturation_from_a_sink_or_too_many_pending() -> None:
    sink = ConfirmingSink(limit=5)
    acks = AckTracker([sink], max_pending=3)
    assert not acks.saturated
    sink.write([0] * 5)
    assert acks.saturated  # the sink's buffer is full: take no new frames
    sink.delivered = 5
    assert not acks.saturated
    acks.add(0, [1, 2, 3])
    assert acks.saturated  # too many frames wait for confirmation
