"""The shipped Prometheus files: configs and rules validate, and every alert rule has a passing unit test."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import require_binary

PROM = Path(__file__).resolve().parents[1] / "configs" / "prometheus"


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    path = require_binary("promtool", "Debian package prometheus")
    return subprocess.run([path, *args], cwd=PROM, capture_output=True, text=True, timeout=60)


def test_rules_are_valid() -> None:
    rules = sorted(str(p.relative_to(PROM)) for p in (PROM / "rules").glob("*.yml"))
    assert rules
    r = promtool("check", "rules", *rules)
    assert r.returncode == 0, r.stdout + r.stderr


def test_rule_unit_tests_pass_and_cover_every_alert() -> None:
    tests = sorted(str(p.relative_to(PROM)) for p in (PROM / "tests").glob("*.yml"))
    r = promtool("test", "rules", *tests)
    assert r.returncode == 0, r.stdout + r.stderr
    alerts = {
        rule["alert"]
        for path in (PROM / "rules").glob("*.yml")
        for group in yaml.safe_load(path.read_text())["groups"]
        for rule in group["rules"]
        if "alert" in rule
    }
    tested = {
        case["alertname"]
        for path in (PROM / "tests").glob("*.yml")
        for test in yaml.safe_load(path.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")  # a case that expects the alert to fire
    }
    assert alerts - tested == set(), f"alert rules without a firing unit test: {sorted(alerts - tested)}"
    required = {"CameraDown", "NoFrames", "AnomalyAlert", "ConsumerLagGrowing", "DropRateHigh", "InferenceLatencyHigh"}
    assert {f"Oddeye{name}" for name in required} <= alerts


@pytest.mark.parametrize("config", ["prometheus.yml", "prometheus.local.yml"])
def test_scrape_configs_are_valid(config: str) -> None:
    r = promtool("check", "config", config)
    assert r.returncode == 0, r.stdout + r.stderr
    jobs = [job["job_name"] for job in yaml.safe_load((PROM / config).read_text())["scrape_configs"]]
    assert "oddeye" in jobs  # the rules select job="oddeye"
