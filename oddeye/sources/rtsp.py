"""Frames from live RTSP cameras, with bounded timeouts, reconnects and frame-rate limits.

Each camera has a reader thread that opens the stream (OpenCV's FFmpeg backend or PyAV),
decodes frames and hands them to the iterating thread through a small buffer that keeps
the newest frames. A camera that fails to open, stops sending, or closes the stream is
retried with a new capture after an exponential backoff with jitter; the source never ends
by itself. Credentials in URLs are kept out of logs, errors, ``describe()`` and ``origin``.

A camera that cannot be reached is retried forever (it is live: it may come back), and
says so: a warning on the first failure and then at growing intervals (10 s, 20 s, 40 s ...
up to 10 min) with the number of attempts and the time of the next retry. When a connection
fails, the camera is asked once more with a bare RTSP ``DESCRIBE`` (Basic or Digest
credentials from the URL), so that a rejected password is reported as ``authentication
failed`` (RTSP 401) and a wrong path as ``stream not found`` (404), whatever the decoder says.

``seq`` counts the frames decoded from a camera (across reconnects), so frames passed over
by ``every_nth`` / ``max_fps`` show as gaps; they are counted in ``skipped["rate_limit"]``.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import random
import socket
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

import cv2
import numpy as np

from oddeye.frames import Frame
from oddeye.redact import redact_path, redact_text, redact_url
from oddeye.sources.base import Source, SourceError

__all__ = ["RtspSource", "default_camera_id", "pyav_available", "redact_url"]

log = logging.getLogger(__name__)

SCHEMES = ("rtsp", "rtsps")
BACKENDS = ("pyav", "opencv")  # "auto" takes the first one installed
_BUFFER_PER_CAMERA = 2  # frames between a camera's reader and the iterating thread
WARN_INITIAL_S = 10.0
"""First interval between 'cannot connect' warnings of a camera that stays unreachable; doubles each time."""
WARN_MAX_S = 600.0
_STATUS_HINTS = {
    401: "authentication failed (RTSP 401): check the user and password in the URL",
    403: "access forbidden (RTSP 403): the user may not read this stream",
    404: "stream not found (RTSP 404): check the path of the URL",
}


# ----------------------------------------------------------------------------- URLs


def default_camera_id(url: str) -> str:
    """A camera id from the URL's host, port and path (``cam-1:554/live``), never its credentials.

    Secret ``key=value`` pairs in the path are masked (``cam:554/user=admin_password=***_channel=1``),
    since the id reaches logs, metric labels and Kafka keys.
    """
    try:
        parts = urlsplit(url)
        host = parts.hostname or "camera"
        port = parts.port
    except ValueError:
        return "camera"
    name = host + (f":{port}" if port is not None else "")
    path = redact_path(parts.path.strip("/"))  # /user=admin_password=x_channel=1 holds a password
    return f"{name}/{path}" if path else name


def _scrub(text: str, urls: Sequence[str]) -> str:
    """Remove URLs (and their passwords and path/query secrets) from an error message before it is logged."""
    return redact_text(text, urls)


def rtsp_status(url: str, timeout_s: float) -> int | None:
    """The status code of an RTSP ``DESCRIBE`` of ``url`` (answering a Basic or Digest challenge with the
    URL's credentials once), or None when there is no RTSP answer (unreachable, TLS, garbage)."""
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port or 554
        user, password = unquote(parts.username or ""), unquote(parts.password or "")
    except ValueError:
        return None
    if parts.scheme.lower() != "rtsp" or not host:
        return None  # rtsps needs TLS; the decoder's own error has to do
    target = f"rtsp://{host}:{port}{parts.path or '/'}" + (f"?{parts.query}" if parts.query else "")
    deadline = time.monotonic() + timeout_s
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            status, headers = _describe(sock, target, 1, None, deadline)
            challenge = headers.get("www-authenticate", "")
            if status == 401 and user and challenge:
                status, _ = _describe(sock, target, 2, _authorization(challenge, user, password, target), deadline)
            return status
    except (OSError, ValueError):
        return None


def _describe(
    sock: socket.socket, target: str, cseq: int, authorization: str | None, deadline: float
) -> tuple[int, dict[str, str]]:
    request = f"DESCRIBE {target} RTSP/1.0\r\nCSeq: {cseq}\r\nAccept: application/sdp\r\nUser-Agent: oddeye\r\n"
    if authorization:
        request += f"Authorization: {authorization}\r\n"
    sock.sendall((request + "\r\n").encode())
    data = b""
    while b"\r\n\r\n" not in data and len(data) < 65536:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no RTSP answer in time")
        sock.settimeout(remaining)
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    proto, _, rest = head[0].partition(" ")
    if not proto.startswith("RTSP/"):
        raise ValueError("not an RTSP answer")
    headers = {}
    for line in head[1:]:
        key, _, value = line.partition(":")
        headers.setdefault(key.strip().lower(), value.strip())
    # Drain the body so that a second request on the connection reads its own answer.
    length = int(headers.get("content-length", "0") or 0)
    body = data.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in data else b""
    while len(body) < length and time.monotonic() < deadline:
        chunk = sock.recv(4096)
        if not chunk:
            break
        body += chunk
    return int(rest.split(" ", 1)[0]), headers


def _authorization(challenge: str, user: str, password: str, target: str) -> str:
    """The Authorization header answering a Basic or Digest (MD5) challenge."""
    scheme, _, params = challenge.partition(" ")
    if scheme.lower() == "digest":
        fields = dict(
            (k.strip().lower(), v.strip().strip('"')) for k, _, v in (p.partition("=") for p in params.split(","))
        )
        realm, nonce = fields.get("realm", ""), fields.get("nonce", "")
        ha1 = hashlib.md5(f"{user}:{realm}:{password}".encode()).hexdigest()
        ha2 = hashlib.md5(f"DESCRIBE:{target}".encode()).hexdigest()
        response = hashlib.md5(f"{ha1}:{nonce}:{ha2}".encode()).hexdigest()
        return f'Digest username="{user}", realm="{realm}", nonce="{nonce}", uri="{target}", response="{response}"'
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


# ----------------------------------------------------------------------------- decoders


class _Capture(Protocol):
    def grab(self) -> bool:
        """Decode the next frame; False when the stream ended or timed out."""

    def retrieve(self) -> np.ndarray:
        """The last grabbed frame as H×W×3 uint8 RGB."""

    def release(self) -> None: ...


class _CaptureOptions:
    """OpenCV reads RTSP options from ``OPENCV_FFMPEG_CAPTURE_OPTIONS`` when a capture opens.

    Opens that need the same value run concurrently; one that needs another value waits
    until those have read it, so threads with different transports never see each other's.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._value: str | None = None
        self._active = 0

    def acquire(self, value: str) -> None:
        with self._cond:
            while self._active and self._value != value:
                self._cond.wait()
            os.environ["OPENCV_FFMPEG_CAPTURE_OPTIONS"] = value
            self._value = value
            self._active += 1

    def release(self) -> None:
        with self._cond:
            self._active -= 1
            self._cond.notify_all()


_OPENCV_OPTIONS = _CaptureOptions()


class _OpenCvCapture:
    """OpenCV's FFmpeg backend (always installed); frames come as BGR and are converted."""

    def __init__(self, url: str, transport: str, open_timeout_s: float, read_timeout_s: float) -> None:
        params = [
            cv2.CAP_PROP_OPEN_TIMEOUT_MSEC,
            int(open_timeout_s * 1000),
            cv2.CAP_PROP_READ_TIMEOUT_MSEC,
            int(read_timeout_s * 1000),
        ]
        _OPENCV_OPTIONS.acquire(f"rtsp_transport;{transport}")
        try:
            self._cap = cv2.VideoCapture(url, cv2.CAP_FFMPEG, params)
        finally:
            _OPENCV_OPTIONS.release()
        if not self._cap.isOpened():
            self._cap.release()
            raise ConnectionError("OpenCV/FFmpeg could not open the stream (refused, timed out, or not a stream)")

    def grab(self) -> bool:
        return bool(self._cap.grab())

    def retrieve(self) -> np.ndarray:
        ok, bgr = self._cap.retrieve()
        if not ok or bgr is None:
            raise ConnectionError("OpenCV could not convert the decoded frame")
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)

    def release(self) -> None:
        self._cap.release()


