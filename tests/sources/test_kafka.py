"""KafkaSource against a real broker (tansu): wire format, contiguous commits, dead letters, lag, restarts."""

from __future__ import annotations

import queue
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from oddeye.frames import Frame, decode_image
from oddeye.sources.base import SourceError
from oddeye.sources.kafka import KafkaSource, encode_frame, frame_from_record

FAST = {"session_timeout_ms": 3000, "heartbeat_interval_ms": 500, "reconnect_initial_s": 0.2, "reconnect_max_s": 1.0}


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


class _Record:
    """Stands in for kafka-python's ConsumerRecord."""

    def __init__(
        self, value: Any, key: Any = None, headers: Any = (), offset: int = 7, timestamp: int = 1_700_000_000_000
    ):
        self.topic, self.partition, self.offset = "frames", 0, offset
        self.key, self.value, self.headers, self.timestamp = key, value, list(headers), timestamp


def _image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (24, 32, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------- no broker


def test_wire_format_round_trip_and_fallbacks() -> None:
    key, value, headers = encode_frame(Frame("gate-1", 42, 1_700_000_123.456, _image()), quality=95)
    f = frame_from_record(_Record(value, key, headers))
    assert (f.camera_id, f.seq, f.timestamp) == ("gate-1", 42, pytest.approx(1_700_000_123.456))
    assert f.origin == {"topic": "frames", "partition": 0, "offset": 7} and "error" not in f.meta
    assert decode_image(f.image).shape == (24, 32, 3)
    png = b"\x89PNG\r\n\x1a\n" + b"x" * 10  # encoded bytes pass through, content type sniffed
    assert dict(encode_frame(Frame("c", 1, 0.0, png))[2])["content-type"] == b"image/png"

    # key instead of the camera_id header; no seq → the offset; no ts → the message timestamp
    f = frame_from_record(_Record(value, b"cam-k", [("content-type", b"image/JPEG; q=1")]))
    assert (f.camera_id, f.seq, f.timestamp, f.meta.get("error")) == ("cam-k", 7, 1_700_000_000.0, None)

    bad = {
        "missing_camera_id": _Record(value, None, [("seq", b"1")]),
        "bad_header": _Record(value, b"c", [("seq", b"one")]),
        "content_type": _Record(value, b"c", [("content-type", b"video/h264")]),
        "empty": _Record(None, b"c"),
        "oversized": _Record(b"\xff\xd8\xff" + b"0" * 5000, b"c"),
    }
    for reason, record in bad.items():
        f = frame_from_record(record, max_message_bytes=4096)
        assert f.meta["error_reason"] == reason and f.meta["error"], reason
    assert frame_from_record(bad["oversized"], 4096).image == b""
    assert frame_from_record(_Record(value, None, [("ts", b"soon"), ("camera_id", b"c")])).meta["error_reason"] == (
        "bad_header"
    )


def test_bad_settings_are_errors_and_secrets_are_redacted() -> None:
    with pytest.raises(SourceError, match="topic name"):
        KafkaSource(topics=["no spaces"])
    with pytest.raises(SourceError, match="enable_auto_commit"):
        KafkaSource(consumer={"enable_auto_commit": True})
    with pytest.raises(SourceError, match="unknown kafka-python"):
        KafkaSource(consumer={"fetch_speed": 3})
    src = KafkaSource(security={"security_protocol": "SASL_SSL", "sasl_plain_password": "hunter2"})
    described = src.describe()
    assert "hunter2" not in repr(described) and described["security"]["security_protocol"] == "SASL_SSL"


# ----------------------------------------------------------------------------- real broker


def _produce(
    bootstrap: str, topic: str, n: int, start: int = 0, camera: str = "cam", partition: int | None = None, sync=False
) -> None:
    """Publish frames ``start..start+n-1``; ``sync`` sends them one by one (tansu reports the end of a
    partition as the last *batch*'s base offset + 1, so seeking to the end needs unbatched messages)."""
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    for i in range(start, start + n):
        key, value, headers = encode_frame(Frame(camera, i, time.time(), _image(i)))
        future = producer.send(topic, key=key, value=value, headers=headers, partition=partition)
        if sync:
            future.get(10)
    producer.flush()
    producer.close()


def _committed(bootstrap: str, group: str) -> dict[int, int]:
    from kafka import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        offsets = admin.list_group_offsets({group: None})[group]
    finally:
        admin.close()
    return {tp.partition: om.offset for tp, om in offsets.items() if om.offset >= 0}


class _Reader:
    """Iterates a source on its own thread (as the ingest worker does) into a queue."""

    def __init__(self, source: KafkaSource, on_frame: Callable[[Frame], None] | None = None) -> None:
        self.source, self.frames = source, queue.Queue()
        self.on_frame = on_frame
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        for f in self.source:
            if self.on_frame is not None:
                self.on_frame(f)
            self.frames.put(f)

    def take(self, n: int, timeout_s: float = 20.0) -> list[Frame]:
        deadline, out = time.monotonic() + timeout_s, []
        while len(out) < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"only {len(out)} of {n} frames within {timeout_s}s")
            try:
                out.append(self.frames.get(timeout=remaining))
            except queue.Empty:
                continue
        return out

    def close(self) -> None:
        self.source.close()
        self.thread.join(10)
        assert not self.thread.is_alive()


