"""The RTSP source against a real GStreamer RTSP server: frames, rate limits, dead and hung cameras, secrets."""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from oddeye.config import load_config
from oddeye.frames import Frame
from oddeye.sources.base import SourceError
from oddeye.sources.rtsp import RtspSource, default_camera_id, pyav_available, redact_url, rtsp_status
from tests.servers.kafka import free_port
from tests.servers.rtsp import require_rtsp_server, start_rtsp_server

REPO = Path(__file__).resolve().parents[2]
BACKENDS = ["opencv", pytest.param("pyav", marks=pytest.mark.skipif(not pyav_available(), reason="PyAV not installed"))]
FAST = {"open_timeout_s": 1.0, "read_timeout_s": 1.0, "reconnect_initial_s": 0.1, "reconnect_max_s": 0.4}


class Reader:
    """Iterates a source on a thread (as the ingest actor does) and keeps what arrives."""

    def __init__(self, source: RtspSource) -> None:
        self.source = source
        self.frames: list[Frame] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        for frame in self.source:
            self.frames.append(frame)

    def wait_for(self, check: Callable[[], bool], timeout_s: float, what: str) -> float:
        t0 = time.monotonic()
        while not check():
            if time.monotonic() - t0 > timeout_s:
                raise AssertionError(f"not within {timeout_s}s: {what}")
            time.sleep(0.02)
        return time.monotonic() - t0

    def wait_frames(self, n: int, timeout_s: float = 10.0) -> list[Frame]:
        start = len(self.frames)
        self.wait_for(lambda: len(self.frames) >= start + n, timeout_s, f"{n} more frames")
        return self.frames[start:]

    def close(self) -> float:
        t0 = time.monotonic()
        self.source.close()
        self.thread.join(5)
        assert not self.thread.is_alive(), "iteration did not end after close()"
        return time.monotonic() - t0


@pytest.mark.parametrize("backend", BACKENDS)
def test_frames_arrive_as_rgb_at_the_stream_size(backend: str) -> None:
    require_rtsp_server()
    server = start_rtsp_server(width=320, height=240, pattern="red")
    reader = Reader(RtspSource(url=server.url, backend=backend, **FAST))
    try:
        frames = reader.wait_frames(8)
        assert reader.source.up is True
    finally:
        reader.close()
        server.stop()
    assert all(f.image.shape == (240, 320, 3) and f.image.dtype == np.uint8 for f in frames)
    r, g, b = frames[-1].image.reshape(-1, 3).mean(axis=0)
    assert r > 180 and g < 60 and b < 60, "frames must be RGB"
    seqs = [f.seq for f in reader.frames]
    assert seqs == list(range(len(seqs)))
    assert frames[0].camera_id == f"127.0.0.1:{server.port}/cam"
    assert frames[0].origin == {"source": "rtsp", "url": server.url}
    assert abs(frames[-1].timestamp - time.time()) < 5
    assert reader.source.reconnects == 0 and reader.source.up is False


def test_every_nth_and_max_fps_limit_the_rate(rtsp_server) -> None:
    nth = Reader(RtspSource(url=rtsp_server.url, camera_id="nth", every_nth=3, **FAST))
    capped = Reader(RtspSource(url=rtsp_server.url, camera_id="capped", max_fps=4, **FAST))
    try:
        nth.wait_frames(1)
        capped.wait_frames(1)
        n0, c0, t0 = len(nth.frames), len(capped.frames), time.monotonic()
        time.sleep(2.5)
        n1, c1, dt = len(nth.frames), len(capped.frames), time.monotonic() - t0
    finally:
        nth.close()
        capped.close()
    assert all(f.seq % 3 == 0 for f in nth.frames)
    assert (n1 - n0) / dt == pytest.approx(15 / 3, abs=1.5)  # the server sends 15 fps
    assert (c1 - c0) / dt <= 4 * 1.15
    assert (c1 - c0) / dt >= 4 * 0.6
    for r in (nth, capped):  # every decoded frame is delivered or counted
        decoded = r.frames[-1].seq + 1
        skipped = r.source.skipped.get("rate_limit", 0)
        assert decoded - 3 <= len(r.frames) + skipped <= decoded + 3  # a frame may be between the two


