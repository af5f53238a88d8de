"""A real multi-node Ray cluster on 127.0.0.1 for tests and benchmarks, started and stopped by PID.

Every node is its own ``ray start --block`` process (a head, then workers joining with
``--address``), each with its CPUs, custom resources and a temp dir of its own, so the
cluster never writes ``/tmp/ray/ray_current_cluster`` and no other ``ray.init()`` on the
machine can join it by accident. Each node costs about 0.4–0.6 GB (raylet, agents, log
monitor) before any actor runs; the object store is kept small.

The cluster is queried from short-lived subprocesses (``ray.nodes()``, the GCS actor table),
so a test process never holds a Ray connection of its own. A worker node can be killed the
way a machine dies (SIGKILL of its raylet; ``ray start --block`` then takes the node's other
processes down) and started again with the same resources. ``stop()`` ends every node by the
PID of its ``ray start`` process and then its process group: never ``ray stop``, which would
kill every Ray on the machine.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Faster node-death detection than Ray's defaults (a dead node is seen in ~2-4 s instead of ~15-30 s
# on a loaded machine), so a killed node's actors are restarted within a test's budget.
HEAD_SYSTEM_CONFIG = {
    "health_check_period_ms": 500,
    "health_check_failure_threshold": 4,
    "health_check_timeout_ms": 1000,
}
OBJECT_STORE_BYTES = 80 * 1024 * 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_env() -> dict[str, str]:
    """The environment of every node and client: no token auth, no usage stats, no stray RAY_ADDRESS."""
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", RAY_DEDUP_LOGS="0", RAY_worker_niceness="0")
    return env


class NodeExitedError(RuntimeError):
    """A node's ``ray start`` process ended while it was expected to run."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.name = name


@dataclass
class NodeSpec:
    """One node: its name in tests, logical CPUs and Ray custom resources (e.g. ``{"model": 1}``)."""

    name: str
    num_cpus: float = 1
    resources: dict[str, float] = field(default_factory=dict)


@dataclass
class RayNode:
    """A running ``ray start --block`` process and the temp dir that tells its processes apart."""

    spec: NodeSpec
    proc: subprocess.Popen
    temp_dir: Path
    log_path: Path

    def alive(self) -> bool:
        return self.proc.poll() is None

    def raylet_pid(self) -> int | None:
        """The PID of this node's raylet: the process whose command line names its temp dir's raylet socket."""
        marker = str(self.temp_dir) + "/"
        for pid, cmd in _processes():
            if cmd and cmd[0].endswith("/raylet") and any(marker in a for a in cmd[1:]):
                return pid
        return None

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""


def _processes() -> list[tuple[int, list[str]]]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        out.append((int(entry), [a.decode(errors="replace") for a in raw.split(b"\0") if a]))
    return out


