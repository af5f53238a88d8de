"""Frames from Kafka topics, with at-least-once offset commits and a dead-letter topic.

Wire format (one message per frame): value = JPEG or PNG bytes; key = camera_id; headers
``camera_id``, ``ts`` (capture time, epoch ms), ``seq``, ``content-type``. The helpers
``encode_frame`` and ``frame_from_record`` (in ``oddeye.frames``, re-exported here) are the one
implementation of it; the publisher (``oddeye publish``) uses them too.

Fallbacks for messages from other producers (documented in ``frame_from_record``):
camera_id from the header, else the key; a missing ``seq`` is the message's offset; a
missing ``ts`` is the message's Kafka timestamp; a missing content-type is accepted (the
decoder decides). Present but unusable fields (an ``seq`` that is not an integer, an
unknown content-type), a missing camera_id, an empty or oversized value make the frame
invalid: it is yielded with ``meta["error"]`` so the ingest stage sends it down the
dead-letter path, which republishes it to ``dlq_topic`` and then counts its offset done.

Commits: the ingest stage acknowledges frames in any order, from any thread. Per partition
the source keeps the offsets it delivered in order and commits ``offset + 1`` of the
highest one below which everything is finished. Commits are made on the iterating thread
between polls (the consumer is not thread-safe) and once more on ``close()``.

Rebalances: a revoked partition's finished offsets are committed, and its tracking is kept
(acks still count, nothing of it is committed) until the new assignment is known. A partition
assigned back keeps it: the consumer may go on from where it was (kafka-python keeps the fetch
position of a partition it gets back), and the frames it delivered before are still being
scored; their acks must count. A partition assigned elsewhere is forgotten. When the consumer
rewinds instead (a record at or below one already delivered: a re-read from the committed
offset), the tracking restarts there.
"""

from __future__ import annotations

import logging
import random
import re
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from oddeye.frames import (  # the wire format lives beside the other formats; re-exported here
    CONTENT_TYPES,
    Frame,
    encode_frame,
    frame_from_record,
    sniff_content_type,
)
from oddeye.sources.base import Source, SourceError

__all__ = ["CONTENT_TYPES", "KafkaSource", "encode_frame", "frame_from_record", "sniff_content_type"]

log = logging.getLogger(__name__)

_TOPIC_NAME = re.compile(r"[A-Za-z0-9._-]{1,249}")
_SECRET_KEY = re.compile(r"password|secret|token|key|username|sasl_oauth|credential", re.IGNORECASE)
_COMMIT_INTERVAL_S = 0.5
_HEALTH_INTERVAL_S = 3.0
_BOOTSTRAP_TIMEOUT_MS = 5_000
_DLQ_TIMEOUT_S = 30.0


# ----------------------------------------------------------------------------- offset tracking


@dataclass
class _Partition:
    """Delivered offsets of one partition, in delivery order, and which of them are done."""

    order: deque[int] = field(default_factory=deque)
    pending: set[int] = field(default_factory=set)
    done: set[int] = field(default_factory=set)
    commit_to: int | None = None
    """``offset + 1`` of the highest offset below which everything is done."""
    committed: int | None = None
    next_offset: int | None = None

    def advance(self) -> int | None:
        while self.order and self.order[0] in self.done:
            o = self.order.popleft()
            self.done.discard(o)
            self.pending.discard(o)
            self.commit_to = o + 1
        return self.commit_to


def redact(options: dict[str, Any]) -> dict[str, Any]:
    """Options with secret-looking values replaced, for logs."""
    return {k: ("***" if _SECRET_KEY.search(k) and v is not None else v) for k, v in options.items()}


