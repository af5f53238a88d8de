"""docker-compose.yml validates with Debian's docker-compose and wires the stack together."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from tests.conftest import require_binary

REPO = Path(__file__).resolve().parents[1]


def compose_config(*args: str) -> dict:
    compose = require_binary("docker-compose", "Debian package docker-compose")
    r = subprocess.run(
        [compose, "-f", str(REPO / "docker-compose.yml"), *args, "config"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    return yaml.safe_load(r.stdout)


def _mount(volume: str | dict) -> tuple[str, str]:
    """(target, source) of a service volume in short (``src:dst[:mode]``) or long syntax."""
    if isinstance(volume, dict):
        return volume["target"], volume.get("source", "")
    source, target = volume.split(":")[:2]
    return target, source


def test_compose_config_is_valid() -> None:
    compose = require_binary("docker-compose", "Debian package docker-compose")
    r = subprocess.run([compose, "config", "-q"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_stack_services_and_wiring() -> None:
    services = compose_config()["services"]
    assert {"kafka", "mediamtx", "camera", "oddeye", "prometheus", "grafana"} <= set(services)
    assert services.get("oddeye-gpu", {}).get("profiles", ["gpu"]) == ["gpu"]  # only with --profile gpu
    assert "profiles" not in services["oddeye"]
    kafka = services["kafka"]["environment"]
    assert kafka["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft, no ZooKeeper
    mounts = dict(_mount(v) for s in services.values() for v in s.get("volumes", []))
    assert Path(mounts["/etc/prometheus"]) == REPO / "configs" / "prometheus"
    assert Path(mounts["/etc/grafana/provisioning"]) == REPO / "configs" / "grafana" / "provisioning"
    assert Path(mounts["/var/lib/grafana/dashboards"]) == REPO / "configs" / "grafana" / "dashboards"
    oddeye = services["oddeye"]
    assert oddeye["build"]["args"]["TORCH_INDEX"].endswith("/cpu")
    assert any("rtsp://mediamtx:8554/cam" in a for a in oddeye["command"])
    assert any('"type": "kafka"' in a and "kafka:9092" in a for a in oddeye["command"])
    assert "metrics.host=0.0.0.0" in oddeye["command"]  # oddeye binds 127.0.0.1 unless told otherwise
    camera = " ".join(services["camera"]["command"])
    assert "rtsp://mediamtx:8554/cam" in camera and "-stream_loop -1" in camera
    # Prometheus scrapes the service by name on the metrics port oddeye serves
    prom = yaml.safe_load((REPO / "configs" / "prometheus" / "prometheus.yml").read_text())
    (job,) = [j for j in prom["scrape_configs"] if j["job_name"] == "oddeye"]
    targets = job["static_configs"][0]["targets"]
    assert targets == [f"oddeye:{oddeye['environment']['ODDEYE_METRICS_PORT']}"]


def test_gpu_profile_reserves_a_gpu() -> None:
    services = compose_config("--profile", "gpu")["services"]
    gpu = services["oddeye-gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert "oddeye" in gpu["networks"]["default"]["aliases"]
    assert "/cu" in gpu["build"]["args"]["TORCH_INDEX"]


def test_dockerfile_is_slim_non_root_cpu_by_default() -> None:
    text = (REPO / "Dockerfile").read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    assert lines[0].startswith("FROM python:") and "-slim" in lines[0]
    assert "ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu" in lines
    users = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    assert (REPO / ".dockerignore").is_file()
