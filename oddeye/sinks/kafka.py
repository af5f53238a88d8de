"""Kafka sink: scored frames to the scores topic, alert events to the alerts topic.

Wire format (DESIGN.md): key = camera_id (UTF-8); value = a JSON object with
``schema_version`` plus the record fields; headers ``content-type`` and
``schema_version``. ``write``/``write_alert`` never block the pipeline: records go into a
hand-off queue that a background thread feeds to a kafka-python producer (acks=all,
retries, linger, one request in flight per connection so that each camera's records stay
in order). Every record gets a sequence number; ``mark()``/``confirmed()`` tell the runner,
without blocking, how far delivery has got, so source offsets are committed only for frames
whose results are delivered (at-least-once). Records whose delivery failed are sent again,
before any later record. Nothing is ever dropped: while the queue holds ``buffer_records``
or more, ``saturated`` is True and the pipeline stops taking frames (back-pressure), so
memory stays bounded and commits resume when the broker is back.

A broker that is down at start is logged once and retried with backoff. A producer whose
deliveries keep failing for ``reconnect_max_s`` with nothing delivered (a broker that came back
without the producer's state answers its idempotent-producer handshake with a fatal error, and
kafka-python's producer never recovers from that) is closed and replaced, its records sent again.
Idempotence is off by default: delivery is at-least-once anyway, each camera's records stay in
order (one request in flight), and consumers can drop repeats by ``(camera_id, seq)``.
``security`` options (SASL passwords, key files) go to the producer and are never logged.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

from oddeye.frames import Alert, ScoredFrame, to_json
from oddeye.sinks.base import Sink

__all__ = ["SCHEMA_VERSION", "KafkaSink", "KafkaSinkError", "encode_value"]

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
_ACKS = {"all": "all", "1": 1, "0": 0, "-1": "all"}

_Record = tuple[str, bytes, bytes, int]  # topic, key, value, sequence number


class KafkaSinkError(RuntimeError):
    """Results were not (yet) delivered to Kafka; their source offsets must not be committed."""


def encode_value(record: dict[str, Any]) -> bytes:
    """A record as the JSON bytes of a message value, with ``schema_version`` first."""
    body = {"schema_version": SCHEMA_VERSION, **record}
    return to_json(body).encode()


class KafkaSink(Sink):
    """Publish scores and alert events to Kafka; delivery is confirmed asynchronously (``acknowledges``).

    Counters: ``sent`` (acknowledged by the broker), ``failed`` (delivery attempts that
    failed and were re-queued), ``dropped`` (always 0: kept for the metrics' sink outcomes).
    """

    acknowledges = True

    def __init__(
        self,
        bootstrap_servers: str | list[str] = "localhost:9092",
        scores_topic: str | None = "oddeye.scores",
        alerts_topic: str | None = "oddeye.alerts",
        acks: str = "all",
        linger_ms: int = 5,
        retries: int = 5,
        security: dict[str, Any] | None = None,
        producer: dict[str, Any] | None = None,
        buffer_records: int = 10_000,
        flush_timeout_s: float = 10.0,
        connect_timeout_s: float = 5.0,
        reconnect_max_s: float = 5.0,
    ) -> None:
        if acks not in _ACKS:
            raise ValueError(f"acks must be one of {', '.join(_ACKS)}, got {acks!r}")
        if buffer_records < 1:
            raise ValueError(f"buffer_records must be ≥ 1, got {buffer_records}")
        self.bootstrap_servers = bootstrap_servers
        self.scores_topic = scores_topic
        self.alerts_topic = alerts_topic
        self.buffer_records = buffer_records
        self.flush_timeout_s = flush_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.reconnect_max_s = reconnect_max_s
        self._producer_config: dict[str, Any] = {
            "acks": _ACKS[acks],
            "retries": retries,
            "linger_ms": linger_ms,
            "max_block_ms": 5_000,
            "max_in_flight_requests_per_connection": 1,
            "bootstrap_timeout_ms": int(connect_timeout_s * 1000),
            # a broker back from an outage is found within reconnect_max_s (kafka-python waits up to 30 s)
            "reconnect_backoff_max_ms": int(reconnect_max_s * 1000),
            "enable_idempotence": False,
            **(producer or {}),
            **(security or {}),
            "bootstrap_servers": bootstrap_servers,
        }
        self.sent = 0
        self.failed = 0
        self.dropped = 0
        self._producer: Any = None
        self._queue: deque[_Record] = deque()
        self._outstanding = 0  # written and not yet acknowledged by the broker
        self._next_seq = 0  # records accepted so far
        self._confirmed = 0  # records 0 .. _confirmed-1 are all delivered
        self._done: set[int] = set()  # delivered records above _confirmed
        self._cond = threading.Condition()
        self._closing = threading.Event()
        self._last_error: str | None = None
        self._unreachable = False  # the last connection attempt failed
        self._failing_since: float | None = None  # deliveries failing, none delivered since then
        self._thread = threading.Thread(target=self._run, name="kafka-sink", daemon=True)
        self._thread.start()

    def __repr__(self) -> str:  # never show ``security``
        return (
            f"KafkaSink(bootstrap_servers={self.bootstrap_servers!r}, "
            f"scores={self.scores_topic!r}, alerts={self.alerts_topic!r})"
        )

    @property
    def connected(self) -> bool:
        return self._producer is not None

    # ------------------------------------------------------------------ Sink
    def write(self, frames: Sequence[ScoredFrame]) -> None:
        if self.scores_topic:
            self._put([(self.scores_topic, f.camera_id.encode(), encode_value(f.record())) for f in frames])

    def write_alert(self, alert: Alert) -> None:
        if self.alerts_topic:
            self._put([(self.alerts_topic, alert.camera_id.encode(), encode_value(alert.record()))])

    def mark(self) -> int:
        with self._cond:
            return self._next_seq

    def confirmed(self) -> int:
        with self._cond:
            return self._confirmed

    @property
    def saturated(self) -> bool:
        with self._cond:
            return self._outstanding >= self.buffer_records

    def flush(self, timeout_s: float | None = None) -> None:
        """Wait until every record written so far is acknowledged; raise ``KafkaSinkError`` if not."""
        deadline = time.monotonic() + (self.flush_timeout_s if timeout_s is None else timeout_s)
        with self._cond:
            if self._outstanding == 0:
                return
            while self._producer is None and not self._unreachable and time.monotonic() < deadline:
                self._cond.wait(0.05)  # the first connection attempt is still under way
            if self._producer is None:
                raise KafkaSinkError(
                    f"not connected to Kafka at {self.bootstrap_servers}: {self._outstanding} record(s) buffered"
                )
            producer = self._producer
        try:
            while self._queue_len() and time.monotonic() < deadline:  # the thread hands them to the producer
                with self._cond:
                    self._cond.wait(min(0.05, max(0.0, deadline - time.monotonic())))
            producer.flush(timeout=max(0.0, deadline - time.monotonic()))
        except Exception as exc:  # KafkaTimeoutError and friends
            self._last_error = f"{type(exc).__name__}: {exc}"
        with self._cond:
            while self._outstanding and time.monotonic() < deadline:
                self._cond.wait(max(0.0, min(0.05, deadline - time.monotonic())))
            if self._outstanding:
                raise KafkaSinkError(
                    f"{self._outstanding} record(s) not acknowledged by Kafka within the flush timeout"
                    + (f" (last error: {self._last_error})" if self._last_error else "")
                )

    def close(self) -> None:
        try:
            self.flush()
        except KafkaSinkError as exc:
            log.error("kafka sink closing with undelivered results: %s", exc)
        finally:
            self._closing.set()
            with self._cond:
                self._cond.notify_all()
            self._thread.join(10)
            if self._producer is not None:
                try:
                    self._producer.close(timeout=5)
                except Exception:
                    log.debug("closing the Kafka producer", exc_info=True)
                self._producer = None

    # ------------------------------------------------------------------ internals
    def _queue_len(self) -> int:
        with self._cond:
            return len(self._queue)

    def _put(self, records: list[tuple[str, bytes, bytes]]) -> None:
        """Accept records (never dropped; ``saturated`` asks the pipeline to stop feeding)."""
        with self._cond:
            for topic, key, value in records:
                self._queue.append((topic, key, value, self._next_seq))
                self._next_seq += 1
            self._outstanding += len(records)
            self._cond.notify_all()

    def _connect(self) -> bool:
        from kafka import KafkaProducer

        try:
            producer = KafkaProducer(**self._producer_config)
        except Exception as exc:
            with self._cond:
                self._last_error = f"{type(exc).__name__}: {exc}"
                self._unreachable = True
                self._cond.notify_all()
            return False
        with self._cond:
            self._producer = producer
            self._unreachable = False
            self._cond.notify_all()
        return True

    def _run(self) -> None:
        backoff = 0.5
        warned = False
        while not self._closing.is_set():
            if self._producer is not None and self._stuck():
                self._replace_producer()
            if self._failing_since is not None:  # deliveries failing: resend at a bounded rate, not in a hot loop
                self._closing.wait(0.1)
            if self._producer is None:
                if self._connect():
                    log.info("kafka sink connected to %s", self.bootstrap_servers)
                    warned = False
                    backoff = 0.5
                else:
                    if not warned:
                        log.warning(
                            "kafka sink cannot reach %s (%s); retrying with backoff, buffering up to %d records",
                            self.bootstrap_servers,
                            self._last_error,
                            self.buffer_records,
                        )
                        warned = True
                    self._closing.wait(backoff)
                    backoff = min(backoff * 2, self.reconnect_max_s)
                    continue
            with self._cond:
                while not self._queue and not self._closing.is_set():
                    self._cond.wait(0.5)
                if not self._queue:
                    continue
                record = self._queue.popleft()
                self._cond.notify_all()
            topic, key, value, _seq = record
            try:
                future = self._producer.send(
                    topic,
                    key=key,
                    value=value,
                    headers=[("content-type", b"application/json"), ("schema_version", str(SCHEMA_VERSION).encode())],
                )
            except Exception as exc:  # buffer full or metadata unavailable: put it back, try again soon
                self._requeue(record, f"{type(exc).__name__}: {exc}")
                self._closing.wait(0.2)
                continue
            future.add_callback(self._delivered, record[3])
            future.add_errback(self._undelivered, record)

    def _stuck(self) -> bool:
        with self._cond:
            since = self._failing_since
        return since is not None and time.monotonic() - since > max(2.0, self.reconnect_max_s)

    def _replace_producer(self) -> None:
        """Close a producer that keeps failing (its unsent records come back through the errback) and start afresh."""
        with self._cond:
            producer, self._producer = self._producer, None
            self._failing_since = None
            error = self._last_error
        log.warning(
            "kafka sink: deliveries to %s keep failing (%s); starting a new producer", self.bootstrap_servers, error
        )
        try:
            producer.close(timeout=1)
        except Exception:
            log.debug("closing the failing Kafka producer", exc_info=True)

    def _delivered(self, seq: int, _metadata: Any) -> None:
        with self._cond:
            self._failing_since = None
            self.sent += 1
            self._outstanding -= 1
            self._done.add(seq)
            while self._confirmed in self._done:
                self._done.discard(self._confirmed)
                self._confirmed += 1
            self._cond.notify_all()

    def _undelivered(self, record: _Record, exc: BaseException) -> None:
        # kafka-python calls errbacks as f(*bound_args, exception)
        self.failed += 1
        if self.failed == 1 or self.failed % 1000 == 0:
            log.warning("kafka sink: delivery to %s failed (%d so far): %s; resending", record[0], self.failed, exc)
        self._requeue(record, f"{type(exc).__name__}: {exc}")

    def _requeue(self, record: _Record, error: str) -> None:
        """Put a failed record back ahead of later ones (in sequence order), to be sent again."""
        with self._cond:
            if self._failing_since is None:
                self._failing_since = time.monotonic()
            self._last_error = error
            i = 0
            while i < len(self._queue) and self._queue[i][3] < record[3]:
                i += 1
            self._queue.insert(i, record)
            self._cond.notify_all()
