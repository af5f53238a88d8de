"""The command line as users type it, in subprocesses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import tiny_config

REPO = Path(__file__).resolve().parents[1]


def oddeye(*args: str, cwd: Path, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "oddeye.cli", *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_models_lists_padim(tmp_path: Path) -> None:
    r = oddeye("models", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "padim" in [line.split("\t")[0] for line in r.stdout.splitlines()]


def test_misspelled_key_exits_2_naming_it(tmp_path: Path) -> None:
    raw = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    raw["batching"]["max_batch_sise"] = raw["batching"].pop("max_batch_size")
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(raw))
    r = oddeye("run", "bad.yaml", cwd=tmp_path)
    assert r.returncode == 2
    assert "batching.max_batch_sise" in r.stderr and "max_batch_size" in r.stderr


def test_run_without_checkpoint_says_how_to_fit(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(tiny_config(tmp_path)))
    r = oddeye("run", "c.yaml", "--set", "ray.num_cpus=1", cwd=tmp_path)
    assert r.returncode == 1
    assert "oddeye fit" in r.stderr


@pytest.mark.slow
def test_fit_then_run_with_max_frames_then_sigterm(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(tiny_config(tmp_path)))
    r = oddeye("fit", "c.yaml", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "model.pt").is_file()

    r = oddeye("run", "c.yaml", "--out", "o1", "--max-frames", "25", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = (tmp_path / "o1" / "scores.jsonl").read_text().splitlines()
    assert [json.loads(x)["seq"] for x in lines] == list(range(25))

    # An endless live camera, stopped by SIGTERM: in-flight frames are written, sinks flushed.
    proc = subprocess.Popen(
        [sys.executable, "-m", "oddeye.cli", "run", "c.yaml", "--out", "o2", "--set", "sources.0.num_frames=null",
         "--set", "sources.0.realtime=true", "--set", "sources.0.fps=50"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    scores = tmp_path / "o2" / "scores.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not scores.exists() or scores.stat().st_size < 2000):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "SIGTERM" in out
    written = [json.loads(x) for x in scores.read_text().splitlines()]
    summary = out.strip().splitlines()[-1]
    assert f"{len(written)} scored" in summary
    seqs = [w["seq"] for w in written]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)


@pytest.mark.slow
def test_demo_in_empty_directory(tmp_path: Path) -> None:
    r = oddeye("demo", cwd=tmp_path, env={"ODDEYE_METRICS_PORT": "0"}, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ALERT OPEN" in r.stdout
    snaps = list((tmp_path / "oddeye-out" / "snapshots").rglob("*.jpg"))
    assert snaps
    alerts = [json.loads(x) for x in (tmp_path / "oddeye-out" / "alerts.jsonl").read_text().splitlines()]
    assert any(a["state"] == "open" and a["snapshot"] for a in alerts)
    assert "500 scored" in r.stdout
