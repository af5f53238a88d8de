"""End to end on real Ray with a real RTSP camera: it goes away mid-stream and comes back by itself."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from oddeye.config import parse_config
from oddeye.pipeline.runner import Pipeline, RunSummary
from tests.conftest import tiny_config
from tests.servers.rtsp import start_rtsp_server

pytestmark = pytest.mark.slow

READ_TIMEOUT_S = 1.5
CAM = "dock-cam"


def _metric(port: int, name: str, **labels: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    total = 0.0
    for line in text.splitlines():
        key, _, value = line.rpartition(" ")
        metric, _, rest = key.partition("{")
        if metric == name and all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += float(value)
    return total


def _wait(check: Callable[[], bool], timeout_s: float, what: str) -> float:
    t0 = time.monotonic()
    while not check():
        if time.monotonic() - t0 > timeout_s:
            raise AssertionError(f"not within {timeout_s}s: {what}")
        time.sleep(0.05)
    return time.monotonic() - t0


def test_camera_goes_away_and_comes_back(ray_local, fitted_checkpoint: Path, rtsp_server, tmp_path: Path) -> None:
    source = {
        "type": "rtsp",
        "url": rtsp_server.url,
        "camera_id": CAM,
        "open_timeout_s": 2.0,
        "read_timeout_s": READ_TIMEOUT_S,
        "reconnect_initial_s": 0.2,
        "reconnect_max_s": 1.0,
    }
    raw = tiny_config(tmp_path, sources=[source])
    raw["model"]["checkpoint"] = str(fitted_checkpoint)
    pipeline = Pipeline(parse_config(raw), out_dir=tmp_path / "out")
    result: list[RunSummary] = []
    runner = threading.Thread(target=lambda: result.append(pipeline.run()), daemon=True)
    runner.start()
    server2 = None
    try:
        _wait(lambda: pipeline.summary.metrics_port is not None, 60, "pipeline started")
        port = pipeline.summary.metrics_port

        def scored() -> float:
            return _metric(port, "oddeye_frames_scored_total", camera=CAM)

        def up() -> float:
            return _metric(port, "oddeye_source_up", camera=CAM)

        _wait(lambda: scored() >= 10 and up() == 1, 30, "frames scored from the camera")

        # the camera dies: source_up drops within the read timeout, the pipeline keeps running
        rtsp_server.stop()
        down_after = _wait(lambda: up() == 0, READ_TIMEOUT_S + 3, "source_up 0 after the camera died")
        assert down_after <= READ_TIMEOUT_S + 1.5
        assert runner.is_alive() and not result
        time.sleep(1.0)
        assert runner.is_alive(), "the pipeline must outlive its camera"

        # a camera on the same address again: reconnected without help, scores flow again
        scored_before = scored()
        server2 = start_rtsp_server(port=rtsp_server.port)
        _wait(lambda: up() == 1, 15, "source_up back to 1")
        _wait(lambda: scored() >= scored_before + 10, 15, "scores flowing again")
        assert _metric(port, "oddeye_source_reconnects_total", camera=CAM) >= 1
    finally:
        pipeline.stop()
        runner.join(60)
        pipeline.close()
        if server2 is not None:
            server2.stop()
    assert not runner.is_alive() and result, "the pipeline did not stop"
    s = result[0]
    assert s.stop_reason == "stopped"
    # every frame that reached the pipeline was scored or counted as dropped
    assert s.ingested == s.scored + s.dead_letters + sum(s.dropped.get(r, 0) for r in ("queue_full", "shutdown"))
    lines = (tmp_path / "out" / "scores.jsonl").read_text().splitlines()
    seqs = [json.loads(line)["seq"] for line in lines]
    assert len(seqs) == s.scored and seqs == sorted(set(seqs)), "seq keeps rising across the reconnect"
