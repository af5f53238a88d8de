"""The ingest stage: read a source, decode and resize frames, apply the drop policy.

``IngestWorker`` is plain Python (testable without Ray); ``oddeye.pipeline.actors``
hosts it as a Ray actor, one per source. A reader thread pulls frames from the source
into a bounded queue; the driver takes frames out in small batches. When the queue is
full the drop policy decides: ``block`` (files, topics: back-pressure, nothing lost),
``drop_oldest`` (live cameras: keep the newest, never build up latency) or
``drop_newest``. Every frame that does not reach the model is counted with its reason,
and frames that cannot be decoded go to the dead-letter path with their error.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from oddeye.frames import DecodeError, Frame, as_rgb_uint8, decode_image, resize_image
from oddeye.sources.base import Source

log = logging.getLogger(__name__)

DROP_POLICIES = ("drop_oldest", "drop_newest", "block")


def prepare_frame(frame: Frame, image_size: tuple[int, int]) -> Frame:
    """Decode (if encoded) and resize a frame to the model's (H, W); raises ``DecodeError``."""
    if isinstance(frame.image, (bytes, bytearray, memoryview)):
        image = decode_image(frame.image, size_hint=image_size)
    elif isinstance(frame.image, np.ndarray):
        image = as_rgb_uint8(frame.image)
    else:
        raise DecodeError(f"unsupported image payload {type(frame.image).__name__}")
    frame.image = resize_image(image, image_size)
    return frame


@dataclass
class DeadLetter:
    """A frame that could not be scored, with its original payload and the reason."""

    frame: Frame
    error: str
    reason: str = "decode_error"


@dataclass
class IngestStats:
    """Cumulative counters of one ingest worker (the driver turns them into metrics)."""

    camera_id: str
    ingested: int = 0
    decode_errors: int = 0
    dead_letters: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    queue_depth: int = 0
    source_up: bool = False
    reconnects: int = 0
    lag: dict[str, int] = field(default_factory=dict)

    def drop(self, reason: str, n: int = 1) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + n


@dataclass
class TakeResult:
    frames: list[Frame]
    dead_letters: list[DeadLetter]
    stats: IngestStats
    exhausted: bool
    error: str | None = None