def test_camera_that_never_answers_is_retried_while_the_others_flow(rtsp_server) -> None:
    dead = f"rtsp://127.0.0.1:{free_port()}/cam"
    source = RtspSource(cameras=[{"url": rtsp_server.url, "camera_id": "live"}, {"url": dead}], **FAST)
    reader = Reader(source)
    try:
        reader.wait_frames(5)
        reader.wait_for(lambda: source.reconnects >= 3, 5, "retries of the dead camera")
        assert source.up is False, "up is 1 only while every camera delivers"
        assert {f.camera_id for f in reader.frames} == {"live"}
        cams = source.describe()["cameras"]
        assert [c["connected"] for c in cams] == [True, False]
    finally:
        took = reader.close()
    assert took < 2.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_hung_then_dead_camera_goes_down_and_comes_back(
    backend: str, rtsp_server, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="oddeye.sources.rtsp")
    source = RtspSource(url=rtsp_server.url, camera_id="gate", backend=backend, **FAST)
    reader = Reader(source)
    try:
        reader.wait_frames(5)
        # hung: the server stops answering but keeps the connection open
        rtsp_server.pause()
        down_after = reader.wait_for(lambda: source.up is False, 5, "source down after SIGSTOP")
        assert down_after <= source.read_timeout_s + 0.6
        reader.wait_for(lambda: source.reconnects >= 2, 10, "reconnect attempts while hung")
        rtsp_server.resume()
        reader.wait_frames(5, timeout_s=10)
        assert source.up is True
        # dead: the server goes away; a new one on the same port streams another resolution
        rtsp_server.stop()
        reader.wait_for(lambda: source.up is False, source.read_timeout_s + 0.6, "source down after SIGTERM")
        before = source.reconnects
        server2 = start_rtsp_server(port=rtsp_server.port, width=160, height=120)
        try:
            frames = reader.wait_frames(5, timeout_s=10)
            assert source.up is True and source.reconnects > before
            assert frames[-1].image.shape == (120, 160, 3)
            # close() ends the iteration promptly even while a read is blocked
            server2.pause()
            time.sleep(0.3)
            assert reader.close() < source.read_timeout_s + 0.5
        finally:
            server2.stop()
    finally:
        reader.close()
    seqs = [f.seq for f in reader.frames]
    assert seqs == sorted(set(seqs)), "seq keeps counting across reconnects"
    changes = [r for r in caplog.records if "resolution changed" in r.getMessage()]
    assert len(changes) == 1 and changes[0].levelno == logging.WARNING
    assert any("no frame for" in r.getMessage() or "lost" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("backend", BACKENDS)
def test_credentials_never_logged(backend: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="oddeye.sources.rtsp")
    url = f"rtsp://admin:hunter2@127.0.0.1:{free_port()}/cam?token=t0ps3cret&ch=1"
    source = RtspSource(url=url, backend=backend, **FAST)
    reader = Reader(source)
    try:
        reader.wait_for(lambda: source.reconnects >= 2, 5, "retries")
    finally:
        reader.close()
    described = str(source.describe())
    logged = caplog.text + "".join(str(r.args) for r in caplog.records)
    for secret in ("hunter2", "t0ps3cret"):
        assert secret not in logged and secret not in described
    assert "cannot connect" in caplog.text and "admin:***@" in caplog.text
    assert source.camera_id == default_camera_id(url) == f"127.0.0.1:{url.split(':')[3].split('/')[0]}/cam"
    with pytest.raises(SourceError) as e:
        RtspSource(url="http://admin:hunter2@cam-1/live")
    assert "hunter2" not in str(e.value)


def test_redact_url() -> None:
    assert redact_url("rtsp://u:p%40ss@cam:554/a/b?key=1&ch=2") == "rtsp://u:***@cam:554/a/b?key=***&ch=2"
    assert redact_url("rtsp://cam/live") == "rtsp://cam/live"
    assert default_camera_id("rtsps://u:p@cam.local/Streaming/101/") == "cam.local/Streaming/101"


def test_rtsp_config_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ODDEYE_RTSP_URL", "rtsp://user:pw@10.0.0.5:554/live")
    cfg = load_config(REPO / "configs" / "rtsp.yaml")
    src = cfg.sources[0]
    assert src.type == "rtsp" and src.url == "rtsp://user:pw@10.0.0.5:554/live"
    assert src.drop_policy in ("auto", "drop_oldest")
    demo = load_config(REPO / "configs" / "demo.yaml")
    assert cfg.model.image_size == demo.model.image_size and cfg.model.params == demo.model.params
    assert {s.type for s in cfg.sinks} == {"console", "jsonl", "snapshots"}


def test_authentication_failure_is_reported_and_retried(caplog: pytest.LogCaptureFixture) -> None:
    """A rejected password says 'authentication failed' (RTSP 401), never the password; the right one streams."""
    require_rtsp_server()
    caplog.set_level(logging.INFO, logger="oddeye.sources.rtsp")
    server = start_rtsp_server(user="admin", password="s3cret-pw")
    base = server.url.replace("rtsp://", "rtsp://admin:{}@")
    assert rtsp_status(base.format("wrong-pw"), 5) == 401 and rtsp_status(base.format("s3cret-pw"), 5) == 200
    source = RtspSource(url=base.format("wrong-pw"), backend="opencv", **FAST, warn_initial_s=0.3)
    reader = Reader(source)
    try:
        reader.wait_for(lambda: source.reconnects >= 4, 30, "retries")
        assert reader.frames == [] and source.describe()["cameras"][0]["error"].startswith("authentication failed")
    finally:
        reader.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings and all("authentication failed (RTSP 401)" in w for w in warnings)
    assert "retrying in" in warnings[0] and "wrong-pw" not in caplog.text
    # the right password gets frames from the same server
    reader = Reader(RtspSource(url=base.format("s3cret-pw"), backend="opencv", **FAST))
    try:
        reader.wait_frames(3, timeout_s=20)
    finally:
        reader.close()
        server.stop()


def test_unreachable_camera_warns_at_growing_intervals(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="oddeye.sources.rtsp")
    fast = {**FAST, "reconnect_initial_s": 0.05, "reconnect_max_s": 0.05}
    source = RtspSource(url=f"rtsp://127.0.0.1:{free_port()}/cam", backend="opencv", **fast, warn_initial_s=0.4)
    reader = Reader(source)
    try:
        time.sleep(3.5)
    finally:
        reader.close()
    warned = [r.created for r in caplog.records if r.levelno == logging.WARNING and "cannot connect" in r.getMessage()]
    infos = [r for r in caplog.records if r.levelno == logging.INFO and "cannot connect" in r.getMessage()]
    # retried all along (tens of attempts), but warned only at t = 0, >= 0.4, >= 1.2, >= 2.8 s: gaps double
    assert source.reconnects >= 10 and infos
    assert 2 <= len(warned) <= 5
    gaps = [b - a for a, b in itertools.pairwise(warned)]
    assert all(gap >= 0.4 * 2**i - 0.05 for i, gap in enumerate(gaps)), gaps
    assert "retrying in" in caplog.text
