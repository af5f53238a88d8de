"""The ingest stage: read a source, decode and resize frames, apply the drop policy.

``IngestWorker`` is plain Python (testable without Ray); ``oddeye.pipeline.actors``
hosts it as a Ray actor, one per source. A reader thread pulls frames from the source
into a bounded queue; the driver takes frames out in small batches. When the queue is
full the drop policy decides: ``block`` (files, topics: back-pressure, nothing lost),
``drop_oldest`` (live cameras: keep the newest, never build up latency) or
``drop_newest``. Every frame that does not reach the model is counted with its reason,
and frames that cannot be decoded go to the dead-letter path with their error.

With ``decode_workers`` > 1 the reader thread hands decoding to a small thread pool (OpenCV
releases the GIL while it decodes) and a second thread queues the results in the source's order,
so one busy source (a Kafka topic, a folder) can use more than one core.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from oddeye.frames import DecodeError, Frame, as_rgb_uint8, decode_image, resize_image
from oddeye.sources.base import Source

log = logging.getLogger(__name__)

DROP_POLICIES = ("drop_oldest", "drop_newest", "block")


def _payload_len(image: Any) -> int:
    if isinstance(image, (bytes, bytearray, memoryview)):
        return len(image)
    return int(getattr(image, "nbytes", 0))


def prepare_frame(frame: Frame, image_size: tuple[int, int], max_pixels: int | None = None) -> Frame:
    """Decode (if encoded) and resize a frame to the model's (H, W); raises ``DecodeError``."""
    if isinstance(frame.image, (bytes, bytearray, memoryview)):
        kwargs = {} if max_pixels is None else {"max_pixels": max_pixels}
        image = decode_image(frame.image, size_hint=image_size, **kwargs)
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
    """Frames read and waiting here: queued for the driver, or (``decode_workers`` > 1) being decoded."""
    source_up: bool = False
    reconnects: int = 0
    lag: dict[str, int] = field(default_factory=dict)
    oldest_unacked_s: float = 0.0
    """Age of the oldest frame read and not yet finished (acknowledged or dead-lettered)."""
    unacked: int = 0
    node_id: str | None = None

    def drop(self, reason: str, n: int = 1) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + n


@dataclass
class TakeResult:
    """Frames for the driver. In the Ray pipeline ``frames`` carry no pixels: their images are
    stacked into one uint8 array [n, H, W, 3] in the object store and ``images`` is its reference."""

    frames: list[Frame]
    dead_letters: list[DeadLetter]
    stats: IngestStats
    exhausted: bool
    error: str | None = None
    images: Any = None


