"""Prometheus metrics: defined once, served from one ``/metrics`` endpoint per pipeline.

Actors do not serve metrics themselves: they keep cumulative counters and hand them to
the driver with their results, and the driver turns them into these metrics. So every
actor's numbers reach the one endpoint, wherever in a Ray cluster the actor runs.
Labels come from a small closed set (camera, model, stage, reason), never per-frame values.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

PREFIX = "oddeye_"
SCORE_BUCKETS = tuple(round(i / 20, 2) for i in range(1, 21))
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Telemetry:
    """The pipeline's metrics in their own registry (several pipelines can live in one process)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        p = PREFIX
        self.frames_ingested = Counter(f"{p}frames_ingested_total", "Frames read from sources", ["camera"], registry=r)
        self.frames_dropped = Counter(
            f"{p}frames_dropped_total", "Frames not scored, by reason", ["camera", "reason"], registry=r
        )
        self.frames_scored = Counter(f"{p}frames_scored_total", "Frames scored", ["camera", "model"], registry=r)
        self.decode_errors = Counter(f"{p}decode_errors_total", "Frames that failed to decode", ["camera"], registry=r)
        self.dead_letters = Counter(
            f"{p}dead_letters_total", "Frames sent to the dead-letter path", ["camera", "reason"], registry=r
        )
        self.anomaly_score = Histogram(
            f"{p}anomaly_score", "Normalised anomaly scores", ["camera", "model"], buckets=SCORE_BUCKETS, registry=r
        )
        self.last_score = Gauge(f"{p}last_anomaly_score", "Latest normalised score", ["camera", "model"], registry=r)
        self.alerts = Counter(f"{p}alerts_total", "Alert events", ["camera", "model", "state"], registry=r)
        self.alerts_open = Gauge(f"{p}alerts_open", "Alerts open now", ["camera", "model"], registry=r)
        self.batch_size = Histogram(
            f"{p}inference_batch_size", "Frames per model call", ["model"], buckets=BATCH_BUCKETS, registry=r
        )
        self.inference_seconds = Histogram(
            f"{p}inference_seconds", "Model forward time per batch", ["model"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.end_to_end = Histogram(
            f"{p}end_to_end_seconds",
            "Capture (or arrival) to written result",
            ["camera"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(f"{p}queue_depth", "Frames waiting in a stage", ["stage"], registry=r)
        self.source_up = Gauge(f"{p}source_up", "1 while a source delivers frames", ["camera"], registry=r)
        self.source_reconnects = Counter(f"{p}source_reconnects_total", "Source reconnections", ["camera"], registry=r)
        self.kafka_lag = Gauge(
            f"{p}kafka_consumer_lag", "Messages behind the end of each partition", ["source", "partition"], registry=r
        )
        self.sink_errors = Counter(f"{p}sink_errors_total", "Failed sink writes", ["sink"], registry=r)
        self._seen: dict[tuple[str, tuple[str, ...]], float] = {}
        self.port: int | None = None
        self._server = None

    def serve(self, host: str, port: int) -> int:
        """Start the HTTP endpoint; ``port=0`` picks a free one. Returns the bound port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._server = server
        self.port = server.server_address[1]
        log.info("metrics on http://%s:%d/metrics", host, self.port)
        return self.port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def add_cumulative(self, counter: Counter, labels: tuple[str, ...], total: float) -> None:
        """Advance ``counter`` to an actor's cumulative ``total`` (increments by the difference)."""
        key = (counter._name, labels)
        delta = total - self._seen.get(key, 0.0)
        if delta > 0:
            counter.labels(*labels).inc(delta)
            self._seen[key] = total

    def add_dropped(self, camera: str, by_reason: Mapping[str, int]) -> None:
        for reason, total in by_reason.items():
            self.add_cumulative(self.frames_dropped, (camera, reason), total)

    def value(self, name: str, labels: Mapping[str, str] | None = None) -> float:
        """Current value of a sample (``oddeye_frames_scored_total``, ...) summed over matching labels."""
        total = 0.0
        for metric in self.registry.collect():
            for s in metric.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in (labels or {}).items()):
                    total += s.value
        return total
