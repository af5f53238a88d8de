"""Webhook sink against a real local HTTP server: signatures, retries, a hanging endpoint, overflow."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from oddeye.frames import Alert
from oddeye.sinks.webhook import SIGNATURE_HEADER, WebhookSink

T0 = 1_700_000_000.0


@dataclass
class Endpoint:
    """What the test server does: fail the first ``fail_first`` requests, hang the first ``hang_first``."""

    url: str = ""
    fail_first: int = 0
    fail_status: int = 503
    hang_first: int = 0
    requests: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def received(self, n: int, timeout_s: float = 10.0) -> list[tuple[dict[str, str], bytes]]:
        deadline = time.monotonic() + timeout_s
        while len(self.requests) < n and time.monotonic() < deadline:
            time.sleep(0.02)
        return list(self.requests)


@pytest.fixture
def endpoint() -> Iterator[Endpoint]:
    ep = Endpoint()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            with ep.lock:
                n = len(ep.requests)
                ep.requests.append((dict(self.headers.items()), body))
            if n < ep.hang_first:
                ep.release.wait(10)
                return
            status = ep.fail_status if n < ep.fail_first else 200
            self.send_response(status)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    ep.url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    yield ep
    ep.release.set()
    server.shutdown()
    server.server_close()


def alert(state: str = "open", seq: int = 7) -> Alert:
    ended = None if state != "close" else T0 + seq + 4
    return Alert(f"cam-1-{seq}", "cam-1", state, T0 + seq, ended, 0.87, 5, "padim", "/s/cam-1-7.jpg", seq)  # type: ignore[arg-type]


def test_signed_authorised_and_only_configured_states(endpoint: Endpoint, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOOK_KEY", "k3y")
    monkeypatch.setenv("HOOK_TOKEN", "t0ken")
    sink = WebhookSink(
        endpoint.url, hmac_secret_env="HOOK_KEY", bearer_token_env="HOOK_TOKEN", states=["open", "close"]
    )
    sink.write_alert(alert("open"))
    sink.write_alert(alert("update"))
    sink.write_alert(alert("close"))
    sink.close()
    assert sink.sent == 2 and sink.failed == 0 and sink.dropped == 0
    reqs = endpoint.received(2)
    assert len(reqs) == 2
    events = [json.loads(body) for _, body in reqs]
    assert [e["state"] for e in events] == ["open", "close"]
    assert events[0]["alert_id"] == "cam-1-7" and events[0]["schema_version"] == 1
    assert events[1]["ended_at"] == T0 + 11 and events[0]["snapshot"] == "/s/cam-1-7.jpg"
    for headers, body in reqs:
        expected = "sha256=" + hmac.new(b"k3y", body, hashlib.sha256).hexdigest()
        assert hmac.compare_digest(headers[SIGNATURE_HEADER], expected)
        assert headers["Authorization"] == "Bearer t0ken"
        assert headers["Content-Type"] == "application/json"
    assert "k3y" not in repr(sink) and "t0ken" not in repr(sink)


def test_missing_secret_env_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOPE_KEY", raising=False)
    with pytest.raises(ValueError, match="NOPE_KEY"):
        WebhookSink("http://127.0.0.1:9/x", hmac_secret_env="NOPE_KEY")


def test_retries_with_backoff_until_the_endpoint_recovers(endpoint: Endpoint) -> None:
    endpoint.fail_first = 3
    sink = WebhookSink(endpoint.url, max_retries=5, backoff_initial_s=0.05, backoff_max_s=0.2)
    t = time.monotonic()
    sink.write_alert(alert())
    assert time.monotonic() - t < 0.05  # the pipeline never waits for the endpoint
    assert sink.flush(10)
    sink.close()
    reqs = endpoint.received(4)
    assert len(reqs) == 4 and sink.sent == 1 and sink.failed == 0 and sink.retries == 3
    # every retry is the same delivery with the same body
    assert len({h["X-Oddeye-Delivery"] for h, _ in reqs}) == 1 and len({b for _, b in reqs}) == 1


def test_gives_up_after_max_retries_and_does_not_retry_a_4xx(endpoint: Endpoint) -> None:
    endpoint.fail_first = 100
    sink = WebhookSink(endpoint.url, max_retries=2, backoff_initial_s=0.01, backoff_max_s=0.02)
    sink.write_alert(alert())
    assert sink.flush(5)
    assert sink.failed == 1 and sink.sent == 0 and len(endpoint.requests) == 3
    endpoint.fail_status = 400
    sink.write_alert(alert(seq=8))
    assert sink.flush(5)
    sink.close()
    assert sink.failed == 2 and len(endpoint.requests) == 4  # a 400 is not retried


def test_hanging_endpoint_times_out_and_the_retry_gets_through(endpoint: Endpoint) -> None:
    endpoint.hang_first = 1
    sink = WebhookSink(endpoint.url, timeout_s=0.3, max_retries=2, backoff_initial_s=0.01)
    t = time.monotonic()
    sink.write_alert(alert())
    assert sink.flush(5)
    sink.close()
    assert sink.sent == 1 and sink.retries == 1 and len(endpoint.requests) == 2
    assert time.monotonic() - t < 3  # the hung request was abandoned after timeout_s


def test_full_queue_drops_and_counts_without_blocking(endpoint: Endpoint) -> None:
    endpoint.hang_first = 1000
    sink = WebhookSink(endpoint.url, timeout_s=5, max_retries=0, queue_size=3)
    endpoint.received(0)
    t = time.monotonic()
    for i in range(20):
        sink.write_alert(alert(seq=i))
    assert time.monotonic() - t < 0.2
    assert 16 <= sink.dropped <= 17  # 3 queued, maybe 1 taken by the (hanging) sender
    endpoint.release.set()
    sink.close()


# --------------------------------------------------------------------------- redirects, secrets, limits, deadline


@contextlib.contextmanager
def serve(handle: Callable[[BaseHTTPRequestHandler], None]) -> Iterator[tuple[str, list[bytes]]]:
    """A local HTTP server whose POST handler is ``handle``; yields its base URL and the bodies it got."""
    bodies: list[bytes] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            bodies.append(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            handle(self)

        def do_GET(self) -> None:
            bodies.append(b"GET " + self.headers.get("Authorization", "").encode())
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", bodies
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("status", [302, 307])
def test_redirects_are_failures_and_the_token_never_leaves(status: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOOK_TOKEN", "t0ken")
    with serve(lambda h: None) as (other_url, other_got):

        def redirect(h: BaseHTTPRequestHandler) -> None:
            h.send_response(status)
            h.send_header("Location", f"{other_url}/steal?token=abc")
            h.send_header("Content-Length", "0")
            h.end_headers()

        with serve(redirect) as (url, got):
            sink = WebhookSink(f"{url}/hook", bearer_token_env="HOOK_TOKEN", max_retries=3, backoff_initial_s=0.01)
            sink.write_alert(alert())
            assert sink.flush(5)
            sink.close()
    assert sink.sent == 0 and sink.failed == 1 and sink.retries == 0  # a redirect is not retried
    assert len(got) == 1 and other_got == []  # nothing (and no token) went to the redirect's target


def test_url_is_never_logged_verbatim(caplog: pytest.LogCaptureFixture) -> None:
    def refuse(h: BaseHTTPRequestHandler) -> None:
        h.send_response(404)
        h.send_header("Content-Length", "0")
        h.end_headers()

    with serve(refuse) as (url, _got), caplog.at_level(logging.DEBUG, logger="oddeye.sinks.webhook"):
        secret_url = f"{url}/services/T0/B0/s3cr3tPath?token=s3cr3tQuery"
        sink = WebhookSink(secret_url, max_retries=0)
        sink.write_alert(alert())
        assert sink.flush(5)
        sink.close()
    assert sink.failed == 1 and "giving up" in caplog.text
    logged = caplog.text + repr(sink) + "".join(str(r.args) for r in caplog.records)
    assert "s3cr3t" not in logged and url in logged  # scheme, host and port only


def test_response_body_is_read_with_a_limit() -> None:
    def flood(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", str(10**10))
        h.end_headers()
        chunk = b"x" * (1 << 20)
        with contextlib.suppress(OSError):
            for _ in range(10_000):  # would take minutes to read in full
                h.wfile.write(chunk)

    with serve(flood) as (url, _got):
        sink = WebhookSink(url, timeout_s=30, max_retries=0)
        t = time.monotonic()
        sink.write_alert(alert())
        assert sink.flush(10)
        elapsed = time.monotonic() - t
        sink.close()
    assert sink.sent == 1 and elapsed < 3


def test_timeout_is_a_deadline_for_the_whole_request() -> None:
    def drip(h: BaseHTTPRequestHandler) -> None:
        with contextlib.suppress(OSError):
            for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n" + b"X-Slow: " + b"y" * 100:
                h.wfile.write(bytes([byte]))
                h.wfile.flush()
                time.sleep(0.1)  # every byte comes well within a per-read timeout

    with serve(drip) as (url, _got):
        sink = WebhookSink(url, timeout_s=0.5, max_retries=0)
        t = time.monotonic()
        sink.write_alert(alert())
        assert sink.flush(10)
        elapsed = time.monotonic() - t
        sink.close()
    assert sink.failed == 1 and sink.sent == 0
    assert elapsed < 1.5
