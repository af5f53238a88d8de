"""oddeye on a real multi-node Ray cluster: placement by custom resources, replicas on two nodes, a node killed.

One cluster per module (tests/servers/ray_cluster.py): a head with no custom resources, an
``ingest`` node offering ``{"ingest": 8}`` and two model nodes offering ``{"model": 1}`` each.
Each case runs the real CLI (``oddeye run``) as a subprocess that joins the cluster, so this
test process never holds a Ray connection. Where an actor ran is read from the cluster's GCS
actor table by a separate client, not from what the pipeline says about itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
import yaml

from tests.conftest import tiny_config
from tests.servers.ray_cluster import NodeSpec, RayCluster, ray_env, start_cluster

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

INGEST, MODEL_A, MODEL_B = "ingest", "model-a", "model-b"
MODEL_NODES = {MODEL_A, MODEL_B}


@pytest.fixture(scope="module")
def cluster():
    c = start_cluster(
        [
            NodeSpec(INGEST, num_cpus=1, resources={"ingest": 8}),
            NodeSpec(MODEL_A, num_cpus=1, resources={"model": 1}),
            NodeSpec(MODEL_B, num_cpus=1, resources={"model": 1}),
        ],
        head=NodeSpec("head", num_cpus=1),
        timeout_s=240,
    )
    yield c
    c.stop()


def _config(tmp: Path, checkpoint: Path, address: str, replicas: int = 1, **sections: object) -> Path:
    raw = tiny_config(tmp)
    raw["ray"] = {"address": address}
    raw["sources"][0].update(num_frames=400, resources={"ingest": 1})
    raw["model"].update(
        checkpoint=str(checkpoint), replicas=replicas, num_cpus=1, num_threads=1, resources={"model": 1}
    )
    raw["sinks"] = [{"type": "jsonl"}]
    raw["metrics"]["enabled"] = False
    raw.update(sections)
    path = tmp / f"cluster-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _oddeye(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """``oddeye ARGS`` with its output in files under ``cwd`` (a pipe nobody reads while the run goes on
    fills up and blocks the run's logging, and so the run itself)."""
    name = f"oddeye-{uuid.uuid4().hex[:6]}"
    out, err = (cwd / f"{name}.out").open("w"), (cwd / f"{name}.err").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "oddeye.cli", *args],
        cwd=cwd,
        stdout=out,
        stderr=err,
        text=True,
        env=env or ray_env(),
        start_new_session=True,
    )
    out.close()
    err.close()
    proc.log_paths = (Path(out.name), Path(err.name))  # type: ignore[attr-defined]
    return proc


def _output(proc: subprocess.Popen) -> tuple[str, str]:
    """What the run wrote so far: stdout, stderr."""
    out, err = proc.log_paths  # type: ignore[attr-defined]
    return out.read_text(errors="replace"), err.read_text(errors="replace")


def _finish(proc: subprocess.Popen, timeout_s: float) -> str:
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)
        proc.wait(timeout=30)
        out, err = _output(proc)
        pytest.fail(f"oddeye run did not finish within {timeout_s:.0f}s:\n{out[-2000:]}\n{err[-4000:]}")
    out, err = _output(proc)
    assert proc.returncode == 0, f"oddeye run failed ({proc.returncode}):\n{out[-2000:]}\n{err[-4000:]}"
    return out


def _lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            out.append(json.loads(line))
    return out


def _kind(class_name: str) -> str | None:
    name = class_name.lower()
    return "ingest" if "ingest" in name else "model" if "model" in name else None


def _placement(cluster: RayCluster, before: set[str], names: dict[str, str]) -> dict[str, list[str]]:
    """Node names of the ingest and model actors this run created (``before``: actor ids that existed earlier)."""
    out: dict[str, list[str]] = {"ingest": [], "model": []}
    by_id = {nid: name for name, nid in names.items()}
    for a in cluster.query("actors"):
        kind = _kind(a["class_name"])
        if a["actor_id"] in before or kind is None:
            continue
        out[kind].append(by_id.get(a["node_id"], f"unknown node {a['node_id']}"))
    return out