class IngestWorker:
    """Reads one source on a thread into a bounded queue with a drop policy."""

    def __init__(
        self,
        make_source: Callable[[], Source],
        camera_id: str,
        image_size: tuple[int, int],
        drop_policy: str,
        queue_size: int,
    ) -> None:
        if drop_policy not in DROP_POLICIES:
            raise ValueError(f"drop_policy {drop_policy!r}; allowed: {', '.join(DROP_POLICIES)}")
        self.make_source = make_source
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.drop_policy = drop_policy
        self.queue_size = queue_size
        self.stats = IngestStats(camera_id=camera_id)
        self.source: Source | None = None
        self._queue: deque[Frame] = deque()
        self._dead: deque[DeadLetter] = deque()
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._finished = False
        self._error: str | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle
    def start(self) -> dict[str, Any]:
        """Open the source and start reading. Returns ``{"ok": bool, "error": str | None}``."""
        try:
            self.source = self.make_source()
        except Exception as e:  # a missing file or bad URL must reach the user, not kill the actor
            self._error = f"{type(e).__name__}: {e}"
            self._finished = True
            return {"ok": False, "error": self._error}
        self._thread = threading.Thread(target=self._read_loop, name=f"ingest-{self.stats.camera_id}", daemon=True)
        self._thread.start()
        return {"ok": True, "error": None}

    def stop(self, timeout_s: float = 5.0) -> IngestStats:
        """Stop reading; frames still queued are counted as dropped for ``shutdown``."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        interrupt = getattr(self.source, "interrupt", None)
        if callable(interrupt):
            interrupt()  # a source waiting for input (an idle Kafka topic) ends its iteration now
        if self._thread is not None:
            self._thread.join(timeout_s)
        with self._cond:
            if self._queue:
                self.stats.drop("shutdown", len(self._queue))
                self._queue.clear()
            self.stats.queue_depth = 0
        if self.source is not None:
            try:
                self.source.close()
            except Exception:
                log.exception("closing source %s", self.stats.camera_id)
        self._sync_source_skips()
        self.stats.source_up = False
        return self.stats

    # -- reader thread
    def _read_loop(self) -> None:
        assert self.source is not None
        self.stats.source_up = True
        try:
            for frame in self.source:
                if self._stop.is_set():
                    break
                frame.meta.setdefault("t_ingest", time.time())
                self._handle(frame)
                self._sync_source_skips()
        except Exception as e:
            self._error = f"{type(e).__name__}: {e}"
            log.error("source %s failed: %s", self.stats.camera_id, self._error)
        finally:
            self.stats.source_up = False
            with self._cond:
                self._finished = True
                self._cond.notify_all()

    def _handle(self, frame: Frame) -> None:
        self.stats.ingested += 1
        if frame.meta.get("error"):
            self._push_dead(
                DeadLetter(frame, str(frame.meta["error"]), reason=frame.meta.get("error_reason", "invalid"))
            )
            return
        original = frame.image
        try:
            prepare_frame(frame, self.image_size)
        except (DecodeError, ValueError) as e:
            frame.image = original
            self.stats.decode_errors += 1
            self._push_dead(DeadLetter(frame, str(e)))
            return
        with self._cond:
            while len(self._queue) >= self.queue_size:
                if self.drop_policy == "drop_oldest":
                    self._dropped_by_policy(self._queue.popleft())
                elif self.drop_policy == "drop_newest":
                    self._dropped_by_policy(frame)
                    return
                else:  # block: back-pressure on the source
                    if self._stop.is_set():
                        self.stats.drop("shutdown")
                        return
                    self._cond.wait(0.1)
            self._queue.append(frame)
            self.stats.queue_depth = len(self._queue)
            self._cond.notify_all()

    def _dropped_by_policy(self, frame: Frame) -> None:
        """A frame dropped by the configured policy is finished: counted, and acknowledged."""
        self.stats.drop("queue_full")
        self._safe_source_call("ack", frame)

    def _safe_source_call(self, method: str, *args: Any) -> None:
        try:
            getattr(self.source, method)(*args)
        except Exception:
            log.exception("source %s: %s failed", self.stats.camera_id, method)

    def _push_dead(self, dead: DeadLetter) -> None:
        # The source's own dead-letter path first (a Kafka DLQ topic), then the driver's sinks.
        self._safe_source_call("dead_letter", dead.frame, dead.error)
        with self._cond:
            while len(self._dead) >= self.queue_size and not self._stop.is_set():
                self._cond.wait(0.1)  # dead letters are never dropped: wait for the driver
            self._dead.append(dead)
            self.stats.dead_letters += 1
            self._cond.notify_all()

    def _sync_source_skips(self) -> None:
        """Copy the source's own counters (skips, health, lag) into the stats."""
        src = self.source
        if src is None:
            return
        for reason, n in src.skipped.items():
            self.stats.dropped[reason] = n
        self.stats.reconnects = src.reconnects
        if src.up is not None and not self._finished:
            self.stats.source_up = src.up
        try:
            self.stats.lag = dict(src.lag())
        except Exception:
            log.debug("lag() failed", exc_info=True)

    # -- driver side
    def take(self, max_n: int, timeout_s: float) -> TakeResult:
        """Up to ``max_n`` frames, waiting at most ``timeout_s`` for the first one."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while not self._queue and not self._dead and not self._finished:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            n = min(max_n, len(self._queue))
            frames = [self._queue.popleft() for _ in range(n)]
            dead = list(self._dead)
            self._dead.clear()
            self.stats.queue_depth = len(self._queue)
            exhausted = self._finished and not self._queue and not self._dead
            self._cond.notify_all()
        self._sync_source_skips()
        return TakeResult(frames, dead, self.stats, exhausted, self._error)

    def ack(self, items: list[tuple[str, int, dict[str, Any]]]) -> None:
        """Acknowledge finished frames by (camera_id, seq, origin) so the source can commit."""
        if self.source is None:
            return
        for camera_id, seq, origin in items:
            self.source.ack(Frame(camera_id=camera_id, seq=seq, timestamp=0.0, image=b"", origin=origin))
