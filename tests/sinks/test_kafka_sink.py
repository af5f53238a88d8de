"""Kafka sink against the real broker: messages read back by a consumer, broker down at start, overflow."""

from __future__ import annotations

import json
import logging
import time
import uuid

import pytest
from kafka import KafkaConsumer

from oddeye.frames import Alert, ScoredFrame
from oddeye.sinks.kafka import SCHEMA_VERSION, KafkaSink, KafkaSinkError
from tests.servers.kafka import free_port, start_broker

T0 = 1_700_000_000.0


def scored(cam: str, seq: int, score: float = 0.2) -> ScoredFrame:
    return ScoredFrame(cam, seq, T0 + seq, score, score >= 0.5, "padim", 12.5, origin={"file": "x", "index": seq})


def read_all(bootstrap: str, topic: str, n: int, timeout_s: float = 15.0) -> list:
    consumer = KafkaConsumer(
        topic, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest", consumer_timeout_ms=500
    )
    out: list = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(out) < n and time.monotonic() < deadline:
            out.extend(consumer)
    finally:
        consumer.close()
    return out


def test_scores_and_alerts_read_back_in_wire_format(kafka_broker) -> None:
    tag = uuid.uuid4().hex[:8]
    scores, alerts = f"scores-{tag}", f"alerts-{tag}"
    sink = KafkaSink(kafka_broker.bootstrap, scores_topic=scores, alerts_topic=alerts, linger_ms=2)
    try:
        sink.write([scored("cam-a", i) for i in range(10)] + [scored("cam-b", i, 0.9) for i in range(5)])
        alert = Alert(
            "cam-b-2", "cam-b", "open", T0 + 2, None, 0.91, 3, "padim", "/snap/cam-b-2.jpg", 2, [[1, 2, 3, 4, 0.9]]
        )
        sink.write_alert(alert)
        sink.flush()
        assert sink.sent == 16 and sink.failed == 0 and sink.dropped == 0
    finally:
        sink.close()

    msgs = read_all(kafka_broker.bootstrap, scores, 15)
    assert len(msgs) == 15
    values = [json.loads(m.value) for m in msgs]
    assert all(m.key.decode() == v["camera_id"] for m, v in zip(msgs, values, strict=True))
    assert set(values[0]) == {
        "schema_version",
        "camera_id",
        "seq",
        "ts",
        "score",
        "label",
        "model",
        "latency_ms",
        "origin",
    }
    assert values[0]["schema_version"] == SCHEMA_VERSION
    assert sorted((v["camera_id"], v["seq"]) for v in values) == sorted(
        [("cam-a", i) for i in range(10)] + [("cam-b", i) for i in range(5)]
    )
    assert dict(msgs[0].headers)["content-type"] == b"application/json"

    (msg,) = read_all(kafka_broker.bootstrap, alerts, 1)
    event = json.loads(msg.value)
    assert msg.key == b"cam-b"
    assert event["state"] == "open" and event["alert_id"] == "cam-b-2" and event["schema_version"] == SCHEMA_VERSION
    assert event["snapshot"] == "/snap/cam-b-2.jpg" and event["boxes"] == [[1, 2, 3, 4, 0.9]]
    assert {"started_at", "ended_at", "peak_score", "frames"} <= set(event)


def test_broker_down_at_start_buffers_then_delivers(caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()
    caplog.set_level(logging.INFO, logger="oddeye.sinks.kafka")
    secret = "hunter2-" + uuid.uuid4().hex
    sink = KafkaSink(
        f"127.0.0.1:{port}",
        scores_topic="late-scores",
        alerts_topic=None,
        connect_timeout_s=0.5,
        reconnect_max_s=1.0,
        security={"sasl_plain_username": "oddeye", "sasl_plain_password": secret},
    )
    broker = None
    try:
        sink.write([scored("cam-a", i) for i in range(5)])
        with pytest.raises(KafkaSinkError, match="not connected"):
            sink.flush(timeout_s=0.5)  # fails fast: the runner keeps the offsets and goes on scoring
        deadline = time.monotonic() + 10
        while "cannot reach" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "cannot reach" in caplog.text and f"127.0.0.1:{port}" in caplog.text

        broker = start_broker(port)
        deadline = time.monotonic() + 20
        while True:
            try:
                sink.flush(timeout_s=2)
                break
            except KafkaSinkError:
                assert time.monotonic() < deadline, "the sink never delivered after the broker came up"
                time.sleep(0.3)
        assert sink.sent == 5 and sink.dropped == 0
        assert len(read_all(broker.bootstrap, "late-scores", 5)) == 5
        assert "connected" in caplog.text
    finally:
        sink.close()
        if broker is not None:
            broker.stop()
    assert secret not in caplog.text and secret not in repr(sink)


def test_full_buffer_is_back_pressure_not_loss_and_order_is_kept() -> None:
    """A broker outage never drops results: the sink reports ``saturated`` (the runner stops taking
    frames), confirms nothing, and delivers everything, in order, once the broker is back."""
    port = free_port()
    sink = KafkaSink(
        f"127.0.0.1:{port}",
        scores_topic="bp-scores",
        alerts_topic=None,
        buffer_records=4,
        connect_timeout_s=0.3,
        reconnect_max_s=0.5,
    )
    broker = None
    try:
        t = time.monotonic()
        sink.write([scored("cam-a", i) for i in range(10)])  # never blocks the pipeline
        assert time.monotonic() - t < 0.5
        assert sink.dropped == 0 and sink.saturated
        assert sink.mark() == 10 and sink.confirmed() == 0
        with pytest.raises(KafkaSinkError):
            sink.flush(timeout_s=0.2)
        broker = start_broker(port)
        deadline = time.monotonic() + 30
        while sink.confirmed() < 10:
            assert time.monotonic() < deadline, f"only {sink.confirmed()} of 10 confirmed after the broker came up"
            time.sleep(0.2)
        assert not sink.saturated and sink.dropped == 0
        got = [json.loads(m.value)["seq"] for m in read_all(broker.bootstrap, "bp-scores", 10)]
        assert got == list(range(10))
    finally:
        sink.close()
        if broker is not None:
            broker.stop()


@pytest.mark.parametrize("idempotent", [False, True])
def test_broker_restart_mid_stream_every_result_delivered_in_order(idempotent: bool) -> None:
    """A broker that restarts (tansu keeps no state, like a replaced broker) while results flow.

    With idempotence forced on, the restarted broker answers the producer's handshake with a fatal
    error that kafka-python's producer never recovers from: the sink must replace the producer.
    """
    port = free_port()
    broker = start_broker(port)
    sink = KafkaSink(
        broker.bootstrap,
        scores_topic="restart-scores",
        alerts_topic=None,
        connect_timeout_s=0.5,
        reconnect_max_s=1.0,
        producer={"enable_idempotence": idempotent},
    )
    try:
        sink.write([scored("cam-a", i) for i in range(5)])
        deadline = time.monotonic() + 30
        while sink.confirmed() < 5:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        broker.stop()
        sink.write([scored("cam-a", i) for i in range(5, 20)])
        time.sleep(2.0)
        broker = start_broker(port)
        t_back = time.monotonic()
        while sink.confirmed() < 20:
            assert time.monotonic() - t_back < 30, f"only {sink.confirmed()} of 20 confirmed after the restart"
            time.sleep(0.1)
        # (tansu keeps topics in memory and acknowledges a write to a topic it has forgotten, so
        # what is checked is that the restarted broker acknowledged every record, none dropped)
        assert sink.sent == 20 and sink.dropped == 0 and not sink.saturated
    finally:
        sink.close()
        broker.stop()
