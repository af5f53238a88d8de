"""End to end: the real Ray pipeline on a synthetic camera writes scores and alert events to Kafka."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest
from kafka import KafkaConsumer

from oddeye.config import parse_config
from oddeye.pipeline.runner import Pipeline
from tests.conftest import tiny_config

pytestmark = pytest.mark.slow


def consume(bootstrap: str, topic: str, expect: int, timeout_s: float = 20.0) -> list[dict]:
    consumer = KafkaConsumer(
        topic, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest", consumer_timeout_ms=1000
    )
    out: list = []
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            batch = list(consumer)
            out.extend(batch)
            if len(out) >= expect and not batch:
                break
    finally:
        consumer.close()
    for m in out:
        assert m.key.decode() == json.loads(m.value)["camera_id"]
    return [json.loads(m.value) for m in out]


def test_pipeline_to_kafka_one_score_per_frame_and_the_alert_events(
    ray_local, fitted_checkpoint: Path, kafka_broker, tmp_path: Path
) -> None:
    tag = uuid.uuid4().hex[:8]
    scores_topic, alerts_topic = f"oddeye.scores.{tag}", f"oddeye.alerts.{tag}"
    raw = tiny_config(tmp_path)
    raw["model"]["checkpoint"] = str(fitted_checkpoint)
    raw["sinks"] = [
        {"type": "jsonl"},
        {
            "type": "kafka",
            "bootstrap_servers": kafka_broker.bootstrap,
            "scores_topic": scores_topic,
            "alerts_topic": alerts_topic,
        },
    ]
    pipeline = Pipeline(parse_config(raw), out_dir=tmp_path / "out")
    try:
        summary = pipeline.run()
        assert pipeline.telemetry.value("oddeye_sink_events_total", {"sink": "KafkaSink", "outcome": "sent"}) > 0
        assert pipeline.telemetry.value("oddeye_sink_errors_total") == 0
    finally:
        pipeline.close()
    assert summary.stop_reason == "sources_exhausted" and summary.scored == 120

    scores = consume(kafka_broker.bootstrap, scores_topic, 120)
    assert len(scores) == 120
    assert sorted(s["seq"] for s in scores) == list(range(120))
    assert {s["schema_version"] for s in scores} == {1} and {s["camera_id"] for s in scores} == {"cam-a"}

    expected = [json.loads(line) for line in (tmp_path / "out" / "alerts.jsonl").read_text().splitlines()]
    assert any(a["state"] == "open" for a in expected), "the synthetic anomalies should open alerts"
    alerts = consume(kafka_broker.bootstrap, alerts_topic, len(expected))
    assert [(a["alert_id"], a["state"]) for a in alerts] == [(a["alert_id"], a["state"]) for a in expected]
    assert all({"started_at", "ended_at", "peak_score", "frames", "snapshot"} <= set(a) for a in alerts)
