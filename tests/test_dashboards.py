"""Grafana dashboards and Prometheus rules only use metrics that oddeye's /metrics really serves.

Every PromQL expression in configs/grafana/dashboards/*.json (panel targets, annotations,
template variables) and configs/prometheus/rules/*.yml is parsed by promtool's PromQL
parser; each ``oddeye_*`` name in them must be a series that /metrics serves (histogram
``_bucket``/``_sum``/``_count`` included), first from a fresh endpoint and then from a
real pipeline run.
"""

from __future__ import annotations

import json
import re
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from oddeye.config import parse_config
from oddeye.pipeline.runner import Pipeline
from oddeye.pipeline.telemetry import Telemetry
from tests.conftest import require_binary, tiny_config

REPO = Path(__file__).resolve().parents[1]
DASHBOARDS = sorted((REPO / "configs" / "grafana" / "dashboards").glob("*.json"))
RULES = sorted((REPO / "configs" / "prometheus" / "rules").glob("*.yml"))
METRIC = re.compile(r"\b(oddeye_[A-Za-z0-9_:]+)")
GRAFANA_VARS = {
    r"\$__rate_interval|\$\{__rate_interval\}|\$__interval|\$\{__interval\}|\$__range|\$\{__range\}": "1m",
    r"\$\{?camera(:\w+)?\}?": ".*",
}
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"), "gauge": ("",)}


def _walk_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for p in panels:
        yield p
        yield from _walk_panels(p.get("panels", []))


def dashboard_exprs(path: Path) -> list[str]:
    dash = json.loads(path.read_text())
    exprs = [t["expr"] for p in _walk_panels(dash.get("panels", [])) for t in p.get("targets", []) if t.get("expr")]
    exprs += [a["expr"] for a in dash.get("annotations", {}).get("list", []) if a.get("expr")]
    for var in dash.get("templating", {}).get("list", []):
        query = var.get("query")
        query = query.get("query", "") if isinstance(query, dict) else query or ""
        m = re.fullmatch(r"label_values\((.+),\s*\w+\)", query.strip())
        if m:  # Grafana's label_values(SELECTOR, label): the selector is PromQL
            exprs.append(m.group(1))
    return exprs


def rule_exprs(path: Path) -> list[str]:
    return [r["expr"] for g in yaml.safe_load(path.read_text())["groups"] for r in g["rules"]]


def all_exprs() -> dict[str, list[str]]:
    out = {p.name: dashboard_exprs(p) for p in DASHBOARDS}
    out.update({p.name: rule_exprs(p) for p in RULES})
    return out


def substitute(expr: str) -> str:
    for pattern, value in GRAFANA_VARS.items():
        expr = re.sub(pattern, value, expr)
    assert "$" not in expr.replace("$labels", "").replace("$value", ""), f"unknown Grafana variable in {expr}"
    return expr


def served_names(exposition: str) -> tuple[set[str], set[str]]:
    """(every series name /metrics declares, the names that have at least one sample)."""
    declared: set[str] = set()
    sampled: set[str] = set()
    for family in text_string_to_metric_families(exposition):
        base = family.name
        declared.update(base + s for s in SUFFIXES.get(family.type, ("",)))
        for s in family.samples:
            declared.add(s.name)
            sampled.add(s.name)
    return declared, sampled


def used_names() -> dict[str, set[str]]:
    return {name: {m for e in exprs for m in METRIC.findall(e)} for name, exprs in all_exprs().items()}


def scrape(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()


def test_dashboards_cover_what_operators_need() -> None:
    assert DASHBOARDS and RULES
    used = set().union(*used_names().values())
    for needed in (
        "oddeye_last_anomaly_score",
        "oddeye_frames_ingested_total",
        "oddeye_frames_scored_total",
        "oddeye_frames_dropped_total",
        "oddeye_end_to_end_seconds_bucket",
        "oddeye_inference_seconds_bucket",
        "oddeye_inference_batch_size_bucket",
        "oddeye_kafka_consumer_lag",
        "oddeye_source_up",
    ):
        assert needed in used, needed
    dash = json.loads(DASHBOARDS[0].read_text())
    annotations = [a for a in dash["annotations"]["list"] if "oddeye_alerts_total" in a.get("expr", "")]
    assert annotations, "the score timeline needs alert annotations"


def test_every_expression_parses(tmp_path: Path) -> None:
    promtool = require_binary("promtool", "Debian package prometheus")
    rules = []
    for source, exprs in all_exprs().items():
        for i, expr in enumerate(exprs):
            rules.append({"record": f"check:{re.sub(r'[^a-z0-9]', '_', source)}:{i}", "expr": substitute(expr)})
    path = tmp_path / "exprs.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "exprs", "rules": rules}]}))
    r = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_metric_names_exist_on_a_fresh_endpoint() -> None:
    telemetry = Telemetry()
    port = telemetry.serve("127.0.0.1", 0)
    try:
        declared, _ = served_names(scrape(port))
    finally:
        telemetry.stop()
    missing = {src: sorted(names - declared) for src, names in used_names().items() if names - declared}
    assert not missing, f"metrics used but not served: {missing}"
    assert "process_cpu_seconds_total" in declared and "python_info" in declared


@pytest.mark.slow
def test_metric_names_exist_on_a_running_pipeline(ray_local, fitted_checkpoint: Path, tmp_path: Path) -> None:
    raw = tiny_config(tmp_path)
    raw["sources"][0]["num_frames"] = 60
    raw["model"]["checkpoint"] = str(fitted_checkpoint)
    pipeline = Pipeline(parse_config(raw), out_dir=tmp_path / "out")
    try:
        summary = pipeline.run()
        declared, sampled = served_names(scrape(summary.metrics_port))
    finally:
        pipeline.close()
    assert summary.scored == 60
    missing = {src: sorted(names - declared) for src, names in used_names().items() if names - declared}
    assert not missing, f"metrics used but not served by a running pipeline: {missing}"
    # what a synthetic run must have produced samples for (no Kafka, no failing sinks here)
    for name in (
        "oddeye_frames_ingested_total",
        "oddeye_frames_scored_total",
        "oddeye_frames_dropped_total",
        "oddeye_decode_errors_total",
        "oddeye_anomaly_score_bucket",
        "oddeye_last_anomaly_score",
        "oddeye_alerts_total",
        "oddeye_alerts_open",
        "oddeye_inference_batch_size_bucket",
        "oddeye_inference_seconds_bucket",
        "oddeye_end_to_end_seconds_bucket",
        "oddeye_queue_depth",
        "oddeye_source_up",
        "oddeye_source_reconnects_total",
        "oddeye_actor_up",
        "oddeye_actor_failures_total",
        "process_resident_memory_bytes",
    ):
        assert name in sampled, name
