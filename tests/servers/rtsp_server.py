"""A GStreamer RTSP server streaming a generated video, for tests and benchmarks.

Run it with the system Python (``/usr/bin/python3``), which can import ``gi``; a
virtualenv usually cannot, so tests start it as a subprocess (see ``tests/servers/rtsp.py``).
It serves one mount (``--path``) with a live ``videotestsrc`` encoded as H.264 (x264,
zero-latency) or Motion-JPEG, shared by all clients, and prints ``READY <port>`` once it
listens. It stops on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import signal
import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402


def launch_line(width: int, height: int, fps: int, pattern: str, codec: str, bitrate_kbps: int) -> str:
    """The media pipeline: a live test pattern, encoded and RTP-payloaded as ``pay0``."""
    src = f"videotestsrc is-live=true pattern={pattern} ! video/x-raw,width={width},height={height},framerate={fps}/1 "
    if codec == "jpeg":
        enc = "! videoconvert ! video/x-raw,format=I420 ! jpegenc quality=80 ! rtpjpegpay name=pay0 pt=26"
    else:
        enc = (
            f"! videoconvert ! x264enc tune=zerolatency speed-preset=ultrafast key-int-max={fps} "
            f"bitrate={bitrate_kbps} ! rtph264pay name=pay0 pt=96 config-interval=1"
        )
    return f"( {src}{enc} )"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--path", default="/cam")
    p.add_argument("--width", type=int, default=320)
    p.add_argument("--height", type=int, default=240)
    p.add_argument("--fps", type=int, default=15)
    p.add_argument("--pattern", default="ball", help="videotestsrc pattern (ball, smpte, snow, ...)")
    p.add_argument("--codec", choices=["h264", "jpeg"], default="h264")
    p.add_argument("--bitrate", type=int, default=2048, help="H.264 bitrate in kbit/s")
    p.add_argument("--user", help="require HTTP basic authentication as this user (with --password)")
    p.add_argument("--password", default="")
    args = p.parse_args(argv)

    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address(args.host)
    server.set_service(str(args.port))
    factory = GstRtspServer.RTSPMediaFactory()
    factory.set_launch(launch_line(args.width, args.height, args.fps, args.pattern, args.codec, args.bitrate))
    factory.set_shared(True)
    if args.user:
        # Basic authentication: only this user's token carries the role the mount grants access to.
        auth = GstRtspServer.RTSPAuth()
        token = GstRtspServer.RTSPToken()
        token.set_string(GstRtspServer.RTSP_TOKEN_MEDIA_FACTORY_ROLE, "viewer")
        auth.add_basic(GstRtspServer.RTSPAuth.make_basic(args.user, args.password), token)
        server.set_auth(auth)
        permissions = GstRtspServer.RTSPPermissions()
        permissions.add_permission_for_role("viewer", GstRtspServer.RTSP_PERM_MEDIA_FACTORY_ACCESS, True)
        permissions.add_permission_for_role("viewer", GstRtspServer.RTSP_PERM_MEDIA_FACTORY_CONSTRUCT, True)
        factory.set_permissions(permissions)
    server.get_mount_points().add_factory(args.path, factory)
    if server.attach(None) == 0:
        print(f"cannot listen on {args.host}:{args.port}", file=sys.stderr, flush=True)
        return 1

    loop = GLib.MainLoop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        GLib.unix_signal_add(GLib.PRIORITY_HIGH, sig, loop.quit)
    print(f"READY {args.port}", flush=True)
    loop.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