class _PyAvCapture:
    """PyAV (FFmpeg's libraries directly); decodes straight to RGB, measured cheaper per frame."""

    def __init__(self, url: str, transport: str, open_timeout_s: float, read_timeout_s: float) -> None:
        import av

        self._container = av.open(url, options={"rtsp_transport": transport}, timeout=(open_timeout_s, read_timeout_s))
        try:
            stream = self._container.streams.video[0]
        except IndexError:
            self._container.close()
            raise ConnectionError("the stream has no video track") from None
        stream.thread_type = "AUTO"
        self._frames = self._container.decode(stream)
        self._frame: Any = None

    def grab(self) -> bool:
        try:
            self._frame = next(self._frames)
        except StopIteration:
            return False
        return True

    def retrieve(self) -> np.ndarray:
        return self._frame.to_ndarray(format="rgb24")

    def release(self) -> None:
        self._container.close()


_CAPTURES: dict[str, type] = {"opencv": _OpenCvCapture, "pyav": _PyAvCapture}


def pyav_available() -> bool:
    """Whether the PyAV backend can be used (``pip install 'oddeye[rtsp-pyav]'``)."""
    try:
        import av  # noqa: F401
    except ImportError:
        return False
    return True


# ----------------------------------------------------------------------------- the source


@dataclass
class _Camera:
    url: str
    camera_id: str
    redacted: str
    connected: bool = False
    last_frame_t: float = 0.0
    decoded: int = 0
    next_due: float = 0.0
    shape: tuple[int, ...] | None = None
    resized_logged: bool = False
    stalled_logged: bool = False
    last_error: str | None = None
    thread: threading.Thread | None = field(default=None, repr=False)