def _run_and_place(cluster: RayCluster, tmp_path: Path, cfg: Path, frames: int, env: dict | None = None) -> tuple:
    names = cluster.node_ids()
    before = {a["actor_id"] for a in cluster.query("actors")}
    out = _finish(_oddeye(["run", str(cfg), "--out", "out", "--max-frames", str(frames)], tmp_path, env), 240)
    scored = _lines(tmp_path / "out" / "scores.jsonl")
    return out, scored, _placement(cluster, before, names)


def test_ingest_and_model_on_different_nodes(cluster: RayCluster, fitted_checkpoint: Path, tmp_path: Path) -> None:
    """`ray.address: auto` joins the running cluster (RAY_ADDRESS); sources.*.resources and model.resources place
    the ingest actor on the ingest node and the model actor on a model node."""
    cfg = _config(tmp_path, fitted_checkpoint, "auto")
    env = {**ray_env(), "RAY_ADDRESS": cluster.address}
    out, scored, placed = _run_and_place(cluster, tmp_path, cfg, 24, env)
    assert len({r["seq"] for r in scored}) >= 24, out
    assert placed["ingest"] and set(placed["ingest"]) == {INGEST}, placed
    assert len(placed["model"]) == 1 and set(placed["model"]) <= MODEL_NODES, placed


def test_two_model_replicas_on_two_nodes(cluster: RayCluster, fitted_checkpoint: Path, tmp_path: Path) -> None:
    cfg = _config(tmp_path, fitted_checkpoint, cluster.address, replicas=2)
    out, scored, placed = _run_and_place(cluster, tmp_path, cfg, 32)
    assert len({r["seq"] for r in scored}) >= 32, out
    assert sorted(placed["model"]) == sorted(MODEL_NODES), placed
    assert set(placed["ingest"]) == {INGEST}, placed


# ----------------------------------------------------------------------------- a node dies mid-stream

N_FRAMES, FIRST, PUBLISH_FPS = 160, 8, 8


def _publish(bootstrap: str, topic: str, live: threading.Event, stop: threading.Event, errors: list) -> None:
    """One synthetic camera: ``FIRST`` frames at once, the rest at ``PUBLISH_FPS`` once ``live`` is set.

    The stream then outlasts the node failure: frames keep arriving while the model node is down.
    """
    try:
        from kafka import KafkaProducer

        from oddeye.frames import encode_frame
        from oddeye.sources.synthetic import SyntheticCamera

        producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
        t0 = None
        for i, frame in enumerate(SyntheticCamera(width=160, height=120, num_frames=N_FRAMES, anomaly_every=0)):
            if i == FIRST:
                producer.flush()
                while not live.wait(0.2):
                    if stop.is_set():
                        return
                t0 = time.monotonic()
            if stop.is_set():
                break
            key, value, headers = encode_frame(frame)
            producer.send(topic, key=key, value=value, headers=headers)
            if t0 is not None:
                time.sleep(max(0.0, t0 + (i + 1 - FIRST) / PUBLISH_FPS - time.monotonic()))
        producer.flush()
        producer.close()
    except BaseException as e:  # reported by the test
        errors.append(e)


def _read_scores(bootstrap: str, topic: str, want: int, timeout_s: float) -> list[dict]:
    """Every record of the scores topic (JSON values), until ``want`` distinct seqs or the timeout."""
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", consumer_timeout_ms=3000, group_id=None
    )
    out: list[dict] = []
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline and len({r["seq"] for r in out}) < want:
            for m in consumer:
                out.append(json.loads(m.value))
    finally:
        consumer.close()
    return out


