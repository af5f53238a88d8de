"""End to end on real Ray: synthetic cameras → ingest → batcher → PaDiM → alerts → sinks, with /metrics."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest

from oddeye.config import parse_config
from oddeye.pipeline.runner import Pipeline, PipelineError
from tests.conftest import tiny_config

pytestmark = pytest.mark.slow


def _scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def _metric(samples: dict[str, float], name: str, **labels: str) -> float:
    total = 0.0
    for key, v in samples.items():
        metric, _, rest = key.partition("{")
        if metric == name and all(f'{k}="{val}"' in rest for k, val in labels.items()):
            total += v
    return total


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_two_cameras_alerts_accounting_and_metrics(ray_local, fitted_checkpoint: Path, tmp_path: Path) -> None:
    cam = tiny_config(tmp_path)["sources"][0]
    raw = tiny_config(
        tmp_path,
        sources=[
            {**cam, "camera_id": "cam-a", "num_frames": 180},
            {**cam, "camera_id": "cam-b", "num_frames": 120, "anomaly_every": 0},
        ],
    )
    raw["model"]["checkpoint"] = str(fitted_checkpoint)
    pipeline = Pipeline(parse_config(raw), out_dir=tmp_path / "out")
    try:
        s = pipeline.run()
        samples = _scrape(s.metrics_port)
    finally:
        pipeline.close()

    assert s.stop_reason == "sources_exhausted"
    # every frame is accounted for: scored, dead-lettered or dropped with a reason
    assert s.ingested == 300
    assert s.ingested == s.scored + s.dead_letters + sum(s.dropped.values())
    assert s.scored == 300 and s.dead_letters == 0

    scores = _read_jsonl(tmp_path / "out" / "scores.jsonl")
    keys = {(r["camera_id"], r["seq"]) for r in scores}
    assert keys == {("cam-a", i) for i in range(180)} | {("cam-b", i) for i in range(120)}
    assert set(scores[0]) == {"camera_id", "seq", "ts", "score", "label", "model", "latency_ms", "origin"}
    for cam_id in ("cam-a", "cam-b"):  # each camera's frames reach the sinks in order
        seqs = [r["seq"] for r in scores if r["camera_id"] == cam_id]
        assert seqs == sorted(seqs)

    alerts = _read_jsonl(tmp_path / "out" / "alerts.jsonl")
    opened = [a for a in alerts if a["state"] == "open"]
    # cam-a's anomalies are frames 45-59, 105-119, 165-179 (foreign object, texture defect, foreign object)
    periods = {a["started_at"] for a in opened}
    assert all(a["camera_id"] == "cam-a" for a in opened), "the all-normal camera must not alert"
    hit = {p: any(a["start_seq"] in range(p, p + 15) for a in opened) for p in (45, 105, 165)}
    assert all(hit.values()), f"anomaly periods without an alert: {hit}, alerts: {opened}"
    assert len(periods) == len(opened) <= 4
    assert {a["state"] for a in alerts} >= {"open", "close"}
    for a in opened:
        snap = a["snapshot"]
        assert snap and Path(snap).is_file()
        img = cv2.imread(snap)
        assert img is not None and img.shape[:2] == (96, 96)

    # /metrics agrees with what happened
    assert _metric(samples, "oddeye_frames_ingested_total") == 300
    assert _metric(samples, "oddeye_frames_scored_total", camera="cam-a") == 180
    assert _metric(samples, "oddeye_frames_scored_total", camera="cam-b") == 120
    assert _metric(samples, "oddeye_anomaly_score_count") == 300
    assert _metric(samples, "oddeye_alerts_total", state="open") == len(opened)
    assert _metric(samples, "oddeye_inference_batch_size_sum") == 300
    assert _metric(samples, "oddeye_inference_seconds_count") >= 300 / 8
    assert _metric(samples, "oddeye_end_to_end_seconds_count") == 300


def test_corrupt_frames_dead_lettered_and_max_frames_exact(ray_local, fitted_checkpoint: Path, tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(30):
        cv2.imwrite(str(folder / f"{i:03d}.png"), rng.integers(0, 255, (50, 70, 3), dtype=np.uint8))
    (folder / "010.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (folder / "notes.txt").write_text("not an image")
    raw = tiny_config(tmp_path, sources=[{"type": "images", "path": str(folder), "camera_id": "folder"}])
    raw["model"]["checkpoint"] = str(fitted_checkpoint)
    raw["metrics"]["enabled"] = False

    pipeline = Pipeline(parse_config(raw), out_dir=tmp_path / "out")
    s = pipeline.run()
    assert s.stop_reason == "sources_exhausted"
    assert s.ingested == 30 and s.scored == 29 and s.dead_letters == 1
    assert s.dropped == {"not_an_image": 1}
    dead = _read_jsonl(tmp_path / "out" / "dead_letters.jsonl")
    assert len(dead) == 1 and dead[0]["seq"] == 10 and "decode" in dead[0]["error"]

    pipeline = Pipeline(parse_config(raw), out_dir=tmp_path / "out2", max_frames=12)
    s = pipeline.run()
    assert s.stop_reason == "max_frames"
    assert s.scored == 12
    assert len(_read_jsonl(tmp_path / "out2" / "scores.jsonl")) == 12
    assert s.ingested == s.scored + s.dead_letters + s.dropped.get("shutdown", 0)


def test_missing_checkpoint_and_missing_video_are_clear_errors(
    ray_local, fitted_checkpoint: Path, tmp_path: Path
) -> None:
    raw = tiny_config(tmp_path)
    raw["metrics"]["enabled"] = False
    with pytest.raises(PipelineError, match="oddeye fit"):
        Pipeline(parse_config(raw), out_dir=tmp_path / "o").run()
    raw = tiny_config(tmp_path, sources=[{"type": "video", "path": str(tmp_path / "nope.mp4")}])
    raw["model"]["checkpoint"] = str(fitted_checkpoint)
    raw["metrics"]["enabled"] = False
    with pytest.raises(PipelineError, match=r"nope\.mp4"):
        Pipeline(parse_config(raw), out_dir=tmp_path / "o").run()


def test_local_ray_runs_the_actors_unniced(ray_local) -> None:
    """Ray starts workers at nice 15 by default: beside any busy process they got a few % of a core
    (the pipeline's model actor did not even start within 5 minutes beside three CPU-bound processes)."""
    import os

    from oddeye.pipeline.ingest_actor import warn_if_niced

    @ray_local.remote(num_cpus=0)
    def niceness() -> tuple[int, int]:
        return os.nice(0), warn_if_niced("test")  # the worker's niceness, and what the actors' check reads

    assert ray_local.get(niceness.remote(), timeout=60) == (0, 0)


def test_an_actor_niced_above_the_setting_says_so() -> None:
    """On a cluster whose nodes were started without RAY_worker_niceness, each actor names the fix."""
    import os
    import subprocess
    import sys

    code = "import logging; logging.basicConfig(); from oddeye.pipeline.ingest_actor import warn_if_niced; "
    code += "print(warn_if_niced('model'))"
    out = subprocess.run(
        ["nice", "-n", "7", sys.executable, "-c", code],
        capture_output=True, text=True, timeout=120, env={**os.environ, "ODDEYE_WORKER_NICENESS": "0"},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "7"
    assert "model actor runs at nice 7" in out.stderr and "RAY_worker_niceness=0" in out.stderr
    quiet = subprocess.run(
        ["nice", "-n", "7", sys.executable, "-c", code],
        capture_output=True, text=True, timeout=120, env={**os.environ, "ODDEYE_WORKER_NICENESS": "7"},
    )  # fmt: skip
    assert quiet.stdout.strip() == "7" and "runs at nice" not in quiet.stderr