class KafkaSource(Source):
    """Frames from Kafka in oddeye's wire format; an endless source (it ends on ``close()``).

    - ``start``: ``committed`` resumes from the group's committed offsets (earliest where
      there are none); ``earliest`` / ``latest`` reposition each partition the first time
      this source is assigned it (use ``committed`` when several replicas share a group,
      or a later rebalance would reposition a partition again).
    - A broker that cannot be reached (at start or later) is retried with exponential
      backoff and jitter; ``up`` and ``reconnects`` follow, with one log line per change.
    - Topics that do not exist yet are waited for (logged once); topic names that cannot
      exist are a ``SourceError`` at construction.
    - Rebalances: revoked partitions have their finished offsets committed and their
      tracking forgotten; their frames still in flight are re-delivered to the new owner.
    """

    def __init__(
        self,
        bootstrap_servers: str | list[str] = "localhost:9092",
        topics: Sequence[str] = ("frames",),
        pattern: str | None = None,
        group_id: str = "oddeye",
        start: str = "committed",
        camera_id: str | None = None,
        max_poll_records: int = 100,
        session_timeout_ms: int = 10_000,
        heartbeat_interval_ms: int = 3_000,
        max_message_bytes: int = 20_000_000,
        dlq_topic: str | None = "frames.dlq",
        security: dict[str, Any] | None = None,
        consumer: dict[str, Any] | None = None,
        reconnect_initial_s: float = 0.5,
        reconnect_max_s: float = 5.0,
    ) -> None:
        super().__init__()
        from kafka import KafkaConsumer

        if start not in ("committed", "earliest", "latest"):
            raise SourceError(f"start {start!r}; allowed: committed, earliest, latest")
        self.topics = [] if pattern else list(topics)
        self.pattern = pattern
        if pattern:
            try:
                re.compile(pattern)
            except re.error as e:
                raise SourceError(f"pattern {pattern!r} is not a valid regular expression: {e}") from None
        elif not self.topics:
            raise SourceError("a Kafka source needs topics or a pattern")
        for name in [*self.topics, *([dlq_topic] if dlq_topic else [])]:
            if not _TOPIC_NAME.fullmatch(name) or name in (".", ".."):
                raise SourceError(f"{name!r} cannot be a Kafka topic name (letters, digits, '.', '_', '-'; ≤ 249)")
        self.bootstrap_servers = bootstrap_servers
        self.group_id = group_id
        self.start = start
        self.camera_id = camera_id or "kafka:" + (pattern or ",".join(self.topics))
        self.max_poll_records = int(max_poll_records)
        self.max_message_bytes = int(max_message_bytes)
        self.dlq_topic = dlq_topic
        self.security = dict(security or {})
        self.reconnect_initial_s = float(reconnect_initial_s)
        self.reconnect_max_s = float(reconnect_max_s)
        extra = dict(consumer or {})
        if extra.get("enable_auto_commit"):
            raise SourceError("consumer.enable_auto_commit cannot be on: oddeye commits offsets after scoring")
        self._options: dict[str, Any] = {
            "bootstrap_servers": bootstrap_servers,
            "group_id": group_id,
            "client_id": f"oddeye-{group_id}",
            "auto_offset_reset": "latest" if start == "latest" else "earliest",
            "max_poll_records": self.max_poll_records,
            "session_timeout_ms": int(session_timeout_ms),
            "heartbeat_interval_ms": int(heartbeat_interval_ms),
            "bootstrap_timeout_ms": _BOOTSTRAP_TIMEOUT_MS,
            # a broker back from an outage is found within reconnect_max_s (kafka-python waits up to 30 s)
            "reconnect_backoff_max_ms": int(float(reconnect_max_s) * 1000),
            **self.security,
            **extra,
            "enable_auto_commit": False,
        }
        unknown = sorted(set(self._options) - set(KafkaConsumer.DEFAULT_CONFIG))
        if unknown:
            raise SourceError(f"unknown kafka-python consumer option(s): {', '.join(unknown)}")

        self._consumer: Any = None
        self._producer: Any = None
        self._lock = threading.RLock()  # the consumer: iterating thread, or close() once it has stopped
        self._track_lock = threading.Lock()  # offset tracking: shared with ack() and the rebalance listener
        self._parts: dict[tuple[str, int], _Partition] = {}
        # Kept by the rebalance listener: only these partitions are committed. Tracking of the others
        # lives on between a revoke and the next assignment, so in-flight acks still count.
        self._assigned: set[tuple[str, int]] = set()
        self._seen: set[tuple[str, int]] = set()
        self._closing = threading.Event()
        self._closed = False
        self._lag: dict[str, int] = {}
        self._last_commit = 0.0
        self._last_health = 0.0
        self._warned_unassigned = False
        self._unassigned_since = time.monotonic()
        self._ever_up = False

    # ------------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[Frame]:
        buffer: deque[Any] = deque()
        backoff = self.reconnect_initial_s
        try:
            while not self._closing.is_set():
                if self._consumer is None:
                    if self._connect():
                        backoff = self.reconnect_initial_s
                    else:
                        self._closing.wait(backoff * random.uniform(0.8, 1.2))
                        backoff = min(backoff * 2, self.reconnect_max_s)
                    continue
                failed = False
                with self._lock:
                    if self._closing.is_set() or self._consumer is None:
                        break
                    try:
                        self._safe_commit(force=False)
                        self._check_health()
                        buffer.extend(self._poll())
                    except Exception as e:  # never crash the ingest actor on a broker error
                        self._set_up(False, f"{type(e).__name__}: {e}")
                        failed = True
                if failed:  # back off outside the lock, so close() is not held up
                    self._closing.wait(backoff * random.uniform(0.8, 1.2))
                    backoff = min(backoff * 2, self.reconnect_max_s)
                    continue
                backoff = self.reconnect_initial_s
                while buffer and not self._closing.is_set():
                    record = buffer.popleft()
                    frame = frame_from_record(record, self.max_message_bytes)
                    key = (record.topic, record.partition)
                    with self._track_lock:
                        part = self._parts.get(key)
                        if part is None or (part.next_offset is not None and record.offset < part.next_offset):
                            # New, or re-read from an earlier offset. A record polled before its partition
                            # went to another member is still scored, but never committed from here.
                            part = self._parts[key] = _Partition()
                        part.order.append(record.offset)
                        part.pending.add(record.offset)
                        part.next_offset = record.offset + 1
                    yield frame
                    if time.monotonic() - self._last_commit >= _COMMIT_INTERVAL_S:
                        with self._lock:
                            if self._consumer is not None and not self._closing.is_set():
                                self._safe_commit()
        finally:
            self._shutdown()

    def _connect(self) -> bool:
        from kafka import KafkaConsumer
        from kafka.errors import KafkaError

        try:
            consumer = KafkaConsumer(**self._options)
        except (KafkaError, OSError) as e:
            self._set_up(False, f"cannot reach broker(s) {self.bootstrap_servers}: {type(e).__name__}: {e}")
            return False
        listener = _make_listener(self)
        if self.pattern:
            consumer.subscribe(pattern=self.pattern, listener=listener)
        else:
            consumer.subscribe(topics=self.topics, listener=listener)
        with self._lock:
            if self._closing.is_set():
                consumer.close(autocommit=False)
                return False
            self._consumer = consumer
        self._unassigned_since = time.monotonic()
        self._set_up(True, None)
        return True

    def _poll(self) -> list[Any]:
        records = self._consumer.poll(timeout_ms=200, max_records=self.max_poll_records)
        out = [r for batch in records.values() for r in batch]
        if out:
            self._set_up(True, None)
        return out

    def _set_up(self, up: bool, reason: str | None) -> None:
        """Record broker reachability; one log line per change of state."""
        if up and self.up is not True:
            if self.up is False and self._ever_up:
                self.reconnects += 1
            log.info("kafka source %s: connected to %s", self.camera_id, self.bootstrap_servers)
            self._ever_up = True
        elif not up and self.up is not False:
            log.warning("kafka source %s: broker unavailable (%s); retrying with backoff", self.camera_id, reason)
        self.up = up

    def _check_health(self) -> None:
        """Every few seconds: end offsets of the assigned partitions → lag, and whether the broker answers."""
        now = time.monotonic()
        if now - self._last_health < _HEALTH_INTERVAL_S:
            return
        self._last_health = now
        from kafka.errors import KafkaError

        assigned = list(self._consumer.assignment())
        if not assigned:
            if not self._warned_unassigned and now - self._unassigned_since > max(
                10.0, 2 * self._options["session_timeout_ms"] / 1000
            ):
                self._warned_unassigned = True
                what = f"pattern {self.pattern!r}" if self.pattern else f"topic(s) {', '.join(self.topics)}"
                log.warning(
                    "kafka source %s: no partitions assigned for %s in group %s yet (topic missing, or every "
                    "partition taken by other members); waiting",
                    self.camera_id,
                    what,
                    self.group_id,
                )
            return
        if self._warned_unassigned:
            log.info("kafka source %s: partitions assigned: %d", self.camera_id, len(assigned))
            self._warned_unassigned = False
        try:
            ends = self._consumer.end_offsets(assigned, timeout_ms=2000)
        except KafkaError as e:
            self._set_up(False, f"{type(e).__name__}: {e}")
            return
        self._set_up(True, None)
        lag: dict[str, int] = {}
        for tp, end in ends.items():
            # Lag counts from the committed offset: a frame delivered but not yet scored and
            # written is not done, and a stalled commit must show as growing lag.
            with self._track_lock:
                part = self._parts.get((tp.topic, tp.partition))
                pos = part.committed if part is not None else None
                if part is not None and pos is None and part.order:
                    pos = part.order[0]  # nothing committed by us yet: everything from the first delivered
            if pos is None:
                try:
                    pos = self._consumer.committed(tp)
                except Exception:
                    pos = None
            if pos is None:
                try:
                    pos = self._consumer.position(tp, timeout_ms=500)
                except Exception:
                    pos = None
            try:  # the fetch high watermark too: some brokers (tansu) report the last batch's start as the end
                high = self._consumer.highwater(tp)
            except Exception:
                high = None
            end = max(x for x in (end, high, 0) if x is not None)
            if pos is not None:
                lag[f"{tp.topic}/{tp.partition}"] = max(0, int(end) - int(pos))
        self._lag = lag

    # ------------------------------------------------------------------ commits
    def _commit_offsets(self, keys: Sequence[tuple[str, int]] | None = None) -> dict[Any, Any]:
        """Offsets ready to commit (and not yet committed), as kafka-python wants them."""
        from kafka.structs import OffsetAndMetadata, TopicPartition

        out = {}
        with self._track_lock:
            for key, part in self._parts.items():
                if key not in self._assigned or (keys is not None and key not in keys):
                    continue
                to = part.advance()
                if to is not None and (part.committed is None or to > part.committed):
                    out[TopicPartition(*key)] = OffsetAndMetadata(to, "", -1)
        return out

    def _commit(self, force: bool) -> None:
        """Commit finished offsets (on the iterating thread, or in close once iteration stopped)."""
        if not force and time.monotonic() - self._last_commit < _COMMIT_INTERVAL_S:
            return
        self._last_commit = time.monotonic()
        offsets = self._commit_offsets()
        if not offsets:
            return
        self._consumer.commit(offsets)
        with self._track_lock:
            for tp, om in offsets.items():
                part = self._parts.get((tp.topic, tp.partition))
                if part is not None:
                    part.committed = om.offset
        log.debug(
            "kafka source %s: committed %s",
            self.camera_id,
            {f"{t.topic}/{t.partition}": o.offset for t, o in offsets.items()},
        )

    def _safe_commit(self, force: bool = True) -> None:
        from kafka.errors import KafkaError

        try:
            self._commit(force=force)
        except (KafkaError, OSError, RuntimeError) as e:  # a rebalance in progress, a broker away: retried later
            log.warning("kafka source %s: offset commit failed (%s); will retry", self.camera_id, e)

    def _on_revoked(self, revoked: Sequence[Any]) -> None:
        """Runs on kafka-python's IO loop: must not block; commits asynchronously, keeps the tracking."""
        keys = [(tp.topic, tp.partition) for tp in revoked]
        offsets = self._commit_offsets(keys)
        with self._track_lock:
            self._assigned.difference_update(keys)
        if offsets and self._consumer is not None:
            try:
                self._consumer.commit_async(offsets)
            except Exception as e:
                log.warning("kafka source %s: commit on revoke failed (%s)", self.camera_id, e)
        if revoked:
            log.info("kafka source %s: partitions revoked: %s", self.camera_id, _labels(revoked))

    def _on_assigned(self, assigned: Sequence[Any]) -> None:
        with self._track_lock:
            self._assigned.update((tp.topic, tp.partition) for tp in assigned)
            # A partition assigned back keeps its tracking: the frames delivered before are still being
            # scored. One another member owns now is forgotten: its in-flight acks no longer matter here.
            for key in [k for k in self._parts if k not in self._assigned]:
                del self._parts[key]
        fresh = [tp for tp in assigned if (tp.topic, tp.partition) not in self._seen]
        self._seen.update((tp.topic, tp.partition) for tp in assigned)
        if fresh and self.start != "committed" and self._consumer is not None:
            seek = self._consumer.seek_to_beginning if self.start == "earliest" else self._consumer.seek_to_end
            seek(*fresh)
        if assigned:
            log.info("kafka source %s: partitions assigned: %s", self.camera_id, _labels(assigned))

    # ------------------------------------------------------------------ Source hooks
    def ack(self, frame: Frame) -> None:
        """Mark a delivered message done (any thread); acks of partitions another member took are ignored."""
        o = frame.origin
        try:
            key, offset = (o["topic"], int(o["partition"])), int(o["offset"])
        except (KeyError, TypeError, ValueError):
            return
        with self._track_lock:
            part = self._parts.get(key)
            if part is not None and offset in part.pending:
                part.done.add(offset)

    def dead_letter(self, frame: Frame, error: str) -> bool:
        """Publish the original message plus an ``error`` header to ``dlq_topic``, then mark it done.

        Returns False when the dead-letter topic cannot be written: the offset stays uncommitted
        and the caller retries later (the message is never acked without being recorded).
        """
        if self.dlq_topic and frame.origin.get("topic") is not None:
            try:
                self._publish_dead_letter(frame, error)
            except Exception as e:
                log.error(
                    "kafka source %s: cannot publish dead letter %s to %s (%s); its offset stays uncommitted",
                    self.camera_id,
                    _origin_label(frame.origin),
                    self.dlq_topic,
                    e,
                )
                return False
        self.ack(frame)
        return True

    def _publish_dead_letter(self, frame: Frame, error: str) -> None:
        if self._producer is None:
            from kafka import KafkaProducer

            self._producer = KafkaProducer(
                bootstrap_servers=self.bootstrap_servers,
                client_id=f"oddeye-{self.group_id}-dlq",
                acks="all",
                max_request_size=min(self.max_message_bytes + (1 << 20), 100 << 20),
                bootstrap_timeout_ms=_BOOTSTRAP_TIMEOUT_MS,
                **self.security,
            )
        headers = list(frame.meta.get("_kafka_headers") or [])
        key = frame.meta.get("_kafka_key")
        if "_kafka_headers" not in frame.meta:  # not from this source's records: rebuild the wire headers
            key, _, headers = encode_frame(Frame(frame.camera_id, frame.seq, frame.timestamp, b"\xff\xd8\xff"))
        o = frame.origin
        headers += [
            ("error", error.encode("utf-8", "replace")[:4096]),
            ("source_topic", str(o.get("topic")).encode()),
            ("source_partition", str(o.get("partition")).encode()),
            ("source_offset", str(o.get("offset")).encode()),
        ]
        if "value_bytes" in frame.meta:
            headers.append(("value_bytes", str(frame.meta["value_bytes"]).encode()))
        value = bytes(frame.image) if isinstance(frame.image, (bytes, bytearray, memoryview)) else b""
        self._producer.send(self.dlq_topic, value=value, key=key, headers=headers).get(timeout=_DLQ_TIMEOUT_S)

    def lag(self) -> dict[str, int]:
        """Cached per-partition lag (refreshed by the iterating thread every few seconds)."""
        return dict(self._lag)

    def interrupt(self) -> None:
        """End iteration soon (any thread): the iterating thread commits, closes the consumer and returns."""
        self._closing.set()

    def close(self) -> None:
        """Stop iterating, commit what is finished, leave the group. Safe from any thread, idempotent."""
        self._closing.set()
        if not self._lock.acquire(timeout=10.0):
            log.warning("kafka source %s: still polling; the iterating thread will commit and close", self.camera_id)
            return
        try:
            self._shutdown()
        finally:
            self._lock.release()

    def _shutdown(self) -> None:
        with self._lock:
            if self._consumer is not None:
                self._safe_commit()
                consumer, self._consumer = self._consumer, None
                try:
                    consumer.close(autocommit=False, timeout_ms=5000)
                except Exception:
                    log.debug("closing consumer", exc_info=True)
            producer, self._producer = self._producer, None
            if producer is not None:
                try:
                    producer.close(timeout=5)
                except Exception:
                    log.debug("closing DLQ producer", exc_info=True)
            self._closed = True
            self.up = False

    def describe(self) -> dict[str, Any]:
        return {
            "type": type(self).__name__,
            "camera_id": self.camera_id,
            "bootstrap_servers": self.bootstrap_servers,
            "topics": self.topics,
            "pattern": self.pattern,
            "group_id": self.group_id,
            "start": self.start,
            "dlq_topic": self.dlq_topic,
            "security": redact(self.security),
        }


def _labels(tps: Sequence[Any]) -> str:
    return ", ".join(sorted(f"{tp.topic}/{tp.partition}" for tp in tps))


def _origin_label(origin: dict[str, Any]) -> str:
    return f"{origin.get('topic')}/{origin.get('partition')}@{origin.get('offset')}"


def _make_listener(source: KafkaSource) -> Any:
    from kafka import ConsumerRebalanceListener

    class _Listener(ConsumerRebalanceListener):
        def on_partitions_revoked(self, revoked: Any) -> None:
            source._on_revoked(list(revoked))

        def on_partitions_assigned(self, assigned: Any) -> None:
            source._on_assigned(list(assigned))

        def on_partitions_lost(self, lost: Any) -> None:  # evicted: another member owns them now, commit nothing
            with source._track_lock:
                for tp in lost:
                    source._parts.pop((tp.topic, tp.partition), None)
                    source._assigned.discard((tp.topic, tp.partition))
            log.warning("kafka source %s: partitions lost: %s", source.camera_id, _labels(list(lost)))

    return _Listener()
