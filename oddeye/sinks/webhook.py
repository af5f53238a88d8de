"""Webhook sink: alert events POSTed as JSON from a background thread.

``write_alert`` only puts the event into a bounded queue (a full queue drops the event
and counts it in ``dropped``), so a slow or hanging endpoint never stalls the pipeline.
The sender thread POSTs each event with a timeout and retries connection errors,
timeouts, 408/429 and 5xx answers with exponential backoff and jitter (honouring a
numeric ``Retry-After``); other 4xx answers are not retried.

Redirects are never followed: a 3xx answer is a failed delivery (not retried; fix the URL),
so the body and the bearer token only ever go to the configured host. ``timeout_s`` is a
deadline for the whole request (connect, send, answer), enforced by closing the socket when
it passes, so an endpoint that drips its answer byte by byte cannot hold the sender. At most
``MAX_RESPONSE_BYTES`` of an answer are read. The URL, which often is itself the secret
(Slack-style hooks), is logged as scheme and host only.

Headers: ``Content-Type: application/json``, ``X-Oddeye-Event`` (open/update/close),
``X-Oddeye-Delivery`` (the same on every retry of one event, for de-duplication),
``X-Oddeye-Signature: sha256=<hex HMAC-SHA256 of the body>`` when ``hmac_secret_env``
names an environment variable holding the key, and ``Authorization: Bearer <token>``
when ``bearer_token_env`` does. Secrets are read once at construction and never logged.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import http.client
import json
import logging
import os
import queue
import random
import socket
import ssl
import threading
import time
from collections.abc import Sequence
from urllib.parse import urlsplit

from oddeye.frames import Alert
from oddeye.redact import url_origin
from oddeye.sinks.base import Sink

__all__ = ["MAX_RESPONSE_BYTES", "SCHEMA_VERSION", "SIGNATURE_HEADER", "WebhookSink", "sign"]

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
SIGNATURE_HEADER = "X-Oddeye-Signature"
_RETRY_STATUS = {408, 425, 429}
MAX_RESPONSE_BYTES = 64 * 1024
"""Most bytes of an answer read (the body is not used; reading a little lets the server finish cleanly)."""


def sign(key: bytes, body: bytes) -> str:
    """The signature header value for ``body``: ``sha256=`` and the hex HMAC-SHA256."""
    return "sha256=" + hmac.new(key, body, hashlib.sha256).hexdigest()


def _secret(env_name: str | None, what: str) -> str | None:
    if env_name is None:
        return None
    value = os.environ.get(env_name)
    if not value:
        raise ValueError(f"webhook sink: {what} environment variable {env_name} is not set or empty")
    return value


class WebhookSink(Sink):
    """POST alert events (only the configured ``states``) to ``url``.

    Counters: ``sent`` (2xx answers), ``failed`` (events given up after retries or
    refused with a 4xx), ``dropped`` (queue full), ``retries`` (attempts after a first).
    """

    def __init__(
        self,
        url: str,
        timeout_s: float = 5.0,
        max_retries: int = 5,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
        queue_size: int = 1000,
        hmac_secret_env: str | None = None,
        bearer_token_env: str | None = None,
        states: Sequence[str] = ("open", "update", "close"),
        close_timeout_s: float = 10.0,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"webhook url must start with http:// or https://, got {url_origin(url)!r}")
        try:
            parts = urlsplit(url)
            host, port = parts.hostname, parts.port
        except ValueError as e:
            raise ValueError(f"webhook url cannot be parsed ({e}); host {url_origin(url)!r}") from None
        if not host:
            raise ValueError("webhook url has no host")
        if timeout_s <= 0 or backoff_initial_s <= 0 or backoff_max_s <= 0:
            raise ValueError("webhook timeout_s, backoff_initial_s and backoff_max_s must be > 0")
        if max_retries < 0 or queue_size < 1:
            raise ValueError("webhook max_retries must be ≥ 0 and queue_size ≥ 1")
        self.url = url
        self.shown_url = url_origin(url)
        """What logs and ``repr`` show: scheme, host and port only."""
        self._https = parts.scheme == "https"
        self._host, self._port = host, port
        self._target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._ssl = ssl.create_default_context() if self._https else None
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.states = frozenset(states)
        self.close_timeout_s = close_timeout_s
        key = _secret(hmac_secret_env, "hmac_secret_env")
        self._hmac_key = key.encode() if key is not None else None
        self._bearer = _secret(bearer_token_env, "bearer_token_env")
        self.sent = 0
        self.failed = 0
        self.dropped = 0
        self.retries = 0
        self._queue: queue.Queue[tuple[str, str, bytes]] = queue.Queue(maxsize=queue_size)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="webhook-sink", daemon=True)
        self._thread.start()

    def __repr__(self) -> str:  # never show the secrets
        return f"WebhookSink(url={self.shown_url!r}, states={sorted(self.states)})"

    # ------------------------------------------------------------------ Sink
    def write_alert(self, alert: Alert) -> None:
        if alert.state not in self.states:
            return
        body = json.dumps({"schema_version": SCHEMA_VERSION, **alert.record()}, separators=(",", ":")).encode()
        delivery = f"{alert.alert_id}:{alert.state}:{alert.seq}"
        try:
            self._queue.put_nowait((alert.state, delivery, body))
        except queue.Full:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 100 == 0:
                log.warning(
                    "webhook queue full (%d events): dropped %d alert event(s) so far",
                    self._queue.maxsize,
                    self.dropped,
                )

    def flush(self, timeout_s: float = 0.0) -> bool:
        """Wait up to ``timeout_s`` for queued events to be handled; True when none are left."""
        deadline = time.monotonic() + timeout_s
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.02)
        return self._queue.unfinished_tasks == 0

    def close(self) -> None:
        if not self.flush(self.close_timeout_s):
            log.warning("webhook sink closing with %d alert event(s) not delivered", self._queue.unfinished_tasks)
        self._stop.set()
        self._thread.join(self.timeout_s + 1)

    # ------------------------------------------------------------------ sender thread
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                state, delivery, body = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                self._deliver(state, delivery, body)
            except Exception:  # never let the thread die
                self.failed += 1
                log.exception("webhook delivery of %s failed unexpectedly", delivery)
            finally:
                self._queue.task_done()

    def _headers(self, state: str, delivery: str, body: bytes) -> dict[str, str]:
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "oddeye-webhook/1",
            "X-Oddeye-Event": state,
            "X-Oddeye-Delivery": delivery,
        }
        if self._hmac_key is not None:
            headers[SIGNATURE_HEADER] = sign(self._hmac_key, body)
        if self._bearer is not None:
            headers["Authorization"] = f"Bearer {self._bearer}"
        return headers

    def _deliver(self, state: str, delivery: str, body: bytes) -> None:
        headers = self._headers(state, delivery, body)
        for attempt in range(self.max_retries + 1):
            if attempt:
                self.retries += 1
            retry_after, error = self._post(body, headers)
            if error is None:
                self.sent += 1
                return
            if retry_after is None:  # refused for good (a 4xx other than 408/425/429)
                break
            if attempt == self.max_retries or self._stop.is_set():
                break
            delay = min(self.backoff_max_s, self.backoff_initial_s * 2**attempt)
            delay = max(retry_after, delay * random.uniform(0.5, 1.0))  # jitter spreads retries of many senders
            log.debug("webhook %s attempt %d failed (%s); retrying in %.2fs", delivery, attempt + 1, error, delay)
            if self._stop.wait(min(delay, self.backoff_max_s)):
                break
        self.failed += 1
        log.warning(
            "webhook %s: giving up on alert event %s after %d attempt(s): %s",
            self.shown_url,
            delivery,
            attempt + 1,
            error,
        )

    def _post(self, body: bytes, headers: dict[str, str]) -> tuple[float | None, str | None]:
        """One POST within ``timeout_s`` in all. Returns (retry_after, error): error None on success;
        retry_after None = do not retry."""
        deadline = time.monotonic() + self.timeout_s
        conn: http.client.HTTPConnection
        if self._https:
            conn = http.client.HTTPSConnection(self._host, self._port, timeout=self.timeout_s, context=self._ssl)
        else:
            conn = http.client.HTTPConnection(self._host, self._port, timeout=self.timeout_s)
        # The socket timeout bounds each operation; this timer bounds the whole request by shutting
        # the socket down when the deadline passes (a blocked recv then returns at once).
        expired = threading.Event()
        watchdog = threading.Timer(self.timeout_s, _abort, (conn, expired))
        watchdog.daemon = True
        watchdog.start()
        try:
            conn.connect()
            if expired.is_set():  # the deadline passed while connecting, before there was a socket to shut
                raise TimeoutError("connect took the whole deadline")
            conn.request("POST", self._target, body=body, headers=headers)
            response = conn.getresponse()
            response.read(MAX_RESPONSE_BYTES)
            status = response.status
            retry_after_header = response.getheader("Retry-After")
            location = response.getheader("Location")
        except (OSError, http.client.HTTPException, ValueError) as exc:
            if expired.is_set() or time.monotonic() >= deadline:
                return 0.0, f"no complete answer within timeout_s={self.timeout_s:g}s"
            return 0.0, f"{type(exc).__name__}: {exc}"
        finally:
            watchdog.cancel()
            conn.close()
        if 200 <= status < 300:
            return 0.0, None
        if 300 <= status < 400:
            where = url_origin(location) if location and "://" in location else "a path on the same host"
            return None, f"HTTP {status} redirect to {where}: redirects are not followed, set the final URL"
        error = f"HTTP {status}"
        if status in _RETRY_STATUS or status >= 500:
            return _retry_after(retry_after_header), error
        return None, error


def _abort(conn: http.client.HTTPConnection, expired: threading.Event) -> None:
    """Shut down a request's socket from the watchdog thread once its deadline has passed."""
    expired.set()
    sock = conn.sock
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)  # wakes a recv blocked in another thread


def _retry_after(value: str | None) -> float:
    try:
        return max(0.0, float(value)) if value else 0.0
    except ValueError:  # an HTTP date: fall back to our own backoff
        return 0.0