def _stop_process(proc: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM the ``ray start`` process (it stops its node's processes), then SIGKILL its group."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace_s)
    # Workers and agents stay in the session of the `ray start` that spawned them (start_new_session).
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


_QUERY = r"""
import json, sys
import ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
what = sys.argv[2]
if what == "nodes":
    out = [{"node_id": n["NodeID"], "alive": n["Alive"], "resources": n["Resources"],
            "raylet_socket": n.get("RayletSocketName", "")} for n in ray.nodes()]
elif what == "actors":
    from ray._private import state  # the GCS actor table: works without the dashboard's state API
    out = [{"actor_id": a["ActorID"], "class_name": a["ActorClassName"], "state": a["State"],
            "node_id": (a.get("Address") or {}).get("NodeID"), "job_id": a.get("JobID"),
            "name": a.get("Name", ""), "num_restarts": a.get("NumRestarts", 0)}
           for a in state.actors().values()]
else:
    raise SystemExit(f"unknown query {what}")
print("@@" + json.dumps(out))
"""


class RayCluster:
    """A head and named worker nodes on 127.0.0.1; see the module docstring."""

    def __init__(
        self,
        workers: list[NodeSpec],
        head: NodeSpec | None = None,
        object_store_bytes: int = OBJECT_STORE_BYTES,
        base_dir: str | Path | None = None,
    ) -> None:
        self.head_spec = head or NodeSpec("head", num_cpus=1)
        self.worker_specs = {w.name: w for w in workers}
        if len(self.worker_specs) != len(workers) or self.head_spec.name in self.worker_specs:
            raise ValueError("node names must be unique")
        self.object_store_bytes = object_store_bytes
        # Short paths: Ray's unix sockets live under the temp dir and must stay under 107 bytes.
        self.base = Path(tempfile.mkdtemp(prefix="oddeye-ray-", dir=base_dir or "/tmp"))
        self.port = free_port()
        self.nodes: dict[str, RayNode] = {}
        self._incarnation: dict[str, int] = {}

    @property
    def address(self) -> str:
        """The GCS address workers and drivers join (``ray.address`` in an oddeye config)."""
        return f"127.0.0.1:{self.port}"

    # ------------------------------------------------------------------ start / stop
    def _spawn(self, spec: NodeSpec, head: bool) -> RayNode:
        k = self._incarnation.get(spec.name, 0)
        self._incarnation[spec.name] = k + 1
        temp_dir = self.base / f"{spec.name}{k}"
        temp_dir.mkdir()
        cmd = [
            sys.executable,
            "-m",
            "ray.scripts.scripts",
            "start",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--num-cpus={spec.num_cpus:g}",
            "--num-gpus=0",
            f"--resources={json.dumps(spec.resources)}",
            f"--object-store-memory={self.object_store_bytes}",
            f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
        ]
        if head:
            cmd += [
                "--head",
                f"--port={self.port}",
                "--include-dashboard=false",
                f"--system-config={json.dumps(HEAD_SYSTEM_CONFIG)}",
            ]
        else:
            cmd += [f"--address={self.address}"]
        log_path = self.base / f"{spec.name}{k}.log"
        with open(log_path, "wb") as out:
            proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, env=ray_env(), start_new_session=True, cwd=self.base
            )
        node = RayNode(spec, proc, temp_dir, log_path)
        self.nodes[spec.name] = node
        return node

    def start(self, timeout_s: float = 180.0) -> RayCluster:
        """Start the head, then the workers one after another, each once the one before is alive.

        One at a time, and started again when a start fails: a starting raylet aborts when its
        dashboard agent has not written its ports within ~15 s, or when it has not registered with
        the GCS within 30 s (both fixed in Ray 2.60), which a loaded 2-core machine can miss.
        """
        deadline = time.monotonic() + timeout_s
        try:
            self._spawn(self.head_spec, head=True)
            self._wait_listening(deadline)
            self._start_worker_nodes(list(self.worker_specs), deadline)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_worker_nodes(self, names: list[str], deadline: float, retries: int = 3) -> None:
        """Start the named workers in turn; one whose start timed out is started again (``retries`` times)."""
        for name in names:
            for attempt in range(retries + 1):
                self._spawn(self.worker_specs[name], head=False)
                try:
                    self.wait_alive([self.head_spec.name, name], timeout_s=max(1.0, deadline - time.monotonic()))
                    break
                except NodeExitedError as e:
                    if attempt == retries or time.monotonic() > deadline or e.name != name:
                        raise
                    log.warning("ray node %s failed to start; starting it again", name)
                    _stop_process(self.nodes[name].proc, grace_s=5.0)

    def _wait_listening(self, deadline: float) -> None:
        head = self.nodes[self.head_spec.name]
        while time.monotonic() < deadline:
            if not head.alive():
                raise RuntimeError(f"ray head exited with {head.proc.returncode}:\n{head.log_tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.2)
        raise TimeoutError(f"ray head did not listen on {self.port} in time:\n{head.log_tail()}")

    def stop(self, grace_s: float = 15.0) -> None:
        """Stop every node by PID (workers first, the head last) and remove the temp dirs."""
        for name in [n for n in self.nodes if n != self.head_spec.name] + [self.head_spec.name]:
            node = self.nodes.get(name)
            if node is not None:
                _stop_process(node.proc, grace_s)
        shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> RayCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ queries
    def query(self, what: str, timeout_s: float = 60.0) -> list[dict[str, Any]]:
        """``nodes`` or ``actors`` of the cluster, read by a short-lived client process."""
        res = subprocess.run(
            [sys.executable, "-c", _QUERY, self.address, what],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env=ray_env(),
            cwd=self.base,
        )
        for line in res.stdout.splitlines():
            if line.startswith("@@"):
                return json.loads(line[2:])
        raise RuntimeError(f"cluster query {what!r} failed ({res.returncode}): {res.stderr[-2000:]}")

    def node_ids(self) -> dict[str, str]:
        """Live nodes by name → Ray node id (matched by the temp dir in each raylet's socket path)."""
        out = {}
        for n in self.query("nodes"):
            if not n["alive"]:
                continue
            for name, node in self.nodes.items():
                if n["raylet_socket"].startswith(str(node.temp_dir) + "/"):
                    out[name] = n["node_id"]
        return out

    def node_name(self, node_id: str, ids: dict[str, str] | None = None) -> str | None:
        """The name of the (live) node with this Ray node id."""
        ids = ids if ids is not None else self.node_ids()
        return next((name for name, nid in ids.items() if nid == node_id), None)

    def wait_alive(self, names: list[str], timeout_s: float = 90.0) -> dict[str, str]:
        """Wait (bounded) until every named node is alive in ``ray.nodes()``; returns name → node id."""
        deadline = time.monotonic() + timeout_s
        ids: dict[str, str] = {}
        while True:
            for name in names:
                node = self.nodes[name]
                if not node.alive():
                    raise NodeExitedError(name, f"node {name} exited with {node.proc.returncode}:\n{node.log_tail()}")
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                ids = self.node_ids()
                if all(name in ids for name in names):
                    return ids
            if time.monotonic() > deadline:
                raise TimeoutError(f"nodes {sorted(set(names) - set(ids))} not alive within {timeout_s:.0f}s")
            time.sleep(0.5)

    def wait_dead(self, node_id: str, timeout_s: float = 60.0) -> None:
        """Wait (bounded) until the GCS marks this node dead."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                if not any(n["alive"] and n["node_id"] == node_id for n in self.query("nodes")):
                    return
            time.sleep(0.5)
        raise TimeoutError(f"node {node_id} still alive {timeout_s:.0f}s after its raylet was killed")

    # ------------------------------------------------------------------ failures
    def kill_raylet(self, name: str) -> int:
        """SIGKILL the raylet of a worker node, as when a machine dies; returns the PID killed."""
        if name == self.head_spec.name:
            raise ValueError("kill a worker node, not the head (the head holds the cluster's GCS)")
        node = self.nodes[name]
        pid = node.raylet_pid()
        if pid is None:
            raise RuntimeError(f"no raylet found for node {name}")
        os.kill(pid, signal.SIGKILL)
        log.info("killed raylet %d of node %s", pid, name)
        return pid

    def restart(self, name: str, timeout_s: float = 90.0) -> str:
        """Start a fresh node with the same name and resources (after a kill); returns its node id."""
        old = self.nodes[name]
        _stop_process(old.proc, grace_s=10.0)  # its `ray start --block` exits by itself once the raylet died
        self._start_worker_nodes([name], time.monotonic() + timeout_s)
        return self.node_ids()[name]


def start_cluster(workers: list[NodeSpec], head: NodeSpec | None = None, timeout_s: float = 120.0) -> RayCluster:
    """Start a cluster (head plus ``workers``) and return it once every node is alive."""
    return RayCluster(workers, head).start(timeout_s)