class RtspSource(Source):
    """Decoded RGB frames from one or more RTSP cameras, endlessly, until ``close()``.

    ``up`` is True while every camera has delivered a frame within ``read_timeout_s``;
    ``reconnects`` counts connection attempts after each camera's first. ``timestamp`` is
    the wall clock when the frame was read; ``origin`` is ``{"source": "rtsp", "url": <redacted>}``.
    A change of resolution mid-stream is logged once and passed on (the ingest stage resizes).
    """

    live = True

    def __init__(
        self,
        url: str | None = None,
        camera_id: str | None = None,
        cameras: Sequence[Mapping[str, Any]] = (),
        transport: str = "tcp",
        backend: str = "auto",
        open_timeout_s: float = 10.0,
        read_timeout_s: float = 5.0,
        reconnect_initial_s: float = 0.5,
        reconnect_max_s: float = 10.0,
        every_nth: int = 1,
        max_fps: float | None = None,
        warn_initial_s: float = WARN_INITIAL_S,
    ) -> None:
        super().__init__()
        if transport not in ("tcp", "udp"):
            raise SourceError(f"transport {transport!r}; allowed: tcp, udp")
        if backend not in ("auto", *BACKENDS):
            raise SourceError(f"backend {backend!r}; allowed: auto, {', '.join(BACKENDS)}")
        if backend == "auto":
            backend = "pyav" if pyav_available() else "opencv"
        elif backend == "pyav" and not pyav_available():
            raise SourceError("backend 'pyav' needs PyAV: pip install 'oddeye[rtsp-pyav]' (or pip install av)")
        if every_nth < 1 or (max_fps is not None and max_fps <= 0):
            raise SourceError("every_nth must be >= 1 and max_fps > 0")
        if min(open_timeout_s, read_timeout_s, reconnect_initial_s, reconnect_max_s) <= 0:
            raise SourceError("timeouts and reconnect delays must be positive")
        specs = ([{"url": url, "camera_id": camera_id}] if url else []) + [dict(c) for c in cameras]
        if not specs:
            raise SourceError("no camera: give url, or cameras as a list of {url, camera_id}")
        self._cams: list[_Camera] = []
        for i, spec in enumerate(specs):
            cam_url = str(spec.get("url") or "")
            has_scheme = "://" in cam_url
            if not has_scheme or urlsplit(cam_url).scheme.lower() not in SCHEMES:
                shown = redact_url(cam_url) if has_scheme else "the URL"  # without a scheme it cannot be parsed
                raise SourceError(f"camera {i}: {shown} is not an RTSP URL (expected rtsp:// or rtsps://host/path)")
            cam_id = spec.get("camera_id") or default_camera_id(cam_url)
            self._cams.append(_Camera(cam_url, cam_id, redact_url(cam_url)))
        ids = [c.camera_id for c in self._cams]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise SourceError(f"camera_id {', '.join(dup)} used by more than one camera; set camera_id for each")
        self.camera_id = camera_id or self._cams[0].camera_id
        self.transport = transport
        self.backend = backend
        self.open_timeout_s = float(open_timeout_s)
        self.read_timeout_s = float(read_timeout_s)
        self.reconnect_initial_s = float(reconnect_initial_s)
        self.reconnect_max_s = float(reconnect_max_s)
        self.every_nth = int(every_nth)
        self.max_fps = float(max_fps) if max_fps else None
        self.warn_initial_s = float(warn_initial_s)
        self._stop = threading.Event()
        self._cond = threading.Condition()
        self._buffer: deque[Frame] = deque()
        self._lock = threading.Lock()
        self._started = False

    # -- health (derived from the cameras; the base class's plain attribute is replaced)
    @property
    def up(self) -> bool:  # type: ignore[override]
        if self._stop.is_set():
            return False
        now = time.monotonic()
        return all(c.connected and now - c.last_frame_t <= self.read_timeout_s for c in self._cams)

    @up.setter
    def up(self, _value: bool | None) -> None:
        """Ignored: ``Source.__init__`` sets a default, but here health is measured."""

    def count_skip(self, reason: str, n: int = 1) -> None:
        # Copy-on-write: other threads iterate ``skipped`` while the readers count.
        with self._lock:
            self.skipped = {**self.skipped, reason: self.skipped.get(reason, 0) + n}

    def _count_reconnect(self) -> None:
        with self._lock:
            self.reconnects += 1

    # -- iteration
    def __iter__(self) -> Iterator[Frame]:
        if self._started:
            raise SourceError("an RtspSource can be iterated once")
        self._started = True
        for cam in self._cams:
            # Daemon threads: one blocked in a read must not keep the process alive after close().
            cam.thread = threading.Thread(
                target=self._read_camera, args=(cam,), name=f"rtsp-{cam.camera_id}", daemon=True
            )
            cam.thread.start()
        while not self._stop.is_set():
            with self._cond:
                if not self._buffer:
                    self._cond.wait(0.2)
                frame = self._buffer.popleft() if self._buffer else None
                self._cond.notify_all()
            if frame is not None:
                yield frame
            else:
                self._watch_stalls()

    def _watch_stalls(self) -> None:
        """Log a camera that is connected but silent for longer than the read timeout (hung)."""
        now = time.monotonic()
        for cam in self._cams:
            if cam.connected and now - cam.last_frame_t > self.read_timeout_s and not cam.stalled_logged:
                cam.stalled_logged = True
                log.info("%s: no frame for %.1f s; camera is down", cam.camera_id, now - cam.last_frame_t)

    def _push(self, frame: Frame) -> None:
        with self._cond:
            if len(self._buffer) >= _BUFFER_PER_CAMERA * len(self._cams):
                self._buffer.popleft()
                self.count_skip("source_queue_full")
            self._buffer.append(frame)
            self._cond.notify_all()

    # -- one camera's reader thread
    def _read_camera(self, cam: _Camera) -> None:
        backoff = self.reconnect_initial_s
        attempts = 0
        failures = 0
        failing_since = 0.0
        next_warn = 0.0
        warn_every = self.warn_initial_s
        while not self._stop.is_set():
            if attempts:
                self._count_reconnect()
            attempts += 1
            failed: str | None = None
            try:
                cap = _CAPTURES[self.backend](cam.url, self.transport, self.open_timeout_s, self.read_timeout_s)
            except Exception as e:
                failed = self._open_failure(cam, f"{type(e).__name__}: {e}")
            else:
                if self._stream(cam, cap):
                    backoff = self.reconnect_initial_s  # it delivered: start the backoff afresh
                    failures, warn_every, next_warn = 0, self.warn_initial_s, 0.0
                    cam.last_error = None
            if self._stop.is_set():
                break
            delay = backoff * random.uniform(0.5, 1.0)
            backoff = min(backoff * 2, self.reconnect_max_s)
            if failed is None:
                log.info("%s: reconnecting in %.1f s", cam.camera_id, delay)
            else:
                now = time.monotonic()
                failures += 1
                if failures == 1:
                    failing_since = now
                if now >= next_warn:  # the first failure, then at growing intervals: never silent, never a flood
                    log.warning(
                        "%s: cannot connect to %s (%d attempt(s) in %.0f s): %s; retrying in %.1f s (at %s), "
                        "and for as long as the source runs",
                        cam.camera_id,
                        cam.redacted,
                        failures,
                        now - failing_since,
                        failed,
                        delay,
                        time.strftime("%H:%M:%S", time.localtime(time.time() + delay)),
                    )
                    next_warn = now + warn_every
                    warn_every = min(warn_every * 2, WARN_MAX_S)
                else:
                    log.info(
                        "%s: cannot connect (attempt %d): %s; retrying in %.1f s",
                        cam.camera_id,
                        failures,
                        failed,
                        delay,
                    )
            self._stop.wait(delay)

    def _open_failure(self, cam: _Camera, error: str) -> str:
        """Why a camera could not be opened, in words: the RTSP status when the camera answers one."""
        reason = _scrub(error, [cam.url])
        status = rtsp_status(cam.url, min(self.open_timeout_s, 5.0))
        if status in _STATUS_HINTS:
            reason = _STATUS_HINTS[status]
        elif status is not None and status >= 400:
            reason = f"the camera answered RTSP {status} ({reason})"
        cam.last_error = reason
        return reason

    def _stream(self, cam: _Camera, cap: _Capture) -> bool:
        """Read one connection until it fails or the source closes; True if it delivered a frame."""
        got_frame = False
        try:
            while not self._stop.is_set():
                t_read = time.monotonic()
                if not cap.grab():
                    if not self._stop.is_set():
                        log.warning("%s: stream from %s lost (ended or timed out)", cam.camera_id, cam.redacted)
                    break
                now, wall = time.monotonic(), time.time()
                if now - t_read >= self.read_timeout_s:
                    # FFmpeg gave up on this read and flushes its decoder: the frame is stale and the
                    # connection is dead (OpenCV would go on like this for 3 timeouts, PyAV for 2).
                    cam.decoded += 1
                    self.count_skip("stale")
                    if not self._stop.is_set():
                        log.warning("%s: no data from %s for %.1f s", cam.camera_id, cam.redacted, now - t_read)
                    break
                if not got_frame:
                    got_frame = True
                    log.info("%s: connected to %s", cam.camera_id, cam.redacted)
                cam.connected, cam.last_frame_t, cam.stalled_logged = True, now, False
                seq = cam.decoded
                cam.decoded += 1
                if not self._due(cam, seq, now):
                    self.count_skip("rate_limit")
                    continue
                image = cap.retrieve()
                self._check_shape(cam, image)
                self._push(
                    Frame(
                        camera_id=cam.camera_id,
                        seq=seq,
                        timestamp=wall,
                        image=image,
                        origin={"source": "rtsp", "url": cam.redacted},
                    )
                )
        except Exception as e:
            log.warning("%s: stream from %s failed: %s", cam.camera_id, cam.redacted, _scrub(str(e), [cam.url]))
        finally:
            cam.connected = False
            try:
                cap.release()
            except Exception:
                log.debug("%s: releasing the capture failed", cam.camera_id, exc_info=True)
        return got_frame

    def _due(self, cam: _Camera, seq: int, now: float) -> bool:
        """Frame-rate limits: every Nth decoded frame, then at most ``max_fps`` (on a fixed schedule)."""
        if seq % self.every_nth:
            return False
        if self.max_fps is None:
            return True
        if now < cam.next_due:
            return False
        interval = 1.0 / self.max_fps
        # Schedule the next slot from the last one (no drift from jitter), but never build up credit.
        cam.next_due = max(cam.next_due + interval, now + interval * 0.5)
        return True

    def _check_shape(self, cam: _Camera, image: np.ndarray) -> None:
        if cam.shape is not None and image.shape != cam.shape:
            level = logging.DEBUG if cam.resized_logged else logging.WARNING
            log.log(level, "%s: resolution changed from %s to %s; continuing", cam.camera_id, cam.shape, image.shape)
            cam.resized_logged = True
        cam.shape = image.shape

    def interrupt(self) -> None:
        """End the iteration now, from another thread (the ingest stage calls it before ``close``)."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()

    def close(self) -> None:
        """Stop the readers; a reader blocked in a read leaves once it times out and frees its capture."""
        self._stop.set()
        with self._cond:
            dropped = len(self._buffer)
            self._buffer.clear()
            self._cond.notify_all()
        if dropped:
            self.count_skip("closed", dropped)
        deadline = time.monotonic() + 1.0
        for cam in self._cams:
            if cam.thread is not None:
                cam.thread.join(max(0.0, deadline - time.monotonic()))

    def describe(self) -> dict[str, Any]:
        return {
            "type": type(self).__name__,
            "camera_id": self.camera_id,
            "cameras": [
                {"camera_id": c.camera_id, "url": c.redacted, "connected": c.connected, "error": c.last_error}
                for c in self._cams
            ],
            "backend": self.backend,
            "transport": self.transport,
            "open_timeout_s": self.open_timeout_s,
            "read_timeout_s": self.read_timeout_s,
            "every_nth": self.every_nth,
            "max_fps": self.max_fps,
        }
