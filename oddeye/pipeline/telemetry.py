"""Prometheus metrics: defined once, served from one ``/metrics`` endpoint per pipeline.

Actors do not serve metrics themselves: they keep cumulative counters and hand them to
the driver with their results, and the driver turns them into these metrics. So every
actor's numbers reach the one endpoint, wherever in a Ray cluster the actor runs.
Labels come from a small closed set (camera, model, stage, reason, sink, outcome), never
per-frame values. The registry also carries prometheus_client's process, platform and GC
collectors (``process_*``, ``python_*``) for the driver process; Ray actor health shows as
``oddeye_actor_up{stage}`` and ``oddeye_actor_failures_total{stage}``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)

log = logging.getLogger(__name__)

PREFIX = "oddeye_"
SCORE_BUCKETS = tuple(round(i / 20, 2) for i in range(1, 21))
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
DROP_REASONS = ("queue_full", "shutdown", "aborted")
"""Drop reasons exported at 0 for every known camera, so rates exist before the first drop."""
DEAD_LETTER_REASONS = ("decode_error", "invalid", "model_error", "model_actor_died", "too_many_cameras")
"""Dead-letter reasons exported at 0 for every known camera (others appear when they first happen)."""
SINK_OUTCOMES = ("sent", "failed", "dropped")
"""Counters a sink may keep as attributes (Kafka and webhook sinks do); exported as sink_events_total."""
ALERT_STATES = ("open", "update", "close")


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
        self.oldest_unacked = Gauge(
            f"{p}oldest_unacked_seconds",
            "Age of the oldest frame read and not yet finished (scored, written and confirmed, or dead-lettered); "
            "a Kafka offset is committed only past finished frames, so this is how long commits have stalled",
            ["camera"],
            registry=r,
        )
        self.pending_acks = Gauge(
            f"{p}pending_acks", "Finished frames waiting for sinks to confirm delivery", registry=r
        )
        self.backpressure = Gauge(
            f"{p}backpressure",
            "1 while no new frames are taken (a sink or the acks are saturated)",
            registry=r,
        )
        self.sink_errors = Counter(f"{p}sink_errors_total", "Failed sink writes", ["sink"], registry=r)
        self.sink_events = Counter(
            f"{p}sink_events_total", "Records handled by sinks, by outcome", ["sink", "outcome"], registry=r
        )
        self.actor_up = Gauge(
            f"{p}actor_up", "1 while every Ray actor of a stage answered its last call", ["stage"], registry=r
        )
        self.actor_failures = Counter(
            f"{p}actor_failures_total", "Ray actor calls that failed (crash, restart)", ["stage"], registry=r
        )
        # model.scope camera: each camera's own fitted head.
        self.model_version = Gauge(
            f"{p}model_version", "Version of the head scoring a camera (0: none yet)", ["camera"], registry=r
        )
        self.model_fit_timestamp = Gauge(
            f"{p}model_fit_timestamp_seconds", "When a camera's head was fitted (epoch seconds)", ["camera"], registry=r
        )
        self.fit_progress = Gauge(
            f"{p}fit_progress",
            "Share of a new camera's fit frames collected (1: its head scores)",
            ["camera"],
            registry=r,
        )
        self.model_swaps = Counter(
            f"{p}model_swaps_total", "Heads hot-swapped to a newer version", ["camera"], registry=r
        )
        self.model_refits = Counter(
            f"{p}model_refits_total",
            "Scheduled refits of heads (refit.every), by result: accepted, rejected (the guard), skipped "
            "(too few normal frames), failed",
            ["camera", "result"],
            registry=r,
        )
        self.head_bytes = Gauge(
            f"{p}model_head_bytes", "Bytes of per-camera heads loaded in the model actors", ["model"], registry=r
        )
        self._head_bytes: dict[str, int] = {}
        # The driver process: CPU, memory, file descriptors, GC, Python version.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self._actors: dict[str, dict[str, bool]] = {}
        self._cameras: set[tuple[str, str]] = set()
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
        child = counter.labels(*labels)  # exported at 0 from the first report, so rate() sees the first step
        delta = total - self._seen.get(key, 0.0)
        if delta > 0:
            child.inc(delta)
            self._seen[key] = total

    def camera_models(
        self,
        model: str,
        status: Mapping[str, Mapping[str, float]],
        swaps: Mapping[str, int],
        head_bytes: int | None,
        worker: str,
        refits: Mapping[str, Mapping[str, int]] | None = None,
    ) -> None:
        """scope camera: per-camera head version, fit time and fit progress, swaps, refits, and head memory by
        worker."""
        for camera, s in status.items():
            self.model_version.labels(camera).set(s.get("version", 0))
            self.model_fit_timestamp.labels(camera).set(s.get("fitted_at", 0))
            self.fit_progress.labels(camera).set(s.get("fit_progress", 0))
        for key, total in swaps.items():
            self.add_cumulative(self.model_swaps, (key,), total)
        for key, by_result in (refits or {}).items():
            for result, total in by_result.items():
                self.add_cumulative(self.model_refits, (key, result), total)
        if head_bytes is not None:
            self._head_bytes[worker] = head_bytes
            self.head_bytes.labels(model).set(sum(self._head_bytes.values()))

    def add_dropped(self, camera: str, by_reason: Mapping[str, int]) -> None:
        for reason in DROP_REASONS:
            self.frames_dropped.labels(camera, reason)
        for reason, total in by_reason.items():
            self.add_cumulative(self.frames_dropped, (camera, reason), total)

    def register_camera(self, camera: str, model: str) -> None:
        """Export every per-camera series at 0 (call it for each configured camera at start).

        Prometheus' ``rate()`` and ``increase()`` need a series before the first event: without
        this, ``oddeye_dead_letters_total`` would not exist until something had gone wrong.
        """
        self.camera_seen(camera, model)
        self.frames_ingested.labels(camera)
        self.decode_errors.labels(camera)
        self.source_reconnects.labels(camera)
        for reason in DROP_REASONS:
            self.frames_dropped.labels(camera, reason)
        for reason in DEAD_LETTER_REASONS:
            self.dead_letters.labels(camera, reason)

    def register_sink(self, name: str) -> None:
        """Export a sink's error and event counters at 0 (``name`` is the sink's class name, as in its labels)."""
        self.sink_errors.labels(name)
        for outcome in SINK_OUTCOMES:
            self.sink_events.labels(name, outcome)

    def forget_camera(self, camera: str) -> int:
        """Remove every series labelled with ``camera`` (an idle or rebalanced-away camera); how many were removed.

        Keeps the number of series bounded when camera ids come from untrusted message headers.
        A camera that comes back starts again from 0, which Prometheus counters handle as a reset.
        """
        removed = 0
        for metric in self._camera_metrics():
            names = metric._labelnames
            where = [i for i, n in enumerate(names) if n in ("camera", "source")]
            if not where:
                continue
            with metric._lock:
                keys = [k for k in metric._metrics if any(k[i] == camera for i in where)]
            for key in keys:
                metric.remove(*key)
                removed += 1
        self._cameras = {cm for cm in self._cameras if cm[0] != camera}
        self._seen = {k: v for k, v in self._seen.items() if camera not in k[1]}
        return removed

    def _camera_metrics(self) -> list[Counter | Gauge | Histogram]:
        return [
            m
            for m in vars(self).values()
            if isinstance(m, (Counter, Gauge, Histogram)) and {"camera", "source"} & set(m._labelnames)
        ]

    def camera_seen(self, camera: str, model: str) -> None:
        """Export a camera's per-camera series at 0 the first time it is scored (cheap after that)."""
        if (camera, model) in self._cameras:
            return
        self._cameras.add((camera, model))
        for state in ALERT_STATES:
            self.alerts.labels(camera, model, state)
        self.alerts_open.labels(camera, model).set(0)
        self.frames_scored.labels(camera, model)

    def actor_result(self, stage: str, ok: bool, actor: str = "") -> None:
        """Record whether a call to a Ray actor of ``stage`` (``ingest``, ``model``) succeeded."""
        actors = self._actors.setdefault(stage, {})
        actors[actor] = ok
        if not ok:
            self.actor_failures.labels(stage).inc()
        else:
            self.actor_failures.labels(stage)
        self.actor_up.labels(stage).set(1 if all(actors.values()) else 0)

    def record_sinks(self, sinks: Iterable[object]) -> None:
        """Copy the cumulative ``sent``/``failed``/``dropped`` counters that sinks keep into sink_events_total."""
        for sink in sinks:
            name = type(sink).__name__
            for outcome in SINK_OUTCOMES:
                total = getattr(sink, outcome, None)
                if isinstance(total, int):
                    self.add_cumulative(self.sink_events, (name, outcome), total)

    def value(self, name: str, labels: Mapping[str, str] | None = None) -> float:
        """Current value of a sample (``oddeye_frames_scored_total``, ...) summed over matching labels."""
        total = 0.0
        for metric in self.registry.collect():
            for s in metric.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in (labels or {}).items()):
                    total += s.value
        return total
