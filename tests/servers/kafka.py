"""A real Kafka-protocol broker (tansu) on loopback for tests, started and stopped by PID.

`scripts/install-test-deps.sh` puts the binary at .test-servers/bin/tansu (or set
ODDEYE_TANSU). Storage is in memory: a restart loses the topics.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_tansu() -> str:
    for candidate in (
        os.environ.get("ODDEYE_TANSU"),
        str(REPO / ".test-servers" / "bin" / "tansu"),
        shutil.which("tansu"),
    ):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise RuntimeError(
        "the tansu broker is not installed: run `bash scripts/install-test-deps.sh` (or set ODDEYE_TANSU)"
    )


@dataclass
class Broker:
    port: int
    proc: subprocess.Popen
    binary: str

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def create_topic(self, name: str, partitions: int = 1) -> None:
        subprocess.run(
            [
                self.binary,
                "topic",
                "create",
                name,
                "--broker",
                f"tcp://{self.bootstrap}",
                "--partitions",
                str(partitions),
            ],
            check=True,
            capture_output=True,
            timeout=30,
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def start_broker(port: int | None = None, timeout_s: float = 20.0) -> Broker:
    binary = find_tansu()
    port = port or free_port()
    url = f"tcp://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [
            binary,
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"tansu exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return Broker(port, proc, binary)
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"tansu did not listen on {port} within {timeout_s}s")


def read_topic(bootstrap: str, topic: str, n: int, timeout_s: float = 10.0) -> list:
    """Up to ``n`` messages of ``topic`` from the beginning (stops after ``timeout_s`` without one)."""
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", consumer_timeout_ms=int(timeout_s * 1000)
    )
    out = []
    try:
        for m in consumer:
            out.append(m)
            if len(out) >= n:
                break
    finally:
        consumer.close()
    return out


def committed_offsets(bootstrap: str, group: str, topic: str | None = None) -> dict[int, int]:
    """The consumer group's committed offset of each partition (of ``topic``, when given)."""
    from kafka import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        committed = admin.list_group_offsets({group: None}).get(group, {})
    finally:
        admin.close()
    return {
        tp.partition: om.offset
        for tp, om in committed.items()
        if (topic is None or tp.topic == topic) and om.offset >= 0
    }
