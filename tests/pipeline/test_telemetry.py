"""Metrics exist at 0 from the start for every known camera and sink, and a forgotten camera's series go away."""

from __future__ import annotations

from prometheus_client import generate_latest

from oddeye.config import parse_config
from oddeye.pipeline.telemetry import DEAD_LETTER_REASONS, DROP_REASONS, Telemetry


def _samples(t: Telemetry) -> str:
    return generate_latest(t.registry).decode()


def test_counters_are_exported_at_zero_before_any_event() -> None:
    t = Telemetry()
    before = _samples(t)
    assert 'oddeye_dead_letters_total{camera="cam-1"' not in before
    t.register_camera("cam-1", "padim")
    t.register_sink("WebhookSink")
    text = _samples(t)
    for reason in DEAD_LETTER_REASONS:
        assert f'oddeye_dead_letters_total{{camera="cam-1",reason="{reason}"}} 0.0' in text
    for reason in DROP_REASONS:
        assert f'oddeye_frames_dropped_total{{camera="cam-1",reason="{reason}"}} 0.0' in text
    assert 'oddeye_sink_errors_total{sink="WebhookSink"} 0.0' in text
    for outcome in ("sent", "failed", "dropped"):
        assert f'oddeye_sink_events_total{{outcome="{outcome}",sink="WebhookSink"}} 0.0' in text
    for name in ("frames_ingested", "decode_errors", "source_reconnects"):
        assert f'oddeye_{name}_total{{camera="cam-1"}} 0.0' in text
    assert 'oddeye_frames_scored_total{camera="cam-1",model="padim"} 0.0' in text
    assert 'oddeye_alerts_open{camera="cam-1",model="padim"} 0.0' in text


def test_forget_camera_removes_its_series_only() -> None:
    t = Telemetry()
    for cam in ("keep", "spoofed"):
        t.register_camera(cam, "padim")
        t.last_score.labels(cam, "padim").set(0.3)
        t.end_to_end.labels(cam).observe(0.1)
        t.kafka_lag.labels(cam, "0").set(5)
        t.add_cumulative(t.frames_dropped, (cam, "queue_full"), 3)
    removed = t.forget_camera("spoofed")
    text = _samples(t)
    assert removed > 10 and 'camera="spoofed"' not in text and 'source="spoofed"' not in text
    assert 'oddeye_dead_letters_total{camera="keep",reason="decode_error"} 0.0' in text
    assert t.value("oddeye_frames_dropped_total", {"camera": "keep", "reason": "queue_full"}) == 3
    assert t.value("oddeye_kafka_consumer_lag", {"source": "keep"}) == 5
    t.register_camera("spoofed", "padim")  # a camera that comes back starts again at 0
    assert t.value("oddeye_frames_dropped_total", {"camera": "spoofed", "reason": "queue_full"}) == 0


def test_metrics_bind_localhost_by_default() -> None:
    cfg = parse_config({"sources": [{"type": "images", "path": "x"}]})
    assert cfg.metrics.host == "127.0.0.1"
