"""A real RTSP server (GStreamer, ``rtsp_server.py``) on loopback, started and stopped by PID.

The server runs under the system Python, which has ``gi``; ``scripts/install-test-deps.sh``
installs the Debian packages. ``pause()``/``resume()`` (SIGSTOP/SIGCONT) simulate a hung
camera, ``stop()`` a dead one; ``start_rtsp_server(port=old.port)`` brings one back.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from tests.servers.kafka import free_port

SCRIPT = Path(__file__).with_name("rtsp_server.py")
SYSTEM_PYTHON = os.environ.get("ODDEYE_GI_PYTHON", "/usr/bin/python3")


@functools.cache
def rtsp_server_available() -> str | None:
    """None when the GStreamer RTSP server can run here, else the reason it cannot."""
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        return f"{SYSTEM_PYTHON} not found (set ODDEYE_GI_PYTHON to a Python with gi)"
    probe = subprocess.run(
        [
            SYSTEM_PYTHON,
            "-c",
            "import gi; gi.require_version('GstRtspServer', '1.0'); from gi.repository import GstRtspServer",
        ],
        capture_output=True,
        timeout=30,
    )
    if probe.returncode != 0:
        return "GStreamer RTSP server bindings missing: run `bash scripts/install-test-deps.sh`"
    return None


def require_rtsp_server() -> None:
    """Fail with the install hint when the server cannot run (tests against real servers never skip)."""
    reason = rtsp_server_available()
    if reason:
        raise RuntimeError(reason)


@dataclass
class RtspServer:
    port: int
    path: str
    proc: subprocess.Popen

    @property
    def url(self) -> str:
        return f"rtsp://127.0.0.1:{self.port}{self.path}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def pause(self) -> None:
        """Freeze the server (a hung camera: the TCP connection stays open, nothing is sent)."""
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        """Terminate the server (a dead camera); safe to call twice, also when paused."""
        if self.proc.poll() is not None:
            return
        self.proc.terminate()
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGCONT)  # a stopped process acts on SIGTERM only once continued
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def start_rtsp_server(
    port: int | None = None,
    path: str = "/cam",
    width: int = 320,
    height: int = 240,
    fps: int = 15,
    pattern: str = "ball",
    codec: str = "h264",
    timeout_s: float = 20.0,
    user: str | None = None,
    password: str = "",
) -> RtspServer:
    """Start a server on 127.0.0.1 (a free port unless given) and wait until it accepts TCP.

    With ``user`` the server requires basic authentication with ``user``/``password``.
    """
    port = port or free_port()
    cmd = [
        SYSTEM_PYTHON,
        str(SCRIPT),
        "--port",
        str(port),
        "--path",
        path,
        "--width",
        str(width),
        "--height",
        str(height),
        "--fps",
        str(fps),
        "--pattern",
        pattern,
        "--codec",
        codec,
    ]
    if user:
        cmd += ["--user", user, "--password", password]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the RTSP server exited with {proc.returncode} (port {port} taken?): {' '.join(cmd)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return RtspServer(port, path, proc)
        except OSError:
            time.sleep(0.1)
    proc.kill()
    proc.wait(10)
    raise RuntimeError(f"the RTSP server did not listen on {port} within {timeout_s}s")
