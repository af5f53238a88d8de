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


def test_models_lists_name_kind_line_without_importing_torch(tmp_path: Path) -> None:
    r = oddeye("models", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = [line.split("\t") for line in r.stdout.splitlines()]
    assert all(len(row) == 3 and row[1] in ("image", "video") and row[2] for row in rows)
    assert {"padim": "image", "frame_diff": "video"}.items() <= {n: k for n, k, _ in rows}.items()
    assert not any(mark in r.stdout for mark in ("``", "**"))
    # fast because nothing heavy is imported (it took 6 s importing every model with torch and timm)
    check = (
        "import sys; from oddeye.cli import main; main(['models']); print(sorted({'torch', 'ray'} & {*sys.modules}))"
    )
    r = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.splitlines()[-1] == "[]", r.stderr


def test_models_static_listing_matches_the_registry() -> None:
    from oddeye.commands.models import _registry_models, builtin_models

    assert builtin_models() == _registry_models()


def test_out_placeholder_puts_the_ai_vad_demo_checkpoint_under_out() -> None:
    from oddeye.commands._config import resolve_out
    from oddeye.config import load_config

    cfg = load_config(REPO / "configs" / "ai_vad_demo.yaml")
    assert resolve_out(cfg, "/tmp/elsewhere").model.checkpoint == "/tmp/elsewhere/ai_vad_demo.pt"
    assert resolve_out(load_config(REPO / "configs" / "ai_vad_demo.yaml"), None).model.checkpoint == (
        "oddeye-out/ai_vad_demo.pt"
    )
    assert "bench-out/" in (REPO / ".gitignore").read_text().splitlines()


def test_expected_errors_are_one_line_and_debug_shows_the_traceback(tmp_path: Path) -> None:
    raw = tiny_config(tmp_path)
    raw["fit"]["source"] = {"type": "images", "path": str(tmp_path / "no-such-folder")}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    r = oddeye("fit", "c.yaml", cwd=tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    (line,) = [ln for ln in r.stderr.splitlines() if ln.startswith("oddeye: ")]
    assert "no-such-folder" in line
    r = oddeye("--debug", "fit", "c.yaml", cwd=tmp_path)
    assert r.returncode == 1 and "Traceback" in r.stderr


@pytest.mark.slow
def test_readme_streaming_fit_works_offline(tmp_path: Path) -> None:
    """The README's first streaming command, offline (empty hub cache): random features with a warning, exit 0."""
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "TORCH_HOME": str(tmp_path / "torch")}
    small = ["--set", "fit.max_frames=12", "--set", "model.image_size=[64,64]", "--set", "ray.num_cpus=1"]
    ckpt = tmp_path / "m.pt"
    r = oddeye("fit", str(REPO / "configs" / "demo.yaml"), "--set", f"model.checkpoint={ckpt}", *small,
               cwd=tmp_path, env=env)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "randomly initialised features" in r.stderr and ckpt.is_file()
    # a config that is not the demo's says what to do in one line instead of a traceback
    raw = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    raw["model"]["params"]["pre_trained"] = True
    raw["fit"]["max_frames"] = 4
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump(raw))
    r = oddeye("fit", "mine.yaml", "--set", f"model.checkpoint={tmp_path / 'x.pt'}", cwd=tmp_path, env=env)
    assert r.returncode == 1 and "Traceback" not in r.stderr and "pre_trained: false" in r.stderr
    # the fitted checkpoint streams offline
    r = oddeye("run", str(REPO / "configs" / "demo.yaml"), "--set", f"model.checkpoint={ckpt}", *small,
               "--set", "metrics.port=0", "--out", "o", "--max-frames", "10", cwd=tmp_path, env=env)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert len((tmp_path / "o" / "scores.jsonl").read_text().splitlines()) >= 10


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
