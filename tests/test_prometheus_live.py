"""A real Prometheus (Debian's server) scrapes a live pipeline and fires the anomaly alert rule.

The pipeline streams the synthetic camera in real time with injected anomalies from a
thread of this process; Prometheus runs on 127.0.0.1 with the shipped rules, a 1 s scrape
and evaluation interval and a temporary TSDB, and is stopped by PID.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from oddeye.config import parse_config
from oddeye.pipeline.runner import Pipeline
from tests.conftest import require_binary, tiny_config
from tests.servers.kafka import free_port

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def api(port: int, path: str, **params: str) -> Any:
    query = f"?{urllib.parse.urlencode(params)}" if params else ""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/{path}{query}", timeout=5) as r:
        body = json.loads(r.read())
    assert body["status"] == "success", body
    return body["data"]


def wait_for(what: str, check: Callable[[], Any], timeout_s: float) -> Any:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except OSError as exc:  # not listening yet
            last = exc
        else:
            if last:
                return last
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


@pytest.fixture
def live_pipeline(ray_local, fitted_checkpoint: Path, tmp_path: Path) -> Iterator[Pipeline]:
    raw = tiny_config(tmp_path)
    raw["sources"][0].update(num_frames=None, realtime=True, fps=15, anomaly_every=45, anomaly_duration=15)
    raw["model"]["checkpoint"] = str(fitted_checkpoint)
    raw["sinks"] = [{"type": "jsonl"}]
    pipeline = Pipeline(parse_config(raw), out_dir=tmp_path / "out", duration=90)
    thread = threading.Thread(target=pipeline.run, name="pipeline", daemon=True)
    thread.start()
    try:
        wait_for("the pipeline's /metrics", lambda: pipeline.summary.metrics_port, 60)
        yield pipeline
    finally:
        pipeline.stop()
        thread.join(60)
        pipeline.close()


@pytest.fixture
def prometheus(live_pipeline: Pipeline, tmp_path: Path) -> Iterator[int]:
    port = free_port()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(p) for p in sorted((REPO / "configs" / "prometheus" / "rules").glob("*.yml"))],
        "scrape_configs": [
            {"job_name": "oddeye", "static_configs": [{"targets": [f"127.0.0.1:{live_pipeline.summary.metrics_port}"]}]}
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    prometheus = require_binary("prometheus", "Debian package prometheus")
    proc = subprocess.Popen(
        [
            prometheus,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "prometheus.log").open("w"),
    )
    try:
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def test_prometheus_scrapes_the_pipeline_and_the_anomaly_rule_fires(prometheus: int) -> None:
    def target_up() -> list[dict[str, Any]]:
        targets = api(prometheus, "targets")["activeTargets"]
        return [t for t in targets if t["labels"]["job"] == "oddeye" and t["health"] == "up"]

    wait_for("the oddeye target to be up", target_up, 30)

    def scored() -> float:
        result = api(prometheus, "query", query="sum(oddeye_frames_scored_total)")["result"]
        return float(result[0]["value"][1]) if result else 0.0

    wait_for("scored frames in Prometheus", scored, 30)

    def anomaly_firing() -> list[dict[str, Any]]:
        alerts = api(prometheus, "alerts")["alerts"]
        return [a for a in alerts if a["labels"]["alertname"] == "OddeyeAnomalyAlert" and a["state"] == "firing"]

    firing = wait_for("OddeyeAnomalyAlert to fire", anomaly_firing, 45)
    assert firing[0]["labels"]["camera"] == "cam-a" and firing[0]["labels"]["severity"] == "page"
    rules = api(prometheus, "rules")["groups"]
    assert all(r["health"] == "ok" for g in rules for r in g["rules"]), rules