def _wait_for(cond: Callable[[], bool], timeout_s: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_out_of_order_acks_commit_contiguous_and_restart_resumes(kafka_broker) -> None:
    topic, group = _name("frames"), _name("g")
    kafka_broker.create_topic(topic, 1)
    _produce(kafka_broker.bootstrap, topic, 30)
    src = KafkaSource(kafka_broker.bootstrap, [topic], group_id=group, max_poll_records=8, **FAST)
    reader = _Reader(src)
    frames = reader.take(30)
    assert [f.seq for f in frames] == list(range(30)) and all(f.camera_id == "cam" for f in frames)
    assert [f.origin["offset"] for f in frames] == list(range(30))

    acker = threading.Thread(target=lambda: [src.ack(f) for f in reversed(frames) if f.seq != 10])
    acker.start()  # acks come from another thread, newest first, with offset 10 left unfinished
    acker.join()
    _wait_for(lambda: _committed(kafka_broker.bootstrap, group).get(0) == 10, what="commit of offset 10")
    time.sleep(1.0)
    assert _committed(kafka_broker.bootstrap, group) == {0: 10}, "a commit past an unfinished offset"
    reader.close()
    assert src.up is False

    # a restart resumes at the first unfinished offset; only that tail is delivered again
    _produce(kafka_broker.bootstrap, topic, 5, start=30)
    src2 = KafkaSource(kafka_broker.bootstrap, [topic], group_id=group, **FAST)
    reader2 = _Reader(src2, on_frame=src2.ack)
    again = reader2.take(25)
    assert [f.seq for f in again] == list(range(10, 35))
    _wait_for(lambda: _committed(kafka_broker.bootstrap, group).get(0) == 35, what="commit of offset 35")
    reader2.close()
    assert reader2.frames.empty()


def test_frames_in_flight_through_a_rebalance_are_committed_by_their_owner_only(kafka_broker) -> None:
    """A member joins while every delivered frame is still being scored, then leaves.

    The partition this source keeps must commit once those frames are acked (kafka-python may go on
    from its fetch position, so nothing is re-read to stand in for them); the partition the other
    member took must never be committed from here; once it comes back, everything commits.
    """
    from kafka import KafkaConsumer

    topic, group = _name("frames"), _name("g")
    kafka_broker.create_topic(topic, 2)
    for p in (0, 1):
        _produce(kafka_broker.bootstrap, topic, 20, start=100 * p, partition=p)
    src = KafkaSource(kafka_broker.bootstrap, [topic], group_id=group, max_poll_records=8, **FAST)
    rebalanced = threading.Event()
    reader = _Reader(src, on_frame=lambda f: src.ack(f) if rebalanced.is_set() else None)
    held = reader.take(40)  # delivered, none acked: all in flight
    other = KafkaConsumer(
        topic, bootstrap_servers=kafka_broker.bootstrap, group_id=group, enable_auto_commit=False,
        session_timeout_ms=6000, heartbeat_interval_ms=500,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not other.assignment():
            assert time.monotonic() < deadline, "the second member was never assigned a partition"
            other.poll(timeout_ms=200)
        taken = {tp.partition for tp in other.assignment()}
        assert len(taken) == 1
        (kept,) = {0, 1} - taken
        _wait_for(lambda: {(topic, kept)} == set(src._assigned), what="the source to settle on the other partition")
        rebalanced.set()
        for f in held:
            src.ack(f)
        _wait_for(lambda: _committed(kafka_broker.bootstrap, group).get(kept) == 20, what="the kept partition's commit")
        time.sleep(1.0)
        assert set(taken).isdisjoint(_committed(kafka_broker.bootstrap, group)), "committed a partition it gave away"
    finally:
        other.close(autocommit=False)
    _wait_for(lambda: _committed(kafka_broker.bootstrap, group) == {0: 20, 1: 20}, timeout_s=60, what="both commits")
    reader.close()
    assert {f.seq for f in held} | {f.seq for f in list(reader.frames.queue)} == set(range(20)) | set(range(100, 120))


def test_invalid_messages_go_to_the_dead_letter_topic(kafka_broker) -> None:
    from kafka import KafkaConsumer, KafkaProducer

    topic, group = _name("frames"), _name("g")
    kafka_broker.create_topic(topic, 1)
    kafka_broker.create_topic(topic + ".dlq", 1)
    _produce(kafka_broker.bootstrap, topic, 2)
    producer = KafkaProducer(bootstrap_servers=kafka_broker.bootstrap)
    producer.send(topic, value=b"\x00garbage", headers=[("seq", b"2"), ("trace", b"abc")])  # no camera_id
    producer.send(topic, key=b"cam", value=b"not a jpeg", headers=[("content-type", b"text/plain")])
    producer.flush()
    producer.close()
    _produce(kafka_broker.bootstrap, topic, 1, start=4)

    src = KafkaSource(kafka_broker.bootstrap, [topic], group_id=group, dlq_topic=topic + ".dlq", **FAST)

    def route(f: Frame) -> None:  # what the ingest worker does
        if f.meta.get("error"):
            src.dead_letter(f, f.meta["error"])
        else:
            src.ack(f)

    reader = _Reader(src, on_frame=route)
    frames = reader.take(5)
    assert [f.meta.get("error_reason") for f in frames] == [None, None, "missing_camera_id", "content_type", None]
    _wait_for(lambda: _committed(kafka_broker.bootstrap, group).get(0) == 5, what="commit past the dead letters")
    reader.close()

    dlq = KafkaConsumer(topic + ".dlq", bootstrap_servers=kafka_broker.bootstrap, auto_offset_reset="earliest",
                        consumer_timeout_ms=8000)  # fmt: skip
    dead = []
    for m in dlq:
        dead.append(m)
        if len(dead) == 2:
            break
    dlq.close()
    assert [m.value for m in dead] == [b"\x00garbage", b"not a jpeg"]
    h0, h1 = dict(dead[0].headers), dict(dead[1].headers)
    assert h0["trace"] == b"abc" and b"camera_id" in h0["error"] and h0["source_offset"] == b"2"
    assert h0["source_topic"] == topic.encode() and dead[1].key == b"cam" and b"content-type" in h1["error"]


def test_lag_is_reported_per_partition(kafka_broker) -> None:
    topic, group = _name("frames"), _name("g")
    kafka_broker.create_topic(topic, 2)
    _produce(kafka_broker.bootstrap, topic, 40, partition=1)
    src = KafkaSource(kafka_broker.bootstrap, [topic], group_id=group, max_poll_records=4, **FAST)
    lags: list[dict[str, int]] = []
    reader = _Reader(src, on_frame=lambda f: (lags.append(src.lag()), time.sleep(0.12)))
    frames = reader.take(40, timeout_s=30)
    assert max(lag.get(f"{topic}/1", 0) for lag in lags) > 0
    # Lag counts from the committed offset: delivered but unfinished frames are still lag.
    time.sleep(4)  # a health check (every 3 s) after the last delivery
    assert src.lag().get(f"{topic}/1", 0) > 0
    for f in frames:
        src.ack(f)
    _wait_for(lambda: src.lag() == {f"{topic}/0": 0, f"{topic}/1": 0}, what="lag to reach 0 once acked")
    reader.close()


def test_broker_down_at_start_then_up(tmp_path) -> None:
    from tests.servers.kafka import free_port, start_broker

    port = free_port()
    topic, group = _name("frames"), _name("g")
    src = KafkaSource(f"127.0.0.1:{port}", [topic], group_id=group, **FAST)
    reader = _Reader(src)
    _wait_for(lambda: src.up is False, what="up=False while the broker is down")
    time.sleep(2.0)
    assert reader.thread.is_alive() and src.up is False
    broker = start_broker(port=port)
    try:
        broker.create_topic(topic, 1)
        _produce(broker.bootstrap, topic, 3)
        assert [f.seq for f in reader.take(3, timeout_s=30)] == [0, 1, 2]
        assert src.up is True
        reader.close()
    finally:
        broker.stop()


def test_start_latest_and_earliest(kafka_broker) -> None:
    topic, group = _name("frames"), _name("g")
    kafka_broker.create_topic(topic, 1)
    _produce(kafka_broker.bootstrap, topic, 5, sync=True)
    src = KafkaSource(kafka_broker.bootstrap, [topic], group_id=group, start="latest", **FAST)
    reader = _Reader(src, on_frame=src.ack)
    _wait_for(lambda: f"{topic}/0" in src.lag(), what="partition assignment")
    _produce(kafka_broker.bootstrap, topic, 3, start=5)
    assert [f.seq for f in reader.take(3)] == [5, 6, 7]
    reader.close()
    assert _committed(kafka_broker.bootstrap, group) == {0: 8}

    # earliest ignores the group's committed offsets
    src = KafkaSource(kafka_broker.bootstrap, [topic], group_id=group, start="earliest", **FAST)
    reader = _Reader(src)
    assert [f.seq for f in reader.take(8)] == list(range(8))
    reader.close()