def test_model_node_killed_mid_stream_from_kafka_loses_no_frame(
    cluster: RayCluster, kafka_broker, fitted_checkpoint: Path, tmp_path: Path
) -> None:
    """SIGKILL of the raylet of the node that hosts the model actor while frames stream in from Kafka.

    The pipeline must go on: the model actor is restarted on the other model node (or on the
    killed node once it is back) and in-flight batches are scored again. The scores topic then
    holds every published frame (at-least-once: duplicates allowed, nothing lost), and the run
    ends cleanly when the stream goes idle.
    """
    topic, scores_topic, group = (f"{p}-{uuid.uuid4().hex[:8]}" for p in ("frames", "scores", "g"))
    kafka_broker.create_topic(topic, 1)
    kafka_broker.create_topic(scores_topic, 1)
    source = {
        "type": "kafka",
        "bootstrap_servers": kafka_broker.bootstrap,
        "topics": [topic],
        "group_id": group,
        "dlq_topic": None,
        "queue_size": 16,
        "max_poll_records": 20,
        "session_timeout_ms": 3000,
        "heartbeat_interval_ms": 500,
        "resources": {"ingest": 1},
    }
    sinks = [
        {"type": "jsonl"},
        {
            "type": "kafka",
            "bootstrap_servers": kafka_broker.bootstrap,
            "scores_topic": scores_topic,
            "alerts_topic": None,
        },
    ]
    cfg = _config(tmp_path, fitted_checkpoint, cluster.address, sources=[source], sinks=sinks)
    names = cluster.node_ids()
    before = {a["actor_id"] for a in cluster.query("actors")}

    live, stop, errors = threading.Event(), threading.Event(), []
    publisher = threading.Thread(target=_publish, args=(kafka_broker.bootstrap, topic, live, stop, errors), daemon=True)
    publisher.start()
    scores = tmp_path / "out" / "scores.jsonl"
    run = _oddeye(["run", str(cfg), "--out", "out", "--idle-timeout", "20"], tmp_path)
    try:
        deadline = time.monotonic() + 180
        while len(_lines(scores)) < FIRST:  # the pipeline is up and scoring: the live stream starts now
            assert run.poll() is None, _output(run)[1][-4000:]
            assert time.monotonic() < deadline, "no scores within 180 s"
            time.sleep(0.3)
        live.set()
        model_nodes = _placement(cluster, before, names)["model"]
        assert len(model_nodes) == 1 and model_nodes[0] in MODEL_NODES, model_nodes
        victim = model_nodes[0]
        stores = [
            a["node_id"]
            for a in cluster.query("actors")
            if a["class_name"] == "CheckpointStore" and a["actor_id"] not in before
        ]
        assert stores == [names["head"]], f"the checkpoint holder must live on the driver's node: {stores}"
        while len(_lines(scores)) < FIRST + 16:
            assert run.poll() is None, _output(run)[1][-4000:]
            assert time.monotonic() < deadline, "the stream stalled before the kill"
            time.sleep(0.2)
        scored_before_kill = len(_lines(scores))
        cluster.kill_raylet(victim)
        cluster.wait_dead(names[victim], timeout_s=60)
        cluster.restart(victim, timeout_s=180)

        publisher.join(timeout=N_FRAMES / PUBLISH_FPS + 60)
        assert not errors, errors
        _finish(run, timeout_s=240)
    finally:
        stop.set()
        if run.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(run.pid, 9)
            run.wait(timeout=30)

    assert scored_before_kill < N_FRAMES, "the node must die mid-stream"
    records = _read_scores(kafka_broker.bootstrap, scores_topic, N_FRAMES, timeout_s=30)
    seqs = Counter(r["seq"] for r in records)
    missing = sorted(set(range(N_FRAMES)) - set(seqs))
    dead = [d.get("seq") for d in _lines(tmp_path / "out" / "dead_letters.jsonl")]
    assert not missing, f"{len(missing)} frame(s) lost after the node died: {missing[:20]}; dead-lettered: {dead[:20]}"
    assert all(r["camera_id"] == "synthetic-0" for r in records)