class IngestWorker:
    """Reads one source on a thread into a bounded queue with a drop policy."""

    def __init__(
        self,
        make_source: Callable[[], Source],
        camera_id: str,
        image_size: tuple[int, int],
        drop_policy: str,
        queue_size: int,
        max_pixels: int | None = None,
        max_cameras: int | None = None,
        camera_idle_s: float = 3600.0,
        ack_dropped: bool = True,
        decode_workers: int = 1,
    ) -> None:
        """``ack_dropped``: frames dropped by the policy are acknowledged (skipped for good); a
        Kafka source only allows that with ``allow_skip``. ``max_cameras`` caps the distinct camera
        ids one source may carry (an untrusted header must not grow state without bound): frames of
        a new camera past the cap are dead letters; cameras idle for ``camera_idle_s`` are forgotten.
        """
        if drop_policy not in DROP_POLICIES:
            raise ValueError(f"drop_policy {drop_policy!r}; allowed: {', '.join(DROP_POLICIES)}")
        if decode_workers < 1:
            raise ValueError(f"decode_workers must be ≥ 1, got {decode_workers}")
        self.decode_workers = int(decode_workers)
        self.max_pixels = max_pixels
        self.max_cameras = max_cameras
        self.camera_idle_s = camera_idle_s
        self.ack_dropped = ack_dropped
        self._cameras: dict[str, float] = {}
        self._next_token = 0
        self._held: dict[int, Frame] = {}
        """Frames handed to the driver and not yet finished, by token, with their original payload."""
        self._dlq_retry: deque[tuple[Frame, str]] = deque()
        self.make_source = make_source
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.drop_policy = drop_policy
        self.queue_size = queue_size
        self.stats = IngestStats(camera_id=camera_id)
        self.source: Source | None = None
        self._queue: deque[Frame] = deque()
        self._decoding: deque[Frame] = deque()  # decode_workers > 1: read, admitted, in the decode pool
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
        pool: ThreadPoolExecutor | None = None
        pending: queue.Queue[tuple[Frame, Any, Future] | None] | None = None
        finisher: threading.Thread | None = None
        if self.decode_workers > 1:
            pool = ThreadPoolExecutor(self.decode_workers, thread_name_prefix=f"decode-{self.stats.camera_id}")
            pending = queue.Queue(maxsize=2 * self.decode_workers)  # bounds the frames being decoded
            finisher = threading.Thread(target=self._finish_loop, args=(pending,), daemon=True)
            finisher.start()
        try:
            for frame in self.source:
                if self._stop.is_set():
                    break
                frame.meta.setdefault("t_ingest", time.time())
                if pool is None or pending is None:
                    self._handle(frame)
                elif self._admit(frame):
                    original = frame.image
                    with self._cond:
                        self._decoding.append(frame)
                        self.stats.queue_depth = self._depth()
                    pending.put((frame, original, pool.submit(self._decode, frame)))
                self._sync_source_skips()
        except Exception as e:
            self._error = f"{type(e).__name__}: {e}"
            log.error("source %s failed: %s", self.stats.camera_id, self._error)
        finally:
            if pending is not None and finisher is not None and pool is not None:
                pending.put(None)  # the finisher queues what is decoded so far, in order, then ends
                finisher.join()
                pool.shutdown(wait=True)
            self.stats.source_up = False
            with self._cond:
                self._finished = True
                self._cond.notify_all()

    def _finish_loop(self, pending: queue.Queue[tuple[Frame, Any, Future] | None]) -> None:
        """Second thread with ``decode_workers`` > 1: queue decoded frames in the order they were read."""
        while True:
            item = pending.get()
            if item is None:
                return
            frame, original, future = item
            self._enqueue(frame, original, future.exception())
            with self._cond:
                self._decoding.popleft()  # this frame (the pool's frames finish here in read order)
                self.stats.queue_depth = self._depth()

    def _decode(self, frame: Frame) -> None:
        prepare_frame(frame, self.image_size, self.max_pixels)

    def _handle(self, frame: Frame) -> None:
        """Admit, decode and queue one frame on the reader thread (``decode_workers`` = 1)."""
        if not self._admit(frame):
            return
        original = frame.image
        error: BaseException | None = None
        try:
            self._decode(frame)
        except Exception as e:
            error = e
        self._enqueue(frame, original, error)

    def _admit(self, frame: Frame) -> bool:
        """Give the frame its token; False (and a dead letter) for an invalid frame or one camera too many."""
        self.stats.ingested += 1
        with self._cond:
            frame.meta["_token"] = self._next_token
            self._next_token += 1
        if frame.meta.get("error"):
            self._push_dead(
                DeadLetter(frame, str(frame.meta["error"]), reason=frame.meta.get("error_reason", "invalid"))
            )
            return False
        if not self._admit_camera(frame):
            self._push_dead(
                DeadLetter(
                    frame,
                    f"camera {frame.camera_id[:80]!r} is over this source's max_cameras={self.max_cameras}",
                    reason="too_many_cameras",
                )
            )
            return False
        return True

    def _enqueue(self, frame: Frame, original: Any, error: BaseException | None) -> None:
        """Queue a decoded frame (drop policy applies), or dead-letter it with its decoder error."""
        if error is not None:  # any decoder failure (cv2.error, a bomb, garbage) is a dead letter
            frame.image = original
            self.stats.decode_errors += 1
            msg = str(error) if isinstance(error, (DecodeError, ValueError)) else f"{type(error).__name__}: {error}"
            self._push_dead(DeadLetter(frame, msg))
            return
        if isinstance(original, (bytes, bytearray, memoryview)):
            frame.meta["_original"] = original  # kept (in this actor only) for the dead-letter path
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
            self.stats.queue_depth = self._depth()
            self._cond.notify_all()

    def _admit_camera(self, frame: Frame) -> bool:
        """Track distinct cameras; refuse a new one past ``max_cameras``; forget idle ones."""
        now = time.monotonic()
        cams = self._cameras
        if frame.camera_id in cams:
            cams[frame.camera_id] = now
            return True
        if self.max_cameras is not None and len(cams) >= self.max_cameras:
            idle = [c for c, t in cams.items() if now - t > self.camera_idle_s]
            for c in idle:
                del cams[c]
            if len(cams) >= self.max_cameras:
                return False
        cams[frame.camera_id] = now
        return True

    def _dropped_by_policy(self, frame: Frame) -> None:
        """A frame dropped by the configured policy is counted; acknowledged only where skipping is allowed."""
        self.stats.drop("queue_full")
        if self.ack_dropped:
            self._safe_source_call("ack", frame)

    def _safe_source_call(self, method: str, *args: Any) -> None:
        try:
            getattr(self.source, method)(*args)
        except Exception:
            log.exception("source %s: %s failed", self.stats.camera_id, method)

    def _route_dead(self, frame: Frame, error: str) -> None:
        """The source's own dead-letter path (a Kafka DLQ topic), which acknowledges the frame.

        If that path fails (the DLQ broker is away), the frame is retried later: never acked
        without being recorded, never dropped.
        """
        try:
            ok = self.source.dead_letter(frame, error) if self.source is not None else True
        except Exception as e:
            log.warning("source %s: dead-letter routing failed (%s); will retry", self.stats.camera_id, e)
            ok = False
        if ok is False:
            with self._cond:
                self._dlq_retry.append((frame, error))

    def retry_dead_letters(self) -> None:
        """Try again to route dead letters whose publication failed (called on each take)."""
        with self._cond:
            pending = list(self._dlq_retry)
            self._dlq_retry.clear()
        for frame, error in pending:
            self._route_dead(frame, error)

    def _push_dead(self, dead: DeadLetter) -> None:
        # The source's own dead-letter path first (a Kafka DLQ topic), then the driver's sinks.
        self._route_dead(dead.frame, dead.error)
        dead.frame.meta["payload_bytes"] = _payload_len(dead.frame.image)
        dead.frame.image = b""  # the driver records the error; the payload stays with the source's DLQ
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
        with self._cond:
            # The oldest unfinished frame is the first held one (handed out first) or, if none, the queue's head.
            firsts = [
                next(iter(self._held.values()), None),
                self._queue[0] if self._queue else None,
                self._decoding[0] if self._decoding else None,
            ]
            ts = [f.meta["t_ingest"] for f in firsts if f is not None and "t_ingest" in f.meta]
            self.stats.oldest_unacked_s = max(0.0, time.time() - min(ts)) if ts else 0.0
            self.stats.unacked = len(self._held) + self._depth()

    def _depth(self) -> int:
        """Frames waiting in this worker (call holding ``_cond``): queued, and in the decode pool."""
        return len(self._queue) + len(self._decoding)

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
            self.stats.queue_depth = self._depth()
            exhausted = self._finished and not self._queue and not self._dead and not self._dlq_retry
            for f in frames:
                original = f.meta.pop("_original", None)
                self._held[f.meta["_token"]] = Frame(
                    f.camera_id, f.seq, f.timestamp, original if original is not None else b"", f.origin, f.meta
                )
            self._cond.notify_all()
        if self._dlq_retry:
            self.retry_dead_letters()
        self._sync_source_skips()
        return TakeResult(frames, dead, self.stats, exhausted, self._error)

    def ack(self, tokens: list[int]) -> None:
        """Acknowledge finished frames (by the token ``take`` gave them) so the source can commit."""
        with self._cond:
            frames = [f for f in (self._held.pop(t, None) for t in tokens) if f is not None]
        if self.source is None:
            return
        for f in frames:
            self.source.ack(f)

    def dead_letter(self, items: list[tuple[int, str, str]]) -> list[DeadLetter]:
        """Frames the model could not score, as (token, error, reason): routed to the source's
        dead-letter path with their original payload (then acknowledged there). Returns them, without
        payload, for the driver's sinks."""
        out = []
        for token, error, reason in items:
            with self._cond:
                frame = self._held.pop(token, None)
            if frame is None:
                continue
            self.stats.dead_letters += 1
            self._route_dead(frame, error)
            out.append(
                DeadLetter(
                    Frame(
                        frame.camera_id,
                        frame.seq,
                        frame.timestamp,
                        b"",
                        frame.origin,
                        {"payload_bytes": _payload_len(frame.image)},
                    ),
                    error,
                    reason,
                )
            )
        return out

    def pending(self) -> int:
        """Frames handed out and not yet finished."""
        with self._cond:
            return len(self._held)
